"""DeepSpeed engine over the megatron-core tensor-parallel model.

Three things matter for correctness here:

* DeepSpeed must partition ZeRO state and average gradients over the *data-parallel* group only. It
  learns the groups through an ``mpu`` object; :class:`MegatronCoreMPU` answers its questions from
  megatron-core's ``parallel_state``.
* Gradient norms must count every tensor-parallel shard once and replicated tensors (norms, row-
  parallel biases) once: DeepSpeed sums the norm over ``mpu.get_model_parallel_group()`` and uses the
  ``tensor_model_parallel`` attribute megatron-core sets on sharded parameters, counting the others
  on model-parallel rank 0 only. Pipeline parallelism is not used, so the model-parallel group is the
  tensor-parallel group.
* The DeepSpeed config is generated from ours (one source of truth: batch sizes, clipping, precision,
  ZeRO), never written by hand.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state as ps

from megatron_stablelm.config import Config, ConfigError


class MegatronCoreMPU:
    """The subset of Megatron's old ``mpu`` module interface DeepSpeed calls, over megatron-core."""

    # tensor parallel (== model parallel: no pipeline stages)
    def get_model_parallel_rank(self) -> int:
        return ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return ps.get_tensor_model_parallel_group()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_slice_parallel_rank = get_model_parallel_rank
    get_slice_parallel_world_size = get_model_parallel_world_size
    get_slice_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return ps.get_tensor_model_parallel_src_rank()

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return ps.get_data_parallel_group()

    # pipeline: one stage
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return ps.get_pipeline_model_parallel_group()

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch splits: ``global = micro × accumulation × data-parallel size``."""

    micro: int
    accumulation: int
    dp_size: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.dp_size


def batch_layout(cfg: Config, world_size: int) -> BatchLayout:
    """Check the batch arithmetic against the world size before anything is built. ``train_batch_size``
    is optional; when given with ``gradient_accumulation_steps`` left at 1 the accumulation is derived
    from it (as DeepSpeed does); otherwise all three must agree."""
    tp = cfg.model_parallel_size
    if world_size % tp:
        raise ConfigError(
            f"key 'model_parallel_size': {tp} does not divide the world size {world_size} "
            f"(launch a multiple of {tp} processes)"
        )
    dp = world_size // tp
    micro, gas = cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
    if cfg.train_batch_size is not None:
        tbs = cfg.train_batch_size
        if micro * gas * dp != tbs:
            if gas == 1 and tbs % (micro * dp) == 0:
                gas = tbs // (micro * dp)
            else:
                raise ConfigError(
                    f"batch arithmetic does not fit the world size: train_batch_size={tbs} must equal "
                    f"train_micro_batch_size_per_gpu ({micro}) × gradient_accumulation_steps ({gas}) × "
                    f"data-parallel size ({dp} = {world_size} processes / model_parallel_size {tp}) = "
                    f"{micro * gas * dp}"
                )
    return BatchLayout(micro, gas, dp)


def precision(cfg: Config) -> str:
    """'fp32' | 'bf16' | 'fp16' from ``precision``, ``bf16`` and ``fp16``."""
    return cfg.params_dtype_name


def effective_zero_stage(cfg: Config) -> int:
    """bf16 and fp16 always run under ZeRO (stage >= 1): that path keeps fp32 master weights, fp32
    gradient accumulation for bf16, and one checkpoint format. At DP=1 stage 1 partitions nothing."""
    stage = cfg.zero_stage
    if stage > 2:
        raise ConfigError("key 'zero_optimization': ZeRO stage 3 is not supported (use 0, 1 or 2)")
    if precision(cfg) != "fp32" and stage == 0:
        return 1
    return stage


_DROP_ZERO_KEYS = {
    "cpu_offload",
    "cpu_offload_params",
    "cpu_offload_use_pin_memory",
    "load_from_fp32_weights",
}


def deepspeed_config(cfg: Config, layout: BatchLayout) -> dict[str, Any]:
    """The DeepSpeed config of a run, derived from ours."""
    prec = precision(cfg)
    stage = effective_zero_stage(cfg)
    zero = {k: v for k, v in (cfg.zero_optimization or {}).items() if k not in _DROP_ZERO_KEYS}
    zero["stage"] = stage
    ds: dict[str, Any] = {
        "train_batch_size": layout.global_batch,
        "train_micro_batch_size_per_gpu": layout.micro,
        "gradient_accumulation_steps": layout.accumulation,
        # The non-ZeRO fp32 path clips inside the guarded optimizer (norm before clipping is logged).
        "gradient_clipping": float(cfg.gradient_clipping) if stage > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        # DeepSpeed's own progress line (lr, skipped steps), as in GPT-NeoX; ours is every log_interval.
        "steps_per_print": int(cfg.steps_per_print) if cfg.steps_per_print else 10**9,
        "wall_clock_breakdown": bool(cfg.wall_clock_breakdown),
    }
    if prec == "bf16":
        ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif prec == "fp16":
        fp16 = dict(cfg.fp16 or {})
        fp16["enabled"] = True
        fp16.pop("type", None)
        ds["fp16"] = fp16
    if cfg.fp32_allreduce and prec != "fp32":
        ds["communication_data_type"] = "fp32"
    return ds


def build_engine(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, layout: BatchLayout):
    """``deepspeed.initialize`` with our config and the megatron-core ``mpu``; returns the engine."""
    import deepspeed

    os.environ.setdefault("LOCAL_RANK", "0")
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, layout),
        mpu=MegatronCoreMPU(),
        dist_init_required=False,
    )
    return engine


def uses_hp_mapping(engine) -> bool:
    """True when DeepSpeed holds fp32 master partitions (ZeRO 1/2, bf16): state is reached through
    ``deepspeed.utils.safe_*``; False when the base optimizer steps the model parameters directly."""
    return engine.zero_optimization_stage() > 0 or engine.bfloat16_enabled() or engine.fp16_enabled()
