"""Precision names, their torch dtypes and their sizes: the one table every module reads.

A precision has two spellings: the short one (``fp32``, ``bf16``, ``fp16``: what
:attr:`Config.params_dtype_name` returns and what the tools' ``--dtype`` accept) and torch's
(``float32``, ``bfloat16``, ``float16``: what a checkpoint's ``model_meta.json`` records and what
Hugging Face's ``torch_dtype`` says). GPT-NeoX's ``precision`` key accepts both.

The byte counts (:func:`bytes_per_value`, :func:`optimizer_bytes_per_parameter`) are here so that
the memory estimate, the checkpoint size and the trainer's room-to-save check count a parameter the
same way. torch is imported only when a dtype is asked for, so reading a config (the launcher does,
before any process exists) never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# short name → torch's name, in the order the config reference lists the spellings
TORCH_NAMES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# every accepted spelling → its short name
SHORT_NAMES: dict[str, str] = {
    spelling: short for short, long in TORCH_NAMES.items() for spelling in (short, long)
}
# bytes of one value in each precision
_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
# Adam's two moments, always fp32 (DeepSpeed keeps them so at every ZeRO stage)
_ADAM_MOMENT_BYTES = 2 * 4


def short_name(name: str) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for either spelling; ValueError naming the accepted ones."""
    try:
        return SHORT_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; expected one of {sorted(SHORT_NAMES)}") from None


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision in either spelling."""
    import torch

    return getattr(torch, TORCH_NAMES[short_name(name)])


def bytes_per_value(name: str) -> int:
    """Bytes of one weight (or gradient) held in this precision."""
    return _BYTES[short_name(name)]


def optimizer_bytes_per_parameter(name: str) -> int:
    """Bytes of optimizer state per parameter when training in this precision: Adam's two fp32
    moments, plus an fp32 master copy of the weight below fp32 (the update is applied in fp32)."""
    master = 0 if short_name(name) == "fp32" else 4
    return _ADAM_MOMENT_BYTES + master
