"""Full training checkpoints: model shards, optimizer state, schedule position, data position, RNG.

Layout (beside what :mod:`megatron_stablelm.checkpointing` writes)::

    SAVE/
        latest                          name of the newest complete checkpoint
        iter_0000100/
            config.yml, model_meta.json, model_tpNN.safetensors      (checkpointing.py)
            optim_tpNN_dpMMM.safetensors   Adam moments (+ fp32 master weights for bf16/fp16)
            train_state.json               iteration, consumed samples/tokens, Adam step, loss scaler
            rng_rank00000.pt ...           RNG states of every rank

Optimizer state is stored per *parameter* under canonical names, in each tensor-parallel rank's
shard layout, gathered over the data-parallel group (DeepSpeed's ``safe_get_full_optimizer_state``).
It is therefore independent of the data-parallel size and of ZeRO's flat partitioning: a checkpoint
loads at any DP size and any ZeRO stage, and at another TP size by merging and re-splitting each
tensor with the same rules as the weights (:mod:`megatron_stablelm.sharding`). The DP ranks share the
writing (parameter ``i`` is written by DP rank ``i % dp``).

Atomicity with many ranks: everything is written into ``SAVE/.iter_N.tmp``; after a barrier, global
rank 0 fsyncs, renames it to ``iter_N`` and then replaces ``latest``. A crash (or SIGKILL) at any point
leaves the previous checkpoint and ``latest`` untouched; the stale temporary directory is removed by the
next save.
"""

from __future__ import annotations

import glob
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_stablelm import checkpointing as ckpt
from megatron_stablelm import parallel
from megatron_stablelm.config import Config
from megatron_stablelm.sharding import shard_spec
from megatron_stablelm.training.optimizer import adam_step, materialize_state, set_adam_step

TRAIN_STATE_FILE = "train_state.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MASTER_KEY = "fp32"
TRAIN_FORMAT = 1

# Fields whose difference makes a checkpoint unusable for a config (shapes or the function computed).
ARCH_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "kv_heads",
    "ffn_hidden_size",
    "mlp_type",
    "act_fn_name",
    "norm",
    "layernorm_epsilon",
    "pos_emb",
    "rotary_pct",
    "rotary_emb_base",
    "gpt_j_residual",
    "gpt_j_tied",
    "qk_norm",
    "use_bias_in_norms",
    "use_bias_in_qk_norm",
    "qkv_bias",
    "dense_bias",
    "use_bias_in_mlp",
    "tied_embeddings",
)


def optim_filename(tp_rank: int, dp_rank: int) -> str:
    return f"optim_tp{tp_rank:02d}_dp{dp_rank:03d}.safetensors"


