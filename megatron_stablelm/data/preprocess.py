"""Tokenize corpora into indexed shards (the engine behind ``tools/preprocess_data.py``).

Inputs are read in order, in chunks of documents (256 documents or 1 MB of lines, one parquet batch),
so memory does not grow with the size of a file or of the corpus: a pool of worker processes parses
and tokenizes the chunks, at most ``2 × workers`` chunks are in flight, and the parent writes the
results, in input order, through :class:`~megatron_stablelm.data.pieces.StreamingShardWriter` (whose
index lives on disk, not in lists). Output names follow GPT-NeoX / Megatron:
``{output_prefix}_{key}_document.bin`` / ``.idx``, one sequence per non-empty document, EOD appended
with ``append_eod``. A document that tokenizes to nothing is recorded as Megatron-LM's
``tools/preprocess_data.py`` records it: a document without a sequence and without EOD (GPT-NeoX's
drops it; this is the only case where those two tools differ), so the shards are byte for byte
Megatron-LM's. An input with no tokens at all for a key is an error unless ``allow_empty``: a shard
without tokens cannot be trained on, and writing one would replace a good shard of that name.

Two drivers share the readers and workers:

* :func:`preprocess` — one pass, all inputs into one shard per key (the plain command line).
* :func:`preprocess_targets` / :func:`merge_targets` — the corpus recipes and ``--shard i/n``: one
  resumable piece per input file (see :mod:`megatron_stablelm.data.pieces`), pieces dealt round-robin
  to ``n`` independent jobs, then merged into one prefix per target.

Records can be selected by a metadata field (``Selection``: The Pile's ``meta.pile_set_name``);
``reader="datasets"`` reads each file through ``datasets.load_dataset(..., streaming=True)`` instead
of the built-in readers.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import itertools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from megatron_stablelm.data.indexed import TOKENS_SUFFIX, token_dtype
from megatron_stablelm.data.pieces import (
    PieceLock,
    StreamingShardWriter,
    merge_pieces,
    piece_is_done,
    remove_stale_temporaries,
    require_piece,
    write_marker,
)
from megatron_stablelm.tokenizers import Tokenizer, build_tokenizer

__all__ = [
    "READERS",
    "BadInputError",
    "PreprocessStats",
    "Selection",
    "Target",
    "expand_inputs",
    "merge_targets",
    "parse_shard",
    "preprocess",
    "preprocess_targets",
]

_CHUNK_DOCS = 256
_CHUNK_BYTES = 1 << 20
READERS = ("native", "datasets")
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".jsonl.zstd")


class BadInputError(ValueError):
    """A malformed input record; the message names the file and line (or row)."""


@dataclass
class PreprocessStats:
    """What a preprocessing run did, for its summary line and the tools' JSON output: totals over
    all inputs, the lines skipped as malformed, the records left out by a :class:`Selection`, the
    elapsed time, and each output's shard prefix."""

    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    skipped_lines: int = 0
    empty_documents: int = 0
    filtered_documents: int = 0
    seconds: float = 0.0
    pieces_done: int = 0
    pieces_skipped: int = 0
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class Selection:
    """Keep a record by the value of a (dotted) metadata field: in ``include`` when given, and not in
    ``exclude``. A record without the field is malformed (it names the file and line)."""

    field: str
    include: frozenset[str] | None = None
    exclude: frozenset[str] = frozenset()

    def keeps(self, value: object) -> bool:
        return (self.include is None or value in self.include) and value not in self.exclude

    def describe(self) -> dict:
        return {
            "field": self.field,
            "include": sorted(self.include) if self.include is not None else None,
            "exclude": sorted(self.exclude),
        }


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
# the worker) or "texts" (one list of values per column: the keys, then the selection field's top-level
# column when there is a selection, already read from a columnar source).
Chunk = tuple[str, int, str, list]


