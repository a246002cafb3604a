#!/usr/bin/env python
"""Training-step throughput of a config: tokens/s, TFLOP/s, MFU, peak memory, and (``--vs-hf``) the
same model, batch and optimizer through ``transformers``' ``StableLmForCausalLM`` in the same process.

    python tools/benchmark.py configs/stablelm-2-1_6b.yml --seq-length 4096 --micro-batch 4 --vs-hf

Two modes, one process, one device (TP=1):

* ``--mode model`` (default, the A/B of the kernels): no DeepSpeed; a step is forward + per-token
  loss (masked mean) + backward + ``torch.optim.AdamW`` step, so the figure isolates the model's
  kernels from the engine. Both models use the same dtype for parameters and optimizer state (the
  config's precision on GPU, fp32 on CPU where bf16 matmuls are emulated and slow).
* ``--mode trainer``: the step as the trainer runs it: the model built by ``build_model`` under
  :class:`~megatron_stablelm.training.engine.TrainingEngine` (DeepSpeed, ZeRO-1 for bf16: bf16
  compute, fp32 master weights and fp32 Adam state, gradient clipping, the non-finite guard), one
  step = ``losses`` + ``backward(loss_sum, step_tokens)`` + ``finish_step()`` as
  ``Trainer.train_step`` does, one micro-batch per step (gradient accumulation 1). Against it,
  ``transformers`` trained the usual mixed-precision way: weights in the compute dtype (bf16 on GPU),
  an fp32 master copy stepped by ``torch.optim.AdamW`` (same lr, betas, eps, weight decay on matrices
  only, as the framework's decay groups), gradients cast to fp32 and clipped at the config's
  ``gradient_clipping``, the update skipped when the norm is not finite, master copied back. Both
  sides run at the config's constant peak learning rate. On CPU both run in fp32.

FLOPs per token, device peaks, MFU and peak memory come from :mod:`megatron_stablelm.metrics`, the
same functions the training log uses (its docstring states the convention). ``MFU(peak)`` is the
strict convention against the device's datasheet dense peak (or the config's ``peak_tflops``),
``MFU(mm)`` the same FLOPs against a measured matmul ceiling (the best large-GEMM throughput of this
device in the benchmark dtype), and ``MFU(6N+12lsh)`` the published anchors' convention against the
datasheet peak: compare each target with the figure of its own convention.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_stablelm import metrics
from megatron_stablelm.cli import USER_ERRORS, add_config_arguments, overrides_from, parse_config_args
from megatron_stablelm.config.precision import TORCH_NAMES, torch_dtype

if TYPE_CHECKING:
    from megatron_stablelm.config import Config


def resolve_device(name: str | None) -> torch.device:
    """``--device`` (default: cuda when available, else cpu), with the CUDA index made explicit
    (``torch.cuda.set_device`` refuses a bare ``cuda``)."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best measured TFLOP/s of a square GEMM (the practical ceiling MFU is judged against)."""
    size = 8192 if device.type == "cuda" else 1024
    repeats = 20 if device.type == "cuda" else 5
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * size**3 / best / 1e12


def make_batch(
    cfg, vocab: int, micro_batch: int, seq: int, device: torch.device, documents: int | str, seed: int
):
    """One micro-batch of random tokens: one document per row, ``documents`` equal-length packed
    documents per row, or (``"web"``) web-like documents of log-normal length packed across the rows
    and turned into positions, ``cu_seqlens`` and loss mask by the data loader's own rule."""
    if documents == "web":
        batch = _web_batch(cfg, vocab, micro_batch, seq, seed)
    else:
        batch = _equal_documents_batch(vocab, micro_batch, seq, documents, seed)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _equal_documents_batch(vocab: int, micro_batch: int, seq: int, documents: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (micro_batch, seq + 1), generator=gen)
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(micro_batch, seq),
        "position_ids": torch.arange(seq).expand(micro_batch, seq).contiguous(),
    }
    if documents > 1:  # equal-length packed documents per row, positions restarting in each
        length = math.ceil(seq / documents)
        starts = sorted(
            {r * seq + min(i * length, seq) for r in range(micro_batch) for i in range(documents)}
        )
        batch["cu_seqlens"] = torch.tensor(starts + [micro_batch * seq], dtype=torch.int32)
        batch["max_seqlen"] = length
        batch["position_ids"] = (torch.arange(seq) % length).expand(micro_batch, seq).contiguous()
    return batch


