"""Optimizer state on disk: per canonical parameter, in each TP rank's shard layout.

Each tensor is stored under ``"{parameter}/{key}"`` (``key``: ``exp_avg``, ``exp_avg_sq``, ``fp32``) in
``optim_tpNN_dpMMM.safetensors``. How the DP ranks of a TP rank share the writing:

* under ZeRO each DP rank owns a contiguous range of every parameter's state (its partition of
  DeepSpeed's flat buffers) and writes exactly that range, as a 1-D *fragment* whose flat offset in the
  parameter's TP shard is recorded in the file's ``fragments`` metadata. Nothing crosses the network to
  save the optimizer state, and each rank copies only its own partition to the host;
* without ZeRO every DP rank holds all of it; DP rank ``i % dp`` writes parameter ``i`` whole.

Readers (:class:`OptimizerShards`) join the fragments back into whole tensors, so the files do not
depend on ZeRO's partitioning: a checkpoint loads at any DP size, any ZeRO stage and, re-split like the
weights, any TP size. Files without ``fragments`` metadata hold whole tensors (older checkpoints,
resharded ones).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_stablelm.checkpoint.layout import CheckpointError, optim_filename, optim_files, shard_filename
from megatron_stablelm.sharding import ShardSpec

FRAGMENTS = "fragments"  # file metadata: JSON {"param/key": flat start offset} of the fragment entries


def state_key(name: str, key: str) -> str:
    return f"{name}/{key}"


def parameter_of(full_key: str) -> str:
    return full_key.rsplit("/", 1)[0]


def write_optimizer_file(
    directory: Path,
    tp_rank: int,
    tp_size: int,
    dp_rank: int,
    dp_size: int,
    tensors: dict[str, torch.Tensor],
    fragment_starts: dict[str, int] | None = None,
) -> Path:
    """Write one DP rank's share: whole tensors, or (``fragment_starts``) 1-D fragments at those flat
    offsets of their parameter's TP shard."""
    path = directory / optim_filename(tp_rank, dp_rank)
    metadata = {"tp_size": str(tp_size), "dp_size": str(dp_size)}
    if fragment_starts:
        metadata[FRAGMENTS] = json.dumps(fragment_starts, separators=(",", ":"))
    save_file(tensors, str(path), metadata=metadata)
    return path


def file_fragments(path: Path, metadata: dict | None) -> dict[str, int]:
    """``{"param/key": start}`` of the fragment entries of an optimizer file, from its metadata."""
    raw = (metadata or {}).get(FRAGMENTS)
    if not raw:
        return {}
    try:
        starts = json.loads(raw)
        return {str(k): int(v) for k, v in starts.items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: unreadable '{FRAGMENTS}' metadata ({err})") from None


def join_fragments(full_key: str, pieces: list[tuple[int, int]], numel: int, where: Path) -> None:
    """Check that fragments ``(start, numel)`` tile ``[0, numel)`` exactly once."""
    at = 0
    for start, size in sorted(pieces):
        if start != at:
            raise CheckpointError(
                f"{where}: the optimizer state '{full_key}' has {'a gap' if start > at else 'an overlap'} at "
                f"element {min(start, at)} of {numel} (fragments of another run or DP size mixed in?)"
            )
        at += size
    if at != numel:
        raise CheckpointError(
            f"{where}: the optimizer state '{full_key}' covers {at} of its {numel} elements"
        )


class OptimizerShards:
    """Reads the optimizer tensors of a checkpoint saved at any TP/DP size: for every saved TP rank,
    where each ``parameter/key`` lives (one whole tensor, or fragments in several DP files)."""

    def __init__(self, directory: Path, saved_tp: int) -> None:
        self.directory = directory
        self.by_tp_rank: list[dict[str, list[tuple[int | None, safe_open]]]] = []
        self.shapes: list[dict[str, list[int]]] = []
        for tp_rank in range(saved_tp):
            files = optim_files(directory, tp_rank)
            if not files:
                raise CheckpointError(f"{directory}: optimizer files for TP rank {tp_rank} are missing")
            index: dict[str, list[tuple[int | None, safe_open]]] = {}
            for path in files:
                handle = safe_open(str(path), framework="pt")
                starts = file_fragments(path, handle.metadata())
                for key in handle.keys():
                    index.setdefault(key, []).append((starts.get(key), handle))
            self.by_tp_rank.append(index)
            with safe_open(str(directory / shard_filename(tp_rank)), framework="pt") as model:
                self.shapes.append({k: list(model.get_slice(k).get_shape()) for k in model.keys()})
        keys = set(self.by_tp_rank[0])
        for tp_rank, index in enumerate(self.by_tp_rank[1:], 1):
            if set(index) != keys:
                odd = sorted(set(index) ^ keys)[:4]
                raise CheckpointError(f"{directory}: optimizer state of TP rank {tp_rank} differs in {odd}")
        self.keys = sorted(keys)

    def _tp_shard(self, tp_rank: int, full_key: str) -> torch.Tensor:
        """The tensor as saved TP rank ``tp_rank`` held it, fragments joined."""
        entries = self.by_tp_rank[tp_rank][full_key]
        if len(entries) == 1 and entries[0][0] is None:
            return entries[0][1].get_tensor(full_key)
        shape = self.shapes[tp_rank][parameter_of(full_key)]
        pieces = sorted((start or 0, handle.get_tensor(full_key).reshape(-1)) for start, handle in entries)
        join_fragments(full_key, [(s, t.numel()) for s, t in pieces], math.prod(shape), self.directory)
        return torch.cat([t for _, t in pieces]).reshape(shape)

    def full(self, full_key: str, spec: ShardSpec) -> torch.Tensor:
        """The whole (TP-merged) tensor."""
        if full_key not in self.by_tp_rank[0]:
            raise CheckpointError(f"optimizer state '{full_key}' is missing from the checkpoint")
        return spec.merge([self._tp_shard(r, full_key) for r in range(len(self.by_tp_rank))])

    def shard(self, full_key: str, spec: ShardSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The tensor as TP rank ``tp_rank`` of ``tp_size`` holds it."""
        if tp_size == len(self.by_tp_rank) and full_key in self.by_tp_rank[tp_rank]:
            return self._tp_shard(tp_rank, full_key)
        return spec.split(self.full(full_key, spec), tp_rank, tp_size)
