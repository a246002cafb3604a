"""The docs cannot drift from the code: the config-key reference is regenerated and compared, and every
command shown in the README, the launcher docs, the SLURM script and the config headers names files
that exist, modules that import and flags that our tools accept."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import runpy
import shlex
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest

from megatron_stablelm.config import reference

REPO = Path(__file__).resolve().parent.parent
DOCUMENTED = [
    "README.md",
    "launch/README.md",
    "launch/slurm/train.sbatch",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yml")),
]
REPO_DIRS = ("configs/", "tools/", "launch/", "benchmarks/", "docs/", "megatron_stablelm/", "tests/")
PYTHONS = {"python", "python3", "$PYTHON"}


def test_every_config_key_has_a_meaning():
    assert reference.meaning_problems() == []


def test_config_reference_is_current():
    generated = reference.reference_markdown()
    on_disk = (REPO / "docs" / "config-keys.md").read_text()
    assert on_disk == generated, f"docs/config-keys.md is stale: regenerate it with `{reference.COMMAND}`"


def test_reference_lists_every_key_with_its_default():
    """Independent of the generator's code paths: every key appears once as a table row, with the
    dataclass default rendered in it."""
    text = reference.reference_markdown().split("## Keys read")[1].split("\n## ")[0]
    for spec in reference.config_fields():
        rows = [line for line in text.splitlines() if line.startswith(f"| `{spec.name}` |")]
        assert len(rows) == 1, spec.name
        if spec.default is None:
            assert "| unset |" in rows[0], spec.name
        elif isinstance(spec.default, (int, float, str)) and not isinstance(spec.default, bool):
            assert f"`{spec.default}`" in rows[0], spec.name


# --------------------------------------------------------------------------------- commands in the docs
def _header_text(path: Path) -> str:
    """A config's leading comment block, '#' removed."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#"))
    return "\n".join(lines)


def _snippets(rel: str) -> list[str]:
    """Pieces of text that may hold a command: code spans and fenced blocks of Markdown; every line of a
    shell script or config header (with inline code spans joined across line breaks)."""
    path = REPO / rel
    if rel.endswith(".md"):
        text = path.read_text()
        fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
        text = re.sub(r"```.*?```", "", text, flags=re.S)
        return fenced + [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", text)]
    text = _header_text(path) if rel.endswith(".yml") else path.read_text()
    text = "\n".join(line.lstrip().lstrip("#") for line in text.splitlines())
    return [text] + [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", text)]


def _commands(snippet: str) -> list[list[str]]:
    """Shell-split commands: continuation lines joined, split at newlines, `&&`, `;` and `|`, trailing
    comments dropped."""
    snippet = snippet.replace("\\\n", " ")
    out = []
    for line in snippet.splitlines():
        line = re.sub(r"\s#.*$", "", line)
        for part in re.split(r"&&|;|\|\||(?<![-\w])\|(?!\w)", line):
            try:
                tokens = shlex.split(part)
            except ValueError:
                tokens = part.split()
            if tokens:
                out.append(tokens)
    return out


def _tool_at(tokens: list[str]) -> tuple[int, str] | None:
    """(index, tool) of the first of our entry points in a command: ``X.py`` or ``python -m module``."""
    for i, token in enumerate(tokens):
        if token in PYTHONS and i + 2 < len(tokens) and tokens[i + 1] == "-m":
            return i + 2, "-m " + tokens[i + 2]
        if token.endswith(".py") and (REPO / token).is_file():
            return i, token
    return None


def _repo_paths(tokens: list[str]) -> list[str]:
    """Tokens that name a file of this repository (placeholders and globs left out)."""
    paths = []
    for token in tokens:
        token = token.strip("[](),.:;'\"")
        if re.search(r"[*$<>…{}]", token) or not token:
            continue
        if token.startswith(REPO_DIRS) or (token.endswith(".py") and "/" not in token):
            paths.append(token)
    return paths


@cache
def help_text(tool: str, *subcommand: str) -> str:
    """A tool's ``--help`` (run in this process: the imports are shared between tools)."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [tool, *subcommand, "--help"]
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings(), pytest.raises(SystemExit):
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
            if tool.startswith("-m "):
                runpy.run_module(tool[3:], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(REPO / tool), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


def accepted_flags(tool: str, args: list[str] = ()) -> frozenset[str]:
    """The ``--flags`` of a tool's help, and of its subcommand's when ``args`` starts with one."""
    text = help_text(tool)
    subcommands = {name for group in re.findall(r"\{([\w,-]+)\}", text) for name in group.split(",")}
    if args and args[0] in subcommands:
        text += help_text(tool, args[0])
    return frozenset(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text))


def _documented_commands() -> list[tuple[str, list[str]]]:
    return [(rel, tokens) for rel in DOCUMENTED for s in _snippets(rel) for tokens in _commands(s)]


def test_documented_paths_exist():
    missing = {
        (rel, path)
        for rel, tokens in _documented_commands()
        for path in _repo_paths(tokens)
        if not (REPO / path).exists()
    }
    assert not missing, f"docs name files that do not exist: {sorted(missing)}"


def test_documented_modules_import():
    modules = {
        tool[3:] for _, tokens in _documented_commands() if (hit := _tool_at(tokens)) for tool in [hit[1]]
    }
    modules = {m for m in modules if m.startswith("megatron_stablelm")}
    assert "megatron_stablelm.launch" in modules  # the scan finds what the docs show
    assert [m for m in sorted(modules) if importlib.util.find_spec(m) is None] == []


def test_documented_flags_are_accepted():
    """Every ``--flag`` after one of our entry points is in that tool's ``--help``; flags after a bare
    ``--`` of the launcher belong to train.py."""
    bad = set()
    checked = 0
    for rel, tokens in _documented_commands():
        hit = _tool_at(tokens)
        if hit is None:
            continue
        start, tool = hit
        rest = tokens[start + 1 :]
        if tool == "-m megatron_stablelm.launch" and "--" in rest:
            cut = rest.index("--")
            rest, train_args = rest[:cut], rest[cut + 1 :]
            if train_args and train_args[0] == "train.py":
                train_args = train_args[1:]
            bad |= {(rel, "train.py", f) for f in _flags(train_args) if f not in accepted_flags("train.py")}
        flags = _flags(rest)
        checked += len(flags)
        bad |= {(rel, tool, f) for f in flags if f not in accepted_flags(tool, rest)}
    assert checked > 20  # the scan really reads the commands
    assert not bad, f"docs pass flags the tools do not accept: {sorted(bad)}"


def _flags(tokens: list[str]) -> list[str]:
    found = []
    for token in tokens:
        for part in token.strip("[]").split("|"):
            match = re.fullmatch(r"(--?[A-Za-z][\w-]*)(=.*)?", part.strip("[]"))
            if match:
                found.append(match.group(1))
    return found
