"""The data side's bad-input cases: planted and truncated index caches, interrupted cache builds,
empty or unwritable preprocessing, re-running the demo corpus; and shards with empty documents,
byte for byte megatron-core's builder as Megatron-LM's preprocessing uses it."""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from megatron.core.datasets import helpers
from megatron.core.datasets.gpt_dataset import GPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.datasets.utils import Split

from megatron_stablelm.config import load_config
from megatron_stablelm.data import (
    DataError,
    build_data_iterators,
    build_datasets,
    build_tokenizer,
    check_shard,
    index_cache,
)
from megatron_stablelm.data.datasets import megatron_config
from megatron_stablelm.data.index_cache import npy_header
from megatron_stablelm.data.preprocess import preprocess
from tests.data_helpers import data_config, random_text, tiny_tokenizer_files, write_jsonl
from tests.train_helpers import REPO, run_train, tiny_dict, tree_digest

VOCAB = 400
TOOLS = REPO / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=tiny_tokenizer_files()["json"])


def _megatron_shard(prefix: str, docs: list[list[int]]) -> None:
    """megatron-core's builder as Megatron-LM's tools/preprocess_data.py drives it: per document
    ``add_document(ids, lengths)`` with no sequence for an empty document, then ``finalize``."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for ids in docs:
        builder.add_document(np.array(ids, dtype=np.int64), [len(ids)] if ids else [])
    builder.finalize(prefix + ".idx")


# ------------------------------------------------------------------------ shards with empty documents
@pytest.mark.parametrize("append_eod", [True, False])
def test_preprocess_matches_megatron_builder_byte_for_byte(tmp_path, tok, append_eod):
    import random

    rng = random.Random(5)
    texts = [random_text(rng, rng.randint(1, 30)) for _ in range(600)]
    for i in (0, 7, 8, 300, 599):  # first, consecutive, chunk-crossing and last documents empty
        texts[i] = ""
    write_jsonl(tmp_path / "in.jsonl", texts)
    stats = preprocess(
        [str(tmp_path / "in.jsonl")],
        str(tmp_path / "ours"),
        tokenizer_type="HFTokenizer",
        vocab_file=tiny_tokenizer_files()["json"],
        append_eod=append_eod,
        workers=2,
        progress=False,
    )
    assert stats.empty_documents == 5
    eod = [tok.eod] if append_eod else []
    _megatron_shard(str(tmp_path / "ref"), [tok.encode(t) + eod if t else [] for t in texts])
    for ext in (".bin", ".idx"):
        ours = (tmp_path / f"ours_text_document{ext}").read_bytes()
        assert ours == (tmp_path / f"ref{ext}").read_bytes(), ext


@pytest.fixture(scope="module")
def gappy_shard(tmp_path_factory, tok):
    """1,400 documents of which 16 are empty, written by megatron-core's builder."""
    d = tmp_path_factory.mktemp("gappy")
    rng = np.random.default_rng(3)
    empty = set(rng.choice(1400, 16, replace=False).tolist())
    docs = []
    for i in range(1400):
        ids = [] if i in empty else rng.integers(1, VOCAB, rng.integers(1, 40)).tolist() + [tok.eod]
        docs.append(ids)
    _megatron_shard(str(d / "gappy"), docs)
    return str(d / "gappy"), docs


def test_shard_with_empty_documents_is_accepted_and_trained_on(gappy_shard, tok, tmp_path):
    prefix, docs = gappy_shard
    info = check_shard(prefix, VOCAB)
    assert (info.num_documents, info.num_sequences) == (1400, 1384)
    assert info.num_tokens == sum(map(len, docs))
    cfg = data_config(train_data_paths=[prefix], data_cache_dir=str(tmp_path / "cache"), eval_iters=0)
    ours = build_datasets(cfg, tok).train
    # reference: megatron-core's own GPTDataset over the same sequences, without our cache handling,
    # reading our document order with its own packing (its C++ helper) and our sample order
    config = megatron_config(cfg, tok, [None])
    config.path_to_cache = str(tmp_path / "reference")
    ref = GPTDataset(
        IndexedDataset(prefix), prefix, np.arange(1384, dtype=np.int32), len(ours), Split.train, config
    )
    epochs = ours.document_index.size // 1384
    ref.document_index = np.array(ours.document_index)
    ref.sample_index = helpers.build_sample_idx(
        ref.dataset.sequence_lengths, ref.document_index, 32, epochs, info.num_tokens, True, True
    )
    ref.shuffle_index = np.array(ours.shuffle_index)
    assert len(ref) == len(ours)
    for i in range(0, len(ours), 7):
        assert ours[i]["tokens"].tolist() == ref[i]["tokens"].tolist()
    batch = next(build_data_iterators(cfg, tok, report=False).train)
    assert batch["tokens"].shape == (2, 32)
    split = build_datasets(
        data_config(data_path=prefix, data_cache_dir=str(tmp_path / "c2"), eval_iters=5), tok
    )
    train_docs = set(np.asarray(split.train.document_index).tolist())
    assert max(train_docs) < 1341 and len(train_docs) == 1341  # 969/1000 of the 1,384 sequences


