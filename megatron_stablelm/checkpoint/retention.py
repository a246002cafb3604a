"""Checkpoint retention (GPT-NeoX's ``keep_last_n_checkpoints``): old checkpoints go, safely.

Only checkpoints older than the one ``latest`` names are candidates, and only after the new one is
published and ``latest`` has moved: at every moment the checkpoint a crash would resume from is
complete. A deleted checkpoint is first renamed to a hidden name (which the next save's stale-staging
cleanup also removes), so a crash in the middle of a deletion never leaves a half-deleted
``iter_N`` that looks complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_stablelm.checkpoint.layout import LATEST_FILE, META_FILE, iteration_of, retired_name


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete the complete checkpoints of run directory ``root`` older than the ``keep`` newest up to
    and including the one ``latest`` names. Returns what was deleted."""
    root = Path(root)
    latest_file = root / LATEST_FILE
    if keep < 1 or not latest_file.is_file():
        return []
    latest = iteration_of(latest_file.read_text().strip())
    if latest is None:
        return []
    older = sorted(
        (it, path)
        for path in root.iterdir()
        if (it := iteration_of(path)) is not None and it < latest and (path / META_FILE).is_file()
    )
    doomed = [path for _, path in older[: max(len(older) - (keep - 1), 0)]]
    for path in doomed:
        hidden = path.with_name(retired_name(path.name))
        os.rename(path, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed
