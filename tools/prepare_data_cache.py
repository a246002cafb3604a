"""Build a training run's data caches before the job starts, one process per source.

    python tools/prepare_data_cache.py CONFIG [CONFIG ...] [--override k=v ...] \\
        [--workers N] [--dp-size N] [--data-root DIR]

Why: a cold start spends its time building megatron-core's document / sample / shuffle index of each
source, one after another on rank 0, while every other rank of the job waits (minutes at Stable LM 2
scale; ``tools/simulate_startup.py`` measures it). This tool does the same work on one machine
before the job, with ``--workers`` processes pulling sources largest first, so the slowest source
sets the floor. It writes exactly what ``train.py`` would: each source's index cache
(``megatron_stablelm.data.datasets.build_source_dataset``), the full check record of each shard
(pointers, document index, token ids < the tokenizer's vocabulary; ``<cache>/shard-checks/``), and
finally each split's blended sample order. The job then starts warm: it reads the records and the
cache files' headers and builds nothing.

Give the job's configs: the cache is keyed by everything that determines the indexes (seed,
sequence length, number of samples...), so a different ``train_iters``, batch size or data-parallel
size (``--dp-size``, default: what ``train_batch_size`` implies, else 1; it matters only when the
global batch is not fixed by ``train_batch_size``) builds caches the job will not use.
``--data-root DIR`` resolves relative shard prefixes as ``tools/mixture_report.py`` does. Bad input
(config, tokenizer, a missing or malformed shard) prints one ``error: ...`` line and exits 2.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue as queue_module
import sys
import time

from megatron_stablelm.cli import add_config_arguments, overrides_from, parse_config_args
from megatron_stablelm.config import Config, ConfigError, load_config
from megatron_stablelm.data import DataError, ShardError, TokenizerError, build_tokenizer


def source_tasks(cfg: Config, tokenizer, dp_size: int) -> list[tuple[str, int, str, int]]:
    """Every (split, index, prefix, tokens) to build, largest source first (the longest builds start
    first, so the last one to finish is as early as the slowest source allows)."""
    from megatron_stablelm.data.datasets import plan_splits

    tasks = []
    for plan in plan_splits(cfg, tokenizer.vocab_size, dp_size, scan_tokens=False):
        if plan is None or plan.num_samples == 0:
            continue
        tasks += [(plan.name, i, src.prefix, src.tokens) for i, src in enumerate(plan.sources)]
    return sorted(tasks, key=lambda t: -t[3])


def _build(cfg: Config, tokenizer, dp_size: int, split: str, index: int) -> float:
    from megatron_stablelm.data.datasets import build_source_dataset

    start = time.perf_counter()
    build_source_dataset(cfg, tokenizer, split, index, dp_size=dp_size)
    return time.perf_counter() - start


def _worker(cfg: Config, tokenizer, dp_size: int, tasks, results) -> None:
    """A forked worker: build sources from the shared queue until it is empty; report each."""
    while True:
        task = tasks.get()
        if task is None:
            return
        split, index, prefix, _ = task
        try:
            results.put(("ok", split, index, prefix, _build(cfg, tokenizer, dp_size, split, index)))
        except (DataError, ShardError, OSError) as err:
            results.put(("error", split, index, prefix, str(err)))
        except BaseException as err:  # a bug: say which source, then stop this worker
            results.put(("error", split, index, prefix, f"{type(err).__name__}: {err}"))
            return


def prepare(cfg: Config, tokenizer, dp_size: int, workers: int, log=print) -> dict[tuple[str, int], float]:
    """Build every source's index cache and shard record (``workers`` processes), then each split's
    blend; returns the seconds each source took. Raises the first error a source met."""
    from megatron_stablelm.data.datasets import build_datasets

    tasks = source_tasks(cfg, tokenizer, dp_size)
    seconds: dict[tuple[str, int], float] = {}
    start = time.perf_counter()
    if workers <= 1 or len(tasks) <= 1:
        for split, index, prefix, _ in tasks:
            seconds[(split, index)] = _build(cfg, tokenizer, dp_size, split, index)
            log(f"  {split} source {index} ({prefix}): {seconds[(split, index)]:.1f} s")
    else:
        # fork: the workers share the loaded config, tokenizer and megatron-core (no re-import)
        ctx = mp.get_context("fork")
        queue, results = ctx.Queue(), ctx.Queue()
        for task in tasks:
            queue.put(task)
        n = min(workers, len(tasks))
        for _ in range(n):
            queue.put(None)
        procs = [
            ctx.Process(target=_worker, args=(cfg, tokenizer, dp_size, queue, results)) for _ in range(n)
        ]
        for proc in procs:
            proc.start()
        errors = []
        try:
            for _ in tasks:
                while True:
                    try:
                        status, split, index, prefix, value = results.get(timeout=1.0)
                        break
                    except queue_module.Empty:
                        if not any(proc.is_alive() for proc in procs) and results.empty():
                            codes = [proc.exitcode for proc in procs]
                            raise RuntimeError(
                                f"the workers exited (codes {codes}) before every source was built"
                            ) from None
                if status == "error":
                    errors.append(value)
                    break
                seconds[(split, index)] = value
                log(f"  {split} source {index} ({prefix}): {value:.1f} s")
        finally:
            if errors:
                for proc in procs:
                    proc.terminate()
            for proc in procs:
                proc.join()
        if errors:
            raise DataError(errors[0])
        dead = [p.exitcode for p in procs if p.exitcode]
        if dead:
            raise RuntimeError(f"a worker exited with code {dead[0]}")
    log(f"per-source caches: {time.perf_counter() - start:.1f} s with {max(1, workers)} worker(s)")
    start = time.perf_counter()
    build_datasets(cfg, tokenizer, dp_size=dp_size)  # loads the sources, publishes the blends
    log(f"blends and final check: {time.perf_counter() - start:.1f} s")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: CPU count)")
    p.add_argument("--dp-size", type=int, default=None, help="the job's data-parallel size")
    p.add_argument("--data-root", default=None, help="resolve relative shard prefixes against this directory")
    args = parse_config_args(p, argv)
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
