"""Training datasets: our config mapped onto megatron-core's ``GPTDataset`` and ``BlendedDataset``.

What megatron-core does (and we reuse): the datasets themselves -- a source's samples read from its
document / sample / shuffle indexes, covering as many epochs as the requested number of samples needs
(``GPTDataset``), cached under a hash of everything that determines them, and the weighted
interleaving of sources (``BlendedDataset``). Its packing of documents into samples is kept exactly;
the orders (documents and samples per epoch, the blend) are built by
:mod:`~megatron_stablelm.data.sample_order` in parallel pieces, where megatron-core's builds are one
core's work (minutes per large source at Stable LM 2 scale).

What we replace, and why:

* ``BlendedMegatronDatasetBuilder.build()`` orchestration. With a cache directory its
  ``BlendedDataset`` calls ``torch.distributed.get_rank()`` unconditionally, which fails in any
  single-process use (tests, tools, a run without a process group). We therefore build each source's
  ``GPTDataset`` (:func:`build_source_dataset`) and the blend
  (:class:`~megatron_stablelm.data.index_cache.CheckedBlendedDataset`) with the builder's own
  ``build_generic_dataset``: rank 0 builds and caches, the others wait at a barrier and then load (a
  plain call without a process group). The blend is cached like the per-source indexes: at ~10^9
  samples recomputing it is minutes and ~10 GB on every rank at every start.
* Input checking. megatron-core asserts (or reads garbage) on bad shards. :func:`plan_splits` runs
  the constant-time start-up check of every shard (:func:`~megatron_stablelm.data.indexed.check_shard`,
  remembered per process, so ``train.py``'s own earlier check is not repeated) and, when building,
  the full check (pointers, document index, token ids < vocabulary) once per shard version: its
  result is recorded in ``<index cache>/shard-checks/``. With a process group rank 0 does the full
  checks and sends the records (or the error) to every rank, so a bad shard stops every rank with
  the same one-line error before any index is built, and only one rank reads the ``.bin`` files.
* The index cache. megatron-core reads its cached indexes with pickle enabled and writes them in
  place; :class:`~megatron_stablelm.data.index_cache.CheckedGPTDataset` checks every cache file from
  its header before reading it without pickle, and publishes new ones atomically.
* Weights default to the sources' token counts (the natural mixture) rather than megatron's
  "exhaustive" blend, so the mixture report and the sampler agree.
* Fill-in-the-middle. A split with a source whose FIM rate (``fim_rate`` or
  ``{split}_data_fim_rates``) is above 0 has each of its sources wrapped in
  :class:`~megatron_stablelm.data.fim.FIMDataset`, which transforms that source's samples per document
  as they are read (the indexes and their cache are unchanged).

Masks: megatron-core's per-sample mask/position code loops over EOD tokens in Python and can build a
dense ``[s, s]`` mask. We switch all of that off in its config (``reset_*``/``eod_mask_loss`` False,
``create_attention_mask`` False -- which also means its index cache is shared by runs that differ only
in those flags) and compute position ids, loss mask and ``cu_seqlens`` per micro-batch, vectorised,
in :mod:`megatron_stablelm.data.loader`.
"""

from __future__ import annotations

import datetime
import logging
import math
import multiprocessing as mp
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.distributed as dist
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
from megatron_stablelm.data.fim import FIMDataset, FIMSettings, fim_sentinels
from megatron_stablelm.data.index_cache import CheckedBlendedDataset, CheckedGPTDataset, DocumentRange
from megatron_stablelm.data.indexed import ShardError, ShardInfo, check_shard, needs_full_check, verify_shard
from megatron_stablelm.data.sample_order import available_cores

__all__ = [
    "DEFAULT_SPLIT",
    "FIM_SENTINEL_KEYS",
    "DataError",
    "Source",
    "SplitPlan",
    "TrainingDatasets",
    "build_datasets",
    "build_source_dataset",
    "data_layout",
    "index_cache_dir",
    "plan_splits",
    "verify_shards",
    "samples_per_eval",
]

logger = logging.getLogger(__name__)

# GPT-NeoX's default train/valid/test split of a single ``data_path``.
DEFAULT_SPLIT = "969,30,1"
# Extra samples built per source beyond its share (megatron-core's default): the blending helper
# may draw a handful more than weight x size from a source.
SURPLUS = 0.005
# Documents (over the shards not yet checked) from which the full checks run in parallel processes:
# below it, forking costs more than the checks.
PARALLEL_CHECK_DOCUMENTS = 1 << 22

