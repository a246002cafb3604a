#!/usr/bin/env python
"""Change the tensor-parallel size of a checkpoint (model shards and, by default, optimizer state).

    python tools/reshard_checkpoint.py SRC DST --tp N [--no-optimizer] [--skip-unknown]

SRC is a checkpoint directory or a run directory with a ``latest`` file. DST (which must not exist)
becomes a run directory holding the checkpoint under the same ``iter_NNNNNNN`` name plus a ``latest``
pointer, so a training config can ``load: DST`` and resume.

What happens to each file of a training checkpoint (layout: megatron_stablelm/training/checkpoint.py):

* ``model_tpNN.safetensors``: every canonical tensor is merged from the old shards and split for the
  new size with the rules of :mod:`megatron_stablelm.sharding`; values and dtypes are copied bit for
  bit, so TP=1 → 2 → 1 gives back the original tensors exactly. ``config.yml`` gets the new
  ``model_parallel_size``; ``model_meta.json`` the new TP size.
* ``optim_tpNN_dpMMM.safetensors`` (Adam moments, fp32 masters; per parameter, DP-independent):
  merged and re-split the same way into one file per new TP rank. ``--no-optimizer`` leaves them
  out instead; ``train_state.json`` then says ``has_optimizer: false`` and a resumed run restarts
  the Adam moments (the trainer reports it).
* ``train_state.json`` (iteration, consumed samples/tokens): copied, with the new TP size and a
  ``resharded_from`` note.
* ``rng_rankNNNNN.pt``: per global rank of the old layout, so they are left out; the trainer then
  re-seeds from (seed, iteration), which it also does whenever the world size changes.
* anything else is refused unless ``--skip-unknown`` (it may be TP-dependent).

Peak memory is one copy of the model (and of the optimizer state when it is kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_stablelm import checkpointing
from megatron_stablelm.config import ConfigError, validate_config
from megatron_stablelm.sharding import shard_spec

TRAIN_STATE_FILE = "train_state.json"
_MODEL = re.compile(r"model_tp\d+\.safetensors")
_OPTIM = re.compile(r"optim_tp(\d+)_dp(\d+)\.safetensors")
_RNG = re.compile(r"rng_rank\d+\.pt")


def optim_filename(tp_rank: int, dp_rank: int) -> str:
    """The trainer's optimizer shard name (megatron_stablelm.training.checkpoint.optim_filename)."""
    return f"optim_tp{tp_rank:02d}_dp{dp_rank:03d}.safetensors"


def _classify(ckpt: Path) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {"model": [], "optim": [], "rng": [], "state": [], "unknown": []}
    for path in sorted(ckpt.iterdir()):
        name = path.name
        if name in (checkpointing.META_FILE, checkpointing.CONFIG_FILE) or _MODEL.fullmatch(name):
            kinds["model"].append(name)
        elif _OPTIM.fullmatch(name):
            kinds["optim"].append(name)
        elif _RNG.fullmatch(name):
            kinds["rng"].append(name)
        elif name == TRAIN_STATE_FILE:
            kinds["state"].append(name)
        else:
            kinds["unknown"].append(name)
    return kinds


def _reshard_optimizer(ckpt: Path, out: Path, saved_tp: int, tp: int, gated: bool) -> int:
    """Merge each ``param/key`` optimizer tensor over the saved TP ranks (whichever DP file holds it)
    and write one file per new TP rank. Returns the number of tensors."""
    index: list[dict[str, safe_open]] = []
    for rank in range(saved_tp):
        where = {}
        files = sorted(glob.glob(str(ckpt / f"optim_tp{rank:02d}_dp*.safetensors")))
        if not files:
            raise checkpointing.CheckpointError(f"{ckpt}: optimizer files for TP rank {rank} are missing")
        for path in files:
            handle = safe_open(path, framework="pt")
            for key in handle.keys():
                where[key] = handle
        index.append(where)
    keys = sorted(index[0])
    for rank, where in enumerate(index[1:], 1):
        if set(where) != set(keys):
            odd = sorted(set(where) ^ set(keys))[:4]
            raise checkpointing.CheckpointError(f"{ckpt}: optimizer state of TP rank {rank} differs in {odd}")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key in keys:
        spec = shard_spec(key.rsplit("/", 1)[0], gated)
        full = spec.merge([where[key].get_tensor(key) for where in index])
        for rank in range(tp):
            shards[rank][key] = spec.split(full, rank, tp).contiguous()
    for rank, tensors in enumerate(shards):
        save_file(tensors, str(out / optim_filename(rank, 0)), metadata={"tp_size": str(tp), "dp_size": "1"})
    return len(keys)