def _zstd_blocks(path: str) -> Iterator[bytes]:
    """The decompressed bytes of a .zst file, frame after frame, in blocks. A file that ends inside a
    frame (a half-downloaded file) is an error: zstandard's stream reader would end there silently."""
    import zstandard

    with open(path, "rb") as f:
        dobj, fed = zstandard.ZstdDecompressor().decompressobj(), False
        while raw := f.read(_CHUNK_BYTES):
            while raw:
                fed = True
                out = dobj.decompress(raw)
                if out:
                    yield out
                if not dobj.eof:
                    break
                raw = dobj.unused_data
                dobj, fed = zstandard.ZstdDecompressor().decompressobj(), False
        if fed and not dobj.eof:
            raise BadInputError(
                f"input '{path}' is truncated: it ends inside a zstd frame (a partial download?)"
            )


def _text_lines(path: str) -> Iterator[bytes]:
    """The lines of a .jsonl file, plain, gzip- or zstd-compressed, read in blocks."""
    if path.endswith((".zst", ".zstd")):
        rest = b""
        for block in _zstd_blocks(path):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield line + b"\n"
        if rest:
            yield rest
        return
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        yield from f


def _columns(keys: Sequence[str], select: Selection | None) -> list[str]:
    return list(keys) + ([select.field.split(".")[0]] if select is not None else [])


def _iter_chunks(
    path: str, keys: Sequence[str], select: Selection | None = None, reader: str = "native"
) -> Iterator[Chunk]:
    """The chunks of one input; any failure to read it (a truncated .zst, a corrupt parquet, a missing
    file) is a :class:`BadInputError` naming the file."""
    try:
        yield from _read_chunks(path, keys, select, reader)
    except BadInputError:
        raise
    except Exception as err:  # noqa: BLE001 -- zstandard, pyarrow and datasets have their own types
        raise BadInputError(f"input '{path}': cannot read it: {type(err).__name__}: {err}") from None


def _read_chunks(path: str, keys: Sequence[str], select: Selection | None, reader: str) -> Iterator[Chunk]:
    if reader == "datasets" and not os.path.isdir(path):
        yield from _iter_streaming_dataset(path, keys, select)
    elif os.path.isdir(path):
        yield from _iter_datasets_dir(path, keys, select)
    elif path.endswith(".parquet"):
        yield from _iter_parquet(path, keys, select)
    elif path.endswith(_JSONL_SUFFIXES):
        lines: list[bytes] = []
        first, size = 1, 0
        for line_no, line in enumerate(_text_lines(path), 1):
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


def _iter_parquet(path: str, keys: Sequence[str], select: Selection | None) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError types
        raise BadInputError(f"input '{path}': not a readable parquet file ({err})") from None
    columns = _columns(keys, select)
    missing = [k for k in columns if k not in pf.schema_arrow.names]
    if missing:
        raise BadInputError(f"input '{path}': no column {missing[0]!r} (columns: {pf.schema_arrow.names})")
    row = 1
    for batch in pf.iter_batches(batch_size=_CHUNK_DOCS, columns=columns):
        yield (path, row, "texts", [batch.column(k).to_pylist() for k in columns])
        row += batch.num_rows


def _iter_datasets_dir(path: str, keys: Sequence[str], select: Selection | None) -> Iterator[Chunk]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        raise BadInputError(
            f"input '{path}' is a DatasetDict ({', '.join(ds)}); give the directory of one split"
        )
    columns = _columns(keys, select)
    missing = [k for k in columns if k not in ds.column_names]
    if missing:
        raise BadInputError(f"input '{path}': no column {missing[0]!r} (columns: {ds.column_names})")
    row = 1
    for batch in ds.select_columns(columns).iter(batch_size=_CHUNK_DOCS):
        cols = [batch[k] for k in columns]
        yield (path, row, "texts", cols)
        row += len(cols[0])


