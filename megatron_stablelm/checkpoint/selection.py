"""Which checkpoint a run resumes from, and whether it fits the config: every check before anything
is built (and before torch-heavy imports: this module needs only the checkpoint's files).

``checkpoint_to_resume`` is the decision ``train.py`` makes first (to fail in seconds) and the trainer
makes again in its preflight: ``load`` resolved (a checkpoint, a run directory with ``latest``, or
``iteration``'s), the architecture compared key by key (:data:`~megatron_stablelm.config.ARCHITECTURE_KEYS`),
the padded vocabulary, the training state and every shard file's header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megatron_stablelm.checkpoint.layout import (
    META_FILE,
    TRAIN_FORMAT,
    TRAIN_STATE_FILE,
    CheckpointError,
    has_checkpoint,
    iteration_dirname,
    optim_files,
    resolve_checkpoint,
)
from megatron_stablelm.checkpoint.model_files import check_safetensors_file, read_header
from megatron_stablelm.config import ARCHITECTURE_KEYS, Config


@dataclass
class CheckpointInfo:
    """A checkpoint found fit for a config; everything needed to decide before building anything."""

    path: Path
    meta: dict
    config: Config
    train_state: dict | None  # None: weights only (e.g. converted from Hugging Face)
    warnings: list[str] = field(default_factory=list)

    @property
    def iteration(self) -> int:
        return int(self.train_state["iteration"]) if self.train_state else 0


def architecture_differences(saved: Config, current: Config) -> list[str]:
    """``key: checkpoint X, config Y`` for every architecture key that differs."""
    out = []
    for key in ARCHITECTURE_KEYS:
        a, b = getattr(saved, key), getattr(current, key)
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, config {b!r}")
    return out


def read_train_state(directory: Path) -> dict | None:
    """``train_state.json`` of a checkpoint, or None for a weights-only one."""
    path = directory / TRAIN_STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read the training state ({err})") from None
    if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: unsupported training-state format {found}")
    return state


def _select(cfg: Config, path: Path) -> Path:
    """``path`` itself, or its ``iter_N`` when the config asks for iteration N."""
    if cfg.iteration is None:
        return path
    wanted = path / iteration_dirname(cfg.iteration)
    if wanted.is_dir():
        return wanted
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"iteration {cfg.iteration} requested but {path} has no {wanted.name}")
    return path


def checkpoint_for_config(cfg: Config, path: str | Path, padded_vocab: int | None = None) -> CheckpointInfo:
    """Resolve ``path`` (a checkpoint or a run directory with ``latest``; ``cfg.iteration`` picks a
    specific one) and check that it can be loaded into the model ``cfg`` describes."""
    directory = resolve_checkpoint(_select(cfg, Path(path)))
    directory, meta, saved_cfg = read_header(directory)
    if not cfg.no_checkpoint_arg_validation:
        diffs = architecture_differences(saved_cfg, cfg)
        if diffs:
            raise CheckpointError(
                f"{directory}: the checkpoint's architecture differs from the config: "
                + "; ".join(diffs)
                + " (set no_checkpoint_arg_validation: true only if you know the shapes still match)"
            )
    if padded_vocab is not None and meta["padded_vocab_size"] != padded_vocab:
        raise CheckpointError(
            f"{directory}: the checkpoint's padded vocabulary is {meta['padded_vocab_size']} rows but the "
            f"config gives {padded_vocab} (set padded_vocab_size: {meta['padded_vocab_size']})"
        )
    state = read_train_state(directory)
    if state is not None and state.get("has_optimizer"):
        for tp_rank in range(meta["tp_size"]):
            files = optim_files(directory, tp_rank)
            if not files:
                raise CheckpointError(f"{directory}: optimizer files for TP rank {tp_rank} are missing")
            for path in files:
                check_safetensors_file(path)
    return CheckpointInfo(directory, meta, saved_cfg, state)


def checkpoint_to_resume(cfg: Config, padded_vocab: int | None = None) -> CheckpointInfo | None:
    """The checkpoint ``cfg.load`` names, checked against ``cfg``; None when there is nothing to load:
    no ``load``, or ``load == save`` with no checkpoint in it yet (the first launch of a job that
    resumes itself)."""
    if not cfg.load:
        return None
    load = Path(cfg.load)
    first_launch = (
        cfg.save is not None
        and load.resolve() == Path(cfg.save).resolve()
        and not has_checkpoint(load)
        and cfg.iteration is None
    )
    if first_launch:
        return None
    return checkpoint_for_config(cfg, load, padded_vocab)
