"""``launcher: local | pdsh | openmpi | mvapich``: the ``deepspeed`` runner on this machine, or over
ssh/MPI with a hostfile.

Why a module: these are the launchers where DeepSpeed itself reaches the other hosts, so the
command carries the hostfile, the runner name and, for ranks on other hosts, a ``.deepspeed_env``.
"""

from __future__ import annotations

from megatron_stablelm.launch.request import LaunchError, LaunchPlan, LaunchRequest, filter_flags

DEEPSPEED_MULTINODE = ("pdsh", "openmpi", "mvapich")


def deepspeed_plan(req: LaunchRequest) -> LaunchPlan:
    """``deepspeed`` on this machine without a hostfile, else DeepSpeed's multi-node runner."""
    flags = [*filter_flags(req.cfg), "--master_port", req.port]
    if req.hostfile is None:
        return req.plan("single", ["deepspeed", *flags, *req.tail])
    if req.launcher == "local" and req.multi_host:
        raise LaunchError("launcher: local runs on this machine only, but the hostfile names several hosts")
    argv = ["deepspeed", "--hostfile", str(req.hostfile)]
    if req.launcher in DEEPSPEED_MULTINODE:
        argv += ["--launcher", req.launcher]
    master_addr = req.master_addr
    notes = []
    if not req.multi_host:
        # One host left: DeepSpeed starts the ranks on this machine without ssh, yet would still
        # ssh to the host to check it and to look up its address; neither is needed.
        argv += ["--no_ssh_check"]
        master_addr = master_addr or "127.0.0.1"
        notes.append("the hostfile leaves one host: DeepSpeed starts its ranks on this machine")
    argv += flags
    if master_addr:
        argv += ["--master_addr", master_addr]
    return req.plan("multinode", [*argv, *req.tail], remote_env=req.remote_env(), notes=notes)
