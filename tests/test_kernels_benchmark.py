"""Smoke test of ``tools/benchmark.py`` on a tiny config: it runs end to end (framework and
transformers) and reports every field. Timings are not asserted (CI machines vary)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_tiny_cpu(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tools import benchmark as bench

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
