#!/usr/bin/env python
"""GPU micro-benchmark of each element-wise kernel's alternatives, at Stable LM 2 1.6B shapes
(seq 4096 × micro-batch 4 tokens, hidden 2048, 32 heads × 64, rotary 16 dims, FFN 5632, vocab 100352):
eager PyTorch reference, ``torch.compile`` of the reference, our Triton kernel, and liger-kernel's where
it is installed. Forward + backward, median of CUDA-event timings, plus achieved GB/s of the minimum
traffic. The numbers decide which implementation ``kernels/_dispatch.py`` should pick on GPU.

    python benchmarks/kernels_bench.py [--tokens 16384]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Callable
from unittest import mock

import torch

from megatron_stablelm import kernels

# Stable LM 2 1.6B: hidden, heads, head dim, rotary dims, FFN, padded vocabulary
HIDDEN, HEADS, HEAD_DIM, ROTARY_DIMS, FFN, VOCAB = 2048, 32, 64, 16, 5632, 100352


def bench(fn: Callable[[], object], iters: int = 30) -> float:
    """Median milliseconds of ``fn`` (forward and backward inside)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fwd_bwd(op: Callable, *inputs: torch.Tensor) -> Callable[[], None]:
    grads = None

    def run() -> None:
        nonlocal grads
        out = op(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        if grads is None:
            grads = [torch.randn_like(o) for o in outs]
        torch.autograd.backward(outs, grads)
        for t in inputs:
            t.grad = None

    return run


def reference_kernels(fn: Callable) -> Callable:
    """``fn`` with the dispatcher forced to the PyTorch reference path (the backward follows the
    forward's choice, which the autograd functions record)."""
    from megatron_stablelm.kernels._dispatch import ENV_VAR

    def run(*args):
        with mock.patch.dict(os.environ, {ENV_VAR: "reference"}):
            return fn(*args)

    return run


def _leaf(*shape: int, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)


def elementwise_cases(n: int, ops, liger, device: str = "cuda") -> dict[str, dict[str, Callable[[], None]]]:
    """SwiGLU, rotary, LayerNorm (plain, with the residual add, per head) for ``n`` tokens: each
    alternative as a forward + backward closure."""
    cases: dict[str, dict[str, Callable[[], None]]] = {}
    x = _leaf(n, 2 * FFN, device=device)
    cases["swiglu"] = {
        "eager": fwd_bwd(kernels.swiglu_reference, x),
        "compile": fwd_bwd(torch.compile(kernels.swiglu_reference), x),
        "triton": fwd_bwd(ops.swiglu, x),
    }
    if liger is not None:
        cases["swiglu"]["liger"] = fwd_bwd(lambda t: liger.liger_swiglu(*t.chunk(2, -1)), x)

    q, k = _leaf(n, 1, HEADS, HEAD_DIM, device=device), _leaf(n, 1, HEADS, HEAD_DIM, device=device)
    positions = torch.arange(n, device=device).view(n, 1)
    cos, sin = kernels.rotary_cos_sin(positions, ROTARY_DIMS, 10000.0, torch.bfloat16)

    def rot_ref(a, b):
        return kernels.apply_rotary_reference(a, cos, sin), kernels.apply_rotary_reference(b, cos, sin)

    cases["rotary q+k"] = {
        "eager": fwd_bwd(rot_ref, q, k),
        "compile": fwd_bwd(torch.compile(rot_ref), q, k),
        "triton": fwd_bwd(lambda a, b: ops.apply_rotary_qk(a, b, cos, sin), q, k),
    }

    xn, w, b, r = (_leaf(*shape, device=device) for shape in ((n, HIDDEN), (HIDDEN,), (HIDDEN,), (n, HIDDEN)))

    def layer_norm_ref(a, ww, bb):
        return kernels.layer_norm_reference(a, ww, bb, 1e-5)

    cases["layernorm"] = {
        "eager": fwd_bwd(layer_norm_ref, xn, w, b),
        "compile": fwd_bwd(torch.compile(layer_norm_ref), xn, w, b),
        "triton": fwd_bwd(lambda a, ww, bb: ops.layer_norm(a, ww, bb, 1e-5), xn, w, b),
    }
    cases["add+layernorm"] = {
        "eager": fwd_bwd(
            lambda a, rr, ww, bb: kernels.add_layer_norm_reference(a, rr, ww, bb, 1e-5), xn, r, w, b
        ),
        "triton": fwd_bwd(lambda a, rr, ww, bb: ops.add_layer_norm(a, rr, ww, bb, 1e-5), xn, r, w, b),
    }
    qh, wh = _leaf(n, HEADS, HEAD_DIM, device=device), _leaf(HEADS, HEAD_DIM, device=device)
    cases["per-head LN"] = {
        "eager": fwd_bwd(lambda a, ww: kernels.per_head_layer_norm_reference(a, ww, None, 1e-5), qh, wh),
        "triton": fwd_bwd(lambda a, ww: ops.per_head_layer_norm(a, ww, None, 1e-5), qh, wh),
    }
    return cases


def loss_cases(n: int, liger, device: str = "cuda") -> dict[str, dict[str, Callable[[], None]]]:
    """Cross-entropy over the vocabulary (at most 8192 rows), alone and fused with the LM head."""
    rows = min(n, 8192)
    logits, target = _leaf(rows, VOCAB, device=device), torch.randint(0, VOCAB, (rows,), device=device)
    hidden, weight = _leaf(rows, HIDDEN, device=device), _leaf(VOCAB, HIDDEN, device=device)
    cases: dict[str, dict[str, Callable[[], None]]] = {}
    cases["cross-entropy"] = {
        "eager fp32": fwd_bwd(
            lambda t: torch.nn.functional.cross_entropy(t.float(), target, reduction="none"), logits
        ),
        "chunked torch": fwd_bwd(
            reference_kernels(lambda t: kernels.vocab_parallel_cross_entropy(t, target)), logits
        ),
        "triton": fwd_bwd(lambda t: kernels.vocab_parallel_cross_entropy(t, target), logits),
    }
    if liger is not None:
        cases["cross-entropy"]["liger"] = fwd_bwd(
            lambda t: liger.liger_cross_entropy(t, target, reduction="none"), logits
        )
    cases["linear+CE"] = {
        "matmul+eager fp32": fwd_bwd(
            lambda a, ww: torch.nn.functional.cross_entropy((a @ ww.t()).float(), target, reduction="none"),
            hidden,
            weight,
        ),
        "fused chunked": fwd_bwd(
            lambda a, ww: kernels.fused_linear_cross_entropy(a, ww, target), hidden, weight
        ),
    }
    if liger is not None:
        cases["linear+CE"]["liger"] = fwd_bwd(
            lambda a, ww: liger.liger_fused_linear_cross_entropy(a, ww, target, reduction="none"),
            hidden,
            weight,
        )
    return cases


def print_timings(cases: dict[str, dict[str, Callable[[], None]]], tokens: int) -> None:
    """One line per kernel: each alternative's median ms and peak memory, or why it failed."""
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  tokens {tokens}  (fwd+bwd, median ms)")
    for name, impls in cases.items():
        row = []
        for impl, fn in impls.items():
            torch.cuda.reset_peak_memory_stats()
            try:
                ms = bench(fn)
                row.append(f"{impl} {ms:.3f} ms ({torch.cuda.max_memory_allocated() / 2**30:.2f} GiB)")
            except Exception as exc:  # one failing alternative must not hide the others
                row.append(f"{impl} failed: {type(exc).__name__}")
        print(f"{name:15} " + " | ".join(row))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4 * 4096)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_bench: needs CUDA (CPU timings say nothing about GPU kernel choices)")
        return
    from megatron_stablelm.kernels import triton_ops

    try:
        import liger_kernel.transformers.functional as liger
    except ImportError:
        liger = None
    cases = elementwise_cases(args.tokens, triton_ops, liger) | loss_cases(args.tokens, liger)
    print_timings(cases, args.tokens)


if __name__ == "__main__":
    main()
