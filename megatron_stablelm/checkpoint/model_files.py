"""Model weights on disk: one safetensors file per tensor-parallel rank, under canonical names.

``model_meta.json`` (:class:`~.meta.ModelMeta`) records, beside the TP size, padded vocabulary and
dtype, every tensor's whole (TP-independent) shape and how it splits over TP ranks, so a checkpoint
is read (merged, re-split, converted) without rebuilding the model. Loading at another TP size merges and re-splits tensor by
tensor, so memory stays bounded by the largest single tensor.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_stablelm.checkpoint.atomic import StagedDirectory
from megatron_stablelm.checkpoint.layout import (
    CONFIG_FILE,
    META_FILE,
    CheckpointError,
    resolve_checkpoint,
    shard_filename,
)
from megatron_stablelm.checkpoint.meta import ModelMeta
from megatron_stablelm.config import Config, ConfigError, config_from_dict, validate_config
from megatron_stablelm.sharding import REPLICATED, ShardSpec


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _model_splits(cfg: Config) -> dict[str, ShardSpec]:
    """:func:`megatron_stablelm.model.config_splits`, imported on first use: readers of a
    checkpoint's header must not pay for megatron-core."""
    from megatron_stablelm.model import config_splits

    return config_splits(cfg)


def _split(splits: dict[str, ShardSpec], name: str) -> ShardSpec:
    """A tensor the model does not have is stored whole (loading such a checkpoint is refused)."""
    return splits.get(name, REPLICATED)


def write_model_files(
    directory: str | Path,
    cfg: Config,
    tp_rank: int,
    tp_size: int,
    local_state: dict[str, torch.Tensor],
    padded_vocab_size: int,
    vocab_size: int | None = None,
) -> list[Path]:
    """Write one TP rank's shard file; TP rank 0 also writes the config and metadata. Call on one
    data-parallel replica only. Returns the files written (for syncing). ``vocab_size``: the real
    vocabulary when the embedding was padded beyond a source model's (an import from Hugging Face
    padded to split over TP), so an export gives the source's shape back."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in local_state.items()}
    shard = directory / shard_filename(tp_rank)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    if tp_rank != 0:
        return [shard]
    splits = _model_splits(cfg)
    meta = ModelMeta(
        tp_size=tp_size,
        padded_vocab_size=padded_vocab_size,
        dtype=str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        shapes={name: _split(splits, name).full_shape(t.shape, tp_size) for name, t in tensors.items()},
        splits={name: _split(splits, name) for name in tensors},
        vocab_size=vocab_size if vocab_size != padded_vocab_size else None,
    )
    (directory / META_FILE).write_text(json.dumps(meta.to_json(), indent=1))
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return [shard, directory / META_FILE, directory / CONFIG_FILE]


def save_model(
    directory: str | Path,
    cfg: Config,
    shards: list[dict[str, torch.Tensor]],
    padded_vocab_size: int,
    vocab_size: int | None = None,
) -> None:
    """Single-process save of all TP shards (conversion tools); published atomically."""
    with StagedDirectory(directory) as tmp:
        for rank, state in enumerate(shards):
            write_model_files(tmp, cfg, rank, len(shards), state, padded_vocab_size, vocab_size)


def save_canonical_model(
    directory: str | Path,
    cfg: Config,
    full: dict[str, torch.Tensor],
    padded_vocab_size: int,
    tp_size: int,
    vocab_size: int | None = None,
) -> None:
    """Split whole-model tensors for ``tp_size`` ranks and save them (conversion tools)."""
    splits = _model_splits(cfg)
    shards = [
        {name: splits[name].split(t, rank, tp_size).clone() for name, t in full.items()}
        for rank in range(tp_size)
    ]
    save_model(directory, cfg, shards, padded_vocab_size, vocab_size)


def read_meta(directory: str | Path) -> ModelMeta:
    """``model_meta.json`` of a checkpoint, checked (:meth:`ModelMeta.from_json`), and every shard
    file's header; errors name the file."""
    directory = resolve_checkpoint(directory)
    path = directory / META_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not a readable checkpoint description ({_one_line(err)})") from None
    meta = ModelMeta.from_json(path, data)
    for rank in range(meta.tp_size):
        if not (directory / shard_filename(rank)).is_file():
            raise CheckpointError(f"{directory}: missing {shard_filename(rank)} (TP size {meta.tp_size})")
        check_safetensors_file(directory / shard_filename(rank))
    return meta


