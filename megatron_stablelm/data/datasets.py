"""Training datasets: our config mapped onto megatron-core's ``GPTDataset`` and ``BlendedDataset``.

What megatron-core does (and we reuse unchanged): the document / sample / shuffle indexes of each
source, built by its C++ helper, covering as many epochs as the requested number of samples needs
(``GPTDataset``), cached under a hash of everything that determines them; and the weighted
interleaving of sources (``BlendedDataset`` via ``helpers.build_blending_indices``).

What we replace, and why:

* ``BlendedMegatronDatasetBuilder.build()`` orchestration. With a cache directory its
  ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unconditionally, which fails in any
  single-process use (tests, tools, a run without a process group). We therefore build each source's
  ``GPTDataset`` with the builder's own ``build_generic_dataset`` (rank 0 builds and caches, the
  others wait at a barrier and then load; a plain call without a process group) and give
  ``BlendedDataset`` no cache directory: its blending index is a few milliseconds of C++ for millions
  of samples, so every rank recomputes it deterministically instead of caching it.
* Input checking. megatron-core asserts (or reads garbage) on bad shards; :func:`check_shard` runs
  first on every rank and raises an error that names the file.
* The index cache. megatron-core reads its cached indexes with pickle enabled and writes them in
  place; :class:`~megatron_stablelm.data.index_cache.CheckedGPTDataset` checks every cache file from
  its header before reading it without pickle, and publishes new ones atomically.
* Weights default to the sources' token counts (the natural mixture) rather than megatron's
  "exhaustive" blend, so the mixture report and the sampler agree.

Masks: megatron-core's per-sample mask/position code loops over EOD tokens in Python and can build a
dense ``[s, s]`` mask. We switch all of that off in its config (``reset_*``/``eod_mask_loss`` False,
``create_attention_mask`` False -- which also means its index cache is shared by runs that differ only
in those flags) and compute position ids, loss mask and ``cu_seqlens`` per micro-batch, vectorised,
in :mod:`megatron_stablelm.data.loader`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_stablelm.config import BatchLayout, Config, validate_layout
from megatron_stablelm.config.choices import DATA_SPLITS
from megatron_stablelm.data.errors import DataError
from megatron_stablelm.data.index_cache import CheckedGPTDataset
from megatron_stablelm.data.indexed import ShardInfo, check_shard

__all__ = [
    "DEFAULT_SPLIT",
    "DataError",
    "Source",
    "SplitPlan",
    "TrainingDatasets",
    "build_datasets",
    "data_layout",
    "plan_splits",
    "samples_per_eval",
]

logger = logging.getLogger(__name__)

# GPT-NeoX's default train/valid/test split of a single ``data_path``.
DEFAULT_SPLIT = "969,30,1"
# Extra samples built per source beyond its share (megatron-core's default): the blending helper
# may draw a handful more than weight x size from a source.
SURPLUS = 0.005

# megatron-core's per-sample mask and position code, switched off (see the module docstring).
MEGATRON_MASKS_OFF = {
    "reset_position_ids": False,
    "reset_attention_mask": False,
    "eod_mask_loss": False,
    "create_attention_mask": False,
}


@dataclass(frozen=True)
class Source:
    """One shard prefix as used by one split: its sequences ``[seq_begin, seq_end)`` (what
    megatron-core's ``GPTDataset`` calls documents; a shard's empty documents have none) and weight."""

    prefix: str
    weight: float  # normalised within the split
    seq_begin: int
    seq_end: int
    tokens: int  # tokens in [seq_begin, seq_end)
    shard: ShardInfo


@dataclass(frozen=True)
class SplitPlan:
    name: str
    sources: list[Source]
    num_samples: int  # samples the run will draw from this split

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.sources)


def data_layout(cfg: Config, dp_size: int) -> BatchLayout:
    """The batch layout of ``dp_size`` data-parallel ranks: the trainer's rule
    (:func:`~megatron_stablelm.config.validate_layout`) at world size ``dp_size × TP``, so the data
    and the trainer agree on the accumulation (derived from ``train_batch_size`` or given)."""
    return validate_layout(cfg, dp_size * cfg.model_parallel_size)


def samples_per_eval(cfg: Config, layout: BatchLayout) -> int:
    """Samples one evaluation reads: ``eval_iters × accumulation`` micro-batches of
    ``eval_micro_batch`` samples on every data-parallel rank."""
    return cfg.eval_iters * cfg.eval_micro_batch * layout.accumulation * layout.dp_size


def _split_samples(cfg: Config, layout: BatchLayout) -> tuple[int, int, int]:
    if cfg.train_iters is None:
        raise DataError("key 'train_iters' is required to size the training data")
    train = cfg.train_iters * layout.global_batch
    evals = cfg.train_iters // cfg.eval_interval + 1 if cfg.eval_interval else 1
    per_eval = samples_per_eval(cfg, layout)
    return train, evals * per_eval, per_eval


def _normalise(weights: Sequence[float], key: str) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise DataError(f"key '{key}': the weights sum to {total}")
    return [float(w) / total for w in weights]


def plan_splits(
    cfg: Config, vocab_size: int | None, dp_size: int = 1, *, scan_tokens: bool = True
) -> list[SplitPlan | None]:
    """Check every shard and decide, per split, its sources, weights and number of samples.

    Needs only the ``.idx`` files (plus one scan of each ``.bin`` for ids >= ``vocab_size``): this is
    what the mixture report prints and what :func:`build_datasets` builds.
    """
    samples = _split_samples(cfg, data_layout(cfg, dp_size))
    shards: dict[str, ShardInfo] = {}

    def shard(prefix: str) -> ShardInfo:
        if prefix not in shards:
            shards[prefix] = check_shard(prefix, vocab_size, scan_tokens=scan_tokens)
        return shards[prefix]

    plans: list[SplitPlan | None] = []
    if cfg.train_data_paths:
        for i, name in enumerate(DATA_SPLITS):
            paths = getattr(cfg, f"{name}_data_paths")
            if not paths:
                if name == "train":
                    raise DataError("key 'train_data_paths' is empty")
                plans.append(None)
                continue
            weights = getattr(cfg, f"{name}_data_weights")
            infos = [shard(p) for p in paths]
            if weights is None:  # natural mixture: by tokens
                weights = [info.num_tokens for info in infos]
            if len(weights) != len(paths):
                raise DataError(f"key '{name}_data_weights': {len(weights)} weights for {len(paths)} paths")
            norm = _normalise(weights, f"{name}_data_weights")
            sources = [
                Source(p, w, 0, info.num_sequences, info.num_tokens, info)
                for p, w, info in zip(paths, norm, infos)
                if w > 0
            ]
            plans.append(SplitPlan(name, sources, samples[i]))
    elif cfg.data_path:
        info = shard(cfg.data_path)
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.split or DEFAULT_SPLIT))
        for i, name in enumerate(DATA_SPLITS):
            if matrix[i] is None:
                plans.append(None)
                continue
            beg = int(round(matrix[i][0] * info.num_sequences))
            end = int(round(matrix[i][1] * info.num_sequences))
            if end <= beg:
                plans.append(None)
                continue
            tokens = int(info.sequence_lengths[beg:end].sum(dtype=np.int64))
            plans.append(SplitPlan(name, [Source(cfg.data_path, 1.0, beg, end, tokens, info)], samples[i]))
    else:
        raise DataError("no training data: set 'train_data_paths' (and weights) or 'data_path'")
    for plan in plans:
        if plan is None:
            continue
        for src in plan.sources:
            if src.tokens == 0:  # megatron-core would loop forever counting epochs
                raise DataError(f"data shard '{src.prefix}' has no tokens in the {plan.name} split")
    return plans


@dataclass
class TrainingDatasets:
    """Top-level datasets per split (``None`` when a split has no data) and the plans behind them."""

    train: object | None
    valid: object | None
    test: object | None
    plans: list[SplitPlan | None]
    layout: BatchLayout

    def __getitem__(self, name: str):
        return getattr(self, name)


def megatron_config(cfg: Config, tokenizer, plans: Sequence[SplitPlan | None]) -> GPTDatasetConfig:
    """Our config as megatron-core's ``GPTDatasetConfig`` (masks off; see the module docstring)."""
    cache = cfg.data_cache_dir or default_cache_dir(plans)
    blend_per_split = [
        None if p is None else ([s.prefix for s in p.sources], [s.weight for s in p.sources]) for p in plans
    ]
    return GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend_per_split=blend_per_split,
        path_to_cache=cache,
        tokenizer=tokenizer,
        mid_level_dataset_surplus=SURPLUS,
        **MEGATRON_MASKS_OFF,
    )