# ------------------------------------------------------------------------------------- index caches
class _Payload:
    """Unpickling it creates ``marker``: what megatron-core's allow_pickle=True load would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, kind: str, marker: Path) -> None:
    if kind == "raw pickle":
        path.write_bytes(pickle.dumps(_Payload(str(marker))))
    else:
        with open(path, "wb") as f:
            np.save(f, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)


def _cache_files(cache: Path, suffix: str) -> list[Path]:
    return sorted(cache.glob(f"*-train-{suffix}"))


@pytest.fixture()
def cached(tmp_path, tok, gappy_shard):
    """A built train cache and the samples it gives."""
    cfg = data_config(train_data_paths=[gappy_shard[0]], data_cache_dir=str(tmp_path / "cache"), eval_iters=0)
    ds = build_datasets(cfg, tok).train
    return cfg, tmp_path / "cache", [ds[i]["tokens"].tolist() for i in range(0, len(ds), 11)]


def _samples(cfg, tok) -> list[list[int]]:
    ds = build_datasets(cfg, tok).train
    return [ds[i]["tokens"].tolist() for i in range(0, len(ds), 11)]


@pytest.mark.parametrize("kind", ["raw pickle", "object .npy"])
def test_planted_pickle_never_runs(cached, tok, tmp_path, kind, caplog):
    cfg, cache, samples = cached
    target = _cache_files(cache, "document_index.npy")[0]
    marker = tmp_path / "pwned"
    _plant(target, kind, marker)
    planted = target.read_bytes()

    os.chmod(cache, 0o777)  # a shared directory: refused, nothing removed
    before = tree_digest(cache)
    with pytest.raises(DataError) as err:
        build_datasets(cfg, tok)
    message = str(err.value)
    assert "\n" not in message and str(target) in message and "private directory" in message
    assert not marker.exists() and tree_digest(cache) == before and target.read_bytes() == planted

    os.chmod(cache, 0o755)  # private to this user: rebuilt, with a warning naming the file
    with caplog.at_level(logging.WARNING, logger="megatron_stablelm.data.index_cache"):
        assert _samples(cfg, tok) == samples
    assert str(target) in caplog.text and not marker.exists()
    assert npy_header(str(target))[0] == np.int32

    # the planted payload was live: the loader megatron-core uses would have run it
    live = tmp_path / "live.npy"
    _plant(live, kind, marker)
    np.load(live, allow_pickle=True)
    assert marker.exists()


def test_truncated_cache_is_named_or_rebuilt(cached, tok):
    cfg, cache, samples = cached
    target = _cache_files(cache, "shuffle_index.npy")[0]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) - 8])
    os.chmod(cache, 0o775)  # group-writable: not private
    before = tree_digest(cache)
    with pytest.raises(DataError, match="truncated") as err:
        build_datasets(cfg, tok)
    assert "\n" not in str(err.value) and str(target) in str(err.value)
    assert tree_digest(cache) == before
    os.chmod(cache, 0o700)
    assert _samples(cfg, tok) == samples and target.read_bytes() == data


def test_cache_of_another_shape_is_refused(cached, tok):
    """A well-formed array that is not this dataset's (another build's sample index)."""
    cfg, cache, _ = cached
    target = _cache_files(cache, "sample_index.npy")[0]
    np.save(target, np.zeros((3, 2), dtype=np.int32))
    os.chmod(cache, 0o777)
    with pytest.raises(DataError, match=r"has shape \(3, 2\)"):
        build_datasets(cfg, tok)


def test_interrupted_build_leaves_no_cache(tmp_path, tok, gappy_shard, monkeypatch):
    """The disk fills while the second index array is being written: nothing is published."""
    cfg = data_config(train_data_paths=[gappy_shard[0]], data_cache_dir=str(tmp_path / "cache"), eval_iters=0)
    real_open, calls = np.lib.format.open_memmap, []

    def dying_open(*args, **kw):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_open(*args, **kw)

    monkeypatch.setattr(np.lib.format, "open_memmap", dying_open)
    with pytest.raises(OSError, match="No space"):
        build_datasets(cfg, tok)
    monkeypatch.setattr(np.lib.format, "open_memmap", real_open)
    assert len(calls) == 2 and ".staging-" in calls[0]
    # neither final files nor the staging directory; only the record of the shard check, which passed
    assert set(os.listdir(tmp_path / "cache")) <= {"shard-checks"}
    fresh = data_config(train_data_paths=[gappy_shard[0]], data_cache_dir=str(tmp_path / "c2"), eval_iters=0)
    assert _samples(cfg, tok) == _samples(fresh, tok)


def test_warm_start_reads_the_cache_without_building(cached, tok, monkeypatch):

    cfg, _, samples = cached

    def no_build(*args, **kw):
        raise AssertionError("the index was rebuilt although a valid cache exists")

    monkeypatch.setattr(index_cache, "build_indices", no_build)
    assert _samples(cfg, tok) == samples


def test_unwritable_cache_dir_is_one_line(tmp_path, tok, gappy_shard):
    (tmp_path / "file").write_text("not a directory")
    cfg = data_config(train_data_paths=[gappy_shard[0]], data_cache_dir=str(tmp_path / "file" / "cache"))
    with pytest.raises(DataError, match="cannot write the index cache in") as err:
        build_datasets(cfg, tok)
    assert "\n" not in str(err.value) and (tmp_path / "file").read_text() == "not a directory"


@pytest.mark.slow
def test_train_py_refuses_a_planted_cache_with_exit_2(tmp_path, tok, gappy_shard):
    values = tiny_dict(
        padded_vocab_size=512,
        tokenizer_type="HFTokenizer",
        vocab_file=tiny_tokenizer_files()["json"],
        train_data_paths=[gappy_shard[0]],
        data_cache_dir=str(tmp_path / "cache"),
        save=str(tmp_path / "run"),
    )
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(values))
    build_datasets(load_config([str(path)], training=True), tok)  # the cache train.py will look for
    marker = tmp_path / "pwned"
    for target in (tmp_path / "cache").glob("*.npy"):
        _plant(target, "raw pickle", marker)
    os.chmod(tmp_path / "cache", 0o777)
    before = tree_digest(tmp_path / "cache")
    result = run_train(path, synthetic=False, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("[train.py] error: index cache file '")
    assert not marker.exists() and tree_digest(tmp_path / "cache") == before
    assert "iter 1/" not in result.stdout and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------- preprocessing
def _preprocess_cli(*args: str) -> int:
    return _tool("preprocess_data").main(
        [
            *args,
            "--tokenizer-type",
            "HFTokenizer",
            "--vocab-file",
            tiny_tokenizer_files()["json"],
            "--no-progress",
        ]
    )


@pytest.mark.parametrize("content", ["", '{"text": ""}\n{"text": ""}\n'])
def test_preprocess_empty_input_is_an_error_unless_allowed(tmp_path, capsys, content):
    good = tmp_path / "good.jsonl"
    write_jsonl(good, ["a document", "another one"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    out = str(tmp_path / "out")
    assert _preprocess_cli("--input", str(good), "--output-prefix", out, "--append-eod") == 0
    capsys.readouterr()
    before = tree_digest(tmp_path)
    assert _preprocess_cli("--input", str(empty), "--output-prefix", out, "--append-eod") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(empty) in err and "no tokens" in err
    assert tree_digest(tmp_path) == before  # the good shard of that name is untouched
    assert _preprocess_cli("--input", str(empty), "--output-prefix", out, "--allow-empty") == 0
    info = check_shard(out + "_text_document", VOCAB)
    assert info.num_tokens == 0 and info.num_documents == content.count("\n")


def test_preprocess_unwritable_output_is_one_line(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", ["a document"])
    (tmp_path / "file").write_text("x")
    assert (
        _preprocess_cli(
            "--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "file" / "o")
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write shard") and "\n" not in err and str(tmp_path / "file") in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_preprocess_read_only_output_directory(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", ["a document"])
    out_dir = tmp_path / "ro"
    out_dir.mkdir()
    os.chmod(out_dir, 0o555)
    assert _preprocess_cli("--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(out_dir / "o")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(out_dir / "o") in err and "ermission denied" in err
    assert os.listdir(out_dir) == []


# ------------------------------------------------------------------------------------- demo corpus
def test_demo_corpus_rerun_reuses_or_repairs(tmp_path, capsys):
    args = ["--out", str(tmp_path / "demo"), "--max-mb", "0.1", "--vocab-size", "400", "--workers", "1"]
    assert _tool("make_demo_corpus").main(args) == 0
    (tmp_path / "demo" / "index-cache").mkdir()  # what a training run leaves
    first = tree_digest(tmp_path / "demo")
    assert _tool("make_demo_corpus").main(args) == 0
    assert "reused" in capsys.readouterr().out and tree_digest(tmp_path / "demo") == first
    shard = tmp_path / "demo" / "prose_text_document.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[:100])  # damaged: rebuilt in staging, moved into place, stale cache dropped
    assert _tool("make_demo_corpus").main(args) == 0
    assert shard.read_bytes() == good and not (tmp_path / "demo" / "index-cache").exists()
    assert not [p for p in os.listdir(tmp_path / "demo") if p.startswith(".staging")]