# The config keys naming the FIM sentinels, in FIMSentinels order (prefix, middle, suffix).
FIM_SENTINEL_KEYS = ("fim_prefix_token", "fim_middle_token", "fim_suffix_token")

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
    fim_rate: float = 0.0  # share of its documents given fill-in-the-middle (megatron_stablelm.data.fim)


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


def _fim_rates(cfg: Config, name: str, paths: Sequence[str]) -> list[float]:
    """Each path's FIM rate in split ``name``: ``{name}_data_fim_rates`` when given, else ``fim_rate``."""
    rates = getattr(cfg, f"{name}_data_fim_rates")
    if rates is None:
        return [float(cfg.fim_rate)] * len(paths)
    if len(rates) != len(paths):
        raise DataError(f"key '{name}_data_fim_rates': {len(rates)} rates for {len(paths)} paths")
    return [float(r) for r in rates]


def plan_splits(
    cfg: Config, vocab_size: int | None, dp_size: int = 1, *, scan_tokens: bool = True
) -> list[SplitPlan | None]:
    """Check every shard and decide, per split, its sources, weights and number of samples.

    Needs only the ``.idx`` files: the start-up check of each shard (constant time, remembered per
    process) and, with ``scan_tokens``, the full check of :func:`verify_shards` (once per shard
    version, recorded in :func:`index_cache_dir`; with a process group, on rank 0 only, so every rank
    must call it). This is what the mixture report prints and what :func:`build_datasets` builds.
    """
    samples = _split_samples(cfg, data_layout(cfg, dp_size))
    shards: dict[str, ShardInfo] = {}

    def shard(prefix: str) -> ShardInfo:
        if prefix not in shards:
            shards[prefix] = check_shard(prefix, vocab_size, scan_tokens=False)
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
            fim = _fim_rates(cfg, name, paths)
            sources = [
                Source(p, w, 0, info.num_sequences, info.num_tokens, info, f)
                for p, w, info, f in zip(paths, norm, infos, fim)
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
            source = Source(cfg.data_path, 1.0, beg, end, tokens, info, float(cfg.fim_rate))
            plans.append(SplitPlan(name, [source], samples[i]))
    else:
        raise DataError("no training data: set 'train_data_paths' (and weights) or 'data_path'")
    if scan_tokens:  # before anything is built: a bad shard stops every rank here, naming its file
        verify_shards(
            list(shards.values()), vocab_size, index_cache_dir(cfg, plans), workers=available_cores()
        )
    for plan in plans:
        if plan is None:
            continue
        for src in plan.sources:
            if src.tokens == 0:  # megatron-core would loop forever counting epochs
                raise DataError(f"data shard '{src.prefix}' has no tokens in the {plan.name} split")
    _check_index_fits(cfg, plans)
    return plans


# A lower bound on the index bytes per sample of a split: the blend's source and sample numbers plus
# the source's shuffle entry (sample_order.py). The real figure is larger (document index, packing).
INDEX_BYTES_PER_SAMPLE = 16


def _check_index_fits(cfg: Config, plans: Sequence[SplitPlan | None]) -> None:
    """Refuse a run whose sample indexes could not fit the disk that holds the index cache (e.g.
    ``train_iters: 1000000000000000``), naming the sizes, instead of a memory error deep inside the
    index build after minutes."""
    total = sum(p.num_samples for p in plans if p is not None)
    need = total * INDEX_BYTES_PER_SAMPLE
    where = Path(index_cache_dir(cfg, plans)).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise DataError(
            f"train_iters={cfg.train_iters}, eval_iters={cfg.eval_iters}: {total:,} samples, whose indexes "
            f"alone need more than {need / 2**30:,.0f} GiB, but {where} has {free / 2**30:,.0f} GiB free"
        )


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


def _verify_each(
    infos: Sequence[ShardInfo], vocab_size: int | None, record_dir: str | None, workers: int
) -> dict[str, dict]:
    """:func:`~megatron_stablelm.data.indexed.verify_shard` of each shard, ``workers`` shards at a
    time in forked processes (the records they make are then trusted here, so this process knows the
    shards checked even where no record can be written); the records by prefix."""
    unchecked = [info for info in infos if needs_full_check(info, vocab_size, record_dir)]
    workers = min(workers, len(unchecked))
    if workers > 1 and sum(info.num_documents for info in unchecked) >= PARALLEL_CHECK_DOCUMENTS:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            jobs = [pool.submit(verify_shard, info, vocab_size, record_dir) for info in unchecked]
            trusted = {info.prefix: job.result() for info, job in zip(unchecked, jobs)}
    else:
        trusted = {}
    return {
        info.prefix: verify_shard(info, vocab_size, record_dir, trusted=trusted.get(info.prefix))
        for info in infos
    }


def verify_shards(
    infos: Sequence[ShardInfo], vocab_size: int | None, record_dir: str | None, *, workers: int = 1
) -> None:
    """The full check of every shard (:func:`~megatron_stablelm.data.indexed.verify_shard`), done
    once: a shard whose record in ``record_dir`` matches is not read again. ``workers`` processes
    check shards side by side (rank 0 only, with a process group).

    With a process group of more than one rank, rank 0 checks (reading the ``.bin`` files only for
    shards without a record) and broadcasts the records, or its error, to the others (over a gloo
    group with :data:`CHECK_TIMEOUT`, so a long first scan does not time them out): every rank
    then raises the same :class:`ShardError` or trusts what rank 0 found, after comparing the
    record with its own view of the files (a rank that sees other files, e.g. node-local copies,
    checks them itself). Call on every rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        _verify_each(infos, vocab_size, record_dir, workers)
        return
    outcome: object = None
    failure: Exception | None = None
    if dist.get_rank() == 0:
        try:
            outcome = _verify_each(infos, vocab_size, record_dir, workers)
        except Exception as err:  # sent on, so that no rank waits for rank 0 forever
            failure = err
            outcome = (
                str(err)
                if isinstance(err, ShardError | DataError)
                else f"rank 0: {type(err).__name__}: {err}"
            )
    box = [outcome]
    dist.broadcast_object_list(box, src=0, group=_check_group())
    if failure is not None:
        raise failure
    if isinstance(box[0], str):
        raise ShardError(box[0])
    if dist.get_rank() != 0:
        for info in infos:
            verify_shard(info, vocab_size, record_dir, trusted=box[0].get(info.prefix))


# (the default group it was made for, a gloo group with a long timeout) -- see _check_group
_CHECK_GROUP: tuple[object, object] | None = None
# How long the other ranks wait for rank 0's full shard checks: a first start of int32 shards reads
# every .bin once (hours at 2T tokens unless tools/prepare_data_cache.py ran first).
CHECK_TIMEOUT = datetime.timedelta(hours=24)


def _check_group():
    """A gloo group over all ranks, with :data:`CHECK_TIMEOUT`, for sending rank 0's shard checks:
    the default group's timeout (30 minutes) is shorter than a first full scan, and gloo needs no
    device. Made once per default group (every rank calls :func:`verify_shards`, so every rank
    makes it at the same point)."""
    global _CHECK_GROUP
    if _CHECK_GROUP is None or _CHECK_GROUP[0] is not dist.group.WORLD:
        _CHECK_GROUP = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=CHECK_TIMEOUT))
    return _CHECK_GROUP[1]


def index_cache_dir(cfg: Config, plans: Sequence[SplitPlan | None]) -> str:
    """Where the index caches and the shard-check records live: ``data_cache_dir``, else
    :func:`default_cache_dir`."""
    return cfg.data_cache_dir or default_cache_dir(plans)


def megatron_config(cfg: Config, tokenizer, plans: Sequence[SplitPlan | None]) -> GPTDatasetConfig:
    """Our config as megatron-core's ``GPTDatasetConfig`` (masks off; see the module docstring)."""
    cache = index_cache_dir(cfg, plans)
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


def _source_samples(plan: SplitPlan, src: Source) -> int:
    """Samples built for one source: the split's share by weight plus megatron-core's surplus (all
    of them for a split of one source)."""
    if len(plan.sources) == 1:
        return plan.num_samples
    # + the sources: the blend's count of a source stays within 0.5 + weight x sources / 2 of
    # weight x length (sample_order.build_blend), past what the surplus covers in a short run
    return math.ceil(math.ceil(plan.num_samples * src.weight) * (1 + SURPLUS)) + len(plan.sources)


def _source_dataset(
    config: GPTDatasetConfig, plan: SplitPlan, src: Source, split: Split
) -> CheckedGPTDataset:
    """One source's ``GPTDataset`` through its index cache (rank 0 builds a missing one, the others
    wait at a barrier and then load it)."""
    indexed = IndexedDataset(src.prefix, multimodal=False, mmap=True)
    docs = DocumentRange(src.seq_begin, src.seq_end)  # not an array: see DocumentRange
    return BlendedMegatronDatasetBuilder.build_generic_dataset(
        CheckedGPTDataset,
        lambda: True,
        True,
        indexed,
        src.prefix,
        docs,
        _source_samples(plan, src),
        split,
        config,
    )


def _split_index(split: str | Split) -> int:
    if isinstance(split, Split):
        return split.value
    if split not in DATA_SPLITS:
        raise DataError(f"unknown split '{split}' (one of {', '.join(DATA_SPLITS)})")
    return DATA_SPLITS.index(split)


def build_source_dataset(
    cfg: Config, tokenizer, split: str | Split, index: int, *, dp_size: int = 1
) -> CheckedGPTDataset | None:
    """Source ``index`` of ``split`` ('train', 'valid', 'test'), exactly as :func:`build_datasets`
    builds it (same plan, same cache files), after the full check of that source's shard only.

    Why: the cold start's cost is one index build per source; this lets a pre-job tool
    (``tools/prepare_data_cache.py``) build every source's cache and shard record in parallel
    processes, so the job itself starts warm. ``None`` for a split without samples. Indexes count
    the split's sources after dropping those of weight 0 (``SplitPlan.sources``).
    """
    plans = plan_splits(cfg, tokenizer.vocab_size, dp_size, scan_tokens=False)
    i = _split_index(split)
    plan = plans[i]
    if plan is None or plan.num_samples == 0:
        return None
    if not 0 <= index < len(plan.sources):
        raise DataError(f"the {plan.name} split has {len(plan.sources)} sources, not an index {index}")
    src = plan.sources[index]
    verify_shards([src.shard], tokenizer.vocab_size, index_cache_dir(cfg, plans))
    return _source_dataset(megatron_config(cfg, tokenizer, plans), plan, src, list(Split)[i])


def build_datasets(cfg: Config, tokenizer, *, dp_size: int = 1) -> TrainingDatasets:
    """Check the shards, then build each split's dataset sized for the whole planned run.

    Call on every rank: rank 0 does the full shard checks a shard has no record of and builds
    missing index caches (per source, then the blend) while the others wait (only when
    ``torch.distributed`` is initialised), then everyone loads them.
    """
    plans = plan_splits(cfg, tokenizer.vocab_size, dp_size)
    sentinels = None
    if any(src.fim_rate > 0 for plan in plans if plan is not None for src in plan.sources):
        # before any index is built: a tokenizer without the sentinels fails at once, naming them
        names = [getattr(cfg, key) for key in FIM_SENTINEL_KEYS]
        sentinels = fim_sentinels(tokenizer, names, FIM_SENTINEL_KEYS)
    config = megatron_config(cfg, tokenizer, plans)
    out: list[object | None] = []
    for split, plan in zip(Split, plans):
        if plan is None or plan.num_samples == 0:
            out.append(None)
            continue
        parts = [_source_dataset(config, plan, src, split) for src in plan.sources]
        if any(src.fim_rate > 0 for src in plan.sources):
            parts = [
                FIMDataset(
                    ds,
                    FIMSettings(
                        src.fim_rate, cfg.fim_spm_rate, sentinels, tokenizer.eod, (cfg.seed, split.value, k)
                    ),
                )
                for k, (ds, src) in enumerate(zip(parts, plan.sources))
            ]
        if len(parts) == 1:
            out.append(parts[0])
        else:
            weights = [s.weight for s in plan.sources]
            out.append(
                BlendedMegatronDatasetBuilder.build_generic_dataset(
                    CheckedBlendedDataset, lambda: True, True, parts, weights, plan.num_samples, config
                )
            )
    return TrainingDatasets(out[0], out[1], out[2], plans, data_layout(cfg, dp_size))
