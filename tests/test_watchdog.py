"""The hang watchdog (issue 25): a rank stuck at iteration N makes every rank exit non-zero within the
timeout plus a margin, the stuck rank's stack file names the frame it hangs in, and the run resumes
from its last checkpoint exactly."""

from __future__ import annotations

import time

import pytest

from megatron_stablelm.config import ConfigError, config_from_dict
from megatron_stablelm.training.faults import FAULTS_ENV, Faults
from megatron_stablelm.training.loop import Trainer
from megatron_stablelm.training.watchdog import HANG_EXIT_CODE
from tests.train_helpers import losses, run_ranks, tiny_dict

TIMEOUT_S = 3.0
MARGIN_S = 45.0  # two spawned ranks importing torch, megatron-core and DeepSpeed on 2 busy cores


def test_fault_spec_is_read_and_a_bad_one_is_named(monkeypatch):
    assert Faults.from_env({FAULTS_ENV: "hang@1:7"}).hangs == {1: 7}
    assert Faults.from_env({}).hangs == {}
    monkeypatch.setenv(FAULTS_ENV, "hang@one:7")
    trainer = Trainer(config_from_dict(tiny_dict()), lambda req: None, padded_vocab=256, log=lambda m: None)
    with pytest.raises(ConfigError, match=f"{FAULTS_ENV}: cannot read 'hang@one:7'"):
        trainer.preflight()


@pytest.mark.slow
def test_a_hung_rank_stops_every_rank_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    cfg = tiny_dict(save=str(tmp_path / "run"), load=str(tmp_path / "run"), train_iters=4, checkpoint_factor=2,
                    watchdog_timeout=TIMEOUT_S)  # fmt: skip
    straight = run_ranks(2, dict(cfg, save=str(tmp_path / "straight"), load=None), tmp_path / "out0")[0]

    monkeypatch.setenv(FAULTS_ENV, "hang@1:3")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"exited with codes \[{HANG_EXIT_CODE}, {HANG_EXIT_CODE}\]"):
        run_ranks(2, cfg, tmp_path / "out1")
    assert time.monotonic() - start < TIMEOUT_S + MARGIN_S
    stuck = (tmp_path / "run" / "hang_rank1.txt").read_text()
    assert "last progress: save of iteration 2" in stuck and "_injected_hang" in stuck
    assert "no progress" in (tmp_path / "run" / "hang_rank0.txt").read_text()

    monkeypatch.delenv(FAULTS_ENV)
    resumed = run_ranks(2, cfg, tmp_path / "out2")[0]
    assert sorted(resumed["losses"], key=int) == ["3", "4"]
    assert losses(resumed) == losses(straight)[2:]  # bitwise
