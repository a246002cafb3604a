"""The shared command-line conventions (megatron_stablelm/cli.py) and the NCCL-without-CUDA fallback."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.distributed as dist

from megatron_stablelm import parallel
from megatron_stablelm.cli import add_config_arguments, overrides_from, parse_config_args
from megatron_stablelm.config import load_config

TINY = "configs/tiny/stablelm-2-1_6b.yml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--flag", action="store_true")
    return p


@pytest.mark.parametrize(
    "argv",
    [
        ["a.yml", "b.yml", "--override", "x=1", "y=2"],
        ["--override", "x=1", "y=2", "a.yml", "b.yml"],
        ["a.yml", "-o", "x=1", "b.yml", "--override", "y=2"],
        ["a.yml", "--flag", "--override", "x=1", "y=2", "--dp", "3", "b.yml"],
        ["--override", "x=1", "a.yml", "--flag", "b.yml", "-o", "y=2"],
    ],
)
def test_override_anywhere_keeps_configs_in_order(argv):
    args = parse_config_args(_parser(), argv)
    assert args.configs == ["a.yml", "b.yml"]
    assert overrides_from(args) == ["x=1", "y=2"]


def test_no_config_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config_args(_parser(), ["--override", "x=1"])
    assert exc.value.code == 2
    assert "CONFIG" in capsys.readouterr().err


def test_override_before_the_config_loads_the_same_config():
    """The issue's case: `--override` before the config path must not swallow it."""
    first = parse_config_args(_parser(), ["--override", "num_layers=3", "seq_length=16", TINY])
    last = parse_config_args(_parser(), [TINY, "--override", "num_layers=3", "seq_length=16"])
    a = load_config(first.configs, overrides_from(first), report_ignored=False)
    b = load_config(last.configs, overrides_from(last), report_ignored=False)
    assert a == b and a.num_layers == 3 and a.seq_length == 16


def test_benchmark_uses_the_shared_grammar():
    from tools.benchmark import parse_args

    args = parse_args(["--override", "num_layers=1", TINY, "--steps", "2"])
    assert args.config == [TINY] and overrides_from(args) == ["num_layers=1"] and args.steps == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without CUDA")
def test_nccl_without_cuda_falls_back_to_gloo_with_one_line(capsys):
    parallel.destroy()
    parallel.initialize(1, backend="nccl")
    try:
        assert dist.get_backend() == "gloo"
    finally:
        parallel.destroy()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distributed_backend 'nccl'" in err[0] and "gloo" in err[0]
    assert parallel.usable_backend("gloo") == "gloo"


def test_train_tokenizer_refuses_to_overwrite_without_force(tmp_path, capsys):
    from tools.train_tokenizer import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(f'{{"text": "word{i} other{i % 7} text"}}\n' for i in range(200)))
    out = tmp_path / "tok"
    assert main(["--input", str(tmp_path / "none*.jsonl"), "--out", str(out)]) == 2
    assert "none*.jsonl" in capsys.readouterr().err and not out.exists()
    assert main(["--input", str(corpus), "--out", str(out), "--vocab-size", "300"]) == 0
    first = (out / "tokenizer.json").read_bytes()
    capsys.readouterr()
    assert main(["--input", str(corpus), "--out", str(out), "--vocab-size", "260"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "tokenizer.json").read_bytes() == first
    assert main(["--input", str(corpus), "--out", str(out), "--vocab-size", "260", "--force"]) == 0
    assert (out / "tokenizer.json").read_bytes() != first
