"""The run directory a training job saves into: one writer at a time, writable, with room to save.

These checks run when the job starts, before any step is trained, so that a read-only or full
directory, or a second job pointed at the same ``save``, fails in seconds instead of at the first
checkpoint (or, worse, by two jobs deleting each other's in-progress saves and overwriting each
other's checkpoints).

The lock is ``fcntl.flock`` on the run directory itself (no lock file to go stale): the kernel
releases it when the holding process dies, however it dies, so a killed job never blocks the next one.
The holder writes who it is (pid, host, start time) into ``.lock_holder`` beside it, only so that a
refused start can name it; the file means nothing while the lock is free. ``train.py`` asks
(:func:`in_use_reason`) before anything heavy, so a start against a live run's directory is refused
in a second rather than after set-up.
(On network file systems that do not implement ``flock`` the lock call fails with a clear message; set
``MEGATRON_STABLELM_NO_RUN_LOCK=1`` there to run without it, at your own risk.)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path

from megatron_stablelm.checkpoint.layout import CheckpointError

_NO_LOCK_ENV = "MEGATRON_STABLELM_NO_RUN_LOCK"
HOLDER_FILE = ".lock_holder"


def _in_use_message(root: Path) -> str:
    """The refusal of a directory another run holds, naming the holder when it wrote itself down."""
    try:
        holder = (root / HOLDER_FILE).read_text().strip() or "holder unknown"
    except OSError:
        holder = "holder unknown"
    return (
        f"{root} is in use by another training run ({holder}); give this run its own `save` directory, "
        "or stop the other one"
    )


def in_use_reason(root: str | Path) -> str | None:
    """Why ``root`` cannot be claimed now (another process holds its lock), or None. A probe: a shared
    lock, released at once, so that probing ranks never refuse each other and no lock is kept that the
    trainer would then fail to take. Whatever else goes wrong is left to the claim itself."""
    root = Path(root)
    if os.environ.get(_NO_LOCK_ENV) or not root.is_dir():
        return None
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        return _in_use_message(root) if err.errno in (errno.EAGAIN, errno.EACCES) else None
    finally:
        os.close(fd)  # releases the probe's lock
    return None


class RunDirectoryLock:
    """Exclusive ownership of a run directory for the lifetime of this process (or until
    :meth:`release`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> RunDirectoryLock:
        self._created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(
                f"{self.root}: the save directory is not writable ({err.strerror})"
            ) from None
        if os.environ.get(_NO_LOCK_ENV):
            return self
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise CheckpointError(_in_use_message(self.root)) from None
            raise CheckpointError(
                f"{self.root}: cannot lock the run directory ({err.strerror}); set {_NO_LOCK_ENV}=1 on file "
                "systems without flock"
            ) from None
        self._fd = fd
        try:  # who holds it, for a refused start to name (nothing depends on it)
            holder = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
            (self.root / HOLDER_FILE).write_text(holder + "\n")
        except OSError:
            pass
        return self

    def release(self, remove_if_created_empty: bool = False) -> None:
        """Give the directory up; with ``remove_if_created_empty``, also remove it if this run created it
        and wrote nothing there (a run that failed to start leaves no empty directory behind)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                (self.root / HOLDER_FILE).unlink(missing_ok=True)
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        if remove_if_created_empty and self._created and not any(self.root.iterdir()):
            self.root.rmdir()


def check_writable(root: str | Path, checkpoint_bytes: int) -> str:
    """Create ``root`` if needed, prove a file can be written there, and compare the free space with
    the size of one checkpoint. Returns a one-line report; raises :class:`CheckpointError` naming the
    directory when it cannot be written or one checkpoint would not fit."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_probe(root)
    except OSError as err:
        raise CheckpointError(f"{root}: the save directory is not writable ({err.strerror})") from None
    free = shutil.disk_usage(root).free
    if free < checkpoint_bytes:
        raise CheckpointError(
            f"{root}: {free / 2**30:.2f} GiB free but one checkpoint needs about "
            f"{checkpoint_bytes / 2**30:.2f} GiB"
        )
    return f"{root}: {free / 2**30:.1f} GiB free, one checkpoint is about {checkpoint_bytes / 2**30:.2f} GiB"


def unwritable_reason(directory: str | Path) -> str | None:
    """Why ``directory`` could not be created and written, or None, found without creating it: the
    nearest directory that exists must take a file (a probe, removed at once). train.py asks before
    anything is built, so a bad ``save`` or ``log_dir`` fails in a second, not after setup."""
    existing = Path(directory).absolute()
    try:
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            return f"{existing} is not a directory"
        _write_probe(existing)
    except OSError as err:
        return f"{existing} is not writable ({err.strerror})"
    return None


def _write_probe(directory: Path) -> None:
    """Write, sync and remove a small file in ``directory``; OSError when it cannot be written."""
    probe = directory / f".write-test-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        if probe.exists():
            probe.unlink()
