"""Selective activation recomputation: recompute the attention core and element-wise ops in backward,
keep the matmul outputs.

Why: per layer, the matmul outputs (QKV, attention output, MLP up-projection) are expensive to
recompute and are saved anyway; the tensors *between* them — QK-norm outputs, rotated Q/K, and for the
non-flash backends the ``[b, h, s, s]`` scores/probabilities — are cheap to recompute and, at long
sequence lengths, dominate activation memory. Wrapping only that span in a non-reentrant checkpoint
keeps the QKV output (the checkpoint's input) and the attention output (its result) and drops the
rest. Unlike full-layer checkpointing (``checkpoint_activations``), no GEMM is redone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from megatron_stablelm.kernels.attention import AttentionFn, attention
from megatron_stablelm.kernels.rotary import apply_rotary_qk


def checkpointed(fn: Callable[..., Any], *args: Any, enabled: bool = True, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, recomputed in backward instead of saving its intermediates when
    ``enabled`` and autograd is recording. The RNG state is restored for the recomputation so dropout
    masks match."""
    if not enabled or not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs
    )


def attention_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm: nn.Module | None = None,
    k_norm: nn.Module | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    dropout_p: float = 0.0,
    attend: AttentionFn = attention,
) -> torch.Tensor:
    """Everything between the QKV projection and the output projection, sequence-first:
    ``q`` ``[s, b, heads, d]``, ``k``/``v`` ``[s, b, kv_heads, d]`` → ``[s, b, heads, d]``.
    QK-norm (optional), rotary on Q and K in one pass, then ``attend`` (a model passes the backend it
    holds; the default is the process-wide :func:`~megatron_stablelm.kernels.attention.attention`)."""
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = apply_rotary_qk(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    out = attend(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, dropout_p=dropout_p)
    return out.transpose(0, 1)


def recompute_attention_core(*args: Any, enabled: bool = True, **kwargs: Any) -> torch.Tensor:
    """:func:`attention_core` (same arguments) under selective recomputation (see the module doc)."""
    return checkpointed(attention_core, *args, enabled=enabled, **kwargs)
