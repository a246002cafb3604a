"""Reference kernels (the CPU path: rotary, SwiGLU, LayerNorm, RMSNorm) against independent float64
formulas, forward and backward; the
chunked vocab-parallel cross-entropy (one rank and two gloo ranks); selective recomputation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_stablelm import kernels
from megatron_stablelm.kernels import _dispatch

F64 = torch.float64


def _grads(fn, inputs, grad_out_seed=0):
    """Outputs and input gradients of ``fn`` for a fixed random cotangent."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(grad_out_seed)
    cots = [torch.randn(o.shape, generator=gen, dtype=F64).to(device=o.device, dtype=o.dtype) for o in outs]
    torch.autograd.backward(outs, cots)
    return [o.detach().to(F64) for o in outs], [
        x.grad.to(F64) if x.grad is not None else None for x in leaves
    ]


def assert_close_all(a, b, atol, rtol=0.0):
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
            continue
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


# ------------------------------------------------------------------------------------ float64 truths


def rotary_truth(x, positions, rotary_dim, base):
    """Rotary as complex multiplication of pairs (i, i + rotary_dim/2): an independent formulation."""
    half = rotary_dim // 2
    inv = base ** (-torch.arange(half, dtype=F64, device=x.device) * 2 / rotary_dim)
    angle = positions.to(device=x.device, dtype=F64)[..., None] * inv  # [..., half]
    rot = torch.polar(torch.ones_like(angle), angle)[..., None, :]  # broadcast over heads
    z = torch.complex(x[..., :half].to(F64), x[..., half:rotary_dim].to(F64)) * rot
    return torch.cat((z.real, z.imag, x[..., rotary_dim:].to(F64)), dim=-1)


def layer_norm_truth(x, w, b, eps):
    x = x.to(F64)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    out = (x - mean) / torch.sqrt(var + eps) * w.to(F64)
    return out + b.to(F64) if b is not None else out


def rms_norm_truth(x, w, eps):
    """RMSNorm with eps inside the root (Llama's, transformers', GPT-NeoX's fused kernel): the vector
    divided by its root mean square, from the sum of squares."""
    x = x.to(F64)
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps) * w.to(F64)


def swiglu_truth(x):
    x = x.to(F64)
    gate, up = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return gate / (1 + torch.exp(-gate)) * up


# ------------------------------------------------------------------------------------ references


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_rotary_reference_matches_truth(dtype, atol):
    torch.manual_seed(0)
    s, b, h, d, rd = 7, 2, 3, 16, 4
    positions = torch.randint(0, 50, (s, b))
    cos, sin = kernels.rotary_cos_sin(positions, rd, 10000.0, dtype)
    x = torch.randn(s, b, h, d).to(dtype)
    out = kernels.apply_rotary(x, cos, sin)
    torch.testing.assert_close(out.to(F64), rotary_truth(x, positions, rd, 10000.0), atol=atol, rtol=0)
    # backward: the rotation is orthogonal on the rotary dims, so dx = R^T g. The tables are computed
    # in fp32 by design (as transformers does), hence 1e-6 rather than float64 precision.
    cos64, sin64 = kernels.rotary_cos_sin(positions, rd, 10000.0, F64)
    truth_out, truth_grad = _grads(lambda t: rotary_truth(t, positions, rd, 10000.0), [x.to(F64)])
    got_out, got_grad = _grads(lambda t: kernels.apply_rotary(t, cos64, sin64), [x.to(F64)])
    assert_close_all(got_out + got_grad, truth_out + truth_grad, atol=1e-6)


