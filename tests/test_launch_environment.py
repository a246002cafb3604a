"""A launcher's environment that describes no possible job is refused at once, and a rank waiting for
peers that never come says so (issue 29: ``WORLD_SIZE=2 RANK=0`` left in a shell hung silently)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import train
from tests.dist_helpers import _free_port
from tests.train_helpers import REPO, subprocess_env


@pytest.mark.parametrize(
    ("env", "culprit"),
    [
        ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "RANK=3 and WORLD_SIZE=2"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "RANK=0 and WORLD_SIZE=0"),
        ({"RANK": "-1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "RANK=-1"),
        ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "no MASTER_ADDR"),
    ],
)
def test_impossible_launch_environment_is_refused_before_anything(monkeypatch, capsys, env, culprit):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(train, "_check_inputs", lambda *a: pytest.fail("the config was read first"))
    assert train.main(["configs/tiny/stablelm-2-1_6b.yml"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("[train.py] error: ") and culprit in last


def test_a_valid_launch_environment_passes():
    assert train._launch_position({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}) == (1, 2)
    assert train._launch_position({}) == (0, 1)
    assert train._launch_position({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == (3, 4)


@pytest.mark.slow
def test_a_rank_waiting_for_missing_peers_says_so():
    """Rank 0 of 2 with nobody else: within the notice delay it names what it waits for (here 1 s;
    60 s by default), instead of staying silent until the 30-minute process-group timeout."""
    env = subprocess_env(
        RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
        MEGATRON_STABLELM_RENDEZVOUS_NOTICE_S="1",
    )  # fmt: skip
    code = "from megatron_stablelm import parallel; parallel.initialize(1)"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "still waiting" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the process ended without the notice"
    finally:
        proc.kill()
        proc.wait()
    assert "rank 0 of 2: still waiting after 1 s" in line and f"127.0.0.1:{env['MASTER_PORT']}" in line
