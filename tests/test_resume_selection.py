"""Where a run starts, and that no start ever writes over a published checkpoint (issues 25 and 29).

One real run (4 steps, checkpoints at 2 and 4, ``load == save``) is copied for each case. The cases a
start decides alone are checked through :func:`plan_resume` (what ``train.py`` and the trainer call);
the data-destroying one (a lost ``latest``) and the start-over are run end to end, with every file of
the published checkpoints hashed before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from megatron_stablelm.checkpoint import CheckpointError
from megatron_stablelm.checkpoint.layout import START_OVER_FILE
from megatron_stablelm.checkpoint.selection import plan_resume
from megatron_stablelm.config import config_from_dict
from tests.train_helpers import losses, run_ranks, tiny_dict

RUN_ITERS = dict(train_iters=4, checkpoint_factor=2)


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path → digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A finished 4-step run whose save directory holds iter_2, iter_4 and ``latest``."""
    root = tmp_path_factory.mktemp("resume_selection")
    run = root / "run"
    rec = run_ranks(1, tiny_dict(save=str(run), load=str(run), **RUN_ITERS), root / "out")[0]
    assert [Path(c).name for c in rec["checkpoints"]] == ["iter_0000002", "iter_0000004"]
    return run, rec


@pytest.fixture
def run_copy(original, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(original[0], run)
    for name in ("train.log", "metrics.jsonl", "summary.json", "run_config.yml", "command.txt"):
        (run / name).unlink(missing_ok=True)
    return run


def _plan(**values):
    return plan_resume(config_from_dict(tiny_dict(**values)), 256)


# ------------------------------------------------------------------ the data-destroying case, end to end
@pytest.mark.slow
def test_lost_latest_resumes_the_newest_checkpoint_and_overwrites_nothing(original, run_copy, tmp_path):
    (run_copy / "latest").unlink()
    before = _hashes(run_copy)
    cfg = tiny_dict(save=str(run_copy), load=str(run_copy), train_iters=6, checkpoint_factor=2)
    rec = run_ranks(1, cfg, tmp_path / "out")[0]
    assert any(
        "resuming from" in line and "iter_0000004" in line and "'latest' is missing" in line
        for line in rec["log"]
    ), rec["log"]
    assert sorted(rec["losses"], key=int) == ["5", "6"]  # continued; not iterations 1.. from scratch
    assert rec["checkpoints"] == [str(run_copy / "iter_0000006")]
    after = _hashes(run_copy)
    assert {k: after[k] for k in before} == before  # iter_2 and iter_4 byte for byte
    assert (run_copy / "latest").read_text().strip() == "iter_0000006"


@pytest.mark.slow
def test_start_over_moves_newer_checkpoints_aside_and_requeue_keeps_progress(original, run_copy, tmp_path):
    """Rolling back to iter_2 (``start_from_load`` with ``load`` at it): iter_4 is moved aside byte for
    byte before the first save; the rolled-back run repeats the original's steps 3-4 exactly; the same
    command launched again (a requeue) resumes this run's own progress instead of starting over."""
    full_run, full_rec = original
    before = _hashes(run_copy / "iter_0000004")
    cfg = tiny_dict(
        save=str(run_copy),
        load=str(run_copy / "iter_0000002"),
        start_from_load=True,
        train_iters=4,
        checkpoint_factor=2,
    )
    rec = run_ranks(1, cfg, tmp_path / "out")[0]
    assert any("start_from_load: starting from" in line and "iter_0000004" in line for line in rec["log"])
    assert losses(rec) == losses(full_rec)[2:]  # bitwise: the same steps 3 and 4
    (aside,) = run_copy.glob("set_aside_*")
    assert _hashes(aside / "iter_0000004") == before
    assert json.loads((run_copy / START_OVER_FILE).read_text())["load"] == str(
        (run_copy / "iter_0000002").resolve()
    )
    again = plan_resume(config_from_dict(cfg), 256)
    assert again.own_progress and again.checkpoint.path.name == "iter_0000004" and again.start_over is None


# ------------------------------------------------------------------ decisions (no training)
def test_lost_latest_is_said_and_a_stale_latest_is_overruled(run_copy):
    (run_copy / "latest").write_text("iter_0000002\n")  # a crash between iter_4's rename and the pointer
    plan = _plan(save=str(run_copy), load=str(run_copy))
    assert plan.own_progress and plan.checkpoint.path.name == "iter_0000004"
    assert "'latest' names iter_0000002" in plan.line
    for path in run_copy.glob("iter_*"):
        shutil.rmtree(path)
    (run_copy / "latest").write_text("iter_0000009\n")  # a pointer at nothing: refused, not a fresh start
    with pytest.raises(CheckpointError, match="latest points at .*iter_0000009"):
        _plan(save=str(run_copy), load=str(run_copy))


def test_an_older_iteration_with_newer_checkpoints_is_refused_untouched(run_copy):
    before = _hashes(run_copy)
    with pytest.raises(
        CheckpointError, match=r"iter_0000004\) that a run continuing .* start_from_load: true"
    ):
        _plan(save=str(run_copy), load=str(run_copy), iteration=2)
    assert _hashes(run_copy) == before


def test_the_runs_own_progress_wins_over_load(run_copy, tmp_path):
    """configs/demo.yml's case: ``load`` is another run, ``save`` this one's directory."""
    mine = tmp_path / "x"
    first = _plan(save=str(mine), load=str(run_copy))
    assert not first.own_progress and first.checkpoint.path.name == "iter_0000004"
    assert (
        "starting from" in first.line and "(load)" in first.line and "holds no checkpoint yet" in first.line
    )
    shutil.copytree(run_copy / "iter_0000002", mine / "iter_0000002")  # this run saved once
    then = _plan(save=str(mine), load=str(run_copy))
    assert then.own_progress and then.checkpoint.path == mine / "iter_0000002"
    assert "`save` holds this run's progress" in then.line and "start_from_load: true" in then.line
    over = _plan(save=str(mine), load=str(run_copy), start_from_load=True)
    assert not over.own_progress and over.checkpoint.path.name == "iter_0000004"
    assert over.start_over.set_aside == []  # iter_2 is before the start: nothing to move


def test_a_finetune_resumes_its_own_progress_whole(run_copy, tmp_path):
    """``finetune`` is how a run starts from ``load`` (weights only); a preempted fine-tune resumes its
    own checkpoint with its iteration and optimizer state, not the base model again."""
    mine = tmp_path / "ft"
    first = _plan(save=str(mine), load=str(run_copy), finetune=True)
    assert not first.own_progress
    shutil.copytree(run_copy / "iter_0000002", mine / "iter_0000002")
    assert _plan(save=str(mine), load=str(run_copy), finetune=True).own_progress


def test_scratch_when_nothing_to_load(tmp_path):
    plan = _plan(save=str(tmp_path / "run"), load=str(tmp_path / "run"))
    assert plan.checkpoint is None and "starting from scratch" in plan.line


# ------------------------------------------------------------------ damaged checkpoint files, named
@pytest.mark.parametrize(
    ("name", "edit", "culprit"),
    [
        ("train_state.json", lambda s: dict(s, iteration="4x"), "'iteration' must be a non-negative integer"),
        ("train_state.json", lambda s: dict(s, consumed_samples=-8), "'consumed_samples' must be"),
        ("model_meta.json", lambda s: dict(s, tp_size=0), "'tp_size' must be a positive integer"),
        ("model_meta.json", None, "not a readable checkpoint description"),
        ("train_state.json", None, "cannot read the training state"),
        ("config.yml", None, "not a readable checkpoint config"),
    ],
)
def test_a_damaged_checkpoint_file_is_named(run_copy, name, edit, culprit):
    path = run_copy / "iter_0000004" / name
    if edit is None:
        path.write_text("{ not: [valid")
    else:
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(CheckpointError, match=culprit) as err:
        _plan(save=str(run_copy), load=str(run_copy))
    assert str(path) in str(err.value)


def test_an_optimizer_file_of_another_model_is_named(run_copy):
    optim = run_copy / "iter_0000004" / "optim_tp00_dp000.safetensors"
    tensors = load_file(optim)
    with safe_open(str(optim), framework="pt") as fh:
        metadata = fh.metadata()
    fragments = json.loads(metadata["fragments"])
    key = next(k for k in tensors if k.startswith("embedding"))
    tensors[key] = torch.zeros(7, 3)  # a whole tensor of another shape
    del fragments[key]
    save_file(tensors, str(optim), metadata=dict(metadata, fragments=json.dumps(fragments)))
    with pytest.raises(CheckpointError, match=rf"{optim}: '{key}' has shape \[7, 3\]"):
        _plan(save=str(run_copy), load=str(run_copy))
    tensors[key] = torch.zeros(5)  # a fragment that does not cover the parameter
    save_file(tensors, str(optim), metadata=dict(metadata, fragments=json.dumps(dict(fragments, **{key: 0}))))
    with pytest.raises(CheckpointError, match=f"'{key}' covers 5 of its"):
        _plan(save=str(run_copy), load=str(run_copy))
    del tensors[key]
    save_file(tensors, str(optim), metadata=metadata)
    with pytest.raises(CheckpointError, match=f"lack {key}"):
        _plan(save=str(run_copy), load=str(run_copy))


def test_a_missing_rng_file_is_said(run_copy):
    (run_copy / "iter_0000004" / "rng_rank00000.pt").unlink()
    (warning,) = _plan(save=str(run_copy), load=str(run_copy)).checkpoint.warnings
    assert "rng_rank00000.pt" in warning and "not bitwise" in warning


def test_nan_weights_are_refused_at_load(run_copy):
    from megatron_stablelm import parallel
    from megatron_stablelm.checkpoint import load_into_model
    from megatron_stablelm.model import build_model

    shard = run_copy / "iter_0000004" / "model_tp00.safetensors"
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name][0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    parallel.initialize(1)
    try:
        model = build_model(config_from_dict(tiny_dict()), 256, dtype=torch.float32, seed=1)
        with pytest.raises(CheckpointError, match=f"'{name}' holds non-finite values"):
            load_into_model(run_copy / "iter_0000004", model, 0, 1)
    finally:
        parallel.destroy()


@pytest.mark.slow
def test_a_run_that_applied_no_update_is_not_a_success(tmp_path):
    cfg = tiny_dict(train_iters=3, max_nonfinite_steps=0, save=str(tmp_path / "run"))
    rec = run_ranks(1, cfg, tmp_path / "out", faults_from=(1, "loss"))[0]
    assert rec["exit_reason"] == "nonfinite" and "none of the 3 iterations" in rec["error"]
    assert not list((tmp_path / "run").glob("iter_*"))
