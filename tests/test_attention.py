"""Attention backends against a float64 reference; document masking equals attending to each document
on its own; GQA; backend selection. GPU-only backends are marked ``gpu`` and skipped without CUDA."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from megatron_stablelm import kernels

# the module, not the function of the same name that the package re-exports
attn = importlib.import_module("megatron_stablelm.kernels.attention")

F64 = torch.float64
ON_GPU = torch.cuda.is_available()


def naive_attention(q, k, v, cu_seqlens=None):
    """Float64, one (batch, head) at a time, K/V heads repeated: deliberately the most literal form."""
    b, s, h, d = q.shape
    group = h // k.shape[2]
    docs = torch.zeros(b, s, dtype=torch.long)
    if cu_seqlens is not None:
        for boundary in cu_seqlens.tolist()[1:-1]:
            if 0 < boundary < b * s:
                docs.view(-1)[boundary:] += 1
    out = torch.empty(b, s, h, d, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            qq, kk, vv = q[bi, :, hi].to(F64), k[bi, :, hi // group].to(F64), v[bi, :, hi // group].to(F64)
            scores = qq @ kk.t() / math.sqrt(d)
            allowed = torch.ones(s, s, dtype=torch.bool).tril() & (docs[bi][:, None] == docs[bi][None, :])
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[bi, :, hi] = torch.softmax(scores, -1) @ vv
    return out


CPU_BACKENDS = {
    "math": attn.attention_math,
    "sdpa": attn.attention_sdpa,
    "sdpa_masked": attn.attention_sdpa_masked,
}


def _qkv(b, s, h, kv, d, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, n, d, generator=gen).to(dtype).to(device) for n in (h, kv, kv)]


# boundaries over the flattened 2 × 12 tokens: a document crossing the row boundary (8..14) is split
# there, like every backend does
CU = torch.tensor([0, 5, 8, 14, 19, 24], dtype=torch.int32)


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "docs"])
def test_cpu_backends_match_float64_reference(name, heads, documents):
    h, kv = heads
    q, k, v = _qkv(2, 12, h, kv, 8)
    cu = CU if documents else None
    fn = CPU_BACKENDS[name]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu_seqlens=cu)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    out.backward(cot)
    ref_leaves = [t.to(F64).requires_grad_() for t in (q, k, v)]
    ref = naive_attention(*ref_leaves, cu_seqlens=cu)
    ref.backward(cot.to(F64))
    torch.testing.assert_close(out.to(F64), ref.detach(), atol=2e-6, rtol=1e-5)
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.to(F64), want.grad, atol=1e-5, rtol=1e-5)


def test_math_backend_is_exact_in_float64():
    q, k, v = _qkv(2, 12, 4, 2, 8, dtype=F64)
    torch.testing.assert_close(
        attn.attention_math(q, k, v, cu_seqlens=CU), naive_attention(q, k, v, CU), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("name", sorted(CPU_BACKENDS))
def test_document_masking_equals_separate_documents(name):
    """Packed documents give what each document gives run alone as its own (causal) sequence."""
    s = 16
    lengths = [[5, 7, 4], [16], [1, 15]]  # per row: documents filling it exactly
    b = len(lengths)
    q, k, v = _qkv(b, s, 4, 2, 8, seed=3)
    bounds, total = [0], 0
    for row in lengths:
        for n in row:
            total += n
            bounds.append(total)
    cu = torch.tensor(bounds, dtype=torch.int32)
    packed = CPU_BACKENDS[name](q, k, v, cu_seqlens=cu)
    for bi, row in enumerate(lengths):
        start = 0
        for n in row:
            sl = slice(start, start + n)
            alone = CPU_BACKENDS[name](q[bi : bi + 1, sl], k[bi : bi + 1, sl], v[bi : bi + 1, sl])
            torch.testing.assert_close(packed[bi : bi + 1, sl], alone, atol=1e-6, rtol=1e-5)
            start += n


def test_gqa_equals_repeated_kv():
    q, k, v = _qkv(2, 10, 6, 2, 8, seed=4)
    rep = [t.repeat_interleave(3, dim=2) for t in (k, v)]
    for fn in CPU_BACKENDS.values():
        torch.testing.assert_close(
            fn(q, k, v, cu_seqlens=CU[:4] * 10 // 12), fn(q, *rep, cu_seqlens=CU[:4] * 10 // 12)
        )


def test_row_aligned_cu_seqlens():
    got = attn.row_aligned_cu_seqlens(torch.tensor([0, 5, 8, 14, 24], dtype=torch.int32), 2, 12)
    assert got.tolist() == [0, 5, 8, 12, 14, 24]
    assert got.dtype == torch.int32


def test_mask_is_built_once_per_batch():
    q, k, v = _qkv(2, 12, 2, 2, 4)
    cu = CU.clone()
    attn.attention_sdpa_masked(q, k, v, cu_seqlens=cu)
    first = attn._mask_cache._value
    attn.attention_sdpa_masked(q, k, v, cu_seqlens=cu)
    assert attn._mask_cache._value is first
    attn.attention_sdpa_masked(q, k, v, cu_seqlens=cu.clone())  # a new batch object → rebuilt
    assert attn._mask_cache._value is not first


def test_flex_forward_on_cpu():
    """FlexAttention has no CPU backward; its forward still checks the document block mask."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    q, k, v = _qkv(2, 12, 4, 2, 8, seed=5)
    with torch.no_grad():
        try:
            out = attn.attention_flex(q, k, v, cu_seqlens=CU)
        except Exception as exc:  # pragma: no cover - depends on the torch build
            pytest.skip(f"FlexAttention unavailable on this CPU build: {exc}")
    torch.testing.assert_close(out.to(F64), naive_attention(q, k, v, CU), atol=2e-6, rtol=1e-5)


