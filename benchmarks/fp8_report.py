"""bf16 against FP8 GEMMs (``fp8: tensorwise | rowwise``) in the trainer: the table of the
``fp8_1_6b`` / ``fp8_12b`` steps of ``benchmarks/run_gpu.sh`` (issue 27 part 2).

    python benchmarks/fp8_report.py RESULTS_DIR [--skip 5]

Reads ``RESULTS_DIR/fp8_<model>_<precision>.metrics.jsonl`` (the trainer's own per-iteration records,
copied there by ``run_gpu.sh``) and ``fp8_12b_layers.txt`` (how many layers fitted) and writes ``RESULTS_DIR/fp8_report.json`` and a Markdown table on
stdout: per run, the medians after ``--skip`` iterations (warm-up, allocator growth) of tokens/s,
TFLOP/s per GPU and MFU, the largest peak memory, the loss of every iteration and its largest
difference from the bf16 run's (same seed, same synthetic batches). MFU is on the device's **bf16**
peak (989 TFLOP/s on an H100) for every row: FP8 rows above the bf16 row are FP8's gain, not a
fraction of the FP8 peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from megatron_stablelm.training.run_record import METRICS_FILE

MODELS = {
    "1_6b": "Stable LM 2 1.6B, seq 4096",
    "12b": "Stable LM 2 12B layer shape, TP 1, seq 4096",
}
PRECISIONS = ("bf16", "tensorwise", "rowwise")
LAYERS_FILE = "fp8_12b_layers.txt"  # the layer count fp8_12b found to fit (run_gpu.sh writes it)


def _records(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"]


def summarize(path: Path, skip: int) -> dict:
    """One run's figures from its metrics file."""
    records = _records(path)
    timed = [r for r in records if r["iteration"] > skip]

    def median(key: str) -> float | None:
        values = [r[key] for r in timed if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {
        "iterations": len(records),
        "tokens_per_s": median("tokens_per_s"),
        "tflops_per_gpu": median("tflops_per_gpu"),
        "mfu_on_bf16_peak": median("mfu"),
        "peak_memory_gib": max(
            (r["peak_memory_gib"] for r in records if r.get("peak_memory_gib")), default=None
        ),
        "losses": {int(r["iteration"]): r["loss"] for r in records},
    }


def compare(runs: dict[str, dict]) -> None:
    """Speed-up and loss difference of each FP8 run against the bf16 run of the same model (in place)."""
    base = runs.get("bf16")
    if base is None:
        return
    for name, run in runs.items():
        if name == "bf16":
            continue
        if base["tokens_per_s"] and run["tokens_per_s"]:
            run["speedup_vs_bf16"] = run["tokens_per_s"] / base["tokens_per_s"]
        common = sorted(set(run["losses"]) & set(base["losses"]))
        diffs = [abs(run["losses"][i] - base["losses"][i]) for i in common]
        run["max_abs_loss_diff_vs_bf16"] = max(diffs, default=None)
        run["last_loss_diff_vs_bf16"] = (
            run["losses"][common[-1]] - base["losses"][common[-1]] if common else None
        )


def _fmt(value, spec: str) -> str:
    """``value`` in ``spec`` (a trailing ``%`` is printed after the number), or a dash when unknown."""
    if value is None:
        return "—"
    return format(value, spec.rstrip("%")) + ("%" if spec.endswith("%") else "")


def table(report: dict, labels: dict[str, str]) -> str:
    lines = [
        "| model | GEMMs | tokens/s | × bf16 | TFLOP/s/GPU | MFU (bf16 peak) | peak GiB | loss, last | max abs loss diff vs bf16 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model, runs in report.items():
        for name, run in runs.items():
            last = run["losses"][max(run["losses"])] if run["losses"] else None
            lines.append(
                f"| {labels[model]} | {'bf16' if name == 'bf16' else 'FP8 ' + name} | {_fmt(run['tokens_per_s'], ',.0f')} "
                f"| {_fmt(run.get('speedup_vs_bf16'), '.3f')} | {_fmt(run['tflops_per_gpu'], '.1f')} "
                f"| {_fmt(run['mfu_on_bf16_peak'] and 100 * run['mfu_on_bf16_peak'], '.1f%')} "
                f"| {_fmt(run['peak_memory_gib'], '.1f')} | {_fmt(last, '.4f')} "
                f"| {_fmt(run.get('max_abs_loss_diff_vs_bf16'), '.4f')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--skip", type=int, default=5, help="iterations left out of the medians")
    args = parser.parse_args(argv)
    report: dict[str, dict[str, dict]] = {}
    labels = dict(MODELS)
    layers = args.results / LAYERS_FILE
    if layers.is_file():
        labels["12b"] += f", {layers.read_text().strip()} layers"
    for model in MODELS:
        runs = {}
        for precision in PRECISIONS:
            path = args.results / f"fp8_{model}_{precision}.{METRICS_FILE}"
            if path.is_file():
                runs[precision] = summarize(path, args.skip)
        if runs:
            compare(runs)
            report[model] = runs
    if not report:
        print(
            f"no fp8_*.{METRICS_FILE} in {args.results}: run the fp8_1_6b / fp8_12b steps first",
            file=sys.stderr,
        )
        return 1
    (args.results / "fp8_report.json").write_text(
        json.dumps({"labels": labels, "runs": report}, indent=1) + "\n"
    )
    print(table(report, labels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
