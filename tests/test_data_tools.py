"""The data tools end to end: demo corpus -> tokenizer + shards -> datasets; mixture report CLI;
the single ``data_path`` train/valid/test split."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_stablelm.data import build_data_iterators, build_datasets, build_tokenizer
from tests.data_helpers import data_config, tiny_tokenizer_files, write_synthetic_shard

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_corpus_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert (
        _tool("make_demo_corpus").main(
            ["--out", str(out), "--max-mb", "0.3", "--vocab-size", "600", "--workers", "1"]
        )
        == 0
    )
    tok = build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=str(out / "tokenizer.json"))
    tik = build_tokenizer(tokenizer_type="TiktokenTokenizer", vocab_file=str(out / "tokenizer.tiktoken"))
    assert tok.vocab_size == 600 and tik.eod == 599  # same 599 ranks, specials appended
    code = IndexedDataset(str(out / "code_text_document"))
    first = (out / "code.jsonl").read_text().splitlines()[0]
    import json

    assert code[0].tolist() == tok.encode(json.loads(first)["text"]) + [tok.eod]
    cfg = data_config(
        vocab_file=str(out / "tokenizer.json"),
        seq_length=64,
        train_iters=20,
        train_data_paths=[str(out / "code_text_document"), str(out / "prose_text_document")],
        train_data_weights=[1.0, 1.0],
        reset_attention_mask=True,
    )
    its = build_data_iterators(cfg, tok, report=False)
    batch = next(its.train)
    assert batch["tokens"].shape == (2, 64) and int(batch["tokens"].max()) < 600


def test_mixture_report_cli(tmp_path, capsys):
    tok = build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=tiny_tokenizer_files()["json"])
    write_synthetic_shard(str(tmp_path / "small"), [10] * 50, tok.eod, 400)  # 500 tokens
    write_synthetic_shard(str(tmp_path / "large"), [100] * 95, tok.eod, 400, seed=1)  # 9,500 tokens
    config = {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "seq_length": 10,
        "train_iters": 100,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_data_paths": [str(tmp_path / "small"), str(tmp_path / "large")],
        "train_data_weights": [1, 1],
        "mixture_epochs_warning": 4,
    }
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    assert _tool("mixture_report").main([str(path), "--dp-size", "2"]) == 0
    out = capsys.readouterr().out
    # 400 samples x 10 tokens; half each: small 2,000 tokens = 4 epochs (not above 4), large 0.21
    assert "4.00" in out and "0.21" in out and "WARNING" not in out
    assert _tool("mixture_report").main([str(path), "--dp-size", "4"]) == 0
    assert "8.00" in (out := capsys.readouterr().out) and f"WARNING: '{tmp_path / 'small'}'" in out
    path.write_text(
        yaml.safe_dump({**config, "train_data_paths": [str(tmp_path / "gone")], "train_data_weights": [1]})
    )
    assert _tool("mixture_report").main([str(path)]) == 2  # bad input: exit 2, as every tool
    err = capsys.readouterr().err
    assert f"{tmp_path / 'gone'}: no corpus recipe writes this name" in err and "do not exist" in err


def test_single_data_path_is_split_without_overlap(tmp_path):
    tok = build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=tiny_tokenizer_files()["json"])
    write_synthetic_shard(str(tmp_path / "all"), [30] * 1000, tok.eod, 400)
    cfg = data_config(data_path=str(tmp_path / "all"), data_cache_dir=str(tmp_path / "cache"), eval_iters=5)
    ds = build_datasets(cfg, tok)
    docs = {name: set(np.asarray(ds[name].document_index).tolist()) for name in ("train", "valid", "test")}
    assert max(docs["train"]) < min(docs["valid"]) and max(docs["valid"]) < min(docs["test"])
    assert len(docs["train"]) == 969 and len(docs["valid"]) == 30 and len(docs["test"]) == 1
    its = build_data_iterators(cfg, tok, report=False)
    assert len(list(itertools.islice(its.test, 100))) == 5 * 2  # eval_iters x grad_accum micro-batches


def test_a_shard_smaller_than_one_sample_is_named(tmp_path):
    from megatron_stablelm.data.datasets import plan_splits
    from megatron_stablelm.data.mixture import format_mixture_report
    from tests.data_helpers import data_config

    write_synthetic_shard(str(tmp_path / "tiny"), [5, 5], 0, 100)  # 10 tokens; a sample needs 33
    plan = plan_splits(data_config(train_data_paths=[str(tmp_path / "tiny")]), 100, scan_tokens=False)[0]
    report = format_mixture_report(plan, 32, 4.0)
    assert (
        f"WARNING: '{tmp_path / 'tiny'}' holds 10 tokens in the train split, fewer than one sample" in report
    )
