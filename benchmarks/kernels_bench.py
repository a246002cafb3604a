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
import sys
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=4 * 4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("kernels_bench: needs CUDA (CPU timings say nothing about GPU kernel choices)")
        return
    import importlib

    from megatron_stablelm import kernels

    ops = importlib.import_module("megatron_stablelm.kernels.triton_ops")
    try:
        import liger_kernel.transformers.functional as liger
    except ImportError:
        liger = None
    dev, dt, n = "cuda", torch.bfloat16, args.tokens
    h, heads, d, rd, ffn, vocab = 2048, 32, 64, 16, 5632, 100352

    def leaf(*shape, dtype=dt):
        return torch.randn(*shape, device=dev, dtype=dtype, requires_grad=True)

    cases: dict[str, dict[str, Callable[[], None]]] = {}
    x = leaf(n, 2 * ffn)
    cases["swiglu"] = {
        "eager": fwd_bwd(kernels.swiglu_reference, x),
        "compile": fwd_bwd(torch.compile(kernels.swiglu_reference), x),
        "triton": fwd_bwd(ops.swiglu, x),
    }
    if liger is not None:
        cases["swiglu"]["liger"] = fwd_bwd(lambda t: liger.liger_swiglu(*t.chunk(2, -1)), x)

    q, k = leaf(n, 1, heads, d), leaf(n, 1, heads, d)
    cos, sin = kernels.rotary_cos_sin(torch.arange(n, device=dev).view(n, 1), rd, 10000.0, dt)

    def rot_ref(a, b):
        return kernels.apply_rotary_reference(a, cos, sin), kernels.apply_rotary_reference(b, cos, sin)

    cases["rotary q+k"] = {
        "eager": fwd_bwd(rot_ref, q, k),
        "compile": fwd_bwd(torch.compile(rot_ref), q, k),
        "triton": fwd_bwd(lambda a, b: ops.apply_rotary_qk(a, b, cos, sin), q, k),
    }

    xn, w, b, r = leaf(n, h), leaf(h), leaf(h), leaf(n, h)
    cases["layernorm"] = {
        "eager": fwd_bwd(lambda a, ww, bb: kernels.layer_norm_reference(a, ww, bb, 1e-5), xn, w, b),
        "compile": fwd_bwd(
            torch.compile(lambda a, ww, bb: kernels.layer_norm_reference(a, ww, bb, 1e-5)), xn, w, b
        ),
        "triton": fwd_bwd(lambda a, ww, bb: ops.layer_norm(a, ww, bb, 1e-5), xn, w, b),
    }
    cases["add+layernorm"] = {
        "eager": fwd_bwd(
            lambda a, rr, ww, bb: kernels.add_layer_norm_reference(a, rr, ww, bb, 1e-5), xn, r, w, b
        ),
        "triton": fwd_bwd(lambda a, rr, ww, bb: ops.add_layer_norm(a, rr, ww, bb, 1e-5), xn, r, w, b),
    }
    qh, wh = leaf(n, heads, d), leaf(heads, d)
    cases["per-head LN"] = {
        "eager": fwd_bwd(lambda a, ww: kernels.per_head_layer_norm_reference(a, ww, None, 1e-5), qh, wh),
        "triton": fwd_bwd(lambda a, ww: ops.per_head_layer_norm(a, ww, None, 1e-5), qh, wh),
    }

    ce_rows = min(n, 8192)
    logits, target = leaf(ce_rows, vocab), torch.randint(0, vocab, (ce_rows,), device=dev)
    hidden, weight = leaf(ce_rows, h), leaf(vocab, h)
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

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  tokens {n}  (fwd+bwd, median ms)")
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


if __name__ == "__main__":
    main()
