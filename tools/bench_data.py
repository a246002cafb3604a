"""Data pipeline benchmark: preprocessing throughput and memory, index build time, loader samples/s.

    python tools/bench_data.py [--mb 50] [--workers 2] [--work-dir /tmp/bench_data]
    python tools/bench_data.py --only preprocess rss --rss-gb 0.1 1     # the preprocessing figures

1. Preprocessing a >= 50 MB jsonl corpus (the demo sources, repeated) with the demo tokenizer:
   the bare tokenizer (a single-process ``encode_batch`` loop over the same texts, with the JSON
   parsing: the floor) beside ``preprocess`` with 1..N workers, in MB/s and tokens/s per worker, the
   ratio bare/preprocess per worker (target <= 1.2), and the speed-up from 1 to N workers.
2. ``rss``: peak memory of ``tools/preprocess_data.py`` on jsonl inputs of each ``--rss-gb`` size
   (1 GB: the issue's figure), with the built-in reader and with ``--reader datasets``
   (``load_dataset(streaming=True)``): the largest process's peak RSS (``ru_maxrss``) and the sampled
   peak of the whole process tree. Memory that does not grow from 0.1 to 1 GB is bounded. The inputs
   are written under ``--work-dir`` and deleted afterwards.
3. Building the document/sample/shuffle indexes (megatron-core's GPTDataset, C++ helper) for 10^9
   tokens of synthetic document lengths (a sparse shard; nothing is read but the index).
4. Loader samples/s at seq 4096, micro-batch 8, with position ids, cu_seqlens and loss mask, from one
   process (num_workers=0) and with 2 workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _FakeTokenizer:
    """Just what the datasets need, for synthetic shards."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size, self.eod, self.pad = vocab_size, eod, -1
        self.unique_identifiers = OrderedDict(cls="bench", vocab=vocab_size)


