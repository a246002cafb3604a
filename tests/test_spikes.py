"""Loss spikes (issue 25): a spiking step is skipped on every rank; repeated spikes roll the run back to
its last checkpoint and skip the data window since; the window is recorded, so a resume reproduces the
run bitwise; and the same window configured by hand (``skip_train_iteration_range``) is exactly what
the rollback does. Every run: 2 gloo ranks (DP=2), synthetic data, fp32, ZeRO-1."""

from __future__ import annotations

import json
import math

import pytest

from megatron_stablelm.training.faults import FAULTS_ENV, Faults
from megatron_stablelm.training.spikes import SpikeGuard, parse_iteration_ranges
from tests.train_helpers import run_ranks, tiny_dict

SPIKES = dict(
    spike_loss_ratio=2.0, spike_rollback_skips=2, spike_rollback_window=2, spike_grad_norm_ratio=5.0
)


def test_the_guard_decides_on_the_running_mean():
    guard = SpikeGuard(ratio=2.0, rollback_skips=2, rollback_window=3)
    assert not guard.is_spike(1, 5.0) and guard.ewm == 5.0
    assert not guard.is_spike(2, 4.0) and guard.ewm == pytest.approx(0.8 * 5.0 + 0.2 * 4.0)  # span 9
    mean = guard.ewm
    assert guard.is_spike(3, 10.0) and guard.ewm == mean  # a spike does not move the mean
    assert not guard.should_roll_back(3)
    assert guard.is_spike(6, 99.0) and not guard.should_roll_back(6)  # 3 fell out of the window
    assert guard.is_spike(7, 99.0) and guard.should_roll_back(7)
    assert not SpikeGuard(ratio=None).is_spike(1, 1e9)
    # gradient norms: their own running mean; a spike counts toward the rollback (it cannot be skipped)
    grads = SpikeGuard(ratio=None, rollback_skips=2, rollback_window=5, grad_ratio=3.0)
    assert not grads.is_grad_spike(1, 1.0) and not grads.is_grad_spike(2, 2.0)
    assert grads.grad_ewm == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)
    assert not grads.is_grad_spike(3, float("nan")) and not grads.is_grad_spike(3, None)
    assert grads.is_grad_spike(4, 10.0) and not grads.should_roll_back(4)
    assert grads.is_grad_spike(5, 10.0) and grads.should_roll_back(5)
    assert grads.state_dict()["grad_ewm"] == pytest.approx(1.2)


def test_ranges_and_faults_are_read_and_bad_ones_named():
    assert parse_iteration_ranges(["251-300", "101-200", 7]) == [(7, 7), (101, 200), (251, 300)]
    for bad in ("5-", "9-3", "0-2", "x"):
        with pytest.raises(ValueError, match="skip_train_iteration_range"):
            parse_iteration_ranges([bad])
    faults = Faults.from_env({FAULTS_ENV: "spike@3, hang@1:7, gradspike@4"})
    assert faults.spikes == {3} and faults.hangs == {1: 7} and faults.grad_spikes == {4}
    with pytest.raises(ValueError, match="spike@x"):
        Faults.from_env({FAULTS_ENV: "spike@x"})


def _losses(record: dict) -> dict[int, float]:
    return {int(k): v for k, v in record["losses"].items()}


@pytest.fixture(scope="module")
def spiky(tmp_path_factory):
    """8 iterations with forced loss spikes at 3 (skipped) and 5, 6 (two within the window of 2: rolled
    back to iter_4, iterations 5-6 skipped), and a gradient-only spike at 8 (applied, counted), saving
    every 2."""
    root = tmp_path_factory.mktemp("spikes")
    cfg = tiny_dict(train_iters=8, checkpoint_factor=2, save=str(root / "run"), **SPIKES)
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULTS_ENV, "spike@3,spike@5,spike@6,gradspike@8")
    try:
        recs = run_ranks(2, cfg, root / "out", save_weights=True)
    finally:
        mp.undo()
    return cfg, root, recs


@pytest.mark.slow
def test_a_spike_is_skipped_on_every_rank_like_a_step_never_applied(spiky, tmp_path):
    cfg, root, (rank0, rank1) = spiky
    log = "\n".join(rank0["log"])
    assert "iteration 3: loss" in log and "update skipped" in log
    assert rank0["state"] == rank1["state"]
    # the counters are the kept history's: the spikes at 5 and 6 went with the rollback to iter_4
    assert rank0["state"]["spike_skips"] == 1
    assert rank0["state"]["grad_norm_spikes"] == 1 and "iteration 8: gradient norm" in log
    # the same run with iteration 3's batch dropped by hand, no spike: identical from then on
    plain = run_ranks(2, tiny_dict(train_iters=8, skip_train_iteration_range=["3"]), tmp_path / "out")[0]
    assert [_losses(plain)[i] for i in (1, 2, 4)] == [_losses(rank0)[i] for i in (1, 2, 4)]  # bitwise
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(m.get("spike_skipped", 0) for m in metrics if m.get("kind", "train") == "train") >= 1


@pytest.mark.slow
def test_repeated_spikes_roll_back_and_the_window_is_recorded_and_reproducible(spiky, tmp_path):
    cfg, root, (rank0, _) = spiky
    log = "\n".join(rank0["log"])
    assert "rolling back to" in log and "iter_0000004" in log and "skipping iterations 5-6" in log
    windows = json.loads((root / "run" / "skip_windows.json").read_text())
    assert [(w["first"], w["last"]) for w in windows] == [(5, 6)]
    assert rank0["state"]["iteration"] == 8 and rank0["state"]["data_skipped_iterations"] == 2
    assert all(math.isfinite(_losses(rank0)[i]) for i in (7, 8))

    # resuming from the rollback's own later checkpoint (iter_6 carries the window): bitwise the same
    resumed = run_ranks(
        2, tiny_dict(train_iters=8, load=str(root / "run" / "iter_0000006"), save=str(tmp_path / "a"), **SPIKES),
        tmp_path / "out_a",
    )[0]  # fmt: skip
    assert [_losses(resumed)[i] for i in (7, 8)] == [_losses(rank0)[i] for i in (7, 8)]
    # the window configured by hand from the checkpoint the rollback went back to: the same effect
    by_hand = run_ranks(
        2,
        tiny_dict(train_iters=8, load=str(root / "run" / "iter_0000004"), save=str(tmp_path / "b"),
                  skip_train_iteration_range=["5-6"], **SPIKES),
        tmp_path / "out_b",
    )[0]  # fmt: skip
    assert [_losses(by_hand)[i] for i in (7, 8)] == [_losses(rank0)[i] for i in (7, 8)]
