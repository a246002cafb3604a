"""``launcher: torchrun``: ``torchrun`` on this machine, or one ``torchrun`` per node under ``srun``.

Why: torchrun needs no DeepSpeed runner, no hostfile and no ssh; across nodes it needs one process
per node and a rendezvous, which inside a SLURM allocation ``srun`` and a c10d store on the first
node provide.
"""

from __future__ import annotations

from megatron_stablelm.launch.request import LaunchError, LaunchPlan, LaunchRequest, uniform_slots
from megatron_stablelm.launch.slurm import srun_per_node


def torchrun_plan(req: LaunchRequest) -> LaunchPlan:
    """The command of ``launcher: torchrun`` (``--nproc_per_node=gpu`` when no count is known)."""
    cfg = req.cfg
    if cfg.include or cfg.exclude:
        raise LaunchError("include/exclude need the deepspeed launcher; with torchrun use num_gpus/num_nodes")
    if not req.multi_host:
        nproc = str(len(next(iter(req.hosts.values())))) if req.hosts else "gpu"
        argv = [
            "torchrun",
            "--nnodes=1",
            f"--nproc_per_node={nproc}",
            f"--master_addr={cfg.master_addr or '127.0.0.1'}",
            f"--master_port={req.port}",
            *req.tail,
        ]
        return req.plan("torchrun", argv)
    if not req.in_slurm:
        raise LaunchError(
            "torchrun across several hosts is started per node by SLURM here; run inside an allocation "
            "or use launcher: pdsh with the hostfile"
        )
    argv = [
        *srun_per_node(list(req.hosts)),
        "torchrun",
        f"--nnodes={len(req.hosts)}",
        f"--nproc_per_node={uniform_slots(req.hosts, 'torchrun')}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={req.master_addr}:{req.port}",
        f"--rdzv_id={req.slurm_job_id or 'megatron_stablelm'}",
        *req.tail,
    ]
    return req.plan("slurm-torchrun", argv)
