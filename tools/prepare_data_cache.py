"""Build a training run's data caches before the job starts, on every core of this machine.

    python tools/prepare_data_cache.py CONFIG [CONFIG ...] [--override k=v ...] \\
        [--workers N] [--dp-size N] [--data-root DIR]

Why: a cold start spends its time building each source's document / sample / shuffle index and the
blended order, on rank 0, while every other rank of the job waits (minutes at Stable LM 2 scale;
``tools/simulate_startup.py`` measures it). This tool does the same work on one machine before the
job: sources one after another, largest first, each built in pieces by ``--workers`` processes
(:mod:`megatron_stablelm.data.sample_order`), then each split's blend. It writes exactly what
``train.py`` would: each source's index cache (``megatron_stablelm.data.datasets.build_source_dataset``),
the full check record of each shard (pointers, document index, token ids < the tokenizer's vocabulary;
``<cache>/shard-checks/``), and each split's blended sample order. The job then starts warm: it reads
the records and the cache files' headers and builds nothing.

Give the job's configs: the cache is keyed by everything that determines the indexes (seed,
sequence length, number of samples...), so a different ``train_iters``, batch size or data-parallel
size (``--dp-size``, default: what ``train_batch_size`` implies, else 1; it matters only when the
global batch is not fixed by ``train_batch_size``) builds caches the job will not use.
``--data-root DIR`` resolves relative shard prefixes as ``tools/mixture_report.py`` does. Bad input
(config, tokenizer, a missing or malformed shard) prints one ``error: ...`` line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_stablelm.cli import add_config_arguments, overrides_from, parse_config_args
from megatron_stablelm.config import Config, ConfigError, load_config
from megatron_stablelm.data import DataError, ShardError, TokenizerError, build_tokenizer


def source_tasks(cfg: Config, tokenizer, dp_size: int) -> list[tuple[str, int, str, int]]:
    """Every (split, index, prefix, tokens) to build, largest source first."""
    from megatron_stablelm.data.datasets import plan_splits

    tasks = []
    for plan in plan_splits(cfg, tokenizer.vocab_size, dp_size, scan_tokens=False):
        if plan is None or plan.num_samples == 0:
            continue
        tasks += [(plan.name, i, src.prefix, src.tokens) for i, src in enumerate(plan.sources)]
    return sorted(tasks, key=lambda t: -t[3])


def check_shards(cfg: Config, tokenizer, dp_size: int, workers: int) -> None:
    """The full check of every shard of the run that has no current record (pointers, document
    index, token ids), ``workers`` shards at a time; each writes its record, which the source builds
    and the job then read. Raises the first shard's error."""
    from megatron_stablelm.data.datasets import index_cache_dir, plan_splits, verify_shards

    plans = plan_splits(cfg, tokenizer.vocab_size, dp_size, scan_tokens=False)
    shards = {src.shard.prefix: src.shard for plan in plans if plan is not None for src in plan.sources}
    verify_shards(list(shards.values()), tokenizer.vocab_size, index_cache_dir(cfg, plans), workers=workers)


def prepare(cfg: Config, tokenizer, dp_size: int, workers: int, log=print) -> dict[tuple[str, int], float]:
    """Build every source's index cache and shard record (each with ``workers`` processes), then each
    split's blend; returns the seconds each source took. Raises the first error a source met."""
    from megatron_stablelm.data.datasets import build_datasets, build_source_dataset
    from megatron_stablelm.data.index_cache import CheckedGPTDataset

    seconds: dict[tuple[str, int], float] = {}
    start = time.perf_counter()
    check_shards(cfg, tokenizer, dp_size, workers)
    log(f"full shard checks: {time.perf_counter() - start:.1f} s with {max(1, workers)} worker(s)")
    start = time.perf_counter()
    previous, CheckedGPTDataset.build_workers = CheckedGPTDataset.build_workers, max(1, workers)
    try:
        for split, index, prefix, _ in source_tasks(cfg, tokenizer, dp_size):
            began = time.perf_counter()
            build_source_dataset(cfg, tokenizer, split, index, dp_size=dp_size)
            seconds[(split, index)] = time.perf_counter() - began
            log(f"  {split} source {index} ({prefix}): {seconds[(split, index)]:.1f} s")
        log(f"per-source caches: {time.perf_counter() - start:.1f} s with {max(1, workers)} worker(s)")
        start = time.perf_counter()
        build_datasets(cfg, tokenizer, dp_size=dp_size)  # loads the sources, publishes the blends
        log(f"blends and final check: {time.perf_counter() - start:.1f} s")
    finally:
        CheckedGPTDataset.build_workers = previous
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes per source (default: the cores this process may use)",
    )
    p.add_argument("--dp-size", type=int, default=None, help="the job's data-parallel size")
    p.add_argument("--data-root", default=None, help="resolve relative shard prefixes against this directory")
    args = parse_config_args(p, argv)
    if args.workers is None:
        from megatron_stablelm.data.sample_order import available_cores

        args.workers = available_cores()
    if args.workers < 1:
        p.error("--workers must be at least 1")
    try:
        cfg = load_config(args.configs, overrides_from(args), report_ignored=False, training=True)
        from megatron_stablelm.data.mixture import planned_dp_size, with_data_root

        if args.data_root is not None:
            cfg = with_data_root(cfg, args.data_root)
        dp = planned_dp_size(cfg, args.dp_size)
        tokenizer = build_tokenizer(cfg)
        prepare(cfg, tokenizer, dp, args.workers)
    except (ConfigError, DataError, ShardError, TokenizerError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
