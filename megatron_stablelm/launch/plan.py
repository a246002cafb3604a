"""Config → the one launch command: the table of launchers and :func:`build_plan`.

Why: the launch settings live in the same GPT-NeoX YAML as the model (``launcher``, ``hostfile``,
``num_gpus``, ...). :func:`build_plan` resolves the launcher-independent part once
(:mod:`~megatron_stablelm.launch.request`) and hands it to the module of the chosen launcher, so a
``--dry-run`` shows exactly what a real launch runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from megatron_stablelm.config import Config
from megatron_stablelm.launch.deepspeed_runner import deepspeed_plan
from megatron_stablelm.launch.hostfile import slurm_nodelist
from megatron_stablelm.launch.request import (
    LaunchError,
    LaunchPlan,
    LaunchRequest,
    command_tail,
    default_job_dir,
    resolve_request,
)
from megatron_stablelm.launch.slurm import slurm_plan
from megatron_stablelm.launch.torchrun import torchrun_plan

# The accepted values of the config key ``launcher`` and the function building each one's command.
LAUNCHERS: dict[str, Callable[[LaunchRequest], LaunchPlan]] = {
    "local": deepspeed_plan,
    "pdsh": deepspeed_plan,
    "openmpi": deepspeed_plan,
    "mvapich": deepspeed_plan,
    "slurm": slurm_plan,
    "torchrun": torchrun_plan,
}


def build_plan(
    cfg: Config,
    config_paths: Sequence[str | Path],
    *,
    extra_args: Sequence[str] = (),
    script: str | Path | None = None,
    job_dir: str | Path | None = None,
    output_root: str | Path = "runs",
    environ: Mapping[str, str] | None = None,
    launcher_from_command_line: bool = False,
) -> LaunchPlan:
    """Turn a config into the exact launch command; reads the hostfile but writes nothing.

    A config's ``launcher: slurm`` outside an allocation runs on the named resources instead (see
    :func:`_outside_slurm`) unless ``launcher_from_command_line`` says the user typed ``--launcher``.

    Raises :class:`LaunchError` (or ``HostfileError``) for every request that cannot run: unknown
    launcher, hostfile without slots, unparsable node list, more nodes/GPUs than offered, ...
    """
    launcher = (cfg.launcher or "pdsh").lower()
    if launcher not in LAUNCHERS:
        raise LaunchError(
            f"key 'launcher': unknown value {cfg.launcher!r}; expected one of {', '.join(LAUNCHERS)}"
        )
    env_in = dict(os.environ if environ is None else environ)
    notes: list[str] = []
    if launcher == "slurm" and not launcher_from_command_line and slurm_nodelist(env_in) is None:
        launcher, note = _outside_slurm(cfg)
        notes.append(note)
    job_path = Path(job_dir).resolve() if job_dir else default_job_dir(config_paths, env_in, output_root)
    tail = command_tail(script, config_paths, extra_args)
    plan = LAUNCHERS[launcher](resolve_request(cfg, launcher, env_in, job_path, tail))
    plan.notes[:0] = notes
    return plan


def _outside_slurm(cfg: Config) -> tuple[str, str]:
    """The launcher that runs a config's ``launcher: slurm`` outside an allocation, and the line saying so.

    Why fall back rather than refuse: ``launcher: slurm`` in a shipped config says where the job is
    meant to run on the cluster, not that it can run nowhere else. Outside an allocation, resources
    named by the user (``num_gpus``, or a ``hostfile``) can only mean this machine or those ssh hosts,
    which is what the one-machine and ssh recipes of launch/README.md ask; the printed line says which
    launcher ran instead. With no resources named the request is ambiguous (a forgotten ``sbatch``
    would otherwise start on a login node), so it is refused naming the flags that decide. A
    ``--launcher slurm`` typed on the command line is always obeyed.
    """
    why = "launcher: slurm (from the config) but no SLURM allocation here (SLURM_JOB_NODELIST is not set)"
    if cfg.hostfile:
        return "pdsh", f"{why}: running as --launcher pdsh on the hosts of {cfg.hostfile}"
    if cfg.num_gpus is not None:
        return "local", f"{why}: running as --launcher local on this machine's {cfg.num_gpus} GPU(s)"
    raise LaunchError(
        f"{why}: submit it with sbatch/salloc, or run on this machine with --num-gpus N "
        "(or --launcher local), or on ssh hosts with --hostfile FILE"
    )


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
