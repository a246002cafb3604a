"""train.log is every line rank 0 printed, each with its time, one header per start; nothing is written
for a start that never got a record. In-process: the capture is Python-level (sys.stdout/sys.stderr)."""

from __future__ import annotations

import logging
import re
import sys

from megatron_stablelm.training.run_record import HEADER_MARK, LOG_FILE, RunRecord, capture_output

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
PRINTED = [  # in order: before the record exists, then after it
    "data mixture (train): 2 sources",
    "  web  80%",
    "a library's warning",
    "a Python warning",
    "iter 1/2 | loss 5.0",
    "[train.py] done at iteration 2",
]


def _start(run, number: int) -> None:
    """One start of a run: a data report, a library logger bound to the stream when it was imported
    (DeepSpeed's), a warning on stderr, the record, a log line, and train.py's last line (unfinished)."""
    with capture_output() as log:
        print("data mixture (train): 2 sources\n  web  80%")
        library = logging.getLogger(f"deepspeed-like-{number}")
        library.propagate = False
        library.addHandler(logging.StreamHandler(stream=sys.stdout))
        library.warning("a library's warning")
        print("a Python warning", file=sys.stderr)  # where warnings.showwarning writes (pytest records them)
        RunRecord(run).start({"train_iters": 2}, log)
        print("iter 1/2 | loss 5.0")
        print("[train.py] done at iteration 2", file=sys.stderr, end="")


def test_train_log_holds_every_printed_line_stamped_under_one_header_per_start(tmp_path, capsys):
    run = tmp_path / "run"
    _start(run, 1)
    _start(run, 2)
    console = capsys.readouterr()
    assert "iter 1/2 | loss 5.0" in console.out and "a Python warning" in console.err  # still printed
    lines = (run / LOG_FILE).read_text().splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith(HEADER_MARK)]
    assert len(headers) == 2 and headers[0] == 0, lines
    for header in headers:
        assert "| host " in lines[header] and "| pid " in lines[header] and sys.executable in lines[header]
    assert all(STAMP.match(line) for i, line in enumerate(lines) if i not in headers), lines
    for start in (lines[1 : headers[1]], lines[headers[1] + 1 :]):
        text = "\n".join(start)
        positions = [text.find(line) for line in PRINTED]
        assert -1 not in positions and positions == sorted(positions), text


def test_a_start_without_a_record_writes_nothing(tmp_path):
    stdout, stderr = sys.stdout, sys.stderr
    with capture_output():
        print("[setup] no `load`: starting from scratch")
        print("[train.py] error: something bad", file=sys.stderr)
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    assert list(tmp_path.iterdir()) == []


def test_a_signal_handler_printing_in_the_middle_of_a_write_neither_hangs_nor_garbles(tmp_path, monkeypatch):
    """signals.py prints from its handler, which runs wherever the main thread was: possibly inside the
    log's own file write (holding its lock), or inside the console write of another line."""
    import io
    import threading

    from megatron_stablelm.training.run_record import RunLog

    handler_line = "[train] SIGTERM received: finishing this step, then saving and exiting"
    handled: list[str] = []

    def signal_arrives(where: str) -> None:
        if where not in handled:
            handled.append(where)
            print(handler_line)

    class Console(io.StringIO):
        def write(self, text: str) -> int:
            written = super().write(text)
            if text == "\n":
                signal_arrives("console")
            return written

    write = RunLog._write

    def file_write(self, lines):
        signal_arrives("file")
        write(self, lines)

    def start() -> None:
        monkeypatch.setattr(sys, "stdout", Console())
        with capture_output() as log:
            RunRecord(tmp_path).start({}, log)
            monkeypatch.setattr(RunLog, "_write", file_write)
            print("iter 3/5 | loss 5.0")
            print("iter 4/5 | loss 4.9")

    worker = threading.Thread(target=start, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the log deadlocked on its own lock"
    lines = [line[20:] for line in (tmp_path / LOG_FILE).read_text().splitlines()[1:]]
    assert sorted(lines) == sorted(["iter 3/5 | loss 5.0", "iter 4/5 | loss 4.9", handler_line, handler_line])
