"""Helpers for the trainer tests: tiny configs, in-process distributed runs, ``train.py`` subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    seq_length=32,
    max_position_embeddings=64,
    rotary_pct=0.25,
    padded_vocab_size=256,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    no_weight_tying=True,
    mlp_type="gated",
    activation="silu",
    use_bias_in_attn_linear=False,
    use_qkv_bias=True,
    use_bias_in_mlp=False,
    optimizer={"type": "Adam", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8}},
    weight_decay=0.1,
    gradient_clipping=1.0,
    zero_optimization={"stage": 1},
    train_micro_batch_size_per_gpu=2,
    gradient_accumulation_steps=1,
    train_iters=5,
    lr_decay_style="cosine",
    warmup=0.2,
    min_lr=2e-4,
    log_interval=1,
    steps_per_print=0,
    eval_interval=0,
    eval_iters=1,
    seed=1234,
)


def tiny_dict(**overrides: Any) -> dict[str, Any]:
    out = dict(TINY)
    out.update(overrides)
    return out


def _synthetic_data(cfg, mask_every: int | None):
    """``make_data`` over SyntheticData; ``mask_every``: count only targets whose id is not divisible
    by it (uneven loss masks)."""
    from megatron_stablelm.training.synthetic import SyntheticData

    def make_data(req):
        data = SyntheticData(
            cfg.seq_length, cfg.padded_vocab(None), req.layout.micro, req.layout.accumulation,
            req.dp_rank, req.dp_size, 99,
        ).iterators(req.consumed_train_samples, req.consumed_valid_samples)  # fmt: skip
        if mask_every:
            data.train = (dict(b, loss_mask=(b["labels"] % mask_every != 0).float()) for b in data.train)
        return data

    return make_data


def _real_data(cfg):
    """``make_data`` over the real pipeline exactly as ``train.py`` builds it (tokenizer, indexed shards,
    megatron-core datasets, the DataLoader), and the padded vocabulary of the config's tokenizer."""
    from megatron_stablelm.data import build_tokenizer
    from train import _data_factory

    tokenizer = build_tokenizer(cfg)
    padded = cfg.padded_vocab(tokenizer.vocab_size)
    return _data_factory(cfg, tokenizer, padded, synthetic=False), padded


def _fault_hook(options: dict):
    """Injected non-finite losses or gradients: ``faults`` {iteration: "loss" | "grad"} and/or
    ``faults_from`` (first iteration, kind) for every iteration from there on."""
    faults = {int(k): v for k, v in (options.get("faults") or {}).items()}
    fault_from = options.get("faults_from")
    if not (faults or fault_from):
        return None

    def hook(iteration: int, micro: int, loss: torch.Tensor) -> torch.Tensor:
        kind = faults.get(iteration)
        if fault_from and iteration >= fault_from[0]:
            kind = fault_from[1]
        if kind == "loss":
            return loss * float("nan")
        if kind == "grad":
            return _NanGrad.apply(loss)
        return loss

    return hook


def train_worker(rank: int, world: int, cfg_values: dict, out_dir: str, options: dict | None = None) -> None:
    """Body of one rank (for ``dist_helpers.run_distributed``): train on synthetic data (or, with
    ``real_data``, the config's shards through the real pipeline) and write
    ``out_dir/rank{r}.json`` (losses, lrs, state) and, on rank 0, the final canonical weights."""
    options = options or {}
    torch.set_num_threads(1)
    from megatron_stablelm.config import config_from_dict
    from megatron_stablelm.training.loop import NonFiniteAbort, Trainer

    cfg = config_from_dict(cfg_values)
    if options.get("real_data"):
        make_data, padded = _real_data(cfg)
    else:
        make_data, padded = _synthetic_data(cfg, options.get("mask_every")), cfg.padded_vocab(None)
    hook = _fault_hook(options)
    logs: list[str] = []
    trainer = Trainer(cfg, make_data, padded_vocab=padded, log=logs.append, fault_hook=hook)
    record: dict[str, Any] = {}
    traffic = _count_save_traffic(trainer) if options.get("count_save_traffic") else None
    try:
        trainer.setup()
        result = trainer.train()
        record.update(
            exit_reason=result.exit_reason,
            losses={str(k): v for k, v in result.losses.items()},
            lrs={str(k): v for k, v in result.lrs.items()},
            state=result.state.as_dict(),
            checkpoints=result.checkpoints,
            evals=result.evals,
            test=result.test,
        )
    except NonFiniteAbort as err:
        record.update(exit_reason="nonfinite", error=str(err), state=trainer.state.as_dict())
    record["log"] = logs
    if traffic is not None:
        record["save_traffic"] = traffic
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))
    if options.get("save_weights") and record.get("exit_reason") != "nonfinite":
        full = _gather_canonical(trainer.model)
        if rank == 0:
            torch.save(full, Path(out_dir) / "weights.pt")