def test_rotary_qk_gqa_equals_separate():
    torch.manual_seed(1)
    positions = torch.arange(10).view(5, 2)
    cos, sin = kernels.rotary_cos_sin(positions, 8, 10000.0, torch.float32)
    q, k = torch.randn(5, 2, 4, 32), torch.randn(5, 2, 2, 32)
    rq, rk = kernels.apply_rotary_qk(q, k, cos, sin)
    torch.testing.assert_close(rq, kernels.apply_rotary(q, cos, sin))
    torch.testing.assert_close(rk, kernels.apply_rotary(k, cos, sin))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_swiglu_reference(dtype, atol):
    torch.manual_seed(2)
    x = (torch.randn(3, 5, 2 * 24) * 2).to(dtype)
    got_out, got_grad = _grads(kernels.swiglu, [x])
    truth_out, truth_grad = _grads(swiglu_truth, [x.to(F64)])
    assert_close_all(got_out + got_grad, truth_out + truth_grad, atol=atol, rtol=atol)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("residual", [True, False])
def test_layer_norm_reference(bias, residual):
    torch.manual_seed(3)
    n = 40
    x, r = torch.randn(6, 3, n) * 3 + 1, torch.randn(6, 3, n)
    w, b = torch.randn(n), (torch.randn(n) if bias else None)
    inputs = [x, w] + ([b] if bias else []) + ([r] if residual else [])

    def split(args):
        x, w, *rest = args
        b = rest.pop(0) if bias else None
        return x, w, b, (rest.pop(0) if residual else None)

    def fused(*args):
        x, w, b, r = split(args)
        return kernels.add_layer_norm(x, r, w, b, 1e-5) if residual else kernels.layer_norm(x, w, b, 1e-5)

    def truth(*args):
        x, w, b, r = split(args)
        if residual:
            return layer_norm_truth(x + r, w, b, 1e-5), x + r
        return layer_norm_truth(x, w, b, 1e-5)

    got_out, got_grad = _grads(fused, inputs)
    truth_out, truth_grad = _grads(truth, [t.to(F64) for t in inputs])
    assert_close_all(got_out + got_grad, truth_out + truth_grad, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_per_head_layer_norm_reference(bias):
    torch.manual_seed(4)
    heads, d = 4, 16
    x = torch.randn(5, 2, heads, d) * 2
    w, b = torch.randn(heads, d), torch.randn(heads, d)
    inputs = [x, w, b] if bias else [x, w]

    def fused(x, w, b=None):
        return kernels.per_head_layer_norm(x, w, b, 1e-5)

    def truth(x, w, b=None):
        return layer_norm_truth(x, w, b, 1e-5)

    got_out, got_grad = _grads(fused, inputs)
    truth_out, truth_grad = _grads(truth, [t.to(F64) for t in inputs])
    assert_close_all(got_out + got_grad, truth_out + truth_grad, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (F64, 1e-12)])
def test_rms_norm_reference(residual, dtype, tol):
    """Inputs of mean square ~0.01 and eps 1e-2: eps weighs as much as the signal, so eps added to the
    mean square (this formula) and to the root (GPT-NeoX's unfused module) differ by far more than the
    tolerance; the test pins the formula, not only the shape of the computation."""
    torch.manual_seed(5)
    n, eps = 40, 1e-2
    x, r, w = torch.randn(6, 3, n) * 0.1, torch.randn(6, 3, n) * 0.05, torch.randn(n)
    inputs = [t.to(dtype) for t in ([x, w, r] if residual else [x, w])]

    def fused(x, w, r=None):
        return kernels.add_rms_norm(x, r, w, eps) if residual else kernels.rms_norm(x, w, eps)

    def truth(x, w, r=None):
        return (rms_norm_truth(x + r, w, eps), x + r) if residual else rms_norm_truth(x, w, eps)

    got_out, got_grad = _grads(fused, inputs)
    truth_out, truth_grad = _grads(truth, [t.to(F64) for t in inputs])
    assert_close_all(got_out + got_grad, truth_out + truth_grad, atol=tol, rtol=tol)
    x64 = x.to(F64)
    neox_unfused = x64 / (x64.pow(2).mean(-1, keepdim=True).sqrt() + eps) * w.to(F64)
    assert (neox_unfused - rms_norm_truth(x64, w, eps)).abs().max() > 100 * tol


