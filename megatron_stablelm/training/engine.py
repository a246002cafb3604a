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
* Under sequence parallelism each TP rank's gradient of a replicated parameter (LayerNorms, row-
  parallel biases: megatron-core's ``sequence_parallel`` mark) covers only its share of the sequence.
  The model sums it over the TP group in a gradient hook as backward produces it
  (:func:`megatron_stablelm.model._sum_gradient_over_tp`), i.e. before DeepSpeed accumulates it into
  its fp32 buffers or ZeRO partitions and reduces over DP, so nothing here changes with it and every
  precision, ZeRO stage and accumulation count sees the TP=1 gradient.
* The DeepSpeed config is generated from ours (one source of truth: batch sizes, clipping, precision,
  ZeRO), never written by hand.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch.profiler import record_function

from megatron_stablelm.config import BatchLayout, Config
from megatron_stablelm.config.choices import ZERO_KEYS_DROPPED
from megatron_stablelm.training.deepspeed_setup import import_deepspeed
from megatron_stablelm.training.optimizer import adam_step, build_optimizer, materialize_state, set_adam_step


class MegatronCoreMPU:
    """The subset of Megatron's old ``mpu`` module interface DeepSpeed calls, answered by megatron-core.
    Model parallel is tensor parallel (one pipeline stage); DeepSpeed asks under several names."""

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = get_slice_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_slice_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_slice_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)

    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)

    get_pipeline_model_parallel_rank = get_pipe_parallel_rank = staticmethod(lambda: 0)
    get_pipeline_model_parallel_world_size = get_pipe_parallel_world_size = staticmethod(lambda: 1)
    get_pipeline_model_parallel_group = get_pipe_parallel_group = staticmethod(
        ps.get_pipeline_model_parallel_group
    )


def deepspeed_config(cfg: Config, layout: BatchLayout) -> dict[str, Any]:
    """The DeepSpeed config of a run, derived from ours."""
    prec = cfg.params_dtype_name
    stage = cfg.effective_zero_stage
    zero = {k: v for k, v in (cfg.zero_optimization or {}).items() if k not in ZERO_KEYS_DROPPED}
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


