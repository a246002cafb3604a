"""LayerNorm with or without bias (optionally fused with the residual add), and the per-head
LayerNorm used for Stable LM 2 12B's QK-norm.

The public functions dispatch to the Triton kernel on CUDA (one read of the input, mean/rstd saved
instead of the normalised activations) and to the ``*_reference`` functions elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_stablelm.kernels import _dispatch


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def per_head_layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    out = F.layer_norm(x, (x.shape[-1],), None, None, eps) * weight
    return out + bias if bias is not None else out


def add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual
    return layer_norm_reference(total, weight, bias, eps), total


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim; ``bias`` may be None (Stable LM 2 12B has none)."""
    if _dispatch.use_triton(x, "layernorm"):
        return _dispatch.triton_ops().layer_norm(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(x + residual), x + residual)``: the sequential-residual block's add and the next
    norm in one pass over memory on CUDA."""
    if _dispatch.use_triton(x, "layernorm"):
        return _dispatch.triton_ops().add_layer_norm(x, residual, weight, bias, eps)
    return add_layer_norm_reference(x, residual, weight, bias, eps)


def per_head_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """Normalise each head's vector of ``x`` (``[..., heads, head_dim]``) with that head's own affine
    parameters (``weight``/``bias`` of shape ``[heads, head_dim]``)."""
    if _dispatch.use_triton(x, "layernorm"):
        return _dispatch.triton_ops().per_head_layer_norm(x, weight, bias, eps)
    return per_head_layer_norm_reference(x, weight, bias, eps)
