"""SLURM node lists, DeepSpeed hostfiles and DeepSpeed's ``--include``/``--exclude`` filters.

Why this exists: a SLURM job only knows its nodes as a compressed list (``gpu[001-004,010]``) while the
``deepspeed`` launcher wants a hostfile (``gpu001 slots=8``). Getting either wrong does not fail at
launch; it fails minutes later as a hung rendezvous or a rank on a GPU that does not exist. Everything
here is pure string handling so a bad node list, a hostfile line without ``slots=`` or a request for
more GPUs than a host has is reported *before* any process starts.

Command line (also wrapped by ``launch/write_hostfile.sh``)::

    python -m megatron_stablelm.launch.hostfile expand [--first] 'gpu[001-004,010]'  # one host per line
    python -m megatron_stablelm.launch.hostfile write --slots 8 [--nodelist LIST] [-o FILE]
    python -m megatron_stablelm.launch.hostfile check FILE [--include SPEC | --exclude SPEC]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

# A generous cap: a typo such as ``n[1-99999999]`` should be an error, not an out-of-memory.
MAX_HOSTS = 100_000

_SLOT_RE = re.compile(r"^slots=(.*)$")


class HostfileError(ValueError):
    """A node list, hostfile or include/exclude spec that cannot describe a valid set of GPUs."""


# ------------------------------------------------------------------------------------------ node lists
def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets (commas inside brackets separate ranges)."""
    parts: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(text):
        if ch == "[":
            if depth:
                raise HostfileError(f"node list {text!r}: nested '[' at position {i}")
            depth = 1
        elif ch == "]":
            if not depth:
                raise HostfileError(f"node list {text!r}: ']' without '[' at position {i}")
            depth = 0
        elif ch == "," and not depth:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise HostfileError(f"node list {text!r}: '[' is never closed")
    parts.append(text[start:])
    return parts


