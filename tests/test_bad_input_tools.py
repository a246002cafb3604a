"""Bad input to the command-line tools: one ``error: ...`` line naming the file, flag or value, exit
status 2, before any model is loaded, and nothing written. Every tool runs in-process through its
``main(argv)``; one tiny checkpoint (with optimizer files) and its HF export serve the whole module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megatron_stablelm import checkpoint, generation, parallel
from megatron_stablelm.launch.__main__ import main as launch_main
from tests.data_helpers import tiny_tokenizer_files, write_jsonl, write_synthetic_shard
from tests.test_checkpoint_tools import _add_training_files
from tests.test_generate import make_checkpoint
from tools import (
    convert_from_hf,
    convert_to_hf,
    evaluate,
    generate,
    mixture_report,
    preprocess_data,
    reshard_checkpoint,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(run directory, HF export) of one tiny random checkpoint with optimizer files; needs a
    single-rank process group only while it is built."""
    parallel.initialize(1)
    try:
        run, hf_dir = make_checkpoint("stablelm-2-1_6b", tmp_path_factory.mktemp("tiny"))
    finally:
        parallel.destroy()
    _add_training_files(checkpoint.resolve_checkpoint(run))
    return run, hf_dir


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a tool gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(generation, "load_checkpoint_model", refuse)


def error_line(capsys) -> str:
    """The last stderr line, which must be the one ``error:`` line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "error: " in lines[-1], lines
    return lines[-1]


def argparse_error(capsys, main, argv: list[str]) -> str:
    """The ``error:`` line of an argparse refusal (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return error_line(capsys)


# ------------------------------------------------------------------------------------- conversion
def test_convert_to_hf_refuses_an_output_under_a_file(tiny, tmp_path, capsys):
    run, _ = tiny
    (tmp_path / "file.txt").write_text("x")
    assert convert_to_hf.main([str(run), str(tmp_path / "file.txt" / "sub")]) == 2
    assert "file.txt" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_convert_from_hf_refuses_tp_zero(tiny, tmp_path, capsys):
    _, hf_dir = tiny
    assert "--tp" in argparse_error(
        capsys, convert_from_hf.main, [str(hf_dir), str(tmp_path / "o"), "--tp", "0"]
    )


def _hf_copy(hf_dir: Path, dest: Path) -> Path:
    shutil.copytree(hf_dir, dest)
    return dest


def test_convert_from_hf_refuses_a_truncated_safetensors_file(tiny, tmp_path, capsys):
    hf = _hf_copy(tiny[1], tmp_path / "hf")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert convert_from_hf.main([str(hf), str(tmp_path / "out")]) == 2
    assert "model.safetensors" in error_line(capsys) and not (tmp_path / "out").exists()


def test_convert_from_hf_refuses_a_config_without_hidden_size(tiny, tmp_path, capsys):
    hf = _hf_copy(tiny[1], tmp_path / "hf")
    values = json.loads((hf / "config.json").read_text())
    del values["hidden_size"]
    (hf / "config.json").write_text(json.dumps(values))
    assert convert_from_hf.main([str(hf), str(tmp_path / "out")]) == 2
    assert "hidden_size" in error_line(capsys) and not (tmp_path / "out").exists()


def test_convert_from_hf_merges_a_partial_config_over_the_hf_architecture(tiny, tmp_path, capsys):
    run, hf_dir = tiny
    partial = tmp_path / "partial.yml"
    partial.write_text("num_layers: 3\n")  # contradicts the HF model: still refused
    assert convert_from_hf.main([str(hf_dir), str(tmp_path / "bad"), "--config", str(partial)]) == 2
    assert "num_layers" in error_line(capsys) and not (tmp_path / "bad").exists()
    partial.write_text("train_iters: 5\n")
    assert convert_from_hf.main([str(hf_dir), str(tmp_path / "out"), "--config", str(partial)]) == 0
    cfg, original = checkpoint.read_config(tmp_path / "out"), checkpoint.read_config(run)
    assert cfg.train_iters == 5
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads) == (
        original.num_layers,
        original.hidden_size,
        original.num_attention_heads,
    )


