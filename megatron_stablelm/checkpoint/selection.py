"""Which checkpoint a run resumes from, and whether it fits the config: every check before anything
is built (and before torch-heavy imports: this module needs only the checkpoint's files).

``plan_resume`` is the decision ``train.py`` makes first (to fail in seconds) and hands to the trainer:
the run's own progress in ``save`` first, else ``load`` (a checkpoint, a run directory with ``latest``,
or ``iteration``'s), the architecture compared key by key (:data:`~megatron_stablelm.config.ARCHITECTURE_KEYS`),
the padded vocabulary, the training state and every shard file's header.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_stablelm.checkpoint.layout import (
    LATEST_FILE,
    META_FILE,
    READABLE_TRAIN_FORMATS,
    SET_ASIDE_PREFIX,
    SKIP_WINDOWS_FILE,
    START_OVER_FILE,
    TRAIN_STATE_FILE,
    CheckpointError,
    iteration_dirname,
    optim_files,
    published_checkpoints,
    resolve_checkpoint,
    rng_filename,
    shard_filename,
)
from megatron_stablelm.checkpoint.meta import ModelMeta
from megatron_stablelm.checkpoint.model_files import read_header, safetensors_header
from megatron_stablelm.checkpoint.optimizer_files import (
    file_fragments,
    join_fragments,
    parameter_of,
    state_key,
)
from megatron_stablelm.config import ARCHITECTURE_KEYS, Config


@dataclass
class CheckpointInfo:
    """A checkpoint found fit for a config; everything needed to decide before building anything."""

    path: Path
    meta: ModelMeta
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
    if not isinstance(state, dict) or state.get("format") not in READABLE_TRAIN_FORMATS:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: unsupported training-state format {found}")
    for key in _COUNTERS:
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path}: '{key}' must be a non-negative integer, not {value!r}")
    if "iteration" not in state:
        raise CheckpointError(f"{path}: 'iteration' is missing")
    return state


# The counters of train_state.json: whole numbers that resume the schedule and the data position.
_COUNTERS = (
    "iteration",
    "consumed_samples",
    "consumed_valid_samples",
    "consumed_tokens",
    "skipped_iterations",
    "nonfinite_iterations",
    "adam_step",
    "world_size",
    "tp_size",
    "dp_size",
)


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
    if padded_vocab is not None and meta.padded_vocab_size != padded_vocab:
        raise CheckpointError(
            f"{directory}: the checkpoint's padded vocabulary is {meta.padded_vocab_size} rows but the "
            f"config gives {padded_vocab} (set padded_vocab_size: {meta.padded_vocab_size})"
        )
    state = read_train_state(directory)
    if state is not None and state.get("has_optimizer"):
        _check_optimizer_files(directory, meta, state)
    info = CheckpointInfo(directory, meta, saved_cfg, state)
    if state is not None:
        missing = [
            rng_filename(r)
            for r in range(state.get("world_size", 0))
            if not (directory / rng_filename(r)).is_file()
        ]
        if missing:
            info.warnings.append(
                f"{directory} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}: those ranks' "
                "random generators are re-seeded, so the resumed run is not bitwise the uninterrupted one"
            )
    return info


def _check_optimizer_files(directory: Path, meta: ModelMeta, state: dict) -> None:
    """From the headers alone: every TP rank's optimizer files hold, for each parameter of this
    checkpoint and each saved state key, that rank's model-shard shape exactly (one whole tensor, or
    fragments that tile it once): an optimizer file from another model, run or DP size is named here,
    not met as a shape error mid-load."""
    keys = state.get("optimizer_keys") or []
    for tp_rank in range(meta.tp_size):
        files = optim_files(directory, tp_rank)
        if not files:
            raise CheckpointError(f"{directory}: optimizer files for TP rank {tp_rank} are missing")
        shapes = {
            n: t["shape"] for n, t in safetensors_header(directory / shard_filename(tp_rank))[0].items()
        }
        pieces: dict[str, list[tuple[int, int]]] = {}
        for path in files:
            header, metadata = safetensors_header(path)
            starts = file_fragments(path, metadata)
            for full_key, tensor in header.items():
                name, shape = parameter_of(full_key), tensor.get("shape")
                if name not in shapes or (full_key not in starts and shapes[name] != shape):
                    raise CheckpointError(
                        f"{path}: '{full_key}' has shape {shape} but the checkpoint's '{name}' is "
                        f"{shapes.get(name, 'absent')} (an optimizer file of another model?)"
                    )
                pieces.setdefault(full_key, []).append((starts.get(full_key, 0), math.prod(shape)))
        for full_key, parts in pieces.items():
            join_fragments(full_key, parts, math.prod(shapes[parameter_of(full_key)]), directory)
        lacking = [state_key(n, k) for n in shapes for k in keys if state_key(n, k) not in pieces]
        if lacking:
            raise CheckpointError(
                f"{directory}: the optimizer files of TP rank {tp_rank} lack {', '.join(lacking[:3])}"
                f"{' ...' if len(lacking) > 3 else ''}"
            )


def _resolved(path: str | Path | None) -> Path | None:
    return Path(path).resolve() if path else None


@dataclass
class StartOver:
    """A start from ``load`` although ``save`` holds checkpoints (``start_from_load: true``): before the
    run's first save, rank 0 moves the checkpoints it would overwrite into ``save/set_aside_<time>/`` and
    records the start-over in ``save/start_over.json``, so a requeued launch of the same command resumes
    this run's progress instead of starting over again. Nothing moves if the start fails before then."""

    save: Path
    record: dict
    set_aside: list[Path]

    def apply(self, log=print) -> None:
        if self.set_aside:
            folder = self.save / f"{SET_ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
            folder.mkdir()
            for path in self.set_aside:
                os.rename(path, folder / path.name)
            latest = self.save / LATEST_FILE
            if latest.is_file() and not (self.save / latest.read_text().strip()).is_dir():
                os.rename(latest, folder / LATEST_FILE)
            if (self.save / SKIP_WINDOWS_FILE).is_file():  # the windows of the run that is set aside
                os.rename(self.save / SKIP_WINDOWS_FILE, folder / SKIP_WINDOWS_FILE)
            log(
                f"[checkpoint] start_from_load: moved {', '.join(p.name for p in self.set_aside)} to {folder}"
            )
        marker = self.save / START_OVER_FILE
        marker.write_text(json.dumps(self.record, indent=1) + "\n")


