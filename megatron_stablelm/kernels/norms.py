"""LayerNorm with or without bias (optionally fused with the residual add), and the per-head
LayerNorm used for Stable LM 2 12B's QK-norm; RMSNorm (GPT-NeoX's ``norm: rmsnorm``, Llama's) in the
same three forms.

The public functions dispatch to the Triton kernel on CUDA (one read of the input, mean/rstd saved
instead of the normalised activations) and to the ``*_reference`` functions elsewhere.

RMSNorm is ``x * rsqrt(mean(x^2) + eps) * weight`` with no bias: the formula of Llama, of
``transformers``' ``LlamaRMSNorm``, of GPT-NeoX's fused RMSNorm (``rmsnorm_fusion: true``) and of
Megatron-LM. (GPT-NeoX's unfused ``RMSNorm`` module divides by ``rms + eps`` instead; the two differ by
a relative ``eps / (2 mean(x^2))`` at most.) The reference computes in fp32 at least and rounds once.
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


# ------------------------------------------------------------------------------------------ RMSNorm
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim, in fp32 (or float64 for float64
    inputs), rounded once to ``x``'s dtype. ``weight`` of shape ``[heads, head_dim]`` normalises each
    head of ``x`` (``[..., heads, head_dim]``) with its own weights."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(acc)).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual
    return rms_norm_reference(total, weight, eps), total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (no bias)."""
    if _dispatch.use_triton(x, "rmsnorm"):
        return _dispatch.triton_ops().rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: the sequential-residual block's add and the next
    norm in one pass over memory on CUDA."""
    if _dispatch.use_triton(x, "rmsnorm"):
        return _dispatch.triton_ops().add_rms_norm(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def per_head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each head's vector of ``x`` (``[..., heads, head_dim]``) with that head's weights
    (``[heads, head_dim]``): QK-norm with ``norm: rmsnorm``."""
    if _dispatch.use_triton(x, "rmsnorm"):
        return _dispatch.triton_ops().per_head_rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
