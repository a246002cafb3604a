"""The hang watchdog: a rank that makes no progress for too long records where it is stuck and exits.

Why: one stuck rank (a dead NCCL peer, a stalled filesystem, a deadlocked data worker) blocks every
other rank inside a collective until the process-group timeout (30 minutes), and then the job dies
with no record of where it hung. Here each rank runs a daemon thread; the trainer reports progress
(:meth:`Watchdog.beat`) after every step, evaluation and save. When nothing has been reported for
``watchdog_timeout`` seconds the thread writes every thread's Python stack (and, with NCCL, the
flight recorder's trace) to ``hang_rank<R>.txt`` in the run directory, prints one line naming the
file, and ends the process with :data:`HANG_EXIT_CODE`, so the launcher stops the job and SLURM can
requeue it from the last checkpoint. The other ranks, waiting in a collective for the stuck one, stop
the same way within the same timeout.

The timeout must outlast the slowest healthy interval between two beats: a save of the largest model
(Stable LM 2 12B: about 170 GB), the first step's compilation, an evaluation. The default (30
minutes, ``watchdog_timeout``) is generous; ``0`` turns the watchdog off.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

HANG_EXIT_CODE = 4


class Watchdog:
    """``start()`` once; ``beat(what)`` whenever the rank makes progress; ``stop()`` at the end."""

    def __init__(self, timeout_s: float, dump_dir: str | Path, rank: int) -> None:
        self.timeout_s = float(timeout_s)
        self.dump_file = Path(dump_dir) / f"hang_rank{rank}.txt"
        self.rank = rank
        self._last = time.monotonic()
        self._what = "start"
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="megatron_stablelm-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.timeout_s > 0:
            self._thread.start()
        return self

    def beat(self, what: str) -> None:
        """Progress: ``what`` is done (e.g. ``"iteration 12"``, ``"save of iteration 12"``)."""
        self._last = time.monotonic()
        self._what = what

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        period = min(self.timeout_s / 4, 10.0)
        while not self._stopped.wait(period):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        try:
            self.dump_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dump_file, "w") as fh:
                fh.write(
                    f"rank {self.rank}: no progress for {idle:.0f} s (watchdog_timeout {self.timeout_s:g} s); "
                    f"last progress: {self._what}; pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
                )
                fh.flush()
                faulthandler.dump_traceback(file=fh, all_threads=True)
                _dump_nccl_trace(fh)
            where = str(self.dump_file)
        except OSError as err:  # the run directory itself may be what hangs: stacks to stderr instead
            where = f"stderr ({self.dump_file}: {err.strerror})"
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        print(
            f"[watchdog] rank {self.rank}: no progress for {idle:.0f} s after {self._what} "
            f"(watchdog_timeout {self.timeout_s:g} s); every thread's stack is in {where}; exiting "
            f"with code {HANG_EXIT_CODE} so the job can be requeued from the last checkpoint",
            file=sys.stderr,
            flush=True,
        )
        os._exit(HANG_EXIT_CODE)


def _dump_nccl_trace(fh) -> None:
    """Append NCCL's flight-recorder trace (recent collectives per rank, with their state), when
    torch records one (``TORCH_NCCL_TRACE_BUFFER_SIZE`` > 0 on a CUDA build)."""
    try:
        import pickle

        from torch._C._distributed_c10d import _dump_nccl_trace as dump
    except ImportError:
        return
    try:
        trace = pickle.loads(dump())
    except Exception as err:  # no NCCL process group, or recording is off
        fh.write(f"\n(no NCCL flight-recorder trace: {type(err).__name__})\n")
        return
    fh.write("\nNCCL flight recorder:\n")
    for entry in trace.get("entries", []):
        fh.write(f"  {entry}\n")
