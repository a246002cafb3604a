"""Time limits and requeue (issue 25): the batch script under a fake SLURM (stub ``srun``, ``scontrol``
on PATH, recording their calls). SLURM's warning signal to the batch script makes the run save and exit
0, and the job requeues itself once; a finished run and a failed run do not requeue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_stablelm.launch.requeue import decide
from tests.test_train_faults import _Reader
from tests.train_helpers import REPO, subprocess_env, tiny_dict

SRUN = """#!/usr/bin/env bash
echo "srun $*" >> "$STUB_LOG"
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done  # SLURM's options; then run the task right here
exec "$@"
"""
SCONTROL = '#!/usr/bin/env bash\necho "scontrol $*" >> "$STUB_LOG"\n'


def _fake_slurm(tmp_path: Path, **values) -> tuple[Path, dict[str, str]]:
    """A tiny config (SLURM launcher, one srun per node) and the environment of job 4242 on one node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    cfg = tmp_path / "tiny.yml"
    cfg.write_text(yaml.safe_dump(tiny_dict(launcher="slurm", deepspeed_slurm=False, **values)))
    env = subprocess_env(
        STUB_LOG=str(tmp_path / "calls.log"), PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="rq", SLURM_JOB_NODELIST="localhost", SLURMD_NODENAME="localhost",
        SLURM_JOB_NUM_NODES="1", SLURM_NNODES="1", GPUS_PER_NODE="1", RUNS_DIR=str(tmp_path / "jobs"),
    )  # fmt: skip
    return cfg, env


def _calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.slow
def test_the_time_limit_warning_saves_exits_0_and_requeues_once(tmp_path):
    cfg, env = _fake_slurm(tmp_path, train_iters=100000, save=str(tmp_path / "run"))
    cmd = ["bash", "launch/slurm/train.sbatch", str(cfg), "--", "--synthetic-data"]
    job = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run = _Reader(job)
    run.wait_for("iter 3/")
    job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@900 does 15 minutes before the time limit
    out = run.rest(timeout=120)
    assert job.returncode == 0, out[-3000:]
    assert "saving at iteration" in out and "Traceback" not in out
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["exit_reason"] == "stop_file" and saved["iteration"] >= 3
    calls = _calls(tmp_path)
    assert [c for c in calls if c.startswith("scontrol")] == ["scontrol requeue 4242"]
    assert any(c.startswith("srun ") for c in calls)
    assert not (tmp_path / "jobs" / "rq-4242" / "stop").exists()  # the requeued job starts clean


@pytest.mark.slow
def test_a_failed_run_is_not_requeued(tmp_path):
    cfg, env = _fake_slurm(tmp_path, train_iters=5, save=str(tmp_path / "run"))
    cfg.write_text(cfg.read_text() + "hiden_size: 3\n")  # a typo: the launcher refuses, exit 2
    done = subprocess.run(
        ["bash", "launch/slurm/train.sbatch", str(cfg)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not requeued" in done.stdout and not [c for c in _calls(tmp_path) if c.startswith("scontrol")]


def _job_dir(tmp_path: Path, iteration: int | None, **values) -> Path:
    """A job directory whose config saves to ``tmp_path/run``, holding a checkpoint at ``iteration``."""
    job = tmp_path / "job"
    job.mkdir()
    config = dict(train_iters=10, save=str(tmp_path / "run"), **values)
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    if iteration is not None:
        ckpt = tmp_path / "run" / f"iter_{iteration:07d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model_meta.json").write_text("{}")
        (ckpt / "train_state.json").write_text(json.dumps({"iteration": iteration}))
    return job


@pytest.mark.parametrize(
    ("iteration", "code", "env", "requeued", "why"),
    [
        (10, 0, {}, False, "training finished"),
        (4, 0, {}, True, "stopped early at iteration 4 of 10"),
        (4, 4, {}, True, "hang watchdog"),
        (4, 1, {}, False, "training failed (exit 1)"),
        (4, 0, {"SLURM_RESTART_COUNT": "50"}, False, "already requeued 50 times"),
        (None, 0, {}, True, "iteration 0 of 10"),
    ],
)
def test_the_requeue_decision(tmp_path, iteration, code, env, requeued, why):
    job = _job_dir(tmp_path, iteration)
    decision, text = decide(job, code, {"SLURM_JOB_ID": "7", **env})
    assert decision is requeued and why in text
    assert decide(job, 0, {})[0] is False  # not a SLURM job
