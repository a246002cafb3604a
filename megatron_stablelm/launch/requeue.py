"""After the training step of a SLURM batch job ends: requeue the job when its run is not finished.

Why: a 2T-token run outlives any ``--time`` limit. ``launch/slurm/train.sbatch`` asks SLURM for a
warning signal before the limit (``--signal=B:TERM@900``); the batch script forwards it to the run,
whose ranks save at the next step boundary and exit 0 (``signals.py``). Then this module decides, from
the run directory alone, whether the job comes back::

    python -m megatron_stablelm.launch.requeue --job-dir JOB_DIR --exit-code STATUS

* exit 0 and the newest checkpoint of ``save`` short of ``train_iters``: stopped early (the time
  limit, a preemption): ``scontrol requeue $SLURM_JOB_ID``; the requeued job resumes from that
  checkpoint (a run resumes its own ``save`` first: ``checkpoint/selection.py``);
* exit 4: the hang watchdog stopped a stuck rank (``training/watchdog.py``): requeued the same way;
* finished (the newest checkpoint at ``train_iters``), any other exit status (a failure a restart
  would only repeat), no ``save``, or ``MEGATRON_STABLELM_MAX_REQUEUES`` restarts already
  (``SLURM_RESTART_COUNT``; default 50): not requeued.

It prints one line saying which, and exits 0 either way (the batch script exits with the training's
own status).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from megatron_stablelm.checkpoint.layout import TRAIN_STATE_FILE, published_checkpoints
from megatron_stablelm.cli import non_negative_int
from megatron_stablelm.training.watchdog import HANG_EXIT_CODE

MAX_REQUEUES_ENV = "MEGATRON_STABLELM_MAX_REQUEUES"
DEFAULT_MAX_REQUEUES = 50


def decide(job_dir: Path, exit_code: int, environ: dict[str, str] | None = None) -> tuple[bool, str]:
    """``(requeue?, why)`` for the job whose launch directory is ``job_dir``."""
    env = os.environ if environ is None else environ
    if exit_code not in (0, HANG_EXIT_CODE):
        return False, f"training failed (exit {exit_code}): a restart would repeat it; not requeued"
    if "SLURM_JOB_ID" not in env:
        return False, "not a SLURM job (SLURM_JOB_ID is not set): nothing to requeue"
    restarts, limit = (
        int(env.get("SLURM_RESTART_COUNT", "0")),
        int(env.get(MAX_REQUEUES_ENV, DEFAULT_MAX_REQUEUES)),
    )
    if restarts >= limit:
        return False, f"already requeued {restarts} times ({MAX_REQUEUES_ENV}={limit}): not requeued"
    config = yaml.safe_load((job_dir / "config.yaml").read_text())
    save, train_iters = config.get("save"), int(config["train_iters"])
    if not save:
        return False, "the run has no `save` directory to resume from: not requeued"
    done = published_checkpoints(save)
    iteration = json.loads((done[-1][1] / TRAIN_STATE_FILE).read_text())["iteration"] if done else 0
    if iteration >= train_iters:
        return False, f"training finished ({save}: iteration {iteration} of {train_iters}): not requeued"
    why = "the hang watchdog stopped the run" if exit_code == HANG_EXIT_CODE else "the run stopped early"
    return True, f"{why} at iteration {iteration} of {train_iters} ({save}): requeued to resume from there"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_stablelm.launch.requeue", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--job-dir", type=Path, required=True, help="the launch's job directory")
    parser.add_argument(
        "--exit-code", type=non_negative_int, required=True, help="the training's exit status"
    )
    args = parser.parse_args(argv)
    try:
        requeue, why = decide(args.job_dir, args.exit_code)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
        print(f"[requeue] cannot tell whether the run finished ({err}): not requeued", flush=True)
        return 0
    print(f"[requeue] {why}", flush=True)
    if requeue:
        job = os.environ["SLURM_JOB_ID"]
        try:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            failure = done.stderr.strip() if done.returncode else None
        except OSError as err:  # scontrol is not on PATH
            failure = str(err)
        if failure:
            print(f"[requeue] error: scontrol requeue {job} failed: {failure}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
