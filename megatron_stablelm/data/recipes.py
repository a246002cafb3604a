"""Corpus recipes: one small YAML file per source, so that a new corpus is data, not a code path.

A recipe (``megatron_stablelm/data/recipes/<source>.yml``, or any file given by path) says what a user
downloads and how it is laid out, which field holds the text, which metadata selects subsets, and so
how output prefixes are named: ``<output-root>/<source>/<subset>``, where ``<subset>`` is a folder
name (RedPajama subsets, StarCoder languages, CulturaX language codes), the recipe's ``output`` name
when subsets are selected by a record field (The Pile: ``pile``), or the source name itself when the
corpus has no subsets (RefinedWeb: ``<root>/refinedweb/refinedweb``). Mixture configs are written
against that convention.

Keys of a recipe (unknown keys are refused, naming the file):

``source``           the name (``--source NAME``); the output folder
``description``      one line
``download``         the commands that fetch it into ``RAW/<source>`` (printed by ``--describe``)
``files``            globs under ``--input-root`` (how the download is laid out); ``{subset}`` stands
                     for a subset folder
``format``           allowed file kinds: ``parquet``, ``jsonl``, ``jsonl.zst``, ``jsonl.gz``
``text_field``       the field/column holding the document text
``metadata_fields``  the other fields a record carries (documentation)
``subsets``          ``by``: ``none`` | ``directory`` | ``field``; ``field`` (dotted, for ``by: field``);
                     ``output`` (the subset name of the one output, for ``by: field``); ``names`` (the
                     known subsets); ``closed`` (only ``names`` are accepted); ``default`` (what is
                     selected without ``--subset``; all when absent); ``default_exclude``
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_stablelm.data.errors import DataError
from megatron_stablelm.data.preprocess import Selection, Target

__all__ = [
    "RECIPE_DIR",
    "Recipe",
    "available_sources",
    "check_shards_present",
    "load_recipe",
    "missing_shards",
    "recipe_command",
    "recipe_targets",
]

RECIPE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")
_KEYS = {"source", "description", "download", "files", "format", "text_field", "metadata_fields", "subsets"}
_SUBSET_KEYS = {"by", "field", "output", "names", "closed", "default", "default_exclude"}
_FORMATS = {
    "parquet": (".parquet",),
    "jsonl": (".jsonl", ".json"),
    "jsonl.zst": (".jsonl.zst", ".jsonl.zstd"),
}
_FORMATS["jsonl.gz"] = (".jsonl.gz", ".json.gz")


@dataclass(frozen=True)
class Recipe:
    """A parsed, checked recipe (see the module docstring for the meaning of each field)."""

    path: str
    source: str
    description: str
    download: str
    files: tuple[str, ...]
    formats: tuple[str, ...]
    text_field: str
    metadata_fields: tuple[str, ...]
    subsets_by: str
    subset_field: str | None
    output: str
    names: tuple[str, ...]
    closed: bool
    default: tuple[str, ...] | None
    default_exclude: tuple[str, ...]

    def describe(self) -> str:
        """What ``--describe`` prints: enough to download and lay out the corpus."""
        how = {
            "none": "no subsets",
            "directory": "one subset per folder" + (f" ({', '.join(self.names)})" if self.names else ""),
            "field": f"sets selected by the record field {self.subset_field!r}",
        }[self.subsets_by]
        lines = [
            f"{self.source}: {self.description}",
            f"  recipe: {self.path}",
            f"  files under --input-root: {', '.join(self.files)}  ({', '.join(self.formats)})",
            f"  text field: {self.text_field!r}; metadata: {', '.join(self.metadata_fields) or '-'}",
            f"  subsets: {how}",
        ]
        if self.subsets_by == "field":
            lines.append(f"  known sets: {', '.join(self.names)}")
        if self.default is not None:
            lines.append(f"  default selection: {', '.join(self.default)}")
        if self.default_exclude:
            lines.append(f"  left out by default: {', '.join(self.default_exclude)}")
        lines.append("  download:")
        lines.extend("    " + line for line in self.download.strip().splitlines())
        return "\n".join(lines)


def available_sources() -> list[str]:
    """The names of the recipes shipped with the package."""
    return sorted(n[:-4] for n in os.listdir(RECIPE_DIR) if n.endswith(".yml"))


def _strings(path: str, key: str, value: Any, *, allow_none: bool = False) -> tuple[str, ...] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"recipe '{path}': {key} must be a string or a list of strings, got {value!r}")
    return tuple(value)


def load_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by source name, or a recipe file by path; :class:`DataError` naming the file
    and key for anything malformed, and the known names for an unknown source."""
    import yaml

    if name_or_path.endswith((".yml", ".yaml")) or os.sep in name_or_path:
        path = name_or_path
    else:
        path = os.path.join(RECIPE_DIR, name_or_path + ".yml")
        if not os.path.isfile(path):
            raise DataError(f"unknown source {name_or_path!r} (known: {', '.join(available_sources())})")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as err:
        raise DataError(f"cannot read recipe '{path}': {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise DataError(f"recipe '{path}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise DataError(f"recipe '{path}': expected a mapping of keys, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise DataError(f"recipe '{path}': unknown key {unknown[0]!r} (keys: {', '.join(sorted(_KEYS))})")
    for key in ("source", "files", "text_field", "format"):
        if key not in raw:
            raise DataError(f"recipe '{path}': missing key {key!r}")
    source = raw["source"]
    if not isinstance(source, str) or not source or os.sep in source:
        raise DataError(f"recipe '{path}': source must be a folder name, got {source!r}")
    subsets = raw.get("subsets") or {"by": "none"}
    if not isinstance(subsets, dict):
        raise DataError(f"recipe '{path}': subsets must be a mapping, got {subsets!r}")
    unknown = sorted(set(subsets) - _SUBSET_KEYS)
    if unknown:
        raise DataError(f"recipe '{path}': unknown key 'subsets.{unknown[0]}'")
    by = subsets.get("by", "none")
    if by not in ("none", "directory", "field"):
        raise DataError(f"recipe '{path}': subsets.by is {by!r}, expected none, directory or field")
    files = _strings(path, "files", raw["files"])
    if (by == "directory") != all("{subset}" in g for g in files):
        raise DataError(
            f"recipe '{path}': files {list(files)} must use {{subset}} in every glob exactly when "
            f"subsets.by is directory"
        )
    formats = _strings(path, "format", raw["format"])
    bad = [f for f in formats if f not in _FORMATS]
    if bad:
        raise DataError(f"recipe '{path}': format {bad[0]!r} is not one of {', '.join(_FORMATS)}")
    if by == "field" and not isinstance(subsets.get("field"), str):
        raise DataError(f"recipe '{path}': subsets.by is field but subsets.field is not set")
    text_field = raw["text_field"]
    if not isinstance(text_field, str) or not text_field:
        raise DataError(f"recipe '{path}': text_field must be a field name, got {text_field!r}")
    names = _strings(path, "subsets.names", subsets.get("names", []))
    recipe = Recipe(
        path=path,
        source=source,
        description=str(raw.get("description", "")),
        download=str(raw.get("download", "")),
        files=files,
        formats=formats,
        text_field=text_field,
        metadata_fields=_strings(path, "metadata_fields", raw.get("metadata_fields", [])),
        subsets_by=by,
        subset_field=subsets.get("field"),
        output=str(subsets.get("output", source)),
        names=names,
        closed=bool(subsets.get("closed", bool(names))),
        default=_strings(path, "subsets.default", subsets.get("default"), allow_none=True),
        default_exclude=_strings(path, "subsets.default_exclude", subsets.get("default_exclude", [])),
    )
    for name in (recipe.default or ()) + recipe.default_exclude:
        _check_known(recipe, name)
    return recipe


def _check_known(recipe: Recipe, name: str) -> None:
    if recipe.closed and name not in recipe.names:
        raise DataError(
            f"{recipe.source} (recipe '{recipe.path}'): no subset {name!r} (known: {', '.join(recipe.names)})"
        )


def _glob_files(recipe: Recipe, root: str, subset: str | None) -> list[str]:
    """The files of one subset (or of the whole corpus), sorted, each checked against ``format``."""
    files: set[str] = set()
    for pattern in recipe.files:
        if subset is not None:
            pattern = pattern.replace("{subset}", glob.escape(subset))
        files.update(
            p
            for p in glob.glob(os.path.join(glob.escape(root), pattern), recursive=True)
            if os.path.isfile(p)
        )
    suffixes = tuple(s for f in recipe.formats for s in _FORMATS[f])
    for path in sorted(files):
        if not path.endswith(suffixes):
            raise DataError(f"{recipe.source}: input '{path}' is not {' or '.join(recipe.formats)}")
    where = os.path.join(root, subset) if subset is not None else root
    if not files:
        raise DataError(
            f"{recipe.source}: no input files under '{where}' matching {', '.join(recipe.files)} "
            f"(see: tools/preprocess_data.py --source {recipe.source} --describe)"
        )
    return sorted(files)


def recipe_targets(
    recipe: Recipe,
    input_root: str,
    output_root: str,
    subsets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> list[Target]:
    """The outputs of one run of a recipe: one :class:`Target` per selected subset folder, or one for
    the whole corpus (``by: none``, or ``by: field`` with a :class:`Selection` of the named sets).

    Without ``subsets`` and ``exclude`` the recipe's ``default`` and ``default_exclude`` apply. A
    subset that does not exist raises :class:`DataError` naming it and what does exist."""
    if not os.path.isdir(input_root):
        raise DataError(f"{recipe.source}: input root '{input_root}' is not a directory")
    if subsets is not None and not subsets:
        subsets = None
    if subsets is None and not exclude:
        subsets, exclude = recipe.default, recipe.default_exclude
    for name in list(subsets or ()) + list(exclude):
        if recipe.subsets_by == "directory" and (os.sep in name or name in ("", ".", "..")):
            raise DataError(f"{recipe.source}: subset {name!r} is not a folder name")
        _check_known(recipe, name)
    out_dir = os.path.join(output_root, recipe.source)
    key = recipe.text_field
    if recipe.subsets_by == "none":
        if subsets or exclude:
            raise DataError(f"{recipe.source} (recipe '{recipe.path}') has no subsets; drop --subset")
        files = _glob_files(recipe, input_root, None)
        prefix = os.path.join(out_dir, recipe.source)
        return [Target(recipe.source, tuple(files), {key: prefix}, input_root)]
    if recipe.subsets_by == "field":
        select = Selection(
            recipe.subset_field, frozenset(subsets) if subsets else None, frozenset(exclude or ())
        )
        files = _glob_files(recipe, input_root, None)
        prefix = os.path.join(out_dir, recipe.output)
        return [Target(recipe.output, tuple(files), {key: prefix}, input_root, select)]
    found = sorted(d for d in os.listdir(input_root) if os.path.isdir(os.path.join(input_root, d)))
    if recipe.closed:
        found = [d for d in found if d in recipe.names]
    chosen = list(subsets) if subsets else found
    for name in chosen:
        if not os.path.isdir(os.path.join(input_root, name)):
            raise DataError(
                f"{recipe.source}: subset {name!r}: no folder '{os.path.join(input_root, name)}' "
                f"(found: {', '.join(found) or 'none'})"
            )
    chosen = [s for s in chosen if s not in set(exclude or ())]
    if not chosen:
        raise DataError(
            f"{recipe.source}: no subset selected under '{input_root}' (found: {', '.join(found) or 'none'})"
        )
    return [
        Target(
            name,
            tuple(_glob_files(recipe, input_root, name)),
            {key: os.path.join(out_dir, name)},
            os.path.join(input_root, name),
        )
        for name in chosen
    ]


# ------------------------------------------------------------------------------------------ missing shards
# How the recipe commands of the README (and of a missing-shard message) pass the tokenizer.
TOKENIZER_ARGS = "$TOK"
TOKENIZER_ARGS_EXAMPLE = (
    "--tokenizer-type TiktokenTokenizer --vocab-file arcade100k.tiktoken --append-eod --workers 16"
)


def recipe_for_prefix(prefix: str) -> tuple[Recipe, str | None] | None:
    """``(recipe, subset)`` of the shipped recipe whose output ``prefix`` is (``<root>/<source>/<subset>``;
    ``subset`` None for a corpus with one output), or None when no recipe writes that name."""
    parent, name = os.path.split(os.path.normpath(prefix))
    source = os.path.basename(parent)
    if source not in available_sources():
        return None
    recipe = load_recipe(source)
    if recipe.subsets_by == "none":
        return (recipe, None) if name == recipe.source else None
    if recipe.subsets_by == "field":
        return (recipe, None) if name == recipe.output else None
    if recipe.closed and name not in recipe.names:
        return None
    return recipe, name


def recipe_command(prefix: str) -> str | None:
    """The ``tools/preprocess_data.py`` command (the README's form: downloads under ``RAW/<source>``,
    tokenizer arguments in ``$TOK``) that writes ``prefix``, or None when no shipped recipe does."""
    found = recipe_for_prefix(prefix)
    if found is None:
        return None
    recipe, subset = found
    root = os.path.dirname(os.path.dirname(os.path.normpath(prefix))) or "."
    command = (
        f"python tools/preprocess_data.py --source {recipe.source} --input-root RAW/{recipe.source} "
        f"--output-root {root} {TOKENIZER_ARGS}"
    )
    return command + (f" --subset {subset}" if subset is not None else "")


def _config_prefixes(cfg: Any) -> list[str]:
    prefixes = [cfg.data_path] if cfg.data_path else []
    for split in ("train", "valid", "test"):
        prefixes += getattr(cfg, f"{split}_data_paths") or []
    return list(dict.fromkeys(prefixes))


def missing_shards(cfg: Any) -> list[str]:
    """The shard prefixes the config names (``data_path``, ``*_data_paths``) whose ``.bin`` or ``.idx``
    does not exist, in the config's order."""
    return [
        prefix
        for prefix in _config_prefixes(cfg)
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"))
    ]


def check_shards_present(cfg: Any) -> None:
    """Refuse a config naming shards that do not exist with one :class:`DataError` listing every missing
    prefix at once, each with the recipe command that makes it: a data mixture is usually made by
    several preprocessing runs, and finding the missing shards one failed start at a time (hours into
    a preprocessing plan) is what this prevents. Only file existence is checked (constant time)."""
    missing = missing_shards(cfg)
    if not missing:
        return
    lines = [
        f"{len(missing)} of the shards the config names do not exist (.bin/.idx); make them first "
        f"({TOKENIZER_ARGS}: the tokenizer arguments, e.g. {TOKENIZER_ARGS_EXAMPLE}):"
    ]
    for prefix in missing:
        how = recipe_command(prefix)
        if how is None:
            plain = prefix.removesuffix("_text_document")
            how = (
                f"no corpus recipe writes this name: python tools/preprocess_data.py --input FILES "
                f"--output-prefix {plain} {TOKENIZER_ARGS}"
                + ("" if plain != prefix else " (it writes PREFIX_text_document)")
            )
        lines.append(f"  {prefix}: {how}")
    raise DataError("\n".join(lines))
