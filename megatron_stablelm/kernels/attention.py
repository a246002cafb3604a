"""Causal self-attention backends, with optional document masking (packed sequences) and GQA.

Inputs are ``[b, s, heads, d]`` (keys/values may have fewer heads: grouped-query attention; query head
``i`` uses key/value head ``i // (heads / kv_heads)``). Document boundaries come as ``cu_seqlens``
over the flattened ``b*s`` tokens (flash-attn's varlen convention), never as a dense mask from the
data pipeline. A batch row's first token always starts a document, so a document never spans rows
(every backend below gives the same answer for the same ``cu_seqlens``).

Backends (``attention_config`` names map onto them, see :func:`resolve_attention_backend`):

=================  ==========================================  =========================================
backend            causal                                      document-masked (``cu_seqlens``)
=================  ==========================================  =========================================
``flash_attn``     ``flash_attn_func`` (CUDA, fp16/bf16)       ``flash_attn_varlen_func``
``sdpa``           SDPA ``is_causal`` (flash/cuDNN/efficient   CUDA: torch ``varlen_attn``, else
                   kernels on CUDA, ``enable_gqa``)            FlexAttention with a document-causal
                                                               block mask, else SDPA + boolean mask;
                                                               CPU: SDPA + boolean mask
``math``           explicit softmax(QKᵀ)V, GQA by grouping     same with the document-causal mask
                   query heads (no repeated K/V)
=================  ==========================================  =========================================

Why several: flash-attn 2 is the fastest on Ampere/Hopper but an optional, CUDA-only extra; PyTorch's
SDPA covers plain causal attention on any device; for packed documents a dense ``[s, s]`` mask forces
SDPA off its flash kernel, so on GPU the varlen / FlexAttention kernels skip the masked blocks
instead. ``math`` is the readable ground truth (and works in float64).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_stablelm.config import ATTENTION_TYPES, expand_attention_config

log = logging.getLogger(__name__)

AttentionFn = Callable[..., torch.Tensor]

# ------------------------------------------------------------------------------ document helpers


def row_aligned_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``cu_seqlens`` with every batch-row start added as a boundary (int32, sorted, unique), so a
    varlen kernel over the flattened tokens never lets a document attend across rows."""
    rows = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=cu_seqlens.device)
    merged = torch.cat((cu_seqlens.to(torch.int32), rows))
    merged = merged[(merged >= 0) & (merged <= batch * seq)]
    return torch.unique(merged, sorted=True).to(torch.int32)


def document_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``[b, s]`` index of the document each token belongs to."""
    total = batch * seq
    marks = torch.zeros(total, dtype=torch.int32, device=cu_seqlens.device)
    starts = cu_seqlens[1:-1].long()
    starts = starts[(starts > 0) & (starts < total)]
    marks.index_fill_(0, starts, 1)
    return marks.cumsum(0).view(batch, seq)


def document_causal_mask(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Boolean ``[b, 1, s, s]`` mask, True where attention is *allowed* (PyTorch SDPA convention)."""
    docs = document_ids(cu_seqlens, batch, seq)
    same_doc = docs[:, :, None] == docs[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=docs.device).tril()
    return (same_doc & causal)[:, None]


