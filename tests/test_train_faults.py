"""Failure handling: non-finite steps, SIGTERM, SIGKILL in the middle of a save, and bad input through
``train.py`` (clear message, exit code 2, before the first step, nothing on disk changed)."""

from __future__ import annotations

import math
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_stablelm.checkpoint import resolve_checkpoint
from megatron_stablelm.training.run_record import HEADER_MARK
from tests.train_helpers import (
    REPO,
    run_ranks,
    run_train,
    subprocess_env,
    tiny_dict,
    train_cmd,
    tree_digest,
    write_config,
)

pytestmark = pytest.mark.slow

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d( |$)")  # a train.log line's time


# ----------------------------------------------------------------------------- non-finite steps
def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    cfg = tiny_dict(train_iters=8, max_nonfinite_steps=3, save=str(tmp_path / "ckpt"), checkpoint_factor=4)
    rec = run_ranks(1, cfg, tmp_path / "out", faults={3: "loss", 4: "grad"}, save_weights=True)[0]
    assert rec["exit_reason"] == "done"
    assert rec["state"]["skipped_iterations"] == 2 and rec["state"]["nonfinite_iterations"] == 2
    assert math.isnan(rec["losses"]["3"]) and math.isfinite(rec["losses"]["4"])  # finite loss, NaN grads
    assert all(math.isfinite(rec["losses"][str(i)]) for i in (1, 2, 5, 6, 7, 8))
    log = "\n".join(rec["log"])
    assert "iteration 3: non-finite loss" in log and "iteration 4: non-finite gradient" in log
    # iteration 4 ended a non-finite step: its periodic save is withheld; 8 is saved
    assert "not saving at iteration 4" in log
    assert [Path(p).name for p in rec["checkpoints"]] == ["iter_0000008"]
    weights = torch.load(tmp_path / "out" / "weights.pt")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("stage", [0, 1])
def test_nonfinite_streak_aborts_without_poisoned_checkpoint(tmp_path, stage):
    save = tmp_path / "ckpt"
    cfg = tiny_dict(
        train_iters=20,
        max_nonfinite_steps=3,
        save=str(save),
        checkpoint_factor=2,
        zero_optimization={"stage": stage},
    )
    rec = run_ranks(1, cfg, tmp_path / "out", faults_from=(4, "grad"))[0]
    assert rec["exit_reason"] == "nonfinite"
    assert "3 consecutive non-finite iterations" in rec["error"] and rec["state"]["iteration"] == 6
    checkpoints = sorted(p.name for p in save.iterdir() if p.name.startswith(("iter_", ".iter_", "latest")))
    assert checkpoints == ["iter_0000002", "latest"]  # beside them: the run's record (run_record.py)
    last = resolve_checkpoint(save)
    assert last.name == "iter_0000002"
    for tensor in load_file(last / "model_tp00.safetensors").values():
        assert torch.isfinite(tensor).all()


