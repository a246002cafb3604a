"""Causal self-attention with optional document masking (packed sequences).

Inputs are ``[b, s, heads, d]`` (keys/values may have fewer heads: grouped-query attention). Document
boundaries come as ``cu_seqlens`` over the flattened ``b*s`` tokens (flash-attn's varlen convention),
never as a dense mask from the data pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_ids(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``[b, s]`` index of the document each token belongs to."""
    total = batch * seq
    marks = torch.zeros(total, dtype=torch.int32, device=cu_seqlens.device)
    starts = cu_seqlens[1:-1].long()
    starts = starts[starts < total]
    marks.index_fill_(0, starts, 1)
    return marks.cumsum(0).view(batch, seq)


def document_causal_mask(cu_seqlens: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """Boolean ``[b, 1, s, s]`` mask, True where attention is *allowed* (PyTorch SDPA convention)."""
    docs = document_ids(cu_seqlens, batch, seq)
    same_doc = docs[:, :, None] == docs[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=docs.device).tril()
    return (same_doc & causal)[:, None]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Causal attention, ``[b, s, h, d]`` in and out, through PyTorch SDPA."""
    b, s = q.shape[:2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    gqa = qt.shape[1] != kt.shape[1]
    if cu_seqlens is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa)
    else:
        mask = document_causal_mask(cu_seqlens, b, s)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout_p, enable_gqa=gqa)
    return out.transpose(1, 2)
