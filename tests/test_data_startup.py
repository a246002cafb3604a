"""Start-up at scale: shards fully checked once per version (a record in the index cache), the
blend read from its cache, and ``tools/prepare_data_cache.py`` building what a job then reuses.

A "new start" is simulated by clearing this process's memory of earlier checks
(:func:`_new_process`); the expensive functions are then replaced by ones that fail, so a test
fails if anything is recomputed that a record or cache should have answered.
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import yaml

from megatron_stablelm.config import load_config
from megatron_stablelm.data import ShardError, build_datasets, build_tokenizer, check_shard, index_cache
from megatron_stablelm.data import indexed as indexed_mod
from megatron_stablelm.data.indexed import RECORD_SUBDIR, record_path
from tests.data_helpers import data_config, tiny_tokenizer_files, write_synthetic_shard
from tests.train_helpers import REPO, tiny_dict

VOCAB = 400


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=tiny_tokenizer_files()["json"])


@pytest.fixture()
def shards(tmp_path, tok):
    rng = np.random.default_rng(0)
    a = write_synthetic_shard(str(tmp_path / "a"), rng.integers(1, 40, 200), tok.eod, VOCAB, seed=1)
    write_synthetic_shard(str(tmp_path / "b"), rng.integers(1, 90, 200), tok.eod, VOCAB, seed=2)
    return str(tmp_path / "a"), str(tmp_path / "b"), a


def _new_process() -> None:
    """Forget this process's checks, as a fresh start would."""
    indexed_mod._QUICK.clear()
    indexed_mod._VERIFIED.clear()


def _no_full_check(monkeypatch) -> None:
    def fail(*args, **kw):
        raise AssertionError("a shard was fully checked again although its record is valid")

    monkeypatch.setattr(indexed_mod, "_max_token", fail)
    monkeypatch.setattr(indexed_mod, "_full_structure_check", fail)


def _no_index_build(monkeypatch, why: str) -> None:
    """Building a source's indexes or a blend fails the test (``why``): they must come from the cache."""

    def fail(*args, **kw):
        raise AssertionError(why)

    monkeypatch.setattr(index_cache, "build_indices", fail)
    monkeypatch.setattr(index_cache, "build_blend", fail)


def test_record_written_once_and_reused(shards, tmp_path, monkeypatch):
    prefix = shards[0]
    _new_process()
    info = check_shard(prefix, VOCAB, record_dir=str(tmp_path / "cache"))
    path = record_path(str(tmp_path / "cache"), prefix)
    record = json.loads(open(path).read())
    assert record["max_token"] == max(int(d.max()) for d in shards[2]) and record["key"] == info.key
    stamp = os.stat(path).st_mtime_ns
    _new_process()
    _no_full_check(monkeypatch)
    again = check_shard(prefix, VOCAB, record_dir=str(tmp_path / "cache"))
    assert again.num_tokens == info.num_tokens and os.stat(path).st_mtime_ns == stamp  # read, not rewritten
    assert isinstance(again.sequence_lengths.base, np.memmap) or not again.sequence_lengths.flags.owndata
    with pytest.raises(ShardError, match=r"a\.bin' contains token id \d+ >= the tokenizer's vocab size 10"):
        check_shard(prefix, 10, record_dir=str(tmp_path / "cache"))  # another vocabulary: from the record


def test_modified_bin_invalidates_the_record(shards, tmp_path):
    prefix, cache = shards[0], str(tmp_path / "cache")
    _new_process()
    check_shard(prefix, VOCAB, record_dir=cache)
    with open(prefix + ".bin", "r+b") as f:  # same size, one id out of the vocabulary
        f.write(np.array([999], dtype=np.uint16).tobytes())
    _new_process()
    with pytest.raises(ShardError, match=r"a\.bin' contains token id 999"):
        check_shard(prefix, VOCAB, record_dir=cache)


def test_corrupt_shard_is_caught_on_the_first_start(shards, tok, tmp_path):
    prefix = shards[1]
    _new_process()
    idx = np.memmap(prefix + ".idx", mode="r+", dtype=np.uint8)
    lengths = np.frombuffer(idx, dtype=np.int32, count=2, offset=34)
    a, b = int(lengths[0]), int(lengths[1])
    idx[34:42] = np.frombuffer(np.array([a + 1, b - 1], dtype=np.int32).tobytes(), dtype=np.uint8)
    idx.flush()
    del idx, lengths  # sizes still agree: only the full check sees the pointers are wrong
    cache = tmp_path / "cache"
    cfg = data_config(train_data_paths=list(shards[:2]), data_cache_dir=str(cache), eval_iters=0)
    check_shard(prefix, VOCAB, scan_tokens=False)  # train.py's start-up check passes ...
    with pytest.raises(ShardError, match=r"b\.idx': sequence pointers are inconsistent"):
        build_datasets(cfg, tok)  # ... the first build does not, before any index is built
    assert not list(cache.glob("*.npy")) and not os.path.exists(record_path(str(cache), prefix))


