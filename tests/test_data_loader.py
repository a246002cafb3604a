"""Datasets and loader: determinism, resumption across DP sizes, blending, document fields, bad input."""

from __future__ import annotations

import itertools
import os
import struct

import numpy as np
import pytest
import torch
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

from megatron_stablelm.config import ConfigError
from megatron_stablelm.data import (
    ShardError,
    TokenizerError,
    build_data_iterators,
    build_datasets,
    build_tokenizer,
    document_fields,
    mixture_report,
)
from tests.data_helpers import data_config, tiny_tokenizer_files, write_synthetic_shard

VOCAB = 400


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=tiny_tokenizer_files()["json"])


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    a = write_synthetic_shard(str(d / "a"), rng.integers(1, 40, 300), tok.eod, VOCAB, seed=1)
    b = write_synthetic_shard(str(d / "b"), rng.integers(1, 90, 300), tok.eod, VOCAB, seed=2)
    return {"dir": d, "a": str(d / "a"), "b": str(d / "b"), "docs_a": a, "docs_b": b}


def _cfg(shards, tmp, **kw):
    base = dict(
        train_data_paths=[shards["a"], shards["b"]],
        train_data_weights=[0.3, 0.7],
        valid_data_paths=[shards["a"]],
        data_cache_dir=str(tmp / "cache"),
    )
    base.update(kw)
    return data_config(**base)


def _rows(iterator, n_batches):
    return [row.tolist() for batch in itertools.islice(iterator, n_batches) for row in batch["tokens"]]


def test_samples_are_contiguous_slices_of_the_shards(shards, tok, tmp_path):
    """Every sample is seq+1 consecutive tokens of one source's shuffled document stream."""
    cfg = _cfg(shards, tmp_path)
    ds = build_datasets(cfg, tok).train
    streams = {i: np.concatenate(shards[k]) for i, k in enumerate(("docs_a", "docs_b"))}
    for idx in range(0, len(ds), 37):
        s = ds[idx]
        text = torch.cat([s["tokens"], s["labels"][-1:]]).numpy()
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        # the sample's tokens appear as a run inside its source (brute force over document joins)
        parts = np.split(text, np.flatnonzero(text == tok.eod) + 1)
        src_docs = {tuple(d) for d in shards["docs_a" if s["dataset_id"] == 0 else "docs_b"]}
        middle = [tuple(p) for p in parts[1:-1] if len(p)]
        assert all(p in src_docs for p in middle)
        assert len(streams[int(s["dataset_id"])])


def test_same_seed_same_order_and_seed_changes_it(shards, tok, tmp_path):
    a = _rows(build_data_iterators(_cfg(shards, tmp_path / "1"), tok, report=False).train, 20)
    b = _rows(build_data_iterators(_cfg(shards, tmp_path / "2"), tok, report=False).train, 20)
    c = _rows(build_data_iterators(_cfg(shards, tmp_path / "2", seed=7), tok, report=False).train, 20)
    assert a == b and a != c
    # cached indexes give the same order as freshly built ones
    assert _rows(build_data_iterators(_cfg(shards, tmp_path / "1"), tok, report=False).train, 20) == a


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_other_dp_sizes(shards, tok, tmp_path, workers):
    """Reference: dp=1 uninterrupted. Resumed at k with dp=2 (and dp=4), the ranks' micro-batches,
    interleaved in step order, are exactly samples k, k+1, ... of the reference."""
    micro = 2
    ref_cfg = _cfg(shards, tmp_path, gradient_accumulation_steps=4, train_micro_batch_size_per_gpu=micro)
    ref = _rows(build_data_iterators(ref_cfg, tok, report=False, num_workers=workers).train, 60)
    for dp, ga in ((2, 2), (4, 1)):
        k = 24  # 3 global batches of 8
        cfg = _cfg(shards, tmp_path, gradient_accumulation_steps=ga, train_micro_batch_size_per_gpu=micro)
        per_rank = [
            build_data_iterators(
                cfg, tok, dp_rank=r, dp_size=dp, consumed_train_samples=k, report=False, num_workers=workers
            ).train
            for r in range(dp)
        ]
        got = []
        for _ in range(8):  # micro-steps
            for it in per_rank:
                got.extend(_rows(it, 1))
        assert got == ref[k : k + len(got)]
        # a global batch is the same set of samples whatever the DP size
        assert sorted(map(tuple, got[:8])) == sorted(map(tuple, ref[k : k + 8]))


