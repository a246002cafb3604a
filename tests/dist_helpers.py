"""Run a function in N local processes joined by a gloo process group (CPU tests of TP/DP code)."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, errors) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    try:
        fn(rank, world, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        from megatron_stablelm import parallel

        parallel.destroy()


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 600) -> None:
    """``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; re-raises the first failure.
    ``fn`` must be importable (defined at module level of a test module)."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    if not errors.empty():
        raise RuntimeError(errors.get())
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"distributed worker exited with codes {bad}")