def _iter_streaming_dataset(path: str, keys: Sequence[str], select: Selection | None) -> Iterator[Chunk]:
    """One local file through ``datasets.load_dataset(..., streaming=True)``: nothing is converted to
    Arrow on disk and batches are read as they are consumed, so memory stays at one batch."""
    import datasets

    if path.endswith(".parquet"):
        builder = "parquet"
    elif path.endswith(_JSONL_SUFFIXES):
        builder = "json"
    else:
        raise BadInputError(f"input '{path}': the datasets reader takes .parquet or .jsonl[.gz|.zst] files")
    columns = _columns(keys, select)
    ds = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True)
    row = 1
    for batch in ds.iter(batch_size=_CHUNK_DOCS):
        missing = [k for k in columns if k not in batch]
        if missing:
            raise BadInputError(f"input '{path}': no field {missing[0]!r} (fields: {sorted(batch)})")
        cols = [batch[k] for k in columns]
        yield (path, row, "texts", cols)
        row += len(cols[0])


# ----------------------------------------------------------------------------------------- workers
_TOKENIZER: Tokenizer | None = None
_DTYPE: type = np.int32  # the shard's token dtype (uint16 when the vocab fits), set per worker
_KEYS: tuple[str, ...] = ()
_APPEND_EOD = True
_SKIP_BAD = False
_SELECT: Selection | None = None


def _init_worker(
    tokenizer_type: str,
    vocab_file: str,
    keys: Sequence[str],
    append_eod: bool,
    skip_bad: bool,
    select: Selection | None = None,
) -> None:
    global _TOKENIZER, _KEYS, _APPEND_EOD, _SKIP_BAD, _DTYPE, _SELECT
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    _TOKENIZER = build_tokenizer(tokenizer_type=tokenizer_type, vocab_file=vocab_file)
    _DTYPE = token_dtype(_TOKENIZER.vocab_size)
    _KEYS, _APPEND_EOD, _SKIP_BAD, _SELECT = tuple(keys), append_eod, skip_bad, select


def _field(record: object, dotted: str) -> object:
    """``record["a"]["b"]`` for ``"a.b"``; KeyError naming the dotted field when absent."""
    value = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


# The result of one chunk: per key a flat id array and the document lengths; bytes read; bad lines;
# records left out by the selection; the error message of a malformed record.
Result = tuple[list[tuple[np.ndarray, np.ndarray]], int, int, int, str | None]


def _process_chunk(chunk: Chunk) -> Result:
    source, first, kind, payload = chunk
    nbytes, bad, filtered = 0, 0, 0
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
                if _SELECT is not None and not _SELECT.keeps(_field(record, _SELECT.field)):
                    filtered += 1
                    continue
                values = [record[k] for k in _KEYS]
                for k, v in zip(_KEYS, values):
                    if not isinstance(v, str):
                        raise ValueError(f"key {k!r} is {type(v).__name__}, not a string")
            except (ValueError, KeyError) as err:
                why = f"missing key {err}" if isinstance(err, KeyError) else str(err)
                if _SKIP_BAD:
                    bad += 1
                    continue
                return [], nbytes, bad, filtered, f"{source}:{first + offset}: malformed input line: {why}"
            for col, v in zip(cols, values):
                col.append(v)
    else:
        rows = range(len(payload[0])) if payload else range(0)
        if _SELECT is not None:
            top, _, rest = _SELECT.field.partition(".")
            keep = []
            for offset, value in enumerate(payload[-1]):
                try:
                    keep.append(_SELECT.keeps(_field(value, rest) if rest else value))
                except KeyError:
                    if not _SKIP_BAD:
                        return (
                            [],
                            nbytes,
                            bad,
                            filtered,
                            f"{source}: row {first + offset}: no field {_SELECT.field!r}",
                        )
                    bad += 1
                    keep.append(False)
            filtered = len(keep) - sum(keep) - bad
            rows = [i for i in rows if keep[i]]
        cols = []
        for key, values in zip(_KEYS, payload):
            col = []
            for offset in rows:
                v = values[offset]
                if not isinstance(v, str):
                    if _SKIP_BAD:
                        bad += 1
                        continue
                    return (
                        [],
                        nbytes,
                        bad,
                        filtered,
                        f"{source}: row {first + offset}: column {key!r} is not a string",
                    )
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
    return out, nbytes, bad, filtered, None


