"""Reading GPT-NeoX YAML configs: merge the files, normalise key spellings, type-check each value.

A run is described by one or more YAML files merged in order (later files win, key by key at the top
level), exactly as GPT-NeoX does, so Stability AI's published StableLM configs load unchanged. Keys may
be spelled with ``-`` or ``_``. Every key of GPT-NeoX's argument set is known
(:mod:`.neox_keys` says what happens to those that are not fields):

* used keys: fields of :class:`Config`, and GPT-NeoX's aliases of them (``gas``, ``batch_size``);
* accepted-but-ignored keys: logging, profiling, launching, text generation, features left off. They
  are reported once with the reason, never silently dropped and never fatal;
* refused keys: a value that turns on a feature this framework lacks (MoE, sparse attention, ...) is
  an error naming the feature;
* anything else is an error naming the file and the nearest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from megatron_stablelm.config.errors import ConfigError
from megatron_stablelm.config.neox_keys import (
    ALIASES,
    IGNORED_KEYS,
    REFUSED_KEYS,
    ignored_reason,
    refused_feature,
)
from megatron_stablelm.config.schema import BOOKKEEPING_FIELDS, Config
from megatron_stablelm.config.validation import validate_config

_SP_AT_TP1 = "sequence parallelism (what it turns on here) only acts at model_parallel_size > 1"

FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
KNOWN_KEYS = sorted(
    set(FIELDS) - set(BOOKKEEPING_FIELDS) | set(IGNORED_KEYS) | set(REFUSED_KEYS) | set(ALIASES)
)
_TYPE_HINTS = typing.get_type_hints(Config)


def normalize_key(key: str) -> str:
    return str(key).replace("-", "_")


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One config file as a dict with normalised keys. PyYAML reads NeoX's JSON-like files as they are
    (``#`` comments, trailing commas, ``540_000``)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes()  # bytes: PyYAML decodes them and names a byte that is not text
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    data = _load_yaml(text, str(path), top_level=True)
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    return {normalize_key(key): value for key, value in data.items()}


def _load_yaml(text: bytes | str, source: str, *, top_level: bool) -> Any:
    """``yaml.safe_load`` (no tag runs code) that refuses a key given twice in one mapping, which PyYAML
    accepts silently (the second wins): a hand-merged GPT-NeoX file would otherwise train with whichever
    value happens to come last. Errors are one line naming ``source``."""
    try:
        loader = yaml.SafeLoader(text)  # reads the start of the text already (its encoding)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _refuse_duplicate_keys(node, source, top_level, set())
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(err)}") from None


def _refuse_duplicate_keys(node: yaml.Node, source: str, top_level: bool, seen: set[int]) -> None:
    """Raise naming the key and both lines when a mapping gives a key twice. A config's top-level keys
    are compared as GPT-NeoX reads them (``train-iters`` is ``train_iters``); nested blocks (DeepSpeed's
    ``zero_optimization``...) as written. ``seen`` guards against YAML aliases that refer to themselves."""
    if id(node) in seen:
        return
    seen.add(id(node))
    children: list[yaml.Node] = list(node.value) if isinstance(node, yaml.SequenceNode) else []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, tuple[str, int]] = {}
        for key_node, value_node in node.value:
            children.append(value_node)
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = normalize_key(key_node.value) if top_level else key_node.value
            line = key_node.start_mark.line + 1
            if key in first:
                spelled, earlier = first[key]
                raise ConfigError(
                    f"{source}: key '{key}' is given twice, as '{spelled}' on line {earlier} and as "
                    f"'{key_node.value}' on line {line}; keep one"
                )
            first[key] = (key_node.value, line)
    for child in children:
        _refuse_duplicate_keys(child, source, False, seen)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message in one line: what is wrong and where (its own message spans several lines and
    quotes the text with a caret under it)."""
    if isinstance(err, yaml.reader.ReaderError):
        return f"not a text file ({err.reason}: {err.character:#04x} at offset {err.position})"
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        context = f"{err.context}: " if err.context else ""
        return f"{context}{err.problem}{where}"
    return " ".join(str(err).split())


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check ``value`` against the declared type of ``key``; convert the lossless cases YAML produces
    (int for float, '1e-5' strings for float)."""
    hint = _TYPE_HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: key '{key}' may not be null")
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if isinstance(base, types.GenericAlias):
        base = typing.get_origin(base)

    def bad() -> ConfigError:
        return ConfigError(
            f"{source}: key '{key}' must be {getattr(base, '__name__', base)}, got {value!r} "
            f"({type(value).__name__}){_number_as_text_hint(value)}"
        )

    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if isinstance(value, float) and not value.is_integer():
            raise bad()
        return int(value)
    if base is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                raise bad() from None
        raise bad()
    if base is str:
        if isinstance(value, str):
            return value
        raise bad()
    if base is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise bad()
    if base is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise bad()
    return value


def _number_as_text_hint(value: Any) -> str:
    """PyYAML (YAML 1.1) reads ``1e15`` and ``1.0e15`` as strings (a float needs a dot and a signed
    exponent): say so where a number was meant."""
    if not isinstance(value, str):
        return ""
    try:
        float(value.replace("_", ""))
    except ValueError:
        return ""
    return f"; YAML reads '{value}' as text, not a number: write it in digits, or with a dot and a signed exponent (1.0e+15)"


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    value = _load_yaml(raw, f"--override '{text}'", top_level=False) if raw.strip() else None
    return normalize_key(key.strip()), value


def _merge(
    source: str,
    data: Mapping[str, Any],
    merged: dict[str, Any],
    origin: dict[str, str],
    ignored: dict[str, str],
) -> None:
    """Type-check one layer's keys into ``merged`` (later layers win), remembering where each came from;
    GPT-NeoX's aliases become the key they spell, its other keys are ignored (with the reason) or
    refused (naming the missing feature)."""
    layer: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = normalize_key(raw_key)
        if key in FIELDS and key not in BOOKKEEPING_FIELDS:
            _set_once(layer, key, value, source, spelled=key)
        elif key in ALIASES:
            _set_once(layer, ALIASES[key], value, source, spelled=key)
        elif (feature := refused_feature(key, value)) is not None:
            raise ConfigError(
                f"{source}: key '{key}': {value!r} needs {feature}, which this framework does not implement"
            )
        elif (reason := ignored_reason(key)) is not None:
            ignored[key] = reason
        else:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key)}")
    for key, value in layer.items():
        merged[key] = _coerce(key, value, source)
        origin[key] = source


def _set_once(layer: dict[str, Any], key: str, value: Any, source: str, spelled: str) -> None:
    """One layer may give a key under two of its names only with the same value."""
    if key in layer and layer[key] != value:
        raise ConfigError(
            f"{source}: '{spelled}' ({value!r}) contradicts '{key}' ({layer[key]!r}) in the same file"
        )
    layer[key] = value


def load_config(
    paths: Sequence[str | Path] | str | Path,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    *,
    validate: bool = True,
    report_ignored: bool = True,
    training: bool = False,
) -> Config:
    """Merge the YAML files in order (later wins), apply ``key=value`` overrides, type-check, validate
    (``training``: also the keys only training needs, see :func:`validate_config`).

    Raises :class:`ConfigError` naming the file and key for unknown keys, wrong types and impossible
    combinations; nothing is built before this returns.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ConfigError("no config file given")
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    ignored: dict[str, str] = {}
    for path in paths:
        _merge(str(path), read_yaml(path), merged, origin, ignored)
    if overrides:
        items = overrides.items() if isinstance(overrides, Mapping) else map(_parse_override, overrides)
        _merge("--override", dict(items), merged, origin, ignored)
    cfg = Config(**merged)
    cfg.config_files = [str(p) for p in paths]
    sp_keys = [key for key in ("sequence_parallel", "partition_activations") if merged.get(key)]
    if sp_keys and cfg.model_parallel_size == 1:
        ignored.update(dict.fromkeys(sp_keys, _SP_AT_TP1))
    cfg.ignored_keys = ignored
    if validate:
        validate_config(cfg, origin, training=training)
    if report_ignored and ignored:
        for key, why in sorted(ignored.items()):
            print(f"[config] ignoring '{key}': {why}")
    if report_ignored and cfg.uses_sequence_parallel:
        print(f"[config] {sequence_parallel_note(cfg)}")
    if report_ignored and "pos_emb" not in merged:
        # GPT-NeoX's default is learned absolute positions, which no StableLM uses and this framework
        # does not build; say so rather than silently running a different model.
        print("[config] 'pos_emb' not given: using rotary (GPT-NeoX would default to learned embeddings)")
    return cfg


def sequence_parallel_note(cfg: Config) -> str:
    """The start-up line of a run with sequence parallelism: which key turned it on and what it does."""
    keys = " and ".join(
        f"'{k}: true'" for k in ("sequence_parallel", "partition_activations") if getattr(cfg, k)
    )
    tp = cfg.model_parallel_size
    return (
        f"{keys} → megatron-core sequence parallelism over TP={tp}: norms, residuals and dropout hold "
        f"1/{tp} of the sequence (all-gather before column-parallel linears, reduce-scatter after "
        "row-parallel ones)"
    )


def config_from_dict(values: Mapping[str, Any], *, validate: bool = True, training: bool = False) -> Config:
    """A :class:`Config` from a plain dict (tests, checkpoints); same checks as :func:`load_config`."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    _merge("<dict>", values, merged, origin, {})
    cfg = Config(**merged)
    if validate:
        validate_config(cfg, origin, training=training)
    return cfg
