"""Crash-safe publication: a directory is written under a hidden staging name, synced, then renamed.

Every writer of checkpoints and converted models goes through :class:`StagedDirectory`, so a crash
(or SIGKILL) at any moment leaves either the previous complete directory or the new complete one,
never a half-written directory under the final name. ``latest`` is replaced atomically after the
directory it names is in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_stablelm.checkpoint.layout import (
    LATEST_FILE,
    CheckpointError,
    is_staging,
    latest_staging_name,
    retired_name,
    staging_name,
)


class StagedDirectory:
    """``with StagedDirectory(final) as tmp:`` write into ``tmp``; on success it becomes ``final``.

    Used as a context manager by single-process writers. The trainer, whose ranks write into one
    directory together, calls :meth:`begin` and :meth:`commit` on one rank with barriers in between.
    ``overwrite`` allows replacing an existing ``final`` (re-saving an iteration after a resume); the
    old one is removed only once the new one is in place."""

    def __init__(self, final: str | Path, overwrite: bool = False) -> None:
        self.final = Path(final)
        self.tmp = self.final.with_name(staging_name(self.final.name))
        self.overwrite = overwrite

    def begin(self) -> Path:
        if self.final.exists() and not self.overwrite:
            raise CheckpointError(f"{self.final} already exists; refusing to overwrite it")
        if self.tmp.exists():  # left by a writer that died
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def commit(self) -> Path:
        fsync_tree(self.tmp)
        publish(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.begin()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        self.commit()


def check_creatable(final: str | Path) -> None:
    """Raise a :class:`CheckpointError` naming ``final`` when no directory can be created there (a
    parent is a regular file, or the nearest existing one is not writable). Writers call it before
    reading anything, since :class:`StagedDirectory` only finds out when it creates the staging
    directory, after the work."""
    final = Path(final)
    parent = final.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"cannot create {final}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot create {final}: {parent} is not writable")


def check_destination(
    final: str | Path, source: str | Path, force: bool, source_name: str, another: str
) -> Path:
    """The checks of a command that writes ``final`` from ``source``, before it reads anything:
    ``final`` must not exist unless ``force`` (the writer replaces it only once the new one is
    complete), must not hold ``source`` (replacing it would delete the input) and must be creatable.
    ``source_name`` ("the checkpoint X being converted") and ``another`` ("output") word the refusal."""
    final, source = Path(final), Path(source)
    if final.exists() and not force:
        raise FileExistsError(f"{final} exists; refusing to overwrite it (use --force to replace it)")
    if final.resolve() in (source.resolve(), *source.resolve().parents):
        raise ValueError(f"{final} holds {source_name}; choose another {another}")
    check_creatable(final)
    return final


def remove_stale_staging(root: Path) -> None:
    """Remove staging directories a killed writer left in ``root`` (call only while holding the run)."""
    for path in root.iterdir():
        if path.is_dir() and is_staging(path.name):
            shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete, synced directory ``tmp`` to ``final``, replacing an existing one only once
    the new one is in place, and make the rename durable."""
    if final.exists():
        old = final.with_name(retired_name(final.name))
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_dir(root)


def write_latest(root: str | Path, name: str) -> None:
    """Point ``root/latest`` at checkpoint ``name`` (atomic replace)."""
    root = Path(root)
    tmp = root / latest_staging_name()
    tmp.write_text(name + "\n")
    fsync_file(tmp)
    os.replace(tmp, root / LATEST_FILE)
    fsync_dir(root)