class _Pool:
    """Chunks processed in order with at most ``window`` in flight: ``multiprocessing.Pool.imap`` reads
    its whole input ahead when the readers outpace the tokenizers, so its memory grows with the corpus.
    One process (``workers == 1``) processes each chunk when it is submitted."""

    def __init__(self, workers: int, init_args: tuple) -> None:
        self.pool = None
        self.window = 2 * max(1, workers)
        if workers > 1:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
        else:
            _init_worker(*init_args)

    def ordered(self, items: Iterable[tuple]) -> Iterator[tuple]:
        """``items`` are tuples whose last element is a chunk (or None: passed through); yields them
        in order with the chunk replaced by its :data:`Result`."""
        pending: deque = deque()
        for item in items:
            *tag, chunk = item
            if chunk is None:
                pending.append((tag, None))
            elif self.pool is None:
                pending.append((tag, _process_chunk(chunk)))
            else:
                pending.append((tag, self.pool.apply_async(_process_chunk, (chunk,))))
            while len(pending) > self.window:
                yield self._resolve(pending.popleft())
        while pending:
            yield self._resolve(pending.popleft())

    @staticmethod
    def _resolve(entry: tuple) -> tuple:
        tag, result = entry
        return (*tag, result.get() if hasattr(result, "get") else result)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _raise_bad(error: str) -> None:
    raise BadInputError(error + " (use --skip-bad-lines to skip such lines)")


def _add_result(
    result: Result, keys: Sequence[str], writers: Mapping[str, StreamingShardWriter], stats: PreprocessStats
) -> None:
    """One chunk's documents to the writer of each key, counted in ``stats``; a malformed record in
    it raises (the workers report it instead of raising, so it surfaces in input order)."""
    if result[4]:
        _raise_bad(result[4])
    _count(stats, result)
    for key, (flat, lengths) in zip(keys, result[0]):
        writers[key].add_documents(flat, lengths)


def _count(stats: PreprocessStats, result: Result) -> None:
    per_key, nbytes, bad, filtered, _ = result
    stats.bytes += nbytes
    stats.skipped_lines += bad
    stats.filtered_documents += filtered
    if per_key:
        stats.documents += len(per_key[0][1])
        stats.empty_documents += sum(int(np.count_nonzero(lengths == 0)) for _, lengths in per_key)
        stats.tokens += sum(int(f.size) for f, _ in per_key)


# ----------------------------------------------------------------------------------------- one pass
def _name_inputs(files: Sequence[str]) -> str:
    """The inputs for a one-line message: the first three, then how many more."""
    named = ", ".join(repr(f) for f in files[:3])
    return named + (f" and {len(files) - 3} more" if len(files) > 3 else "") if files else "(none)"


def _open_writers(outputs: Mapping[str, str], dtype: type) -> dict[str, StreamingShardWriter]:
    """One writer per key; if one cannot be opened, the others' temporary files are removed."""
    writers: dict[str, StreamingShardWriter] = {}
    try:
        for k, prefix in outputs.items():
            writers[k] = StreamingShardWriter(prefix, dtype)
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
    select: Selection | None = None,
    reader: str = "native",
) -> PreprocessStats:
    """Tokenize ``inputs`` into ``{output_prefix}_{key}_document.{bin,idx}`` per key, in one pass.

    Raises :class:`BadInputError` (file and line) on a malformed record unless ``skip_bad_lines``, and
    (naming the inputs) when a key gets no tokens at all unless ``allow_empty``;
    :class:`~megatron_stablelm.data.indexed.ShardError` when the output cannot be written. On any
    error no output file is left behind and existing shards of the same name are untouched.
    """
    tokenizer = build_tokenizer(tokenizer_type=tokenizer_type, vocab_file=vocab_file)
    files = expand_inputs(inputs)
    keys = tuple(jsonl_keys)
    writers = _open_writers(
        {k: f"{output_prefix}_{k}_document" for k in keys}, token_dtype(tokenizer.vocab_size)
    )
    stats = PreprocessStats(outputs={k: w.prefix for k, w in writers.items()})
    pool = None
    bar = _Progress(progress, log_interval)
    t0 = time.perf_counter()
    try:
        pool = _Pool(workers, (tokenizer_type, vocab_file, keys, append_eod, skip_bad_lines, select))
        items = ((c,) for path in files for c in _iter_chunks(path, keys, select, reader))
        for (result,) in pool.ordered(items):
            _add_result(result, keys, writers, stats)
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
            pool.close()
        bar.close(stats, time.perf_counter() - t0)
    stats.seconds = time.perf_counter() - t0
    return stats


