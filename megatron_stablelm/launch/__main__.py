"""Start ``train.py`` through ``deepspeed`` or ``torchrun`` from a run's config files.

Why a front-end: the launch settings live in the same GPT-NeoX YAML as the model (``launcher``,
``hostfile``, ``num_gpus``, ...), and turning them into a correct ``deepspeed``/``srun``/``torchrun``
line by hand is where multi-node jobs go wrong. This command validates the whole resource request
(hostfile, SLURM node list, include/exclude, GPU counts) before anything starts, builds the one
command, records it with the resolved config in a per-job directory, and runs it.

Usage::

    python -m megatron_stablelm.launch CONFIG [CONFIG ...] [--dry-run] [--job-dir DIR] [-- train.py args]

Modes, chosen by the config's ``launcher``:

``local``
    one machine: ``deepspeed [--num_gpus N] train.py ...``.
``pdsh`` (GPT-NeoX's default), ``openmpi``, ``mvapich``
    with a ``hostfile``: DeepSpeed's multi-node runner of that name; without one, as ``local``.
``slurm``
    inside an allocation. The hostfile is written from ``SLURM_JOB_NODELIST`` (unless one is given)
    and the master is the first node. ``deepspeed_slurm: true`` uses DeepSpeed's own
    ``--launcher slurm`` (one srun task per GPU, started once); otherwise ``srun`` starts one
    ``deepspeed --no_ssh`` per node, which needs no ssh between nodes. A config's ``launcher: slurm``
    outside an allocation runs as ``local`` with ``--num-gpus``, as ``pdsh`` with a hostfile (one
    ``#`` line says so), and is refused naming those flags without either.
``torchrun``
    one machine: ``torchrun --nproc_per_node N``; inside a multi-node SLURM allocation, one
    ``torchrun`` per node through ``srun`` with a c10d rendezvous on the first node.

Environment: ``NCCL_*`` variables reach remote ranks through a ``.deepspeed_env`` file in the job
directory (``DS_ENV_FILE`` points DeepSpeed at it); srun and local launches inherit the environment.
``CUDA_DEVICE_MAX_CONNECTIONS=1`` is set when ``model_parallel_size > 1``: megatron-core's tensor-parallel
communication overlap relies on kernels being issued in order. ``MEGATRON_STABLELM_JOB_DIR`` names
the job directory for ``train.py``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from megatron_stablelm.cli import add_config_arguments, overrides_from, parse_config_args
from megatron_stablelm.config import ConfigError, load_config
from megatron_stablelm.launch.hostfile import HostfileError
from megatron_stablelm.launch.job import prepare_job_dir, run_plan
from megatron_stablelm.launch.plan import LAUNCHERS, build_plan, describe
from megatron_stablelm.launch.request import DEFAULT_SCRIPT, LaunchError, LaunchPlan

# Config keys that command-line options of the same name (with '-') override.
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


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Split ``argv`` at ``--``: before are ours, after go to train.py unchanged."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m megatron_stablelm.launch",
        description="Launch train.py with deepspeed/torchrun from GPT-NeoX-style configs.",
        epilog="Arguments after -- are passed to train.py unchanged.",
    )
    add_config_arguments(parser)  # CONFIG... and --override KEY=VALUE ..., as every tool takes them
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("--job-dir", help="per-job output directory (default: OUTPUT_ROOT/<name>-<id|time>)")
    parser.add_argument("--output-root", default="runs", help="parent of default job directories")
    parser.add_argument("--script", help=f"training script (default: {DEFAULT_SCRIPT})")
    group = parser.add_argument_group("overrides of the config's launch keys")
    group.add_argument("--launcher", choices=tuple(LAUNCHERS))
    group.add_argument("--hostfile")
    group.add_argument("--include")
    group.add_argument("--exclude")
    group.add_argument("--num-gpus", type=int)
    group.add_argument("--num-nodes", type=int)
    group.add_argument("--master-addr")
    group.add_argument("--master-port", type=int)
    return parse_config_args(parser, argv), extra


def _print_description(plan: LaunchPlan) -> None:
    for line in describe(plan):
        print(f"# {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exit status 2 with a one-line message for bad configs or resources."""
    args, extra = parse_args(argv)
    options = [f"{k}={getattr(args, k)}" for k in _OVERRIDABLE if getattr(args, k) is not None]
    if overrides_from(args):  # train.py must see the same config: pass the overrides on
        extra = ["--override", *overrides_from(args), *extra]
    try:
        cfg = load_config(args.configs, [*overrides_from(args), *options], report_ignored=False)
        for key, why in sorted(cfg.ignored_keys.items()):
            print(f"# [config] ignoring '{key}': {why}", file=sys.stderr)
        plan = build_plan(
            cfg,
            args.configs,
            extra_args=extra,
            script=args.script,
            job_dir=args.job_dir,
            output_root=args.output_root,
            launcher_from_command_line=args.launcher is not None,
        )
        if args.dry_run:
            _print_description(plan)
            print(shlex.join(plan.argv))
            return 0
        script = Path(args.script).resolve() if args.script else DEFAULT_SCRIPT
        if not script.is_file():
            raise LaunchError(f"training script not found: {script}")
        prepare_job_dir(plan, cfg)
        _print_description(plan)
        print(shlex.join(plan.argv), file=sys.stderr)
        return run_plan(plan)
    except (ConfigError, HostfileError, LaunchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
