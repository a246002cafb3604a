"""SwiGLU on the fused up-projection output: ``silu(gate) * up`` where ``x = [gate | up]``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
