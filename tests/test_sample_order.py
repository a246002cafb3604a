"""The parallel index build (megatron_stablelm.data.sample_order) against independent references:
megatron-core's C++ packing helper on the same document order, brute-force permutation checks, and a
chi-square test of the permutation's uniformity (shown able to fail on a biased variant)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from megatron.core.datasets import helpers

from megatron_stablelm.data import sample_order
from megatron_stablelm.data.sample_order import DocumentRange, build_indices


@pytest.fixture
def small_pieces(monkeypatch):
    """Chunks of 64 documents, forked workers from 128 entries: many buckets and real processes on
    inputs small enough to check by brute force."""
    monkeypatch.setattr(sample_order, "CHUNK", 64)
    monkeypatch.setattr(sample_order, "_PARALLEL_MIN", 128)


def _random_case(rng: np.random.Generator):
    n_all = int(rng.integers(1, 700))
    lengths = rng.integers(0, 50, n_all).astype(np.int32)
    if rng.random() < 0.5:  # empty documents, as Megatron-LM shards may hold
        lengths[rng.integers(0, n_all, max(1, n_all // 10))] = 0
    lengths[rng.integers(0, n_all)] = max(1, int(lengths.max()))
    begin = int(rng.integers(0, n_all))
    end = int(rng.integers(begin + 1, n_all + 1))
    if rng.random() < 0.7:
        documents = DocumentRange(begin, end)
    else:
        documents = np.sort(rng.choice(n_all, end - begin, replace=False)).astype(np.int32)
    return lengths, documents


def test_packing_matches_megatron_core_and_the_workers_do_not_matter(small_pieces):
    rng = np.random.default_rng(0)
    compared = 0
    for case in range(120):
        lengths, documents = _random_case(rng)
        ids = np.asarray(documents, dtype=np.int32)
        tokens = int(lengths[ids].sum())
        seq, epochs = int(rng.integers(2, 40)), int(rng.integers(1, 4))
        drop, extra = bool(rng.random() < 0.5), bool(rng.random() < 0.7)
        if tokens <= 1 or epochs * tokens - int(extra) < seq:
            continue
        kw = dict(drop_last_partial_sequence=drop, add_extra_token=extra)
        docs, rows, shuffle = build_indices(documents, lengths, seq, epochs, 1234, workers=1, **kw)
        try:
            reference = helpers.build_sample_idx(lengths, np.array(docs), seq, epochs, tokens, drop, extra)
        except AssertionError:  # megatron-core refuses a kept partial sample ending on an empty document
            continue
        assert rows.dtype == reference.dtype and np.array_equal(rows, reference)
        for e in range(epochs):  # every epoch is a permutation of the documents
            assert np.array_equal(np.sort(docs[e * ids.size : (e + 1) * ids.size]), ids)
        # the shuffle permutes the samples that start in each epoch among themselves
        epoch_of = rows[: len(shuffle), 0] // ids.size
        assert np.array_equal(np.sort(shuffle), np.arange(len(shuffle)))
        assert np.array_equal(epoch_of[shuffle], epoch_of)
        if case % 6 == 0:  # forked workers (each build forks its pool once)
            again = build_indices(documents, lengths, seq, epochs, 1234, workers=2, **kw)
            assert all(np.array_equal(a, b) for a, b in zip((docs, rows, shuffle), again))
        compared += 1
    assert compared > 80


def test_epochs_differ_and_the_seed_matters(small_pieces):
    lengths = np.full(500, 7, dtype=np.int32)
    docs, _, shuffle = build_indices(DocumentRange(0, 500), lengths, 16, 3, 1)
    epochs = docs.reshape(3, 500)
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    other, _, _ = build_indices(DocumentRange(0, 500), lengths, 16, 3, 2)
    assert np.mean(other == docs) < 0.05
    assert np.mean(shuffle == np.arange(shuffle.size)) < 0.05


def test_memory_mapped_outputs(small_pieces, tmp_path):
    lengths = np.arange(1, 301, dtype=np.int32)
    paths = [str(tmp_path / f"{name}.npy") for name in ("documents", "samples", "shuffle")]
    arrays = build_indices(DocumentRange(10, 300), lengths, 32, 2, 7, workers=2, paths=paths)
    in_memory = build_indices(DocumentRange(10, 300), lengths, 32, 2, 7)
    for path, array, expected in zip(paths, arrays, in_memory):
        assert isinstance(array, np.memmap)
        assert np.array_equal(np.load(path, allow_pickle=False), expected)


def _permutation_counts(n: int, trials: int) -> np.ndarray:
    """How often each permutation of range(n) comes out of the two-stage draw over ``trials`` seeds."""
    index = {p: i for i, p in enumerate(itertools.permutations(range(n)))}
    counts = np.zeros(len(index), dtype=np.int64)
    for seed in range(trials):
        counts[index[tuple(sample_order.random_permutation(n, seed, (9, 0)).tolist())]] += 1
    return counts


def _chi_square_p(counts: np.ndarray) -> float:
    """Upper tail of the chi-square statistic against equal frequencies (Wilson-Hilferty)."""
    expected = counts.sum() / counts.size
    stat = float(((counts - expected) ** 2).sum() / expected)
    k = counts.size - 1
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_the_permutation_is_uniform_and_the_test_can_fail(monkeypatch):
    """4 items in chunks of 2 (2 chunks, 2 buckets): all 24 orders equally likely. The same draw
    with each item kept in its own chunk's bucket (no scatter) fails the test."""
    monkeypatch.setattr(sample_order, "CHUNK", 2)
    counts = _permutation_counts(4, 4_800)
    assert counts.min() > 0 and _chi_square_p(counts) > 1e-4

    real = sample_order._bucket_ids

    def no_scatter(seed, key, n, c, buckets):
        return np.full_like(real(seed, key, n, c, buckets), c)

    monkeypatch.setattr(sample_order, "_bucket_ids", no_scatter)
    biased = _permutation_counts(4, 4_800)
    assert _chi_square_p(biased) < 1e-9


