"""What a training run leaves beside its checkpoints, so that it can be read (and plotted) later.

The one owner of the names of those files (``tools/plot_run.py``, ``benchmarks/`` and the tests read
them from here). In the run directory (the config's ``save``), written by global rank 0:

* ``run_config.yml``: the resolved config; ``command.txt``: the command line and the time it started;
* ``train.log`` (in ``log_dir`` when the config gives one): every line rank 0 printed — the trainer's,
  ``train.py``'s own, the data mixture report, DeepSpeed's and Python's warnings — each stamped with
  the time it was printed; every start appends, after a header line naming its time, host, pid and
  command (:class:`RunLog`);
* ``metrics.jsonl``: one JSON object per line: ``{"kind": "train", ...}`` per log interval,
  ``{"kind": "valid" | "test", ...}`` per evaluation, ``{"kind": "summary", ...}`` at the end
  (``tools/plot_run.py`` draws the curves from it);
* ``summary.json``: the end-of-run summary (iterations, tokens, wall time, mean tokens/s and MFU, best
  validation loss, last checkpoint).

Every file is appended to or replaced whole, so a resumed run continues the same record.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import yaml

from megatron_stablelm.checkpoint.layout import CheckpointError

CONFIG_FILE = "run_config.yml"
COMMAND_FILE = "command.txt"
LOG_FILE = "train.log"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
HEADER_MARK = "====="  # starts the header line of each start in train.log


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def command_line() -> str:
    """This process's command line, as it could be typed again."""
    return shlex.join([sys.executable, *sys.argv])


class RunLog:
    """The lines of ``train.log`` from this process, each stamped with the time it was logged.

    Lines are held in memory until the run's record starts (:meth:`attach`, once set-up has
    succeeded), so a start that fails leaves the run directory as it was; from then on each line is
    appended as it comes. ``captures_output``: fed by :func:`capture_output` (everything printed),
    rather than by the trainer's own lines."""

    def __init__(self, captures_output: bool = False) -> None:
        self.captures_output = captures_output
        self.header = (
            f"{HEADER_MARK} {_now()} | host {socket.gethostname()} | pid {os.getpid()} | {command_line()}"
        )
        self._held: list[str] | None = []
        self._path: Path | None = None
        self._lock = threading.RLock()  # re-entered by a signal handler that prints (signals.py)

    def line(self, text: str) -> None:
        """Keep (or append) ``text``, each of its lines stamped with the time now."""
        stamped = [f"{_now()} {part}".rstrip() for part in text.rstrip("\n").split("\n")]
        with self._lock:
            if self._path is not None:
                self._write(stamped)
            elif self._held is not None:
                self._held.extend(stamped)

    def attach(self, path: Path) -> None:
        """Write the header and the lines held so far to ``path``, then every later line."""
        with self._lock:
            self._path, held, self._held = path, self._held or [], None
            self._write([self.header, *held])

    def close(self) -> None:
        """Keep nothing more (a run without a record, or the end of the process's run)."""
        with self._lock:
            self._path = self._held = None

    def _write(self, lines: list[str]) -> None:
        """Append; a log that cannot be written (disk full) stops the log with one line, never the run."""
        try:
            with open(self._path, "a", encoding="utf-8") as fh:
                fh.write("".join(line + "\n" for line in lines))
        except OSError as err:
            print(f"[run_record] {self._path}: {err.strerror}; train.log stops here", file=sys.__stderr__)
            self._path = None


class _Tee:
    """A text stream that writes through to ``stream`` and hands each complete line to a :class:`RunLog`
    (everything else, ``fileno`` included, is the stream's own).

    A signal handler that prints (signals.py) runs wherever the main thread was, possibly inside
    :meth:`write`: its text is then assembled into lines apart (``_partial[1]``), so that neither
    writer's line is cut, merged or repeated in the log."""

    def __init__(self, stream: TextIO, log: RunLog) -> None:
        self._stream, self._log = stream, log
        self._partial = ["", ""]  # the unfinished line of the outer writer, of a nested (handler) one
        self._writing = False

    def write(self, text: str) -> int:
        nested, self._writing = self._writing, True
        try:
            written = self._stream.write(text)
            *lines, self._partial[nested] = (self._partial[nested] + text).split("\n")
            for line in lines:
                self._log.line(line)
        finally:
            self._writing = nested
        return written

    def flush(self) -> None:
        self._stream.flush()

    def finish(self) -> None:
        for line in filter(None, self._partial):
            self._log.line(line)
        self._partial = ["", ""]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_capturing: RunLog | None = None


def active_run_log() -> RunLog | None:
    """The log :func:`capture_output` feeds in this process, if any."""
    return _capturing


@contextlib.contextmanager
def capture_output() -> Iterator[RunLog]:
    """Everything this process prints, through ``sys.stdout`` / ``sys.stderr``, also goes to the run's
    log (``train.py`` on rank 0). Python-level streams, not file descriptors: no pipe or thread, and
    nothing lost when the process is killed. DeepSpeed's logger writes to the ``sys.stdout`` of the
    time DeepSpeed was imported, which is this stream when the capture starts first (train.py starts
    it before importing anything heavy); Python's warnings go through ``sys.stderr``."""
    global _capturing
    log = RunLog(captures_output=True)
    saved = sys.stdout, sys.stderr
    tees = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    sys.stdout, sys.stderr = tees
    _capturing = log
    try:
        yield log
    finally:
        for tee in tees:
            tee.finish()
        sys.stdout, sys.stderr = saved
        _capturing = None
        log.close()


class RunRecord:
    """Rank 0's record of a run in ``directory`` (``log_dir`` for the log file, if given)."""

    def __init__(self, directory: str | Path, log_dir: str | Path | None = None) -> None:
        self.directory = Path(directory)
        self.log_path = Path(log_dir or directory) / LOG_FILE
        self.summary_path = self.directory / SUMMARY_FILE
        self.started = time.time()

    def start(self, config: dict[str, Any], log: RunLog | None = None) -> None:
        """Create the directories, write the config and command line, and start ``train.log`` with
        ``log``'s lines so far (a header alone without one); a directory that cannot be written is a :class:`CheckpointError` naming
        it (train.py checks both before anything is built, see
        ``checkpoint.run_directory.unwritable_reason``; this catches what changed since)."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
            with open(self.directory / COMMAND_FILE, "a") as fh:
                fh.write(f"{_now()}  {command_line()}\n")
        except OSError as err:
            raise CheckpointError(f"cannot write the run's record: {err.filename}: {err.strerror}") from None
        (log or RunLog()).attach(self.log_path)

    def metrics(self, kind: str, values: dict[str, Any]) -> None:
        record = {"kind": kind, **{k: _json_number(v) for k, v in values.items()}, "time": time.time()}
        with open(self.directory / METRICS_FILE, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any]) -> str:
        """Write the summary (file and metrics line); return its one-line form."""
        summary = {**summary, "wall_seconds": round(time.time() - self.started, 1)}
        self.summary_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
        self.metrics("summary", summary)
        return " | ".join(f"{k} {v}" for k, v in summary.items())


def _json_number(value: Any) -> Any:
    """NaN and infinities as null (JSON has neither); everything else as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
