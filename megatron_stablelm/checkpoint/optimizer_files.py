"""Optimizer state on disk: per canonical parameter, in each TP rank's shard layout.

Each tensor is stored under ``"{parameter}/{key}"`` (``key``: ``exp_avg``, ``exp_avg_sq``, ``fp32``) in
``optim_tpNN_dpMMM.safetensors``: the DP ranks of a TP rank share the writing (parameter ``i`` is
written by DP rank ``i % dp``), so the files do not depend on ZeRO's flat partitioning and a
checkpoint loads at any DP size, any ZeRO stage and, re-split like the weights, any TP size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_stablelm.checkpoint.layout import CheckpointError, optim_filename, optim_files
from megatron_stablelm.sharding import ShardSpec


def state_key(name: str, key: str) -> str:
    return f"{name}/{key}"


def parameter_of(full_key: str) -> str:
    return full_key.rsplit("/", 1)[0]


def write_optimizer_file(
    directory: Path, tp_rank: int, tp_size: int, dp_rank: int, dp_size: int, tensors: dict[str, torch.Tensor]
) -> Path:
    path = directory / optim_filename(tp_rank, dp_rank)
    save_file(tensors, str(path), metadata={"tp_size": str(tp_size), "dp_size": str(dp_size)})
    return path


class OptimizerShards:
    """Reads the optimizer tensors of a checkpoint saved at any TP/DP size: for every saved TP rank,
    which file holds each ``parameter/key``."""

    def __init__(self, directory: Path, saved_tp: int) -> None:
        self.directory = directory
        self.by_tp_rank: list[dict[str, safe_open]] = []
        for tp_rank in range(saved_tp):
            files = optim_files(directory, tp_rank)
            if not files:
                raise CheckpointError(f"{directory}: optimizer files for TP rank {tp_rank} are missing")
            index: dict[str, safe_open] = {}
            for path in files:
                handle = safe_open(str(path), framework="pt")
                for key in handle.keys():
                    index[key] = handle
            self.by_tp_rank.append(index)
        keys = set(self.by_tp_rank[0])
        for tp_rank, index in enumerate(self.by_tp_rank[1:], 1):
            if set(index) != keys:
                odd = sorted(set(index) ^ keys)[:4]
                raise CheckpointError(f"{directory}: optimizer state of TP rank {tp_rank} differs in {odd}")
        self.keys = sorted(keys)

    def full(self, full_key: str, spec: ShardSpec) -> torch.Tensor:
        """The whole (TP-merged) tensor."""
        if full_key not in self.by_tp_rank[0]:
            raise CheckpointError(f"optimizer state '{full_key}' is missing from the checkpoint")
        return spec.merge([index[full_key].get_tensor(full_key) for index in self.by_tp_rank])

    def shard(self, full_key: str, spec: ShardSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
        """The tensor as TP rank ``tp_rank`` of ``tp_size`` holds it."""
        if tp_size == len(self.by_tp_rank) and full_key in self.by_tp_rank[tp_rank]:
            return self.by_tp_rank[tp_rank][full_key].get_tensor(full_key)
        return spec.split(self.full(full_key, spec), tp_rank, tp_size)