def test_blend_shares_and_epochs(tok, tmp_path):
    """Long run: shares within 1% of the weights; a source with 10% of the tokens at 50% weight is
    repeated the planned number of epochs (each of its documents that many times)."""
    write_synthetic_shard(str(tmp_path / "small"), [20] * 100, tok.eod, VOCAB, seed=3)  # 2,000
    write_synthetic_shard(str(tmp_path / "big"), [60] * 300, tok.eod, VOCAB, seed=4)  # 18,000 tokens
    cfg = data_config(
        seq_length=16,
        train_iters=1000,
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=1,
        train_data_paths=[str(tmp_path / "small"), str(tmp_path / "big")],
        train_data_weights=[0.5, 0.5],
        data_cache_dir=str(tmp_path / "cache"),
        eval_iters=0,
    )
    ds = build_datasets(cfg, tok).train
    assert len(ds) == 2000
    ids = np.asarray(ds.dataset_index)
    shares = np.bincount(ids, minlength=2) / len(ids)
    assert np.allclose(shares, [0.5, 0.5], atol=0.01)
    small_ds = ds.datasets[0]
    planned_epochs = 0.5 * 2000 * 16 / 2000  # 8 epochs of the small source
    assert small_ds.document_index.shape[0] // 100 == int(np.ceil(planned_epochs + 0.1))
    counts = np.bincount(np.asarray(small_ds.document_index), minlength=100)
    assert (counts == counts[0]).all()
    # the samples drawn from the small source cover it planned_epochs times, to within a sample
    drawn = np.asarray(ds.dataset_sample_index)[ids == 0]
    assert abs(len(np.unique(drawn)) * 16 / 2000 - planned_epochs) < 0.05
    report = mixture_report(cfg, tok)
    assert "8.00" in report and "WARNING" in report and str(tmp_path / "small") in report


def _brute_force(tokens, eod):
    b, s = tokens.shape
    pos = np.zeros((b, s), dtype=np.int64)
    bounds = []
    for r in range(b):
        p = 0
        bounds.append(r * s)
        for i in range(s):
            pos[r, i] = p
            p += 1
            if tokens[r, i] == eod:
                p = 0
                if i + 1 < s:
                    bounds.append(r * s + i + 1)
    bounds.append(b * s)
    return pos, bounds


def test_document_fields_match_brute_force_and_megatron():
    rng = np.random.default_rng(0)
    for trial in range(200):
        b, s = rng.integers(1, 4), rng.integers(1, 40)
        tokens = rng.integers(0, 5, size=(b, s))  # eod = 0, frequent, incl. first/last positions
        pos, cu, max_len = document_fields(tokens, 0, reset_position_ids=True, reset_attention_mask=True)
        ref_pos, ref_bounds = _brute_force(tokens, 0)
        assert np.array_equal(pos, ref_pos) and cu.tolist() == ref_bounds and cu.dtype == np.int32
        assert max_len == max(np.diff(ref_bounds))
        for r in range(b):  # megatron-core's own position ids agree
            _, _, mpos = _get_ltor_masks_and_position_ids(
                torch.from_numpy(tokens[r]), 0, True, False, False, False
            )
            assert mpos.tolist() == pos[r].tolist()
        # the causal block-diagonal mask implied by cu_seqlens == megatron's dense mask (True = masked)
        if trial < 30:
            for r in range(b):
                dense, _, _ = _get_ltor_masks_and_position_ids(
                    torch.from_numpy(tokens[r]), 0, False, True, False, True
                )
                doc = np.searchsorted(cu, np.arange(r * s, (r + 1) * s), side="right")
                allowed = (doc[:, None] == doc[None, :]) & np.tril(np.ones((s, s), dtype=bool))
                assert np.array_equal(~dense[0].numpy(), allowed)
    pos, cu, _ = document_fields(
        np.zeros((2, 3), dtype=np.int64), 0, reset_position_ids=False, reset_attention_mask=False
    )
    assert pos.tolist() == [[0, 1, 2]] * 2 and cu is None


