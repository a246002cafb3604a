"""Exact resume: 20 steps straight vs the same run resumed from its step-10 checkpoint gives bitwise
identical losses and final weights (fp32, CPU, DP=2 ZeRO-1, so the optimizer state really is
partitioned). Then the same checkpoint loads at another layout (TP=2, DP=1, no ZeRO: re-split weights
and optimizer state, merged ZeRO partitions) and continues within 1e-5."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_stablelm.checkpoint import resolve_checkpoint
from tests.train_helpers import losses, run_ranks, tiny_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """20 steps in one go at DP=2 ZeRO-1, saving at 10 (saving must not perturb training)."""
    root = tmp_path_factory.mktemp("straight")
    cfg = tiny_dict(
        train_iters=20,
        warmup=0.1,
        save=str(root / "ckpt"),
        checkpoint_factor=10,
        eval_interval=5,
        eval_iters=1,
    )
    recs = run_ranks(2, cfg, root / "out", save_weights=True)
    assert recs[0]["checkpoints"][0].endswith("iter_0000010")
    return cfg, root, recs[0]


def test_resume_is_bitwise_exact(straight, tmp_path):
    cfg, root, full = straight
    resumed_cfg = dict(cfg, load=str(root / "ckpt"), iteration=10, save=str(tmp_path / "ckpt"))
    recs = run_ranks(2, resumed_cfg, tmp_path / "out", save_weights=True)
    rec = recs[0]
    assert rec["exit_reason"] == "done"
    assert any("resumed from" in line and "iteration 10" in line for line in rec["log"])
    assert sorted(rec["losses"], key=int)[0] == "11"
    assert losses(rec) == losses(full)[10:]  # bitwise: float equality of every loss
    assert rec["state"] == full["state"]  # iteration, consumed train/valid samples, tokens
    assert [e["loss"] for e in rec["evals"]] == [e["loss"] for e in full["evals"] if e["iteration"] > 10]
    a = torch.load(root / "out" / "weights.pt")
    b = torch.load(tmp_path / "out" / "weights.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_at_other_tp_dp_and_zero_stage(straight, tmp_path):
    cfg, root, full = straight
    other = dict(
        cfg,
        load=str(root / "ckpt"),
        iteration=10,
        save=str(tmp_path / "ckpt"),
        model_parallel_size=2,
        train_micro_batch_size_per_gpu=4,  # same global batch with DP=1
        zero_optimization={"stage": 0},
    )
    recs = run_ranks(2, other, tmp_path / "out")
    assert losses(recs[0]) == pytest.approx(losses(full)[10:], rel=1e-5)
    assert any("saved at TP=1 DP=2, now TP=2 DP=1" in line for line in recs[0]["log"])
    saved = json.loads((resolve_checkpoint(tmp_path / "ckpt") / "train_state.json").read_text())
    assert (saved["iteration"], saved["tp_size"], saved["dp_size"]) == (20, 2, 1)


def test_bf16_resume_is_exact(tmp_path):
    """bf16 compute, fp32 master weights and Adam state under ZeRO-1: 8 steps straight vs 4 + resume
    + 4 give identical losses (the fp32 master copy, not the bf16 weights, is what resumes)."""
    cfg = tiny_dict(train_iters=8, bf16={"enabled": True}, save=str(tmp_path / "ckpt"), checkpoint_factor=4)
    full = run_ranks(2, cfg, tmp_path / "full")[0]
    resumed_cfg = dict(cfg, load=str(tmp_path / "ckpt"), iteration=4, save=str(tmp_path / "ckpt2"))
    resumed = run_ranks(2, resumed_cfg, tmp_path / "resumed")[0]
    assert resumed["exit_reason"] == "done"
    assert losses(resumed) == losses(full)[4:]
