"""The base (per-parameter) optimizer handed to DeepSpeed, and its parameter groups.

DeepSpeed wraps this optimizer: with ZeRO it steps it on flat fp32 partitions of the data-parallel
group, without ZeRO (fp32 only) it steps it on the model parameters directly. For the latter case the
optimizer itself does gradient clipping and the non-finite check (:class:`GuardMixin`), because
DeepSpeed's plain fp32 path would otherwise apply a NaN update and poison the weights.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from megatron_stablelm.config import Config, ConfigError


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to weight matrices only: not to biases, not to any norm's weight (the
    per-head QK-norm weight is 2-D, hence the name test), not to 1-D tensors."""
    return param.dim() >= 2 and not name.endswith(".bias") and "norm" not in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups (decay / no decay); empty groups are dropped (DeepSpeed rejects them)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if decays(name, param) else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam  # type: ignore[import-not-found]
    except Exception:
        return None
    return FusedAdam


class GuardMixin:
    """For the non-ZeRO fp32 path: clip by the global (tensor-parallel aware) gradient norm and skip
    the update when that norm is not finite. ``overflow`` is what DeepSpeed's engine reads to count a
    skipped step; ``last_grad_norm`` is the pre-clipping norm for logging."""

    clip_value: float = 0.0
    tp_group = None
    world_group = None
    overflow: bool = False
    last_grad_norm: float | None = None

    def configure_guard(self, clip_value: float, tp_group, world_group=None) -> None:
        self.clip_value = float(clip_value)
        self.tp_group = tp_group
        self.world_group = world_group

    @torch.no_grad()
    def global_grad_norm(self) -> float:
        sharded = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                sq = p.grad.detach().double().pow(2).sum().cpu()
                if getattr(p, "tensor_model_parallel", False):
                    sharded += sq
                else:
                    replicated += sq
        device = next(
            (p.grad.device for g in self.param_groups for p in g["params"] if p.grad is not None), None
        )
        if self.tp_group is not None and dist.is_initialized() and dist.get_world_size(self.tp_group) > 1:
            buf = sharded.to(device or "cpu")
            dist.all_reduce(buf, group=self.tp_group)
            sharded = buf.cpu()
        return (
            float(math.sqrt(float(sharded + replicated)))
            if torch.isfinite(sharded + replicated)
            else math.nan
        )

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D401 - optimizer API
        norm = self.global_grad_norm()
        bad = not math.isfinite(norm)
        if (
            self.world_group is not None
            and dist.is_initialized()
            and dist.get_world_size(self.world_group) > 1
        ):
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            flag = torch.tensor([1.0 if bad else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.world_group)
            bad = bool(flag.item() > 0)
        self.last_grad_norm = norm
        self.overflow = bad
        if bad:
            return None
        if self.clip_value > 0 and norm > self.clip_value:
            scale = self.clip_value / (norm + 1e-6)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(scale)
        return super().step(closure)  # type: ignore[misc]


class GuardedAdamW(GuardMixin, torch.optim.AdamW):
    """torch AdamW with :class:`GuardMixin`."""


def build_optimizer(
    cfg: Config, model: nn.Module, device: torch.device, guarded: bool
) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`. On CUDA torch's fused kernel (``impl: auto``/``torch_fused``);
    apex's FusedAdam only with ``impl: apex`` and only if apex is importable (never installed here);
    elsewhere torch's default (foreach) implementation. ``guarded`` adds :class:`GuardMixin`."""
    adam = cfg.adam
    impl, kwargs = adam.impl, adam.kwargs()
    groups = param_groups(model, cfg.weight_decay)
    if impl == "apex":
        fused_adam = _apex_fused_adam()
        if fused_adam is None:
            raise ConfigError("optimizer impl 'apex' was requested but apex is not importable")
        cls = type("GuardedFusedAdam", (GuardMixin, fused_adam), {}) if guarded else fused_adam
        return cls(groups, adam_w_mode=True, **kwargs)
    cls = GuardedAdamW if guarded else torch.optim.AdamW
    fused = device.type == "cuda" and impl in ("auto", "torch_fused")
    if fused:
        return cls(groups, fused=True, **kwargs)
    return cls(groups, foreach=False if device.type == "cpu" else None, **kwargs)


def adam_step(optimizer: torch.optim.Optimizer) -> int:
    """The Adam step count (bias correction) of the base optimizer, 0 before the first update."""
    for group in optimizer.param_groups:
        if "step" in group:  # apex keeps it per group
            return int(group["step"])
    for state in optimizer.state.values():
        if "step" in state:
            step = state["step"]
            return int(step.item() if torch.is_tensor(step) else step)
    return 0


def set_adam_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    for group in optimizer.param_groups:
        if "step" in group:
            group["step"] = step
    for state in optimizer.state.values():
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step


@torch.no_grad()
def materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the lazily initialised state (moments, step) of every parameter that has none, without
    changing any parameter or any existing state: one update in which only those parameters carry a
    (zero) gradient, with zero learning rate and weight decay; their step count is then set to the
    others' (0 if none). Needed before restoring a checkpoint into a fresh optimizer, and before reading
    DeepSpeed's per-parameter state views."""
    missing = [p for g in optimizer.param_groups for p in g["params"] if not optimizer.state.get(p)]
    if not missing:
        return
    step = adam_step(optimizer)
    saved = [(g["lr"], g.get("weight_decay", 0.0)) for g in optimizer.param_groups]
    stashed = {}
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = 0.0, 0.0
        for p in group["params"]:
            stashed[p] = p.grad
            p.grad = None
    for p in missing:
        p.grad = torch.zeros_like(p)
    base = type(optimizer)  # bypass GuardMixin: no collectives, this rank's own state only
    while issubclass(base, GuardMixin):
        base = base.__mro__[base.__mro__.index(GuardMixin) + 1]
    base.step(optimizer)
    for (lr, wd), group in zip(saved, optimizer.param_groups):
        group["lr"], group["weight_decay"] = lr, wd
    for p, grad in stashed.items():
        p.grad = grad
    set_adam_step(optimizer, step)