def reshard_checkpoint(
    src: str | Path,
    dst: str | Path,
    tp: int,
    *,
    optimizer: bool = True,
    skip_unknown: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Write ``src`` resharded for TP=``tp`` as the run directory ``dst``; returns the new checkpoint
    directory. Every check (paths, TP divisibility, unknown files) happens before anything is written."""
    ckpt = checkpointing.resolve_checkpoint(src)
    meta = checkpointing.read_meta(ckpt)
    cfg = checkpointing.read_config(ckpt)
    dst = Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists; refusing to overwrite it")
    if tp < 1:
        raise ConfigError(f"--tp must be >= 1, got {tp}")
    new_cfg = dataclasses.replace(cfg, model_parallel_size=tp)
    try:
        validate_config(new_cfg)
    except ConfigError as err:
        raise ConfigError(f"{ckpt}: cannot reshard to TP={tp}: {err}") from None
    vocab = int(meta["padded_vocab_size"])
    if vocab % tp:
        raise ConfigError(f"{ckpt}: the padded vocabulary {vocab} does not split over TP={tp}")
    kinds = _classify(ckpt)
    if kinds["unknown"] and not skip_unknown:
        raise checkpointing.CheckpointError(
            f"{ckpt}: unknown files {kinds['unknown'][:5]} (possibly TP-dependent); pass --skip-unknown to "
            "leave them out"
        )
    state = json.loads((ckpt / TRAIN_STATE_FILE).read_text()) if kinds["state"] else None
    match = re.fullmatch(r"iter_(\d+)", ckpt.name)
    iteration = int(match.group(1)) if match else int((state or {}).get("iteration", 0))
    name = checkpointing.iteration_dirname(iteration)
    gated = cfg.is_gated_mlp

    dst.mkdir(parents=True)
    try:
        with checkpointing.atomic_directory(dst / name) as tmp:
            shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
            for tname, full in checkpointing.iter_canonical_tensors(ckpt):
                spec = shard_spec(tname, gated)
                for rank in range(tp):
                    shards[rank][tname] = spec.split(full, rank, tp)
            for rank in range(tp):
                checkpointing.write_model_files(
                    tmp, new_cfg, rank, tp, shards[rank], vocab, canonical_shapes=meta["shapes"]
                )
            del shards
            kept_optimizer = False
            if kinds["optim"] and optimizer:
                count = _reshard_optimizer(ckpt, tmp, meta["tp_size"], tp, gated)
                kept_optimizer = True
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
                state = dict(state)
                state["has_optimizer"] = bool(state.get("has_optimizer")) and kept_optimizer
                state["resharded_from"] = {"path": str(ckpt), "tp_size": meta["tp_size"]}
                state["tp_size"] = tp
                (tmp / TRAIN_STATE_FILE).write_text(json.dumps(state, indent=1))
        checkpointing.write_latest(dst, name)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return dst / name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory, or run directory with a 'latest' file")
    p.add_argument("dst", help="new run directory (must not exist)")
    p.add_argument("--tp", type=int, required=True, help="the new tensor-parallel size")
    p.add_argument("--no-optimizer", action="store_true", help="leave the optimizer state out")
    p.add_argument("--skip-unknown", action="store_true", help="leave out files this tool does not know")
    args = p.parse_args(argv)
    try:
        out = reshard_checkpoint(
            args.src, args.dst, args.tp, optimizer=not args.no_optimizer, skip_unknown=args.skip_unknown
        )
    except (checkpointing.CheckpointError, ConfigError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} (TP={args.tp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