def _web_batch(cfg, vocab: int, micro_batch: int, seq: int, seed: int) -> dict:
    from megatron_stablelm.data.loader import document_fields
    from megatron_stablelm.training.synthetic import web_document_tokens

    eod = vocab - 1  # any id: the batch only needs the documents' ends marked
    rows = torch.from_numpy(web_document_tokens(micro_batch, seq, vocab, eod, seed))
    tokens, labels = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
    positions, cu, longest = document_fields(
        tokens.numpy(), eod, reset_position_ids=cfg.reset_position_ids, reset_attention_mask=True
    )
    loss_mask = torch.ones(micro_batch, seq)
    if cfg.eod_mask_loss:
        loss_mask[labels == eod] = 0.0
    return {
        "tokens": tokens,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": torch.from_numpy(positions),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": longest,
    }


def _documents_arg(value: str) -> int | str:
    """``--documents``: a positive count of equal documents per row, or ``web``."""
    if value == "web":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a positive number of documents per row, or 'web'")
    return count


def time_steps(step: Callable[[], torch.Tensor], device: torch.device, warmup: int, steps: int) -> dict:
    """Median step seconds, last loss and peak memory of ``steps`` timed calls after ``warmup``."""
    return time_interleaved({"step": step}, device, warmup, steps)["step"]


def time_interleaved(
    steps_by_name: dict[str, Callable[[], torch.Tensor]], device: torch.device, warmup: int, steps: int
) -> dict[str, dict]:
    """:func:`time_steps` for several models at once, alternating one step of each: on a shared or
    noisy machine (a CPU box) they then all see the same background load, so their ratio is stable
    even when the absolute figures are not."""
    first: dict[str, float] = {}  # the loss of each side's first step: same weights, same batch
    for _ in range(warmup):
        for name, step in steps_by_name.items():
            _first_losses(first, name, step())
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[str, list[float]] = {name: [] for name in steps_by_name}
    losses: dict[str, torch.Tensor] = {}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            _sync(device)
            start = time.perf_counter()
            losses[name] = step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
            _first_losses(first, name, losses[name])
    return {
        name: {
            "step_s": sorted(t)[len(t) // 2],
            "loss": float(losses[name]),
            "first_loss": first[name],
            "peak_mem_gib": metrics.peak_memory_gib(device)[0],
        }
        for name, t in times.items()
    }


def _first_losses(first: dict[str, float], name: str, loss: torch.Tensor) -> None:
    if name not in first:
        first[name] = float(loss)


def _training_step(
    params, per_token_loss: Callable[[], torch.Tensor], mask: torch.Tensor, device: torch.device
) -> Callable[[], torch.Tensor]:
    """One step: masked mean of ``per_token_loss()``, backward, AdamW update (the same for both models)."""
    kwargs = {"lr": 1e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
    if device.type == "cuda":
        kwargs["fused"] = True
    opt = torch.optim.AdamW(params, **kwargs)

    def step() -> torch.Tensor:
        loss = (per_token_loss() * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def framework_step(model, batch: dict, device: torch.device) -> Callable[[], torch.Tensor]:
    def per_token_loss() -> torch.Tensor:
        return model(
            batch["tokens"],
            position_ids=batch["position_ids"],
            cu_seqlens=batch.get("cu_seqlens"),
            max_seqlen=batch.get("max_seqlen"),
            labels=batch["labels"],
        )

    return _training_step(model.parameters(), per_token_loss, batch["loss_mask"], device)


def _hf_per_token_loss(model, batch: dict) -> Callable[[], torch.Tensor]:
    """The same loss as the framework: per-token fp32 cross-entropy. (Document masking is not given to
    HF: it would need a dense 4-D mask; compare with ``--documents 1``.)"""

    def per_token_loss() -> torch.Tensor:
        logits = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], use_cache=False).logits
        return torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), batch["labels"].flatten(), reduction="none"
        ).view_as(batch["loss_mask"])

    return per_token_loss