# ----------------------------------------------------------------------------- signals
class _Reader:
    """Collects a subprocess's output lines in a thread, so a test can wait for one with a timeout."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines, self._q = proc, [], queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, text: str, timeout: float = 180) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = self._q.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} not seen; output:\n{''.join(self.lines)}")

    def rest(self, timeout: float = 120) -> str:
        self.proc.wait(timeout=timeout)
        while True:
            line = self._q.get(timeout=10)
            if line is None:
                return "".join(self.lines)
            self.lines.append(line)


def _start(cfg: Path, overrides: list[str], **env: str) -> _Reader:
    proc = subprocess.Popen(
        train_cmd(cfg, overrides=overrides),
        cwd=REPO,
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return _Reader(proc)


def test_sigterm_saves_and_exits_cleanly(tmp_path, monkeypatch, capsys):
    cfg = write_config(tmp_path / "tiny.yml", tiny_dict(train_iters=100000, save=str(tmp_path / "ckpt")))
    run = _start(cfg, [])
    run.wait_for("iter 3/")
    run.proc.send_signal(signal.SIGTERM)
    out = run.rest()
    assert run.proc.returncode == 0, out
    assert "SIGTERM received: saving at iteration" in out
    saved = resolve_checkpoint(tmp_path / "ckpt")
    iteration = int(saved.name.split("_")[1])
    assert iteration >= 3 and (saved / "train_state.json").is_file()
    finish = [f"train_iters={iteration + 2}", f"load={tmp_path / 'ckpt'}"]
    resumed = run_train(cfg, overrides=finish)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (
        f"iteration {iteration}, " in resumed.stdout
        and f"done at iteration {iteration + 2}" in resumed.stdout
    )
    # train.log: each start under its own header, every printed line stamped, train.py's last line too
    log = (tmp_path / "ckpt" / "train.log").read_text().split(HEADER_MARK)[1:]
    assert len(log) == 2 and all(" | host " in start.splitlines()[0] for start in log)
    for start, printed in zip(log, (out, resumed.stdout)):
        lines = start.splitlines()[1:]
        assert all(STAMP.match(line) for line in lines), start
        # (the same lines; around the SIGTERM the handler's line may land before the one it interrupted)
        assert sorted(line[20:] for line in lines) == sorted(printed.strip().splitlines())
    assert "SIGTERM received" in log[0] and f"[train.py] done at iteration {iteration + 2}" in log[1]

    # the same command once more: nothing left to train, said in one line; the run's record (its
    # summary above all) keeps describing the run. In this process: it ends before anything heavy.
    import train

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    before = tree_digest(tmp_path / "ckpt")
    assert train.main([str(cfg), "--synthetic-data", "--override", *finish]) == 0
    said = capsys.readouterr()  # (after the config's notes)
    assert [line for line in said.out.splitlines() if not line.startswith("[config]")] == [
        f"[train.py] nothing left to train: {saved.parent / f'iter_{iteration + 2:07d}'} is at iteration "
        f"{iteration + 2} and train_iters is {iteration + 2}; nothing was written (raise train_iters to train "
        "further)"
    ], said
    assert tree_digest(tmp_path / "ckpt") == before


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "tiny.yml", tiny_dict(train_iters=6, save=str(save), load=str(save), checkpoint_factor=3)
    )
    run = _start(cfg, [], MEGATRON_STABLELM_TEST_SAVE_STALL="6:300")
    run.wait_for("stalling")
    run.proc.kill()  # SIGKILL, in the middle of writing iter_0000006
    run.proc.wait(timeout=30)
    assert resolve_checkpoint(save).name == "iter_0000003"
    assert (save / ".iter_0000006.tmp").is_dir() and not (save / "iter_0000006").exists()

    # bad input against this run directory: clear errors, exit 2, nothing written or removed
    before = tree_digest(save)
    bad_arch = run_train(cfg, overrides=["hidden_size=128"])
    assert bad_arch.returncode == 2 and "architecture differs" in bad_arch.stderr
    assert "hidden_size: checkpoint 64, config 128" in bad_arch.stderr
    bad_batch = run_train(cfg, overrides=["train_batch_size=3"])
    assert bad_batch.returncode == 2 and "does not fit the world size" in bad_batch.stderr
    # (a `load` is read only while `save` holds no checkpoint: this run's own progress comes first)
    no_ckpt = run_train(cfg, overrides=[f"load={tmp_path / 'nothing'}", f"save={tmp_path / 'other'}"])
    assert no_ckpt.returncode == 2 and "checkpoint path does not exist" in no_ckpt.stderr
    assert not (tmp_path / "other").exists()
    for failed in (bad_arch, bad_batch, no_ckpt):
        assert "iter 1/" not in failed.stdout
    assert tree_digest(save) == before

    # resuming picks up the intact checkpoint, finishes, and clears the half-written one
    resumed = run_train(cfg)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "iter_0000003: iteration 3" in resumed.stdout
    assert resolve_checkpoint(save).name == "iter_0000006"
    assert not (save / ".iter_0000006.tmp").exists()
