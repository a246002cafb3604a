"""The launcher-independent half of a launch: which GPUs, which job directory, which environment.

Why separate: every launcher (deepspeed, srun, torchrun) needs the same validated facts — the
resource pool (hostfile, SLURM allocation or this machine) trimmed by ``include``/``exclude``/
``num_nodes``/``num_gpus``, the job directory, the environment for the ranks and the command tail
(``train.py CONFIG... ARGS``). They are computed once here, without side effects, so that each
launcher module only turns a :class:`LaunchRequest` into its own command line.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from megatron_stablelm.config import Config
from megatron_stablelm.launch.hostfile import (
    apply_filter,
    expand_nodelist,
    read_hostfile,
    slurm_gpus_per_node,
    slurm_nodelist,
)
from megatron_stablelm.signals import JOB_DIR_ENV

# train.py lives at the repository root, next to this package.
DEFAULT_SCRIPT = Path(__file__).resolve().parents[2] / "train.py"
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


class ResourcePool(NamedTuple):
    """GPUs on offer before filtering: host -> slots, the hostfile naming them, where they came from."""

    slots: dict[str, int]
    hostfile: Path
    to_write: dict[str, int] | None  # set when the hostfile is generated from SLURM's node list
    source: str  # for error messages


@dataclasses.dataclass
class LaunchRequest:
    """The validated facts every launcher builds its command from."""

    cfg: Config
    launcher: str  # lower-cased, one of plan.LAUNCHERS
    tail: list[str]  # training script, config files, train.py arguments
    job_dir: Path
    env: dict[str, str]  # set for the launcher: job dir, CUDA_DEVICE_MAX_CONNECTIONS
    passthrough: dict[str, str]  # the caller's NCCL_* variables
    hosts: dict[str, list[int]]  # host -> GPU ids; {} when DeepSpeed detects them on this machine
    pool: ResourcePool | None  # None: no hostfile, the ranks run on this machine
    master_addr: str | None  # configured, or the first host of a multi-host pool
    in_slurm: bool  # inside a SLURM allocation (a node list is set)
    slurm_job_id: str | None

    @property
    def hostfile(self) -> Path | None:
        return self.pool.hostfile if self.pool is not None else None

    @property
    def port(self) -> str:
        return str(self.cfg.master_port)

    @property
    def multi_host(self) -> bool:
        return len(self.hosts) > 1

    def remote_env(self) -> dict[str, str]:
        """What ranks on other hosts need: the caller's NCCL_* plus ours (ours win)."""
        return {**self.passthrough, **self.env}

    def plan(
        self, mode: str, argv: list[str], remote_env: dict[str, str] | None = None, notes: Sequence[str] = ()
    ) -> LaunchPlan:
        """The :class:`LaunchPlan` of this request run by ``argv``."""
        return LaunchPlan(
            mode,
            argv,
            self.env,
            remote_env or {},
            self.job_dir,
            self.hosts,
            self.hostfile,
            self.pool.to_write if self.pool is not None else None,
            list(notes),
        )


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


def filter_flags(cfg: Config) -> list[str]:
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


def uniform_slots(hosts: Mapping[str, list[int]], what: str) -> int:
    """The GPUs per node of launchers that start the same number of ranks on every node."""
    counts = {len(s) for s in hosts.values()}
    if len(counts) != 1:
        raise LaunchError(
            f"{what} needs the same number of GPUs on every node, got "
            + ", ".join(f"{h}: {len(s)}" for h, s in hosts.items())
        )
    return counts.pop()


def _check_keys(cfg: Config) -> None:
    """Combinations of launch keys DeepSpeed rejects (each value's range is the config's to check)."""
    if cfg.include and cfg.exclude:
        raise LaunchError("keys 'include' and 'exclude' cannot both be set")
    if (cfg.include or cfg.exclude) and (cfg.num_nodes is not None or cfg.num_gpus is not None):
        raise LaunchError(
            "keys 'include'/'exclude' cannot be combined with 'num_nodes'/'num_gpus' (DeepSpeed forbids it)"
        )


def _slurm_pool(cfg: Config, environ: Mapping[str, str], job_dir: Path) -> ResourcePool:
    """The SLURM allocation as a pool; its hostfile is written into the job directory at launch."""
    nodelist = slurm_nodelist(environ)
    if nodelist is None:
        raise LaunchError(
            "launcher: slurm must run inside a SLURM allocation (sbatch/salloc): SLURM_JOB_NODELIST is not set"
        )
    hosts = expand_nodelist(nodelist)
    granted = slurm_gpus_per_node(environ)
    slots = granted if granted is not None else cfg.num_gpus
    if slots is None:
        raise LaunchError(
            "cannot tell how many GPUs each node has: SLURM_GPUS_ON_NODE/SLURM_GPUS_PER_NODE are unset; "
            "request GPUs with --gpus-per-node or set num_gpus"
        )
    pool = {host: slots for host in hosts}
    return ResourcePool(pool, job_dir / "hostfile", pool, f"the SLURM allocation ({nodelist})")