def bench_preprocess(work: str, mb: float, max_workers: int) -> None:
    from megatron_stablelm.data.preprocess import preprocess
    from megatron_stablelm.tokenizers import build_tokenizer

    demo = _demo(work)
    docs = []
    for name in ("code", "prose"):
        with open(os.path.join(demo, f"{name}.jsonl"), encoding="utf-8") as f:
            docs.extend(json.loads(line)["text"] for line in f)
    corpus = os.path.join(work, "corpus.jsonl")
    size = 0
    with open(corpus, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            for d in docs:
                line = json.dumps({"text": d}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
    print(
        f"\n== preprocessing: {size / 1e6:.1f} MB jsonl corpus (MB/s: text bytes for the bare loop, jsonl bytes read for preprocess) =="
    )
    for kind, vocab in (("HFTokenizer", "tokenizer.json"), ("TiktokenTokenizer", "tokenizer.tiktoken")):
        vocab = os.path.join(demo, vocab)
        tok = build_tokenizer(tokenizer_type=kind, vocab_file=vocab)
        t0 = time.perf_counter()
        n_tok = n_bytes = 0
        with open(corpus, encoding="utf-8") as f:
            batch = []
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == 256:
                    n_tok += sum(map(len, tok.encode_batch(batch)))
                    n_bytes += sum(len(t.encode()) for t in batch)
                    batch = []
            n_tok += sum(map(len, tok.encode_batch(batch)))
            n_bytes += sum(len(t.encode()) for t in batch)
        dt = time.perf_counter() - t0
        bare_tps = n_tok / dt
        print(
            f"{kind:18s} bare tokenizer (1 process): {n_bytes / 1e6 / dt:7.2f} MB/s  {bare_tps:12,.0f} tokens/s"
        )
        per_worker = {}
        for w in range(1, max_workers + 1):
            stats = preprocess(
                [corpus],
                os.path.join(work, f"out_{kind}_{w}"),
                tokenizer_type=kind,
                vocab_file=vocab,
                workers=w,
                append_eod=False,  # the same tokens as the bare loop
                progress=False,
            )
            per_worker[w] = stats.tokens_per_s
            print(
                f"{kind:18s} preprocess workers={w}     : {stats.mb_per_s:7.2f} MB/s  {stats.tokens_per_s:12,.0f} "
                f"tokens/s  ({stats.mb_per_s / w:.2f} MB/s, {stats.tokens_per_s / w:,.0f} tokens/s per worker; "
                f"bare / per worker = {bare_tps / (stats.tokens_per_s / w):.2f}x in tokens/s)"
            )
            for ext in (".bin", ".idx"):
                os.remove(os.path.join(work, f"out_{kind}_{w}_text_document{ext}"))
        if max_workers > 1:
            print(
                f"{kind:18s} scaling 1 -> {max_workers} workers: {per_worker[max_workers] / per_worker[1]:.2f}x "
                f"(cpus: {os.cpu_count()}; the parent reads and writes, each worker parses and tokenizes)"
            )
    os.remove(corpus)


def _write_big_jsonl(path: str, gb: float, docs: list[str]) -> int:
    """``gb`` GB of jsonl: the demo documents over and over, each made distinct by a counter."""
    size, i = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < gb * 1e9:
            for d in docs:
                line = json.dumps({"text": f"{i} {d}"}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
                i += 1
    return size


_MAXRSS = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, rc)"
)


def bench_rss(
    work: str, sizes: list[float], workers: int, readers: list[str], tokenizer: str = "TiktokenTokenizer"
) -> None:
    """Peak RSS of ``tools/preprocess_data.py`` per input size and reader (see the module docstring)."""
    import psutil

    demo = _demo(work)
    docs = []
    for name in ("code", "prose"):
        with open(os.path.join(demo, f"{name}.jsonl"), encoding="utf-8") as f:
            docs.extend(json.loads(line)["text"] for line in f)
    tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "preprocess_data.py")
    print(f"\n== preprocessing memory: peak RSS by input size, {workers} workers, {tokenizer} ==")
    for gb in sizes:
        corpus = os.path.join(work, f"rss_{gb}gb.jsonl")
        size = _write_big_jsonl(corpus, gb, docs)
        try:
            for reader in readers:
                out = os.path.join(work, "rss_out")
                cmd = [sys.executable, tool, "--input", corpus, "--output-prefix", out, "--tokenizer-type"]
                vocab = os.path.join(
                    demo, "tokenizer.tiktoken" if tokenizer == "TiktokenTokenizer" else "tokenizer.json"
                )
                cmd += [tokenizer, "--vocab-file", vocab, "--append-eod"]
                cmd += ["--workers", str(workers), "--no-progress", "--reader", reader]
                wrapper = subprocess.Popen(
                    [sys.executable, "-c", _MAXRSS, *cmd], stdout=subprocess.PIPE, text=True
                )
                peak_tree, t0 = 0, time.perf_counter()
                root = psutil.Process(wrapper.pid)
                while wrapper.poll() is None:
                    try:
                        procs = root.children(recursive=True)
                        peak_tree = max(peak_tree, sum(p.memory_info().rss for p in procs))
                    except psutil.Error:
                        pass
                    time.sleep(0.2)
                dt = time.perf_counter() - t0
                lines = wrapper.stdout.read().splitlines()
                maxrss_kb, rc = (int(x) for x in lines[-1].split()[1:])
                summary = next((line for line in lines if "documents" in line), "")
                print(
                    f"{size / 1e9:5.2f} GB  reader={reader:8s}: largest process {maxrss_kb / 1024:7.1f} MB, "
                    f"tree sum (sampled; forked pages counted per process) {peak_tree / 2**20:7.1f} MB, {dt:6.1f} s  (exit {rc}; {summary})"
                )
                for ext in (".bin", ".idx"):
                    path = out + "_text_document" + ext
                    if os.path.exists(path):
                        os.remove(path)
        finally:
            os.remove(corpus)


def _demo(work: str) -> str:
    demo = os.path.join(work, "demo")
    if not os.path.exists(os.path.join(demo, "tokenizer.json")):
        make_demo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_demo_corpus.py")
        subprocess.run([sys.executable, make_demo, "--out", demo, "--max-mb", "4"], check=True)
    return demo


def _sparse_shard(prefix: str, lengths: np.ndarray) -> None:
    """An index for ``lengths`` and a sparse .bin of the right size (uint16 zeros)."""
    from megatron.core.datasets.indexed_dataset import _IndexWriter

    with _IndexWriter(prefix + ".idx", np.uint16) as w:
        w.write(lengths, None, np.arange(len(lengths) + 1))
    with open(prefix + ".bin", "wb") as f:
        f.truncate(int(lengths.sum()) * 2)


