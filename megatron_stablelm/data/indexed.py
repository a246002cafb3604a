"""Indexed shards (``PREFIX.bin`` / ``PREFIX.idx``): writing them safely and checking them up front.

The format is megatron-core's mmap indexed dataset, read and written by its own
``IndexedDataset`` / ``IndexedDatasetBuilder``. What this module adds is what megatron-core lacks for
us: its reader fails on a bad file with a bare ``assert`` (or not at all, for an ``.idx`` describing
more tokens than the ``.bin`` holds, which only surfaces as garbage or a crash mid-run), and its writer
writes straight to the final names. :func:`check_shard` reads only the header and the small index
arrays, so it is cheap enough to run on every rank before any index is built.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["ShardError", "ShardInfo", "ShardWriter", "check_shard", "token_dtype"]


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
    document without a sequence) or hold several sentences (``--split-sentences``)."""

    prefix: str
    dtype: type[np.number]
    num_sequences: int
    num_documents: int
    num_tokens: int
    sequence_lengths: np.ndarray  # one entry per sequence


def check_shard(prefix: str, vocab_size: int | None = None, *, scan_tokens: bool = True) -> ShardInfo:
    """Validate ``prefix.idx`` against ``prefix.bin``; optionally check every id is < ``vocab_size``.

    Raises :class:`ShardError` naming the file for: a missing file, a wrong magic header or version,
    an unknown dtype code, an index whose arrays run past the end of the ``.idx``, an ``.idx`` that
    does not describe the ``.bin`` byte for byte, a document index that is not a non-decreasing run
    from 0 to the number of sequences, and (``scan_tokens``) a token id >= ``vocab_size``. Every other
    shard megatron-core's ``IndexedDataset`` reads is accepted, empty documents included.
    The id scan reads the whole ``.bin`` once (about a second per GB from the page cache); the result
    is remembered per process, keyed by the file's path, size and mtime.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise ShardError(f"data shard file '{path}' does not exist (data path prefix '{prefix}')")
    idx_size = os.path.getsize(idx_path)
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
    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    lengths = np.frombuffer(mm, dtype=np.int32, count=n_seq, offset=34)
    pointers = np.frombuffer(mm, dtype=np.int64, count=n_seq, offset=34 + 4 * n_seq)
    doc_idx = np.frombuffer(mm, dtype=np.int64, count=n_doc, offset=34 + 12 * n_seq)
    itemsize = np.dtype(dtype).itemsize
    n_tokens = int(lengths.sum(dtype=np.int64))
    bin_size = os.path.getsize(bin_path)
    if n_tokens * itemsize != bin_size:
        raise ShardError(
            f"'{idx_path}' does not match '{bin_path}': the index describes {n_tokens} tokens of "
            f"{np.dtype(dtype).name} ({n_tokens * itemsize} bytes) but the .bin has {bin_size} bytes "
            f"(rewrite both with tools/preprocess_data.py)"
        )
    if n_seq and (pointers[0] != 0 or np.any(np.diff(pointers) != lengths[:-1].astype(np.int64) * itemsize)):
        raise ShardError(f"'{idx_path}': sequence pointers are inconsistent with the sequence lengths")
    if n_doc == 0 or doc_idx[0] != 0 or doc_idx[-1] != n_seq or np.any(np.diff(doc_idx) < 0):
        raise ShardError(f"'{idx_path}': the document index is inconsistent with {n_seq} sequences")
    fits = np.issubdtype(dtype, np.integer) and vocab_size is not None and np.iinfo(dtype).max < vocab_size
    if scan_tokens and vocab_size is not None and n_tokens and not fits:
        max_id = _max_token(bin_path, dtype, bin_size)
        if max_id >= vocab_size:
            raise ShardError(
                f"'{bin_path}' contains token id {max_id} >= the tokenizer's vocab size {vocab_size}: "
                f"the shard was made with another tokenizer"
            )
    return ShardInfo(prefix, dtype, n_seq, n_doc - 1, n_tokens, np.array(lengths))


_MAX_CACHE: dict[tuple[str, int, int], int] = {}


def _max_token(bin_path: str, dtype: type[np.number], size: int) -> int:
    st = os.stat(bin_path)
    key = (os.path.realpath(bin_path), size, st.st_mtime_ns)
    if key not in _MAX_CACHE:
        data = np.memmap(bin_path, mode="r", dtype=dtype)
        step = 1 << 26
        _MAX_CACHE[key] = max(int(data[i : i + step].max()) for i in range(0, len(data), step))
        del data
    return _MAX_CACHE[key]


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