def rng_filename(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


# ----------------------------------------------------------------------------- small distributed utils
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- inspection (before init)
@dataclass
class CheckpointInfo:
    """What :func:`inspect_checkpoint` found; everything needed to decide before building anything."""

    path: Path
    meta: dict
    config: Config
    train_state: dict | None  # None: weights only (e.g. converted from Hugging Face)
    warnings: list[str] = field(default_factory=list)

    @property
    def iteration(self) -> int:
        return int(self.train_state["iteration"]) if self.train_state else 0


def architecture_differences(saved: Config, current: Config) -> list[str]:
    """``key: checkpoint X, config Y`` for every architecture field that differs."""
    out = []
    for key in ARCH_FIELDS:
        a, b = getattr(saved, key), getattr(current, key)
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, config {b!r}")
    return out


def inspect_checkpoint(cfg: Config, path: str | Path, padded_vocab: int | None = None) -> CheckpointInfo:
    """Resolve ``path`` (a checkpoint or a run directory with ``latest``; ``cfg.iteration`` picks a
    specific one) and check that it can be loaded into the model ``cfg`` describes. Raises
    :class:`~megatron_stablelm.checkpointing.CheckpointError` with the path and the differences."""
    path = Path(path)
    if cfg.iteration is not None and (path / ckpt.iteration_dirname(cfg.iteration)).is_dir():
        path = path / ckpt.iteration_dirname(cfg.iteration)
    elif cfg.iteration is not None and not (path / ckpt.META_FILE).is_file():
        raise ckpt.CheckpointError(
            f"iteration {cfg.iteration} requested but {path} has no {ckpt.iteration_dirname(cfg.iteration)}"
        )
    directory = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(directory)
    saved_cfg = ckpt.read_config(directory)
    info = CheckpointInfo(directory, meta, saved_cfg, None)
    if not cfg.no_checkpoint_arg_validation:
        diffs = architecture_differences(saved_cfg, cfg)
        if diffs:
            raise ckpt.CheckpointError(
                f"{directory}: the checkpoint's architecture differs from the config:\n  "
                + "\n  ".join(diffs)
                + "\n(set no_checkpoint_arg_validation: true only if you know the shapes still match)"
            )
    if padded_vocab is not None and meta["padded_vocab_size"] != padded_vocab:
        raise ckpt.CheckpointError(
            f"{directory}: the checkpoint's padded vocabulary is {meta['padded_vocab_size']} rows but the "
            f"config gives {padded_vocab} (set padded_vocab_size: {meta['padded_vocab_size']})"
        )
    state_file = directory / TRAIN_STATE_FILE
    if state_file.is_file():
        info.train_state = json.loads(state_file.read_text())
        if info.train_state.get("format") != TRAIN_FORMAT:
            raise ckpt.CheckpointError(
                f"{state_file}: unsupported training-state format {info.train_state.get('format')}"
            )
        for tp_rank in range(meta["tp_size"]):
            if info.train_state.get("has_optimizer") and not glob.glob(
                str(directory / f"optim_tp{tp_rank:02d}_dp*.safetensors")
            ):
                raise ckpt.CheckpointError(f"{directory}: optimizer files for TP rank {tp_rank} are missing")
    return info


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Every generator a training step can draw from, for this rank."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (
            np_state[0],
            torch.from_numpy(np_state[1].copy()),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core import tensor_parallel

            state["cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
        except Exception:
            pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
        if "cuda_tracker" in state:
            from megatron.core import tensor_parallel

            tensor_parallel.get_cuda_rng_tracker().set_states(state["cuda_tracker"])


def _tuplify(value):
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_tuplify(v) for v in value)
    return value


# ----------------------------------------------------------------------------- optimizer state access
def _linked(engine) -> None:
    """(Re)build DeepSpeed's per-parameter views into its flat optimizer state. DeepSpeed builds them
    once, right after stepping the *first* parameter group, when the other groups' state does not
    exist yet; with two groups (decay / no decay) the second group's views would stay empty. Rebuilding
    is cheap (views, no copies) and idempotent. Requires the state to exist (see _ensure_state)."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _full_state(engine, hp: bool, base_optimizer, param: torch.nn.Parameter, key: str) -> torch.Tensor:
    """This TP rank's whole shard of ``key`` for ``param`` (collective over the DP group when ``hp``)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if hp:
        if key == MASTER_KEY:
            value = safe_get_full_fp32_param(param)
        else:
            value = safe_get_full_optimizer_state(param, key)
        return value.detach().float().cpu().contiguous()
    if key == MASTER_KEY:
        return param.detach().float().cpu().contiguous()
    return base_optimizer.state[param][key].detach().float().cpu().contiguous()


def _set_state(
    engine, hp: bool, base_optimizer, param: torch.nn.Parameter, key: str, value: torch.Tensor
) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(device=param.device, dtype=torch.float32)
    if hp:
        if key == MASTER_KEY:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    if key == MASTER_KEY:
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        return
    base_optimizer.state[param][key].copy_(value)


def _loss_scaler_state(engine) -> dict | None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None:
        return None
    out = {}
    for name in ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis"):
        value = getattr(scaler, name, None)
        if isinstance(value, (int, float)) or torch.is_tensor(value):
            out[name] = float(value) if not isinstance(value, int) else value
    return out


def _set_loss_scaler_state(engine, state: dict | None) -> None:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None or not state:
        return
    for name, value in state.items():
        old = getattr(scaler, name, None)
        if torch.is_tensor(old):
            old.fill_(value)
        elif old is not None:
            setattr(scaler, name, type(old)(value))


# ----------------------------------------------------------------------------- save
_STALL_ENV = "MEGATRON_STABLELM_TEST_SAVE_STALL"


def _stall_seconds(iteration: int) -> float:
    """Test hook for the crash-safety tests: ``ITERATION:SECONDS`` makes the save of that iteration
    sleep after the model files are written, i.e. in the middle of the save, so a test can SIGKILL it."""
    spec = os.environ.get(_STALL_ENV, "")
    if not spec:
        return 0.0
    it, _, seconds = spec.partition(":")
    return float(seconds) if int(it) == iteration else 0.0


def save_training_checkpoint(
    root: str | Path,
    *,
    cfg: Config,
    model: torch.nn.Module,
    engine,
    base_optimizer: torch.optim.Optimizer,
    hp: bool,
    padded_vocab: int,
    train_state: dict[str, Any],
) -> Path:
    """Collective: every rank calls it. Returns the published directory."""
    root = Path(root)
    iteration = int(train_state["iteration"])
    name = ckpt.iteration_dirname(iteration)
    final = root / name
    tmp = root / f".{name}.tmp"
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp_rank, tp_size = parallel.tp_rank(), parallel.tp_size()
    dp_rank, dp_size = parallel.dp_rank(), parallel.dp_size()

    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".iter_*.tmp"):  # a save killed earlier
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()

    written: list[Path] = []
    if dp_rank == 0:
        ckpt.write_model_files(tmp, cfg, tp_rank, tp_size, model.local_state_dict(), padded_vocab)
        written.append(tmp / ckpt.shard_filename(tp_rank))
        if tp_rank == 0:
            written += [tmp / ckpt.META_FILE, tmp / ckpt.CONFIG_FILE]

    stall = _stall_seconds(iteration)
    if stall > 0:
        if rank == 0:
            print(f"[checkpoint] test hook: stalling {stall}s in the middle of saving {name}", flush=True)
        time.sleep(stall)

    # Optimizer: every DP rank takes part in gathering each tensor; one of them writes it.
    step = adam_step(base_optimizer)
    keys = list(ADAM_KEYS) + ([MASTER_KEY] if hp and next(model.parameters()).dtype != torch.float32 else [])
    if hp:
        _ensure_state(engine, base_optimizer, step)
    elif step == 0:
        materialize_state(base_optimizer)
    mine: dict[str, torch.Tensor] = {}
    for index, (pname, param) in enumerate(model.named_parameters()):
        for key in keys:
            value = _full_state(engine, hp, base_optimizer, param, key)
            if index % dp_size == dp_rank:
                mine[f"{pname}/{key}"] = value
    opt_file = tmp / optim_filename(tp_rank, dp_rank)
    save_file(mine, str(opt_file), metadata={"tp_size": str(tp_size), "dp_size": str(dp_size)})
    written.append(opt_file)

    rng_file = tmp / rng_filename(rank)
    torch.save(rng_state(), rng_file)
    written.append(rng_file)

    if rank == 0:
        state = dict(train_state)
        state.update(
            format=TRAIN_FORMAT,
            has_optimizer=True,
            adam_step=step,
            optimizer_keys=keys,
            loss_scaler=_loss_scaler_state(engine),
            world_size=world,
            tp_size=tp_size,
            dp_size=dp_size,
            zero_stage=int(engine.zero_optimization_stage()),
            saved_at=time.strftime("%Y-%m-%d %H:%M:%S"),
        )
        (tmp / TRAIN_STATE_FILE).write_text(json.dumps(state, indent=1))
        written.append(tmp / TRAIN_STATE_FILE)
    for path in written:
        ckpt.fsync_file(path)
    _barrier()

    if rank == 0:
        ckpt.fsync_dir(tmp)
        ckpt.publish(tmp, final)  # replaces an existing iter_N (re-saved right after resuming)
        ckpt.write_latest(root, name)
    _barrier()
    return final


