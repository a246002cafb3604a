"""Start ``train.py`` through ``deepspeed`` or ``torchrun`` from a run's config files.

Why a front-end: the launch settings live in the same GPT-NeoX YAML as the model (``launcher``,
``hostfile``, ``num_gpus``, ...), and turning them into a correct ``deepspeed``/``srun``/``torchrun``
line by hand is where multi-node jobs go wrong. This script validates the whole resource request
(hostfile, SLURM node list, include/exclude, GPU counts) before anything starts, builds the one
command, records it with the resolved config in a per-job directory, and runs it.

Usage::

    python launch/launch.py CONFIG [CONFIG ...] [--dry-run] [--job-dir DIR] [-- train.py args]

Modes, chosen by the config's ``launcher``:

``local``
    one machine: ``deepspeed [--num_gpus N] train.py ...``.
``pdsh`` (GPT-NeoX's default), ``openmpi``, ``mvapich``
    with a ``hostfile``: DeepSpeed's multi-node runner of that name; without one, as ``local``.
``slurm``
    inside an allocation. The hostfile is written from ``SLURM_JOB_NODELIST`` (unless one is given)
    and the master is the first node. ``deepspeed_slurm: true`` uses DeepSpeed's own
    ``--launcher slurm`` (one srun task per GPU, started once); otherwise ``srun`` starts one
    ``deepspeed --no_ssh`` per node, which needs no ssh between nodes.
``torchrun``
    one machine: ``torchrun --nproc_per_node N``; inside a multi-node SLURM allocation, one
    ``torchrun`` per node through ``srun`` with a c10d rendezvous on the first node.

Environment: ``NCCL_*`` variables reach remote ranks through a ``.deepspeed_env`` file in the job
directory (``DS_ENV_FILE`` points DeepSpeed at it); srun and local launches inherit the environment.
``CUDA_DEVICE_MAX_CONNECTIONS=1`` is set when ``model_parallel_size > 1``: megatron-core's tensor-parallel
communication overlap relies on kernels being issued in order. ``MEGATRON_STABLELM_JOB_DIR`` tells
``train.py`` where the job directory is.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

_HERE = Path(__file__).resolve().parent
REPO_ROOT = _HERE.parent
if __package__ in (None, ""):
    # Run as ``python launch/launch.py``: sys.path[0] is launch/, where ``import launch`` would find this
    # file instead of the package. Put the repository root first instead.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from launch.hostfile import (  # noqa: E402
    HostfileError,
    apply_filter,
    expand_nodelist,
    format_hostfile,
    read_hostfile,
    slurm_gpus_per_node,
    slurm_nodelist,
)
from megatron_stablelm.config import Config, ConfigError, load_config  # noqa: E402

LAUNCHERS = ("local", "pdsh", "openmpi", "mvapich", "slurm", "torchrun")
DEEPSPEED_MULTINODE = ("pdsh", "openmpi", "mvapich")
JOB_DIR_ENV = "MEGATRON_STABLELM_JOB_DIR"
DEFAULT_SCRIPT = REPO_ROOT / "train.py"
# Prefixes of variables copied to ranks that DeepSpeed starts on other hosts.
PASS_THROUGH_PREFIXES = ("NCCL_",)


class LaunchError(ValueError):
    """A launch request that cannot work; raised before any process starts."""


@dataclasses.dataclass
class LaunchPlan:
    """Everything a launch does, computed without side effects so ``--dry-run`` shows the truth."""

    mode: str  # single | multinode | slurm-deepspeed | slurm-per-node | torchrun | slurm-torchrun
    argv: list[str]
    env: dict[str, str]  # added to the launcher's own environment
    remote_env: dict[str, str]  # written to the job's .deepspeed_env (empty: none needed)
    job_dir: Path
    hosts: dict[str, list[int]]  # host -> GPU ids running ranks; {} when DeepSpeed detects them
    hostfile: Path | None = None
    hostfile_to_write: dict[str, int] | None = None  # generated from the SLURM node list
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def world_size(self) -> int | None:
        return sum(len(s) for s in self.hosts.values()) or None


# ------------------------------------------------------------------------------------------ helpers
def default_job_dir(config_paths: Sequence[str | Path], environ: Mapping[str, str], root: str | Path) -> Path:
    """``ROOT/<slurm job name>-<job id>`` under SLURM (stable across requeues), otherwise
    ``ROOT/<last config's stem>-<timestamp>``."""
    job_id = environ.get("SLURM_JOB_ID")
    if job_id:
        name = f"{environ.get('SLURM_JOB_NAME') or 'job'}-{job_id}"
    else:
        stem = Path(config_paths[-1]).stem if config_paths else "run"
        name = f"{stem}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(root).resolve() / name


