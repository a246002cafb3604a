"""megatron_stablelm.metrics: the FLOPs per token of both conventions against independent counts
(PyTorch's FlopCounterMode on a real forward + backward, the model's own parameters), the peak table's
name matching, the published H100 figures, and the training log and the benchmark giving the same MFU
for the same step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_stablelm import metrics, parallel
from megatron_stablelm.config import load_config
from megatron_stablelm.model import build_model
from tests.model_helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]
ARCH_CASES = [
    ("stablelm-2-1_6b", {}),  # gated MLP, QKV bias, untied
    ("stablelm-2-12b", {}),  # grouped-query attention
    ("stablelm-base-alpha-v1", {}),  # plain (not gated) MLP
    ("stablelm-2-1_6b", {"no_weight_tying": False}),  # tied embeddings
]


@pytest.fixture(scope="module")
def single_rank():
    parallel.initialize(1)
    yield
    parallel.destroy()


def _counted_attention_flops_per_token(batch: int, seq: int, heads: int, head_dim: int) -> float:
    """FlopCounterMode's count of explicit full (unmasked) attention, forward + backward, per token
    and layer: the scores ``q k^T`` and the weighted sum ``p v``."""
    q, k, v = (torch.randn(batch, heads, seq, head_dim, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        out.sum().backward()
    return counter.get_total_flops() / (batch * seq)


@pytest.mark.parametrize(("arch", "overrides"), ARCH_CASES)
def test_strict_flops_match_counted_matmuls_and_causal_attention(single_rank, arch, overrides):
    """The model's matmuls counted on a real training step, plus half of the counted full attention
    (the causal triangle, as the convention states), equal flops_per_token exactly."""
    cfg = tiny_config(arch, **overrides)
    vocab, batch, seq = cfg.padded_vocab(), 2, cfg.seq_length
    model = build_model(cfg, vocab, dtype="fp32").train()
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(tokens, labels=tokens).sum().backward()
    by_op = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    # on CPU the attention kernel is not counted by FlopCounterMode: only the linear layers are
    assert set(by_op) <= {"aten.mm", "aten.addmm"}, by_op
    matmuls = sum(by_op.values()) / (batch * seq)
    full_attention = _counted_attention_flops_per_token(batch, seq, cfg.num_attention_heads, cfg.head_dim)
    expected = matmuls + cfg.num_layers * full_attention / 2
    assert metrics.flops_per_token(cfg, vocab) == expected
    assert metrics.flops_per_token(cfg, vocab, 4 * seq) > expected  # the attention term grows with seq


@pytest.mark.parametrize(("arch", "overrides"), ARCH_CASES)
def test_6n_12lsh_flops_count_every_weight_matrix(single_rank, arch, overrides):
    """6 × every weight matrix of the model (both embeddings when untied, once when tied; per-head
    norm weights are not matrices) + 12·l·s·h."""
    cfg = tiny_config(arch, **overrides)
    vocab = cfg.padded_vocab()
    model = build_model(cfg, vocab, dtype="fp32")
    weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "norm" not in n)
    attention = 12 * cfg.num_layers * cfg.seq_length * cfg.hidden_size
    assert metrics.flops_per_token_6n_12lsh(cfg, vocab) == 6 * weights + attention


def test_flops_per_token_counts_stablelm_2_1_6b():
    """1.6B: ~1.64B parameters of which 0.2B input embedding; 6N + attention."""
    cfg = load_config([ROOT / "configs/stablelm-2-1_6b.yml"], report_ignored=False)
    flops = metrics.flops_per_token(cfg, cfg.padded_vocab(), 4096)
    matmul_params = (flops - 6 * 24 * 4096 * 2048) / 6
    assert 1.40e9 < matmul_params < 1.46e9  # 24 layers × 51.4M + 205.5M LM head


def test_published_h100_figures_keep_their_meaning():
    """benchmarks/RESULTS.md: 50,782 tokens/s on an H100 SXM is 499.7 TFLOP/s, 50.5% MFU in the strict
    convention and 63.1% in the 6N+12lsh one."""
    cfg = load_config([ROOT / "configs/stablelm-2-1_6b.yml"], report_ignored=False)
    vocab = cfg.padded_vocab()
    peak = metrics.device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
    strict = metrics.flops_per_token(cfg, vocab, 4096)
    anchors = metrics.flops_per_token_6n_12lsh(cfg, vocab, 4096)
    assert peak == 989.0
    assert round(metrics.tflops_per_device(50_782, strict), 1) == 499.7
    assert round(100 * metrics.mfu(50_782, strict, peak), 1) == 50.5
    assert round(100 * metrics.mfu(50_782, anchors, peak), 1) == 63.1
    # eight GPUs sharing eight times the throughput: the same per-device figure
    assert metrics.mfu(8 * 50_782, strict, peak, devices=8) == pytest.approx(
        metrics.mfu(50_782, strict, peak)
    )
    assert metrics.mfu(50_782, strict, None) is None


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "fp16", 835.0),
        ("NVIDIA GH200 480GB", "bf16", 989.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA A10G", "bf16", 70.0),
        ("Tesla V100-SXM2-16GB", "fp16", 125.0),
        ("Tesla V100-SXM2-16GB", "bf16", None),
        ("AMD Instinct MI300X", "bf16", 1307.0),
        ("NVIDIA GeForce GTX 1080", "fp32", None),
    ],
)
def test_device_peak_by_name(name, precision, peak):
    assert metrics.device_peak_tflops(name, precision) == peak


def test_config_peak_overrides_the_table():
    cfg = tiny_config("stablelm-2-1_6b", peak_tflops=123.0)
    assert metrics.peak_tflops(cfg, "bf16", torch.device("cpu")) == 123.0
    assert metrics.peak_tflops(tiny_config("stablelm-2-1_6b"), "bf16", torch.device("cpu")) is None


def test_training_log_and_benchmark_report_the_same_mfu(capsys):
    """The benchmark's measured step (tokens/s, config, peak from the config) fed to the training log
    the way training/loop.py builds it: the same MFU, TFLOP/s and printed percentage."""
    pytest.importorskip("transformers")
    from megatron_stablelm.metrics import flops_per_token, peak_tflops
    from megatron_stablelm.training.logging import MetricsLogger, StepRecord
    from tools import benchmark as bench

    config = str(ROOT / "configs/tiny/stablelm-2-1_6b.yml")
    args = ["--steps", "2", "--warmup", "1", "--device", "cpu", "--seq-length", "16", "--micro-batch", "2"]
    result = bench.main([config, *args, "--override", "peak_tflops=0.002"])
    printed = capsys.readouterr().out
    bench_mfu = re.search(r"^framework .*?(\d+\.\d)%", printed, re.M).group(1)  # the MFU(peak) column

    cfg = bench.load_benchmark_config(
        [Path(config)], ["seq_length=16", "max_position_embeddings=16", "peak_tflops=0.002"]
    )
    scalars: dict[str, float] = {}
    logger = MetricsLogger(
        cfg, flops_per_token(cfg, cfg.padded_vocab()), peak_tflops(cfg, "fp32"), 1, 1, print_fn=print
    )
    logger.scalars = lambda values, step: scalars.update(values)
    framework = result["framework"]
    line = logger.record(
        StepRecord(1, 1.0, 1e-4, None, None, framework["step_s"], result["tokens_per_step"], False)
    )
    assert scalars["train/mfu"] == pytest.approx(framework["mfu_vs_peak"], rel=1e-12)
    assert scalars["train/tflops_per_gpu"] == pytest.approx(framework["tflops"], rel=1e-12)
    assert f"MFU {bench_mfu}%" in line


@pytest.mark.parametrize(
    ("value", "text"), [(999, "999"), (2000, "2K"), (1_536_000, "1.536M"), (1.5e9, "1.5G"), (2e18, "2000P")]
)
def test_si_prefixed(value, text):
    assert metrics.si_prefixed(value) == text
