"""The config-key reference, generated from the code: ``docs/config-keys.md``.

    python -m megatron_stablelm.config.reference > docs/config-keys.md

Every fact in it is read from where it lives: the keys, types and defaults from :class:`Config`'s
fields, the ranges from their metadata, the allowed values from the validator's ``CHOICES``, the
GPT-NeoX keys that are ignored, refused or spelled differently from :mod:`.neox_keys`, and the
one-line meanings from :mod:`.meanings`. ``tests/test_docs.py`` regenerates it and fails when the file
differs, or when a key has no meaning, so the page cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Iterable
from typing import Any

from megatron_stablelm.config import neox_keys
from megatron_stablelm.config.meanings import MEANINGS
from megatron_stablelm.config.schema import BOOKKEEPING_FIELDS, Config
from megatron_stablelm.config.validation import CHOICES

COMMAND = "python -m megatron_stablelm.config.reference > docs/config-keys.md"


def config_fields() -> list[dataclasses.Field]:
    """The user keys of :class:`Config`, in declaration order."""
    return [f for f in dataclasses.fields(Config) if f.name not in BOOKKEEPING_FIELDS]


def meaning_problems() -> list[str]:
    """What is wrong with :data:`MEANINGS`: keys of ``Config`` without a meaning, meanings of keys that
    no longer exist. Empty when every key is explained."""
    keys = [f.name for f in config_fields()]
    missing = [k for k in keys if not MEANINGS.get(k, "").strip()]
    stale = sorted(set(MEANINGS) - set(keys))
    problems = []
    if missing:
        problems.append(
            f"config keys without a meaning in megatron_stablelm/config/meanings.py: {', '.join(missing)}"
        )
    if stale:
        problems.append(
            f"megatron_stablelm/config/meanings.py explains keys Config does not have: {', '.join(stale)}"
        )
    return problems


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    base = typing.get_origin(base) or base
    return getattr(base, "__name__", str(base))


def _code(value: Any) -> str:
    if isinstance(value, str):
        return f"`{value!r}`" if value == "" else f"`{value}`"
    return f"`{value!r}`".replace("|", "\\|")


def _default(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        return "unset" if spec.default is None else _code(spec.default)
    return _code(spec.default_factory())  # type: ignore[misc]


def _allowed(spec: dataclasses.Field) -> str:
    if spec.name in CHOICES:
        return ", ".join(_code(v) for v in CHOICES[spec.name])
    meta = spec.metadata
    if "minimum" not in meta:
        return ""
    if meta["strict"]:
        return "> 0"
    return ">= 0" + (f" (0 {meta['zero_means']})" if meta.get("zero_means") else "")


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _keys_section() -> list[str]:
    hints = typing.get_type_hints(Config)
    rows = [
        (
            f"`{f.name}`",
            _type_name(hints[f.name]),
            _default(f),
            _allowed(f),
            MEANINGS[f.name].replace("|", "\\|"),
        )
        for f in config_fields()
    ]
    return [
        "## Keys read",
        "",
        "Spelled with `_` or `-`. `unset` is YAML `null` (or leaving the key out).",
        "",
        *_table(("key", "type", "default", "allowed", "meaning"), rows),
    ]


def _neox_sections() -> list[str]:
    lines = ["## GPT-NeoX keys spelled differently", ""]
    lines += _table(
        ("GPT-NeoX key", "read as"), ((f"`{k}`", f"`{v}`") for k, v in sorted(neox_keys.ALIASES.items()))
    )
    lines += [
        "",
        "## Ignored GPT-NeoX keys",
        "",
        "Accepted, reported once when a config sets them, never used.",
        "",
    ]
    ignored = [(f"`{k}`", why) for k, why in sorted(neox_keys.IGNORED_KEYS.items())]
    ignored += [(f"`{p}*`", why) for p, why in sorted(neox_keys.IGNORED_PREFIXES.items())]
    lines += _table(("key", "why"), ignored)
    lines += ["", "## Refused GPT-NeoX keys", ""]
    lines += [
        "An error naming the missing feature when the value turns the feature on; the values listed leave it "
        "off and are reported as ignored.",
        "",
    ]
    refused = [
        (f"`{k}`", feature, ", ".join(_code(v) for v in off))
        for k, (feature, off) in sorted(neox_keys.REFUSED_KEYS.items())
    ]
    refused += [
        (f"`{p}*`", feature, "false" + (", 0" if numbers else ""))
        for p, (feature, numbers) in sorted(neox_keys.REFUSED_PREFIXES.items())
    ]
    lines += _table(("key", "missing feature", "accepted (off) values"), refused)
    lines += ["", "## Refused GPT-NeoX values", ""]
    values = [
        (f"`{k}`", _code(v), feature) for (k, v), feature in sorted(neox_keys.UNSUPPORTED_VALUES.items())
    ]
    values += [
        ("`attention_config`", _code(v), feature)
        for v, feature in sorted(neox_keys.UNSUPPORTED_ATTENTION.items())
    ]
    lines += _table(("key", "value", "missing feature"), values)
    return lines


def reference_markdown() -> str:
    """The whole page. Raises ``ValueError`` naming the keys when :func:`meaning_problems` finds any."""
    problems = meaning_problems()
    if problems:
        raise ValueError("; ".join(problems))
    lines = [
        "# Config keys",
        "",
        f"Generated from the code by `{COMMAND}`; do not edit (`tests/test_docs.py` checks it is current).",
        "Configs are GPT-NeoX YAML: several files merge in order (later wins), and `--override KEY=VALUE` "
        "changes a key from the command line. An unknown key is an error naming the file and the nearest "
        "known key.",
        "",
        *_keys_section(),
        "",
        *_neox_sections(),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    """Print the page; exit status 2 with one ``error:`` line naming the keys without a meaning."""
    problems = meaning_problems()
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    sys.stdout.write(reference_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