# ----------------------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class Target:
    """One merged output (per key) made from ``files``: a recipe's subset, or the plain command line's
    inputs under ``--shard``. ``root`` is the directory piece names are taken relative to."""

    name: str
    files: tuple[str, ...]
    outputs: Mapping[str, str]  # key -> final prefix
    root: str
    select: Selection | None = None

    def piece(self, key: str, path: str) -> str:
        """The piece prefix of one input file: ``FINAL.parts/<path relative to root, / as __>``."""
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.root))
        return os.path.join(self.outputs[key] + ".parts", rel.replace(os.sep, "__"))


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) → (i, n); ValueError naming the value otherwise. A SLURM array task passes
    ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 3/64") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def _settings(
    tokenizer_type: str, vocab_file: str, keys: Sequence[str], append_eod: bool, skip_bad: bool, t: Target
) -> dict:
    """What a piece's content depends on besides its input; a marker recording other settings is stale.
    The tokenizer is identified by its file's content, so jobs on nodes with their own copy agree."""
    return {
        "tokenizer": [tokenizer_type, _file_sha256(vocab_file)],
        "keys": list(keys),
        "append_eod": append_eod,
        "skip_bad_lines": skip_bad,
        "select": t.select.describe() if t.select is not None else None,
    }


@functools.lru_cache(maxsize=4)
def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _input_id(path: str) -> dict:
    st = os.stat(path)
    return {"input": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _target_digest(t: Target, settings: dict) -> str:
    """Identifies a merged output: its inputs (path, size, mtime) in order and the settings."""
    record = json.dumps([settings, [_input_id(f) for f in t.files]], sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()


def _target_done(t: Target, settings: dict) -> bool:
    digest = _target_digest(t, settings)
    return all(piece_is_done(prefix, {"digest": digest}) for prefix in t.outputs.values())


def preprocess_targets(
    targets: Sequence[Target],
    *,
    tokenizer_type: str,
    vocab_file: str,
    jsonl_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
    merge: bool = True,
    keep_parts: bool = False,
    skip_bad_lines: bool = False,
    allow_empty: bool = False,
    reader: str = "native",
    progress: bool = True,
    log_interval: int = 10000,
    log: Callable[[str], None] = print,
) -> PreprocessStats:
    """Tokenize every target's files as resumable pieces, this job's share of them, then (``merge``)
    join each target's pieces into its outputs.

    Pieces are numbered over all targets in order and piece ``j`` belongs to job ``j % n`` of
    ``shard=(i, n)``. A piece whose ``.done`` marker matches its input (path, size, mtime) and the
    settings is skipped, as is a whole target already merged from the same inputs: a re-run after a
    kill does only what is missing. Errors name the file (and line); pieces finished before the
    error keep their markers.
    """
    tokenizer = build_tokenizer(tokenizer_type=tokenizer_type, vocab_file=vocab_file)
    dtype = token_dtype(tokenizer.vocab_size)
    keys = tuple(jsonl_keys)
    stats = PreprocessStats(outputs={t.name: ", ".join(t.outputs.values()) for t in targets})
    settings = [_settings(tokenizer_type, vocab_file, keys, append_eod, skip_bad_lines, t) for t in targets]
    work = _pieces_to_do(targets, settings, keys, shard, stats, log)
    if len({t.select for t in targets}) > 1:
        raise ValueError("the targets of one run must share one selection (a recipe has one)")
    select = targets[0].select if targets else None
    bar = _Progress(progress, log_interval)
    t0 = time.perf_counter()
    pool = (
        _Pool(workers, (tokenizer_type, vocab_file, keys, append_eod, skip_bad_lines, select))
        if work
        else None
    )
    try:
        if pool is not None:
            _write_pieces(
                work, pool, keys, dtype, reader, stats, lambda: bar.update(stats, time.perf_counter() - t0)
            )
    finally:
        if pool is not None:
            pool.close()
        bar.close(stats, time.perf_counter() - t0)
    stats.seconds = time.perf_counter() - t0
    if merge:
        merge_targets(
            targets,
            tokenizer_type=tokenizer_type,
            vocab_file=vocab_file,
            jsonl_keys=keys,
            append_eod=append_eod,
            skip_bad_lines=skip_bad_lines,
            keep_parts=keep_parts,
            allow_empty=allow_empty,
            log=log,
        )
    return stats


# A piece to write: its target, its input file, and what its ``.done`` marker must record.
_Piece = tuple[Target, str, dict]


def _pieces_to_do(
    targets: Sequence[Target],
    settings: Sequence[dict],
    keys: Sequence[str],
    shard: tuple[int, int],
    stats: PreprocessStats,
    log: Callable[[str], None],
) -> list[_Piece]:
    """This job's share of the pieces (piece ``j``, numbered over all targets in order, belongs to
    job ``j % n`` of ``shard=(i, n)``), less those already done: every piece of a target merged from
    the same inputs and settings, and each piece whose markers match its input and the settings."""
    index, n_jobs = shard
    work: list[_Piece] = []
    job_number = 0
    for t, target_settings in zip(targets, settings):
        done = _target_done(t, target_settings)
        if done:
            log(f"{t.name}: already merged from these inputs ({', '.join(t.outputs.values())}); skipped")
        for path in t.files:
            mine = job_number % n_jobs == index
            job_number += 1
            if not mine or done:
                continue
            expected = {**target_settings, **_input_id(path)}
            if all(piece_is_done(t.piece(k, path), expected) for k in keys):
                stats.pieces_skipped += 1
            else:
                work.append((t, path, expected))
    if stats.pieces_skipped:
        log(f"{stats.pieces_skipped} pieces already done; {len(work)} to do")
    return work


def _piece_items(work: Sequence[_Piece], keys: Sequence[str], reader: str) -> Iterator[tuple]:
    """The pool's input: each piece's chunks tagged with its number, then an ``end`` item; a piece
    whose input is malformed ends the stream with an ``error`` item instead (raised in order, after
    the pieces before it were written)."""
    for j, (t, path, _) in enumerate(work):
        try:
            for chunk in _iter_chunks(path, keys, t.select, reader):
                yield ("chunk", j, chunk)
        except BadInputError as err:
            yield ("error", j, err, None)
            return
        yield ("end", j, None)


def _start_piece(
    t: Target, path: str, keys: Sequence[str], dtype: type, locks: list[PieceLock]
) -> dict[str, StreamingShardWriter]:
    """Writers of one piece (a key each), opened under its locks (added to ``locks``, so that the
    caller releases them however the piece ends) after what a killed writer left is removed."""
    for k in keys:
        locks.append(PieceLock(t.piece(k, path)).acquire())
    for k in keys:
        remove_stale_temporaries(t.piece(k, path))
    return _open_writers({k: t.piece(k, path) for k in keys}, dtype)


def _finish_piece(writers: Mapping[str, StreamingShardWriter], expected: dict) -> None:
    """Publish a complete piece: its files, then its ``.done`` marker (what a re-run checks)."""
    for writer in writers.values():
        writer.finalize()
    for writer in writers.values():
        record = {**expected, "tokens": writer.num_tokens, "documents": writer.num_documents}
        write_marker(writer.prefix + ".done", record)


def _write_pieces(
    work: Sequence[_Piece],
    pool: _Pool,
    keys: Sequence[str],
    dtype: type,
    reader: str,
    stats: PreprocessStats,
    progress: Callable[[], None],
) -> None:
    """Tokenize and write every piece of ``work`` in order, one at a time. On any error the piece
    being written is removed and its locks released; the pieces finished before it keep their
    markers."""
    writers: dict[str, StreamingShardWriter] = {}
    locks: list[PieceLock] = []
    current = -1
    try:
        for kind, j, *rest in pool.ordered(_piece_items(work, keys, reader)):
            t, path, expected = work[j]
            if j != current:
                current = j
                writers = _start_piece(t, path, keys, dtype, locks)
            if kind == "error":
                raise rest[0]
            if kind == "end":
                _finish_piece(writers, expected)
                writers = {}
                _release(locks)
                stats.pieces_done += 1
                continue
            _add_result(rest[0], keys, writers, stats)
            progress()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        _release(locks)
        raise


def merge_targets(
    targets: Sequence[Target],
    *,
    tokenizer_type: str,
    vocab_file: str,
    jsonl_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    skip_bad_lines: bool = False,
    keep_parts: bool = False,
    allow_empty: bool = False,
    log: Callable[[str], None] = print,
) -> None:
    """Join each target's pieces into its final prefix (atomically; ``.idx`` last) and leave a
    ``PREFIX.done`` marker, so that a re-run of any job skips the target. The settings must be those
    the pieces were made with. A missing, half-written or stale piece raises
    :class:`~megatron_stablelm.data.indexed.ShardError` naming it before anything is written; a target
    without any token raises :class:`BadInputError` unless ``allow_empty``. The pieces are deleted
    after a successful merge unless ``keep_parts``."""
    tokenizer = build_tokenizer(tokenizer_type=tokenizer_type, vocab_file=vocab_file)
    dtype = token_dtype(tokenizer.vocab_size)
    keys = tuple(jsonl_keys)
    jobs = []  # every piece is checked before anything is merged
    for t in targets:
        settings = _settings(tokenizer_type, vocab_file, keys, append_eod, skip_bad_lines, t)
        if _target_done(t, settings):
            continue
        digest = _target_digest(t, settings)
        for k in keys:
            pieces = [t.piece(k, path) for path in t.files]
            records = [require_piece(pc, {**settings, **_input_id(f)}) for f, pc in zip(t.files, pieces)]
            if sum(int(r.get("tokens", 0)) for r in records) == 0 and not allow_empty:
                raise BadInputError(
                    f"{t.name}: input {_name_inputs(t.files)}: no tokens for key {k!r}; nothing "
                    f"written (--allow-empty writes it anyway)"
                )
            jobs.append((t, t.outputs[k], pieces, digest))
    for t, final, pieces, digest in jobs:
        remove_stale_temporaries(final)
        writer = merge_pieces(pieces, final, dtype)
        record = {"digest": digest, "tokens": writer.num_tokens, "documents": writer.num_documents}
        write_marker(final + ".done", record)
        log(f"{t.name}: {final}.bin / .idx: {writer.num_documents:,} documents, {writer.num_tokens:,} tokens")
        if not keep_parts:
            _remove_parts(final + ".parts", pieces)


def _release(locks: list[PieceLock]) -> None:
    for lock in locks:
        lock.release()
    locks.clear()


def _remove_parts(directory: str, pieces: Sequence[str]) -> None:
    for piece in pieces:
        for ext in (".done", TOKENS_SUFFIX, ".idx", ".bin", ".lock"):
            if os.path.exists(piece + ext):
                os.remove(piece + ext)
    if os.path.isdir(directory) and not os.listdir(directory):
        os.rmdir(directory)


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