def test_per_head_rms_norm_reference():
    torch.manual_seed(6)
    heads, d = 4, 16
    inputs = [torch.randn(5, 2, heads, d) * 2, torch.randn(heads, d)]
    got_out, got_grad = _grads(lambda x, w: kernels.per_head_rms_norm(x, w, 1e-6), inputs)
    truth_out, truth_grad = _grads(lambda x, w: rms_norm_truth(x, w, 1e-6), [t.to(F64) for t in inputs])
    assert_close_all(got_out + got_grad, truth_out + truth_grad, atol=2e-5, rtol=2e-5)


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    x = torch.randn(4)
    assert not _dispatch.use_triton(x)
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    assert not _dispatch.use_triton(x)
    monkeypatch.setenv(_dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError):
        _dispatch.use_triton(x)
    # ``=triton`` takes CPU tensors only under Triton's interpreter (how the tests run the kernels)
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not _dispatch.use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    assert _dispatch.use_triton(x)
    monkeypatch.setattr(_dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        _dispatch.use_triton(x)


def test_one_kernel_forced_to_the_reference(monkeypatch):
    """``reference:layernorm`` (the whole-step A/B of one kernel) forces only the named kernels; a
    name that is no kernel is one clear error."""
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference:layernorm, swiglu")
    assert [_dispatch._mode(k) for k in _dispatch.KERNELS] == [
        "reference",
        "reference",
        "auto",
        "auto",
        "auto",
    ]
    assert _dispatch._mode(None) == "auto"
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference:layernrom")
    with pytest.raises(ValueError, match="unknown kernel layernrom; name some of layernorm, swiglu"):
        _dispatch.use_triton(torch.randn(2), "layernorm")
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference:")
    with pytest.raises(ValueError, match=r"\(none named\)"):
        _dispatch.use_triton(torch.randn(2), "swiglu")


# ------------------------------------------------------------------------------------ cross-entropy


def ce_truth(logits, target):
    return F.cross_entropy(logits.to(F64), target, reduction="none")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (F64, 1e-12)])
@pytest.mark.parametrize("inplace", [False, True])
def test_vocab_parallel_cross_entropy_one_rank(dtype, atol, inplace):
    torch.manual_seed(5)
    rows, vocab = 37, 211
    logits = (torch.randn(rows, vocab) * 4).to(dtype)
    target = torch.randint(0, vocab, (rows,))
    # chunk_elements forces 7-row chunks, so the chunk loop and its ragged tail are exercised
    got_out, got_grad = _grads(
        lambda t: kernels.vocab_parallel_cross_entropy(
            t, target, chunk_elements=7 * vocab, inplace_backward=inplace
        ),
        [logits],
    )
    truth_out, truth_grad = _grads(lambda t: ce_truth(t, target), [logits.to(F64)])
    assert got_out[0].dtype == F64  # (converted) — the real output dtype is checked below
    assert kernels.vocab_parallel_cross_entropy(logits, target).dtype == torch.promote_types(
        dtype, torch.float32
    )
    assert_close_all(got_out + got_grad, truth_out + truth_grad, atol=atol, rtol=atol)


def test_vocab_parallel_cross_entropy_batched_shape():
    logits, target = torch.randn(2, 5, 33), torch.randint(0, 33, (2, 5))
    loss = kernels.vocab_parallel_cross_entropy(logits, target)
    assert loss.shape == (2, 5)
    torch.testing.assert_close(loss, kernels.cross_entropy_reference(logits, target))


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (F64, 1e-10)])
def test_fused_linear_cross_entropy_one_rank(dtype, atol):
    torch.manual_seed(6)
    rows, hidden, vocab = 29, 24, 97
    x = torch.randn(rows, hidden).to(dtype)
    w = (torch.randn(vocab, hidden) * 0.3).to(dtype)
    target = torch.randint(0, vocab, (rows,))
    got = _grads(
        lambda a, b: kernels.fused_linear_cross_entropy(a, b, target, chunk_elements=5 * vocab), [x, w]
    )
    truth = _grads(lambda a, b: ce_truth(a @ b.t(), target), [x.to(F64), w.to(F64)])
    assert_close_all(got[0] + got[1], truth[0] + truth[1], atol=atol, rtol=atol)


