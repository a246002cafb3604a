"""SwiGLU on the fused up-projection output: ``silu(gate) * up`` where ``x = [gate | up]``.

:func:`swiglu` dispatches to the fused Triton kernel for CUDA tensors (one read of ``x``, one write,
only ``x`` saved for backward) and to :func:`swiglu_reference` elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_stablelm.kernels import _dispatch


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: the ground truth, and the CPU path."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :F]) * x[..., F:]`` for ``x`` of last dim ``2F``."""
    if _dispatch.use_triton(x, "swiglu"):
        return _dispatch.triton_ops().swiglu(x)
    return swiglu_reference(x)