class _PerBatchCache:
    """Remembers one value derived from the current batch's ``cu_seqlens``: every layer of a forward
    (and the recomputation in backward) gets the same tensor object, so the mask is built once per
    step. Keyed by object identity through a weak reference, never by data pointer (a new batch may
    reuse a freed tensor's memory)."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._key: tuple = ()
        self._value = None

    def get(self, cu_seqlens: torch.Tensor, key: tuple, build: Callable[[], object]):
        if self._ref is not None and self._ref() is cu_seqlens and self._key == key:
            return self._value
        value = build()
        self._ref, self._key, self._value = weakref.ref(cu_seqlens), key, value
        return value


_mask_cache = _PerBatchCache()
_varlen_cache = _PerBatchCache()
_block_mask_cache = _PerBatchCache()


def _cached_mask(cu_seqlens: torch.Tensor, b: int, s: int) -> torch.Tensor:
    return _mask_cache.get(cu_seqlens, ("mask", b, s), lambda: document_causal_mask(cu_seqlens, b, s))


def _cached_varlen(cu_seqlens: torch.Tensor, b: int, s: int) -> tuple[torch.Tensor, int]:
    def build() -> tuple[torch.Tensor, int]:
        cu = row_aligned_cu_seqlens(cu_seqlens, b, s)
        return cu, int((cu[1:] - cu[:-1]).max().item())

    return _varlen_cache.get(cu_seqlens, ("varlen", b, s), build)


# ------------------------------------------------------------------------------------- backends


def attention_math(q, k, v, *, cu_seqlens=None, max_seqlen=None, dropout_p=0.0) -> torch.Tensor:
    """Explicit attention. GQA groups the query heads as ``[b, s, kv_heads, group, d]`` so K/V are
    broadcast, not repeated. Softmax in at least fp32."""
    b, s, h, d = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, s, kv, h // kv, d)
    scores = torch.einsum("bqngd,bknd->bngqk", qg, k) * (1.0 / math.sqrt(d))
    if cu_seqlens is None:
        allowed = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    else:
        allowed = _cached_mask(cu_seqlens, b, s)[:, :, None]  # [b, 1, 1, s, s]
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = scores.to(acc).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, dropout_p)
    out = torch.einsum("bngqk,bknd->bqngd", probs, v)
    return out.reshape(b, s, h, d)


def _sdpa(q, k, v, mask, dropout_p):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = qt.shape[1] != kt.shape[1]
    if mask is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    return out.transpose(1, 2)


def attention_sdpa_masked(q, k, v, *, cu_seqlens=None, max_seqlen=None, dropout_p=0.0) -> torch.Tensor:
    """SDPA; documents through a dense boolean ``[b, 1, s, s]`` mask (the CPU path: forward and
    backward work there, with GQA)."""
    b, s = q.shape[:2]
    mask = None if cu_seqlens is None else _cached_mask(cu_seqlens, b, s)
    return _sdpa(q, k, v, mask, dropout_p)


@functools.cache
def _torch_varlen() -> Callable | None:
    """PyTorch's varlen flash attention as ``fn(q, k, v, cu, max_len)``, causal, GQA allowed; None
    where this torch has none. Its keywords changed between releases: 2.10 takes ``is_causal``, 2.11
    ``window_size`` (causal = ``(-1, 0)``), 2.13 also ``enable_gqa``; without that keyword the K/V
    heads are repeated for GQA."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    native_gqa = "enable_gqa" in params

    def run(q, k, v, cu, longest):
        gqa = k.shape[1] != q.shape[1]
        if gqa and not native_gqa:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        extra = {"enable_gqa": True} if gqa and native_gqa else {}
        return varlen_attn(q, k, v, cu, cu, longest, longest, **causal, **extra)

    return run


def attention_torch_varlen(q, k, v, *, cu_seqlens=None, max_seqlen=None, dropout_p=0.0) -> torch.Tensor:
    """PyTorch's own varlen flash attention (CUDA, fp16/bf16, no dropout): packed documents without a
    dense mask. Falls back to :func:`attention_sdpa_masked` outside that envelope."""
    fn = _torch_varlen()
    if cu_seqlens is None or fn is None or dropout_p or not q.is_cuda or q.dtype not in _HALF:
        return attention_sdpa_masked(q, k, v, cu_seqlens=cu_seqlens, dropout_p=dropout_p)
    b, s, h, d = q.shape
    cu, longest = _cached_varlen(cu_seqlens, b, s)
    flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]
    return fn(*flat, cu, longest).view(b, s, h, d)


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    # FlexAttention is only fast compiled (eager it materialises the scores); compile it once.
    return torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention


def _document_block_mask(cu_seqlens: torch.Tensor, b: int, s: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    docs = document_ids(cu_seqlens, b, s).to(device)

    def document_causal(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[batch, q_idx] == docs[batch, kv_idx])

    return create_block_mask(document_causal, B=b, H=None, Q_LEN=s, KV_LEN=s, device=device)


def attention_flex(q, k, v, *, cu_seqlens=None, max_seqlen=None, dropout_p=0.0) -> torch.Tensor:
    """FlexAttention with a document-causal block mask: fully masked blocks are skipped, so packed
    documents cost what their own lengths cost. A GPU path (on CPU it has no backward); no dropout,
    so with ``dropout_p`` it falls back to SDPA with a dense mask."""
    if dropout_p:
        return attention_sdpa_masked(q, k, v, cu_seqlens=cu_seqlens, dropout_p=dropout_p)
    b, s, h, d = q.shape
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, b * s], dtype=torch.int32, device=q.device)
    block_mask = _block_mask_cache.get(
        cu_seqlens, ("flex", b, s, q.device), lambda: _document_block_mask(cu_seqlens, b, s, q.device)
    )
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = _compiled_flex()(qt, kt, vt, block_mask=block_mask, enable_gqa=kt.shape[1] != qt.shape[1])
    return out.transpose(1, 2)


def attention_sdpa(q, k, v, *, cu_seqlens=None, max_seqlen=None, dropout_p=0.0) -> torch.Tensor:
    """SDPA for causal attention; for documents the best kernel this device has (see module doc)."""
    if cu_seqlens is None:
        return _sdpa(q, k, v, None, dropout_p)
    if q.is_cuda and not dropout_p and q.dtype in _HALF:
        if _torch_varlen() is not None:
            return attention_torch_varlen(q, k, v, cu_seqlens=cu_seqlens)
        if _has_flex():
            return attention_flex(q, k, v, cu_seqlens=cu_seqlens)
    return attention_sdpa_masked(q, k, v, cu_seqlens=cu_seqlens, dropout_p=dropout_p)


_HALF = (torch.float16, torch.bfloat16)


@functools.cache
def _has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