def test_half_written_or_changing_shard_is_refused(shards, tmp_path, monkeypatch):
    prefix, cache = shards[0], str(tmp_path / "cache")
    _new_process()
    real = indexed_mod._max_token

    def scan_while_written(info):
        out = real(info)
        with open(prefix + ".bin", "ab") as f:  # a writer appends during the scan
            f.write(b"\0\0")
        return out

    monkeypatch.setattr(indexed_mod, "_max_token", scan_while_written)
    with pytest.raises(ShardError, match="changed while it was being checked"):
        check_shard(prefix, VOCAB, record_dir=cache)
    assert not os.path.exists(record_path(cache, prefix))
    monkeypatch.undo()
    _new_process()
    with pytest.raises(ShardError, match=r"a\.idx' does not match .*a\.bin"):  # and now, one line
        check_shard(prefix, VOCAB, scan_tokens=False)


def test_second_start_reads_records_and_blend_cache(shards, tok, tmp_path, monkeypatch):
    cfg = data_config(
        train_data_paths=list(shards[:2]), train_data_weights=[0.3, 0.7], data_cache_dir=str(tmp_path)
    )
    _new_process()
    first = build_datasets(cfg, tok).train
    order = [first[i]["tokens"].tolist() for i in range(0, len(first), 7)]
    assert len(list((tmp_path / RECORD_SUBDIR).glob("*.json"))) == 2
    assert len(list(tmp_path.glob("*-CheckedBlendedDataset-train-dataset_index.npy"))) == 1
    _new_process()
    _no_full_check(monkeypatch)
    _no_index_build(monkeypatch, "an index was recomputed although its cache exists")
    second = build_datasets(cfg, tok).train
    assert isinstance(second.dataset_index, np.memmap)
    assert [second[i]["tokens"].tolist() for i in range(0, len(second), 7)] == order


def test_prepare_tool_builds_what_a_start_reuses(shards, tok, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "prepare_data_cache", REPO / "tools" / "prepare_data_cache.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    values = tiny_dict(
        tokenizer_type="HFTokenizer",
        vocab_file=tiny_tokenizer_files()["json"],
        train_data_paths=list(shards[:2]),
        train_data_weights=[0.5, 0.5],
        valid_data_paths=[shards[0]],
        data_cache_dir=str(tmp_path / "cache"),
    )
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(values))
    _new_process()
    assert tool.main([str(path), "--workers", "2"]) == 0
    assert "train source 1" in capsys.readouterr().out
    _new_process()
    _no_full_check(monkeypatch)
    _no_index_build(monkeypatch, "the job rebuilt a cache that the tool prepared")
    datasets = build_datasets(load_config([str(path)], training=True), tok)
    assert datasets.train is not None and datasets.valid is not None
    monkeypatch.undo()
    os.unlink(shards[1] + ".idx")
    _new_process()
    assert tool.main([str(path), "--workers", "1"]) == 2
    assert "b.idx' does not exist" in capsys.readouterr().err


def _two_rank_start(rank: int, world: int, prefixes: list[str], bad: str, cache: str, out: str) -> None:
    """Each rank of a 2-rank gloo group starts as ``train.py`` does. Rank 1 must not read a ``.bin``,
    check pointers or compute a blend: rank 0 does, and rank 1 trusts what it sends or publishes."""
    from megatron_stablelm import parallel

    parallel.initialize(1, backend="gloo")
    tok = build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=tiny_tokenizer_files()["json"])
    if rank == 1:

        def fail(*args, **kw):
            raise AssertionError("rank 1 repeated rank 0's work")

        indexed_mod._max_token = fail
        indexed_mod._full_structure_check = fail
        index_cache.build_blend = fail
    cfg = data_config(train_data_paths=[*prefixes, bad], data_cache_dir=cache, eval_iters=0)
    try:
        build_datasets(cfg, tok)
        raise AssertionError("a shard with ids out of the vocabulary was accepted")
    except ShardError as err:  # the same one line on both ranks, from rank 0's scan
        assert "bad.bin' contains token id 999" in str(err), err
    cfg = data_config(
        train_data_paths=prefixes, train_data_weights=[0.4, 0.6], data_cache_dir=cache, eval_iters=0
    )
    blend = build_datasets(cfg, tok).train
    with open(f"{out}.{rank}", "w") as f:
        f.write(json.dumps([blend[i]["tokens"].tolist() for i in range(0, len(blend), 5)]))


