"""Smoke test of ``tools/benchmark.py`` on a tiny config: it runs end to end (framework and
transformers) and reports every field. Timings are not asserted (CI machines vary)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_tool", ROOT / "tools" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_tiny_cpu(tmp_path, capsys):
    pytest.importorskip("transformers")
    bench = _load_benchmark()
    out = tmp_path / "result.json"
    argv = [
        str(ROOT / "configs/tiny/stablelm-2-1_6b.yml"),
        "--steps",
        "2",
        "--warmup",
        "1",
        "--device",
        "cpu",
    ]
    result = bench.main(
        argv + ["--seq-length", "16", "--micro-batch", "2", "--documents", "2", "--vs-hf", "--json", str(out)]
    )
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["tokens_per_step"] == 32
    for key in (
        "device",
        "dtype",
        "attention_backend",
        "flops_per_token",
        "matmul_ceiling_tflops",
        "speedup_vs_hf",
    ):
        assert key in result
    for side in ("framework", "hf"):
        metrics = result[side]
        for key in (
            "tokens_per_s",
            "tflops",
            "mfu_vs_matmul",
            "mfu_vs_peak",
            "peak_mem_gib",
            "step_s",
            "loss",
        ):
            assert key in metrics
        assert metrics["tokens_per_s"] > 0 and metrics["peak_mem_gib"] > 0
    assert result["hf"]["weights"].startswith("same weights")
    assert "speedup vs hf" in printed and "tokens/s" in printed


def test_flops_per_token_counts_stablelm_2_1_6b():
    """1.6B: ~1.64B parameters of which 0.2B input embedding; 6N + attention."""
    bench = _load_benchmark()
    from megatron_stablelm.config import load_config

    cfg = load_config([ROOT / "configs/stablelm-2-1_6b.yml"], report_ignored=False)
    flops = bench.flops_per_token(cfg, cfg.padded_vocab(), 4096)
    matmul_params = (flops - 6 * 24 * 4096 * 2048) / 6
    assert 1.40e9 < matmul_params < 1.46e9  # 24 layers × 51.4M + 205.5M LM head