def default_cache_dir(plans: Sequence[SplitPlan | None]) -> str:
    """Without ``data_cache_dir``: an ``index-cache`` folder beside the first training shard. It is
    as shared as the data directory: a bad cache file there is refused, not rebuilt, unless the folder
    is private to this user (see :mod:`megatron_stablelm.data.index_cache`)."""
    first = plans[0].sources[0].prefix
    return os.path.join(os.path.dirname(os.path.abspath(first)), "index-cache")


def build_datasets(cfg: Config, tokenizer, *, dp_size: int = 1) -> TrainingDatasets:
    """Check the shards, then build each split's dataset sized for the whole planned run.

    Call on every rank: rank 0 builds missing index caches while the others wait (only when
    ``torch.distributed`` is initialised), then everyone loads them.
    """
    plans = plan_splits(cfg, tokenizer.vocab_size, dp_size)
    config = megatron_config(cfg, tokenizer, plans)
    uncached = GPTDatasetConfig(**{**_config_kwargs(config), "path_to_cache": None})
    out: list[object | None] = []
    for split, plan in zip(Split, plans):
        if plan is None or plan.num_samples == 0:
            out.append(None)
            continue
        parts = []
        for src in plan.sources:
            wanted = (
                plan.num_samples
                if len(plan.sources) == 1
                else math.ceil(math.ceil(plan.num_samples * src.weight) * (1 + SURPLUS))
            )
            indexed = IndexedDataset(src.prefix, multimodal=False, mmap=True)
            docs = np.arange(src.seq_begin, src.seq_end, dtype=np.int32)
            ds = BlendedMegatronDatasetBuilder.build_generic_dataset(
                CheckedGPTDataset, lambda: True, True, indexed, src.prefix, docs, wanted, split, config
            )
            parts.append(ds)
        if len(parts) == 1:
            out.append(parts[0])
        else:
            # Its "cannot save the indexes" warning is expected: we do not cache the blend on purpose.
            blend_logger = logging.getLogger("megatron.core.datasets.blended_dataset")
            level = blend_logger.level
            blend_logger.setLevel(logging.ERROR)
            try:
                weights = [s.weight for s in plan.sources]
                out.append(BlendedDataset(parts, weights, plan.num_samples, uncached))
            finally:
                blend_logger.setLevel(level)
    return TrainingDatasets(out[0], out[1], out[2], plans, data_layout(cfg, dp_size))


def _config_kwargs(config: GPTDatasetConfig) -> dict:
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