def test_selection_and_dispatch():
    try:
        assert kernels.resolve_attention_backend("flash", "cpu").name == "sdpa"
        assert kernels.resolve_attention_backend(None, "cpu").name == "sdpa"
        assert kernels.resolve_attention_backend("global", "cpu").name == "sdpa"
        assert kernels.resolve_attention_backend("math", "cpu").name == "math"
        with pytest.raises(ValueError):
            kernels.select_attention_backend("nope")
        with pytest.raises(RuntimeError):
            kernels.resolve_attention_backend("flash_attn", "cpu")
        fn = kernels.select_attention_backend("math")
        assert fn is kernels.attention
        assert kernels.selected_attention_backend("cpu").fn is attn.attention_math
        q, k, v = _qkv(1, 6, 2, 1, 4)
        torch.testing.assert_close(kernels.attention(q, k, v), attn.attention_math(q, k, v))
    finally:
        kernels.select_attention_backend("flash")
    assert kernels.selected_attention_backend("cpu").name == "sdpa"


def test_attention_type_from_config():
    assert kernels.attention_type_from_config(None, 4) == "flash"
    assert kernels.attention_type_from_config([[["math"], 4]], 4) == "math"
    assert kernels.attention_type_from_config([[["global", "flash"], 2]], 2) == "global"


def test_dropout_runs_and_is_off_at_zero():
    q, k, v = _qkv(1, 8, 2, 2, 4)
    for fn in CPU_BACKENDS.values():
        assert fn(q, k, v, cu_seqlens=CU[:3] // 3, dropout_p=0.5).shape == q.shape


# ------------------------------------------------------------------------------------------ GPU


GPU_BACKENDS = ["sdpa", "flex", "torch_varlen", "flash_attn"]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("name", GPU_BACKENDS)
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "docs"])
def test_gpu_backends_match_reference(name, documents):
    fn = {
        "sdpa": attn.attention_sdpa,
        "flex": attn.attention_flex,
        "torch_varlen": attn.attention_torch_varlen,
        "flash_attn": attn.attention_flash_attn,
    }[name]
    if name == "flash_attn" and not attn.flash_attn_available():
        pytest.skip("flash-attn not installed")
    b, s, h, kv, d = 2, 256, 8, 2, 64
    q, k, v = _qkv(b, s, h, kv, d, dtype=torch.bfloat16, device="cuda")
    cu = torch.tensor([0, 100, 256, 300, 512], dtype=torch.int32, device="cuda") if documents else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu_seqlens=cu)
    out.float().pow(2).sum().backward()
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref = attn.attention_math(*ref_leaves, cu_seqlens=cu)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for got, want in zip(leaves, ref_leaves, strict=True):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=5e-2, rtol=5e-2)
