"""What the trainer reports: one line per ``log_interval`` on rank 0, plus W&B and TensorBoard.

Throughput is reported as model FLOP/s per GPU and MFU. Model FLOPs count the matrix multiplies of
the architecture (never recomputation from activation checkpointing, so MFU stays comparable across
memory settings):

* per layer and token, forward: Q/K/V projections ``2 h (n_q + 2 n_kv) d``, output projection
  ``2 n_q d h``, MLP ``2 h f`` per up/gate branch and ``2 f h`` down, attention scores and the
  weighted sum ``2 · 2 s n_q d`` (the full sequence, no causal discount, as in PaLM's MFU);
* the LM head ``2 h V``;
* training = 3 × forward (backward costs twice the forward).
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field

import torch

from megatron_stablelm.config import Config, ConfigError

# Dense peak TFLOP/s per device by precision (no sparsity); fp32 without TF32.
_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "GH200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "A800": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 30.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},
    "MI300X": {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4},
    "MI250X": {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9},
}


def model_flops_per_token(cfg: Config, vocab_size: int, seq_length: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token, see the module docstring."""
    h, d = cfg.hidden_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.kv_heads
    f = cfg.ffn_hidden_size
    s = seq_length or cfg.seq_length
    qkv = 2 * h * (nq + 2 * nkv) * d
    dense = 2 * nq * d * h
    mlp = 2 * h * f * (2 if cfg.is_gated_mlp else 1) + 2 * f * h
    attention = 2 * 2 * s * nq * d
    forward = cfg.num_layers * (qkv + dense + mlp + attention) + 2 * h * vocab_size
    return 3.0 * forward


def peak_tflops(cfg: Config, precision: str) -> float | None:
    """``peak_tflops`` from the config, else the device's dense peak for ``precision``; None if unknown
    (CPU), in which case MFU is not reported."""
    if cfg.peak_tflops:
        return float(cfg.peak_tflops)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, table in _PEAK_TFLOPS.items():  # ordered: specific names before their prefixes
        if key in name:
            return table.get(precision)
    return None


def memory_gb() -> tuple[float, str]:
    """Peak memory of this process: GPU allocator peak on CUDA, resident set size on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30, "GPU"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "RSS"


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000.0
    return f"{n:.4g}P"


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass
class StepRecord:
    iteration: int
    loss: float
    lr: float
    grad_norm: float | None
    loss_scale: float | None
    seconds: float
    tokens: int
    skipped: bool


@dataclass
class MetricsLogger:
    """Aggregates step records over ``log_interval`` and emits the line and the trackers' scalars."""

    cfg: Config
    flops_per_token: float
    peak: float | None
    world_size: int
    train_iters: int
    rank: int = 0
    print_fn: object = print
    _window: list[StepRecord] = field(default_factory=list)
    _wandb: object = None
    _tb: object = None
    consumed_tokens: int = 0

    def open_trackers(self) -> None:
        """Start W&B (offline unless WANDB_MODE or an API key says otherwise) and TensorBoard on rank
        0. Missing packages are reported before training starts, not silently skipped."""
        if self.rank != 0:
            return
        if self.cfg.use_wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("use_wandb: true but the `wandb` package is not installed") from None
            mode = os.environ.get("WANDB_MODE") or (
                "online" if os.environ.get("WANDB_API_KEY") else "offline"
            )
            run = wandb.init(
                project=self.cfg.wandb_project or "megatron-stablelm",
                entity=self.cfg.wandb_team,
                group=self.cfg.wandb_group,
                name=self.cfg.wandb_name,
                config=self.cfg.to_dict(),
                mode=mode,
            )
            self._wandb = wandb
            self.print_fn(f"[wandb] {mode} run, directory {getattr(run, 'dir', '?')}")
        if self.cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "tensorboard_dir is set but TensorBoard is not installed (pip install tensorboard)"
                ) from None
            self._tb = SummaryWriter(log_dir=self.cfg.tensorboard_dir)
            self.print_fn(f"[tensorboard] writing to {self.cfg.tensorboard_dir}")

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.rank != 0:
            return
        clean = {
            k: v for k, v in values.items() if v is not None and not (isinstance(v, float) and math.isnan(v))
        }
        if self._wandb is not None:
            self._wandb.log(clean, step=step, commit=True)  # publish now, not when the next step arrives
        if self._tb is not None:
            for key, value in clean.items():
                self._tb.add_scalar(key, value, step)

    def record(self, rec: StepRecord) -> str | None:
        """Add one iteration; returns the printed line at the end of a ``log_interval`` window."""
        self._window.append(rec)
        self.consumed_tokens += rec.tokens
        interval = max(int(self.cfg.log_interval or 1), 1)
        if rec.iteration % interval and rec.iteration != self.train_iters:
            return None
        window, self._window = self._window, []
        good = [r for r in window if not r.skipped and math.isfinite(r.loss)]
        loss = sum(r.loss for r in good) / len(good) if good else math.nan
        seconds = sum(r.seconds for r in window) / len(window)
        tokens = sum(r.tokens for r in window)
        tok_s = tokens / max(sum(r.seconds for r in window), 1e-9)
        tflops = tok_s * self.flops_per_token / self.world_size / 1e12
        mfu = tflops / self.peak if self.peak else None
        mem, mem_kind = memory_gb()
        skipped = sum(r.skipped for r in window)
        norm = rec.grad_norm
        parts = [
            f"iter {rec.iteration}/{self.train_iters}",
            f"tokens {_human(self.consumed_tokens)}",
            f"loss {loss:.4f}",
            f"lr {rec.lr:.3e}",
            f"grad_norm {norm:.3f}" if norm is not None else "grad_norm n/a",
            f"loss_scale {rec.loss_scale:g}" if rec.loss_scale is not None else "loss_scale 1",
            f"step {seconds:.3f}s",
            f"tok/s {_human(tok_s)}",
            f"TFLOP/s/GPU {tflops:.2f}",
            f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a",
            f"mem {mem:.2f}GB {mem_kind}",
            f"ETA {_eta(seconds * (self.train_iters - rec.iteration))}",
        ]
        if skipped:
            parts.append(f"skipped {skipped}")
        line = " | ".join(parts)
        if self.rank == 0:
            self.print_fn(line)
        self.scalars(
            {
                "train/loss": loss,
                "train/lr": rec.lr,
                "train/grad_norm": norm,
                "train/loss_scale": rec.loss_scale,
                "train/step_seconds": seconds,
                "train/tokens_per_second": tok_s,
                "train/tflops_per_gpu": tflops,
                "train/mfu": mfu,
                "train/consumed_tokens": float(self.consumed_tokens),
                "train/skipped": float(skipped),
                "memory/peak_gb": mem,
            },
            rec.iteration,
        )
        return line

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start
