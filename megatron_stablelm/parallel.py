"""Process groups: torch.distributed plus megatron-core's ``parallel_state`` for TP × DP.

Ranks are laid out as megatron-core does: consecutive ranks form a tensor-parallel group (so TP stays
inside a node), data parallelism runs across them. One process without any launcher gets a
single-rank gloo group, so the same model code runs in a notebook, a test and on a cluster.

This module says which processes work together (the groups); :mod:`megatron_stablelm.parallelize`,
despite the similar name, says how one built model runs (attention backend, recomputation) and
starts no process group.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import threading
import warnings

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def adopt_slurm_environment(environ: dict | None = None) -> bool:
    """Under ``srun`` with one task per GPU (DeepSpeed's ``--launcher slurm``), ranks learn who they are
    only from SLURM's variables; torch.distributed reads ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``. Map
    them when no launcher set those (and a rendezvous address was exported). Returns whether it did."""
    env = os.environ if environ is None else environ
    if "RANK" in env or "SLURM_PROCID" not in env or "MASTER_ADDR" not in env:
        return False
    tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")))
    if tasks < 2:
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = str(tasks)
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_PORT", "29500")
    return True


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def usable_backend(backend: str | None) -> str:
    """``backend`` (default: :func:`default_backend`), except that NCCL without CUDA falls back to gloo
    with one line on the first rank's stderr: a published GPU config (``distributed_backend: nccl``)
    then still runs a CPU smoke test instead of failing inside ``torch.cuda``."""
    backend = backend or default_backend()
    if backend == "nccl" and not torch.cuda.is_available():
        if os.environ.get("RANK", "0") == "0":
            print(
                "[parallel] distributed_backend 'nccl' needs CUDA, which this machine lacks: using gloo",
                file=sys.stderr,
                flush=True,
            )
        return "gloo"
    return backend


def initialize(tensor_parallel_size: int = 1, backend: str | None = None, timeout_minutes: int = 30) -> None:
    """Start torch.distributed (from the launcher's environment, or a single local rank) and build the
    TP/DP groups. Idempotent for the same TP size. ``backend`` 'nccl' on a machine without CUDA runs
    on gloo (:func:`usable_backend`)."""
    if not torch.cuda.is_available():
        # megatron-core's TP linears warn on every rank (twice under sequence parallelism) that
        # CUDA_DEVICE_MAX_CONNECTIONS should be 1 to overlap their communication with CUDA kernels: a
        # CUDA setting, meaningless without CUDA (with it the warning stays, and the launcher sets it)
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")
    # torch 2.13 deprecates the collectives megatron-core's TP layers and DeepSpeed's ZeRO call
    # (all_gather_into_tensor, reduce_scatter_tensor): a note to those libraries, not to the operator
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    if not dist.is_initialized():
        backend = usable_backend(backend)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            with _waiting_notice():
                dist.init_process_group(backend=backend, timeout=timeout)
        else:
            # No launcher: a single local rank. The environment is left untouched so that child
            # processes (tools, launchers) do not inherit a stale rendezvous address.
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://127.0.0.1:{_free_port()}",
                rank=0,
                world_size=1,
                timeout=timeout,
            )
    world = dist.get_world_size()
    if world % tensor_parallel_size:
        raise ValueError(f"model_parallel_size={tensor_parallel_size} does not divide the world size {world}")
    if parallel_state.model_parallel_is_initialized():
        if parallel_state.get_tensor_model_parallel_world_size() == tensor_parallel_size:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel_size)


RENDEZVOUS_NOTICE_ENV = "MEGATRON_STABLELM_RENDEZVOUS_NOTICE_S"


@contextlib.contextmanager
def _waiting_notice():
    """Say so when meeting the other ranks takes long (default 60 s, ``RENDEZVOUS_NOTICE_ENV``): a rank
    that never started, or a stale ``RANK``/``WORLD_SIZE`` in a shell, otherwise looks like a silent
    hang until the process-group timeout (30 minutes). A healthy start says nothing."""
    env = os.environ
    where = f"{env.get('MASTER_ADDR', '?')}:{env.get('MASTER_PORT', '?')}"
    seconds = float(env.get(RENDEZVOUS_NOTICE_ENV, "60"))

    def notice() -> None:
        print(
            f"[parallel] rank {env['RANK']} of {env['WORLD_SIZE']}: still waiting after {seconds:g} s for the "
            f"other ranks at {where} (MASTER_ADDR:MASTER_PORT); a rank that did not start, or RANK/WORLD_SIZE "
            "left in the environment of a one-process start?",
            file=sys.stderr,
            flush=True,
        )

    timer = threading.Timer(seconds, notice)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def allow_megatron_collectives_on_cpu() -> None:
    """Let megatron-core's sequence-parallel collectives run on a machine without CUDA (gloo, CPU
    tensors: the CPU smoke runs and tests of a TP layout).

    Why: its all-gather and reduce-scatter mappings, and the sequence-parallel linear's backward,
    allocate their output buffers on ``torch.cuda.current_device()``, which raises where CUDA is absent.
    There the function is made to name the CPU. Nothing changes on a machine with CUDA (the call is a
    no-op there), and where CUDA is absent the replaced function could only have raised. Idempotent."""
    if torch.cuda.is_available() or getattr(torch.cuda.current_device, "_megatron_stablelm_cpu", False):
        return

    def current_device() -> torch.device:
        return torch.device("cpu")

    current_device._megatron_stablelm_cpu = True  # type: ignore[attr-defined]
    torch.cuda.current_device = current_device


def destroy() -> None:
    """Tear down the groups (tests build several layouts in one process)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        release_deepspeed_shm_buffer(dist.get_rank())
        dist.destroy_process_group()


# DeepSpeed's CPU accelerator all-reduces through one POSIX shared-memory segment per rank when every
# rank is local (its launcher sets LOCAL_SIZE): ``/dev/shm/<prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``,
# 69 MB each, created in ``shm_initialize`` (deepspeed/ops/csrc/cpu/comm/shm.cpp) and never unlinked.
DEEPSPEED_SHM_PREFIX = "deepspeed_allreduce_buffer"
SHM_DIR = "/dev/shm"


def deepspeed_shm_buffer(rank: int, env: dict[str, str] | None = None) -> str:
    """Path of the shared-memory all-reduce buffer DeepSpeed's CPU backend creates for ``rank``."""
    env = os.environ if env is None else env
    name = f"{DEEPSPEED_SHM_PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"
    return os.path.join(SHM_DIR, name)


def release_deepspeed_shm_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer, if the run made one.

    Why: DeepSpeed never removes it, so every multi-rank CPU run under its launcher left 69 MB of RAM
    per rank in ``/dev/shm`` until reboot (a developer's machine had 5 GB of them after a day of test
    runs). Called at tear-down, after the last collective: every peer opened this segment at start-up
    (its initialisation waits until all have), and unlinking removes only the name, so any peer still
    mapping it keeps working. Where DeepSpeed made no segment (GPU runs, torchrun) nothing matches."""
    try:
        os.unlink(deepspeed_shm_buffer(rank))
    except FileNotFoundError:
        pass
    except OSError as err:  # never fail a finished run over a leftover buffer; say what stayed
        print(f"[parallel] could not remove {deepspeed_shm_buffer(rank)}: {err}", file=sys.stderr, flush=True)


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def tp_group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def dp_group() -> dist.ProcessGroup:
    return parallel_state.get_data_parallel_group()