@dataclass
class ResumePlan:
    """Where a run starts, decided once before anything is built (``train.py`` hands it to the trainer).

    ``checkpoint``: what to load (None: from scratch); ``own_progress``: it is this run's own progress
    (from ``save``), restored whole even when ``finetune`` is set, since ``finetune`` is about how a run
    starts from ``load``; ``line``: the start-up line saying which checkpoint and why; ``start_over``:
    what a start-over moves before the first save."""

    checkpoint: CheckpointInfo | None
    own_progress: bool
    line: str
    start_over: StartOver | None = None

    def start_iteration(self, cfg: Config) -> int:
        """The iteration the run continues from (0: a fresh start, weights only, or a fine-tune leaving
        ``load``)."""
        return _start_iteration(cfg, self.checkpoint, self.own_progress)


def _start_iteration(cfg: Config, info: CheckpointInfo | None, own_progress: bool) -> int:
    if info is None or info.train_state is None or (cfg.finetune and not own_progress):
        return 0
    return info.iteration


def _own_checkpoint(cfg: Config, save: Path, published: list[tuple[int, Path]]) -> tuple[Path, str]:
    """The checkpoint of ``save`` to resume and what to say about how it was picked: the newest
    complete one (``iteration``'s when the config names one). ``latest`` is only a pointer: a lost or
    stale one (a crash between a checkpoint's rename and the pointer, an ``rm``, a filtered copy) never
    makes a run forget its progress."""
    if cfg.iteration is not None:
        wanted = save / iteration_dirname(cfg.iteration)
        if not (wanted / META_FILE).is_file():
            have = ", ".join(p.name for _, p in published) or "none"
            raise CheckpointError(
                f"iteration {cfg.iteration} requested but {save} has no complete {wanted.name} (it has: {have})"
            )
        return wanted, f"iteration: {cfg.iteration}"
    if not published:  # only a `latest`: it names a checkpoint that is not there
        return resolve_checkpoint(save), "its newest checkpoint"
    newest = published[-1][1]
    latest = save / LATEST_FILE
    if not latest.is_file():
        return newest, f"its newest complete checkpoint ('{LATEST_FILE}' is missing)"
    named = latest.read_text().strip()
    if named != newest.name:
        return newest, f"its newest complete checkpoint ('{LATEST_FILE}' names {named or 'nothing'})"
    return newest, "its newest checkpoint"


