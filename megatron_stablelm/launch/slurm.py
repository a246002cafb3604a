"""``launcher: slurm``: DeepSpeed inside a SLURM allocation, started per node by ``srun`` or by
DeepSpeed's own ``--launcher slurm``.

Why two ways: ``srun`` starting one ``deepspeed --no_ssh`` per node needs no ssh between nodes and
works on any cluster; ``deepspeed_slurm: true`` lets DeepSpeed call ``srun`` with one task per GPU,
which some sites require. Also home of :func:`srun_per_node`, the ``srun`` prefix that the
multi-node torchrun launch shares.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence

from megatron_stablelm.launch.request import (
    LaunchError,
    LaunchPlan,
    LaunchRequest,
    filter_flags,
    uniform_slots,
)


def srun_per_node(hosts: Sequence[str]) -> list[str]:
    """``srun`` starting exactly one task on each of ``hosts``; one failing task stops the job."""
    nnodes = len(hosts)
    return [
        "srun",
        f"--nodes={nnodes}",
        f"--ntasks={nnodes}",
        "--ntasks-per-node=1",
        f"--nodelist={','.join(hosts)}",
        "--kill-on-bad-exit=1",
    ]


def node_rank_shell(hosts: Sequence[str]) -> str:
    """Shell that sets NODE_RANK to this node's position in the hostfile, found by SLURM's node name.

    SLURM_NODEID would be shorter, but it counts in the *allocation's* order, which need not be the
    hostfile's; DeepSpeed numbers ranks by hostfile order, so the lookup is by name.
    """
    names = " ".join(shlex.quote(h) for h in hosts)
    return (
        f'NODE_RANK=-1; i=0; for h in {names}; do if [ "$h" = "$SLURMD_NODENAME" ]; then NODE_RANK=$i; fi; '
        "i=$((i+1)); done; "
    )


def _whole_prefix_slots(hosts: Mapping[str, list[int]], what: str) -> None:
    for host, slots in hosts.items():
        if slots != list(range(len(slots))):
            raise LaunchError(
                f"{what} cannot pin ranks to GPU ids {slots} on '{host}'; filter whole hosts or use num_gpus"
            )


def _deepspeed_slurm_plan(req: LaunchRequest, addr: str) -> LaunchPlan:
    """DeepSpeed's ``--launcher slurm``: run once, it calls ``srun`` with one task per GPU."""
    what = "DeepSpeed's slurm launcher"
    _whole_prefix_slots(req.hosts, what)
    per_node = uniform_slots(req.hosts, what)
    # DeepSpeed's SLURM runner exports neither MASTER_ADDR nor MASTER_PORT and passes no
    # --local_rank: train.py maps SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE.
    req.env.update(MASTER_ADDR=addr, MASTER_PORT=req.port)
    argv = [
        "deepspeed",
        "--hostfile",
        str(req.hostfile),
        "--launcher",
        "slurm",
        "--no_ssh_check",
        *filter_flags(req.cfg),
        "--master_addr",
        addr,
        "--master_port",
        req.port,
        "--launcher_args",
        f"--ntasks-per-node={per_node} --kill-on-bad-exit=1",
        *req.tail,
    ]
    return req.plan("slurm-deepspeed", argv, remote_env=req.remote_env())


def _per_node_plan(req: LaunchRequest, addr: str) -> LaunchPlan:
    """``srun`` one ``deepspeed --no_ssh --node_rank=N`` per node, N looked up by node name."""
    resources = [*filter_flags(req.cfg), "--master_addr", addr, "--master_port", req.port]
    script_text = (
        node_rank_shell(list(req.hosts))
        + "exec "
        + shlex.join(["deepspeed", "--hostfile", str(req.hostfile), "--no_ssh"])
        + ' --node_rank="$NODE_RANK" '
        + shlex.join(resources + req.tail)
    )
    argv = [*srun_per_node(list(req.hosts)), "bash", "-c", script_text]
    return req.plan("slurm-per-node", argv)


def slurm_plan(req: LaunchRequest) -> LaunchPlan:
    """The command of ``launcher: slurm``; the master is the first node unless configured."""
    addr = req.master_addr or next(iter(req.hosts))
    if req.cfg.deepspeed_slurm:
        return _deepspeed_slurm_plan(req, addr)
    return _per_node_plan(req, addr)
