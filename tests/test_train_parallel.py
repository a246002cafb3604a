"""Parallel runs equal the single-process run: TP=2, DP=2 with ZeRO-1 (and gradient accumulation), and
TP=2 × DP=2, each against TP=1/DP=1 on the same global batches, fp32, 5 steps, within 1e-5 relative.
Clipping is active (grad norms > 1), so a wrong tensor-parallel gradient norm would show."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from megatron_stablelm import parallel
from tests.train_helpers import REPO, losses, run_ranks, subprocess_env, tiny_dict, train_cmd, write_config

pytestmark = pytest.mark.slow

STEPS = 5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    rec = run_ranks(
        1, tiny_dict(train_iters=STEPS, train_micro_batch_size_per_gpu=4), tmp_path_factory.mktemp("ref")
    )
    assert rec[0]["exit_reason"] == "done"
    return rec[0]


def _check(reference: dict, records: list[dict]) -> None:
    ref = losses(reference)
    assert len(ref) == STEPS and ref[-1] < ref[0]
    for rec in records:  # every rank reports the same DP-averaged loss
        got = losses(rec)
        assert got == pytest.approx(ref, rel=1e-5), (got, ref)
        assert rec["lrs"] == reference["lrs"]


def test_tensor_parallel_2_equals_single(reference, tmp_path):
    recs = run_ranks(
        2, tiny_dict(train_iters=STEPS, train_micro_batch_size_per_gpu=4, model_parallel_size=2), tmp_path
    )
    _check(reference, recs)


def test_data_parallel_2_zero1_with_accumulation_equals_single(reference, tmp_path):
    cfg = tiny_dict(train_iters=STEPS, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=2)
    recs = run_ranks(2, cfg, tmp_path)
    _check(reference, recs)
    assert "ZeRO 1" in "\n".join(recs[0]["log"]) and "DP 2" in "\n".join(recs[0]["log"])


def test_tp2_dp2_sequence_parallel_with_activation_checkpointing_equals_single(reference, tmp_path):
    """Sequence parallelism (turned on by GPT-NeoX's partition_activations, as in Stable LM 2 12B's
    published config) under DeepSpeed ZeRO-1: the LayerNorm and bias gradients each TP rank computes
    from its half of the sequence are summed over TP before DeepSpeed reduces over DP."""
    cfg = tiny_dict(
        train_iters=STEPS,
        train_micro_batch_size_per_gpu=2,
        model_parallel_size=2,
        checkpoint_activations=True,
        partition_activations=True,
    )
    recs = run_ranks(4, cfg, tmp_path)
    _check(reference, recs)


def test_train_py_under_deepspeed_launcher(tmp_path):
    """``deepspeed train.py`` passes --local_rank and sets RANK/WORLD_SIZE; TP=2 over its 2 processes.

    Also the check of a quiet start (README, Monitor): with Python's default warning filters, as an
    operator runs it, the ranks print nothing that looks like a problem: no DeepSpeed accelerator
    guess, no op build, no CUDA_DEVICE_MAX_CONNECTIONS advice on a machine without CUDA. And they
    build and wait on nothing: DeepSpeed's shared-memory op (inference only) is skipped, so a lock a
    killed build left in the extension cache (waited on forever before) does not matter."""
    cfg = write_config(tmp_path / "tiny.yml", tiny_dict(train_iters=3, model_parallel_size=2))
    port = _free_port()
    launcher = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_accelerators", "2", "--master_port", str(port),
    ]  # fmt: skip
    cmd = launcher + train_cmd(cfg, overrides=[f"save={tmp_path / 'ckpt'}"])[1:]
    stale = tmp_path / "torch_extensions" / "deepspeed_shm_comm"
    stale.mkdir(parents=True)
    (stale / "lock").touch()
    env = subprocess_env(TORCH_EXTENSIONS_DIR=str(stale.parent))
    env.pop("PYTHONWARNINGS")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "world 2 = TP 2 × DP 1" in out and "done at iteration 3" in out
    assert (tmp_path / "ckpt" / "iter_0000003" / "model_tp01.safetensors").is_file()
    assert sorted(p.name for p in stale.iterdir()) == ["lock"]  # nothing compiled
    assert "shm_comm" not in out and "CUDA_DEVICE_MAX_CONNECTIONS" not in out, out[-4000:]
    rank0 = (tmp_path / "ckpt" / "train.log").read_text()  # what rank 0 printed (not the launcher)
    assert "Setting accelerator" not in rank0 and "warn" not in rank0.lower(), rank0
    # no DeepSpeed shared-memory all-reduce segment was made, none is left in /dev/shm
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    left = [p for p in (parallel.deepspeed_shm_buffer(r, env) for r in range(2)) if os.path.exists(p)]
    assert not left, left


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_data_parallel_2_zero2_equals_single(reference, tmp_path):
    cfg = tiny_dict(train_iters=STEPS, train_micro_batch_size_per_gpu=2, zero_optimization={"stage": 2})
    recs = run_ranks(2, cfg, tmp_path)
    _check(reference, recs)
    assert "ZeRO 2" in "\n".join(recs[0]["log"])


def test_bf16_tp2_dp2_tracks_fp32(reference, tmp_path):
    """bf16 compute with fp32 master weights (ZeRO-1) on TP=2 × DP=2: the losses follow the fp32 run
    within bf16's precision."""
    cfg = tiny_dict(
        train_iters=STEPS, train_micro_batch_size_per_gpu=2, model_parallel_size=2, bf16={"enabled": True}
    )
    recs = run_ranks(4, cfg, tmp_path)
    ref = losses(reference)
    for rec in recs:
        assert losses(rec) == pytest.approx(ref, rel=2e-2)
    assert "bf16" in "\n".join(recs[0]["log"])