def hf_step(model, batch: dict, device: torch.device) -> Callable[[], torch.Tensor]:
    """Model mode: masked mean loss, backward, AdamW on the model's own parameters."""
    return _training_step(model.parameters(), _hf_per_token_loss(model, batch), batch["loss_mask"], device)


def _fp32_master_adamw(cfg, params: list[torch.nn.Parameter], device: torch.device):
    """fp32 master copies of ``params`` and the AdamW stepping them with the config's settings (decay
    on matrices only, as the framework's decay groups)."""
    master = [p.detach().float().clone().requires_grad_(True) for p in params]
    adam = cfg.adam
    groups = [
        {"params": [m for m in master if m.dim() > 1], "weight_decay": cfg.weight_decay},
        {"params": [m for m in master if m.dim() <= 1], "weight_decay": 0.0},
    ]
    kwargs = {"lr": adam.lr, "betas": tuple(adam.betas), "eps": adam.eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    return master, torch.optim.AdamW(groups, **kwargs)


def hf_mixed_step(cfg, model, batch: dict, device: torch.device) -> Callable[[], torch.Tensor]:
    """Trainer mode: transformers the way its users train in mixed precision (module docstring):
    compute-dtype weights, fp32 master + AdamW, fp32 gradients clipped, non-finite steps skipped."""
    params = [p for p in model.parameters() if p.requires_grad]
    master, opt = _fp32_master_adamw(cfg, params, device)
    per_token_loss, mask = _hf_per_token_loss(model, batch), batch["loss_mask"]
    clip = float(cfg.gradient_clipping or 0.0)

    def step() -> torch.Tensor:
        loss = (per_token_loss() * mask).sum() / mask.sum()
        loss.backward()
        for m, p in zip(master, params, strict=True):
            m.grad = p.grad.float()
            p.grad = None
        norm = torch.nn.utils.clip_grad_norm_(master, clip if clip > 0 else math.inf)
        if torch.isfinite(norm):  # the non-finite guard: skip the update
            opt.step()
            with torch.no_grad():
                torch._foreach_copy_(params, master)
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def trainer_step(setup: Setup) -> Callable[[], torch.Tensor]:
    """Trainer mode: the framework step through ``TrainingEngine`` as ``Trainer.train_step`` runs it
    (token-mean loss weighting, DeepSpeed backward/step, ``finish_step``), at the peak learning rate.
    Returns the step's token-mean loss."""
    from megatron_stablelm.config import validate_layout
    from megatron_stablelm.training.engine import TrainingEngine

    cfg, batch = setup.cfg, setup.batch
    layout = validate_layout(cfg, 1)
    engine = TrainingEngine(cfg, setup.model, layout)
    engine.train()
    batches = [batch] * layout.accumulation
    setup.outcomes = []

    def step() -> torch.Tensor:
        engine.set_lr(cfg.peak_lr)
        loss_sum, step_tokens, outcome = engine.step(batches)
        setup.outcomes.append(outcome)
        return loss_sum / step_tokens

    return step


def build_hf_model(cfg, model, vocab: int, dtype: torch.dtype, device: torch.device):
    """The same model in ``transformers`` (SDPA attention), holding our weights through
    :mod:`megatron_stablelm.hf_conversion` (``StableLmForCausalLM``, or ``GPTNeoXForCausalLM`` for
    Alpha v1). Architectures HF cannot represent are refused there, with the key named."""
    from transformers import AutoModelForCausalLM

    from megatron_stablelm import hf_conversion

    hf_cfg = hf_conversion.hf_config(cfg, vocab, dtype)
    hf_cfg._attn_implementation = "sdpa"
    state = hf_conversion.to_hf_state_dict(
        cfg, {k: v.detach().cpu() for k, v in model.local_state_dict().items()}, vocab
    )
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_cfg).to(dtype)
    hf.load_state_dict({k.replace("embed_out.", "lm_head."): v for k, v in state.items()}, strict=True)
    if cfg.checkpoint_activations:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.train()
    return hf, "same weights (hf_conversion.to_hf_state_dict)"


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = overrides_from(args)
    if args.seq_length:
        overrides.append(f"seq_length={args.seq_length}")
        overrides.append(f"max_position_embeddings={args.seq_length}")
    if args.recompute is not None:
        overrides.append(f"checkpoint_activations={'true' if args.recompute == 'full' else 'false'}")
    if getattr(args, "mode", "model") == "trainer":  # one micro-batch per step, as in model mode
        overrides += ["gradient_accumulation_steps=1", "train_batch_size=null"]
        if args.micro_batch:
            overrides.append(f"train_micro_batch_size_per_gpu={args.micro_batch}")
    return overrides


