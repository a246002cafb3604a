"""Saves that do not stop the run (issue 25): background writes publish exactly what a synchronous save
would, a SIGKILL in the middle of one loses only that checkpoint, and no save moves optimizer state over
the network (each DP rank writes its own ZeRO partition), as ``inspect`` predicts."""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open

from megatron_stablelm.checkpoint import resolve_checkpoint
from megatron_stablelm.config import config_from_dict
from megatron_stablelm.inspect import checkpoint_traffic
from tests.test_train_faults import _start
from tests.train_helpers import run_ranks, run_train, tiny_dict, write_config

pytestmark = pytest.mark.slow


def _train_losses(run_dir) -> dict[int, float]:
    """Loss per logged iteration from the run's metrics.jsonl (full precision; log_interval 1)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind", "train") == "train" and "lr" in record:
            out[record["iteration"]] = record["loss"]
    return out


def test_a_kill_during_a_background_write_loses_only_that_checkpoint(tmp_path):
    values = tiny_dict(train_iters=6, checkpoint_factor=2, async_save=True)
    straight_dir = tmp_path / "straight"
    cfg = write_config(tmp_path / "tiny.yml", dict(values, save=str(straight_dir)))
    straight = run_train(cfg)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert "in the background" in straight.stdout and resolve_checkpoint(straight_dir).name == "iter_0000006"

    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yml", dict(values, save=str(run_dir), load=str(run_dir)))
    run = _start(cfg, [], MEGATRON_STABLELM_TEST_SAVE_STALL="4:300")
    run.wait_for("iter 5/")  # training went on while iteration 4's files were being written
    run.proc.kill()
    run.proc.wait(timeout=30)
    assert resolve_checkpoint(run_dir).name == "iter_0000002" and (run_dir / ".iter_0000004.tmp").is_dir()

    resumed = run_train(cfg)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "iter_0000002" in resumed.stdout and resolve_checkpoint(run_dir).name == "iter_0000006"
    want, got = _train_losses(straight_dir), _train_losses(run_dir)
    assert [got[i] for i in (3, 4, 5, 6)] == [want[i] for i in (3, 4, 5, 6)]  # bitwise


def test_a_save_moves_no_optimizer_state_and_writes_what_inspect_predicts(tmp_path):
    values = tiny_dict(train_iters=2, checkpoint_factor=2, save=str(tmp_path / "run"))
    recs = run_ranks(2, values, tmp_path / "out", count_save_traffic=True)
    predicted = checkpoint_traffic(config_from_dict(values), 256, dp=2)
    assert predicted.optimizer_sent_per_rank == 0
    for rec in recs:  # only the save's agreement flags cross the network: a few 4-byte values
        assert rec["save_traffic"]["bytes"] <= 4 * rec["save_traffic"]["calls"] <= 64, rec["save_traffic"]
    ckpt = resolve_checkpoint(tmp_path / "run")
    written = []
    for dp_rank in range(2):
        with safe_open(str(ckpt / f"optim_tp00_dp{dp_rank:03d}.safetensors"), framework="pt") as fh:
            written.append(sum(math.prod(fh.get_slice(k).get_shape()) * 4 for k in fh.keys()))
    assert sum(written) == predicted.optimizer  # every optimizer byte written once, by its owner
    assert all(abs(w - predicted.optimizer_per_rank) <= 1024 for w in written), written  # ZeRO padding only
