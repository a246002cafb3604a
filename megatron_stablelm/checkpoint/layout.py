"""The on-disk layout of a checkpoint: every file name, version and directory rule, defined once.

::

    SAVE/                                   a run directory
        latest                              name of the newest complete checkpoint (replaced last)
        iter_0000100/                       one checkpoint
            config.yml                      resolved config (what built the model)
            model_meta.json                 format version, TP size, padded vocab, dtype, shapes, splits
            model_tp00.safetensors ...      one file per tensor-parallel rank, canonical tensor names
            optim_tp00_dp000.safetensors    Adam state per canonical parameter (trainer only)
            train_state.json                iteration, consumed samples/tokens, Adam step, loss scaler
            rng_rank00000.pt ...            RNG states of every rank (trainer only)
        start_over.json                     written when a run started over from `load` (start_from_load)
        skip_windows.json                   iteration windows a loss-spike rollback skips (training/spikes.py)
        set_aside_20261207-213500/iter_...  checkpoints that start-over moved away (never overwritten)

Weights-only checkpoints (conversion tools) have the first three kinds of file; the trainer adds the
rest. Everything else in this package reads and writes through these names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

MODEL_FORMAT = 1
TRAIN_FORMAT = 2  # 2: optimizer state written as each ZeRO partition's fragments (optimizer_files.py)
READABLE_TRAIN_FORMATS = (1, 2)  # 1: whole tensors only

META_FILE = "model_meta.json"
CONFIG_FILE = "config.yml"
LATEST_FILE = "latest"
TRAIN_STATE_FILE = "train_state.json"
START_OVER_FILE = "start_over.json"  # in a run directory: a start-over from `load` already happened
SET_ASIDE_PREFIX = "set_aside_"
SKIP_WINDOWS_FILE = "skip_windows.json"  # in a run directory: iterations a spike rollback skips  # in a run directory: checkpoints a start-over moved out of the way

_ITER_DIR = re.compile(r"iter_(\d+)")
_MODEL_SHARD = re.compile(r"model_tp(\d+)\.safetensors")
_OPTIM_SHARD = re.compile(r"optim_tp(\d+)_dp(\d+)\.safetensors")
_RNG_FILE = re.compile(r"rng_rank(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model; the message names the path."""


def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_of(directory: str | Path) -> int | None:
    """The iteration a checkpoint directory's name says (``iter_0000100`` → 100), or None."""
    match = _ITER_DIR.fullmatch(Path(directory).name)
    return int(match.group(1)) if match else None


def shard_filename(tp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}.safetensors"


def optim_filename(tp_rank: int, dp_rank: int) -> str:
    return f"optim_tp{tp_rank:02d}_dp{dp_rank:03d}.safetensors"


def optim_files(directory: Path, tp_rank: int) -> list[Path]:
    """The optimizer files of one TP rank (one per DP rank that wrote a share), sorted."""
    return sorted(
        p for p in directory.iterdir() if (m := _OPTIM_SHARD.fullmatch(p.name)) and int(m.group(1)) == tp_rank
    )


def rng_filename(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


def file_kind(name: str) -> str:
    """'model' | 'optim' | 'rng' | 'state' | 'unknown': what a file in a checkpoint directory is."""
    if name in (META_FILE, CONFIG_FILE) or _MODEL_SHARD.fullmatch(name):
        return "model"
    if _OPTIM_SHARD.fullmatch(name):
        return "optim"
    if _RNG_FILE.fullmatch(name):
        return "rng"
    if name == TRAIN_STATE_FILE:
        return "state"
    return "unknown"


# The hidden names a writer uses beside what it publishes: hidden (a leading dot) and never an
# ``iter_N``, so no reader takes them for a complete checkpoint.
_STAGING_SUFFIX = ".tmp"
_RETIRED_MARK = ".old-"


def staging_name(final_name: str) -> str:
    """Where a checkpoint is written before it is published (a hidden sibling)."""
    return f".{final_name}{_STAGING_SUFFIX}"


def retired_name(final_name: str) -> str:
    """The hidden name a published directory is renamed to before it is removed (replaced by a re-save,
    or pruned): a crash mid-removal leaves this name, not a half-deleted ``final_name``. The process id
    keeps two writers' names apart."""
    return f".{final_name}{_RETIRED_MARK}{os.getpid()}"


def latest_staging_name() -> str:
    """Where the next ``latest`` is written before it atomically replaces the current one."""
    return f".{LATEST_FILE}{_STAGING_SUFFIX}-{os.getpid()}"


def is_staging(name: str) -> bool:
    """A staging directory, or a retired copy (:func:`retired_name`), left by a killed writer."""
    return name.startswith(".") and (name.endswith(_STAGING_SUFFIX) or _RETIRED_MARK in name)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from either itself or a run directory holding ``latest``."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        target = path / latest.read_text().strip()
        if (target / META_FILE).is_file():
            return target
        raise CheckpointError(f"{latest} points at {target}, which is not a complete checkpoint")
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    raise CheckpointError(f"no checkpoint in {path} (neither {META_FILE} nor a '{LATEST_FILE}' file)")


def published_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, directory)`` of every published checkpoint in run directory ``root``, oldest first.
    A directory named ``iter_N`` is complete by construction: it only ever appears by the rename that
    ends a save (:mod:`.atomic`), whatever ``latest`` says."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        (it, path)
        for path in root.iterdir()
        if (it := iteration_of(path)) is not None and (path / META_FILE).is_file()
    )


def has_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint or a run directory that already points at one."""
    path = Path(path)
    return (path / META_FILE).exists() or (path / LATEST_FILE).exists()