DEFAULT_OPTIMIZER = {"type": "Adam", "params": {"lr": 1.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}}


def trainer_config(cfg, dtype_name: str) -> None:
    """Trainer mode: the config's precision becomes the benchmark dtype (fp32 on CPU, where DeepSpeed
    runs without ZeRO master weights) and a config without an ``optimizer`` block (the tiny test
    configs) gets Adam at lr 1e-4."""
    if dtype_name != cfg.params_dtype_name:
        cfg.bf16 = cfg.fp16 = None
        cfg.precision = dtype_name  # a short name is a valid `precision` value
    if not cfg.optimizer:
        cfg.optimizer = DEFAULT_OPTIMIZER


def load_benchmark_config(paths: list[Path], overrides: list[str]):
    """The config with overrides; an ``attention_config`` written for the full depth is stretched to
    an overridden ``num_layers`` (so ``--override num_layers=4`` just works)."""
    from megatron_stablelm.config import load_config, validate_config

    cfg = load_config(paths, overrides=overrides, validate=False, report_ignored=False)
    if cfg.attention_config and not any(
        o.replace("-", "_").startswith("attention_config=") for o in overrides
    ):
        from megatron_stablelm.config import expand_attention_config

        try:
            expand_attention_config(cfg.attention_config, cfg.num_layers)
        except ValueError:
            cfg.attention_config = [[[cfg.attention_config[0][0][0]], cfg.num_layers]]
    validate_config(cfg)
    return cfg


@dataclass
class Setup:
    """One benchmark's inputs: the config, where and in which dtype it runs, the model and its batch."""

    cfg: Config
    device: torch.device
    dtype_name: str
    vocab: int
    micro_batch: int
    attention_backend: str
    model: torch.nn.Module | None
    batch: dict
    mode: str = "model"
    outcomes: list = field(default_factory=list)  # trainer mode: each step's StepOutcome

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.cfg.seq_length


def prepare(args: argparse.Namespace) -> Setup:
    """Config (with the command line's overrides), device, process groups (TP=1), attention backend,
    the model in training mode and a batch of random tokens."""
    from megatron_stablelm import parallel
    from megatron_stablelm.model import build_model
    from megatron_stablelm.parallelize import attention_backend

    cfg = load_benchmark_config(args.config, _overrides(args))
    device = resolve_device(args.device)
    dtype_name = args.dtype or (cfg.params_dtype_name if device.type == "cuda" else "fp32")
    micro_batch = args.micro_batch or cfg.train_micro_batch_size_per_gpu
    vocab = cfg.padded_vocab()
    if args.mode == "trainer":
        trainer_config(cfg, dtype_name)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    parallel.initialize(1)
    with torch.device(device):
        model = build_model(cfg, vocab, dtype=dtype_name, attention=args.attention)
    model.to(device).train()
    batch = make_batch(cfg, vocab, micro_batch, cfg.seq_length, device, args.documents, cfg.seed)
    backend = attention_backend(model, device).describe
    return Setup(cfg, device, dtype_name, vocab, micro_batch, backend, model, batch, args.mode)


def throughput(
    timing: dict,
    tokens_per_step: int,
    flops_per_token: float,
    flops_per_token_6n_12lsh: float,
    peak: float | None,
    ceiling: float,
) -> dict:
    """A timing (``step_s``, ...) with tokens/s, TFLOP/s and the three MFUs (module docstring)."""
    tokens_s = tokens_per_step / timing["step_s"]
    return {
        **timing,
        "tokens_per_s": tokens_s,
        "tflops": metrics.tflops_per_device(tokens_s, flops_per_token),
        "mfu_vs_peak": metrics.mfu(tokens_s, flops_per_token, peak),
        "mfu_6n_12lsh_vs_peak": metrics.mfu(tokens_s, flops_per_token_6n_12lsh, peak),
        "mfu_vs_matmul": metrics.mfu(tokens_s, flops_per_token, ceiling),
    }


