"""A source's document, sample and shuffle indexes, and the blend of sources, built in independent
pieces on many cores.

Why: a ``GPTDataset``'s three index arrays are what a cold start waits for. megatron-core draws them
from one random generator (a Fisher-Yates shuffle over all documents, then its C++ packing loop, then
a shuffle over all samples), so one source is one core's work: RefinedWeb in the Stable LM 2 mixture
(~10^9 documents read twice) takes minutes on one core while the node's other cores wait
(``tools/simulate_startup.py``). Here the same three arrays are defined so that every piece of them is
a function of the seed and the piece's number alone, and pieces run in ``workers`` processes.

**The order** (``SAMPLE_ORDER`` in :mod:`~megatron_stablelm.data.index_cache`):

* *Documents.* Each epoch is its own uniformly random permutation of the source's documents, drawn in
  two stages (a scatter shuffle): the documents are cut into chunks of :data:`CHUNK`; every document
  of chunk ``c`` draws a bucket in ``[0, B)`` (``B`` = number of chunks) from the generator of
  ``(seed, epoch, c)``; bucket ``b`` -- its documents in chunk order -- is then permuted by the
  generator of ``(seed, epoch, b)``, and the buckets are laid end to end. Independent uniform bucket
  draws followed by uniform permutations inside each bucket give a uniform permutation of the whole.
* *Samples.* Documents are packed into ``seq_length (+1)``-token samples exactly as megatron-core's C++
  helper packs them (``tests/test_sample_order.py`` compares the two on random inputs): sample ``k``
  starts at token ``k x seq_length`` of the concatenated epochs. Each bucket knows its first token
  (bucket token counts do not depend on the order inside buckets), so each packs its own samples.
* *Shuffle.* The samples that start in each epoch are permuted among themselves (the same two-stage
  permutation, seeded per epoch), epoch after epoch: the run reads a source one epoch at a time, no
  document repeats within an epoch (only the sample straddling two epochs mixes them), each epoch has
  its own order.

*The blend* of the sources (:func:`build_blend`) is in pieces too: sample ``k`` of source ``d`` is
due at ``(k + 0.5) / weight_d`` and the mixture takes samples in order of due time, where megatron-core
runs a one-core greedy loop over all samples.

Generators are numpy's legacy ``RandomState`` (MT19937), whose streams numpy keeps fixed across
versions, seeded with ``(seed, purpose, epoch, stage, piece)``; the result does not depend on
``workers``. Outputs are shared memory maps (files in the cache's staging directory, or anonymous
memory) that forked workers fill in place. ``fork`` is what PyTorch's ``DataLoader`` uses in training
processes too; the workers run numpy only.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from megatron_stablelm.data.errors import DataError

__all__ = [
    "CHUNK",
    "DocumentRange",
    "available_cores",
    "build_blend",
    "build_indices",
    "random_permutation",
    "sample_count",
]

# Documents (or samples) per chunk, and the mean bucket size: a bucket's permutation works in cache.
# Part of the order's definition: changing it changes every index (SAMPLE_ORDER must change with it).
CHUNK = 1 << 22
# Below this many document-index entries a build runs in this process: forking costs more.
_PARALLEL_MIN = 2 * CHUNK

# Purposes in the generator keys.
_DOCUMENTS, _SAMPLES = 1, 2
# Stages in the generator keys.
_SCATTER, _BUCKET = 0, 1


class DocumentRange:
    """The sequences ``[begin, end)`` of a shard, as a ``GPTDataset``'s ``indices``, never
    materialised unless an index is built.

    Why: megatron-core takes the sequences of a source as an array; at Stable LM 2 scale that is
    ~2.5 x 10^9 int32 (10 GB and seconds per rank) made at every start only to be measured when the
    caches are warm. ``len``, ``size`` and ``numpy.asarray`` (the array, made on demand) are what
    :class:`~megatron_stablelm.data.index_cache.CheckedGPTDataset` and the tests read.
    """

    def __init__(self, begin: int, end: int) -> None:
        self.begin, self.end = int(begin), int(end)

    def __len__(self) -> int:
        return self.end - self.begin

    @property
    def size(self) -> int:
        return len(self)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.arange(self.begin, self.end, dtype=dtype or np.int32)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which launchers and SLURM narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def sample_count(tokens: int, seq_length: int, drop_last: bool, add_extra_token: bool) -> int:
    """Samples megatron-core's packing makes of ``tokens`` (its C++ helper's formula, including its
    float32 rounding when the last partial sample is kept)."""
    extra = int(add_extra_token)
    if drop_last:
        return (tokens - extra) // seq_length
    return int(np.ceil(np.float32(tokens - extra) / np.float32(seq_length)))


# --------------------------------------------------------------------------------- the pieces
_GENERATOR = np.random.RandomState()  # re-seeded per piece: seeding is ~15x cheaper than creating one


def _rng(seed: int, *key: int) -> np.random.RandomState:
    """The generator of one piece, seeded with ``(seed, *key)`` (the same stream as a fresh
    ``RandomState`` with that seed; one per process, and pieces run one at a time in a process)."""
    _GENERATOR.seed(np.array([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, *key], dtype=np.uint32))
    return _GENERATOR


def _chunk(n: int, c: int) -> tuple[int, int]:
    return c * CHUNK, min(n, (c + 1) * CHUNK)


def _bucket_ids(seed: int, key: tuple[int, ...], n: int, c: int, buckets: int) -> np.ndarray:
    lo, hi = _chunk(n, c)
    dtype = np.uint16 if buckets <= 1 << 16 else np.uint32
    return _rng(seed, *key, _SCATTER, c).randint(0, buckets, hi - lo, dtype=dtype)


# The build in progress (inputs, output arrays), set before the workers fork: they inherit it, and
# the outputs are shared memory maps, so what a worker writes is what the parent sees.
_JOB: dict = {}


@dataclass(frozen=True)
class _Block:
    """One permutation: ``_JOB[target][out_base : out_base + n]`` = ``value_base + range(n)`` in the
    order of generator key ``key``; ``packs``: the items are documents whose samples are packed."""

    key: tuple[int, ...]
    target: str
    out_base: int
    n: int
    value_base: int
    packs: bool

    @property
    def buckets(self) -> int:
        return math.ceil(self.n / CHUNK)


def _count(block: _Block, c: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Chunk ``c``: how many of its items, and (when packing) how many tokens, each bucket gets."""
    ids = _bucket_ids(_JOB["seed"], block.key, block.n, c, block.buckets)
    counts = np.bincount(ids, minlength=block.buckets)
    tokens = None
    if block.packs:
        lengths = _JOB["lengths"](*_chunk(block.n, c))
        tokens = np.bincount(ids, weights=lengths, minlength=block.buckets).astype(np.int64)
    return counts, tokens


