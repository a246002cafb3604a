"""Shards written in bounded memory, in resumable pieces, and merged into one prefix.

A corpus of thousands of files is tokenized as one *piece* per input file
(``PREFIX.parts/NAME.{bin,idx}`` plus a ``NAME.done`` marker), so that SLURM array tasks can share the
work and a killed job, re-run, redoes only the pieces without a valid marker. :func:`merge_pieces`
then joins the pieces, in order, into ``PREFIX.{bin,idx}``.

Why not megatron-core's ``IndexedDatasetBuilder`` here: it keeps every sequence length and document
boundary in Python lists (about 80 bytes per document, more while ``finalize`` builds the pointers),
so its memory grows with the corpus: gigabytes for a 50M-document subset, in ``add_index`` too.
:class:`StreamingShardWriter` appends the index arrays to side files instead and writes the ``.idx``
from them in fixed-size blocks; its memory does not depend on the shard's size. The bytes are
megatron-core's format exactly (tests compare them with the builder's, ``add_index`` included), and an
empty document is recorded as :class:`~megatron_stablelm.data.indexed.ShardWriter` records it: a
document without a sequence.

Publication is atomic: everything is written under ``.tmp-PID`` names and renamed into place when
complete; an older ``.idx`` of the same prefix is removed *before* the new ``.bin`` is renamed and
the new ``.idx`` is renamed last, so at no moment does a ``.bin``/``.idx`` pair exist that describes
an incomplete shard.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from megatron_stablelm.data.indexed import ShardError, check_shard, write_token_stats

__all__ = [
    "PieceLock",
    "StreamingShardWriter",
    "merge_pieces",
    "piece_is_done",
    "read_marker",
    "remove_stale_temporaries",
    "require_piece",
    "write_marker",
]

# megatron-core's index format (``indexed_dataset._INDEX_HEADER`` and ``DType``), spelled out so that
# writing a piece does not import megatron-core (seconds per process); tests check they agree.
INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
_BLOCK = 1 << 20  # index entries per block when writing the .idx (8 MB of int64)
_COPY = 16 << 20  # bytes per block when copying a piece's .bin


def _publish(tmp_bin: str, tmp_idx: str, prefix: str) -> None:
    """Rename a finished pair into place: the old ``.idx`` goes first, the new ``.idx`` comes last, so a
    kill at any point leaves either no pair or a complete one (readers need both files)."""
    for path in (tmp_bin, tmp_idx):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(prefix + ".idx"):
        os.remove(prefix + ".idx")
    os.replace(tmp_bin, prefix + ".bin")
    os.replace(tmp_idx, prefix + ".idx")


class StreamingShardWriter:
    """One shard under temporary names, with memory independent of its size.

    Tokens go straight to ``PREFIX.bin.tmp-PID``; sequence lengths and document boundaries are
    appended to two side files; :meth:`finalize` writes the ``.idx`` from them block by block and
    publishes the pair (see the module docstring). :meth:`abort` removes every temporary file."""

    def __init__(self, prefix: str, dtype: type[np.number]) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        tag = f".tmp-{os.getpid()}"
        self._tmp = {k: f"{prefix}.{k}{tag}" for k in ("bin", "idx", "lengths", "docs")}
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self.max_token = -1  # recorded beside the shard (indexed.write_token_stats)
        self._files: dict[str, Any] = {}
        try:
            os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
            for k in ("bin", "lengths", "docs"):
                self._files[k] = open(self._tmp[k], "wb")
        except OSError as err:
            self.abort()
            raise ShardError(f"cannot write shard '{prefix}.bin': {err.strerror or err}") from None
        self._files["docs"].write(np.zeros(1, np.int64).tobytes())

    def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Documents back to back in ``flat``, their sizes in ``lengths`` (0: an empty document, which
        gets a document entry but no sequence, as Megatron-LM writes it)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size == 0:
            return
        present = lengths > 0
        flat = np.ascontiguousarray(flat, dtype=self.dtype)
        if flat.size:
            self.max_token = max(self.max_token, int(flat.max()))
        self._files["bin"].write(flat.tobytes())
        self._files["lengths"].write(lengths[present].astype(np.int32).tobytes())
        self._files["docs"].write((self.num_sequences + np.cumsum(present, dtype=np.int64)).tobytes())
        self.num_sequences += int(present.sum())
        self.num_documents += int(lengths.size)
        self.num_tokens += int(lengths.sum())

    def add_shard(self, prefix: str) -> None:
        """Append a complete shard (its documents after the ones written so far), reading its index
        through a memory map and copying its ``.bin`` in blocks."""
        info = check_shard(prefix, scan_tokens=False)
        if np.dtype(info.dtype) != self.dtype:
            raise ShardError(
                f"'{prefix}.idx' holds {np.dtype(info.dtype).name} tokens, not {self.dtype.name}: "
                f"the pieces were made with different tokenizers"
            )
        n_seq, n_doc = info.num_sequences, info.num_documents + 1
        mm = np.memmap(prefix + ".idx", mode="r", dtype=np.uint8)
        for start in range(0, n_seq, _BLOCK):
            stop = min(n_seq, start + _BLOCK)
            block = np.frombuffer(mm, np.int32, count=stop - start, offset=34 + 4 * start)
            self._files["lengths"].write(block.tobytes())
        docs_at = 34 + 12 * n_seq
        for start in range(1, n_doc, _BLOCK):
            stop = min(n_doc, start + _BLOCK)
            block = np.frombuffer(mm, np.int64, count=stop - start, offset=docs_at + 8 * start)
            self._files["docs"].write((block + self.num_sequences).tobytes())
        del mm
        with open(prefix + ".bin", "rb") as f:  # copied in blocks, their largest id noted on the way
            while block := f.read(_COPY):
                ids = np.frombuffer(block, self.dtype)
                if ids.size:
                    self.max_token = max(self.max_token, int(ids.max()))
                self._files["bin"].write(block)
        self.num_sequences += n_seq
        self.num_documents += n_doc - 1
        self.num_tokens += info.num_tokens

    def finalize(self) -> None:
        """Write the ``.idx`` (header, lengths, byte pointers, document index) and publish the pair."""
        try:
            for f in self._files.values():
                f.close()
            itemsize = self.dtype.itemsize
            code = DTYPE_CODES[self.dtype.type]
            with open(self._tmp["idx"], "wb") as out:
                out.write(INDEX_HEADER)
                out.write(struct.pack("<Q", 1))
                out.write(struct.pack("<B", code))
                out.write(struct.pack("<Q", self.num_sequences))
                out.write(struct.pack("<Q", self.num_documents + 1))
                with open(self._tmp["lengths"], "rb") as f:
                    shutil.copyfileobj(f, out, _COPY)
                carry = 0
                with open(self._tmp["lengths"], "rb") as f:
                    while block := f.read(4 * _BLOCK):
                        lengths = np.frombuffer(block, np.int32).astype(np.int64) * itemsize
                        ends = np.cumsum(lengths) + carry
                        out.write((ends - lengths).tobytes())
                        carry = int(ends[-1])
                with open(self._tmp["docs"], "rb") as f:
                    shutil.copyfileobj(f, out, _COPY)
            _publish(self._tmp["bin"], self._tmp["idx"], self.prefix)
        except OSError as err:
            self.abort()
            raise ShardError(f"cannot write shard '{self.prefix}': {err.strerror or err}") from None
        self._remove(("lengths", "docs"))
        write_token_stats(self.prefix, self.max_token if self.num_tokens else None)

    def abort(self) -> None:
        """Close and remove every temporary file (on error or interrupt); published files stay."""
        for f in self._files.values():
            f.close()
        self._remove(tuple(self._tmp))

    def _remove(self, kinds: Sequence[str]) -> None:
        for k in kinds:
            if os.path.exists(self._tmp[k]):
                os.remove(self._tmp[k])


# ----------------------------------------------------------------------------------------- markers
def write_marker(path: str, record: Mapping[str, Any]) -> None:
    """Write a completion marker atomically (temporary name, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(record), f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_marker(path: str) -> dict[str, Any] | None:
    """The marker's record, or None when it is missing or unreadable (a piece to redo)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def piece_is_done(prefix: str, expected: Mapping[str, Any]) -> bool:
    """Whether the piece at ``prefix`` is complete for these inputs and settings: its marker exists,
    agrees with ``expected`` on every key given, and the shard matches the counts it recorded."""
    record = read_marker(prefix + ".done")
    if record is None or any(record.get(k) != v for k, v in expected.items()):
        return False
    try:
        info = check_shard(prefix, scan_tokens=False)
    except ShardError:
        return False
    return (info.num_tokens, info.num_documents) == (record.get("tokens"), record.get("documents"))


class PieceLock:
    """An exclusive lock on writing one piece (``PREFIX.lock``, ``flock``), held from before its stale
    temporaries are removed until its marker is written.

    Why: two jobs given the same ``--shard I/N`` (a requeued SLURM task whose first run still lives, a
    command started twice) would otherwise remove each other's live temporary files and fail midway.
    The second job now stops at once with an error naming the piece and the holder. A lock file left
    by a killed job holds no lock (the kernel releases it with the process), so a re-run proceeds.
    Where the filesystem has no ``flock`` (some Lustre mounts), the lock is skipped, as before."""

    def __init__(self, prefix: str) -> None:
        self.path = prefix + ".lock"
        self._file = None

    def acquire(self) -> PieceLock:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.close()  # no flock on this filesystem: go on unlocked
                return self
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise ShardError(
                f"piece '{self.path[: -len('.lock')]}' is being written by another job ({holder}; lock "
                f"'{self.path}'): is the same --shard running twice? Wait for it or stop it, then re-run"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock; the file stays (removing it would race)
            self._file = None


def remove_stale_temporaries(prefix: str) -> None:
    """Remove what a killed writer of ``prefix`` left (``PREFIX.*.tmp-PID``); only the job holding the
    piece's :class:`PieceLock` calls this, so no live writer's files are touched."""
    directory, base = os.path.split(os.path.abspath(prefix))
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith(base + ".") and ".tmp-" in name[len(base) :]:
            os.remove(os.path.join(directory, name))


# ----------------------------------------------------------------------------------------- merge
def require_piece(piece: str, expected: Mapping[str, Any]) -> dict[str, Any]:
    """The marker of a piece that is complete for ``expected`` (see :func:`piece_is_done`); otherwise
    :class:`ShardError` naming the piece: missing (never made), half-written (a job still running or
    killed) or not matching its marker (damaged, or made from other inputs or settings)."""
    record = read_marker(piece + ".done")
    if record is None:
        state = "half-written" if any(os.path.exists(piece + e) for e in (".bin", ".idx")) else "missing"
        raise ShardError(
            f"piece '{piece}.bin' is {state} (no '{piece}.done' marker): re-run the preprocessing job "
            f"that owns it, then merge again"
        )
    if not piece_is_done(piece, expected):
        raise ShardError(
            f"piece '{piece}.bin' does not match its marker '{piece}.done' (damaged, or made from other "
            f"inputs or with other settings): delete both and re-run the job that owns it"
        )
    return record


def merge_pieces(
    pieces: Sequence[str], prefix: str, dtype: type[np.number], *, expected: Mapping[str, Any] | None = None
) -> StreamingShardWriter:
    """Join complete pieces, in the given order, into ``prefix.{bin,idx}`` (atomically).

    Each piece must carry a ``.done`` marker agreeing with ``expected`` and match it: a piece without
    one (a job still running, killed, or never run) or a damaged one raises :class:`ShardError`
    naming the file, before anything is written. Returns the finished writer (its counts)."""
    for piece in pieces:
        require_piece(piece, expected or {})
    writer = StreamingShardWriter(prefix, dtype)
    try:
        for piece in pieces:
            writer.add_shard(piece)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return writer
