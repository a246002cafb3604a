"""What a checkpoint holds, for people: training progress, config, files and every tensor.

Used by ``tools/inspect_checkpoint.py``. Norms read every tensor once, one at a time; without them only
the metadata is read. Nothing is modified.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from megatron_stablelm.checkpoint.layout import CheckpointError, iteration_of
from megatron_stablelm.checkpoint.meta import ModelMeta
from megatron_stablelm.checkpoint.model_files import iter_canonical_tensors, read_header
from megatron_stablelm.checkpoint.selection import read_train_state
from megatron_stablelm.config import ARCHITECTURE_KEYS
from megatron_stablelm.metrics import si_prefixed

# Shown besides the architecture: what a reader needs to use the checkpoint.
USAGE_KEYS = (
    "seq_length",
    "max_position_embeddings",
    "tokenizer_type",
    "vocab_file",
    "model_parallel_size",
    "precision",
    "train_iters",
)


def _tensor_entries(ckpt: Path, meta: ModelMeta, norms: bool) -> dict[str, dict[str, Any]]:
    tensors: dict[str, dict[str, Any]] = {
        name: {"shape": list(shape), "dtype": meta.dtype, "numel": math.prod(shape)}
        for name, shape in meta.shapes.items()
    }
    if not norms:
        return tensors
    try:
        for name, tensor in iter_canonical_tensors(ckpt):
            tensors[name]["dtype"] = str(tensor.dtype).removeprefix("torch.")
            tensors[name]["norm"] = float(torch.linalg.vector_norm(tensor.double()))
    except CheckpointError:
        raise
    except Exception as err:  # safetensors' errors do not name the file
        raise CheckpointError(f"{ckpt}: cannot read the model shards ({err})") from None
    return tensors


def describe_checkpoint(path: str | Path, norms: bool = True) -> dict[str, Any]:
    """Everything ``tools/inspect_checkpoint.py`` prints, as a JSON-serialisable dict. Raises
    :class:`CheckpointError` naming the path for a missing, incomplete or unreadable checkpoint."""
    ckpt, meta, cfg = read_header(path)
    state = read_train_state(ckpt)
    tensors = _tensor_entries(ckpt, meta, norms)
    return {
        "path": str(ckpt),
        "iteration": (state or {}).get("iteration", iteration_of(ckpt)),
        "consumed_samples": (state or {}).get("consumed_samples"),
        "consumed_tokens": (state or {}).get("consumed_tokens"),
        "train_state": state,
        "tp_size": meta.tp_size,
        "dtype": meta.dtype,
        "padded_vocab_size": meta.padded_vocab_size,
        "parameters": sum(t["numel"] for t in tensors.values()),
        "config": {key: getattr(cfg, key) for key in (*ARCHITECTURE_KEYS, *USAGE_KEYS)},
        "files": {p.name: p.stat().st_size for p in sorted(ckpt.iterdir()) if p.is_file()},
        "tensors": tensors,
    }


def format_report(info: dict[str, Any]) -> str:
    """The human-readable report of :func:`describe_checkpoint`."""
    lines = [f"checkpoint      {info['path']}", f"iteration       {info['iteration']}"]
    if info["train_state"] is None:
        lines.append("training state  none (weights only)")
    else:
        lines.append(f"consumed        {info['consumed_samples']} samples, {info['consumed_tokens']} tokens")
        extra = {k: v for k, v in info["train_state"].items() if k != "iteration"}
        lines.append(f"train_state     {json.dumps(extra, sort_keys=True)}")
    lines.append(
        f"layout          TP={info['tp_size']}, dtype {info['dtype']}, padded vocab {info['padded_vocab_size']}, "
        f"{si_prefixed(info['parameters'])} parameters ({info['parameters']:,})"
    )
    lines.append("config")
    lines += [f"  {k:<24} {v}" for k, v in info["config"].items()]
    lines.append("files")
    lines += [f"  {name:<32} {si_prefixed(size)}B" for name, size in info["files"].items()]
    lines.append("tensors")
    width = max((len(n) for n in info["tensors"]), default=10)
    for name, t in info["tensors"].items():
        norm = f"  norm {t['norm']:.6g}" if "norm" in t else ""
        lines.append(f"  {name:<{width}}  {str(tuple(t['shape'])):<16} {t['dtype']:<9}{norm}")
    return "\n".join(lines)
