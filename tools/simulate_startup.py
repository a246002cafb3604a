"""Simulate what a full-scale training run does before its first step, on synthetic shards.

    python tools/simulate_startup.py configs/data/stablelm-2-1_6b.yml --scale 0.1 \\
        [--total-tokens 2e12] [--epochs 2] [--seq-length 4096] [--global-batch 2048] \\
        [--work-dir /tmp/simulate_startup] [--scan-gb 2] [--prepare-workers N] [--keep]

Why: the start-up cost of a 2T-token, ~20-source mixture (every shard checked on every rank,
megatron-core's document/sample/shuffle index per source, the blended sample order) grows with the
number of documents and samples, and only shows at full scale, where a mistake costs a whole
cluster's time. Real shards of that size cannot be made on a workstation, but start-up reads only
the ``.idx`` files: this tool writes real megatron ``.idx`` files with realistic document-length
distributions and *sparse* ``.bin`` files of the right size (no disk blocks), then runs the real
code paths on them.

What it does:

1. Writes one shard per prefix of the data config (``data/<source>/<subset>`` under ``--work-dir``),
   holding ``scale x total_tokens x weight`` tokens in documents whose lengths are log-normal with a
   mean per kind of source (web ~700 tokens, books ~100k, arXiv ~12k, code ~1.8k; see
   :data:`DOC_LENGTHS`, assumptions, not measurements of the real corpora).
2. Runs, in a fresh process (one rank; peak RSS of that process is reported), what ``train.py``
   does before the first step: the start-up checks of every shard (``_check_shards``: constant time
   per shard), then ``build_datasets`` (``plan_splits``: the same checks, remembered, plus the full
   check of each shard unless its record in ``<cache>/shard-checks/`` is current; one megatron-core
   ``GPTDataset`` per source with its index cache; the blended order with its cache) -- first with
   an empty cache (cold: rank 0 builds, each source on ``--build-workers`` processes, default every
   core, as ``train.py``'s rank 0 does), then again (warm: every rank loads). Phases are timed by
   wrapping the functions that do them, in that process only.
3. With ``--prepare-workers N``: empties the cache, runs ``tools/prepare_data_cache.py``'s
   ``prepare`` with N processes (the pre-job build), then one rank's start-up on what it built.
4. Times the token-id scan that the full check runs on every shard whose token dtype does not
   bound the ids (int32 shards of a >65,536-token vocabulary such as Arcade100k) on ``--scan-gb`` of
   sparse int32 data and extrapolates it linearly (it reads every byte once), and the same check
   once the shard has a record (what every later start pays). The index phases run on uint16
   shards with a 65,536-token vocabulary, where that scan is skipped, so the two costs are reported
   apart.

Samples: ``epochs x scale x total_tokens / seq_length``, rounded up to whole global batches. Run
at two scales to see how each phase grows (the costs are linear in documents and samples; the
tool prints per-phase cost per million samples so runs at different scales compare). Everything
is written under ``--work-dir`` and deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from collections import OrderedDict

import numpy as np

# Mean tokens per document and log-normal sigma per kind of source (matched on "<source>/<subset>",
# then "<source>"). Assumed typical values, not measured on the real corpora.
DOC_LENGTHS: dict[str, tuple[float, float]] = {
    "refinedweb": (700.0, 1.0),
    "culturax": (900.0, 1.0),
    "redpajama/c4": (480.0, 0.9),
    "redpajama/common_crawl": (1200.0, 1.1),
    "redpajama/arxiv": (12000.0, 0.8),
    "redpajama/book": (100000.0, 0.7),
    "redpajama/stackexchange": (600.0, 1.1),
    "redpajama/wikipedia": (750.0, 1.2),
    "redpajama/github": (1800.0, 1.3),
    "pile": (1500.0, 1.3),
    "starcoder": (1800.0, 1.3),
}
DEFAULT_DOC_LENGTH = (1000.0, 1.1)
_CHUNK_DOCS = 4_000_000


class SimTokenizer:
    """What ``build_datasets`` reads from a tokenizer: vocabulary size, EOD, pad, identifiers."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.eod, self.pad = vocab_size, vocab_size - 1, -1
        self.unique_identifiers = OrderedDict(cls="simulate_startup", vocab=vocab_size)


