"""Partial rotary position embedding, GPT-NeoX layout (rotate-half on the first ``rotary_dim`` dims).

:func:`apply_rotary` / :func:`apply_rotary_qk` dispatch to one fused Triton kernel on CUDA (queries and
keys rotated in the same launch, pass-through dims copied in the same pass) and to
:func:`apply_rotary_reference` elsewhere. ``cos``/``sin`` never receive gradients: they are functions
of the positions only.
"""

from __future__ import annotations

import torch

from megatron_stablelm.kernels import _dispatch


def rotary_cos_sin(
    position_ids: torch.Tensor, rotary_dim: int, base: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[*position_ids.shape, rotary_dim]`` computed in fp32 (as `transformers` does)
    and cast to ``dtype``."""
    inv_freq = 1.0 / (
        base
        ** (
            torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=position_ids.device).float() / rotary_dim
        )
    )
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: rotate the first ``cos.shape[-1]`` dims of the last axis of ``x``
    (``[..., heads, head_dim]``); ``cos``/``sin`` broadcast over the heads axis."""
    rotary_dim = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary on one tensor ``[..., heads, head_dim]`` with ``cos``/``sin`` ``[..., rotary_dim]``."""
    if _dispatch.use_triton(x, "rotary"):
        return _dispatch.triton_ops().apply_rotary(x, cos, sin)
    return apply_rotary_reference(x, cos, sin)


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary on queries and keys together (GQA: ``k`` may have fewer heads): one kernel on CUDA,
    so the cos/sin tables are read once per token instead of once per tensor."""
    if _dispatch.use_triton(q, "rotary"):
        return _dispatch.triton_ops().apply_rotary_qk(q, k, cos, sin)
    return apply_rotary_reference(q, cos, sin), apply_rotary_reference(k, cos, sin)
