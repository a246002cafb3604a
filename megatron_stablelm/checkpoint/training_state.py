"""Full training checkpoints: model shards, optimizer state, schedule and data position, RNG.

Collective save: every rank calls :func:`save_training_checkpoint` (or, with ``async_save``,
:class:`AsyncCheckpointWriter`). Each rank first copies its share to host memory (:func:`take_snapshot`:
no communication: under ZeRO each DP rank holds, and writes, only its partition of the optimizer
state), then writes it into the hidden staging directory (:func:`write_snapshot`, in the background
when asynchronous); once every rank has written, global rank 0 renames it to ``iter_N`` and then
replaces ``latest``. A crash at any point leaves the previous checkpoint and ``latest`` untouched; the
stale staging directory is removed by the next save. Resume reads it back through
:func:`checkpoint_for_config` (every check, before anything is built) and
:func:`load_training_state` (after the model and engine exist).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from megatron_stablelm import parallel
from megatron_stablelm.checkpoint.atomic import (
    StagedDirectory,
    fsync_file,
    remove_stale_staging,
    write_latest,
)
from megatron_stablelm.checkpoint.layout import (
    TRAIN_FORMAT,
    TRAIN_STATE_FILE,
    CheckpointError,
    iteration_dirname,
    rng_filename,
)
from megatron_stablelm.checkpoint.model_files import (
    load_into_model,
    tensor_splits,
    write_model_files,
)
from megatron_stablelm.checkpoint.optimizer_files import OptimizerShards, state_key, write_optimizer_file
from megatron_stablelm.checkpoint.rng import load_rng_state, rng_state
from megatron_stablelm.checkpoint.selection import CheckpointInfo
from megatron_stablelm.config import Config


class EngineState(Protocol):
    """What a checkpoint needs from the training engine (``training.engine.TrainingEngine``)."""

    model: torch.nn.Module
    zero_stage: int

    def state_keys(self) -> list[str]: ...
    def accepts_state_key(self, key: str) -> bool: ...
    def adam_step(self) -> int: ...
    def prepare_state(self, step: int | None = None) -> None: ...
    @property
    def state_is_partitioned(self) -> bool: ...
    def local_state(self, name: str, key: str) -> tuple[int, torch.Tensor] | None: ...
    def set_state(self, name: str, key: str, value: torch.Tensor) -> None: ...
    def loss_scaler_state(self) -> dict | None: ...
    def set_loss_scaler_state(self, state: dict | None) -> None: ...


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- save
_STALL_ENV = "MEGATRON_STABLELM_TEST_SAVE_STALL"


def _test_stall(iteration: int) -> None:
    """Test hook for the crash-safety tests: ``ITERATION:SECONDS`` makes the save of that iteration
    sleep after the model files are written, i.e. in the middle of the save, so a test can SIGKILL it."""
    it, _, seconds = os.environ.get(_STALL_ENV, "").partition(":")
    if it and int(it) == iteration and float(seconds) > 0:
        if _rank() == 0:
            print(
                f"[checkpoint] test hook: stalling {seconds}s in the middle of saving {iteration}", flush=True
            )
        time.sleep(float(seconds))


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory that training can no longer change (pinned on GPU, so the copy is a
    DMA the step need not wait for beyond one synchronisation)."""
    tensor = tensor.detach()
    if tensor.is_cuda:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return out.copy_(tensor, non_blocking=True)
    return tensor.clone()


@dataclass
class Snapshot:
    """This rank's share of a checkpoint in host memory, taken at a step boundary: the model shard (DP
    rank 0), its own fragments of the optimizer state, its RNG state, and (rank 0) the training state.
    Writing it needs no collective and no access to the live model, so it can run behind training."""

    iteration: int
    cfg: Config
    vocab: tuple[int, int | None]  # (padded rows, the real vocabulary recorded for exports)
    model: dict[str, torch.Tensor] | None
    optimizer: dict[str, torch.Tensor]
    fragment_starts: dict[str, int]
    rng: dict[str, Any]
    train_state: dict[str, Any] | None

    @property
    def nbytes(self) -> int:
        tensors = list(self.optimizer.values()) + list((self.model or {}).values())
        return sum(t.numel() * t.element_size() for t in tensors)