@pytest.mark.slow
def test_two_ranks_check_once_and_share_the_blend(shards, tok, tmp_path):
    from tests.dist_helpers import run_distributed

    write_synthetic_shard(str(tmp_path / "bad"), [30] * 20, tok.eod, 1000, seed=5)
    out = str(tmp_path / "order")
    run_distributed(_two_rank_start, 2, list(shards[:2]), str(tmp_path / "bad"), str(tmp_path / "cache"), out)
    assert open(out + ".0").read() == open(out + ".1").read()


def test_writer_records_the_largest_id_and_the_check_trusts_only_that_shard(tmp_path):
    """The streaming writer notes the largest id beside the shard (``PREFIX.tokens.json``); the full
    check takes it instead of reading the ``.bin`` (here: a doctored value is believed, which shows
    the ``.bin`` was not read), and ignores it once the files are not the ones it describes."""
    from megatron_stablelm.data.indexed import TOKENS_SUFFIX
    from megatron_stablelm.data.pieces import StreamingShardWriter

    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 50, 64)
    flat = rng.integers(0, 700, int(lengths.sum())).astype(np.int32)
    prefix = str(tmp_path / "s")
    writer = StreamingShardWriter(prefix, np.int32)  # int32: ids are not bounded by the dtype, a scan is due
    writer.add_documents(flat[: int(lengths[:30].sum())], lengths[:30])
    writer.add_documents(flat[int(lengths[:30].sum()) :], lengths[30:])
    writer.finalize()
    stats_path = prefix + TOKENS_SUFFIX
    stats = json.loads(open(stats_path).read())
    assert stats["max_token"] == int(flat.max())  # brute force

    _new_process()
    assert check_shard(prefix, vocab_size=701).num_tokens == flat.size
    stats["max_token"] = 5000  # doctored: believed while the files are the ones described
    open(stats_path, "w").write(json.dumps(stats))
    _new_process()
    with pytest.raises(ShardError, match="token id 5000"):
        check_shard(prefix, vocab_size=701)
    os.utime(prefix + ".bin", ns=(1, 1))  # another version of the files: the ids are read again
    _new_process()
    assert check_shard(prefix, vocab_size=701).num_tokens == flat.size
    with pytest.raises(ShardError, match=f"token id {int(flat.max())}"):
        check_shard(prefix, vocab_size=int(flat.max()))


def test_full_checks_in_parallel_processes(shards, tmp_path, monkeypatch):
    """Shards without a record are checked in forked processes (forced here for small shards): the
    records are written, this process trusts them, and a bad shard's error comes back as one line."""
    from megatron_stablelm.data import datasets as datasets_mod

    monkeypatch.setattr(datasets_mod, "PARALLEL_CHECK_DOCUMENTS", 0)
    cache = str(tmp_path / "cache")
    os.makedirs(cache, mode=0o700)
    _new_process()
    infos = [check_shard(p, VOCAB, scan_tokens=False) for p in shards[:2]]
    datasets_mod.verify_shards(infos, VOCAB, cache, workers=2)
    assert all(os.path.exists(record_path(cache, p)) for p in shards[:2])
    _no_full_check(monkeypatch)  # this process knows both shards checked: nothing is read again
    datasets_mod.verify_shards(infos, VOCAB, cache, workers=2)
    monkeypatch.undo()
    monkeypatch.setattr(datasets_mod, "PARALLEL_CHECK_DOCUMENTS", 0)
    _new_process()
    small = str(tmp_path / "small")  # ids < 50: only b is bad for a 50-token vocabulary
    write_synthetic_shard(small, np.full(30, 20), 49, 50, seed=3)
    infos = [check_shard(p, VOCAB, scan_tokens=False) for p in (small, shards[1])]
    with pytest.raises(ShardError, match=r"b\.bin' contains token id \d+ >= the tokenizer's vocab size 50"):
        datasets_mod.verify_shards(infos, 50, str(tmp_path / "other"), workers=2)
