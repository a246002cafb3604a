#!/usr/bin/env python
"""Show what a framework checkpoint holds: training progress, config, and every tensor.

    python tools/inspect_checkpoint.py CHECKPOINT [--no-norms] [--json]

CHECKPOINT is a checkpoint directory or a run directory with a ``latest`` file. Printed: the
iteration and consumed samples/tokens (from the trainer's ``train_state.json``; a weights-only
checkpoint, e.g. one converted from Hugging Face, has none), the TP size, dtype and padded vocabulary,
an architecture summary of the config, the files with their sizes (optimizer shards, RNG states), and
each whole-model tensor (merged over the TP shards) with its shape, dtype and L2 norm. Norms read every
tensor once, one at a time; ``--no-norms`` reads only the metadata. Nothing is modified.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch

from megatron_stablelm import checkpointing
from megatron_stablelm.config import ConfigError

TRAIN_STATE_FILE = "train_state.json"  # written by megatron_stablelm.training.checkpoint
SUMMARY_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "kv_heads",
    "ffn_hidden_size",
    "mlp_type",
    "activation",
    "rotary_pct",
    "gpt_j_residual",
    "gpt_j_tied",
    "qk_norm",
    "tied_embeddings",
    "seq_length",
    "max_position_embeddings",
    "tokenizer_type",
    "vocab_file",
    "model_parallel_size",
    "precision",
    "train_iters",
)


def inspect_checkpoint(path: str | Path, norms: bool = True) -> dict[str, Any]:
    """Everything the command prints, as a JSON-serialisable dict. Raises ``CheckpointError`` naming
    the path for a missing, incomplete or unreadable checkpoint."""
    ckpt, meta, cfg = checkpointing.read_header(path)
    state = None
    state_file = ckpt / TRAIN_STATE_FILE
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except json.JSONDecodeError as err:
            raise checkpointing.CheckpointError(f"{state_file}: not valid JSON ({err})") from None
    match = re.fullmatch(r"iter_(\d+)", ckpt.name)
    iteration = (state or {}).get("iteration", int(match.group(1)) if match else None)
    tensors = {}
    total = 0
    try:
        source = checkpointing.iter_canonical_tensors(ckpt) if norms else None
        for name, shape in meta["shapes"].items():
            numel = 1
            for d in shape:
                numel *= int(d)
            total += numel
            entry: dict[str, Any] = {"shape": list(shape), "dtype": meta["dtype"], "numel": numel}
            if source is not None:
                got, tensor = next(source)  # the same order as meta["shapes"]
                if got != name:
                    raise checkpointing.CheckpointError(f"{ckpt}: tensor order changed ({got} vs {name})")
                entry["dtype"] = str(tensor.dtype).removeprefix("torch.")
                entry["norm"] = float(torch.linalg.vector_norm(tensor.double()))
            tensors[name] = entry
    except checkpointing.CheckpointError:
        raise
    except Exception as err:  # safetensors' errors do not name the file
        raise checkpointing.CheckpointError(f"{ckpt}: cannot read the model shards ({err})") from None
    files = {p.name: p.stat().st_size for p in sorted(ckpt.iterdir()) if p.is_file()}
    return {
        "path": str(ckpt),
        "iteration": iteration,
        "consumed_samples": (state or {}).get("consumed_samples"),
        "consumed_tokens": (state or {}).get("consumed_tokens"),
        "train_state": state,
        "tp_size": meta["tp_size"],
        "dtype": meta["dtype"],
        "padded_vocab_size": meta["padded_vocab_size"],
        "parameters": total,
        "config": {key: getattr(cfg, key) for key in SUMMARY_KEYS},
        "files": files,
        "tensors": tensors,
    }


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{unit}"
        n /= 1000
    return f"{n:.4g}P"


def format_report(info: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"checkpoint      {info['path']}", f"iteration       {info['iteration']}"]
    if info["train_state"] is None:
        lines.append("training state  none (weights only)")
    else:
        lines.append(f"consumed        {info['consumed_samples']} samples, {info['consumed_tokens']} tokens")
        extra = {k: v for k, v in info["train_state"].items() if k not in ("iteration",)}
        lines.append(f"train_state     {json.dumps(extra, sort_keys=True)}")
    lines.append(
        f"layout          TP={info['tp_size']}, dtype {info['dtype']}, padded vocab {info['padded_vocab_size']}, "
        f"{_human(info['parameters'])} parameters ({info['parameters']:,})"
    )
    lines.append("config")
    lines += [f"  {k:<24} {v}" for k, v in info["config"].items()]
    lines.append("files")
    lines += [f"  {name:<32} {_human(size)}B" for name, size in info["files"].items()]
    lines.append("tensors")
    width = max((len(n) for n in info["tensors"]), default=10)
    for name, t in info["tensors"].items():
        norm = f"  norm {t['norm']:.6g}" if "norm" in t else ""
        lines.append(f"  {name:<{width}}  {str(tuple(t['shape'])):<16} {t['dtype']:<9}{norm}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--no-norms", action="store_true", help="metadata only; do not read the tensors")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        info = inspect_checkpoint(args.checkpoint, norms=not args.no_norms)
    except (checkpointing.CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1, default=str) if args.json else format_report(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