def take_snapshot(
    engine: EngineState, cfg: Config, vocab: tuple[int, int | None], train_state: dict[str, Any]
) -> Snapshot:
    """This rank's share, copied to host memory; no communication. Under ZeRO a DP rank copies only the
    range of each parameter's optimizer state its partition holds (fragments at their flat offsets);
    without ZeRO, where every rank holds everything, DP rank ``i % dp`` takes parameter ``i`` whole."""
    dp_rank, dp_size = parallel.dp_rank(), parallel.dp_size()
    engine.prepare_state()
    optimizer: dict[str, torch.Tensor] = {}
    starts: dict[str, int] = {}
    partitioned = engine.state_is_partitioned
    for index, (name, _) in enumerate(engine.model.named_parameters()):
        if not partitioned and index % dp_size != dp_rank:
            continue
        for key in engine.state_keys():
            local = engine.local_state(name, key)
            if local is not None:
                starts[state_key(name, key)], optimizer[state_key(name, key)] = local
    model = None
    if dp_rank == 0:
        model = {name: _host_copy(p) for name, p in engine.model.named_parameters()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the pinned copies are complete before anyone reads them
    record = _train_state_record(engine, train_state) if _rank() == 0 else None
    return Snapshot(int(train_state["iteration"]), cfg, vocab, model, optimizer, starts, rng_state(), record)


def write_snapshot(tmp: Path, snap: Snapshot) -> None:
    """This rank's files of the checkpoint, each synced (no collective: safe in a background thread)."""
    written: list[Path] = []
    if snap.model is not None:
        written += write_model_files(
            tmp, snap.cfg, parallel.tp_rank(), parallel.tp_size(), snap.model, *snap.vocab
        )
    _test_stall(snap.iteration)
    written.append(
        write_optimizer_file(
            tmp, parallel.tp_rank(), parallel.tp_size(), parallel.dp_rank(), parallel.dp_size(),
            snap.optimizer, snap.fragment_starts,
        )
    )  # fmt: skip
    rng_file = tmp / rng_filename(_rank())
    with open(rng_file, "wb") as fh:  # a failed write raises OSError (disk full), not torch's RuntimeError
        torch.save(snap.rng, fh)
    written.append(rng_file)
    if snap.train_state is not None:
        state_file = tmp / TRAIN_STATE_FILE
        state_file.write_text(json.dumps(snap.train_state, indent=1))
        written.append(state_file)
    for path in written:
        fsync_file(path)


def _train_state_record(engine: EngineState, train_state: dict[str, Any]) -> dict[str, Any]:
    state = dict(train_state)
    state.update(
        format=TRAIN_FORMAT,
        has_optimizer=True,
        adam_step=engine.adam_step(),
        optimizer_keys=engine.state_keys(),
        loss_scaler=engine.loss_scaler_state(),
        world_size=_world(),
        tp_size=parallel.tp_size(),
        dp_size=parallel.dp_size(),
        zero_stage=engine.zero_stage,
        saved_at=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    return state


def _begin(root: Path, iteration: int) -> StagedDirectory:
    """Collective: rank 0 opens the staging directory (never over a published checkpoint); every rank
    leaves together, with one error when it could not."""
    staged = StagedDirectory(root / iteration_dirname(iteration))
    failure = None
    if _rank() == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(root)
            staged.begin()
        except (CheckpointError, OSError) as err:
            failure = str(err)
    if _any_rank(failure is not None):
        raise CheckpointError(
            f"cannot save iteration {iteration} in {root} ({failure or 'failed on rank 0'}); nothing was written"
        )
    return staged


def _write_failure(tmp: Path, snap: Snapshot) -> str | None:
    """Write this rank's share; the failure as one line (disk full, quota, I/O error), or None."""
    try:
        write_snapshot(tmp, snap)
    except OSError as err:
        return f"{err.filename or tmp}: {err.strerror}"
    except SafetensorError as err:  # safetensors reports its I/O errors as its own type
        return f"{tmp}: {err}"
    return None


def _publish(root: Path, staged: StagedDirectory, iteration: int, failure: str | None) -> Path:
    """Collective, once every rank has written (or failed): rank 0 renames the staging directory to
    ``iter_N`` and then moves ``latest``; a failure anywhere aborts the save on every rank."""
    if _any_rank(failure is not None):
        if _rank() == 0:
            staged.abort()
        raise CheckpointError(
            f"cannot save iteration {iteration} in {root} ({failure or 'failed on another rank'}); "
            "the previous checkpoint and 'latest' are untouched"
        )
    if _rank() == 0:
        staged.commit()
        write_latest(root, staged.final.name)
    _barrier()
    return staged.final


def save_training_checkpoint(
    root: str | Path,
    engine: EngineState,
    cfg: Config,
    padded_vocab: int,
    train_state: dict[str, Any],
    vocab_size: int | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the published checkpoint directory."""
    root = Path(root)
    staged, snap = _begin_snapshot(root, engine, cfg, (padded_vocab, vocab_size), train_state)
    return _publish(root, staged, snap.iteration, _write_failure(staged.tmp, snap))


def _begin_snapshot(
    root: Path, engine: EngineState, cfg: Config, vocab: tuple[int, int | None], train_state: dict[str, Any]
) -> tuple[StagedDirectory, Snapshot]:
    """The part of a save that holds the step, synchronous or not: the staging directory opened
    (collective) and this rank's share copied to host memory."""
    staged = _begin(root, int(train_state["iteration"]))
    return staged, take_snapshot(engine, cfg, vocab, train_state)


class AsyncCheckpointWriter:
    """``async_save: true``: the step boundary only takes the :class:`Snapshot` (host copies); a
    background thread writes and syncs it, and the save is published (rename, ``latest``) at a later
    step boundary once every rank has finished, by :meth:`poll`. One save is in flight at a time (the
    next waits for it). A failed write is reported by :meth:`poll` on every rank, keeping the previous
    checkpoint; a process killed mid-write leaves only a staging directory (removed by the next save)."""

    def __init__(self) -> None:
        self._root: Path | None = None
        self._staged: StagedDirectory | None = None
        self._iteration = 0
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self.started = 0.0

    @property
    def pending(self) -> bool:
        return self._staged is not None

    def start(
        self,
        root: str | Path,
        engine: EngineState,
        cfg: Config,
        padded_vocab: int,
        train_state: dict[str, Any],
        vocab_size: int | None = None,
    ) -> Snapshot:
        """Collective. Returns the snapshot (its size says what the background write moves)."""
        if self.pending:
            raise RuntimeError("a save is already in flight: poll(wait=True) first")
        self._root = Path(root)
        self.started = time.perf_counter()
        self._staged, snap = _begin_snapshot(self._root, engine, cfg, (padded_vocab, vocab_size), train_state)
        self._iteration, self._failure = snap.iteration, None

        def write() -> None:
            self._failure = _write_failure(self._staged.tmp, snap)

        self._thread = threading.Thread(target=write, name=f"checkpoint-{snap.iteration}", daemon=True)
        self._thread.start()
        return snap

    def poll(self, wait: bool = False) -> Path | None:
        """Collective (every rank calls it at the same step boundary while a save is pending): the
        published checkpoint once every rank's write is done, else None (``wait``: block until then)."""
        if not self.pending:
            return None
        if wait:
            self._thread.join()
        if _any_rank(self._thread.is_alive()):
            return None
        staged, self._staged = self._staged, None
        return _publish(self._root, staged, self._iteration, self._failure)


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (every rank must take the same branch after a collective)."""
    if _world() == 1:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


# ----------------------------------------------------------------------------- load
def load_model_weights(info: CheckpointInfo, model: torch.nn.Module) -> None:
    """Fill the model's shards (re-split when the TP size differs). Call before building the engine, so
    DeepSpeed's fp32 master copies start from these weights."""
    load_into_model(info.path, model, parallel.tp_rank(), parallel.tp_size())


def _restore_optimizer(info: CheckpointInfo, engine: EngineState, state: dict[str, Any]) -> None:
    shards = OptimizerShards(info.path, info.meta.tp_size)
    splits = tensor_splits(info.meta, info.config)
    engine.prepare_state(int(state["adam_step"]))
    keys = [k for k in state["optimizer_keys"] if engine.accepts_state_key(k)]
    tp_rank, tp_size = parallel.tp_rank(), parallel.tp_size()
    for name, _ in engine.model.named_parameters():
        for key in keys:
            engine.set_state(name, key, shards.shard(state_key(name, key), splits[name], tp_rank, tp_size))
    engine.set_loss_scaler_state(state.get("loss_scaler"))


def load_training_state(info: CheckpointInfo, engine: EngineState) -> dict[str, Any]:
    """Restore optimizer state and loss scaler; return the saved training state (iteration, consumed
    samples, ...). Weights must already be loaded. RNG states are restored separately, last
    (:func:`restore_rng`), because building the data iterators draws from the global generator."""
    state = dict(info.train_state or {})
    if state.get("has_optimizer"):
        _restore_optimizer(info, engine, state)
    return state


def restore_rng(info: CheckpointInfo, log=print) -> bool:
    """Put every generator of this rank back where it was when the checkpoint was saved; False (and
    nothing restored) when the world size changed, so that per-rank states do not match ranks."""
    rank, world = _rank(), _world()
    saved_world = (info.train_state or {}).get("world_size")
    rng_file = info.path / rng_filename(rank)
    restored = saved_world == world and rng_file.is_file()
    if restored:
        try:
            load_rng_state(rng_file)
        except Exception as err:  # torch.load's errors do not name the file
            raise CheckpointError(
                f"{rng_file}: cannot read the RNG state ({type(err).__name__}: {err})"
            ) from None
    elif rank == 0:
        log(
            f"[checkpoint] saved with {saved_world} ranks, running with {world}: RNG states are "
            "re-seeded from (seed, iteration) instead of restored"
        )
    _barrier()
    return restored
