"""Stopping ``train.py`` never costs work or leaves a traceback: Ctrl-C mid-training saves at the next
step boundary and exits 0 with one line; a second Ctrl-C (here: during a save) exits at once, leaving
the last complete checkpoint and ``latest`` untouched; SIGTERM or Ctrl-C during start-up stops quietly."""

from __future__ import annotations

import signal

import pytest

from megatron_stablelm.checkpoint import resolve_checkpoint
from tests.test_train_faults import _start
from tests.train_helpers import tiny_dict, tree_digest, write_config

pytestmark = pytest.mark.slow


def test_first_ctrl_c_saves_at_the_step_boundary_and_exits_cleanly(tmp_path):
    cfg = write_config(tmp_path / "tiny.yml", tiny_dict(train_iters=100000, save=str(tmp_path / "ckpt")))
    run = _start(cfg, [])
    run.wait_for("iter 3/")
    run.proc.send_signal(signal.SIGINT)
    out = run.rest()
    assert run.proc.returncode == 0, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out
    assert "SIGINT received: saving at iteration" in out
    saved = resolve_checkpoint(tmp_path / "ckpt")
    assert int(saved.name.split("_")[1]) >= 3 and (saved / "train_state.json").is_file()
    assert f"sigint at iteration {int(saved.name.split('_')[1])}; last checkpoint: {saved}" in out


def test_second_ctrl_c_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "tiny.yml", tiny_dict(train_iters=100, save=str(save), checkpoint_factor=2))
    run = _start(cfg, [], MEGATRON_STABLELM_TEST_SAVE_STALL="4:300")
    run.wait_for("stalling")  # in the middle of writing iter_0000004
    before = tree_digest(save / "iter_0000002")
    run.proc.send_signal(signal.SIGINT)
    run.wait_for("SIGINT received")
    run.proc.send_signal(signal.SIGINT)
    out = run.rest(timeout=60)
    assert run.proc.returncode == 130, out
    assert "Traceback" not in out and "second SIGINT: exiting now" in out
    assert resolve_checkpoint(save).name == "iter_0000002"
    assert tree_digest(save / "iter_0000002") == before
    assert not (save / "iter_0000004").exists()


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_signal_during_start_up_stops_quietly(tmp_path, sig, code):
    save = tmp_path / "ckpt"
    cfg = write_config(tmp_path / "tiny.yml", tiny_dict(train_iters=5, save=str(save)))
    run = _start(cfg, [])
    run.wait_for("[config]")  # the config is read; torch, megatron-core, DeepSpeed are being imported
    run.proc.send_signal(sig)
    out = run.rest()
    assert run.proc.returncode == code, out
    assert "Traceback" not in out and "before training started: stopped; nothing was written" in out
    assert not save.exists()
