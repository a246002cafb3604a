#!/usr/bin/env python
"""Draw the training curves of one or several runs into one PNG, to look at instead of reading logs.

    python tools/plot_run.py runs/demo [runs/other ...] [--output curves.png]

Four panels — training loss, validation loss, learning rate, tokens per second — against the
iteration, one line per run, labelled by its run directory. The numbers are read from each run's
``metrics.jsonl`` (written by the trainer into the config's ``save`` directory: one JSON object per
line, ``kind`` ``train`` / ``valid`` / ``test`` / ``summary``). A resumed run logs some iterations twice;
the later record wins. Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from megatron_stablelm.cli import run_command
from megatron_stablelm.training.run_record import METRICS_FILE

# panel title -> (record kind, field)
PANELS: dict[str, tuple[str, str]] = {
    "training loss": ("train", "loss"),
    "validation loss": ("valid", "loss"),
    "learning rate": ("train", "lr"),
    "tokens per second": ("train", "tokens_per_s"),
}


@dataclass
class RunCurves:
    """One run's curves: per panel title, the iterations and the values (iterations ascending)."""

    label: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def read_records(path: Path) -> list[dict]:
    """The JSON objects of a metrics file; a torn last line (a crash mid-write) is left out, any other
    bad line is an error naming the file and line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON object") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        records.append(record)
    return records


def read_curves(run: str | Path) -> RunCurves:
    """The curves of the run directory ``run`` (its ``metrics.jsonl``)."""
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{run}: no {METRICS_FILE} here (is it a run directory, the config's 'save'?)"
        )
    records = read_records(path)
    curves = RunCurves(label=str(run))
    for title, (kind, key) in PANELS.items():
        by_iteration: dict[int, float] = {}
        for record in records:
            if record.get("kind") == kind and record.get(key) is not None and "iteration" in record:
                by_iteration[int(record["iteration"])] = float(record[key])
        steps = sorted(by_iteration)
        curves.series[title] = (steps, [by_iteration[s] for s in steps])
    return curves


def draw(runs: list[RunCurves], output: str | Path):
    """Plot ``runs`` into a 2 x 2 figure saved as ``output``; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    for ax, title in zip(axes.flat, PANELS):
        for run in runs:
            steps, values = run.series[title]
            ax.plot(steps, values, label=run.label, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if any(run.series[title][0] for run in runs):
            ax.legend(fontsize="small")
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return fig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories holding metrics.jsonl")
    p.add_argument("--output", "-o", default="curves.png", help="the PNG to write (replaced if it exists)")
    return p


def plot_from_args(args: argparse.Namespace) -> int:
    runs = [read_curves(run) for run in args.runs]
    if importlib.util.find_spec("matplotlib") is None:
        print("error: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return 2
    draw(runs, args.output)
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(plot_from_args, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