def _resource_pool(
    cfg: Config, launcher: str, environ: Mapping[str, str], job_dir: Path
) -> ResourcePool | None:
    """The configured hostfile, else the SLURM allocation for SLURM launches, else None (this machine)."""
    if cfg.hostfile:
        hostfile = Path(cfg.hostfile).resolve()
        return ResourcePool(read_hostfile(hostfile), hostfile, None, f"hostfile {hostfile}")
    in_slurm = slurm_nodelist(environ) is not None
    if launcher == "slurm" or (launcher == "torchrun" and in_slurm):
        return _slurm_pool(cfg, environ, job_dir)
    return None


def _trim(active: dict[str, list[int]], cfg: Config, source: str) -> dict[str, list[int]]:
    """Apply ``num_nodes``/``num_gpus`` the way DeepSpeed does (first N hosts, GPUs 0..n-1), but fail
    when the hosts do not have them: DeepSpeed would start ranks on GPUs that do not exist."""
    if cfg.num_nodes is not None:
        if cfg.num_nodes > len(active):
            raise LaunchError(
                f"num_nodes={cfg.num_nodes} but {source} offers {len(active)} host(s): {', '.join(active)}"
            )
        active = dict(list(active.items())[: cfg.num_nodes])
    if cfg.num_gpus is not None:
        for host, slots in active.items():
            if cfg.num_gpus > len(slots):
                raise LaunchError(
                    f"num_gpus={cfg.num_gpus} per node but {source} gives host '{host}' only {len(slots)} slot(s)"
                )
        active = {host: list(range(cfg.num_gpus)) for host in active}
    return active


def _active_hosts(cfg: Config, pool: ResourcePool | None) -> dict[str, list[int]]:
    """host -> GPU ids that run ranks; without a pool, this machine's ``num_gpus`` (or {}: all)."""
    if pool is not None:
        return _trim(apply_filter(pool.slots, cfg.include, cfg.exclude), cfg, pool.source)
    if cfg.num_nodes is not None and cfg.num_nodes > 1:
        raise LaunchError(
            f"num_nodes={cfg.num_nodes} needs a hostfile (key 'hostfile') or launcher: slurm inside an allocation"
        )
    return {"localhost": list(range(cfg.num_gpus))} if cfg.num_gpus else {}


def _check_tp_per_node(cfg: Config, hosts: Mapping[str, list[int]], pool: ResourcePool | None) -> None:
    """Each node must run whole tensor-parallel groups: ranks are numbered node by node and a TP group is
    ``model_parallel_size`` consecutive ranks, so any other count puts a group across two nodes (its
    all-reduces in every layer over the network) or leaves a world size TP does not divide."""
    tp = cfg.model_parallel_size
    for host, gpus in hosts.items():
        if len(gpus) % tp:
            if pool is None:
                given = f"num_gpus={cfg.num_gpus} on this machine"
            else:
                trimmed = f", num_gpus={cfg.num_gpus}" if cfg.num_gpus is not None else ""
                given = f"slots={pool.slots[host]} in {pool.source}{trimmed}"
            raise LaunchError(
                f"host '{host}' runs {len(gpus)} rank(s) ({given}), not a multiple of model_parallel_size="
                f"{tp}: a tensor-parallel group of {tp} consecutive ranks must sit on one node"
            )


def command_tail(
    script: str | Path | None, config_paths: Sequence[str | Path], extra_args: Sequence[str]
) -> list[str]:
    """``train.py CONFIG... ARGS`` with absolute paths, as every launcher ends its command."""
    script_path = Path(script).resolve() if script else DEFAULT_SCRIPT
    return [str(script_path), *[str(Path(p).resolve()) for p in config_paths], *extra_args]


def resolve_request(
    cfg: Config, launcher: str, environ: Mapping[str, str], job_dir: Path, tail: list[str]
) -> LaunchRequest:
    """Validate the launch keys and resolve hosts and environment; reads the hostfile, writes nothing.

    Raises :class:`LaunchError` (or ``HostfileError``) for a request that cannot run: hostfile
    without slots, unparsable node list, more nodes/GPUs than offered, a node's GPU count that TP does
    not divide, conflicting keys, ...
    """
    _check_keys(cfg)
    env: dict[str, str] = {JOB_DIR_ENV: str(job_dir)}
    if cfg.model_parallel_size > 1:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    passthrough = {k: v for k, v in sorted(environ.items()) if k.startswith(PASS_THROUGH_PREFIXES)}
    pool = _resource_pool(cfg, launcher, environ, job_dir)
    hosts = _active_hosts(cfg, pool)
    _check_tp_per_node(cfg, hosts, pool)
    master_addr = cfg.master_addr or (next(iter(hosts)) if pool is not None and len(hosts) > 1 else None)
    in_slurm = slurm_nodelist(environ) is not None
    job_id = environ.get("SLURM_JOB_ID")
    return LaunchRequest(
        cfg, launcher, tail, job_dir, env, passthrough, hosts, pool, master_addr, in_slurm, job_id
    )