def test_blend_counts_equal_a_full_count():
    """The blend's per-source counts read from the end of the order equal a full count, for
    megatron-core's greedy blend of random weights (some zero, some tiny)."""
    from megatron_stablelm.data.index_cache import blend_counts

    rng = np.random.default_rng(3)
    for _ in range(60):
        k = int(rng.integers(1, 20))
        weights = rng.random(k) ** 4
        weights[rng.integers(0, k)] = 0.0 if k > 1 and rng.random() < 0.4 else weights[0]
        weights /= weights.sum()
        size = int(rng.integers(1, 200_000))
        ids, numbers = np.zeros(size, dtype=np.int16), np.zeros(size, dtype=np.int64)
        helpers.build_blending_indices(ids, numbers, weights, k, size, False)
        assert np.array_equal(blend_counts(ids, numbers, k), np.bincount(ids, minlength=k))


def test_blend_is_the_due_time_order_built_in_windows(monkeypatch):
    """The blend equals a brute-force sort of every sample of every source by due time
    ``(k + 0.5) / weight`` (ties: lower source first), whatever the window size and the workers;
    every prefix is within ``0.5 + weight x sources / 2`` samples of its share."""
    rng = np.random.default_rng(11)
    for case in range(12):
        k = int(rng.integers(1, 9))
        weights = rng.random(k) ** 3 + 1e-3
        if case % 3 == 0:
            weights[: max(1, k // 2)] = weights[0]  # equal weights: ties in due time
        weights = (weights / weights.sum()).tolist()
        size = int(rng.integers(1, 3_000))
        due = sorted((j + 0.5) / w for w in weights for j in range(int(size * w) + 3))
        reference = sorted(
            ((j + 0.5) / w, d, j) for d, w in enumerate(weights) for j in range(int(size * w) + 3)
        )[:size]
        assert len(due) >= size
        monkeypatch.setattr(sample_order, "BLEND_WINDOW", int(rng.integers(1, 300)))
        monkeypatch.setattr(sample_order, "_PARALLEL_MIN", 1)
        ids, numbers = sample_order.build_blend(weights, size, workers=1 + case % 2)
        assert ids.tolist() == [d for _, d, _ in reference]
        assert numbers.tolist() == [j for _, _, j in reference]
        n = np.arange(1, size + 1)
        for d, w in enumerate(weights):
            worst = np.abs(np.cumsum(ids == d) - w * n).max()
            assert worst <= 0.5 + w * k / 2 + 1e-9


def _dies(*args) -> None:
    """A worker killed from outside: the process ends at once, no exception, no result."""
    import os

    os._exit(9)


def test_a_killed_worker_is_one_clear_error(small_pieces, monkeypatch):
    """A worker that dies mid-build (the kernel's OOM killer) stops the build with a DataError that
    says what happened and what to do, not a pool traceback."""
    from megatron_stablelm.data.errors import DataError

    monkeypatch.setattr(sample_order, "_count", _dies)
    with pytest.raises(DataError, match="worker process building the data indexes died"):
        build_indices(DocumentRange(0, 400), np.full(400, 5, dtype=np.int32), 16, 2, 1, workers=2)