def doc_length_params(prefix: str) -> tuple[float, float]:
    """(mean tokens, sigma) for a ``.../<source>/<subset>`` prefix."""
    parts = prefix.replace(os.sep, "/").split("/")
    key2 = "/".join(parts[-2:])
    return DOC_LENGTHS.get(key2) or DOC_LENGTHS.get(parts[-2] if len(parts) > 1 else "", DEFAULT_DOC_LENGTH)


def synthetic_lengths(tokens: int, mean: float, sigma: float, seed: int) -> np.ndarray:
    """Log-normal document lengths (int32, >= 1) that add up to exactly ``tokens``."""
    rng = np.random.default_rng(seed)
    mu = math.log(mean) - sigma * sigma / 2
    chunks, total = [], 0
    while total < tokens:
        n = int(min(_CHUNK_DOCS, max(16, 1.2 * (tokens - total) / mean)))
        part = np.clip(rng.lognormal(mu, sigma, size=n), 1, 2_000_000).astype(np.int32)
        cum = np.cumsum(part, dtype=np.int64) + total
        stop = int(np.searchsorted(cum, tokens))
        if stop < n:  # the document that crosses the target is cut to end exactly on it
            part = part[: stop + 1]
            part[-1] -= int(cum[stop] - tokens)
            part = part[part > 0]
        chunks.append(part)
        total += int(part.sum(dtype=np.int64))
    return np.concatenate(chunks)


def write_sparse_shard(prefix: str, lengths: np.ndarray, dtype: type[np.number]) -> None:
    """A megatron ``.idx`` for ``lengths`` (one document per sequence) and a sparse ``.bin`` of the
    size it describes: no disk blocks, reads return zeros (token id 0).

    The ``.idx`` is written here with numpy in megatron-core's format (its header constants) rather
    than with its ``_IndexWriter``, whose sequence pointers come from a Python loop: minutes for
    the 10^8 documents of a 1/10-scale mixture. ``check_shard`` verifies the result as it would a
    real shard."""
    import struct

    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    n = int(lengths.size)
    itemsize = np.dtype(dtype).itemsize
    step = 1 << 24
    with open(prefix + ".idx", "wb") as f:
        f.write(_INDEX_HEADER + struct.pack("<Q", 1) + struct.pack("<B", DType.code_from_dtype(dtype)))
        f.write(struct.pack("<Q", n) + struct.pack("<Q", n + 1))
        f.write(np.ascontiguousarray(lengths, dtype=np.int32).tobytes())
        offset = 0
        for i in range(0, n, step):  # pointers: exclusive prefix sums of the byte lengths
            part = lengths[i : i + step].astype(np.int64) * itemsize
            ends = np.cumsum(part) + offset
            f.write((ends - part).tobytes())
            offset = int(ends[-1])
        for i in range(0, n + 1, step):  # the document index: one sequence per document
            f.write(np.arange(i, min(i + step, n + 1), dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum(dtype=np.int64)) * itemsize)