def test_reshard_refuses_a_truncated_optimizer_file(tiny, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(checkpoint.resolve_checkpoint(tiny[0]), src)
    optim = src / "optim_tp00_dp000.safetensors"
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    assert reshard_checkpoint.main([str(src), str(tmp_path / "dst"), "--tp", "2"]) == 2
    assert "optim_tp00_dp000.safetensors" in error_line(capsys) and not (tmp_path / "dst").exists()


# ------------------------------------------------------------------------------ generate / evaluate
def test_generate_refuses_a_missing_gpu(tiny, capsys):
    device = f"cuda:{max(7, torch.cuda.device_count())}"
    assert generate.main([str(tiny[0]), "--prompt", "x", "--max-new-tokens", "2", "--device", device]) == 2
    assert device in error_line(capsys)


def test_generate_checks_numbers_and_prompt_records_before_the_model(tiny, tmp_path, capsys, no_model_load):
    run = str(tiny[0])
    assert "--batch-size" in argparse_error(
        capsys, generate.main, [run, "--prompt", "x", "--batch-size", "0"]
    )
    assert "--max-new-tokens" in argparse_error(
        capsys, generate.main, [run, "--prompt", "x", "--max-new-tokens", "-1"]
    )
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"prompt": "fine"}\n{"question": "no prompt field"}\n')
    assert generate.main([run, "--prompt-file", str(prompts)]) == 2
    assert f"{prompts}:2" in error_line(capsys)
    assert generate.main([run, "--prompt", "x", "--max-new-tokens", "100"]) == 2  # 64 positions
    assert "64 positions" in error_line(capsys)


def test_evaluate_checks_its_numbers_before_the_model(tiny, tmp_path, capsys, no_model_load):
    run = str(tiny[0])
    data = str(tmp_path / "a_text_document")
    write_synthetic_shard(data, [20, 7], eod=0, vocab=400)
    for flag in ("--seq-length", "--batches", "--micro-batch-size"):
        assert flag in argparse_error(capsys, evaluate.main, [run, "--data", data, flag, "0"])
    assert evaluate.main([run, "--data", data, "--seq-length", "65"]) == 2  # max_position_embeddings 64
    line = error_line(capsys)
    assert "--seq-length 65" in line and "64 positions" in line


# ----------------------------------------------------------------------------------- data tools
@pytest.mark.parametrize("flag", ["--workers", "--log-interval"])
def test_preprocess_refuses_non_positive_counts(flag, tmp_path, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", ["one document"])
    tok = tiny_tokenizer_files()["json"]
    argv = ["--input", str(docs), "--output-prefix", str(tmp_path / "out"), flag, "-2"]
    argv += ["--tokenizer-type", "HFTokenizer", "--vocab-file", tok]
    assert flag in argparse_error(capsys, preprocess_data.main, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


@pytest.mark.parametrize(
    ("name", "text"), [("empty.jsonl", ""), ("blank.jsonl", '{"text": " "}\n'), ("doc.txt", "\n")]
)
def test_train_tokenizer_refuses_input_without_text(name, text, tmp_path, capsys):
    (tmp_path / name).write_text(text)
    out = tmp_path / "tok"
    assert train_tokenizer.main(["--input", str(tmp_path / name), "--out", str(out)]) == 2
    assert name in error_line(capsys) and not out.exists()


def test_mixture_report_names_dp_size(capsys):
    assert "--dp-size" in argparse_error(capsys, mixture_report.main, [DEMO, "--dp-size", "0"])


# ---------------------------------------------------------------------------------------- launch
@pytest.mark.parametrize("gpus", ["hostfile", "--num-gpus"])
def test_launch_refuses_a_node_that_tp_does_not_divide(gpus, tmp_path, capsys):
    if gpus == "hostfile":
        (tmp_path / "hosts").write_text("node1 slots=3\n")
        argv = ["--override", f"hostfile={tmp_path / 'hosts'}", "model_parallel_size=2"]
    else:
        argv = ["--num-gpus", "3", "--override", "model_parallel_size=2"]
    assert launch_main([DEMO, "--dry-run", "--job-dir", str(tmp_path / "job"), *argv]) == 2
    line = error_line(capsys)
    assert "model_parallel_size=2" in line and ("slots=3" in line or "num_gpus=3" in line)
    assert not (tmp_path / "job").exists()