def time_models(setup: Setup, args: argparse.Namespace) -> tuple[dict[str, dict], str | None]:
    """Timings of the framework step and, with ``--vs-hf``, of transformers' (plus how its weights
    were obtained). On CPU both models fit side by side: they are timed interleaved (fair under
    background load). On a GPU each gets the device to itself, one after the other."""
    device, warmup, steps = setup.device, args.warmup, args.steps
    hf_batch = {k: v for k, v in setup.batch.items() if k != "cu_seqlens"}
    if setup.mode == "trainer":
        ours, make_hf_step = trainer_step(setup), functools.partial(hf_mixed_step, setup.cfg)
    else:
        ours, make_hf_step = framework_step(setup.model, setup.batch, device), hf_step
    if args.vs_hf and device.type != "cuda":
        hf, note = build_hf_model(setup.cfg, setup.model, setup.vocab, setup.dtype, device)
        steps_by_name = {"framework": ours, "hf": make_hf_step(hf, hf_batch, device)}
        return time_interleaved(steps_by_name, device, warmup, steps), note
    timed = {"framework": time_steps(ours, device, warmup, steps)}
    if not args.vs_hf:
        return timed, None
    del ours  # the step holds the model and its optimizer state: free the device for HF
    setup.model = None
    gc.collect()  # a DeepSpeed engine sits in reference cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
    from megatron_stablelm.model import build_model

    # rebuild ours only to take its weights across; HF owns the device from here
    with torch.device("cpu"):
        donor = build_model(setup.cfg, setup.vocab, dtype=setup.dtype_name)
    hf, note = build_hf_model(setup.cfg, donor, setup.vocab, setup.dtype, device)
    del donor
    timed["hf"] = time_steps(make_hf_step(hf, hf_batch, device), device, warmup, steps)
    return timed, note


def _document_stats(setup: Setup) -> dict:
    """How many documents the batch holds and the share of full-row causal attention work they leave
    (the strict MFU counts full rows: with packed documents it is an upper bound, see metrics.py)."""
    cu = setup.batch.get("cu_seqlens")
    if cu is None:
        return {"documents_in_batch": setup.micro_batch, "attention_work_share": 1.0}
    lengths = torch.diff(cu.cpu()).double()
    seq = setup.cfg.seq_length
    full = setup.micro_batch * seq * (seq + 1) / 2
    return {
        "documents_in_batch": int(lengths.numel()),
        "attention_work_share": float((lengths * (lengths + 1) / 2).sum() / full),
    }


def describe(setup: Setup, args: argparse.Namespace) -> dict:
    """What was measured, where and with which kernels."""
    from megatron_stablelm import kernels

    device = setup.device
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "config": [str(p) for p in args.config],
        "dtype": setup.dtype_name,
        "seq_length": setup.cfg.seq_length,
        "micro_batch": setup.micro_batch,
        "tokens_per_step": setup.tokens_per_step,
        "documents_per_row": args.documents,
        **_document_stats(setup),
        "attention_backend": setup.attention_backend,
        "elementwise_kernels": "triton"
        if kernels._dispatch.use_triton(torch.empty(0, device=device))
        else "reference",
        "full_recompute": bool(setup.cfg.checkpoint_activations),
        "sdpa_backend": args.sdpa_backend or "default",
        "mode": setup.mode,
        "step": TRAINER_STEP if setup.mode == "trainer" else MODEL_STEP,
    }


MODEL_STEP = "model only: forward, masked-mean loss, backward, torch AdamW on the model's parameters (both)"
TRAINER_STEP = (
    "framework: TrainingEngine (DeepSpeed; bf16/fp16 under ZeRO-1 with fp32 master and Adam state), "
    "clipping, non-finite guard; transformers: compute-dtype weights, fp32 master + torch AdamW, "
    "clipping at the same norm, non-finite steps skipped"
)