def _peak_rss_gib() -> float:
    """This process's peak resident memory (``VmHWM``: per address space, so a fresh process
    starts from zero, unlike ``ru_maxrss``, which a child inherits from its parent)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rank_run(spec_path: str) -> dict:
    """One rank's start-up, in this (fresh) process: train.py's shard checks, then build_datasets,
    each phase timed by wrapping the function that does it."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    import megatron_stablelm.data.datasets as datasets_mod
    from megatron_stablelm.config import Config
    from megatron_stablelm.data.index_cache import CheckedBlendedDataset, CheckedGPTDataset
    from megatron_stablelm.data.indexed import check_shard

    t_import = time.perf_counter() - t0
    rss_after_import = _peak_rss_gib()
    timers: dict[str, float] = {
        "plan_splits shard checks": 0.0,
        "per-source index": 0.0,
        "blended index": 0.0,
    }

    per_source: list[float] = []

    def timed(name, fn, each=None):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers[name] += time.perf_counter() - start
                if each is not None:
                    each.append(time.perf_counter() - start)

        return wrapper

    originals = (
        datasets_mod.plan_splits,
        CheckedGPTDataset._build_document_sample_shuffle_indices,
        CheckedBlendedDataset._build_indices,
    )
    datasets_mod.plan_splits = timed("plan_splits shard checks", datasets_mod.plan_splits)
    CheckedGPTDataset._build_document_sample_shuffle_indices = timed(
        "per-source index", CheckedGPTDataset._build_document_sample_shuffle_indices, per_source
    )
    CheckedBlendedDataset._build_indices = timed("blended index", CheckedBlendedDataset._build_indices)

    CheckedGPTDataset.build_workers = spec.get("build_workers")
    try:
        cfg = Config(**spec["config"])
        tok = SimTokenizer(spec["vocab_size"])
        start = time.perf_counter()
        for prefix in cfg.train_data_paths:  # train.py's _check_shards: the start-up check
            check_shard(prefix, tok.vocab_size, scan_tokens=False)
        t_checks = time.perf_counter() - start
        start = time.perf_counter()
        ds = datasets_mod.build_datasets(cfg, tok)
        t_build = time.perf_counter() - start
    finally:
        (
            datasets_mod.plan_splits,
            CheckedGPTDataset._build_document_sample_shuffle_indices,
            CheckedBlendedDataset._build_indices,
        ) = originals
    phases = {"train.py shard checks": t_checks, **timers}
    phases["other (open .idx, GPTDataset init)"] = t_build - sum(timers.values())
    return {
        "phases": phases,
        "per_source_s": per_source,
        "total": t_checks + t_build,
        "import_s": t_import,
        "samples": len(ds.train),
        "peak_rss_gib": _peak_rss_gib(),
        "rss_after_import_gib": rss_after_import,
    }


def _prepare_run(spec_path: str, workers: int) -> dict:
    """``tools/prepare_data_cache.py``'s build with ``workers`` processes, in this (fresh) process."""
    import importlib.util

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    from megatron_stablelm.config import Config

    tool_spec = importlib.util.spec_from_file_location(
        "prepare_data_cache",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_data_cache.py"),
    )
    tool = importlib.util.module_from_spec(tool_spec)
    tool_spec.loader.exec_module(tool)
    start = time.perf_counter()
    seconds = tool.prepare(
        Config(**spec["config"]), SimTokenizer(spec["vocab_size"]), 1, workers, log=lambda _: None
    )
    return {"wall_s": time.perf_counter() - start, "per_source_s": sorted(seconds.values())}


def _run_rank(spec_path: str, *extra: str) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--rank-run", spec_path, *extra],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_scan(work: str, gb: float) -> tuple[float, float]:
    """(GB/s of the token-id scan of an int32 shard's full check, seconds of the same check on a
    later start, when the shard's record is current). Sparse files: page-cache speed, an upper bound
    on the scan; real shards are read from storage."""
    from megatron_stablelm.data import indexed

    tokens = int(gb * 1e9 / 4)
    lengths = np.full(tokens // 4096, 4096, dtype=np.int32)
    prefix = os.path.join(work, "scan", "int32")
    records = os.path.join(work, "scan", "cache")
    write_sparse_shard(prefix, lengths, np.int32)
    start = time.perf_counter()
    indexed.check_shard(prefix, 100_289, scan_tokens=False)
    t_header = time.perf_counter() - start
    start = time.perf_counter()
    indexed.check_shard(prefix, 100_289, scan_tokens=True, record_dir=records)
    t_scan = time.perf_counter() - start
    indexed._QUICK.clear()  # a new start: only the record remembers the scan
    indexed._VERIFIED.clear()
    start = time.perf_counter()
    indexed.check_shard(prefix, 100_289, scan_tokens=True, record_dir=records)
    t_again = time.perf_counter() - start
    shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)
    return lengths.size * 4096 * 4 / 1e9 / max(t_scan - t_header, 1e-9), t_again


