"""Model weights on disk: one safetensors file per tensor-parallel rank, under canonical names.

Layout of one checkpoint directory (the trainer adds optimizer, scheduler and RNG files beside these)::

    iter_0000100/
        config.yml              resolved config (what built the model)
        model_meta.json         format version, TP size, padded vocab, dtype, canonical shapes
        model_tp00.safetensors  TP rank 0's shards
        model_tp01.safetensors  ...

A checkpoint directory is written under a temporary name and published by an atomic rename, then the
``latest`` file beside it is replaced atomically; a crash at any point leaves the previous checkpoint
intact and ``latest`` pointing at it. Loading at another TP size merges/splits tensor by tensor
(via :mod:`megatron_stablelm.sharding`), so memory stays bounded by the largest single tensor.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_stablelm.config import Config, config_from_dict
from megatron_stablelm.sharding import shard_spec

FORMAT_VERSION = 1
META_FILE = "model_meta.json"
CONFIG_FILE = "config.yml"
LATEST_FILE = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the model; the message names the path."""


def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def shard_filename(tp_rank: int) -> str:
    return f"model_tp{tp_rank:02d}.safetensors"


def write_model_files(
    directory: str | Path,
    cfg: Config,
    tp_rank: int,
    tp_size: int,
    local_state: dict[str, torch.Tensor],
    padded_vocab_size: int,
    canonical_shapes: dict[str, list[int]] | None = None,
) -> None:
    """Write one TP rank's shard file; TP rank 0 also writes the config and metadata. Call on one
    data-parallel replica only (DP rank 0)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in local_state.items()}
    save_file(tensors, str(directory / shard_filename(tp_rank)), metadata={"format": "pt"})
    if tp_rank == 0:
        if canonical_shapes is None:
            canonical_shapes = {}
            for name, t in tensors.items():
                shape = list(t.shape)
                spec = shard_spec(name, cfg.is_gated_mlp)
                if spec.dim is not None:
                    shape[spec.dim] *= tp_size
                canonical_shapes[name] = shape
        dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        meta = {
            "format_version": FORMAT_VERSION,
            "tp_size": tp_size,
            "padded_vocab_size": padded_vocab_size,
            "dtype": dtype,
            "shapes": canonical_shapes,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=1))
        (directory / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def save_model(
    directory: str | Path, cfg: Config, shards: list[dict[str, torch.Tensor]], padded_vocab_size: int
) -> None:
    """Single-process save of all TP shards (conversion tools); published atomically."""
    with atomic_directory(directory) as tmp:
        for rank, state in enumerate(shards):
            write_model_files(tmp, cfg, rank, len(shards), state, padded_vocab_size)


class atomic_directory:
    """``with atomic_directory(final) as tmp:`` write into ``tmp``; on success it is renamed to ``final``.
    Refuses to replace an existing ``final``; on error the temporary directory is removed."""

    def __init__(self, final: str | Path, overwrite: bool = False) -> None:
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.final.exists() and not self.overwrite:
            raise CheckpointError(f"{self.final} already exists; refusing to overwrite it")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        fsync_tree(self.tmp)
        publish(self.tmp, self.final)


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete directory ``tmp`` (already synced) to ``final``, replacing an existing one
    (re-saving an iteration) only once the new one is in place, and make the rename durable."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
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
    tmp = root / f".{LATEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(name + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, root / LATEST_FILE)
    fsync_dir(root)


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


def read_meta(directory: str | Path) -> dict:
    directory = resolve_checkpoint(directory)
    meta = json.loads((directory / META_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: unsupported checkpoint format {meta.get('format_version')}")
    for rank in range(meta["tp_size"]):
        if not (directory / shard_filename(rank)).is_file():
            raise CheckpointError(f"{directory}: missing {shard_filename(rank)} (TP size {meta['tp_size']})")
    return meta


def read_header(path: str | Path) -> tuple[Path, dict, Config]:
    """``(checkpoint dir, metadata, config)`` of a checkpoint or run directory, every failure reported
    as a :class:`CheckpointError` naming the path (tools call this before any process group exists)."""
    ckpt = resolve_checkpoint(path)
    try:
        return ckpt, read_meta(ckpt), read_config(ckpt)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{ckpt}: cannot read the checkpoint ({err})") from None


def read_config(directory: str | Path) -> Config:
    directory = resolve_checkpoint(directory)
    values = yaml.safe_load((directory / CONFIG_FILE).read_text())
    return config_from_dict(values)


def iter_canonical_tensors(
    directory: str | Path, names: list[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield whole-model tensors one at a time, merged across the saved TP shards."""
    directory = resolve_checkpoint(directory)
    meta = read_meta(directory)
    cfg = read_config(directory)
    handles = [safe_open(str(directory / shard_filename(r)), framework="pt") for r in range(meta["tp_size"])]
    for name in names or list(meta["shapes"]):
        if name not in meta["shapes"]:
            raise CheckpointError(f"{directory}: no tensor '{name}'")
        parts = [h.get_tensor(name) for h in handles]
        yield name, shard_spec(name, cfg.is_gated_mlp).merge(parts)


def load_canonical_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    return dict(iter_canonical_tensors(directory))


def load_into_model(directory: str | Path, model: torch.nn.Module, tp_rank: int, tp_size: int) -> None:
    """Fill ``model``'s local shards from a checkpoint saved at any TP size; shapes are checked against
    the model and mismatches are reported with the tensor's name."""
    directory = resolve_checkpoint(directory)
    meta = read_meta(directory)
    params = dict(model.named_parameters())
    saved = set(meta["shapes"])
    if set(params) != saved:
        missing, extra = sorted(set(params) - saved), sorted(saved - set(params))
        raise CheckpointError(
            f"{directory}: checkpoint does not match the model's architecture "
            f"(missing {missing[:4]}, unexpected {extra[:4]})"
        )
    gated = model.cfg.is_gated_mlp
    same_tp = meta["tp_size"] == tp_size
    handle = safe_open(str(directory / shard_filename(tp_rank)), framework="pt") if same_tp else None
    with torch.no_grad():
        for name, param in params.items():
            spec = shard_spec(name, gated)
            full_shape = list(param.shape)
            if spec.dim is not None:
                full_shape[spec.dim] *= tp_size
            if full_shape != list(meta["shapes"][name]):
                raise CheckpointError(
                    f"{directory}: '{name}' has shape {meta['shapes'][name]} in the checkpoint but "
                    f"{full_shape} in the model built from the config"
                )
            if same_tp:
                shard = handle.get_tensor(name)
            else:
                _, full = next(iter_canonical_tensors(directory, [name]))
                shard = spec.split(full, tp_rank, tp_size)
            param.copy_(shard.to(param.dtype))
