"""FP8 GEMMs for the transformer's linear layers (``fp8: tensorwise | rowwise``), through torchao.

Why: Hopper's (and Ada's) tensor cores multiply FP8 at twice their bf16 rate, and the linear layers
(QKV, attention output, the MLP's two projections) hold most of a StableLM step's FLOPs. What is
FP8 is only the *operands of those GEMMs*, cast afresh at every call with a scale computed from the
tensor itself (dynamic scaling): parameters, their gradients, the fp32 master weights, Adam's state,
checkpoints and the HF export keep their dtypes and names, so an FP8-trained checkpoint is like any
other. The embedding and the LM head stay in the compute dtype (the head's vocabulary-wide GEMM
feeds the loss directly, where FP8 rounding would cost the most; neither is measured to gain).

The scaling recipes are torchao's (``Float8LinearConfig.from_recipe_name``):

* ``tensorwise``: one scale per tensor; inputs and weights in e4m3 (3 mantissa bits), output
  gradients in e5m2 (2 mantissa bits, the wider range gradients need); the fastest kernels.
* ``rowwise``: one scale per row of each GEMM operand along its reduction dimension, rounded down to
  a power of two; e4m3 everywhere. More accurate where rows differ in magnitude, slower kernels.

Why glue instead of torchao's module swap: ``convert_to_float8_training`` replaces
``torch.nn.Linear`` modules, and megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` are
not ones; their communication also lives inside their own autograd function. :class:`_FP8Linear` is
that function's pattern with FP8 GEMMs: torchao casts each operand (``hp_tensor_to_float8_dynamic``)
and its ``Float8TrainingTensor`` runs the scaled GEMM (``torch._scaled_mm``) for the forward, the input
gradient and the weight gradient. Tensor-parallel communication stays in the compute dtype: under
sequence parallelism the column-parallel input is all-gathered in forward (and again in backward, so
only this rank's ``s / TP`` positions are kept, as megatron-core keeps them) and its gradient
reduce-scattered; otherwise megatron-core's own mappings (copy / all-reduce / reduce-scatter) wrap
the local GEMM unchanged.

FP8 runs while the module is in training mode (forward and backward, recomputed forwards included, so
a recomputation computes what its forward did); evaluation and generation (``model.eval()``) run the
compute dtype: the function the trained weights define and the HF export computes.

Refused in one line (:class:`~megatron_stablelm.config.ConfigError` naming ``fp8``): a GPU below
compute capability 8.9, a device other than CUDA or CPU, a GEMM dimension that is not a multiple of
16 (``torch._scaled_mm``'s constraint on CUDA, checked on every device so a CPU run finds it too),
torchao missing. On CPU ``torch._scaled_mm`` runs FP8 operands too: the tests check these GEMMs
against float64 there. torchao is imported on the first FP8 GEMM, never by a tool that only reads a
checkpoint.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import tensor_parallel

from megatron_stablelm.config.choices import FP8_RECIPES
from megatron_stablelm.config.errors import ConfigError

# torch._scaled_mm on CUDA: both dimensions of the second operand and the inner dimension of the first
# must be multiples of 16; every linear's three GEMMs together need in, out and tokens divisible by it.
GEMM_MULTIPLE = 16
# FP8 tensor cores: Ada (8.9) and Hopper (9.0) and later.
MIN_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class FP8Recipe:
    """One of torchao's recipes: the cast of each GEMM operand (``config``) and the GEMM settings
    (``mm``, torchao's ``LinearMMConfig``: fast accumulation for the forward GEMM only)."""

    name: str
    config: Any
    mm: Any


# What importing torchao logs and the float8 training path does not concern: a warning per CUDA extension
# that cannot load (a CPU build of torch), and torch's deprecation note on one of its enums.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")


@functools.cache
def _import_torchao():
    """torchao's float8 modules (imported once, on the first FP8 GEMM; its import notes silenced)."""
    loggers = [logging.getLogger(name) for name in _IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao.float8 as float8
        from torchao.float8 import float8_scaling_utils
    except ImportError as err:
        raise ConfigError(
            f"key 'fp8': FP8 training needs torchao ({err}); install it with "
            '`pip install -e ".[fp8]"` (torchao has no dependencies, it pulls no other torch)'
        ) from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    return float8, float8_scaling_utils


@functools.cache
def recipe(name: str) -> FP8Recipe:
    """The torchao recipe ``name`` (``tensorwise`` or ``rowwise``)."""
    if name not in FP8_RECIPES:
        raise ConfigError(f"key 'fp8': unknown recipe {name!r}; expected one of {', '.join(FP8_RECIPES)}")
    float8, _ = _import_torchao()
    config = float8.Float8LinearConfig.from_recipe_name(name)
    gemms = (config.gemm_config_output, config.gemm_config_grad_input, config.gemm_config_grad_weight)
    mm = float8.LinearMMConfig(
        *(float8.ScaledMMConfig(config.emulate, g.use_fast_accum, False, config.pad_inner_dim) for g in gemms)
    )
    return FP8Recipe(name, config, mm)


@functools.cache
def check_device(device_type: str, index: int | None = None) -> None:
    """Refuse a device without FP8 GEMMs: CUDA below compute capability 8.9, anything but CUDA/CPU."""
    if device_type == "cpu":
        return
    if device_type != "cuda":
        raise ConfigError(
            f"key 'fp8': FP8 GEMMs run on CUDA (compute capability 8.9+) or CPU, not {device_type}"
        )
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        raise ConfigError(
            f"key 'fp8': {name} is compute capability {capability[0]}.{capability[1]}; FP8 tensor cores "
            f"need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (Ada, Hopper): set fp8: null"
        )


def check_gemm(weight_shape: torch.Size | tuple[int, ...], tokens: int) -> None:
    """Refuse a linear whose FP8 GEMMs ``torch._scaled_mm`` cannot take: this rank's input and output
    features and the tokens of one micro-batch must be multiples of :data:`GEMM_MULTIPLE`."""
    out_features, in_features = weight_shape
    bad = [
        f"{what} {n}"
        for what, n in (
            ("input features", in_features),
            ("output features", out_features),
            ("tokens", tokens),
        )
        if n % GEMM_MULTIPLE
    ]
    if bad:
        raise ConfigError(
            f"key 'fp8': FP8 GEMMs need multiples of {GEMM_MULTIPLE}, but a linear layer of this rank has "
            f"{', '.join(bad)} (weight {tuple(weight_shape)}, {tokens} tokens per micro-batch)"
        )


def _cast(r: FP8Recipe, tensor: torch.Tensor, cast: Any, role: Any, axis: int):
    """``tensor`` (2-D, compute dtype) as torchao's FP8 tensor for one GEMM operand: scaled per tensor,
    or per slice along ``axis`` (the GEMM's reduction dimension) with rowwise scaling. A cast the
    recipe disables leaves the tensor as it is (then its GEMM partner is not cast either)."""
    float8, scaling = _import_torchao()
    if cast.scaling_type is float8.ScalingType.DISABLED:
        return tensor
    axiswise = _rowwise(cast)
    return scaling.hp_tensor_to_float8_dynamic(
        tensor,
        cast.target_dtype,
        r.mm,
        gemm_input_role=role,
        scaling_granularity=cast.scaling_granularity,
        axiswise_dim=axis if axiswise else None,
        round_scales_to_power_of_2=r.config.round_scales_to_power_of_2,
    )


def _rowwise(cast: Any) -> bool:
    float8, _ = _import_torchao()
    return cast.scaling_granularity is float8.ScalingGranularity.AXISWISE


def _all_gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * group.size(), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = x.new_empty((x.shape[0] // group.size(), *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _FP8Linear(torch.autograd.Function):
    """``x @ weight.T`` with its three GEMMs in FP8 (no bias). With ``gather_group``, ``x`` holds this
    rank's positions of a sequence-parallel activation (dim 0): all-gathered for the GEMM in forward
    and again in backward (only the shard is saved), the input gradient reduce-scattered back."""

    @staticmethod
    def forward(ctx, x, weight, r: FP8Recipe, gather_group: dist.ProcessGroup | None):
        float8, _ = _import_torchao()
        role = float8.GemmInputRole
        total = x if gather_group is None else _all_gather_sequence(x, gather_group)
        x2d = total.reshape(-1, total.shape[-1])
        check_gemm(weight.shape, x2d.shape[0])
        check_device(x.device.type, x.device.index)
        ctx.save_for_backward(x, weight)
        ctx.recipe, ctx.gather_group = r, gather_group
        c = r.config
        # out[M, N] = x[M, K] @ W[N, K]^T: both operands scaled along K
        xq = _cast(r, x2d, c.cast_config_input, role.INPUT, -1)
        wq = _cast(r, weight, c.cast_config_weight, role.WEIGHT, -1)
        out = torch.mm(xq, wq.t())
        return out.view(*total.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        float8, _ = _import_torchao()
        role = float8.GemmInputRole
        x, weight = ctx.saved_tensors
        r, group = ctx.recipe, ctx.gather_group
        c = r.config
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = gq = None
        if ctx.needs_input_grad[0]:
            # grad_x[M, K] = g[M, N] @ W[N, K]: both scaled along N
            gq = _cast(r, g2d, c.cast_config_grad_output, role.GRAD_OUTPUT, -1)
            wq = _cast(r, weight, c.cast_config_weight_for_grad_input, role.WEIGHT, 0)
            grad_x = torch.mm(gq, wq).view(*grad_out.shape[:-1], weight.shape[1])
            if group is not None:
                grad_x = _reduce_scatter_sequence(grad_x, group)
        if ctx.needs_input_grad[1]:
            # grad_W[N, K] = g[M, N]^T @ x[M, K]: both scaled along M (the tokens). A tensorwise cast of g
            # does not depend on the axis: the one above serves again.
            cast = c.cast_config_grad_output_for_grad_weight
            if gq is None or cast != c.cast_config_grad_output or _rowwise(cast):
                gq = _cast(r, g2d, cast, role.GRAD_OUTPUT, 0)
            total = x if group is None else _all_gather_sequence(x, group)
            xq = _cast(
                r, total.reshape(-1, total.shape[-1]), c.cast_config_input_for_grad_weight, role.INPUT, 0
            )
            grad_w = torch.mm(gq.t(), xq)
        return grad_x, grad_w, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, name: str) -> torch.Tensor:
    """``F.linear(x, weight)`` (no bias, one rank) with recipe ``name``'s FP8 GEMMs."""
    return _FP8Linear.apply(x, weight, recipe(name), None)


def column_parallel(
    x: torch.Tensor, weight: torch.Tensor, name: str, group, sequence_parallel: bool
) -> torch.Tensor:
    """A column-parallel linear's local output (no bias) with FP8 GEMMs; its communication in the
    compute dtype: all-gather of the sequence-parallel input, or the all-reduce of the input gradient."""
    if group.size() == 1:
        return linear(x, weight, name)
    if sequence_parallel:
        return _FP8Linear.apply(x, weight, recipe(name), group)
    x = tensor_parallel.copy_to_tensor_model_parallel_region(x, group=group)
    return linear(x, weight, name)


def row_parallel(
    x: torch.Tensor, weight: torch.Tensor, name: str, group, sequence_parallel: bool
) -> torch.Tensor:
    """A row-parallel linear's output (no bias) with an FP8 local GEMM, then all-reduced (or, under
    sequence parallelism, reduce-scattered) in the compute dtype."""
    out = linear(x, weight, name)
    if group.size() == 1:
        return out
    if sequence_parallel:
        return tensor_parallel.reduce_scatter_to_sequence_parallel_region(out, group=group)
    return tensor_parallel.reduce_from_tensor_model_parallel_region(out, group=group)
