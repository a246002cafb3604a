"""Hardening of the training job against its run directory: one writer at a time, writable with room,
a failed save that keeps the previous checkpoint, corrupt checkpoint files reported in one line before
training, retention that never deletes the checkpoint a crash would need, and the record of a run.

Every bad case asserts the exit code, that the message is one line naming the file or directory, and
that nothing already on disk changed. ``RLIMIT_FSIZE`` stands in for a full disk (CI runs as root,
which file permissions do not stop)."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from megatron_stablelm.checkpoint import resolve_checkpoint
from megatron_stablelm.checkpoint.retention import prune_checkpoints
from tests.test_train_faults import _start
from tests.train_helpers import (
    REPO,
    run_train,
    subprocess_env,
    tiny_dict,
    train_cmd,
    tree_digest,
    write_config,
)

pytestmark = pytest.mark.slow


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory holding the checkpoint of a 2-step run (copied by each case)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = write_config(
        root / "tiny.yml", tiny_dict(train_iters=2, save=str(root / "run"), load=str(root / "run"))
    )
    done = run_train(cfg)
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def _copy(trained, tmp_path):
    shutil.copytree(trained / "run", tmp_path / "run")
    cfg = tiny_dict(train_iters=4, save=str(tmp_path / "run"), load=str(tmp_path / "run"))
    return write_config(tmp_path / "tiny.yml", cfg), tmp_path / "run"


def _limited_run(cfg, max_file_bytes: int, overrides=None) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        train_cmd(cfg, overrides=overrides),
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit,
    )


CORRUPTIONS = {
    "truncated model shard": (
        "iter_0000002/model_tp00.safetensors",
        lambda p: p.write_bytes(p.read_bytes()[:-100]),
    ),
    "truncated optimizer file": (
        "iter_0000002/optim_tp00_dp000.safetensors",
        lambda p: p.write_bytes(p.read_bytes()[:500]),
    ),
    "garbage RNG file": ("iter_0000002/rng_rank00000.pt", lambda p: p.write_bytes(b"not a torch file")),
    "malformed train_state.json": ("iter_0000002/train_state.json", lambda p: p.write_text("{iteration: ")),
    "malformed model_meta.json": ("iter_0000002/model_meta.json", lambda p: p.write_text("[1, 2")),
    "malformed config.yml": ("iter_0000002/config.yml", lambda p: p.write_text("num_layers: [2\n")),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_file_is_one_line_before_training(trained, tmp_path, case):
    cfg, run = _copy(trained, tmp_path)
    name, corrupt = CORRUPTIONS[case]
    corrupt(run / name)
    before = tree_digest(run)
    proc = run_train(cfg)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = _error_line(proc)
    assert str(run / name.split("/")[0]) in line, line
    assert "iter 3/" not in proc.stdout
    assert tree_digest(run) == before


def test_second_run_on_the_same_save_directory_is_refused(trained, tmp_path):
    cfg, run = _copy(trained, tmp_path)
    first = _start(cfg, ["train_iters=100000"])
    try:
        first.wait_for("iter 4/")
        second = run_train(cfg, overrides=["train_iters=100000"])
        assert second.returncode == 2, second.stdout + second.stderr
        line = _error_line(second)  # refused before set-up, naming the directory and the live run
        assert f"{run} is in use by another training run (pid {first.proc.pid} on " in line, line
        assert "iter " not in second.stdout
    finally:
        first.proc.send_signal(signal.SIGTERM)
        out = first.rest()
    assert first.proc.returncode == 0, out  # the first run was not disturbed: it saved and stopped
    assert int(resolve_checkpoint(run).name.split("_")[1]) >= 4


def test_unwritable_save_directory_is_found_before_training(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    save = tmp_path / "a_file" / "run"  # cannot be created (root ignores permissions, not this)
    cfg = write_config(tmp_path / "tiny.yml", tiny_dict(train_iters=2, save=str(save)))
    before = tree_digest(tmp_path)
    proc = run_train(cfg)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{save}: the save directory is not writable" in _error_line(proc)
    assert "iter 1/" not in proc.stdout and tree_digest(tmp_path) == before


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(trained, tmp_path):
    cfg, run = _copy(trained, tmp_path)
    previous = tree_digest(run / "iter_0000002")
    model_bytes = (run / "iter_0000002" / "model_tp00.safetensors").stat().st_size
    proc = _limited_run(cfg, model_bytes + 4096)  # the model file fits, the optimizer file does not
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = _error_line(proc)
    assert "cannot save iteration 4" in line and "the previous checkpoint and 'latest' are untouched" in line
    assert resolve_checkpoint(run).name == "iter_0000002"
    assert tree_digest(run / "iter_0000002") == previous
    assert not (run / "iter_0000004").exists() and not list(run.glob(".iter_*"))


def test_retention_keeps_the_newest_and_never_the_live_one_or_newer(tmp_path):
    for it in (1, 2, 3, 4, 5, 6):
        (tmp_path / f"iter_{it:07d}").mkdir()
        (tmp_path / f"iter_{it:07d}" / "model_meta.json").write_text("{}")
    (tmp_path / "iter_0000007").mkdir()  # incomplete (no metadata): never touched
    (tmp_path / "latest").write_text("iter_0000004\n")  # e.g. resumed from 4 after 5 and 6 were written
    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["iter_0000001", "iter_0000002"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["iter_0000003", "iter_0000004", "iter_0000005", "iter_0000006", "iter_0000007", "latest"]


def test_run_directory_tells_the_story(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "tiny.yml",
        tiny_dict(
            train_iters=4, save=str(run), checkpoint_factor=1, keep_last_n_checkpoints=2, eval_interval=2
        ),
    )
    proc = run_train(cfg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_0000003", "iter_0000004"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("iter ")]
    assert [f"loss {r['loss']:.4f}" in line for r, line in zip(train, printed)] == [True] * 4
    assert [r["iteration"] for r in records if r["kind"] == "valid"] == [2, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iteration"] == 4 and summary["last_checkpoint"].endswith("iter_0000004")
    assert summary["best_valid_loss"] == min(r["loss"] for r in records if r["kind"] == "valid")
    # throughput counts the steps only; saves and evaluations are reported beside it
    assert 0 < summary["step_seconds"] <= summary["training_seconds"] and summary["other_seconds"] >= 0
    assert summary["tokens_per_s"] == pytest.approx(
        summary["tokens_this_run"] / summary["step_seconds"], rel=0.01
    )
    assert "iter 4/4" in (run / "train.log").read_text() and (run / "run_config.yml").is_file()
    png = tmp_path / "curves.png"
    plot = subprocess.run(
        ["python", "tools/plot_run.py", str(run), "--output", str(png)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


TOOLS = {
    "convert_to_hf": lambda run, out: ["tools/convert_to_hf.py", str(run), str(out / "hf")],
    "reshard_checkpoint": lambda run, out: [
        "tools/reshard_checkpoint.py",
        str(run),
        str(out / "tp2"),
        "--tp",
        "2",
    ],
    "inspect_checkpoint": lambda run, out: ["tools/inspect_checkpoint.py", str(run)],
    "generate": lambda run, out: [
        "tools/generate.py",
        str(run),
        "--prompt",
        "1 2 3",
        "--tokenizer",
        str(out),
    ],
    "evaluate": lambda run, out: ["tools/evaluate.py", str(run), "--data", str(out / "none")],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_reports_a_truncated_shard_in_one_line(trained, tmp_path, tool):
    _, run = _copy(trained, tmp_path)
    shard = run / "iter_0000002" / "model_tp00.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    before = tree_digest(tmp_path)
    proc = subprocess.run(
        [sys.executable, *TOOLS[tool](run, tmp_path)],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(shard) in _error_line(proc) and "truncated or corrupt" in _error_line(proc)
    assert tree_digest(tmp_path) == before


def test_convert_from_hf_reports_a_garbage_config_json_in_one_line(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{not json")
    before = tree_digest(tmp_path)
    proc = subprocess.run(
        [sys.executable, "tools/convert_from_hf.py", str(hf), str(tmp_path / "out")],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "config.json" in _error_line(proc)
    assert tree_digest(tmp_path) == before and not (tmp_path / "out").exists()
