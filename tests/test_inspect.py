"""Parameter counts and the inspection entry point, against `transformers` models on the meta device."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_stablelm import hf_conversion, parallel
from megatron_stablelm.config import load_config
from megatron_stablelm.model import canonical_shapes

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("stablelm-*.yml"))


@pytest.fixture(scope="module")
def single_rank():
    parallel.initialize(1)
    yield
    parallel.destroy()


def test_all_model_sizes_are_shipped():
    names = {p.stem for p in SHIPPED}
    assert names >= {
        "stablelm-base-alpha-3b",
        "stablelm-base-alpha-7b",
        "stablelm-base-alpha-3b-v2",
        "stablelm-base-alpha-7b-v2",
        "stablelm-3b-4e1t",
        "stablelm-2-1_6b",
        "stablelm-2-12b",
    }


def framework_count(cfg) -> int:
    return sum(math.prod(s) for s in canonical_shapes(cfg, cfg.padded_vocab_size).values())


def test_3b_4e1t_has_model_card_parameter_count(single_rank):
    cfg = load_config([ROOT / "configs" / "stablelm-3b-4e1t.yml"], report_ignored=False)
    assert framework_count(cfg) == 2_795_443_200


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_count_equals_transformers(path, single_rank):
    cfg = load_config([path], overrides=["model_parallel_size=1"], report_ignored=False)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(
            hf_conversion.hf_config(cfg, cfg.padded_vocab_size, torch.bfloat16)
        )
    hf_count = sum(p.numel() for p in hf.parameters())
    if not cfg.use_bias_in_norms:  # HF's LayerNorms always carry a bias; ours are zero-filled on export
        hf_count -= sum(
            m.bias.numel() for m in hf.modules() if isinstance(m, torch.nn.LayerNorm) and m.bias is not None
        )
    assert framework_count(cfg) == hf_count


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize(
    "variant",
    [[], ["qk_norm=true", "use_bias_in_qk_norm=true"], ["gpt_j_residual=true", "gpt_j_tied=true"]],
    ids=["as-shipped", "qk-norm", "one-norm"],
)
def test_arithmetic_parameter_count_equals_the_model(variant, tp):
    """``parameters_per_gpu`` (the memory estimate's count, no model built) against the meta model's
    shapes and TP splits, for every shipped architecture (at 2 layers: the count is linear in them)."""
    from megatron_stablelm.inspect import parameters_per_gpu
    from megatron_stablelm.model import config_splits

    for path in SHIPPED + sorted((ROOT / "configs" / "tiny").glob("*.yml")):
        overrides = [f"model_parallel_size={tp}", "num_layers=2", "attention_config=null", *variant]
        cfg = load_config([path], overrides=overrides, report_ignored=False)
        splits = config_splits(cfg)
        shapes = canonical_shapes(cfg, cfg.padded_vocab_size)
        held = sum(math.prod(s) // (1 if splits[n].dim is None else tp) for n, s in shapes.items())
        assert parameters_per_gpu(cfg, cfg.padded_vocab_size) == held, path.name


def run_inspect(*args):
    return subprocess.run(
        [sys.executable, "-m", "megatron_stablelm.inspect", *args], cwd=ROOT, capture_output=True, text=True
    )


def test_inspect_cli_prints_architecture_and_memory():
    proc = run_inspect("configs/stablelm-3b-4e1t.yml", "--dp", "8")
    assert proc.returncode == 0, proc.stderr
    assert "2,795,443,200" in proc.stdout and "padded vocab:        50,304" in proc.stdout
    assert "optimizer states" in proc.stdout and "TP=1 × DP=8" in proc.stdout


def test_inspect_without_tokenizer_needs_vocab(tmp_path):
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\nvocab_file: missing.json\n"
    )
    proc = run_inspect(str(cfg))
    assert proc.returncode == 2 and "padded_vocab_size" in proc.stderr and "missing.json" in proc.stderr
    proc = run_inspect(str(cfg), "--padded-vocab-size", "512")
    assert proc.returncode == 0 and "padded vocab:        512" in proc.stdout


def test_the_estimate_uses_the_zero_stage_the_trainer_runs():
    """bf16 always runs under ZeRO (stage 1 at least): a config asking for stage 0 is estimated at the
    stage it gets, its optimizer state split over DP (the estimate used the requested stage)."""
    import dataclasses

    from megatron_stablelm.inspect import estimate_memory

    cfg = load_config([ROOT / "configs" / "stablelm-2-1_6b.yml"], report_ignored=False)
    asked_0 = dataclasses.replace(cfg, zero_optimization={**(cfg.zero_optimization or {}), "stage": 0})
    assert asked_0.params_dtype_name == "bf16" and asked_0.effective_zero_stage == 1
    stage_1 = dataclasses.replace(cfg, zero_optimization={**(cfg.zero_optimization or {}), "stage": 1})
    assert (
        estimate_memory(asked_0, 100352, dp=8).optimizer == estimate_memory(stage_1, 100352, dp=8).optimizer
    )
    assert (
        estimate_memory(asked_0, 100352, dp=8).optimizer * 8
        == estimate_memory(asked_0, 100352, dp=1).optimizer
    )