def bench_index(work: str) -> None:
    from megatron_stablelm.config import Config
    from megatron_stablelm.data import build_datasets

    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.5, 1.2, size=1_600_000), 1, 200_000).astype(np.int32)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths, dtype=np.int64), 1_000_000_000)]
    prefix = os.path.join(work, "synthetic_1b")
    t0 = time.perf_counter()
    _sparse_shard(prefix, lengths)
    t_write = time.perf_counter() - t0
    seq = 4096
    n_tokens = int(lengths.sum())
    cfg = Config(
        seq_length=seq,
        train_iters=n_tokens // seq // 512,
        train_micro_batch_size_per_gpu=8,
        gradient_accumulation_steps=64,
        eval_iters=0,
        train_data_paths=[prefix],
        data_cache_dir=os.path.join(work, "index-cache"),
    )
    shutil.rmtree(cfg.data_cache_dir, ignore_errors=True)
    tok = _FakeTokenizer(65536, 65535)
    print(f"\n== index build: {n_tokens:,} tokens in {len(lengths):,} documents, seq {seq} ==")
    print(f"(synthetic shard written in {t_write:.1f}s)")
    t0 = time.perf_counter()
    ds = build_datasets(cfg, tok).train
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_datasets(cfg, tok)
    t_load = time.perf_counter() - t0
    print(f"document/sample/shuffle index build (cache miss): {t_build:6.2f} s for {len(ds):,} samples")
    print(f"same, loading the cached indexes (cache hit)    : {t_load:6.2f} s")


def bench_loader(work: str) -> None:
    from megatron_stablelm.config import Config
    from megatron_stablelm.data import build_data_iterators
    from megatron_stablelm.data.indexed import ShardWriter

    vocab, eod = 100289, 100257
    prefix = os.path.join(work, "loader_shard")
    rng = np.random.default_rng(0)
    writer = ShardWriter(prefix, vocab)
    lengths = np.clip(rng.lognormal(6.5, 1.2, size=60_000), 2, 100_000).astype(np.int64)
    for n in lengths:
        doc = rng.integers(0, eod, size=int(n))
        doc[-1] = eod
        writer.add_document(doc)
    writer.finalize()
    seq, micro = 4096, 8
    print(
        f"\n== loader: seq {seq}, micro-batch {micro}, {int(lengths.sum()):,}-token shard, reset_* + eod_mask_loss =="
    )
    cfg = Config(
        seq_length=seq,
        train_iters=400,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=1,
        eval_iters=0,
        train_data_paths=[prefix],
        data_cache_dir=os.path.join(work, "index-cache"),
        reset_position_ids=True,
        reset_attention_mask=True,
        eod_mask_loss=True,
    )
    tok = _FakeTokenizer(vocab, eod)
    for workers in (0, 2):
        it = build_data_iterators(cfg, tok, num_workers=workers, report=False).train
        next(it)
        n, t0 = 0, time.perf_counter()
        for batch in it:
            n += batch["tokens"].shape[0]
            if n >= 2400:
                break
        dt = time.perf_counter() - t0
        print(f"num_workers={workers}: {n / dt:9,.0f} samples/s  ({n * seq / dt / 1e6:.1f} M tokens/s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=50.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work-dir", default="/tmp/bench_data")
    sections = ["preprocess", "rss", "index", "loader"]
    p.add_argument("--skip", nargs="*", default=[], choices=sections)
    p.add_argument("--only", nargs="*", default=None, choices=sections, help="run only these sections")
    p.add_argument(
        "--rss-gb", nargs="+", type=float, default=[0.1, 1.0], help="input sizes of the rss section"
    )
    p.add_argument("--rss-readers", nargs="+", default=["native", "datasets"], choices=["native", "datasets"])
    p.add_argument(
        "--rss-tokenizer", default="TiktokenTokenizer", choices=["TiktokenTokenizer", "HFTokenizer"]
    )
    args = p.parse_args(argv)
    run = set(args.only if args.only is not None else sections) - set(args.skip)
    os.makedirs(args.work_dir, exist_ok=True)
    print(f"cpus: {os.cpu_count()}")
    if "preprocess" in run:
        bench_preprocess(args.work_dir, args.mb, args.workers)
    if "rss" in run:
        bench_rss(args.work_dir, args.rss_gb, args.workers, args.rss_readers, args.rss_tokenizer)
    if "index" in run:
        bench_index(args.work_dir)
    if "loader" in run:
        bench_loader(args.work_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