def _ensure_state(engine, base_optimizer, step: int) -> None:
    """DeepSpeed links per-parameter state views only after a first update; create them if no update
    has happened yet (all steps skipped so far, or a save before training)."""
    materialize_state(base_optimizer)  # no-op once every group has state
    set_adam_step(base_optimizer, step)
    _linked(engine)


# ----------------------------------------------------------------------------- load
def load_model_weights(info: CheckpointInfo, model: torch.nn.Module) -> None:
    """Fill the model's shards (re-split when the TP size differs). Call before building the engine, so
    DeepSpeed's fp32 master copies start from these weights."""
    ckpt.load_into_model(info.path, model, parallel.tp_rank(), parallel.tp_size())


class _OptimReader:
    """Reads per-parameter optimizer tensors saved at any TP/DP size, for this TP rank."""

    def __init__(self, directory: Path, saved_tp: int, gated: bool) -> None:
        self.saved_tp = saved_tp
        self.gated = gated
        self.where: list[dict[str, Any]] = []
        for tp_rank in range(saved_tp):
            index: dict[str, Any] = {}
            for path in sorted(glob.glob(str(directory / f"optim_tp{tp_rank:02d}_dp*.safetensors"))):
                handle = safe_open(path, framework="pt")
                for key in handle.keys():
                    index[key] = handle
            self.where.append(index)

    def get(self, name: str, key: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        full_key = f"{name}/{key}"
        for index in self.where:
            if full_key not in index:
                raise ckpt.CheckpointError(f"optimizer state '{full_key}' is missing from the checkpoint")
        if self.saved_tp == tp_size:
            return self.where[tp_rank][full_key].get_tensor(full_key)
        spec = shard_spec(name, self.gated)
        full = spec.merge([index[full_key].get_tensor(full_key) for index in self.where])
        return spec.split(full, tp_rank, tp_size)


def load_training_state(
    info: CheckpointInfo,
    *,
    model: torch.nn.Module,
    engine,
    base_optimizer: torch.optim.Optimizer,
    hp: bool,
    log=print,
) -> dict[str, Any]:
    """Restore optimizer state, loss scaler and RNG; return the saved training state (iteration,
    consumed samples, ...). Weights must already be loaded (:func:`load_model_weights`)."""
    state = dict(info.train_state or {})
    directory = info.path
    tp_rank, tp_size = parallel.tp_rank(), parallel.tp_size()
    if state.get("has_optimizer"):
        reader = _OptimReader(directory, info.meta["tp_size"], model.cfg.is_gated_mlp)
        materialize_state(base_optimizer)
        set_adam_step(base_optimizer, int(state["adam_step"]))
        if hp:
            _linked(engine)
        keys = [k for k in state["optimizer_keys"] if k in ADAM_KEYS or hp]
        for pname, param in model.named_parameters():
            for key in keys:
                _set_state(engine, hp, base_optimizer, param, key, reader.get(pname, key, tp_rank, tp_size))
        _set_loss_scaler_state(engine, state.get("loss_scaler"))
    rank = _rank()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rng_file = directory / rng_filename(rank)
    state["rng_restored"] = state.get("world_size") == world and rng_file.is_file()
    if state["rng_restored"]:
        set_rng_state(torch.load(rng_file, weights_only=True))
    elif rank == 0:
        log(
            f"[checkpoint] saved with {state.get('world_size')} ranks, running with {world}: RNG states are "
            "re-seeded from (seed, iteration) instead of restored"
        )
    _barrier()
    return state
