"""Which implementation of an element-wise kernel runs for a given tensor.

The rule is deliberately simple so a run's numerics are predictable: the Triton kernels run for CUDA
tensors when Triton is importable, the PyTorch reference everywhere else (CPU, or a GPU box without
Triton). ``MEGATRON_STABLELM_KERNELS=reference`` forces the reference path on GPU too (for A/B
benchmarks and for bisecting a numerical problem), ``=reference:layernorm`` (or any of
:data:`KERNELS`, comma-separated) only for the named kernels; ``=triton`` makes a missing Triton an
error instead of a silent fallback, and with Triton's interpreter on (``TRITON_INTERPRET=1``, set
before Triton is imported) also runs the kernels for CPU tensors: how the tests check, without a GPU,
that the whole model computes the same through the fused kernels as through the references.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from types import ModuleType

import torch

log = logging.getLogger(__name__)

ENV_VAR = "MEGATRON_STABLELM_KERNELS"


@functools.cache
def triton_available() -> bool:
    """Triton is installed (importing it is deferred until a kernel is needed)."""
    return importlib.util.find_spec("triton") is not None


# The kernels ``reference:NAME[,NAME]`` can name (each covers its variants).
KERNELS = ("layernorm", "swiglu", "rotary", "cross_entropy", "rmsnorm")


def _mode(kernel: str | None = None) -> str:
    """``auto``, ``reference`` or ``triton`` for ``kernel``: ``reference:layernorm,swiglu`` forces the
    named kernels to the reference and leaves the others on ``auto`` (an A/B of one kernel in the
    whole step)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode.startswith("reference:"):
        names = {n.strip() for n in mode.split(":", 1)[1].split(",") if n.strip()}
        unknown = sorted(names - set(KERNELS))
        if unknown or not names:
            raise ValueError(
                f"{ENV_VAR}={mode!r}: unknown kernel {', '.join(unknown) or '(none named)'}; "
                f"name some of {', '.join(KERNELS)}"
            )
        return "reference" if kernel in names else "auto"
    if mode not in ("auto", "reference", "triton"):
        raise ValueError(f"{ENV_VAR}={mode!r}: expected auto, reference, reference:KERNEL[,...] or triton")
    return mode


def _interpreting() -> bool:
    """Triton's interpreter is asked for (the variable Triton reads when it is imported)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def use_triton(x: torch.Tensor, kernel: str | None = None) -> bool:
    """True when the fused Triton kernel should handle ``x`` (``kernel``: one of :data:`KERNELS`)."""
    mode = _mode(kernel)
    if mode == "reference" or not (x.is_cuda or (mode == "triton" and _interpreting())):
        return False
    if not triton_available():
        if mode == "triton":
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed")
        return False
    return True


@functools.cache
def triton_ops() -> ModuleType:
    """The Triton kernel module, imported on first use (importing Triton costs ~1 s and is pointless on
    CPU-only runs)."""
    from megatron_stablelm.kernels import triton_ops as module

    log.info("element-wise kernels: Triton (fused rotary, SwiGLU, LayerNorm / RMSNorm, cross-entropy)")
    return module