def _expand_range_list(body: str, whole: str) -> list[str]:
    """``001-003,010`` → ``['001', '002', '003', '010']``; the width of the lower bound is kept, which
    is how SLURM writes zero-padded names (``[8-10]`` gives 8, 9, 10; ``[08-10]`` gives 08, 09, 10)."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            raise HostfileError(f"node list {whole!r}: empty entry in '[{body}]'")
        lo, sep, hi = item.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise HostfileError(f"node list {whole!r}: '{item}' is not a number or a range like 01-04")
        if not sep:
            out.append(lo)
            continue
        first, last = int(lo), int(hi)
        if last < first:
            raise HostfileError(f"node list {whole!r}: range '{item}' runs backwards")
        if last - first + 1 > MAX_HOSTS:
            raise HostfileError(f"node list {whole!r}: range '{item}' names more than {MAX_HOSTS} hosts")
        width = len(lo)
        out.extend(str(n).zfill(width) for n in range(first, last + 1))
    return out


_NAME_CHARS = re.compile(r"^[A-Za-z0-9._\-]*$")


def _expand_group(group: str, whole: str) -> list[str]:
    """One top-level item, e.g. ``rack[1-2]-gpu[01-02]``: the product of its bracket lists."""
    pieces: list[list[str]] = []
    pos = 0
    for match in re.finditer(r"\[([^\]]*)\]", group):
        literal = group[pos : match.start()]
        if not _NAME_CHARS.match(literal):
            raise HostfileError(f"node list {whole!r}: bad characters in '{literal}'")
        pieces.append([literal])
        pieces.append(_expand_range_list(match.group(1), whole))
        pos = match.end()
    tail = group[pos:]
    if not _NAME_CHARS.match(tail):
        raise HostfileError(f"node list {whole!r}: bad characters in '{tail}'")
    pieces.append([tail])
    count = 1
    for options in pieces:
        count *= len(options)
    if count > MAX_HOSTS:
        raise HostfileError(f"node list {whole!r}: '{group}' names more than {MAX_HOSTS} hosts")
    return ["".join(combo) for combo in itertools.product(*pieces)]


def expand_nodelist(text: str) -> list[str]:
    """Expand a SLURM compressed node list into host names, in SLURM's order.

    Handles what ``SLURM_JOB_NODELIST`` contains: ``node1``, ``gpu[001-004,010]``, several groups
    (``node1,gpu[01-02]``) and several bracket lists in one name (``a[1-2]b[3-4]`` → a1b3 a1b4 a2b3
    a2b4). Raises :class:`HostfileError` for anything unparsable, empty or naming a host twice,
    because a silently wrong host list becomes a hung job.
    """
    whole = text.strip()
    if not whole:
        raise HostfileError("node list is empty")
    hosts: list[str] = []
    for group in _split_top_level(whole):
        group = group.strip()
        if not group:
            raise HostfileError(f"node list {whole!r}: empty entry between commas")
        for host in _expand_group(group, whole):
            if not host:
                raise HostfileError(f"node list {whole!r}: '{group}' expands to an empty host name")
            hosts.append(host)
    seen: set[str] = set()
    for host in hosts:
        if host in seen:
            raise HostfileError(f"node list {whole!r}: host '{host}' appears twice")
        seen.add(host)
    if len(hosts) > MAX_HOSTS:
        raise HostfileError(f"node list {whole!r}: more than {MAX_HOSTS} hosts")
    return hosts


# ------------------------------------------------------------------------------------------ hostfiles
def format_hostfile(hosts: Iterable[str] | Mapping[str, int], slots: int | None = None) -> str:
    """The DeepSpeed hostfile text: ``host slots=N`` per line. ``hosts`` is either names (then
    ``slots`` applies to every host) or a mapping host → slots."""
    if isinstance(hosts, Mapping):
        pool = dict(hosts)
    else:
        if slots is None:
            raise HostfileError("slots per host is required when hosts are given as names")
        pool = {host: slots for host in hosts}
    if not pool:
        raise HostfileError("no hosts to write")
    for host, count in pool.items():
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise HostfileError(f"host '{host}': slots must be a positive integer, got {count!r}")
    return "".join(f"{host} slots={count}\n" for host, count in pool.items())


def write_hostfile(
    path: str | Path, hosts: Iterable[str] | Mapping[str, int], slots: int | None = None
) -> Path:
    """Write :func:`format_hostfile` to ``path`` (parents created); returns the path."""
    path = Path(path)
    text = format_hostfile(hosts, slots)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def parse_hostfile(text: str, source: str = "<hostfile>") -> dict[str, int]:
    """Parse DeepSpeed hostfile text into an ordered host → slots mapping.

    ``#`` starts a comment; blank lines are skipped. Every host line must carry exactly one positive
    ``slots=N``: DeepSpeed would silently skip a line without it, and the job would then run on fewer
    nodes than the user believes, so here it is an error naming the line.
    """
    pool: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        where = f"{source}:{lineno}"
        if "=" in host:
            raise HostfileError(f"{where}: expected 'HOST slots=N', the line starts with '{host}'")
        slot_values = [m.group(1) for token in rest if (m := _SLOT_RE.match(token))]
        others = [token for token in rest if not _SLOT_RE.match(token)]
        if not slot_values:
            raise HostfileError(f"{where}: host '{host}' names no slots (expected '{host} slots=N')")
        if len(slot_values) > 1:
            raise HostfileError(f"{where}: host '{host}' gives slots= more than once")
        for token in others:
            if "=" not in token:
                raise HostfileError(f"{where}: unexpected '{token}' (expected 'HOST slots=N')")
        value = slot_values[0]
        if not value.isdigit() or int(value) < 1:
            raise HostfileError(f"{where}: host '{host}': slots must be a positive integer, got '{value}'")
        if host in pool:
            raise HostfileError(f"{where}: host '{host}' is listed twice")
        pool[host] = int(value)
    if not pool:
        raise HostfileError(f"{source}: names no hosts with slots")
    return pool


def read_hostfile(path: str | Path) -> dict[str, int]:
    """:func:`parse_hostfile` on a file, with a clear error when it is missing."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"hostfile not found: {path}")
    return parse_hostfile(path.read_text(), str(path))


# ---------------------------------------------------------------------------------- include / exclude
def parse_resource_spec(spec: str, what: str = "include") -> dict[str, list[int] | None]:
    """DeepSpeed's ``host1:0,1@host2`` → ``{'host1': [0, 1], 'host2': None}`` (None: every slot)."""
    out: dict[str, list[int] | None] = {}
    text = spec.strip()
    if not text:
        raise HostfileError(f"{what} spec is empty")
    for node_spec in text.split("@"):
        host, sep, slots_text = node_spec.strip().partition(":")
        host = host.strip()
        if not host:
            raise HostfileError(f"{what} spec {spec!r}: empty host name")
        if not sep:
            out[host] = None
            continue
        slots: list[int] = []
        for item in slots_text.split(","):
            item = item.strip()
            if not item.isdigit():
                raise HostfileError(f"{what} spec {spec!r}: slot '{item}' on '{host}' is not a number")
            slots.append(int(item))
        if host in out:
            previous = out[host]
            out[host] = None if previous is None else sorted(set(previous) | set(slots))
        else:
            out[host] = sorted(set(slots))
    return out


