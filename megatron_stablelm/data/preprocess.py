"""Tokenize corpora into indexed shards (the engine behind ``tools/preprocess_data.py``).

Inputs are read in order, in chunks of documents; a pool of worker processes parses and tokenizes the
chunks and the parent writes the results, in input order, through megatron-core's
``IndexedDatasetBuilder`` (see :class:`~megatron_stablelm.data.indexed.ShardWriter`). Output names
follow GPT-NeoX / Megatron: ``{output_prefix}_{key}_document.bin`` / ``.idx``, one sequence per non-empty
document, EOD appended with ``append_eod``. A document that tokenizes to nothing is recorded as
Megatron-LM's ``tools/preprocess_data.py`` records it: a document without a sequence and without EOD
(GPT-NeoX's drops it; this is the only case where those two tools differ), so the shards are byte for
byte Megatron-LM's. An input with no tokens at all for a key is an error unless ``allow_empty``: a
shard without tokens cannot be trained on, and writing one would replace a good shard of that name.
"""

from __future__ import annotations

import glob
import gzip
import io
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from megatron_stablelm.data.indexed import ShardWriter, token_dtype
from megatron_stablelm.tokenizers import Tokenizer, build_tokenizer

__all__ = ["BadInputError", "PreprocessStats", "expand_inputs", "preprocess"]

_CHUNK_DOCS = 256
_CHUNK_BYTES = 1 << 20


class BadInputError(ValueError):
    """A malformed input record; the message names the file and line (or row)."""


@dataclass
class PreprocessStats:
    """What a preprocessing run did, for its summary line and the tools' JSON output: totals over
    all inputs, the lines skipped as malformed, the elapsed time, and each JSON key's shard prefix."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped_lines: int = 0
    empty_documents: int = 0
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


# ----------------------------------------------------------------------------------------- readers
def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files, globs and ``datasets`` directories, in the given order (globs sorted)."""
    out: list[str] = []
    for item in inputs:
        if os.path.isdir(item) or os.path.isfile(item):
            out.append(item)
            continue
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise FileNotFoundError(f"input '{item}' does not exist (and matches no file as a glob)")
        out.extend(matches)
    return out


# A chunk: (source, first line/row number, kind, payload) with kind "lines" (raw JSON lines, parsed in
# the worker) or "texts" (one list of texts per key, already extracted from a columnar source).
Chunk = tuple[str, int, str, list]


