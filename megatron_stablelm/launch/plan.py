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
) -> LaunchPlan:
    """Turn a config into the exact launch command; reads the hostfile but writes nothing.

    Raises :class:`LaunchError` (or ``HostfileError``) for every request that cannot run: unknown
    launcher, hostfile without slots, unparsable node list, more nodes/GPUs than offered, ...
    """
    launcher = (cfg.launcher or "pdsh").lower()
    if launcher not in LAUNCHERS:
        raise LaunchError(
            f"key 'launcher': unknown value {cfg.launcher!r}; expected one of {', '.join(LAUNCHERS)}"
        )
    env_in = dict(os.environ if environ is None else environ)
    job_path = Path(job_dir).resolve() if job_dir else default_job_dir(config_paths, env_in, output_root)
    tail = command_tail(script, config_paths, extra_args)
    return LAUNCHERS[launcher](resolve_request(cfg, launcher, env_in, job_path, tail))


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