def _tp_cross_entropy_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    # plain gloo, no megatron-core: importing it costs ~8 s per process on a 2-core CI box
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _tp_cross_entropy_checks(rank, world, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _tp_cross_entropy_checks(rank: int, world: int, group) -> None:
    torch.manual_seed(7)  # same full tensors on every rank
    rows, hidden, vocab = 23, 16, 64
    logits = torch.randn(rows, vocab, dtype=F64) * 3
    x, w = torch.randn(rows, hidden, dtype=F64), torch.randn(vocab, hidden, dtype=F64) * 0.3
    target = torch.randint(0, vocab, (rows,))
    part = slice(rank * vocab // world, (rank + 1) * vocab // world)

    truth_out, truth_grad = _grads(lambda t: ce_truth(t, target), [logits])
    got_out, got_grad = _grads(
        lambda t: kernels.vocab_parallel_cross_entropy(t, target, group, chunk_elements=5 * vocab),
        [logits[:, part]],
    )
    assert_close_all(got_out, truth_out, atol=1e-12)
    assert_close_all(got_grad, [truth_grad[0][:, part]], atol=1e-12)

    truth_out, truth_grad = _grads(lambda a, b: ce_truth(a @ b.t(), target), [x, w])
    got_out, got_grad = _grads(
        lambda a, b: kernels.fused_linear_cross_entropy(a, b, target, group, chunk_elements=4 * vocab),
        [x, w[part]],
    )
    assert_close_all(got_out, truth_out, atol=1e-12)
    assert_close_all(got_grad, [truth_grad[0], truth_grad[1][part]], atol=1e-12)


def test_cross_entropy_vocab_parallel_two_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_tp_cross_entropy_worker, args=(2, port), nprocs=2, join=True)


# ------------------------------------------------------------------------------------ recompute


def _saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_recompute_attention_core_same_grads_less_memory():
    torch.manual_seed(8)
    s, b, h, kv, d = 32, 2, 4, 2, 16
    kernels.select_attention_backend("math")  # the s×s scores make the saving visible
    try:
        norm_q = torch.nn.LayerNorm(d)
        cos, sin = kernels.rotary_cos_sin(torch.arange(s)[:, None].expand(s, b), 4, 10000.0)
        base = [torch.randn(s, b, n, d) for n in (h, kv, kv)]
        results = []
        for enabled in (False, True):
            leaves = [t.clone().requires_grad_() for t in base]
            norm_q.zero_grad()

            def run(leaves=leaves, enabled=enabled):
                return kernels.recompute_attention_core(*leaves, cos, sin, norm_q, norm_q, enabled=enabled)

            out, saved = _saved_bytes(run)
            out.pow(2).sum().backward()
            results.append((out.detach(), [t.grad for t in leaves], norm_q.weight.grad.clone(), saved))
        (o1, g1, w1, saved_full), (o2, g2, w2, saved_sel) = results
        torch.testing.assert_close(o1, o2)
        assert_close_all(g1 + [w1], g2 + [w2], atol=1e-6, rtol=1e-5)
        assert saved_sel < saved_full / 3
    finally:
        kernels.select_attention_backend("flash")


def test_recompute_disabled_without_grad():
    calls = []
    out = kernels.checkpointed(lambda t: calls.append(1) or t * 2, torch.ones(2))
    assert calls == [1] and out.tolist() == [2.0, 2.0]
    assert math.isclose(float(out.sum()), 4.0)