def plan_resume(cfg: Config, padded_vocab: int | None = None) -> ResumePlan:
    """Where the run ``cfg`` starts, every checkpoint check done (nothing is written).

    * ``save`` holds checkpoints: they are this run's progress; resume from the newest (whatever
      ``load`` says: ``load`` is where a run *starts*). A preempted fine-tune whose ``load`` is the
      base model thus continues instead of starting over.
    * ``save`` holds none: start from ``load`` (a checkpoint, a run directory, ``iteration``'s), or
      from scratch.
    * ``start_from_load: true`` starts from ``load`` anyway; the checkpoints of ``save`` it would
      overwrite are moved aside before its first save (:class:`StartOver`), never overwritten.

    No start ever writes over a published checkpoint: a start whose saves would land on newer
    checkpoints of ``save`` is refused, naming them."""
    save = Path(cfg.save) if cfg.save else None
    published = published_checkpoints(save) if save else []
    has_own = bool(published) or bool(save and (save / LATEST_FILE).is_file())
    start_over_key = {"load": str(_resolved(cfg.load)) if cfg.load else None, "iteration": cfg.iteration}
    if has_own and cfg.start_from_load and _read_start_over(save) != start_over_key:
        return _plan_start_over(cfg, padded_vocab, save, published, start_over_key)
    if has_own:
        directory, how = _own_checkpoint(cfg, save, published)
        info = checkpoint_for_config(cfg, directory, padded_vocab)
        _refuse_overwrite(cfg, save, published, _start_iteration(cfg, info, True), info.path)
        line = f"resuming from {info.path}, {how}: `save` holds this run's progress"
        if cfg.load and _resolved(cfg.load) != _resolved(save):
            line += f" (load: {cfg.load} is where a run starts; to start over from it: start_from_load: true)"
        return ResumePlan(info, True, line)
    if not cfg.load or (
        save is not None and _resolved(cfg.load) == _resolved(save) and cfg.iteration is None
    ):
        where = f"no checkpoint in {save} yet" if cfg.load else "no `load`"
        return ResumePlan(None, False, f"{where}: starting from scratch")
    info = checkpoint_for_config(cfg, cfg.load, padded_vocab)
    line = f"starting from {info.path} (load)" + (f": {save} holds no checkpoint yet" if save else "")
    return ResumePlan(info, False, line)


def _plan_start_over(
    cfg: Config, padded_vocab: int | None, save: Path, published: list[tuple[int, Path]], key: dict
) -> ResumePlan:
    if not cfg.load:
        raise CheckpointError(f"start_from_load: true but `load` is not set ({save} holds checkpoints)")
    info = checkpoint_for_config(cfg, cfg.load, padded_vocab)
    start = _start_iteration(cfg, info, False)
    doomed = [path for it, path in published if it > start and path.resolve() != info.path.resolve()]
    line = f"start_from_load: starting from {info.path} at iteration {start}"
    if doomed:
        line += (
            f"; {len(doomed)} checkpoint(s) of {save} after iteration {start} ({doomed[0].name} ... "
            f"{doomed[-1].name}) will be moved to {save}/{SET_ASIDE_PREFIX}<time>/ before the first save"
        )
    return ResumePlan(info, False, line, StartOver(save, key, doomed))


def _refuse_overwrite(
    cfg: Config, save: Path, published: list[tuple[int, Path]], start: int, source: Path
) -> None:
    """A run starting at ``start`` would save over the published checkpoints of ``save`` after it."""
    newer = [path.name for it, path in published if it > start]
    if newer:
        raise CheckpointError(
            f"{save} holds checkpoints after iteration {start} ({', '.join(newer)}) that a run continuing "
            f"from {source} would overwrite; to roll back to it, set start_from_load: true with load: "
            f"{source} (the newer ones are moved aside, not deleted), or save into another directory"
        )


def _read_start_over(save: Path | None) -> dict | None:
    path = save / START_OVER_FILE if save else None
    if path is None or not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{path}: cannot read the start-over record ({err}); remove it to start over again"
        ) from None
    return record if isinstance(record, dict) else None
