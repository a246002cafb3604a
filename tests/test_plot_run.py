"""tools/plot_run.py: the curves come from the run's metrics.jsonl (resumed iterations: the later
record wins; a torn last line is left out), and the PNG holds exactly those points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.plot_run import PANELS, draw, main, read_curves


def _train(it: int, loss: float, lr: float, tps: float) -> dict:
    return {
        "kind": "train",
        "iteration": it,
        "loss": loss,
        "lr": lr,
        "grad_norm": None,
        "tokens_per_s": tps,
        "step_s": 0.1,
        "mfu": None,
        "consumed_tokens": it * 1024,
        "time": 1.7e9 + it,
    }


def write_run(run: Path, records: list[dict], torn_tail: bool = False) -> Path:
    run.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    if torn_tail:
        text += '{"kind": "train", "iteration": 99, "lo'
    (run / "metrics.jsonl").write_text(text)
    return run


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(
        tmp_path / "run_a",
        [
            _train(10, 9.0, 1e-3, 500.0),
            _train(20, 7.5, 2e-3, 510.0),
            {"kind": "valid", "iteration": 20, "loss": 7.9, "ppl": 2697.0, "time": 1.7e9},
            _train(30, 6.0, 3e-3, 520.0),
            # resumed from iteration 20: iteration 30 again, with other numbers
            _train(30, 6.5, 3e-3, 400.0),
            {"kind": "test", "iteration": 30, "loss": 6.6, "ppl": 735.0, "time": 1.7e9},
            {"kind": "summary", "iteration": 30, "exit_reason": "finished"},
        ],
        torn_tail=True,
    )
    b = write_run(tmp_path / "run_b", [_train(10, 8.0, 5e-4, 900.0), _train(20, 6.0, 5e-4, 950.0)])
    return a, b


def test_curves_are_the_metrics_file(two_runs):
    a, b = two_runs
    curves = read_curves(a)
    assert curves.label == str(a)
    assert curves.series["training loss"] == ([10, 20, 30], [9.0, 7.5, 6.5])
    assert curves.series["validation loss"] == ([20], [7.9])
    assert curves.series["learning rate"] == ([10, 20, 30], [1e-3, 2e-3, 3e-3])
    assert curves.series["tokens per second"] == ([10, 20, 30], [500.0, 510.0, 400.0])
    assert read_curves(b).series["validation loss"] == ([], [])


def test_directory_without_metrics_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "x.png"
    assert main([str(tmp_path / "empty"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "empty" in err and "metrics.jsonl" in err and "\n" not in err
    assert not out.exists()


def test_a_corrupt_line_names_the_file_and_line(tmp_path, capsys):
    run = write_run(tmp_path / "bad", [_train(10, 9.0, 1e-3, 1.0)])
    with (run / "metrics.jsonl").open("a") as f:
        f.write("garbage\n" + json.dumps(_train(20, 8.0, 1e-3, 1.0)) + "\n")
    assert main([str(run)]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err


def test_png_holds_the_runs(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    a, b = two_runs
    out = tmp_path / "curves.png"
    assert main([str(a), str(b), "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = draw([read_curves(a), read_curves(b)], tmp_path / "again.png")
    assert [ax.get_title() for ax in fig.axes] == list(PANELS)
    loss_lines = fig.axes[0].lines
    assert [line.get_label() for line in loss_lines] == [str(a), str(b)]
    assert list(loss_lines[0].get_xdata()) == [10, 20, 30]
    assert list(loss_lines[0].get_ydata()) == [9.0, 7.5, 6.5]
    assert list(fig.axes[3].lines[1].get_ydata()) == [900.0, 950.0]