def _format_table(cold: dict, warm: dict) -> str:
    rows = [
        "| phase | cold (s) | warm (s) | cold s / M samples | warm s / M samples |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    m = cold["samples"] / 1e6
    for name in cold["phases"]:
        c, w = cold["phases"][name], warm["phases"][name]
        rows.append(f"| {name} | {c:.2f} | {w:.2f} | {c / m:.3f} | {w / m:.3f} |")
    rows.append(
        f"| **total before the first step** | **{cold['total']:.2f}** | **{warm['total']:.2f}** | "
        f"{cold['total'] / m:.3f} | {warm['total'] / m:.3f} |"
    )
    rows.append(
        f"| peak RSS of the rank (GiB) | {cold['peak_rss_gib']:.2f} | {warm['peak_rss_gib']:.2f} | | |"
    )
    rows.append(
        f"| of which imports (GiB) | {cold['rss_after_import_gib']:.2f} | {warm['rss_after_import_gib']:.2f} | | |"
    )
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_config", nargs="?", help="a configs/data/*.yml file (paths and weights)")
    p.add_argument("--scale", type=float, default=0.1, help="fraction of --total-tokens to simulate")
    p.add_argument("--total-tokens", type=float, default=2e12, help="tokens on disk at full scale")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the data the run makes")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=2048)
    p.add_argument("--work-dir", default="/tmp/simulate_startup")
    p.add_argument("--scan-gb", type=float, default=2.0, help="sparse int32 GB to time the token-id scan on")
    p.add_argument(
        "--prepare-workers",
        type=int,
        default=0,
        help="also time tools/prepare_data_cache.py with N processes",
    )
    p.add_argument(
        "--build-workers",
        type=int,
        default=None,
        help="processes per source in the cold start (default: every core, as train.py's rank 0)",
    )
    p.add_argument("--keep", action="store_true", help="keep the synthetic shards and caches")
    p.add_argument("--rank-run", help=argparse.SUPPRESS)
    p.add_argument("--prepare-run", type=int, default=0, help=argparse.SUPPRESS)
    return p


def read_mixture(data_config: str) -> tuple[list[str], list[float]]:
    """The data config's ``train_data_paths`` and their weights (1 each when it gives none);
    ConfigError naming the file when it has no paths or a weight count that does not match."""
    from megatron_stablelm.config import ConfigError
    from megatron_stablelm.config.loading import read_yaml

    data = read_yaml(data_config)
    paths = data.get("train_data_paths")
    if not paths:
        raise ConfigError(f"'{data_config}' has no train_data_paths")
    weights = data.get("train_data_weights") or [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ConfigError(f"'{data_config}': {len(weights)} train_data_weights for {len(paths)} paths")
    return paths, weights


def write_mixture(
    paths: list[str], weights: list[float], work: str, tokens_total: float, seq_length: int
) -> tuple[list[str], int]:
    """One sparse uint16 shard per path (under ``work`` unless absolute) holding its weight's share
    of ``tokens_total`` (at least one sample); (the shards' prefixes, their documents)."""
    total_w = float(sum(weights))
    prefixes, docs = [], 0
    for i, (path, w) in enumerate(zip(paths, weights)):
        prefix = path if os.path.isabs(path) else os.path.join(work, path)
        mean, sigma = doc_length_params(path)
        lengths = synthetic_lengths(max(int(tokens_total * w / total_w), seq_length), mean, sigma, seed=i)
        write_sparse_shard(prefix, lengths, np.uint16)
        prefixes.append(prefix)
        docs += lengths.size
        del lengths
    return prefixes, docs


def run_spec(
    args: argparse.Namespace, prefixes: list[str], weights: list[float], work: str, iters: int
) -> dict:
    """What each rank process reads: the run's config (one GPU, ``--global-batch`` as accumulation),
    the tokenizer's size and the cold start's build workers."""
    return {
        "vocab_size": 65_536,  # uint16 ids are all < 65,536: plan_splits skips the id scan
        "build_workers": args.build_workers,
        "config": {
            "seq_length": args.seq_length,
            "train_iters": iters,
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": args.global_batch,
            "eval_iters": 0,
            "train_data_paths": prefixes,
            "train_data_weights": [float(w) for w in weights],
            "data_cache_dir": os.path.join(work, "index-cache"),
            "seed": 1234,
        },
    }


def report_cold_and_warm(spec_path: str, cache_dir: str) -> tuple[dict, dict]:
    """One rank's start-up on an empty cache, then again on what it built; the table printed."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    cold = _run_rank(spec_path)
    warm = _run_rank(spec_path)
    print(_format_table(cold, warm))
    slowest = max(cold["per_source_s"])
    print(
        f"per-source index builds (cold): sum {sum(cold['per_source_s']):.1f} s, slowest source "
        f"{slowest:.1f} s"
    )
    print(f"(imports before the timed phases: cold {cold['import_s']:.1f} s, warm {warm['import_s']:.1f} s)")
    return cold, warm


def report_prepared(spec_path: str, cache_dir: str, workers: int) -> dict:
    """tools/prepare_data_cache.py's build on an empty cache, then one rank's start-up on it."""
    shutil.rmtree(cache_dir, ignore_errors=True)
    prep = _run_rank(spec_path, "--prepare-run", str(workers))
    after = _run_rank(spec_path)
    print(
        f"tools/prepare_data_cache.py with {workers} workers: {prep['wall_s']:.1f} s "
        f"(slowest source {max(prep['per_source_s']):.1f} s); the start after it: "
        f"{after['total']:.2f} s (per-source index {after['phases']['per-source index']:.2f} s, "
        f"blend {after['phases']['blended index']:.2f} s)"
    )
    return {"prepare": prep, "start": after}


def report_scan(work: str, scan_gb: float, total_tokens: float) -> None:
    """The token-id scan's speed on ``scan_gb`` of int32 data, extrapolated to the whole mixture."""
    rate, again = measure_scan(work, scan_gb)
    full_gb = total_tokens * 4 / 1e9
    print(
        f"token-id scan of int32 shards (Arcade100k-sized vocabularies): {rate:.2f} GB/s on sparse "
        f"files; the whole {total_tokens:,.0f}-token mixture is {full_gb:,.0f} GB -> "
        f"{full_gb / rate / 60:,.1f} min at that speed, once per shard version on one rank "
        f"(rank 0 or the prepare tool); a later start reads the record: {again * 1e3:.1f} ms per shard"
    )


def simulate(args: argparse.Namespace, paths: list[str], weights: list[float], work: str) -> None:
    """Steps 1 to 4 of the module docstring, in ``work``; the last line printed is the JSON of all."""
    tokens_total = args.scale * args.total_tokens
    t0 = time.perf_counter()
    prefixes, docs = write_mixture(paths, weights, work, tokens_total, args.seq_length)
    t_write = time.perf_counter() - t0
    samples = math.ceil(args.epochs * tokens_total / args.seq_length)
    iters = math.ceil(samples / args.global_batch)
    spec = run_spec(args, prefixes, weights, work, iters)
    spec_path = os.path.join(work, "spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    print(
        f"synthetic mixture: {len(prefixes)} shards, {tokens_total:,.0f} tokens, {docs:,} documents "
        f"(scale {args.scale:g} of {args.total_tokens:,.0f}); {iters:,} steps x {args.global_batch} = "
        f"{iters * args.global_batch:,} samples of {args.seq_length} ({args.epochs:g} epochs); written in "
        f"{t_write:.1f} s",
        flush=True,
    )
    cache_dir = spec["config"]["data_cache_dir"]
    cold, warm = report_cold_and_warm(spec_path, cache_dir)
    prepared = (
        report_prepared(spec_path, cache_dir, args.prepare_workers) if args.prepare_workers > 0 else None
    )
    if args.scan_gb > 0:
        report_scan(work, args.scan_gb, args.total_tokens)
    print(
        json.dumps({"scale": args.scale, "documents": docs, "cold": cold, "warm": warm, "prepared": prepared})
    )


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.rank_run and args.prepare_run:
        print(json.dumps(_prepare_run(args.rank_run, args.prepare_run)))
        return 0
    if args.rank_run:
        print(json.dumps(_rank_run(args.rank_run)))
        return 0
    if not args.data_config:
        p.error("a data config is required")
    if args.build_workers is not None and args.build_workers < 1:
        p.error("--build-workers must be at least 1")
    from megatron_stablelm.config import ConfigError

    try:
        paths, weights = read_mixture(args.data_config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)
    try:
        simulate(args, paths, weights, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
