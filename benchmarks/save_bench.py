#!/usr/bin/env python
"""How long a checkpoint save stops training, synchronous against ``async_save``, on CPU at DP=2.

Two gloo ranks train a 12-layer, hidden-768 model with a 32k untied vocabulary (about 135M
parameters, fp32, ZeRO-1) on synthetic tokens and save at two iterations. For each save it reports
the time the step boundary was held (``blocked``: the trainer's ``save`` call) and the time until the
checkpoint was published (``total``), both from the same run's clock, plus the bytes each rank wrote.
Both modes run in one call, one after the other, on the same machine::

    python benchmarks/save_bench.py [--out DIR] [--layers 12] [--hidden 768]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

VOCAB = 32768


def _config(args: argparse.Namespace, save: Path, async_save: bool) -> dict:
    return dict(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.hidden // 64,
        seq_length=128, max_position_embeddings=128, padded_vocab_size=VOCAB, no_weight_tying=True,
        mlp_type="gated", activation="silu", hidden_dropout=0.0, attention_dropout=0.0,
        optimizer={"type": "Adam", "params": {"lr": 1e-4}}, zero_optimization={"stage": 1},
        train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1, train_iters=args.iters,
        extra_save_iters=[2, 4], lr_decay_style="constant", warmup=0.0, log_interval=1000,
        steps_per_print=0, eval_interval=0, eval_iters=0, seed=1, save=str(save), async_save=async_save,
    )  # fmt: skip


def _rank(rank: int, world: int, port: int, values: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from megatron_stablelm import parallel
    from megatron_stablelm.config import config_from_dict
    from megatron_stablelm.training.loop import Trainer
    from megatron_stablelm.training.synthetic import SyntheticData

    cfg = config_from_dict(values)

    def make_data(req):
        return SyntheticData(
            cfg.seq_length, VOCAB, req.layout.micro, req.layout.accumulation, req.dp_rank, req.dp_size, 7
        ).iterators(req.consumed_train_samples, req.consumed_valid_samples)

    lines: list[str] = []
    trainer = Trainer(cfg, make_data, padded_vocab=VOCAB, log=lines.append)
    blocked: list[float] = []
    save = trainer.save

    def timed_save(reason: str) -> bool:
        start = time.perf_counter()
        try:
            return save(reason)
        finally:
            blocked.append(time.perf_counter() - start)

    trainer.save = timed_save
    trainer.setup()
    started = time.perf_counter()
    trainer.train()
    steps = trainer._step_seconds
    if rank == 0:
        published = [
            float(m.group(1)) for m in map(re.compile(r"\] saved .* in ([0-9.]+)s$").search, lines) if m
        ]
        record = dict(
            blocked=blocked, total=published, step_seconds=steps, run_seconds=time.perf_counter() - started
        )
        Path(out).write_text(json.dumps(record))
    parallel.destroy()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_mode(args: argparse.Namespace, root: Path, async_save: bool) -> dict:
    save = root / ("async" if async_save else "sync")
    out = root / f"{save.name}.json"
    values = _config(args, save, async_save)
    mp.start_processes(_rank, args=(2, _free_port(), values, str(out)), nprocs=2, start_method="spawn")
    record = json.loads(out.read_text())
    ckpt = save / "iter_0000004"
    record["bytes_per_rank"] = {
        p.name: p.stat().st_size for p in sorted(ckpt.iterdir()) if p.name.startswith(("optim_", "model_"))
    }
    shutil.rmtree(save)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="where checkpoints go (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = Path(tempfile.mkdtemp(dir=args.out))
    results = {mode: run_mode(args, root, mode == "async") for mode in ("sync", "async")}
    params = (
        args.layers * (4 * args.hidden**2 + 3 * args.hidden * (8 * args.hidden // 3))
        + 2 * VOCAB * args.hidden
    )
    print(
        f"model: ~{params / 1e6:.0f}M parameters, fp32, ZeRO-1, DP=2 (gloo, CPU); saves at iterations 2 and 4"
    )
    for mode, rec in results.items():
        print(
            f"{mode:5s}: step held {statistics.mean(rec['blocked']):.2f} s per save "
            f"({', '.join(f'{b:.2f}' for b in rec['blocked'])}); published after "
            f"{', '.join(f'{t:.2f}' for t in rec['total'])} s; mean step {rec['step_seconds'] / args.iters:.2f} s; "
            f"whole run {rec['run_seconds']:.1f} s"
        )
    print("files of one checkpoint (bytes): " + json.dumps(results["sync"]["bytes_per_rank"]))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
