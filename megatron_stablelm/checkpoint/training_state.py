"""Full training checkpoints: model shards, optimizer state, schedule and data position, RNG.

Collective save: every rank calls :func:`save_training_checkpoint`. Everything is written into the
hidden staging directory; after a barrier global rank 0 syncs it, renames it to ``iter_N`` and then
replaces ``latest``. A crash at any point leaves the previous checkpoint and ``latest`` untouched; the
stale staging directory is removed by the next save. Resume reads it back through
:func:`checkpoint_for_config` (every check, before anything is built) and
:func:`load_training_state` (after the model and engine exist).
"""

from __future__ import annotations

import json
import os
import time
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
from megatron_stablelm.checkpoint.rng import load_rng_state, save_rng_state
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
    def get_state(self, name: str, key: str) -> torch.Tensor: ...
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


def _write_optimizer_share(tmp: Path, engine: EngineState) -> Path:
    """Gather each parameter's state over the DP group (all DP ranks take part); DP rank ``i % dp``
    keeps parameter ``i`` and writes its share."""
    dp_rank, dp_size = parallel.dp_rank(), parallel.dp_size()
    engine.prepare_state()
    mine: dict[str, torch.Tensor] = {}
    for index, (name, _) in enumerate(engine.model.named_parameters()):
        for key in engine.state_keys():
            value = engine.get_state(name, key)
            if index % dp_size == dp_rank:
                mine[state_key(name, key)] = value
    return write_optimizer_file(tmp, parallel.tp_rank(), parallel.tp_size(), dp_rank, dp_size, mine)


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
    iteration = int(train_state["iteration"])
    staged = StagedDirectory(root / iteration_dirname(iteration), overwrite=True)
    rank = _rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(root)
        staged.begin()
    _barrier()
    try:
        _write_share(staged.tmp, engine, cfg, (padded_vocab, vocab_size), train_state, iteration)
        failure = None
    except OSError as err:  # disk full, quota, I/O error: this rank's share is incomplete
        failure = f"{err.filename or staged.tmp}: {err.strerror}"
    except SafetensorError as err:  # safetensors reports its I/O errors as its own type
        failure = f"{staged.tmp}: {err}"
    if _any_rank(failure is not None):
        if rank == 0:
            staged.abort()
        raise CheckpointError(
            f"cannot save iteration {iteration} in {root} ({failure or 'failed on another rank'}); "
            "the previous checkpoint and 'latest' are untouched"
        )
    _barrier()
    if rank == 0:
        staged.commit()
        write_latest(root, staged.final.name)
    _barrier()
    return staged.final


def _write_share(
    tmp: Path,
    engine: EngineState,
    cfg: Config,
    vocab: tuple[int, int | None],  # (padded rows, the real vocabulary recorded for exports)
    train_state: dict[str, Any],
    iteration: int,
) -> None:
    """This rank's files of the checkpoint (model shard on DP rank 0, optimizer share, RNG state,
    training state on rank 0), each synced."""
    written: list[Path] = []
    if parallel.dp_rank() == 0:
        local = {name: p.detach() for name, p in engine.model.named_parameters()}
        written += write_model_files(tmp, cfg, parallel.tp_rank(), parallel.tp_size(), local, *vocab)
    _test_stall(iteration)
    written.append(_write_optimizer_share(tmp, engine))
    rng_file = tmp / rng_filename(_rank())
    save_rng_state(rng_file)
    written.append(rng_file)
    if _rank() == 0:
        state_file = tmp / TRAIN_STATE_FILE
        state_file.write_text(json.dumps(_train_state_record(engine, train_state), indent=1))
        written.append(state_file)
    for path in written:
        fsync_file(path)


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
    shards = OptimizerShards(info.path, info.meta["tp_size"])
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