def test_batch_contract(shards, tok, tmp_path):
    cfg = _cfg(shards, tmp_path, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    its = build_data_iterators(cfg, tok, report=False)
    for batch in itertools.islice(its.train, 5):
        b, s = batch["tokens"].shape
        assert (b, s) == (2, 32)
        assert batch["tokens"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.int64
        assert batch["loss_mask"].dtype == torch.float32 and batch["cu_seqlens"].dtype == torch.int32
        assert torch.equal(batch["loss_mask"] == 0, batch["labels"] == tok.eod)
        ref_pos, ref_bounds = _brute_force(batch["tokens"].numpy(), tok.eod)
        assert batch["position_ids"].tolist() == ref_pos.tolist()
        assert batch["cu_seqlens"].tolist() == ref_bounds
        assert batch["max_seqlen"] == int(np.diff(ref_bounds).max())
    assert its.valid is not None and its.test is None
    assert next(its.valid)["tokens"].shape == (2, 32)
    plain = next(build_data_iterators(_cfg(shards, tmp_path), tok, report=False).train)
    assert "cu_seqlens" not in plain and bool((plain["loss_mask"] == 1).all())


def test_bad_inputs_fail_early_naming_the_file(shards, tok, tmp_path):
    import shutil

    def build(prefix, **kw):
        return build_datasets(
            _cfg(shards, tmp_path, train_data_paths=[shards["a"], prefix], valid_data_paths=None, **kw), tok
        )

    with pytest.raises(ShardError, match=r"missing_shard\.idx. does not exist"):
        build(str(tmp_path / "missing_shard"))
    for name in ("trunc", "magic", "ids"):
        for ext in (".bin", ".idx"):
            shutil.copy(shards["b"] + ext, str(tmp_path / name) + ext)
    with open(str(tmp_path / "trunc.bin"), "r+b") as f:
        f.truncate(os.path.getsize(shards["b"] + ".bin") - 2)
    with pytest.raises(ShardError, match=r"trunc\.idx' does not match .*trunc\.bin"):
        build(str(tmp_path / "trunc"))
    with open(str(tmp_path / "magic.idx"), "r+b") as f:
        f.write(b"NOTMAGIC!")
    with pytest.raises(ShardError, match=r"magic\.idx.*magic header"):
        build(str(tmp_path / "magic"))
    write_synthetic_shard(str(tmp_path / "ids"), [50] * 20, tok.eod, 1000, seed=5)
    with pytest.raises(
        ShardError, match=r"ids\.bin' contains token id \d+ >= the tokenizer's vocab size 400"
    ):
        build(str(tmp_path / "ids"))
    # the batch arithmetic is the trainer's rule (config.validate_layout), hence a ConfigError
    with pytest.raises(ConfigError, match="train_batch_size"):
        build(shards["b"], train_batch_size=5)
    with pytest.raises(TokenizerError, match="no_such_tokenizer.json"):
        build_tokenizer(
            data_config(tokenizer_type="HFTokenizer", vocab_file=str(tmp_path / "no_such_tokenizer.json"))
        )
    with open(str(tmp_path / "magic.idx"), "r+b") as f:  # a wrong version is named too
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 7))
    with pytest.raises(ShardError, match="version 7"):
        build(str(tmp_path / "magic"))
