"""Indexed shards (``PREFIX.bin`` / ``PREFIX.idx``): writing them safely and checking them up front.

The format is megatron-core's mmap indexed dataset, read and written by its own
``IndexedDataset`` / ``IndexedDatasetBuilder``. What this module adds is what megatron-core lacks for
us: its reader fails on a bad file with a bare ``assert`` (or not at all, for an ``.idx`` describing
more tokens than the ``.bin`` holds, which only surfaces as garbage or a crash mid-run), and its writer
writes straight to the final names.

Checking costs two levels, because a 2T-token mixture is ~10^9 documents and ~8 TB of ``.bin``:

* **The start-up check** (:func:`check_shard` with ``scan_tokens=False``; every rank, every start):
  constant time per shard. Both files exist; the ``.idx`` header (magic, version, dtype) and size;
  the ``.bin`` size equals what the *last* sequence pointer and length say
  (``pointers[-1] + lengths[-1] x itemsize``); the document index starts at 0 and ends at the number
  of sequences. An interrupted copy or write, a truncated file or an ``.idx`` of another ``.bin`` is
  caught here. The lengths stay a view of the memory-mapped ``.idx`` (no copy).
* **The full check** (:func:`verify_shard`, or ``check_shard`` with ``scan_tokens=True``): every
  sequence pointer against the lengths, the document index non-decreasing, and the largest token id
  (one read of the whole ``.bin``) against the vocabulary. It runs once per *version* of a shard:
  with a record directory its result is written to ``DIR/shard-checks/<hash of the path>.json``,
  keyed by the real path and the size, mtime, ctime and inode of both files, and a later check of an
  unchanged shard reads that record instead (a missing, unreadable or stale record means a full
  check). The files are stat-ed before and after each check: a shard that changes while it is being
  checked is refused, never recorded. A failed check is never recorded (the next start checks again).

Records are written atomically (a temporary file renamed into place) and hold only facts about the
shard, never code: an unreadable record is ignored. A record can make a check be skipped, so the
directory must be as trusted as the data (it is the index cache directory, which already is).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass

import numpy as np

__all__ = [
    "RECORD_SUBDIR",
    "TOKENS_SUFFIX",
    "private_directory",
    "ShardError",
    "ShardInfo",
    "ShardWriter",
    "check_shard",
    "shard_key",
    "write_token_stats",
    "token_dtype",
    "verify_shard",
]

logger = logging.getLogger(__name__)

# Where the full-check records live inside a record (index cache) directory, and their format.
RECORD_SUBDIR = "shard-checks"
RECORD_VERSION = 1


def _megatron_indexed():
    """megatron-core's indexed-dataset module, imported on first use: a missing or malformed shard is
    reported without paying for importing megatron-core (seconds)."""
    from megatron.core.datasets import indexed_dataset

    return indexed_dataset


class ShardError(ValueError):
    """A shard is missing or malformed; the message names the file."""


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 when every id fits, else int32 (the rule megatron-core's GPTDatasetConfig assumes)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


@dataclass(frozen=True)
class ShardInfo:
    """What a checked shard holds. megatron-core's ``GPTDataset`` samples *sequences* (its
    ``numel_low_level_dataset``), so splits and token counts are over sequences; ``num_documents``
    counts the document index's entries, which may be empty (Megatron-LM records an empty text as a
    document without a sequence) or hold several sentences (``--split-sentences``).
    ``sequence_lengths`` is a read-only view of the memory-mapped ``.idx``; ``key`` the
    :func:`shard_key` the start-up check saw."""

    prefix: str
    dtype: type[np.number]
    num_sequences: int
    num_documents: int
    num_tokens: int
    sequence_lengths: np.ndarray  # one entry per sequence
    key: dict | None = None


def _file_key(path: str) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def shard_key(prefix: str) -> dict:
    """What identifies one version of a shard: its real path and, for both files, size, mtime, ctime
    (which also moves when a copy restores an old mtime) and inode (a renamed-in replacement).
    Raises :class:`ShardError` if a file is missing."""
    try:
        return {
            "path": os.path.realpath(prefix),
            "idx": _file_key(prefix + ".idx"),
            "bin": _file_key(prefix + ".bin"),
        }
    except FileNotFoundError as err:
        raise ShardError(
            f"data shard file '{err.filename}' does not exist (data path prefix '{prefix}')"
        ) from None


# Per process: start-up checks and full checks already done, by shard key (a changed shard misses).
_QUICK: dict[str, ShardInfo] = {}
_VERIFIED: dict[str, dict] = {}


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


def check_shard(
    prefix: str, vocab_size: int | None = None, *, scan_tokens: bool = True, record_dir: str | None = None
) -> ShardInfo:
    """Check ``prefix.idx`` / ``prefix.bin``: the constant-time start-up check, then with
    ``scan_tokens`` the full check (:func:`verify_shard`: pointers, document index, every id <
    ``vocab_size``), once per shard version when ``record_dir`` is given.

    Raises :class:`ShardError` naming the file for: a missing file, a wrong magic header or version,
    an unknown dtype code, an index whose arrays run past the end of the ``.idx``, a ``.bin`` whose
    size is not what the ``.idx`` describes, a document index that does not run from 0 to the number
    of sequences, a shard that changed while being checked, and (full check) inconsistent pointers, a
    decreasing document index or a token id >= ``vocab_size``. Every other shard megatron-core's
    ``IndexedDataset`` reads is accepted, empty documents included. The start-up check is remembered
    per process by :func:`shard_key`, so checking the same shard again costs two ``stat`` calls.
    """
    key = shard_key(prefix)
    text = _key_text(key)
    info = _QUICK.get(text)
    if info is None or info.prefix != prefix:
        info = _quick_check(prefix, key)
        if _key_text(shard_key(prefix)) != text:
            raise ShardError(
                f"data shard '{prefix}' changed while it was being checked: is it still being written?"
            )
        _QUICK[text] = info
    if scan_tokens:
        verify_shard(info, vocab_size, record_dir)
    return info


def _quick_check(prefix: str, key: dict) -> ShardInfo:
    """The constant-time start-up check (see the module docstring)."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    idx_size, bin_size = key["idx"]["size"], key["bin"]["size"]
    with open(idx_path, "rb") as f:
        header = f.read(34)
    if len(header) < 34 or header[:9] != _megatron_indexed()._INDEX_HEADER:
        raise ShardError(
            f"'{idx_path}' is not a megatron indexed-dataset index (bad magic header {header[:9]!r}; "
            f"expected {_megatron_indexed()._INDEX_HEADER!r})"
        )
    (version,) = struct.unpack("<Q", header[9:17])
    if version != 1:
        raise ShardError(f"'{idx_path}': unsupported index version {version} (expected 1)")
    code = header[17]
    try:
        dtype = _megatron_indexed().DType.dtype_from_code(code)
    except ValueError:
        raise ShardError(f"'{idx_path}': unknown token dtype code {code}") from None
    n_seq, n_doc = struct.unpack("<QQ", header[18:34])
    expected_idx = 34 + n_seq * (4 + 8) + n_doc * 8
    if idx_size < expected_idx:
        raise ShardError(
            f"'{idx_path}' is truncated: its header announces {n_seq} sequences and {n_doc - 1} "
            f"documents ({expected_idx} bytes) but the file has {idx_size} bytes"
        )
    lengths, pointers, doc_idx = _index_arrays(idx_path, n_seq, n_doc)
    itemsize = np.dtype(dtype).itemsize
    described = int(pointers[-1]) + int(lengths[-1]) * itemsize if n_seq else 0
    if described != bin_size:
        raise ShardError(
            f"'{idx_path}' does not match '{bin_path}': the index describes {described // itemsize} tokens "
            f"of {np.dtype(dtype).name} ({described} bytes) but the .bin has {bin_size} bytes "
            f"(rewrite both with tools/preprocess_data.py)"
        )
    if n_doc == 0 or doc_idx[0] != 0 or doc_idx[-1] != n_seq:
        raise ShardError(f"'{idx_path}': the document index is inconsistent with {n_seq} sequences")
    return ShardInfo(prefix, dtype, n_seq, n_doc - 1, bin_size // itemsize, lengths, key)


def _index_arrays(idx_path: str, n_seq: int, n_doc: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lengths, pointers and document index as views of the memory-mapped ``.idx`` (nothing read)."""
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=34)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=34 + 4 * n_seq)
    doc_idx = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=34 + 12 * n_seq)
    return lengths, pointers, doc_idx


def _needs_scan(info: ShardInfo, vocab_size: int | None) -> bool:
    """Whether ids must be read: a vocabulary is given and the token dtype does not bound them."""
    if vocab_size is None or info.num_tokens == 0:
        return False
    return not (np.issubdtype(info.dtype, np.integer) and np.iinfo(info.dtype).max < vocab_size)


def record_path(record_dir: str, prefix: str) -> str:
    """The full-check record of the shard at ``prefix`` inside ``record_dir``."""
    digest = hashlib.sha256(os.path.realpath(prefix).encode("utf-8")).hexdigest()[:32]
    return os.path.join(record_dir, RECORD_SUBDIR, f"{digest}.json")


def _facts(info: ShardInfo) -> dict:
    return {
        "dtype": np.dtype(info.dtype).name,
        "num_sequences": info.num_sequences,
        "num_documents": info.num_documents,
        "num_tokens": info.num_tokens,
    }


def _usable(record: object, info: ShardInfo) -> bool:
    """Whether ``record`` is a full-check record of exactly this shard version."""
    return (
        isinstance(record, dict)
        and record.get("version") == RECORD_VERSION
        and record.get("key") == info.key
        and record.get("facts") == _facts(info)
        and (record.get("max_token") is None or isinstance(record.get("max_token"), int))
    )


def private_directory(directory: str, path: str | None = None) -> bool:
    """Whether only this user can have written ``directory`` (and ``path`` in it): both are this user's
    and the directory is not writable by group or others. A record or cache found elsewhere could
    have been planted, so it is not trusted."""
    uid = os.geteuid()
    try:
        dir_st = os.stat(directory)
        file_ok = path is None or os.lstat(path).st_uid == uid
    except OSError:
        return False
    return dir_st.st_uid == uid and not dir_st.st_mode & 0o022 and file_ok


def _read_record(record_dir: str, info: ShardInfo) -> dict | None:
    """The record of this shard version, if one exists in a private ``record_dir`` (a shared directory
    could hold a planted record that skips the check: there the check runs at every start)."""
    if not private_directory(record_dir, record_path(record_dir, info.prefix)):
        return None
    try:
        with open(record_path(record_dir, info.prefix), encoding="utf-8") as f:
            record = json.loads(f.read(1 << 16))
    except (OSError, ValueError):
        return None
    return record if _usable(record, info) else None


def _write_record(record_dir: str, record: dict) -> None:
    """Publish ``record`` atomically; a directory that cannot be written only costs the next start a
    full check (a warning says so)."""
    path = record_path(record_dir, record["key"]["path"])
    if os.path.isdir(record_dir) and not private_directory(record_dir):
        logger.warning(
            "not recording the shard check in '%s': the directory is not private to this user (set "
            "data_cache_dir to a private directory to check each shard version once)",
            record_dir,
        )
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(record, f, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        logger.warning(
            "cannot record the shard check in '%s' (%s): the next start checks it again", path, err
        )


def verify_shard(
    info: ShardInfo, vocab_size: int | None, record_dir: str | None = None, *, trusted: dict | None = None
) -> dict:
    """The full check of a shard that passed the start-up check, once per shard version; returns its
    record (what another rank can be handed as ``trusted``).

    Order of trust: ``trusted`` (a record another rank made and sent), the record in ``record_dir``,
    this process's earlier check; each only if it is of this exact shard version (:func:`shard_key`
    at the start-up check) and covers the id scan when one is needed. Otherwise: the pointers against
    the lengths, the document index, and with ``vocab_size`` the largest token id; the result is
    recorded only if the files did not change meanwhile. Raises :class:`ShardError` naming the file.
    """
    if info.key is None:
        raise ValueError("verify_shard needs the ShardInfo of check_shard (it carries the shard key)")
    scan = _needs_scan(info, vocab_size)
    record = _known_record(info, vocab_size, record_dir, trusted)
    if record is None:
        old = _VERIFIED.get(_key_text(info.key)) or (_read_record(record_dir, info) if record_dir else None)
        if old is None:
            _full_structure_check(info)
        max_token = old["max_token"] if old is not None else None
        if scan:
            max_token = _max_token(info)
        if _key_text(shard_key(info.prefix)) != _key_text(info.key):
            raise ShardError(
                f"data shard '{info.prefix}' changed while it was being checked: is it still being written?"
            )
        record = {"version": RECORD_VERSION, "key": info.key, "facts": _facts(info), "max_token": max_token}
        if record_dir:
            _write_record(record_dir, record)
    _VERIFIED[_key_text(info.key)] = record
    max_token = record["max_token"]
    if scan and max_token >= vocab_size:
        raise ShardError(
            f"'{info.prefix}.bin' contains token id {max_token} >= the tokenizer's vocab size {vocab_size}: "
            f"the shard was made with another tokenizer"
        )
    return record


def _known_record(
    info: ShardInfo, vocab_size: int | None, record_dir: str | None, trusted: dict | None = None
) -> dict | None:
    """The record of this exact shard version that makes a full check unnecessary, if one exists
    (``trusted``, this process's earlier check, or ``record_dir``'s)."""
    scan = _needs_scan(info, vocab_size)
    for candidate in (
        trusted,
        _VERIFIED.get(_key_text(info.key)),
        _read_record(record_dir, info) if record_dir else None,
    ):
        if _usable(candidate, info) and not (scan and candidate["max_token"] is None):
            return candidate
    return None


def needs_full_check(info: ShardInfo, vocab_size: int | None, record_dir: str | None) -> bool:
    """Whether :func:`verify_shard` would read this shard (no current record of it)."""
    return _known_record(info, vocab_size, record_dir) is None


def _full_structure_check(info: ShardInfo) -> None:
    """Every sequence pointer against the lengths and the document index non-decreasing: linear in
    the number of documents, done in blocks so no whole-array temporaries are made."""
    idx_path = info.prefix + ".idx"
    n_seq = info.num_sequences
    lengths, pointers, doc_idx = _index_arrays(idx_path, n_seq, info.num_documents + 1)
    itemsize = np.dtype(info.dtype).itemsize
    step = 1 << 24
    if n_seq and pointers[0] != 0:
        raise ShardError(f"'{idx_path}': sequence pointers are inconsistent with the sequence lengths")
    for i in range(0, n_seq, step):
        block = lengths[i : i + step + 1]
        if np.any(block < 0) or np.any(
            np.diff(pointers[i : i + step + 1]) != block[:-1].astype(np.int64) * itemsize
        ):
            raise ShardError(f"'{idx_path}': sequence pointers are inconsistent with the sequence lengths")
    for i in range(0, len(doc_idx), step):
        if np.any(np.diff(doc_idx[i : i + step + 1]) < 0):
            raise ShardError(f"'{idx_path}': the document index is inconsistent with {n_seq} sequences")


TOKENS_SUFFIX = ".tokens.json"


def _content_key(prefix: str) -> dict:
    """Size and mtime of both files: what a copy that keeps times (``rsync -a``, ``cp -p``) preserves,
    unlike the inode and ctime of :func:`shard_key`."""
    return {
        k: {f: v for f, v in _file_key(f"{prefix}.{k}").items() if f in ("size", "mtime_ns")}
        for k in ("idx", "bin")
    }


def write_token_stats(prefix: str, max_token: int | None) -> None:
    """Beside a shard just written: its largest token id (``PREFIX.tokens.json``), so that the first
    full check of the shard (:func:`verify_shard`) need not read the whole ``.bin`` to learn it; at
    Stable LM 2 scale that read is terabytes. Written last, atomically; a write failure only costs
    that read."""
    path = prefix + TOKENS_SUFFIX
    record = {"version": 1, "key": _content_key(prefix), "max_token": max_token}
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(os.path.abspath(path)))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, sort_keys=True)
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("cannot write '%s' (%s): the first check of the shard reads its ids", path, err)


def _recorded_max_token(info: ShardInfo) -> int | None:
    """The largest id the shard's writer recorded (:func:`write_token_stats`), when the record is of
    these exact files (sizes and mtimes) and was written by the owner of the ``.bin``: anyone else
    could have planted it beside a shard they cannot change. None: read the ids."""
    path = info.prefix + TOKENS_SUFFIX
    try:
        if os.lstat(path).st_uid != os.stat(info.prefix + ".bin").st_uid:
            return None
        with open(path, encoding="utf-8") as f:
            record = json.loads(f.read(1 << 12))
        if record.get("version") != 1 or record.get("key") != _content_key(info.prefix):
            return None
    except (OSError, ValueError, AttributeError):
        return None
    value = record.get("max_token")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _max_token(info: ShardInfo) -> int:
    """The largest id in the ``.bin``: what its writer recorded beside it, else one sequential read
    (about a second per GB from the page cache)."""
    recorded = _recorded_max_token(info)
    if recorded is not None:
        return recorded
    data = np.memmap(info.prefix + ".bin", mode="r", dtype=info.dtype)
    step = 1 << 26
    try:
        return max(int(data[i : i + step].max()) for i in range(0, len(data), step))
    finally:
        del data


class ShardWriter:
    """Write one shard through megatron-core's ``IndexedDatasetBuilder``, under temporary names that
    are renamed to ``PREFIX.bin`` / ``PREFIX.idx`` only by :meth:`finalize`: an interrupted run never
    leaves a half-written shard under the final name (the ``.idx`` is renamed last, and readers
    check it against the ``.bin``). Documents are recorded as Megatron-LM's preprocessing records
    them: one sequence per non-empty document, none for an empty one, so the bytes are the same."""

    def __init__(self, prefix: str, vocab_size: int) -> None:
        self.prefix = prefix
        self.dtype = token_dtype(vocab_size)
        tag = f".tmp-{os.getpid()}"
        self._tmp_bin = prefix + ".bin" + tag
        self._tmp_idx = prefix + ".idx" + tag
        try:
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
            self._builder = _megatron_indexed().IndexedDatasetBuilder(self._tmp_bin, dtype=self.dtype)
        except OSError as err:
            raise ShardError(f"cannot write shard '{prefix}.bin': {err.strerror or err}") from None
        self.num_documents = 0
        self.num_tokens = 0

    def add_document(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids)
        self._builder.add_document(ids, [int(ids.size)] if ids.size else [])
        self.num_documents += 1
        self.num_tokens += int(ids.size)

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Many documents at once: ``flat`` holds their tokens back to back, ``lengths`` their sizes
        (0 for an empty document). The same bytes and index entries as one :meth:`add_document` per
        document, in one write instead of a Python call per document, which was the parent
        process's bottleneck in ``preprocess``."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size == 0:
            return
        builder = self._builder
        builder.data_file.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes(order="C"))
        base = len(builder.sequence_lengths)
        present = lengths > 0
        builder.sequence_lengths.extend(lengths[present].tolist())
        builder.document_indices.extend((base + np.cumsum(present)).tolist())
        self.num_documents += int(lengths.size)
        self.num_tokens += int(lengths.sum())

    def finalize(self) -> None:
        try:
            self._builder.finalize(self._tmp_idx)
            os.replace(self._tmp_bin, self.prefix + ".bin")
            os.replace(self._tmp_idx, self.prefix + ".idx")
        except OSError as err:
            raise ShardError(f"cannot write shard '{self.prefix}': {err.strerror or err}") from None

    def abort(self) -> None:
        """Remove the temporary files (on error or interrupt)."""
        self._builder.data_file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.remove(path)


def read_shard(prefix: str):
    """megatron-core's reader for a checked shard."""
    check_shard(prefix, scan_tokens=False)
    return _megatron_indexed().IndexedDataset(prefix, multimodal=False, mmap=True)