def safetensors_header(path: Path) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors file (name → dtype, shape, offsets; the string metadata)
    from its header alone (no tensor is read), checked to describe exactly the file's bytes: catches a truncated or overwritten
    file before anything is built."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or header_len > size - 8:
                raise ValueError(f"a header of {header_len} bytes in a file of {size}")
            header = json.loads(fh.read(header_len))
        tensors = {k: t for k, t in header.items() if k != "__metadata__"}
        end = max((t["data_offsets"][1] for t in tensors.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({_one_line(err)})") from None
    if 8 + header_len + end != size:
        raise CheckpointError(
            f"{path}: truncated or corrupt: the header describes {8 + header_len + end} bytes, the file has {size}"
        )
    return tensors, header.get("__metadata__") or {}


def check_safetensors_file(path: Path) -> None:
    """``path`` is a complete safetensors file (:func:`safetensors_header`)."""
    safetensors_header(path)


def read_config(directory: str | Path) -> Config:
    """The resolved config a checkpoint was written with; errors name the file."""
    path = resolve_checkpoint(directory) / CONFIG_FILE
    try:
        values = yaml.safe_load(path.read_text())
        if not isinstance(values, dict):
            raise ValueError(f"a mapping of config keys was expected, not {type(values).__name__}")
        return config_from_dict(values)
    except (OSError, ValueError, TypeError, yaml.YAMLError) as err:  # ConfigError is a ValueError
        raise CheckpointError(f"{path}: not a readable checkpoint config ({_one_line(err)})") from None


def read_header(path: str | Path) -> tuple[Path, ModelMeta, Config]:
    """``(checkpoint dir, metadata, config)`` of a checkpoint or run directory, every failure reported
    as a :class:`CheckpointError` naming the path (tools call this before any process group exists)."""
    ckpt = resolve_checkpoint(path)
    try:
        return ckpt, read_meta(ckpt), read_config(ckpt)
    except CheckpointError:
        raise
    except (
        OSError,
        ValueError,
        KeyError,
        TypeError,
        yaml.YAMLError,
    ) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(
            f"{ckpt}: cannot read the checkpoint ({type(err).__name__}: {_one_line(err)})"
        ) from None


def config_at_tp_size(directory: Path, meta: ModelMeta, cfg: Config, tp_size: int, purpose: str) -> Config:
    """The checkpoint's config at tensor-parallel size ``tp_size``, or a :class:`ConfigError` naming the
    checkpoint, the purpose ("run", "reshard"...) and why its model does not split that way."""
    if tp_size < 1:
        raise ConfigError(f"{directory}: cannot {purpose} at TP={tp_size}: the TP size must be >= 1")
    new_cfg = dataclasses.replace(cfg, model_parallel_size=tp_size)
    try:
        validate_config(new_cfg)
    except ConfigError as err:
        raise ConfigError(f"{directory}: cannot {purpose} at TP={tp_size}: {err}") from None
    if meta.padded_vocab_size % tp_size:
        raise ConfigError(
            f"{directory}: cannot {purpose} at TP={tp_size}: the padded vocabulary "
            f"{meta.padded_vocab_size} does not split over {tp_size} ranks"
        )
    return new_cfg


def tensor_splits(meta: ModelMeta, cfg: Config) -> dict[str, ShardSpec]:
    """How each saved tensor splits over TP: as recorded, or (checkpoints written before the record
    existed) as the model built from the checkpoint's config splits it."""
    if meta.splits is not None:
        return dict(meta.splits)
    return _model_splits(cfg)


def iter_canonical_tensors(
    directory: str | Path, names: list[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield whole-model tensors one at a time, merged across the saved TP shards."""
    directory, meta, cfg = read_header(directory)
    splits = tensor_splits(meta, cfg)
    handles = [safe_open(str(directory / shard_filename(r)), framework="pt") for r in range(meta.tp_size)]
    for name in names or list(meta.shapes):
        if name not in meta.shapes:
            raise CheckpointError(f"{directory}: no tensor '{name}'")
        yield name, splits[name].merge([h.get_tensor(name) for h in handles])


def read_canonical_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All whole-model tensors in memory; :func:`iter_canonical_tensors` yields one at a time."""
    return dict(iter_canonical_tensors(directory))


def load_into_model(directory: str | Path, model: torch.nn.Module, tp_rank: int, tp_size: int) -> None:
    """Fill ``model``'s local shards from a checkpoint saved at any TP size; shapes are checked against
    the model and mismatches are reported with the tensor's name."""
    directory, meta, cfg = read_header(directory)
    params = dict(model.named_parameters())
    saved = set(meta.shapes)
    if set(params) != saved:
        missing, extra = sorted(set(params) - saved), sorted(saved - set(params))
        raise CheckpointError(
            f"{directory}: checkpoint does not match the model's architecture "
            f"(missing {missing[:4]}, unexpected {extra[:4]})"
        )
    try:
        _copy_shards(directory, meta, cfg, params, tp_rank, tp_size)
    except CheckpointError:
        raise
    except (SafetensorError, OSError, RuntimeError) as err:  # truncated or corrupt shard files
        raise CheckpointError(f"{directory}: cannot read the model shards ({_one_line(err)})") from None


def _copy_shards(
    directory: Path,
    meta: ModelMeta,
    cfg: Config,
    params: dict[str, torch.nn.Parameter],
    tp_rank: int,
    tp_size: int,
) -> None:
    splits = tensor_splits(meta, cfg)
    same_tp = meta.tp_size == tp_size
    handle = safe_open(str(directory / shard_filename(tp_rank)), framework="pt") if same_tp else None
    with torch.no_grad():
        for name, param in params.items():
            spec = splits[name]
            full_shape = list(spec.full_shape(param.shape, tp_size))
            if full_shape != list(meta.shapes[name]):
                raise CheckpointError(
                    f"{directory}: '{name}' has shape {list(meta.shapes[name])} in the checkpoint but "
                    f"{full_shape} in the model built from the config"
                )
            if same_tp:
                shard = handle.get_tensor(name)
            else:
                _, full = next(iter_canonical_tensors(directory, [name]))
                shard = spec.split(full, tp_rank, tp_size)
            if not torch.isfinite(shard).all():  # a run from it would skip every step as non-finite
                raise CheckpointError(
                    f"{directory}: '{name}' holds non-finite values (NaN or inf); resume from an earlier checkpoint"
                )
            param.copy_(shard.to(param.dtype))