def _trim(active: dict[str, list[int]], cfg: Config, source: str) -> dict[str, list[int]]:
    """Apply ``num_nodes``/``num_gpus`` the way DeepSpeed does (first N hosts, GPUs 0..n-1), but fail
    when the hosts do not have them: DeepSpeed would start ranks on GPUs that do not exist."""
    if cfg.num_nodes is not None:
        if cfg.num_nodes < 1:
            raise LaunchError(f"num_nodes must be >= 1, got {cfg.num_nodes}")
        if cfg.num_nodes > len(active):
            raise LaunchError(
                f"num_nodes={cfg.num_nodes} but {source} offers {len(active)} host(s): {', '.join(active)}"
            )
        active = dict(list(active.items())[: cfg.num_nodes])
    if cfg.num_gpus is not None:
        if cfg.num_gpus < 1:
            raise LaunchError(f"num_gpus must be >= 1, got {cfg.num_gpus}")
        for host, slots in active.items():
            if cfg.num_gpus > len(slots):
                raise LaunchError(
                    f"num_gpus={cfg.num_gpus} per node but {source} gives host '{host}' only {len(slots)} slot(s)"
                )
        active = {host: list(range(cfg.num_gpus)) for host in active}
    return active


def _filter_flags(cfg: Config) -> list[str]:
    """DeepSpeed's resource flags from the config (include/exclude xor num_nodes/num_gpus)."""
    flags: list[str] = []
    if cfg.include:
        flags += ["--include", cfg.include]
    if cfg.exclude:
        flags += ["--exclude", cfg.exclude]
    if cfg.num_nodes is not None:
        flags += ["--num_nodes", str(cfg.num_nodes)]
    if cfg.num_gpus is not None:
        flags += ["--num_gpus", str(cfg.num_gpus)]
    return flags


def _uniform_slots(hosts: dict[str, list[int]], what: str) -> int:
    counts = {len(s) for s in hosts.values()}
    if len(counts) != 1:
        raise LaunchError(
            f"{what} needs the same number of GPUs on every node, got "
            + ", ".join(f"{h}: {len(s)}" for h, s in hosts.items())
        )
    return counts.pop()


def _whole_prefix_slots(hosts: dict[str, list[int]], what: str) -> None:
    for host, slots in hosts.items():
        if slots != list(range(len(slots))):
            raise LaunchError(
                f"{what} cannot pin ranks to GPU ids {slots} on '{host}'; filter whole hosts or use num_gpus"
            )


def _node_rank_shell(hosts: Sequence[str]) -> str:
    """Shell that sets NODE_RANK to this node's position in the hostfile, found by SLURM's node name.

    SLURM_NODEID would be shorter, but it counts in the *allocation's* order, which need not be the
    hostfile's; DeepSpeed numbers ranks by hostfile order, so the lookup is by name.
    """
    names = " ".join(shlex.quote(h) for h in hosts)
    return (
        f'NODE_RANK=-1; i=0; for h in {names}; do if [ "$h" = "$SLURMD_NODENAME" ]; then NODE_RANK=$i; fi; '
        "i=$((i+1)); done; "
    )