def _scatter(block: _Block, c: int, counts: np.ndarray, dest: np.ndarray) -> None:
    """Chunk ``c``: its items (and their lengths, into the scratch array) to each bucket's slot,
    after the parts of the chunks before it (``dest``), in chunk order."""
    ids = _bucket_ids(_JOB["seed"], block.key, block.n, c, block.buckets)
    order = np.argsort(ids, kind="stable")
    lo, hi = _chunk(block.n, c)
    values = order + (block.value_base + lo)
    out = _JOB[block.target]
    lengths = _JOB["lengths"](lo, hi)[order] if block.packs else None
    start = 0
    for b in np.flatnonzero(counts):
        k, at = int(counts[b]), int(dest[b])
        out[at : at + k] = values[start : start + k]
        if lengths is not None:
            local = at - block.out_base
            _JOB["scratch"][local : local + k] = lengths[start : start + k]
        start += k


def _permute_bucket(block: _Block, b: int, lo: int, hi: int, first_token: int) -> None:
    """Bucket ``b`` (``out[lo:hi]``): shuffle it in place; when packing, shuffle each document
    together with its length (one 64-bit word per document) and write the rows of the samples whose
    row falls on its documents (its first token is ``first_token`` of the concatenated epochs)."""
    if hi == lo:
        return
    generator = _rng(_JOB["seed"], *block.key, _BUCKET, b)
    items = _JOB[block.target][lo:hi]
    if not block.packs:
        generator.shuffle(items)
        return
    local = _JOB["scratch"][lo - block.out_base : hi - block.out_base]
    both = local.astype(np.uint64) << np.uint64(32)
    both |= items.astype(np.uint64)  # document ids are int32 >= 0
    generator.shuffle(both)
    items[:] = both & np.uint64(0xFFFFFFFF)
    _pack((both >> np.uint64(32)).astype(np.int64), lo, first_token, _JOB["rows"], _JOB["pack"])


