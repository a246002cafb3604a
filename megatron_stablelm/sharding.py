"""How each canonical (whole-model) tensor is split across tensor-parallel ranks, read off the layers.

The model's parameter names *are* the canonical names. A canonical tensor is TP-independent, so a
checkpoint saved at one TP size loads at any other, and HF conversion never sees TP at all:

* fused Q/K/V rows are grouped per KV head ``[q heads of group g | k_g | v_g]`` for g = 0..kv-1, so a
  contiguous split along rows hands every rank whole KV groups;
* the gated MLP's fused up-projection is ``[gate | up]`` in canonical form, but each rank holds
  ``[gate_r | up_r]``: it is split as 2 *parts*, each part chunked across ranks.

Why read off the layers: the layer types already say how they split (a megatron-core column-parallel
layer splits its output rows, a row-parallel one its input columns, the vocab-parallel embedding its
rows), so :func:`model_splits` derives every parameter's :class:`ShardSpec` from the module that owns
it instead of restating the rule per name. Two declarations live on the layers themselves:

* a column-parallel layer holding several independent blocks sets ``fused_parts`` (the gated MLP's
  ``fc1``);
* any other module whose parameters are split sets ``tp_param_splits``, a mapping from its own
  parameter names to specs (the per-head QK-norm, split by heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ShardSpec:
    """``dim`` None: replicated on every TP rank (under sequence parallelism those are the parameters
    whose gradients the model sums over TP: they all act between the TP regions). ``parts``:
    independent blocks along ``dim``, each chunked across ranks (2 for the fused gate/up projection)."""

    dim: int | None
    parts: int = 1

    def split(self, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        """This rank's shard of the whole tensor ``full``."""
        if self.dim is None or size == 1:
            return full
        blocks = full.chunk(self.parts, dim=self.dim)
        for block in blocks:
            if block.shape[self.dim] % size:
                raise ValueError(f"dimension {block.shape[self.dim]} does not split over TP={size}")
        return torch.cat([b.chunk(size, dim=self.dim)[rank] for b in blocks], dim=self.dim)

    def merge(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """The whole tensor from every rank's shard, in rank order."""
        if self.dim is None or len(shards) == 1:
            return shards[0]
        per_rank = [s.chunk(self.parts, dim=self.dim) for s in shards]
        blocks = [torch.cat([r[p] for r in per_rank], dim=self.dim) for p in range(self.parts)]
        return torch.cat(blocks, dim=self.dim)

    def full_shape(self, local_shape: torch.Size | tuple[int, ...], tp_size: int) -> tuple[int, ...]:
        """The whole tensor's shape from one rank's shard shape at tensor-parallel size ``tp_size``."""
        shape = list(local_shape)
        if self.dim is not None:
            shape[self.dim] *= tp_size
        return tuple(shape)


REPLICATED = ShardSpec(None)


def layer_splits(module: nn.Module) -> dict[str, ShardSpec]:
    """Specs of ``module``'s own (not its children's) sharded parameters, by local name; parameters
    it does not list are replicated."""
    declared = getattr(module, "tp_param_splits", None)
    if declared is not None:
        return dict(declared)
    from megatron.core import tensor_parallel  # here, so checkpoint readers need not import megatron-core

    if isinstance(module, tensor_parallel.ColumnParallelLinear):
        rows = ShardSpec(0, parts=getattr(module, "fused_parts", 1))
        return {"weight": rows, "bias": rows}
    if isinstance(module, tensor_parallel.RowParallelLinear):
        return {"weight": ShardSpec(1)}  # the bias is added after the all-reduce: replicated
    if isinstance(module, tensor_parallel.VocabParallelEmbedding):
        return {"weight": ShardSpec(0)}
    return {}


def model_splits(model: nn.Module) -> dict[str, ShardSpec]:
    """Every parameter of ``model`` (under its ``named_parameters`` name) → how it splits over TP."""
    splits: dict[str, ShardSpec] = {}
    for prefix, module in model.named_modules():
        rules = layer_splits(module)
        for local, _ in module.named_parameters(prefix="", recurse=False):
            name = f"{prefix}.{local}" if prefix else local
            splits.setdefault(name, rules.get(local, REPLICATED))
    return {name: splits[name] for name, _ in model.named_parameters()}