# ------------------------------------------------------------------------------------------- planner
def build_plan(
    cfg: Config,
    config_paths: Sequence[str | Path],
    *,
    extra_args: Sequence[str] = (),
    script: str | Path | None = None,
    job_dir: str | Path | None = None,
    output_root: str | Path = "runs",
    environ: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """Turn a config into the exact launch command; reads the hostfile but writes nothing.

    Raises :class:`LaunchError` (or :class:`HostfileError`) for every request that cannot run: unknown
    launcher, hostfile without slots, unparsable node list, more nodes/GPUs than offered, ...
    """
    env_in = dict(os.environ if environ is None else environ)
    launcher = (cfg.launcher or "pdsh").lower()
    if launcher not in LAUNCHERS:
        raise LaunchError(
            f"key 'launcher': unknown value {cfg.launcher!r}; expected one of {', '.join(LAUNCHERS)}"
        )
    if cfg.include and cfg.exclude:
        raise LaunchError("keys 'include' and 'exclude' cannot both be set")
    if (cfg.include or cfg.exclude) and (cfg.num_nodes is not None or cfg.num_gpus is not None):
        raise LaunchError(
            "keys 'include'/'exclude' cannot be combined with 'num_nodes'/'num_gpus' (DeepSpeed forbids it)"
        )
    if not 0 < cfg.master_port < 65536:
        raise LaunchError(f"key 'master_port': {cfg.master_port} is not a TCP port")

    script = str(Path(script).resolve() if script else DEFAULT_SCRIPT)
    tail = [script, *[str(Path(p).resolve()) for p in config_paths], *extra_args]
    job_dir = Path(job_dir).resolve() if job_dir else default_job_dir(config_paths, env_in, output_root)
    port = str(cfg.master_port)

    env: dict[str, str] = {JOB_DIR_ENV: str(job_dir)}
    if cfg.model_parallel_size > 1:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    passthrough = {k: v for k, v in sorted(env_in.items()) if k.startswith(PASS_THROUGH_PREFIXES)}
    notes: list[str] = []

    nodelist = slurm_nodelist(env_in)
    in_slurm = nodelist is not None
    want_slurm = launcher == "slurm" or (launcher == "torchrun" and in_slurm)

    # ---- the resource pool: hostfile, or the SLURM allocation, or "this machine"
    pool: dict[str, int] | None = None
    hostfile: Path | None = None
    to_write: dict[str, int] | None = None
    if cfg.hostfile:
        hostfile = Path(cfg.hostfile).resolve()
        pool = read_hostfile(hostfile)
        source = f"hostfile {hostfile}"
    elif want_slurm:
        if not in_slurm:
            raise LaunchError(
                "launcher: slurm must run inside a SLURM allocation (sbatch/salloc): SLURM_JOB_NODELIST is not set"
            )
        hosts = expand_nodelist(nodelist)
        granted = slurm_gpus_per_node(env_in)
        slots = granted if granted is not None else cfg.num_gpus
        if slots is None:
            raise LaunchError(
                "cannot tell how many GPUs each node has: SLURM_GPUS_ON_NODE/SLURM_GPUS_PER_NODE are unset; "
                "request GPUs with --gpus-per-node or set num_gpus"
            )
        pool = {host: slots for host in hosts}
        hostfile = job_dir / "hostfile"
        to_write = pool
        source = f"the SLURM allocation ({nodelist})"
    if pool is not None:
        active = _trim(apply_filter(pool, cfg.include, cfg.exclude), cfg, source)
    else:
        if cfg.num_nodes is not None and cfg.num_nodes > 1:
            raise LaunchError(
                f"num_nodes={cfg.num_nodes} needs a hostfile (key 'hostfile') or launcher: slurm inside an allocation"
            )
        active = {"localhost": list(range(cfg.num_gpus))} if cfg.num_gpus else {}

    multi_host = len(active) > 1
    if launcher == "local" and pool is not None and multi_host:
        raise LaunchError("launcher: local runs on this machine only, but the hostfile names several hosts")
    master_addr = cfg.master_addr or (next(iter(active)) if pool is not None and multi_host else None)

    # ---- torchrun
    if launcher == "torchrun":
        if cfg.include or cfg.exclude:
            raise LaunchError(
                "include/exclude need the deepspeed launcher; with torchrun use num_gpus/num_nodes"
            )
        if not multi_host:
            nproc = str(len(next(iter(active.values())))) if active else "gpu"
            argv = [
                "torchrun",
                "--nnodes=1",
                f"--nproc_per_node={nproc}",
                f"--master_addr={cfg.master_addr or '127.0.0.1'}",
                f"--master_port={port}",
                *tail,
            ]
            return LaunchPlan("torchrun", argv, env, {}, job_dir, active, hostfile, to_write, notes)
        if not in_slurm:
            raise LaunchError(
                "torchrun across several hosts is started per node by SLURM here; run inside an allocation "
                "or use launcher: pdsh with the hostfile"
            )
        nproc = _uniform_slots(active, "torchrun")
        nnodes = len(active)
        argv = [
            "srun",
            f"--nodes={nnodes}",
            f"--ntasks={nnodes}",
            "--ntasks-per-node=1",
            f"--nodelist={','.join(active)}",
            "--kill-on-bad-exit=1",
            "torchrun",
            f"--nnodes={nnodes}",
            f"--nproc_per_node={nproc}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={master_addr}:{port}",
            f"--rdzv_id={env_in.get('SLURM_JOB_ID', 'megatron_stablelm')}",
            *tail,
        ]
        return LaunchPlan("slurm-torchrun", argv, env, {}, job_dir, active, hostfile, to_write, notes)

    # ---- deepspeed on SLURM
    if launcher == "slurm":
        addr = master_addr or next(iter(active))
        if cfg.deepspeed_slurm:
            _whole_prefix_slots(active, "DeepSpeed's slurm launcher")
            per_node = _uniform_slots(active, "DeepSpeed's slurm launcher")
            # DeepSpeed's SLURM runner exports neither MASTER_ADDR nor MASTER_PORT and passes no
            # --local_rank: train.py maps SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE.
            env.update(MASTER_ADDR=addr, MASTER_PORT=port)
            argv = [
                "deepspeed",
                "--hostfile",
                str(hostfile),
                "--launcher",
                "slurm",
                "--no_ssh_check",
                *_filter_flags(cfg),
                "--master_addr",
                addr,
                "--master_port",
                port,
                "--launcher_args",
                f"--ntasks-per-node={per_node} --kill-on-bad-exit=1",
                *tail,
            ]
            remote = {**passthrough, **env}
            return LaunchPlan(
                "slurm-deepspeed", argv, env, remote, job_dir, active, hostfile, to_write, notes
            )
        inner = [
            "deepspeed",
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            *_filter_flags(cfg),
            "--master_addr",
            addr,
            "--master_port",
            port,
        ]
        script_text = (
            _node_rank_shell(list(active))
            + "exec "
            + shlex.join(inner[:4])
            + ' --node_rank="$NODE_RANK" '
            + shlex.join(inner[4:] + tail)
        )
        nnodes = len(active)
        argv = [
            "srun",
            f"--nodes={nnodes}",
            f"--ntasks={nnodes}",
            "--ntasks-per-node=1",
            f"--nodelist={','.join(active)}",
            "--kill-on-bad-exit=1",
            "bash",
            "-c",
            script_text,
        ]
        return LaunchPlan("slurm-per-node", argv, env, {}, job_dir, active, hostfile, to_write, notes)

    # ---- deepspeed on one machine or over ssh/mpi with a hostfile
    if pool is None:
        argv = ["deepspeed", *_filter_flags(cfg), "--master_port", port, *tail]
        return LaunchPlan("single", argv, env, {}, job_dir, active, None, None, notes)
    argv = ["deepspeed", "--hostfile", str(hostfile)]
    if launcher in DEEPSPEED_MULTINODE:
        argv += ["--launcher", launcher]
    if not multi_host:
        # One host left: DeepSpeed starts the ranks on this machine without ssh, yet would still
        # ssh to the host to check it and to look up its address; neither is needed.
        argv += ["--no_ssh_check"]
        master_addr = master_addr or "127.0.0.1"
        notes.append("the hostfile leaves one host: DeepSpeed starts its ranks on this machine")
    argv += [*_filter_flags(cfg), "--master_port", port]
    if master_addr:
        argv += ["--master_addr", master_addr]
    argv += tail
    remote = {**passthrough, **env}
    return LaunchPlan("multinode", argv, env, remote, job_dir, active, hostfile, None, notes)


# --------------------------------------------------------------------------------------- side effects
def _existing_deepspeed_env() -> list[str]:
    """Lines of the user's own ~/.deepspeed_env and ./.deepspeed_env: pointing DS_ENV_FILE at the job's
    file makes DeepSpeed skip those, so they are carried over (ours win on conflicts)."""
    lines: list[str] = []
    for base in (Path.home(), Path.cwd()):
        path = base / ".deepspeed_env"
        if path.is_file():
            lines += [ln.rstrip("\n") for ln in path.read_text().splitlines() if "=" in ln]
    return lines


def prepare_job_dir(plan: LaunchPlan, cfg: Config) -> None:
    """Create the job directory: resolved config, the command, the generated hostfile, .deepspeed_env."""
    plan.job_dir.mkdir(parents=True, exist_ok=True)
    sources = ", ".join(str(Path(f).resolve()) for f in cfg.config_files)
    header = f"# resolved config of this launch; merged from: {sources}\n"
    (plan.job_dir / "config.yaml").write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    env_text = "".join(f"{k}={shlex.quote(v)} " for k, v in plan.env.items())
    (plan.job_dir / "command.txt").write_text(env_text + shlex.join(plan.argv) + "\n")
    if plan.hostfile_to_write is not None and plan.hostfile is not None:
        plan.hostfile.parent.mkdir(parents=True, exist_ok=True)
        plan.hostfile.write_text(format_hostfile(plan.hostfile_to_write))
    if plan.remote_env:
        ours = {k: v for k, v in plan.remote_env.items() if "\n" not in v}
        kept = [ln for ln in _existing_deepspeed_env() if ln.split("=", 1)[0].strip() not in ours]
        path = plan.job_dir / ".deepspeed_env"
        path.write_text("".join(f"{ln}\n" for ln in kept) + "".join(f"{k}={v}\n" for k, v in ours.items()))
        plan.env["DS_ENV_FILE"] = str(path)


def run_plan(plan: LaunchPlan) -> int:
    """Run the command, copying its output to the console and to ``launch.log`` in the job directory;
    SIGTERM/SIGINT are forwarded so ``scancel`` stops the ranks. Returns the exit status."""
    if shutil.which(plan.argv[0]) is None:
        raise LaunchError(f"'{plan.argv[0]}' is not on PATH")
    env = {**os.environ, **plan.env}
    with open(plan.job_dir / "launch.log", "ab") as log:
        proc = subprocess.Popen(plan.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def forward(signum: int, _frame: object) -> None:
            if proc.poll() is None:
                proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                sys.stdout.buffer.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


def describe(plan: LaunchPlan) -> list[str]:
    """Human-readable lines about a plan (printed as ``#`` comments on stderr)."""
    lines = [f"mode: {plan.mode}", f"job dir: {plan.job_dir}"]
    if plan.hosts:
        per_host = ", ".join(f"{h}: {len(s)}" for h, s in plan.hosts.items())
        lines.append(f"world size: {plan.world_size} ({per_host})")
    else:
        lines.append("world size: every GPU DeepSpeed finds on this machine")
    if plan.hostfile_to_write is not None:
        lines.append(f"hostfile (written at launch): {plan.hostfile}")
    lines += [f"env: {k}={v}" for k, v in plan.env.items()]
    if plan.remote_env:
        lines.append(f"remote env (.deepspeed_env): {', '.join(plan.remote_env)}")
    return lines + plan.notes


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Split ``argv`` at ``--``: before are ours, after go to train.py unchanged."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="launch.py",
        description="Launch train.py with deepspeed/torchrun from GPT-NeoX-style configs.",
        epilog="Arguments after -- are passed to train.py unchanged.",
    )
    parser.add_argument("configs", nargs="+", help="YAML config files, merged in order")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("--job-dir", help="per-job output directory (default: OUTPUT_ROOT/<name>-<id|time>)")
    parser.add_argument("--output-root", default="runs", help="parent of default job directories")
    parser.add_argument("--script", help=f"training script (default: {DEFAULT_SCRIPT})")
    group = parser.add_argument_group("overrides of the config's launch keys")
    group.add_argument("--launcher", choices=LAUNCHERS)
    group.add_argument("--hostfile")
    group.add_argument("--include")
    group.add_argument("--exclude")
    group.add_argument("--num-gpus", type=int)
    group.add_argument("--num-nodes", type=int)
    group.add_argument("--master-addr")
    group.add_argument("--master-port", type=int)
    return parser.parse_args(argv), extra


_OVERRIDABLE = (
    "launcher",
    "hostfile",
    "include",
    "exclude",
    "num_gpus",
    "num_nodes",
    "master_addr",
    "master_port",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit status 2 with a one-line message for bad configs or resources."""
    args, extra = parse_args(argv)
    overrides = {k: getattr(args, k) for k in _OVERRIDABLE if getattr(args, k) is not None}
    try:
        cfg = load_config(args.configs, overrides or None, report_ignored=False)
        for key, why in sorted(cfg.ignored_keys.items()):
            print(f"# [config] ignoring '{key}': {why}", file=sys.stderr)
        plan = build_plan(
            cfg,
            args.configs,
            extra_args=extra,
            script=args.script,
            job_dir=args.job_dir,
            output_root=args.output_root,
        )
        if args.dry_run:
            for line in describe(plan):
                print(f"# {line}", file=sys.stderr)
            print(shlex.join(plan.argv))
            return 0
        script = Path(args.script).resolve() if args.script else DEFAULT_SCRIPT
        if not script.is_file():
            raise LaunchError(f"training script not found: {script}")
        prepare_job_dir(plan, cfg)
        for line in describe(plan):
            print(f"# {line}", file=sys.stderr)
        print(shlex.join(plan.argv), file=sys.stderr)
        return run_plan(plan)
    except (ConfigError, HostfileError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