def run(args: argparse.Namespace) -> dict:
    setup = prepare(args)
    cfg, seq = setup.cfg, setup.cfg.seq_length
    result = describe(setup, args)
    result["flops_per_token"] = metrics.flops_per_token(cfg, setup.vocab, seq)
    result["flops_per_token_6n_12lsh"] = metrics.flops_per_token_6n_12lsh(cfg, setup.vocab, seq)
    result["peak_tflops"] = metrics.peak_tflops(cfg, setup.dtype_name, setup.device)
    result["matmul_ceiling_tflops"] = matmul_ceiling_tflops(setup.device, setup.dtype)
    timed, note = time_models(setup, args)
    for name, timing in timed.items():
        result[name] = throughput(
            timing,
            setup.tokens_per_step,
            result["flops_per_token"],
            result["flops_per_token_6n_12lsh"],
            result["peak_tflops"],
            result["matmul_ceiling_tflops"],
        )
    if setup.outcomes:
        last = setup.outcomes[-1]
        result["framework"].update(grad_norm=last.grad_norm, applied=all(o.applied for o in setup.outcomes))
    if note is not None:
        result["hf"]["weights"] = note
        result["speedup_vs_hf"] = result["framework"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    return result


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(r: dict) -> None:
    print(f"device            {r['device']}  (torch {r['torch']}, {r['dtype']})")
    print(f"config            {' '.join(r['config'])}")
    print(f"step ({r['mode']:7})   {r['step']}")
    print(f"batch             {r['micro_batch']} x {r['seq_length']} = {r['tokens_per_step']} tokens/step")
    print(f"attention         {r['attention_backend']} (SDPA kernel: {r['sdpa_backend']})")
    if r["documents_in_batch"] != r["micro_batch"]:
        print(
            f"documents         {r['documents_in_batch']} in the batch; attention work "
            f"{100 * r['attention_work_share']:.1f}% of full causal rows (MFU counts full rows)"
        )
    print(f"kernels           {r['elementwise_kernels']}; full recompute: {r['full_recompute']}")
    print(
        f"matmul ceiling    {r['matmul_ceiling_tflops']:.2f} TFLOP/s; datasheet peak {_fmt(r['peak_tflops'], '.0f')}"
    )
    print(
        f"FLOPs/token       {r['flops_per_token'] / 1e9:.4g} GFLOP strict (6 x matmul params + causal attention); "
        f"{r['flops_per_token_6n_12lsh'] / 1e9:.4g} GFLOP 6N+12lsh (anchors' convention)"
    )
    rows = [("framework", r["framework"])] + ([("transformers", r["hf"])] if "hf" in r else [])
    print(
        f"{'':14}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU(peak)':>11}{'MFU(mm)':>9}{'MFU(6N+12lsh)':>15}"
        f"{'step s':>9}{'peak GiB':>10}{'loss':>8}"
    )
    for name, m in rows:
        mfu_peak = "n/a" if m["mfu_vs_peak"] is None else f"{100 * m['mfu_vs_peak']:.1f}%"
        mfu_anchor = "n/a" if m["mfu_6n_12lsh_vs_peak"] is None else f"{100 * m['mfu_6n_12lsh_vs_peak']:.1f}%"
        print(
            f"{name:14}{m['tokens_per_s']:12.1f}{m['tflops']:10.3f}{mfu_peak:>11}{100 * m['mfu_vs_matmul']:8.1f}%"
            f"{mfu_anchor:>15}{m['step_s']:9.4f}{m['peak_mem_gib']:10.2f}{m['loss']:8.3f}"
        )
    if "hf" in r:
        print(f"hf weights        {r['hf']['weights']}")
        print(
            f"first-step loss   framework {r['framework']['first_loss']:.6f}  hf {r['hf']['first_loss']:.6f}"
        )
        print(f"speedup vs hf     {r['speedup_vs_hf']:.3f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(p, dest="config")
    p.add_argument(
        "--mode",
        choices=["model", "trainer"],
        default="model",
        help="model: the model's kernels + torch AdamW (default); trainer: the step as the trainer runs it "
        "(TrainingEngine: DeepSpeed, mixed precision, ZeRO-1, clipping) vs transformers in mixed precision",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq-length", type=int)
    p.add_argument("--micro-batch", type=int)
    p.add_argument(
        "--dtype", choices=sorted(TORCH_NAMES), help="default: the config's precision on GPU, fp32 on CPU"
    )
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--attention", help="attention type instead of the config's attention_config")
    p.add_argument(
        "--sdpa-backend",
        choices=sorted(SDPA_BACKENDS),
        help="restrict PyTorch SDPA (both models) to one kernel; default: PyTorch's own choice",
    )
    p.add_argument(
        "--documents",
        type=_documents_arg,
        default=1,
        help="packed documents per row (document masking), or 'web': web-like documents of log-normal "
        "length (mean ~700 tokens) through the loader's rule for positions and cu_seqlens",
    )
    p.add_argument("--recompute", choices=["none", "full"], help="override checkpoint_activations")
    p.add_argument("--vs-hf", action="store_true", help="also run transformers' StableLmForCausalLM")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--profile", type=Path, help="write a PyTorch profiler trace of 3 framework steps here")
    return parse_config_args(p, argv, dest="config")


# --sdpa-backend name → torch.nn.attention.SDPBackend member
SDPA_BACKENDS = {
    "flash": "FLASH_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def sdpa_backend_context(name: str | None) -> contextlib.AbstractContextManager:
    """Restrict SDPA to one kernel (``--sdpa-backend``), or leave PyTorch's choice."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[name])])


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and print its report; a bad config or override ends in one ``error:`` line and
    exit status 2 before any model is built."""
    args = parse_args(argv)
    try:
        load_benchmark_config(args.config, _overrides(args))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    with sdpa_backend_context(args.sdpa_backend):
        result = run(args)
        print_report(result)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2))
        if args.profile:
            profile(args)
    return result


def profile(args: argparse.Namespace) -> None:
    """Profile 3 framework steps (in trainer mode: through ``TrainingEngine``, whose ``engine.*``
    labels split the step into forward, backward, optimizer and finish); print the top CUDA (or CPU)
    ops and write ``top_ops.txt``, ``phases.txt`` and a Chrome trace into ``--profile``."""
    setup = prepare(args)
    step = (
        trainer_step(setup)
        if setup.mode == "trainer"
        else framework_step(setup.model, setup.batch, setup.device)
    )
    profile_step(step, setup.device, args.profile)
    if not args.vs_hf:
        return
    del step  # as in time_models: free the device, then transformers' step into PROFILE/hf
    setup.model = None
    gc.collect()
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    from megatron_stablelm.model import build_model

    with torch.device("cpu"):
        donor = build_model(setup.cfg, setup.vocab, dtype=setup.dtype_name)
    hf, _ = build_hf_model(setup.cfg, donor, setup.vocab, setup.dtype, setup.device)
    del donor
    make = functools.partial(hf_mixed_step, setup.cfg) if setup.mode == "trainer" else hf_step
    hf_batch = {k: v for k, v in setup.batch.items() if k != "cu_seqlens"}
    profile_step(make(hf, hf_batch, setup.device), setup.device, args.profile / "hf")


def profile_step(step: Callable[[], torch.Tensor], device: torch.device, out: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for _ in range(2):
        step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities, record_shapes=False) as prof:
        for _ in range(3):
            step()
        _sync(device)
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=key, row_limit=25)
    (out / "top_ops.txt").write_text(table)
    print(table)
    # trainer mode: per phase and step, the host time of its range and the device time of the kernels
    # it launched (on CUDA the profiler lists each label twice, host range and device range: merged)
    phases: dict[str, list[float]] = {}
    for a in averages:
        if a.key.startswith("engine."):
            device_us = getattr(a, "device_time_total", getattr(a, "cuda_time_total", 0.0))
            cpu, dev = phases.setdefault(a.key, [0.0, 0.0])
            phases[a.key] = [max(cpu, a.cpu_time_total), max(dev, device_us)]
    if phases:
        lines = [f"{'phase':22}{'host ms/step':>14}{'device ms/step':>16}"]
        for key, (cpu, dev) in sorted(phases.items()):
            lines.append(f"{key:22}{cpu / 3e3:>14.2f}{dev / 3e3:>16.2f}")
        (out / "phases.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
