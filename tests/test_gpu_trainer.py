"""The trainer path on a GPU (run by ``benchmarks/run_gpu.sh tests``): ``train.py`` as a user starts it,
on CUDA with NCCL, bf16 compute under ZeRO-1 (fp32 master weights and Adam state), on a tiny config
and synthetic tokens. The loss is finite and falls; a run resumed from its step-6 checkpoint gives the
losses of the run that went straight through. On real shards, rank 0 forks its numpy-only data
workers after CUDA and NCCL are up (as it does for any real corpus) and the run trains.

Resume tolerance: the resumed run restores the fp32 master weights, Adam moments, RNG and data
position, so it recomputes the same steps; only kernels whose floating-point reduction order is not
fixed (atomics in a backward) can differ, by a rounding of a bf16 value that then propagates. At this
size they are expected bitwise equal; we hold 1e-3 relative (a quarter of bf16's 2**-8 resolution)
so a non-deterministic kernel does not fail the check while a wrong restore (a loss off by the size
of one update, ~1e-2 here) does. Skipped without CUDA, except the runner itself, which CI checks on CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.train_helpers import REPO, tiny_dict

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (NCCL, bf16 under ZeRO-1)"
)

ITERS = 12
RESUME_AT = 6
RTOL = 1e-3


# ``python train.py`` with the thresholds below which the data start-up stays in one process lowered
# to nothing, so that however small the data, rank 0 forks its shard-check and index-build workers
# (numpy only) after the process group (NCCL on a GPU) is up, as it does for a real corpus; it says
# on stdout when it forked them. The argument vector is train.py's own.
FORKING_TRAIN = """
import runpy, sys
from megatron_stablelm.data import datasets, sample_order

sample_order._PARALLEL_MIN = 1
datasets.PARALLEL_CHECK_DOCUMENTS = 0
enter = sample_order._Runner.__enter__


def announced(runner):
    enter(runner)
    if runner.pool is not None:
        print(f"index workers forked: {runner.workers}", flush=True)
    return runner


sample_order._Runner.__enter__ = announced
sys.argv[0] = TRAIN_PY
runpy.run_path(TRAIN_PY, run_name="__main__")
"""


def _real_data(tmp_path: Path) -> dict:
    """Config keys for two small shards of random documents (a 400-token tokenizer's ids)."""
    from megatron_stablelm.tokenizers import build_tokenizer
    from tests.data_helpers import tiny_tokenizer_files, write_synthetic_shard

    vocab_file = tiny_tokenizer_files()["json"]
    tok = build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=vocab_file)
    prefixes = [str(tmp_path / f"shard{i}") for i in range(2)]
    for i, prefix in enumerate(prefixes):
        write_synthetic_shard(prefix, [40 + 7 * (d % 9) for d in range(60)], tok.eod, tok.vocab_size, seed=i)
    return {
        "tokenizer_type": "HFTokenizer", "vocab_file": vocab_file, "padded_vocab_size": 512,
        "train_data_paths": prefixes, "train_data_weights": [0.5, 0.5], "data_cache_dir": str(tmp_path / "cache"),
    }  # fmt: skip


def _train(tmp_path: Path, name: str, *, real_data: bool = False, **overrides) -> dict[int, float]:
    """``python train.py CONFIG --synthetic-data`` (one local rank: NCCL on the GPU); the logged losses.
    With ``real_data``: two shards through the data pipeline, its workers forked (``FORKING_TRAIN``)."""
    cfg = tiny_dict(
        train_iters=ITERS, bf16={"enabled": True}, distributed_backend="nccl", checkpoint_factor=RESUME_AT
    )
    cfg.update(_real_data(tmp_path) if real_data else {})
    cfg.update(overrides)
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    if real_data:
        script = tmp_path / "forking_train.py"
        script.write_text(FORKING_TRAIN.replace("TRAIN_PY", repr(str(REPO / "train.py"))))
        argv = [str(script), str(path)]
    else:
        argv = ["train.py", str(path), "--synthetic-data"]
    # prepend, not replace: on a lent GPU box deepspeed/megatron-core come from a PYTHONPATH entry
    inherited = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + inherited if inherited else ""))
    proc = subprocess.run(
        [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if real_data:
        assert "index workers forked: " in proc.stdout, proc.stdout[-3000:]
    lines = (Path(cfg["save"]) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["iteration"]: r["loss"] for r in records if r.get("kind") == "train"}


@pytest.mark.slow
def test_the_runner_itself_on_cpu(tmp_path):
    """``_train`` (the launch, the forking wrapper and the log reading the GPU tests rely on) on CPU
    with gloo and fp32, on the shards, so that CI, which has no GPU, notices when it breaks: the GPU
    tests run only where a GPU is lent."""
    cpu = {"bf16": {"enabled": False}, "distributed_backend": "gloo"}
    losses = _train(tmp_path, "cpu", real_data=True, save=str(tmp_path / "ckpt"), **cpu)
    assert sorted(losses) == list(range(1, ITERS + 1)) and all(math.isfinite(v) for v in losses.values())


@pytest.mark.gpu
@needs_cuda
def test_data_workers_fork_after_nccl_started(tmp_path):
    """Rank 0 forks its numpy-only data workers after CUDA and NCCL are up (a real corpus is past the
    fork thresholds): the workers finish, the run trains on the shards, and its loss is finite."""
    losses = _train(tmp_path, "forked", real_data=True, save=str(tmp_path / "ckpt"))
    assert sorted(losses) == list(range(1, ITERS + 1)) and all(math.isfinite(v) for v in losses.values())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_straight")
    return root, _train(root, "straight", save=str(root / "ckpt"))


@pytest.mark.gpu
@needs_cuda
def test_bf16_nccl_loss_finite_and_falling(straight):
    _, losses = straight
    assert sorted(losses) == list(range(1, ITERS + 1))
    values = [losses[i] for i in sorted(losses)]
    assert all(math.isfinite(v) for v in values)
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3


@pytest.mark.gpu
@needs_cuda
def test_bf16_resume_on_gpu(straight, tmp_path):
    root, full = straight
    resumed = _train(
        tmp_path, "resumed", load=str(root / "ckpt"), iteration=RESUME_AT, save=str(tmp_path / "ckpt")
    )
    after = sorted(i for i in resumed if i > RESUME_AT)
    assert after == list(range(RESUME_AT + 1, ITERS + 1))
    assert [resumed[i] for i in after] == pytest.approx([full[i] for i in after], rel=RTOL)
