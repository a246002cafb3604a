"""LayerNorm with or without bias, and the per-head LayerNorm used for Stable LM 2 12B's QK-norm."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def per_head_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Normalise each head's vector of ``x`` (``[..., heads, head_dim]``) with that head's own affine
    parameters (``weight``/``bias`` of shape ``[heads, head_dim]``)."""
    out = F.layer_norm(x, (x.shape[-1],), None, None, eps) * weight
    return out + bias if bias is not None else out
