"""What a training run leaves beside its checkpoints, so that it can be read (and plotted) later.

In the run directory (the config's ``save``), written by global rank 0:

* ``run_config.yml``: the resolved config; ``command.txt``: the command line and the time it started;
* ``train.log`` (in ``log_dir`` when the config gives one): every line the trainer prints;
* ``metrics.jsonl``: one JSON object per line: ``{"kind": "train", ...}`` per log interval,
  ``{"kind": "valid" | "test", ...}`` per evaluation, ``{"kind": "summary", ...}`` at the end
  (``tools/plot_run.py`` draws the curves from it);
* ``summary.json``: the end-of-run summary (iterations, tokens, wall time, mean tokens/s and MFU, best
  validation loss, last checkpoint).

Every file is appended to or replaced whole, so a resumed run continues the same record.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from megatron_stablelm.checkpoint.layout import CheckpointError

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "train.log"


class RunRecord:
    """Rank 0's record of a run in ``directory`` (``log_dir`` for the log file, if given)."""

    def __init__(self, directory: str | Path, log_dir: str | Path | None = None) -> None:
        self.directory = Path(directory)
        self.log_path = Path(log_dir or directory) / LOG_FILE
        self.started = time.time()

    def start(self, config: dict[str, Any], argv: list[str] | None = None) -> None:
        """Create the directories and write the config and command line; a directory that cannot be
        written is a :class:`CheckpointError` naming it (train.py checks both before anything is built,
        see ``checkpoint.run_directory.unwritable_reason``; this catches what changed since)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / "run_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
            command = shlex.join(argv if argv is not None else [sys.executable, *sys.argv])
            with open(self.directory / "command.txt", "a") as fh:
                fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {command}\n")
        except OSError as err:
            raise CheckpointError(f"cannot write the run's record: {err.filename}: {err.strerror}") from None

    def log(self, line: str) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(line.rstrip("\n") + "\n")

    def metrics(self, kind: str, values: dict[str, Any]) -> None:
        record = {"kind": kind, **{k: _json_number(v) for k, v in values.items()}, "time": time.time()}
        with open(self.directory / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any]) -> str:
        """Write the summary (file and metrics line); return its one-line form."""
        summary = {**summary, "wall_seconds": round(time.time() - self.started, 1)}
        (self.directory / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        self.metrics("summary", summary)
        return " | ".join(f"{k} {v}" for k, v in summary.items())


def _json_number(value: Any) -> Any:
    """NaN and infinities as null (JSON has neither); everything else as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
