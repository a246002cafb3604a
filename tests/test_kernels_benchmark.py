"""Smoke test of ``tools/benchmark.py`` on a tiny config: it runs end to end (framework and
transformers) and reports every field. Timings are not asserted (CI machines vary)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_checks():
    """``benchmarks/gpu_checks.py`` (a script, not a package module), imported."""
    import importlib
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("gpu_checks")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


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


def test_benchmark_trainer_mode_tiny_cpu(tmp_path, capsys):
    """``--mode trainer``: the TrainingEngine step against transformers with an fp32 master copy. Same
    weights and batch, so the first step's losses agree; every figure is positive."""
    pytest.importorskip("transformers")
    pytest.importorskip("deepspeed")
    from tools import benchmark as bench

    out = tmp_path / "trainer.json"
    argv = [str(ROOT / "configs/tiny/stablelm-2-1_6b.yml"), "--mode", "trainer", "--steps", "2"]
    argv += ["--warmup", "1", "--device", "cpu", "--seq-length", "16", "--micro-batch", "2"]
    result = bench.main(argv + ["--vs-hf", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["mode"] == "trainer"
    assert result["tokens_per_step"] == 32 and result["dtype"] == "fp32"
    for side in ("framework", "hf"):
        m = result[side]
        for key in ("tokens_per_s", "tflops", "mfu_vs_matmul", "peak_mem_gib", "step_s", "loss"):
            assert m[key] > 0, (side, key)
    assert result["framework"]["applied"] and result["framework"]["grad_norm"] > 0
    assert abs(result["framework"]["first_loss"] - result["hf"]["first_loss"]) < 1e-5
    assert result["speedup_vs_hf"] > 0
    assert "step (trainer)" in printed and "first-step loss" in printed


def test_run_gpu_script_syntax():
    import subprocess

    subprocess.run(["bash", "-n", str(ROOT / "benchmarks/run_gpu.sh")], check=True)


def test_gpu_checks_on_a_cpu_run(tmp_path):
    """``benchmarks/gpu_checks.py`` (the Python half of run_gpu.sh's trainer steps) on a real tiny
    ``train.py`` run: the summary reads the trainer's figures from its metrics file (not its log
    lines), a run equals itself bitwise, a perturbed loss fails the tolerance, and the verdict names
    what did not run."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    overrides = ["train_iters=4", "lr_decay_iters=4", f"save={run}", "log_interval=1", "eval_interval=0"]
    overrides.append("optimizer={type: Adam, params: {lr: 0.001}}")
    cmd = [sys.executable, "train.py", "configs/tiny/stablelm-2-1_6b.yml", "--synthetic-data", "--override"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    subprocess.run(cmd + overrides, cwd=ROOT, env=env, capture_output=True, check=True)
    gpu_checks = _gpu_checks()
    summary = gpu_checks.train_summary(run, skip=1)
    assert summary["iterations"] == 3 and summary["last_iteration"] == 4
    assert (
        summary["tokens_per_s"] > 0 and summary["peak_mem_gib"] > 0 and summary["tflops_per_gpu"] is not None
    )
    same = gpu_checks.compare_losses(run / "metrics.jsonl", run, 2, gpu_checks.RESUME_RTOL)
    assert same["ok"] and same["bitwise_equal"] and same["compared"] == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    bumped = [json.loads(line) for line in lines]
    for r in bumped:
        if r.get("kind") == "train":
            r["loss"] *= 1.01
    (tmp_path / "bumped.jsonl").write_text("\n".join(json.dumps(r) for r in bumped))
    assert not gpu_checks.compare_losses(run, tmp_path / "bumped.jsonl", 2, gpu_checks.RESUME_RTOL)["ok"]
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "train_recompute.json").write_text(json.dumps({**summary, "micro_batch": 2}))
    (tmp_path / "res" / "train_recompute_mb8.json").write_text(json.dumps({**summary, "micro_batch": 8}))
    rows = gpu_checks.verdict(tmp_path / "res")
    table = "\n".join(rows)
    assert "train_recompute" in table and "did not run or failed" in table and "FAIL" in table
    # every micro-batch of the train_recompute_large step gets its own row
    assert any(r.startswith("train_recompute_mb8") and "ok" in r and "mb 8:" in r for r in rows)
    assert any(
        r.startswith("trainer_vs_model") and "FAIL" in r and "(hf and trainer_bench)" in r for r in rows
    )


def test_verdict_sets_the_trainer_step_beside_the_model_step(tmp_path):
    """The ``trainer_vs_model`` row: the cost of the trainer's step over the model-only step, from
    ``hf`` and ``trainer_bench`` run in the same call, and refused when the two ran on different
    devices or batches."""

    gpu_checks = _gpu_checks()

    def bench(tokens_per_s: float, **kw) -> dict:
        step = 16384 / tokens_per_s
        return {"device": "H100", "micro_batch": 4, "seq_length": 4096, **kw,
                "framework": {"tokens_per_s": tokens_per_s, "step_s": step}}  # fmt: skip

    (tmp_path / "1_6b_vs_hf.json").write_text(json.dumps(bench(50_000.0)))
    (tmp_path / "trainer_bench.json").write_text(json.dumps(bench(47_000.0)))
    row = [r for r in gpu_checks.verdict(tmp_path) if r.startswith("trainer_vs_model")]
    assert len(row) == 1 and " ok " in row[0] and "costs 6.0% (20.9 ms a step)" in row[0], row
    (tmp_path / "trainer_bench.json").write_text(json.dumps(bench(47_000.0, device="H200", micro_batch=2)))
    row = [r for r in gpu_checks.verdict(tmp_path) if r.startswith("trainer_vs_model")][0]
    assert "FAIL" in row and "device H100 vs H200, micro_batch 4 vs 2" in row, row


def test_varlen_data_for_the_packed_document_run(tmp_path):
    """``gpu_checks.py varlen-data`` (the inputs of run_gpu.sh's train_varlen step): a tokenizer and
    a shard whose documents all end with its end-of-document token, at web-like lengths."""

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_stablelm.data import build_tokenizer

    gpu_checks = _gpu_checks()
    facts = gpu_checks.varlen_data(tmp_path / "vl", 30_000)
    tok = build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=facts["tokenizer"])
    shard = IndexedDataset(facts["prefix"])
    assert len(shard) == facts["documents"] > 10 and shard.sequence_lengths.sum() == facts["tokens"] >= 30_000
    docs = [shard[i] for i in range(len(shard))]
    assert all(d[-1] == tok.eod and (d[:-1] != tok.eod).all() and d.max() < tok.vocab_size for d in docs)
    assert 200 < facts["mean_document_tokens"] < 3_000


def test_web_document_batch_follows_the_loader_rule():
    """``benchmark.py --documents web``: rows cut from one stream of web-like documents (consecutive
    rows overlap by one token, as megatron-core's samples), document boundaries right after every EOD
    and at every row start (checked by brute force), and the attention work the report states."""
    import numpy as np
    import torch

    from megatron_stablelm.config import load_config
    from megatron_stablelm.training.synthetic import web_document_tokens
    from tools import benchmark as bench

    rows = web_document_tokens(8, 256, 50, eod=49, seed=1)
    assert rows.shape == (8, 257) and (rows[:-1, -1] == rows[1:, 0]).all()
    assert (rows == 49).sum() >= 2  # documents of ~700 tokens: several ends in 2,048 tokens
    assert web_document_tokens(8, 256, 50, eod=49, seed=1).tolist() == rows.tolist()

    cfg = load_config(ROOT / "configs/tiny/stablelm-2-1_6b.yml")
    cfg.seq_length = seq = 512  # the benchmark's --seq-length sets the config's
    batch = bench.make_batch(cfg, 64, 4, seq, torch.device("cpu"), "web", seed=3)
    tokens = batch["tokens"].numpy()
    starts = [r * seq + c for r in range(4) for c in range(seq) if c == 0 or tokens[r, c - 1] == 63]
    assert batch["cu_seqlens"].tolist() == starts + [4 * seq]
    lengths = np.diff(starts + [4 * seq])
    assert batch["max_seqlen"] == lengths.max() and len(starts) > 4
    assert (batch["loss_mask"] == 0).sum() == ((batch["labels"] == 63).sum() if cfg.eod_mask_loss else 0)
    setup = bench.Setup(cfg, torch.device("cpu"), "fp32", 64, 4, "", None, batch, "model")
    share = bench._document_stats(setup)
    assert share["documents_in_batch"] == len(starts)
    assert share["attention_work_share"] == pytest.approx(
        (lengths * (lengths + 1) / 2).sum() / (4 * seq * (seq + 1) / 2)
    )