def _open_text_lines(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst") or path.endswith(".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _iter_chunks(path: str, keys: Sequence[str]) -> Iterator[Chunk]:
    if os.path.isdir(path):
        yield from _iter_datasets_dir(path, keys)
    elif path.endswith(".parquet"):
        yield from _iter_parquet(path, keys)
    elif any(
        path.endswith(s) for s in (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".jsonl.zstd")
    ):
        with _open_text_lines(path) as f:
            lines: list[bytes] = []
            first, size = 1, 0
            for line_no, line in enumerate(f, 1):
                lines.append(line)
                size += len(line)
                if len(lines) >= _CHUNK_DOCS or size >= _CHUNK_BYTES:
                    yield (path, first, "lines", lines)
                    lines, first, size = [], line_no + 1, 0
            if lines:
                yield (path, first, "lines", lines)
    else:
        raise BadInputError(
            f"input '{path}': unknown format (expected .jsonl, .jsonl.gz, .jsonl.zst, .parquet or a "
            f"directory saved by datasets)"
        )


def _iter_parquet(path: str, keys: Sequence[str]) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    missing = [k for k in keys if k not in pf.schema_arrow.names]
    if missing:
        raise BadInputError(f"input '{path}': no column {missing[0]!r} (columns: {pf.schema_arrow.names})")
    row = 1
    for batch in pf.iter_batches(batch_size=_CHUNK_DOCS, columns=list(keys)):
        cols = [batch.column(k).to_pylist() for k in keys]
        yield (path, row, "texts", cols)
        row += batch.num_rows


def _iter_datasets_dir(path: str, keys: Sequence[str]) -> Iterator[Chunk]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        raise BadInputError(
            f"input '{path}' is a DatasetDict ({', '.join(ds)}); give the directory of one split"
        )
    missing = [k for k in keys if k not in ds.column_names]
    if missing:
        raise BadInputError(f"input '{path}': no column {missing[0]!r} (columns: {ds.column_names})")
    row = 1
    for batch in ds.select_columns(list(keys)).iter(batch_size=_CHUNK_DOCS):
        cols = [batch[k] for k in keys]
        yield (path, row, "texts", cols)
        row += len(cols[0])


# ----------------------------------------------------------------------------------------- workers
_TOKENIZER: Tokenizer | None = None
_DTYPE: type = np.int32  # the shard's token dtype (uint16 when the vocab fits), set per worker
_KEYS: tuple[str, ...] = ()
_APPEND_EOD = True
_SKIP_BAD = False


def _init_worker(
    tokenizer_type: str, vocab_file: str, keys: Sequence[str], append_eod: bool, skip_bad: bool
) -> None:
    global _TOKENIZER, _KEYS, _APPEND_EOD, _SKIP_BAD, _DTYPE
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    _TOKENIZER = build_tokenizer(tokenizer_type=tokenizer_type, vocab_file=vocab_file)
    _DTYPE = token_dtype(_TOKENIZER.vocab_size)
    _KEYS, _APPEND_EOD, _SKIP_BAD = tuple(keys), append_eod, skip_bad


# The result of one chunk: per key a flat id array and the document lengths; bytes read; bad lines.
Result = tuple[list[tuple[np.ndarray, np.ndarray]], int, int, str | None]


def _process_chunk(chunk: Chunk) -> Result:
    source, first, kind, payload = chunk
    nbytes, bad = 0, 0
    if kind == "lines":
        cols: list[list[str]] = [[] for _ in _KEYS]
        for offset, raw in enumerate(payload):
            nbytes += len(raw)
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, got {type(record).__name__}")
                values = [record[k] for k in _KEYS]
                for k, v in zip(_KEYS, values):
                    if not isinstance(v, str):
                        raise ValueError(f"key {k!r} is {type(v).__name__}, not a string")
            except (ValueError, KeyError) as err:
                why = f"missing key {err}" if isinstance(err, KeyError) else str(err)
                if _SKIP_BAD:
                    bad += 1
                    continue
                return [], nbytes, bad, f"{source}:{first + offset}: malformed input line: {why}"
            for col, v in zip(cols, values):
                col.append(v)
    else:
        cols = []
        for key, values in zip(_KEYS, payload):
            col = []
            for offset, v in enumerate(values):
                if not isinstance(v, str):
                    if _SKIP_BAD:
                        bad += 1
                        continue
                    return [], nbytes, bad, f"{source}: row {first + offset}: column {key!r} is not a string"
                nbytes += len(v.encode("utf-8"))
                col.append(v)
            cols.append(col)
    out = []
    for col in cols:
        ids = _TOKENIZER.encode_batch(col)
        if _APPEND_EOD:
            for seq in ids:
                if seq:  # an empty document stays empty, as in Megatron-LM's preprocessing
                    seq.append(_TOKENIZER.eod)
        lengths = np.fromiter((len(s) for s in ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_DTYPE, count=int(lengths.sum()))
        out.append((flat, lengths))
    return out, nbytes, bad, None


# ----------------------------------------------------------------------------------------- driver
def _name_inputs(files: Sequence[str]) -> str:
    """The inputs for a one-line message: the first three, then how many more."""
    named = ", ".join(repr(f) for f in files[:3])
    return named + (f" and {len(files) - 3} more" if len(files) > 3 else "") if files else "(none)"


def _open_writers(output_prefix: str, keys: Sequence[str], vocab_size: int) -> dict[str, ShardWriter]:
    """One writer per key; if one cannot be opened, the others' temporary files are removed."""
    writers: dict[str, ShardWriter] = {}
    try:
        for k in keys:
            writers[k] = ShardWriter(f"{output_prefix}_{k}_document", vocab_size)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return writers


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    *,
    tokenizer_type: str,
    vocab_file: str,
    jsonl_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    log_interval: int = 10000,
    skip_bad_lines: bool = False,
    progress: bool = True,
    allow_empty: bool = False,
) -> PreprocessStats:
    """Tokenize ``inputs`` into ``{output_prefix}_{key}_document.{bin,idx}`` per key.

    Raises :class:`BadInputError` (file and line) on a malformed record unless ``skip_bad_lines``, and
    (naming the inputs) when a key gets no tokens at all unless ``allow_empty``;
    :class:`~megatron_stablelm.data.indexed.ShardError` when the output cannot be written. On any
    error no output file is left behind and existing shards of the same name are untouched.
    """
    tokenizer = build_tokenizer(tokenizer_type=tokenizer_type, vocab_file=vocab_file)
    files = expand_inputs(inputs)
    keys = tuple(jsonl_keys)
    writers = _open_writers(output_prefix, keys, tokenizer.vocab_size)
    stats = PreprocessStats(outputs={k: w.prefix for k, w in writers.items()})
    init_args = (tokenizer_type, vocab_file, keys, append_eod, skip_bad_lines)
    chunks = (c for path in files for c in _iter_chunks(path, keys))
    pool = None
    bar = _Progress(progress, log_interval)
    t0 = time.perf_counter()
    try:
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(
                workers, initializer=_init_worker, initargs=init_args
            )
            results = pool.imap(_process_chunk, chunks, chunksize=1)
        else:
            _init_worker(*init_args)
            results = map(_process_chunk, chunks)
        for per_key, nbytes, bad, error in results:
            if error:
                raise BadInputError(error + " (use --skip-bad-lines to skip such lines)")
            stats.bytes += nbytes
            stats.skipped_lines += bad
            for key, (flat, lengths) in zip(keys, per_key):
                stats.empty_documents += int(np.count_nonzero(lengths == 0))
                writers[key].add_documents(flat, lengths)
            stats.documents += len(per_key[0][1]) if per_key else 0
            stats.tokens += sum(int(f.size) for f, _ in per_key)
            bar.update(stats, time.perf_counter() - t0)
        for key, writer in writers.items():
            if writer.num_tokens == 0 and not allow_empty:
                raise BadInputError(
                    f"input {_name_inputs(files)}: no tokens for key {key!r} "
                    f"({writer.num_documents} documents); nothing written (--allow-empty writes it anyway)"
                )
        for writer in writers.values():
            writer.finalize()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close(stats, time.perf_counter() - t0)
    stats.seconds = time.perf_counter() - t0
    return stats


class _Progress:
    """A tqdm bar of documents with MB/s and tokens in its postfix (or nothing when disabled)."""

    def __init__(self, enabled: bool, interval: int) -> None:
        self.bar = None
        self.interval = max(1, interval)
        self.last = 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(unit=" docs", dynamic_ncols=True, file=sys.stderr)

    def update(self, stats: PreprocessStats, elapsed: float) -> None:
        if self.bar is None or stats.documents - self.last < self.interval:
            return
        self.bar.update(stats.documents - self.last)
        self.last = stats.documents
        self.bar.set_postfix_str(
            f"{stats.bytes / 1e6 / max(elapsed, 1e-9):.2f} MB/s, {stats.tokens:,} tokens", refresh=False
        )

    def close(self, stats: PreprocessStats, elapsed: float) -> None:
        if self.bar is not None:
            self.interval = 1
            self.update(stats, elapsed)
            self.bar.close()