@functools.cache
def flash_attn_available() -> bool:
    """flash-attn 2 is importable (only ever true on a CUDA machine with the optional extra)."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:  # a broken build raises more than ImportError
        return False
    return True


def attention_flash_attn(q, k, v, *, cu_seqlens=None, max_seqlen=None, dropout_p=0.0) -> torch.Tensor:
    """flash-attn 2: native GQA, dropout, and the varlen kernel for documents. Falls back to SDPA for
    tensors it cannot take (fp32, CPU)."""
    if not q.is_cuda or q.dtype not in _HALF:
        return attention_sdpa(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p)
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if cu_seqlens is None:
        return flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)
    b, s, h, d = q.shape
    cu, longest = _cached_varlen(cu_seqlens, b, s)
    flat = [t.reshape(b * s, t.shape[2], d) for t in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu, cu, longest, longest, dropout_p=dropout_p, causal=True)
    return out.view(b, s, h, d)


# ------------------------------------------------------------------------------------ selection


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    fn: AttentionFn
    describe: str


def _backend(name: str, device_type: str) -> AttentionBackend:
    cuda = device_type == "cuda"
    if name == "flash_attn":
        return AttentionBackend(
            name, attention_flash_attn, "flash-attn 2 (flash_attn_func / flash_attn_varlen_func)"
        )
    if name == "sdpa":
        if cuda:
            docs = "torch varlen_attn" if _torch_varlen() is not None else "FlexAttention block mask"
            return AttentionBackend(name, attention_sdpa, f"PyTorch SDPA (causal); documents: {docs}")
        return AttentionBackend(name, attention_sdpa, "PyTorch SDPA (causal); documents: SDPA + boolean mask")
    if name == "math":
        return AttentionBackend(name, attention_math, "explicit softmax(QK^T)V (reference)")
    if name == "flex":
        return AttentionBackend(name, attention_flex, "FlexAttention (document-causal block mask)")
    raise ValueError(f"unknown attention backend {name!r}")


def resolve_attention_backend(name: str | None, device: torch.device | str | None = None) -> AttentionBackend:
    """The backend that attention type ``name`` means on ``device``: ``flash`` (or None) → flash-attn
    2 if importable on CUDA, else SDPA; ``sdpa``/``global`` → SDPA; ``math`` → explicit; ``flash_attn``
    and ``flex`` force those kernels. (``global`` is GPT-NeoX's plain dense attention: the same
    computation as SDPA, which PyTorch runs with its best kernel.)"""
    name = (name or "flash").lower()
    if name not in ATTENTION_TYPES:
        raise ValueError(f"unknown attention type {name!r}; expected one of {', '.join(ATTENTION_TYPES)}")
    device_type = (
        torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if name == "flash":
        name = "flash_attn" if device_type == "cuda" and flash_attn_available() else "sdpa"
    elif name == "global":
        name = "sdpa"
    elif name == "flash_attn" and not (device_type == "cuda" and flash_attn_available()):
        raise RuntimeError("attention type 'flash_attn' needs the flash-attn package on a CUDA device")
    return _backend(name, device_type)


class AttentionSelection:
    """An attention type (an ``attention_config`` name) resolved lazily, once per device type (a model
    may be built on CPU and moved to GPU), each resolution logged once. Callable like
    :func:`attention`. Each parallelized model holds its own (see
    :func:`megatron_stablelm.parallelize.parallelize`); :data:`default_attention` is the process-wide
    one that :func:`attention` uses."""

    def __init__(self, name: str | None = "flash") -> None:
        self.select(name)

    def select(self, name: str | None) -> None:
        """Choose attention type ``name`` (validated now, not at the first forward)."""
        resolve_attention_backend(name, "cpu")
        self.requested = (name or "flash").lower()
        self.resolved: dict[str, AttentionBackend] = {}

    def for_device(self, device: torch.device | str) -> AttentionBackend:
        """The backend this selection runs on ``device``."""
        device = torch.device(device)
        backend = self.resolved.get(device.type)
        if backend is None:
            backend = resolve_attention_backend(self.requested, device)
            self.resolved[device.type] = backend
            log.info("attention backend for %s on %s: %s", self.requested, device.type, backend.describe)
        return backend

    def __call__(self, q, k, v, *, cu_seqlens=None, max_seqlen=None, dropout_p=0.0) -> torch.Tensor:
        fn = self.for_device(q.device).fn
        return fn(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p)


default_attention = AttentionSelection("flash")


def attention_type_from_config(attention_config: list | None, num_layers: int) -> str:
    """The single attention type of a GPT-NeoX ``attention_config`` (``[[["flash"], 24]]``). All types
    this framework knows compute the same function, so mixed lists use the first one's kernel."""
    if not attention_config:
        return "flash"
    kinds = expand_attention_config(attention_config, num_layers)
    if len(set(kinds)) > 1:
        log.warning("attention_config mixes %s; using %r for every layer", sorted(set(kinds)), kinds[0])
    return kinds[0]


def select_attention_backend(name: str | None = "flash") -> AttentionFn:
    """Make ``name`` (an ``attention_config`` type) the process-wide default that :func:`attention`
    dispatches to, and return that dispatching callable (same signature as :func:`attention`). Models
    do not read it: they hold the selection :func:`~megatron_stablelm.parallelize.parallelize` gave
    them; it serves tools and tests that call :func:`attention` directly."""
    default_attention.select(name)
    return attention


def selected_attention_backend(device: torch.device | str = "cpu") -> AttentionBackend:
    """What :func:`attention` runs on ``device`` with the current process-wide default."""
    return default_attention.for_device(device)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention, ``[b, s, h, d]`` in and out, through the process-wide default backend (best
    available unless :func:`select_attention_backend` chose another)."""
    return default_attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p)
