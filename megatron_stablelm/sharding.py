"""How each canonical (whole-model) tensor is split across tensor-parallel ranks.

The model's parameter names *are* the canonical names. A canonical tensor is TP-independent, so a
checkpoint saved at one TP size loads at any other, and HF conversion never sees TP at all:

* fused Q/K/V rows are grouped per KV head ``[q heads of group g | k_g | v_g]`` for g = 0..kv-1, so a
  contiguous split along rows hands every rank whole KV groups;
* the gated MLP's fused up-projection is ``[gate | up]`` in canonical form, but each rank holds
  ``[gate_r | up_r]``: it is split as 2 *parts*, each part chunked across ranks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """``dim`` None: replicated on every TP rank. ``parts``: independent blocks along ``dim``, each
    chunked across ranks (2 for the fused gate/up projection)."""

    dim: int | None
    parts: int = 1

    def split(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        if self.dim is None or size == 1:
            return full
        blocks = full.chunk(self.parts, dim=self.dim)
        for block in blocks:
            if block.shape[self.dim] % size:
                raise ValueError(f"dimension {block.shape[self.dim]} does not split over TP={size}")
        return torch.cat([b.chunk(size, dim=self.dim)[rank] for b in blocks], dim=self.dim)

    def merge(self, shards: list[torch.Tensor]) -> torch.Tensor:
        if self.dim is None or len(shards) == 1:
            return shards[0]
        per_rank = [s.chunk(self.parts, dim=self.dim) for s in shards]
        blocks = [torch.cat([r[p] for r in per_rank], dim=self.dim) for p in range(self.parts)]
        return torch.cat(blocks, dim=self.dim)


REPLICATED = ShardSpec(None)
_RULES: list[tuple[re.Pattern, ShardSpec]] = [
    (re.compile(r"^embedding\.weight$"), ShardSpec(0)),
    (re.compile(r"^output\.weight$"), ShardSpec(0)),
    (re.compile(r"\.attention\.qkv\.(weight|bias)$"), ShardSpec(0)),
    (re.compile(r"\.attention\.[qk]_norm\.(weight|bias)$"), ShardSpec(0)),
    (re.compile(r"\.attention\.dense\.weight$"), ShardSpec(1)),
    (re.compile(r"\.mlp\.fc1\.(weight|bias)$"), ShardSpec(0)),  # parts fixed by gated_mlp
    (re.compile(r"\.mlp\.fc2\.weight$"), ShardSpec(1)),
]


def shard_spec(name: str, gated_mlp: bool) -> ShardSpec:
    """The split rule for canonical parameter ``name``; everything not listed is replicated."""
    for pattern, spec in _RULES:
        if pattern.search(name):
            if ".mlp.fc1." in name and gated_mlp:
                return ShardSpec(0, parts=2)
            return spec
    return REPLICATED
