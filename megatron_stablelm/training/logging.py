"""What the trainer reports: one line per ``log_interval`` on rank 0, plus W&B and TensorBoard.

Throughput is reported as model TFLOP/s per GPU and MFU, counted by :mod:`megatron_stablelm.metrics`
(FLOPs per token in the strict convention, the device peak table, peak memory), the same functions
``tools/benchmark.py`` uses, so the log and the benchmark give the same MFU for the same step.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_stablelm import metrics
from megatron_stablelm.config import Config, ConfigError

__all__ = ["MetricsLogger", "StepRecord"]


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
    spike: bool = False  # skipped because its loss spiked (spikes.py), not because it was non-finite
    grad_spike: bool = False  # applied, but its gradient norm spiked (counts toward a rollback)


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
    sink: Callable[[dict], None] | None = None  # receives each window's figures (the run's metrics file)
    _window: list[StepRecord] = field(default_factory=list)
    _wandb: object = None
    _tb: object = None
    _step_average: float | None = None  # moving average of step time, for a steady ETA
    consumed_tokens: int = 0

    def open_trackers(self) -> None:
        """Start W&B (offline unless WANDB_MODE or an API key says otherwise; ``wandb_id`` and
        ``wandb_resume`` continue a run, as in GPT-NeoX) and TensorBoard on rank 0. Missing packages
        are reported before training starts, not silently skipped."""
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
                id=self.cfg.wandb_id,
                resume=self.cfg.wandb_resume,
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
        tflops = metrics.tflops_per_device(tok_s, self.flops_per_token, self.world_size)
        mfu = metrics.mfu(tok_s, self.flops_per_token, self.peak, self.world_size)
        mem, mem_kind = metrics.peak_memory_gib()
        skipped = sum(r.skipped for r in window)
        spikes = sum(r.spike for r in window)
        # ETA from a moving average over windows: one slow window (an evaluation, a save) moves it a little
        avg = self._step_average
        self._step_average = seconds if avg is None else 0.8 * avg + 0.2 * seconds
        norm = rec.grad_norm
        parts = [
            f"iter {rec.iteration}/{self.train_iters}",
            f"tokens {metrics.si_prefixed(self.consumed_tokens)}",
            f"loss {loss:.4f}",
            f"lr {rec.lr:.3e}",
            f"grad_norm {norm:.3f}" if norm is not None else "grad_norm n/a",
            f"loss_scale {rec.loss_scale:g}" if rec.loss_scale is not None else "loss_scale 1",
            f"step {seconds:.3f}s",
            f"tok/s {metrics.si_prefixed(tok_s)}",
            f"TFLOP/s/GPU {tflops:.2f}",
            f"MFU {100 * mfu:.1f}%" if mfu is not None else "MFU n/a",
            f"mem {mem:.2f}GiB {mem_kind}",
            f"ETA {_eta(self._step_average * (self.train_iters - rec.iteration))}",
        ]
        if skipped:
            parts.append(f"skipped {skipped}" + (f" ({spikes} loss spikes)" if spikes else ""))
        line = " | ".join(parts)
        if self.rank == 0:
            self.print_fn(line)
            if self.sink is not None:
                self.sink(
                    {
                        "iteration": rec.iteration,
                        "loss": loss,
                        "lr": rec.lr,
                        "grad_norm": norm,
                        "tokens_per_s": tok_s,
                        "step_s": seconds,
                        "mfu": mfu,
                        "tflops_per_gpu": tflops,
                        "peak_memory_gib": mem,
                        "consumed_tokens": self.consumed_tokens,
                        "skipped": skipped,
                        "spike_skipped": spikes,
                    }
                )
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
