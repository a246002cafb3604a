"""How a training process reacts to SIGTERM and SIGINT (Ctrl-C), in one place.

Stopping must never cost work or corrupt a checkpoint:

* before training starts (imports, setup), the first signal stops the process at once: nothing has
  been trained, nothing is written; :class:`StopBeforeTraining` carries it to ``train.py``, which
  exits with one line instead of a traceback;
* during training, the first signal (SLURM's preemption notice, or Ctrl-C) asks every rank to finish
  the current step, save a checkpoint and exit cleanly (the trainer agrees on it across ranks);
* a second Ctrl-C exits at once, without a traceback. A save in progress is abandoned in its staging
  directory; the last complete checkpoint and ``latest`` are untouched (see ``checkpoint/atomic.py``).

Importing this module is cheap (no torch), so ``train.py`` installs the handlers before anything heavy.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

HANDLED = (signal.SIGTERM, signal.SIGINT)

# A stop request that needs no signal: the file ``stop`` in the job directory the launcher names
# (``MEGATRON_STABLELM_JOB_DIR``). ``launch/slurm/train.sbatch`` creates it on SLURM's time-limit warning
# (a signal to the batch script alone: delivered through DeepSpeed's or torchrun's launchers, a signal
# can kill ranks in the middle of a save), and an operator can ``touch`` it to stop a run cleanly.
JOB_DIR_ENV = "MEGATRON_STABLELM_JOB_DIR"
STOP_FILE = "stop"
STOP_FILE_REASON = "stop_file"


class StopBeforeTraining(BaseException):
    """A stop signal arrived before the first training step. A ``BaseException`` (like
    ``KeyboardInterrupt``) so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class StopRequest:
    """The stop state of this process: which signal asked first (``None``: none), and whether training
    has started (then signals are only recorded, and acted on at the next step boundary)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.training = False
        self._previous: dict[int, object] = {}
        job_dir = os.environ.get(JOB_DIR_ENV)
        self.stop_file = Path(job_dir) / STOP_FILE if job_dir else None

    def requested(self) -> str | None:
        """Why this process should stop at the next step boundary: the signal's name, ``stop_file``
        when the job directory's stop file exists, or None."""
        if self.signal_name is not None:
            return self.signal_name
        if self.stop_file is not None and self.stop_file.exists():
            return STOP_FILE_REASON
        return None

    def install(self) -> StopRequest:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            if signum == signal.SIGINT:
                print(
                    "[train] second SIGINT: exiting now; the last complete checkpoint is untouched",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(130)
            return
        self.signal_name = name
        if not self.training:
            raise StopBeforeTraining(name)
        print(
            f"[train] {name} received: finishing this step, then saving and exiting"
            + (" (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""),
            flush=True,
        )