def _deepspeed_initialize(cfg: Config, model: torch.nn.Module, optimizer, layout: BatchLayout):
    """``deepspeed.initialize`` with our config and the megatron-core ``mpu``; returns the engine."""
    deepspeed = import_deepspeed()  # quiet, and nothing compiled (deepspeed_setup.py)
    os.environ.setdefault("LOCAL_RANK", "0")
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, layout),
        mpu=MegatronCoreMPU(),
        dist_init_required=False,
    )
    return engine


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step did: whether the update was applied (not skipped for a non-finite
    gradient or an fp16 overflow), the gradient norm before clipping, the fp16 loss scale."""

    applied: bool
    grad_norm: float | None
    loss_scale: float | None


class TrainingEngine:
    """The model under DeepSpeed, as the trainer and the checkpoint code see it.

    Everything DeepSpeed-specific lives here: how the optimizer is wrapped (fp32 master partitions
    under ZeRO for bf16/fp16, or the guarded optimizer stepping fp32 parameters directly), how it
    scales losses (by ``1 / accumulation``) and reduces gradients (mean over the data-parallel group),
    and how per-parameter optimizer state is reached: for a save, each rank's own fragment of it (the
    ``_hp_mapping`` DeepSpeed keeps per parameter: no communication); for a resume,
    ``deepspeed.utils.safe_set_*``, or the base optimizer's own state without ZeRO. The trainer calls :meth:`losses`, :meth:`backward`,
    :meth:`finish_step`; checkpoints use the state accessors, which take canonical parameter names.
    """

    def __init__(self, cfg: Config, model: torch.nn.Module, layout: BatchLayout) -> None:
        self.model = model
        self.layout = layout
        self.precision = cfg.params_dtype_name
        device = next(model.parameters()).device
        guarded = cfg.effective_zero_stage == 0
        self.optimizer = build_optimizer(cfg, model, device, guarded=guarded)
        if guarded:
            self.optimizer.configure_guard(cfg.gradient_clipping, ps.get_tensor_model_parallel_group(), None)
        self._ds = _deepspeed_initialize(cfg, model, self.optimizer, layout)
        # DeepSpeed holds fp32 master partitions (ZeRO 1/2 or mixed precision): optimizer state is then
        # reached through its safe_* accessors; otherwise the base optimizer steps the parameters.
        ds = self._ds
        self._master = ds.zero_optimization_stage() > 0 or ds.bfloat16_enabled() or ds.fp16_enabled()
        self._params = dict(model.named_parameters())

    @property
    def zero_stage(self) -> int:
        return int(self._ds.zero_optimization_stage())

    def train(self, mode: bool = True) -> None:
        self._ds.train(mode)

    # ------------------------------------------------------------------ one step
    def losses(self, batch: dict[str, Any]) -> torch.Tensor:
        """fp32 per-token losses ``[b, s]`` of a micro-batch (the Batch contract of ARCHITECTURE.md)."""
        return self._ds(
            batch["tokens"],
            batch.get("position_ids"),
            batch.get("cu_seqlens"),
            batch.get("max_seqlen"),
            labels=batch["labels"],
        )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss_sum: torch.Tensor, step_tokens: torch.Tensor) -> None:
        """Backward of one micro-batch's summed token loss, weighted so that the step's gradient is the
        mean over ``step_tokens``, the counted tokens of the whole step on all data-parallel ranks.
        DeepSpeed divides each micro-batch's loss by the accumulation steps and averages gradients over
        the DP group; the factor ``accumulation × DP`` undoes both."""
        scale = self.layout.accumulation * self.layout.dp_size
        # the profiler labels (no cost unless a profiler runs) split a trainer step's time by phase
        with record_function("engine.backward"):
            self._ds.backward(loss_sum * scale / step_tokens.clamp(min=1.0))
        with record_function("engine.optimizer"):
            self._ds.step()  # DeepSpeed applies the update at the accumulation boundary only

    def step(
        self,
        batches: list[dict[str, Any]],
        hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        drop_update: Callable[[torch.Tensor, torch.Tensor], bool] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, StepOutcome]:
        """One optimizer step over this rank's micro-batches: ``(summed token loss of this rank, counted
        tokens of the step on all DP ranks, outcome)``. The loss and gradient are the mean over every
        counted token of the step, not a mean of per-micro-batch means, so a loss mask that counts more
        tokens in one micro-batch weighs each token equally. ``hook(micro, loss)`` may replace a
        micro-batch's summed loss (fault injection in tests). ``drop_update(loss_sum, step_tokens)``, asked
        once all micro-batches but the last have gone backward (a collective: every rank must ask it
        and get the same answer), drops the step's update when it says so: the last backward then
        carries a non-finite gradient, which DeepSpeed's overflow check turns into a skipped step on
        every rank (no update, no optimizer-state change, gradients cleared)."""
        device = batches[0]["tokens"].device
        step_tokens = sum(b["loss_mask"].sum(dtype=torch.float64) for b in batches)
        step_tokens = torch.as_tensor(step_tokens, dtype=torch.float64, device=device)
        dist.all_reduce(step_tokens, group=ps.get_data_parallel_group())
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # one host sync per step
        for micro, batch in enumerate(batches):
            with record_function("engine.forward"):
                losses = self.losses(batch)
                loss = (losses * batch["loss_mask"].to(losses.dtype)).sum()
            if hook is not None:
                loss = hook(micro, loss)
            loss_sum += loss.detach().double()
            if drop_update is not None and micro == len(batches) - 1 and drop_update(loss_sum, step_tokens):
                loss = loss * float("nan")
            self.backward(loss, step_tokens.to(loss.dtype))
        with record_function("engine.finish_step"):
            outcome = self.finish_step()
        return loss_sum, step_tokens, outcome

    def finish_step(self) -> StepOutcome:
        """After the last micro-batch of a step: whether the update happened, and its statistics."""
        applied = bool(self._ds.was_step_applied())
        if self._master:
            norm = self._ds.get_global_grad_norm()
        else:
            norm = self.optimizer.last_grad_norm
        scale = getattr(self._ds.optimizer, "cur_scale", None) if self.precision == "fp16" else None
        return StepOutcome(
            applied=applied,
            grad_norm=float(norm) if norm is not None else None,
            loss_scale=float(scale) if scale is not None else None,
        )

    # ------------------------------------------------------------------ optimizer state by name
    def state_keys(self) -> list[str]:
        """Per-parameter optimizer tensors a checkpoint holds: Adam moments, plus the fp32 master
        weights when the model's own parameters are in lower precision."""
        low_precision = next(self.model.parameters()).dtype != torch.float32
        return list(ADAM_KEYS) + ([MASTER_KEY] if self._master and low_precision else [])

    def accepts_state_key(self, key: str) -> bool:
        """Whether saved state ``key`` can be restored: the moments always; fp32 master weights only
        where DeepSpeed keeps a master copy (without one the weights come from the model files)."""
        return key in ADAM_KEYS or (key == MASTER_KEY and self._master)

    def adam_step(self) -> int:
        return adam_step(self.optimizer)

    def prepare_state(self, step: int | None = None) -> None:
        """Make every parameter's state exist and be reachable (before reading or restoring it):
        optimizers create state lazily at the first update, and DeepSpeed links its per-parameter
        views once, after stepping the *first* parameter group only, so with two groups (decay / no
        decay) the second group's views would stay empty. Relinking is cheap (views) and idempotent."""
        step = self.adam_step() if step is None else step
        materialize_state(self.optimizer)
        set_adam_step(self.optimizer, step)
        opt = self._ds.optimizer
        if self._master and hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def sync_master_weights(self) -> None:
        """After the model's weights were replaced in place (a rollback to a checkpoint): DeepSpeed's fp32
        master copies take them too, as they do when the engine is built over loaded weights."""
        if self._master:
            for name, param in self._params.items():
                self.set_state(name, MASTER_KEY, param.detach())

    @property
    def state_is_partitioned(self) -> bool:
        """Whether each DP rank holds only its own range of the optimizer state (ZeRO, or DeepSpeed's
        mixed-precision master copies), rather than all of it."""
        return self._master

    def local_state(self, name: str, key: str) -> tuple[int, torch.Tensor] | None:
        """This rank's own part of ``key`` for parameter ``name``, with no communication: ``(start,
        values)``, the flat offset in this TP rank's shard of the parameter and a 1-D fp32 CPU copy, or
        None when this rank's partition holds none of it. Without partitioning: the whole tensor."""
        param = self._params[name]
        if not self._master:
            value = param if key == MASTER_KEY else self.optimizer.state[param][key]
            return 0, value.detach().float().reshape(-1).to("cpu", copy=True)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return None
        fragment = mapping.get_hp_fragment(None if key == MASTER_KEY else key)
        return mapping.lp_fragment_address.start, fragment.detach().float().reshape(-1).to("cpu", copy=True)

    def set_state(self, name: str, key: str, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        param = self._params[name]
        value = value.to(device=param.device, dtype=torch.float32)
        if self._master and key == MASTER_KEY:
            safe_set_full_fp32_param(param, value)
        elif self._master:
            safe_set_full_optimizer_state(param, value, key)
        elif key == MASTER_KEY:
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
        else:
            self.optimizer.state[param][key].copy_(value)

    def loss_scaler_state(self) -> dict | None:
        scaler = getattr(self._ds.optimizer, "loss_scaler", None)
        if scaler is None:
            return None
        out = {}
        for name in _SCALER_FIELDS:
            value = getattr(scaler, name, None)
            if isinstance(value, (int, float)) or torch.is_tensor(value):
                out[name] = float(value) if not isinstance(value, int) else value
        return out

    def set_loss_scaler_state(self, state: dict | None) -> None:
        scaler = getattr(self._ds.optimizer, "loss_scaler", None)
        if scaler is None or not state:
            return
        for name, value in state.items():
            old = getattr(scaler, name, None)
            if torch.is_tensor(old):
                old.fill_(value)
            elif old is not None:
                setattr(scaler, name, type(old)(value))


_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MASTER_KEY = "fp32"