def _pack(lengths: np.ndarray, position: int, first_token: int, rows: np.ndarray, pack: dict) -> None:
    """The sample-index rows of the samples whose row falls on these documents (``lengths``, at
    document-index ``position``, whose first token is ``first_token`` of the concatenated epochs).

    megatron-core's rule: row ``k`` is where sample ``k`` starts, token ``k x seq`` of the stream, as
    (document-index position, offset); the position is the first document whose end passes token
    ``k x seq + extra`` (``extra`` = 1 when samples carry one more token), so a start that falls on
    a document's end stays on that document with offset = its length.
    """
    seq, extra, last = pack["seq"], pack["extra"], pack["num_samples"]
    ends = np.cumsum(lengths, dtype=np.int64)
    ends += first_token
    k_lo = max(1, (first_token - extra) // seq + 1)
    k_hi = min(last, (int(ends[-1]) - extra) // seq)
    if k_hi < k_lo:
        return
    starts = np.arange(k_lo, k_hi + 1, dtype=np.int64) * seq
    j = np.searchsorted(ends, starts + extra, side="left")
    before = np.where(j > 0, ends[np.maximum(j - 1, 0)], first_token)
    rows[k_lo : k_hi + 1, 0] = j + position
    rows[k_lo : k_hi + 1, 1] = starts - before


# ------------------------------------------------------------------------------------ the runner
class _Runner:
    """Runs pieces in this process, or in ``workers`` processes forked once, on entry, after the
    job's inputs and outputs are in :data:`_JOB`."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Runner:
        if self.workers > 1:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("fork"))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None

    def map(self, fn: Callable, calls: list[tuple]) -> list:
        if self.pool is None or len(calls) <= 1:
            return [fn(*args) for args in calls]
        try:
            return list(self.pool.map(fn, *zip(*calls)))
        except BrokenProcessPool:
            raise DataError(
                f"a worker process building the data indexes died (killed: out of memory?) while "
                f"{self.workers} ran side by side; give fewer (tools/prepare_data_cache.py --workers N)"
            ) from None


def _permute(runner: _Runner, block: _Block, first_token: int = 0) -> None:
    """Run one permutation (see :class:`_Block` and the module docstring) in three stages: count
    each chunk's bucket draws, scatter the chunks into the buckets, permute (and pack) each bucket."""
    if block.n == 0:
        return
    chunks = range(block.buckets)
    counted = runner.map(_count, [(block, c) for c in chunks])
    counts = np.stack([c for c, _ in counted])  # [chunk, bucket]
    bucket_start = np.zeros(block.buckets + 1, dtype=np.int64)
    np.cumsum(counts.sum(axis=0), out=bucket_start[1:])
    bucket_start += block.out_base
    dest = bucket_start[None, :-1] + np.cumsum(counts, axis=0) - counts
    runner.map(_scatter, [(block, c, counts[c], dest[c]) for c in chunks])
    token_start = np.full(block.buckets, first_token, dtype=np.int64)
    if block.packs:
        tokens = np.stack([t for _, t in counted]).sum(axis=0)
        token_start[1:] += np.cumsum(tokens[:-1])
    calls = [(block, b, int(bucket_start[b]), int(bucket_start[b + 1]), int(token_start[b])) for b in chunks]
    runner.map(_permute_bucket, calls)


def random_permutation(n: int, seed: int, key: tuple[int, ...]) -> np.ndarray:
    """``range(n)`` in the order the two-stage draw gives for ``(seed, key)``, in this process (the
    documents of an epoch use ``key = (1, epoch)``, its samples ``(2, epoch)``)."""
    out = np.zeros(n, dtype=np.int64)
    _JOB.clear()
    _JOB.update(seed=seed, out=out)
    try:
        with _Runner(1) as runner:
            _permute(runner, _Block(tuple(key), "out", 0, n, 0, packs=False))
    finally:
        _JOB.clear()
    return out


def _first_row_at(rows: np.ndarray, num_samples: int, position: int) -> int:
    """The first of the first ``num_samples`` rows whose document position is >= ``position`` (a
    binary search that reads ~log2(rows) entries of a possibly memory-mapped column)."""
    lo, hi = 0, num_samples
    while lo < hi:
        mid = (lo + hi) // 2
        if int(rows[mid, 0]) < position:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _shared(shape: tuple[int, ...], dtype: type, path: str | None) -> np.ndarray:
    """A zeroed array that forked workers write into: a ``.npy`` memory map at ``path``, or anonymous
    shared memory."""
    if path is not None:
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    nbytes = max(1, math.prod(shape) * np.dtype(dtype).itemsize)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_SHARED)
    return np.frombuffer(buf, dtype=dtype, count=math.prod(shape)).reshape(shape)


def _length_reader(
    documents: DocumentRange | np.ndarray, sequence_lengths: np.ndarray
) -> tuple[int, int, Callable[[int, int], np.ndarray]]:
    """(documents, first sequence id, ``lengths(lo, hi)``: the lengths of documents ``[lo, hi)``). A
    :class:`DocumentRange` reads a slice of ``sequence_lengths``; an explicit array is gathered once."""
    if isinstance(documents, DocumentRange):
        n, first = len(documents), documents.begin

        def lengths(lo: int, hi: int) -> np.ndarray:
            return sequence_lengths[first + lo : first + hi]

        return n, first, lengths
    picked = sequence_lengths[documents]

    def picked_lengths(lo: int, hi: int) -> np.ndarray:
        return picked[lo:hi]

    return int(documents.size), 0, picked_lengths


def _index_arrays(
    n: int,
    num_epochs: int,
    num_samples: int,
    largest: int,
    paths: Sequence[str] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three zeroed outputs with megatron-core's dtypes (the sample index in int32 unless a
    position or an offset needs int64; the shuffle in uint32 unless the sample count needs int64)."""
    row_dtype = np.int32 if max(num_epochs * n, largest) <= np.iinfo(np.int32).max else np.int64
    shuffle_dtype = np.uint32 if num_samples < np.iinfo(np.uint32).max - 1 else np.int64
    doc_path, row_path, shuffle_path = paths if paths is not None else (None, None, None)
    return (
        _shared((num_epochs * n,), np.int32, doc_path),
        _shared((num_samples + 1, 2), row_dtype, row_path),
        _shared((num_samples,), shuffle_dtype, shuffle_path),
    )


def _fill_rows_past_the_end(
    documents: DocumentRange | np.ndarray,
    sequence_lengths: np.ndarray,
    document_index: np.ndarray,
    rows: np.ndarray,
    total: int,
    seq_length: int,
    extra: int,
) -> None:
    """The rows past the last token (the kept partial sample): megatron-core's helper stops on the
    last document, at its length minus the extra token."""
    k_first = max(1, (total - extra) // seq_length + 1)
    rows[k_first:, 0] = document_index.size - 1
    last = (
        int(document_index[-1])
        if isinstance(documents, DocumentRange)
        else int(documents[int(document_index[-1])])
    )
    rows[k_first:, 1] = int(sequence_lengths[last]) - extra


def _shuffle_epochs(runner: _Runner, rows: np.ndarray, num_samples: int, n: int, num_epochs: int) -> None:
    """Permute the samples that start in each epoch among themselves (row positions only move
    forward, so each epoch's samples are one range)."""
    bounds = [_first_row_at(rows, num_samples, e * n) for e in range(num_epochs)] + [num_samples]
    for epoch in range(num_epochs):
        lo, hi = bounds[epoch], bounds[epoch + 1]
        _permute(runner, _Block((_SAMPLES, epoch), "shuffle", lo, hi - lo, lo, packs=False))


def build_indices(
    documents: DocumentRange | np.ndarray,
    sequence_lengths: np.ndarray,
    seq_length: int,
    num_epochs: int,
    seed: int,
    *,
    drop_last_partial_sequence: bool = True,
    add_extra_token: bool = True,
    workers: int = 1,
    paths: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The document, sample and shuffle indexes of ``num_epochs`` epochs of ``documents`` (sequence
    ids into ``sequence_lengths``), as the module docstring defines them, with megatron-core's shapes
    and dtypes (int32 documents; a ``[num_samples + 1, 2]`` sample index in int32 unless its values
    need int64; a uint32 shuffle unless the sample count needs int64).

    ``workers`` processes build the pieces (the result does not depend on it). With ``paths`` (three
    ``.npy`` paths) the arrays are written there as memory maps and returned as such.
    """
    if not isinstance(documents, DocumentRange):
        documents = np.asarray(documents)
    n, first, lengths = _length_reader(documents, sequence_lengths)
    extra = int(add_extra_token)
    tokens_per_epoch = sum(
        int(lengths(lo, min(n, lo + CHUNK)).sum(dtype=np.int64)) for lo in range(0, n, CHUNK)
    )
    total = num_epochs * tokens_per_epoch
    num_samples = sample_count(total, seq_length, drop_last_partial_sequence, add_extra_token)
    largest = int(sequence_lengths.max()) if len(sequence_lengths) else 0
    document_index, rows, shuffle = _index_arrays(n, num_epochs, num_samples, largest, paths)
    workers = workers if num_epochs * n >= _PARALLEL_MIN else 1
    _JOB.clear()
    # plain ndarray views of the maps: numpy's fast in-place shuffle takes only exact ndarrays
    views = {
        name: np.asarray(a)
        for name, a in (("documents", document_index), ("rows", rows), ("shuffle", shuffle))
    }
    _JOB.update(seed=seed, lengths=lengths, **views)
    _JOB.update(
        scratch=_shared((n,), np.int32, None),
        pack={"seq": seq_length, "extra": extra, "num_samples": num_samples},
    )
    try:
        with _Runner(workers) as runner:
            for epoch in range(num_epochs):  # each epoch's documents, and the samples packed of them
                block = _Block((_DOCUMENTS, epoch), "documents", epoch * n, n, first, packs=True)
                _permute(runner, block, epoch * tokens_per_epoch)
            if not drop_last_partial_sequence and n and num_samples * seq_length + extra > total:
                _fill_rows_past_the_end(
                    documents, sequence_lengths, document_index, rows, total, seq_length, extra
                )
            _shuffle_epochs(runner, rows, num_samples, n, num_epochs)
    finally:
        _JOB.clear()
    if not isinstance(documents, DocumentRange) and n:  # positions -> sequence ids
        for lo in range(0, document_index.size, CHUNK):
            document_index[lo : lo + CHUNK] = documents[document_index[lo : lo + CHUNK]]
    return document_index, rows, shuffle


# ------------------------------------------------------------------------------------- the blend
# Time units per blend window (one sample per unit on average): a piece of work. The order does not
# depend on it (each sample's window follows from its own due time).
BLEND_WINDOW = 1 << 20


def _events_before(weight: float, t: float) -> int:
    """How many samples ``k`` of a source of weight ``weight`` are due before time ``t``: the
    ``k >= 0`` with ``(k + 0.5) / weight < t``, decided with that exact expression (so every piece
    of the build agrees on each sample's side of an edge)."""
    k = max(0, math.ceil(t * weight - 0.5))
    while k > 0 and (k - 1 + 0.5) / weight >= t:
        k -= 1
    while (k + 0.5) / weight < t:
        k += 1
    return k


def _blend_window(weights: Sequence[float], c: int, start: int, stop: int) -> None:
    """Window ``c``: every sample due in ``[c, c + 1) x BLEND_WINDOW``, ordered by due time (ties:
    lower source first), into ``_JOB['ids'][start:stop]`` and ``_JOB['numbers'][start:stop]``."""
    lo, hi = c * float(BLEND_WINDOW), (c + 1) * float(BLEND_WINDOW)
    ids, numbers, due = [], [], []
    for d, w in enumerate(weights):
        if w <= 0:
            continue
        k = np.arange(_events_before(w, lo), _events_before(w, hi), dtype=np.int64)
        ids.append(np.full(k.size, d, dtype=np.int16))
        numbers.append(k)
        due.append((k + 0.5) / w)
    order = np.argsort(np.concatenate(due), kind="stable")[: stop - start]
    _JOB["ids"][start:stop] = np.concatenate(ids)[order]
    _JOB["numbers"][start:stop] = np.concatenate(numbers)[order]


def build_blend(
    weights: Sequence[float], size: int, *, workers: int = 1, paths: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``size`` samples of a weighted mixture: which source (int16) and which of its
    samples (int64, numbered from 0 per source) each one is. ``weights`` sum to 1.

    Why not megatron-core's blend: its greedy loop (each next sample to the source furthest below
    its weight) is one core's work, ~1 minute for the 10^9 samples of a Stable LM 2 run. Here sample
    ``k`` of source ``d`` is *due* at time ``(k + 0.5) / w_d`` and the mixture is every sample in
    order of due time (ties: lower source first), a divisor (Sainte-Lague) apportionment: after ``N``
    samples each source has within ``0.5 + w_d x S / 2`` of ``w_d x N`` (``S`` sources), and how many
    samples of each source fall in any time window is known without the others, so windows are
    built by ``workers`` processes, into memory maps at ``paths`` when given.
    """
    weights = [float(w) for w in weights]
    edges, counts = [0], []
    while edges[-1] < size:  # samples due in each window, until the mixture is long enough
        c = len(counts)
        lo, hi = c * float(BLEND_WINDOW), (c + 1) * float(BLEND_WINDOW)
        counts.append(sum(_events_before(w, hi) - _events_before(w, lo) for w in weights if w > 0))
        edges.append(edges[-1] + counts[-1])
    ids_path, numbers_path = paths if paths is not None else (None, None)
    ids = _shared((size,), np.int16, ids_path)
    numbers = _shared((size,), np.int64, numbers_path)
    calls = [(weights, c, edges[c], min(edges[c + 1], size)) for c in range(len(counts))]
    _JOB.clear()
    _JOB.update(ids=np.asarray(ids), numbers=np.asarray(numbers))
    try:
        with _Runner(workers if size >= _PARALLEL_MIN else 1) as runner:
            runner.map(_blend_window, calls)
    finally:
        _JOB.clear()
    return ids, numbers
