"""Multi-epoch semantics of a blended mixture, checked by brute force over the run's sample order.

A small source repeated 6 times beside a large one read half-way: over the whole run each source's
share matches its weight, every token of a source is read once per epoch (no document repeats within
an epoch of its source, except inside the one sample that straddles two epochs), and each epoch has
its own order. The checks walk every sample the run reads, in order, through megatron-core's indexes
(blend -> source sample -> shuffle -> sample index -> document index) down to (document, token)
pairs, so they test what training reads, not how the indexes were built.
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_stablelm.data import build_datasets, build_tokenizer
from tests.data_helpers import (
    data_config,
    index_tokens,
    read_order_tokens,
    source_read_order,
    tiny_tokenizer_files,
    write_synthetic_shard,
)

SEQ = 16
SMALL_TOKENS = 600  # 40 documents
BIG_TOKENS = 14_400  # 400 documents
WEIGHTS = (1 / 3, 2 / 3)  # 675 samples x 16 tokens: small 3,600 = 6 epochs, big 7,200 = 0.5 epochs
SAMPLES = 675
# Shares over the whole run: the blend orders samples by due time (sample_order.build_blend), so
# every prefix of the order is within 0.5 + weight x sources / 2 samples of weight x length.
PREFIX_TOLERANCE_SAMPLES = 0.5 + max(WEIGHTS) * len(WEIGHTS) / 2
# Repeats allowed inside one epoch-length window of a source's reads: only the tokens of the sample
# that straddles two epochs (and the window edges, each at most one sample): 3 x seq tokens.
REPEAT_TOLERANCE_TOKENS = 3 * SEQ


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tok = build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=tiny_tokenizer_files()["json"])
    d = tmp_path_factory.mktemp("epochs")
    rng = np.random.default_rng(5)
    small = rng.integers(5, 26, 40)
    small[-1] += SMALL_TOKENS - small.sum()
    big = np.full(400, BIG_TOKENS // 400)
    write_synthetic_shard(str(d / "small"), small, tok.eod, 400, seed=1)
    write_synthetic_shard(str(d / "big"), big, tok.eod, 400, seed=2)
    cfg = data_config(
        seq_length=SEQ,
        train_iters=SAMPLES,
        train_micro_batch_size_per_gpu=1,
        gradient_accumulation_steps=1,
        eval_iters=0,
        train_data_paths=[str(d / "small"), str(d / "big")],
        train_data_weights=list(WEIGHTS),
        data_cache_dir=str(d / "cache"),
    )
    return build_datasets(cfg, tok).train, (SMALL_TOKENS, BIG_TOKENS)


def check_shares(blend, weights, tolerance_samples: float) -> np.ndarray:
    """Each source's count over every prefix of the order is within ``tolerance_samples`` of
    weight x prefix length (so the whole-run share is within tolerance / len); returns the shares."""
    ids = np.asarray(blend.dataset_index[: len(blend)])
    n = np.arange(1, ids.size + 1)
    for s, w in enumerate(weights):
        counts = np.cumsum(ids == s)
        worst = np.abs(counts - w * n).max()
        assert worst <= tolerance_samples, f"source {s}: a prefix is {worst:.1f} samples off weight {w:.3f}"
    return np.bincount(ids, minlength=len(weights)) / ids.size


def check_epochs(pairs: np.ndarray, source_tokens: int, tolerance_tokens: int) -> int:
    """``pairs``: the (document, token offset) read, in read order, from one source. Cut into
    epoch-length windows of ``source_tokens`` reads: no pair may repeat within a window beyond
    ``tolerance_tokens``, and two full epochs must not read the tokens in the same order.
    Returns the number of windows (epochs, counting a partial last one)."""
    keys = pairs[:, 0].astype(np.int64) * 1_000_000 + pairs[:, 1]
    windows = [keys[i : i + source_tokens] for i in range(0, keys.size, source_tokens)]
    for e, win in enumerate(windows):
        repeats = win.size - np.unique(win).size
        assert repeats <= tolerance_tokens, f"epoch {e}: {repeats} tokens read twice within the epoch"
    full = [w for w in windows if w.size == source_tokens]
    for a in range(len(full)):
        for b in range(a + 1, len(full)):
            same = np.mean(full[a] == full[b])
            assert same < 0.5, f"epochs {a} and {b} read {same:.0%} of their tokens in the same order"
    return len(windows)


def test_shares_epochs_and_order_by_brute_force(run):
    blend, tokens = run
    shares = check_shares(blend, WEIGHTS, PREFIX_TOLERANCE_SAMPLES)
    assert np.allclose(shares, WEIGHTS, atol=PREFIX_TOLERANCE_SAMPLES / SAMPLES + 1e-9)
    small_pairs = read_order_tokens(blend, 0)
    big_pairs = read_order_tokens(blend, 1)
    assert check_epochs(small_pairs, tokens[0], REPEAT_TOLERANCE_TOKENS) == 6  # 6 epochs of the small source
    assert check_epochs(big_pairs, tokens[1], REPEAT_TOLERANCE_TOKENS) == 1  # half an epoch of the big one
    # every token of the small source is read 6 times, give or take the straddling samples
    _, counts = np.unique(small_pairs[:, 0] * 1_000_000 + small_pairs[:, 1], return_counts=True)
    assert counts.size == tokens[0] and counts.min() >= 5 and counts.max() <= 7 and np.mean(counts == 6) > 0.9
    # the big source's half epoch reads half of its tokens, none twice
    assert abs(big_pairs.shape[0] / tokens[1] - 0.5) < 0.01
    assert len(np.unique(big_pairs[:, 0] * 1_000_000 + big_pairs[:, 1])) == big_pairs.shape[0]


def test_checks_fail_on_a_wrong_mixture(run):
    """The checks can fail: other weights, or megatron-core's own order (documents and samples
    shuffled over all epochs at once) for the same source and the same reads."""
    from megatron.core.datasets import helpers
    from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index

    blend, tokens = run
    with pytest.raises(AssertionError, match="samples off weight"):
        check_shares(blend, (0.36, 0.64), PREFIX_TOLERANCE_SAMPLES)
    small = blend.datasets[0]
    lengths = small.dataset.sequence_lengths
    epochs = small.document_index.size // small.indices.size
    rs = np.random.RandomState(1234)
    docs = _build_document_index(np.asarray(small.indices, dtype=np.int32), epochs, rs, False)
    samples = helpers.build_sample_idx(lengths, docs, SEQ, epochs, tokens[0], True, True)
    shuffle = _build_shuffle_index(samples.shape[0] - 1, samples.shape[0] - 1, rs)
    pairs = index_tokens((docs, samples, shuffle), lengths, source_read_order(blend, 0))
    with pytest.raises(AssertionError, match="read twice within the epoch"):
        check_epochs(pairs, tokens[0], REPEAT_TOLERANCE_TOKENS)