_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor", "gather",
                "scatter", "reduce_scatter_tensor", "all_to_all_single", "send", "recv")  # fmt: skip


def _count_save_traffic(trainer) -> dict[str, int]:
    """Bytes handed to torch.distributed's collectives while ``trainer.save`` runs (ours and
    DeepSpeed's, which calls the same module functions): what a save moves over the network."""
    import torch.distributed as dist

    counted = {"bytes": 0, "calls": 0}
    saving = [False]

    def counting(original):
        def wrapped(*args, **kwargs):
            if saving[0]:  # the data argument comes first, by position or by name (DeepSpeed's comm)
                first = args[0] if args else next(iter(kwargs.values()))
                tensors = first if isinstance(first, (list, tuple)) else [first]
                counted["bytes"] += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
                counted["calls"] += 1
            return original(*args, **kwargs)

        return wrapped

    for name in _COLLECTIVES:
        setattr(dist, name, counting(getattr(dist, name)))
    save = trainer.save

    def counting_save(reason: str):
        saving[0] = True
        try:
            return save(reason)
        finally:
            saving[0] = False

    trainer.save = counting_save
    return counted


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _gather_canonical(model) -> dict[str, torch.Tensor]:
    """Whole-model tensors (merged over TP ranks), on every rank."""
    import torch.distributed as dist

    from megatron_stablelm import parallel

    out = {}
    size = parallel.tp_size()
    for name, param in model.named_parameters():
        local = param.detach().float().contiguous()
        spec = model.splits[name]
        if size > 1 and spec.dim is not None:
            parts = [torch.empty_like(local) for _ in range(size)]
            dist.all_gather(parts, local, group=parallel.tp_group())
            out[name] = spec.merge(parts)
        else:
            out[name] = local.clone()
    return out


def deterministic_env() -> None:
    """Bitwise-reproducible CPU math in the processes spawned from here: MKL's BLAS otherwise picks
    code paths by memory alignment (results differ in the last bit from run to run), and one thread
    per process avoids oversubscribing the 2-core CI machines."""
    os.environ["MKL_CBWR"] = "COMPATIBLE"
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["PYTHONWARNINGS"] = "ignore"


def run_ranks(world: int, cfg_values: dict, out_dir: Path, **options: Any) -> list[dict]:
    """Train in ``world`` spawned gloo processes; returns each rank's record."""
    from tests.dist_helpers import run_distributed

    deterministic_env()
    run_distributed(train_worker, world, cfg_values, str(out_dir), options)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def losses(record: dict) -> list[float]:
    return [record["losses"][k] for k in sorted(record["losses"], key=int)]


def write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def train_cmd(*configs: Path | str, overrides: list[str] | None = None, synthetic: bool = True) -> list[str]:
    cmd = [sys.executable, str(REPO / "train.py"), *map(str, configs)]
    if synthetic:
        cmd.append("--synthetic-data")
    if overrides:
        cmd += ["--override", *overrides]
    return cmd


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    env["MKL_CBWR"] = "COMPATIBLE"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_train(*configs, overrides=None, synthetic=True, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(*configs, overrides=overrides, synthetic=synthetic),
        cwd=REPO,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tree_digest(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``root``: to prove a failed run changed nothing."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def saved_activation_bytes(model: torch.nn.Module, forward) -> int:
    """Bytes of the tensors autograd keeps for backward while ``forward()`` runs (each storage once,
    the parameters left out), then backward from the sum of what it returns: the activation memory of
    a micro-batch, measured."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.sum().backward()
    return sum(storages.values())
