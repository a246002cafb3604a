"""``model_meta.json`` as one typed record: what a checkpoint's model files are, read and written here.

Why a record: every reader of a checkpoint (resume, reshard, export, generation, evaluation,
inspection) needs the same few facts: TP size, padded vocabulary, dtype, each tensor's whole shape and
split. Read by string key from a dict, each reader restated the keys, their optional ones and their
defaults; here each is a typed field, checked once when the file is read (errors name the file), and
the writer produces the file from the same record, so the format has one owner. The JSON on disk is
unchanged: ``to_json`` gives back exactly the object the writer always wrote.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_stablelm.checkpoint.layout import MODEL_FORMAT, CheckpointError
from megatron_stablelm.sharding import ShardSpec


def _is_count(value: object, minimum: int) -> bool:
    """An ``int`` (JSON's ``true`` is not one) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class ModelMeta:
    """The model files of one checkpoint (format :data:`~.layout.MODEL_FORMAT`).

    ``shapes``: each canonical tensor's whole (TP-independent) shape, in the order the shard files hold
    them. ``splits``: how each splits over TP, None for checkpoints written before splits were recorded
    (their readers derive the splits from the config). ``vocab_size``: the real vocabulary, recorded only
    when the embedding was padded beyond a source model's (an import from Hugging Face), so an export
    gives the source's shape back. ``dtype``: torch's name of the stored dtype (``bfloat16``), None
    when the file does not say."""

    tp_size: int
    padded_vocab_size: int
    dtype: str | None
    shapes: Mapping[str, tuple[int, ...]]
    splits: Mapping[str, ShardSpec] | None = None
    vocab_size: int | None = None

    @property
    def export_vocab_size(self) -> int:
        """The embedding rows a model leaves with (HF export): the source's vocabulary when an import
        padded it, else every row."""
        return self.vocab_size or self.padded_vocab_size

    @classmethod
    def from_json(cls, path: Path, data: object) -> ModelMeta:
        """The record of ``data`` (``path``'s parsed JSON), checked: format version, positive TP size
        and vocabularies, one shape per tensor and, when recorded, one split per tensor. A
        :class:`CheckpointError` names ``path`` and the key at fault."""
        if not isinstance(data, dict) or data.get("format_version") != MODEL_FORMAT:
            found = data.get("format_version") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"{path}: unsupported checkpoint format {found}")
        for key in ("tp_size", "padded_vocab_size"):
            if not _is_count(data.get(key), 1):
                raise CheckpointError(f"{path}: '{key}' must be a positive integer, not {data.get(key)!r}")
        vocab_size = data.get("vocab_size")
        if vocab_size is not None and not _is_count(vocab_size, 1):
            raise CheckpointError(f"{path}: 'vocab_size' must be a positive integer, not {vocab_size!r}")
        dtype = data.get("dtype")
        if dtype is not None and not isinstance(dtype, str):
            raise CheckpointError(f"{path}: 'dtype' must be a dtype's name, not {dtype!r}")
        return cls(
            tp_size=data["tp_size"],
            padded_vocab_size=data["padded_vocab_size"],
            dtype=dtype,
            shapes=_shapes_from_json(path, data.get("shapes")),
            splits=_splits_from_json(path, data["splits"]) if "splits" in data else None,
            vocab_size=vocab_size,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``model_meta.json``, key for key as it has always been written."""
        data: dict[str, Any] = {
            "format_version": MODEL_FORMAT,
            "tp_size": self.tp_size,
            "padded_vocab_size": self.padded_vocab_size,
            "dtype": self.dtype,
            "shapes": {name: list(shape) for name, shape in self.shapes.items()},
        }
        if self.splits is not None:
            data["splits"] = {name: [spec.dim, spec.parts] for name, spec in self.splits.items()}
        if self.vocab_size is not None:
            data["vocab_size"] = self.vocab_size
        return data


def _shapes_from_json(path: Path, shapes: object) -> dict[str, tuple[int, ...]]:
    if not isinstance(shapes, dict) or not shapes:
        raise CheckpointError(f"{path}: 'shapes' must map every tensor to its shape")
    out = {}
    for name, shape in shapes.items():
        if not isinstance(shape, list) or not all(_is_count(d, 0) for d in shape):
            raise CheckpointError(f"{path}: the shape of '{name}' must be a list of sizes, not {shape!r}")
        out[name] = tuple(shape)
    return out


def _splits_from_json(path: Path, splits: object) -> dict[str, ShardSpec]:
    if not isinstance(splits, dict):
        raise CheckpointError(f"{path}: 'splits' must map every tensor to its split")
    out = {}
    for name, value in splits.items():
        valid = (
            isinstance(value, list)
            and len(value) == 2
            and (value[0] is None or _is_count(value[0], 0))
            and _is_count(value[1], 1)
        )
        if not valid:
            raise CheckpointError(
                f"{path}: the split of '{name}' must be [dim or null, parts], not {value!r}"
            )
        out[name] = ShardSpec(value[0], value[1])
    return out