def apply_filter(
    pool: Mapping[str, int], include: str | None = None, exclude: str | None = None
) -> dict[str, list[int]]:
    """The GPUs a job will use: host → slot ids, after DeepSpeed-style include/exclude.

    Same meaning as the ``deepspeed`` launcher's flags (they are mutually exclusive; a host without
    ``:slots`` means all of its slots), but unknown hosts, slots a host does not have, and a filter
    that leaves nothing are errors here rather than surprises later.
    """
    if include and exclude:
        raise HostfileError("include and exclude cannot both be given")
    active: dict[str, list[int]] = {host: list(range(n)) for host, n in pool.items()}

    def check(spec: dict[str, list[int] | None], what: str) -> None:
        for host, slots in spec.items():
            if host not in pool:
                raise HostfileError(f"{what}: host '{host}' is not in the hostfile ({', '.join(pool)})")
            for slot in slots or []:
                if slot >= pool[host]:
                    raise HostfileError(f"{what}: host '{host}' has {pool[host]} slots, no slot {slot}")

    if include:
        spec = parse_resource_spec(include, "include")
        check(spec, "include")
        active = {
            host: (list(range(pool[host])) if spec[host] is None else list(spec[host]))
            for host in pool
            if host in spec
        }
    elif exclude:
        spec = parse_resource_spec(exclude, "exclude")
        check(spec, "exclude")
        for host, slots in spec.items():
            if slots is None:
                active.pop(host)
            else:
                active[host] = [s for s in active[host] if s not in slots]
                if not active[host]:
                    active.pop(host)
    if not active:
        raise HostfileError("the include/exclude filter leaves no GPUs")
    return active


# ---------------------------------------------------------------------------------------- SLURM env
def slurm_nodelist(environ: Mapping[str, str] | None = None) -> str | None:
    """The allocation's compressed node list, or None outside SLURM."""
    env = os.environ if environ is None else environ
    return env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or None


def slurm_gpus_per_node(environ: Mapping[str, str] | None = None) -> int | None:
    """GPUs per node granted by SLURM, from whichever variable this SLURM version sets, or None.

    ``SLURM_GPUS_ON_NODE`` is a count; ``SLURM_GPUS_PER_NODE`` may be ``8``, ``gpu:8`` or
    ``a100:8``; ``SLURM_JOB_GPUS`` lists device ids.
    """
    env = os.environ if environ is None else environ
    value = env.get("SLURM_GPUS_ON_NODE", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    value = env.get("SLURM_GPUS_PER_NODE", "").strip()
    if value:
        last = value.split(",")[0].split(":")[-1].split("(")[0]
        if last.isdigit() and int(last) > 0:
            return int(last)
    value = env.get("SLURM_JOB_GPUS", "").strip()
    if value:
        return len([v for v in value.split(",") if v.strip()])
    return None


# ------------------------------------------------------------------------------------------------ CLI
def _hosts_from(nodelist: str | None, option: str) -> list[str]:
    """The hosts of the given node list, else of ``$SLURM_JOB_NODELIST``."""
    text = nodelist or slurm_nodelist()
    if not text:
        raise HostfileError(f"no {option} given and SLURM_JOB_NODELIST is not set")
    return expand_nodelist(text)


def _expand(args: argparse.Namespace) -> None:
    hosts = _hosts_from(args.nodelist, "node list")
    print("\n".join(hosts[:1] if args.first else hosts))


def _write(args: argparse.Namespace) -> None:
    hosts = _hosts_from(args.nodelist, "--nodelist")
    slots = args.slots if args.slots is not None else slurm_gpus_per_node()
    if slots is None:
        raise HostfileError("give --slots: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE are not set")
    if args.output:
        write_hostfile(args.output, hosts, slots)
    else:
        sys.stdout.write(format_hostfile(hosts, slots))


def _check(args: argparse.Namespace) -> None:
    active = apply_filter(read_hostfile(args.hostfile), args.include, args.exclude)
    for host, slots in active.items():
        print(f"{host} slots={len(slots)} ids={','.join(map(str, slots))}")
    print(f"total {sum(len(s) for s in active.values())} GPUs on {len(active)} hosts")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (2 with a one-line message on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m megatron_stablelm.launch.hostfile",
        description="SLURM node lists and DeepSpeed hostfiles",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_expand = sub.add_parser("expand", help="print one host per line")
    p_expand.add_argument("nodelist", nargs="?", help="default: $SLURM_JOB_NODELIST")
    p_expand.add_argument("--first", action="store_true", help="print only the first host (the master)")
    p_expand.set_defaults(run=_expand)
    p_write = sub.add_parser("write", help="write a DeepSpeed hostfile")
    p_write.add_argument("--nodelist", help="default: $SLURM_JOB_NODELIST")
    p_write.add_argument("--slots", type=int, help="GPUs per host; default: from SLURM_GPUS_* variables")
    p_write.add_argument("-o", "--output", help="file to write; default: stdout")
    p_write.set_defaults(run=_write)
    p_check = sub.add_parser("check", help="validate a hostfile and print the GPUs it gives")
    p_check.add_argument("hostfile")
    p_check.add_argument("--include")
    p_check.add_argument("--exclude")
    p_check.set_defaults(run=_check)
    args = parser.parse_args(argv)
    try:
        args.run(args)
        return 0
    except HostfileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
