"""Change the tensor-parallel size of a checkpoint (model shards and, by default, optimizer state).

What happens to each kind of file (see :mod:`.layout`):

* model shards: every canonical tensor is merged from the old shards and split for the new size;
  values and dtypes are copied bit for bit, so TP=1 → 2 → 1 gives back the original tensors exactly.
  ``config.yml`` gets the new ``model_parallel_size``; ``model_meta.json`` the new TP size.
* optimizer files (per parameter, DP-independent): merged and re-split the same way into one file per
  new TP rank, or left out (``optimizer=False``): ``train_state.json`` then says
  ``has_optimizer: false`` and a resumed run restarts the Adam moments (the trainer reports it).
* ``train_state.json``: copied, with the new TP size and a ``resharded_from`` note.
* RNG files: one per global rank of the old layout, so they are left out; the trainer then re-seeds
  from (seed, iteration), as it does whenever the world size changes.
* anything else is refused unless ``skip_unknown`` (it may be TP-dependent).

Peak memory is one copy of the model (and of the optimizer state when it is kept).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_stablelm.checkpoint.atomic import StagedDirectory, check_destination, write_latest
from megatron_stablelm.checkpoint.layout import (
    TRAIN_STATE_FILE,
    CheckpointError,
    file_kind,
    iteration_dirname,
    iteration_of,
)
from megatron_stablelm.checkpoint.meta import ModelMeta
from megatron_stablelm.checkpoint.model_files import (
    check_safetensors_file,
    config_at_tp_size,
    iter_canonical_tensors,
    read_header,
    tensor_splits,
    write_model_files,
)
from megatron_stablelm.checkpoint.optimizer_files import OptimizerShards, parameter_of, write_optimizer_file
from megatron_stablelm.checkpoint.selection import read_train_state
from megatron_stablelm.config import Config


def _files_by_kind(ckpt: Path) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {"model": [], "optim": [], "rng": [], "state": [], "unknown": []}
    for path in sorted(ckpt.iterdir()):
        kinds[file_kind(path.name)].append(path.name)
    return kinds


def _resplit_model(ckpt: Path, out: Path, meta: ModelMeta, cfg: Config, tp: int) -> None:
    splits = tensor_splits(meta, cfg)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for name, full in iter_canonical_tensors(ckpt):
        for rank in range(tp):
            shards[rank][name] = splits[name].split(full, rank, tp)
    for rank in range(tp):
        write_model_files(out, cfg, rank, tp, shards[rank], meta.padded_vocab_size, meta.vocab_size)


def _resplit_optimizer(ckpt: Path, out: Path, meta: ModelMeta, cfg: Config, tp: int) -> int:
    """One optimizer file per new TP rank; returns the number of tensors."""
    shards = OptimizerShards(ckpt, meta.tp_size)
    splits = tensor_splits(meta, cfg)
    per_rank: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key in shards.keys:
        spec = splits[parameter_of(key)]
        full = shards.full(key, spec)
        for rank in range(tp):
            per_rank[rank][key] = spec.split(full, rank, tp).contiguous()
    for rank, tensors in enumerate(per_rank):
        write_optimizer_file(out, rank, tp, 0, 1, tensors)
    return len(shards.keys)


def reshard_checkpoint(
    src: str | Path,
    dst: str | Path,
    tp: int,
    *,
    optimizer: bool = True,
    skip_unknown: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``src`` resharded for TP=``tp`` as the run directory ``dst``; returns the new checkpoint
    directory. Every check happens before anything is written. ``dst`` must not exist unless
    ``force``; the whole run directory (checkpoint and ``latest``) is staged and published at once, so
    with ``force`` an existing ``dst`` is replaced only once the new one is complete."""
    ckpt, meta, cfg = read_header(src)
    dst = check_destination(dst, ckpt, force, f"the checkpoint {ckpt} being resharded", "destination")
    new_cfg = config_at_tp_size(ckpt, meta, cfg, tp, "reshard")
    kinds = _files_by_kind(ckpt)
    if kinds["unknown"] and not skip_unknown:
        raise CheckpointError(
            f"{ckpt}: unknown files {kinds['unknown'][:5]} (possibly TP-dependent); pass --skip-unknown to "
            "leave them out"
        )
    kept_optimizer = bool(kinds["optim"]) and optimizer
    for optim in kinds["optim"] if kept_optimizer else []:  # a truncated file fails here, not half-way
        check_safetensors_file(ckpt / optim)
    state = read_train_state(ckpt)
    iteration = iteration_of(ckpt)
    name = iteration_dirname(iteration if iteration is not None else int((state or {}).get("iteration", 0)))
    with StagedDirectory(dst, overwrite=force) as run:
        out = run / name
        out.mkdir()
        _resplit_model(ckpt, out, meta, new_cfg, tp)
        if kept_optimizer:
            count = _resplit_optimizer(ckpt, out, meta, cfg, tp)
            log(f"optimizer state: {count} tensors resharded to TP={tp}")
        elif kinds["optim"]:
            log(
                f"optimizer state: left out ({len(kinds['optim'])} files, --no-optimizer); a run resumed "
                "from this checkpoint restarts its Adam moments"
            )
        if kinds["rng"]:
            log(
                f"RNG states: left out ({len(kinds['rng'])} files, one per rank of the old layout); the "
                "trainer re-seeds from (seed, iteration)"
            )
        for unknown in kinds["unknown"]:
            log(f"skipped unknown file {unknown}")
        if state is not None:
            state["has_optimizer"] = bool(state.get("has_optimizer")) and kept_optimizer
            state["resharded_from"] = {"path": str(ckpt), "tp_size": meta.tp_size}
            state["tp_size"] = tp
            (out / TRAIN_STATE_FILE).write_text(json.dumps(state, indent=1))
        write_latest(run, name)
    return dst / name
