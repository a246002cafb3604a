"""The StableLM transformer, on megatron-core's tensor-parallel layers.

One class covers every StableLM generation (and the Llama family GPT-NeoX's configs express); the
config picks the variant:

==========================  ======================================================================
Alpha v1 (GPT-NeoX)         GeLU MLP with biases, fused QKV with bias, two LayerNorms, parallel residual
Alpha v2                    SwiGLU, one shared LayerNorm (``gpt_j_tied``), parallel residual, no biases
3B-4E1T                     SwiGLU, sequential residual, LayerNorm with bias, no linear biases
Stable LM 2 1.6B            as 3B-4E1T plus Q/K/V-only biases (``use_qkv_bias``)
Stable LM 2 12B             GQA, per-head QK LayerNorm, parallel residual with one LayerNorm, no biases
Llama family (NeoX YAMLs)   RMSNorm (``norm: rmsnorm``), SwiGLU, full rotary, GQA, no biases, untied head
==========================  ======================================================================

Activations are sequence-first ``[s, b, h]`` inside (megatron-core's convention); the public
interface is batch-first. With sequence parallelism (``sequence_parallel`` or GPT-NeoX's
``partition_activations``, at TP > 1) the activations *between* the tensor-parallel regions — embedding
output, LayerNorms, residual stream, hidden dropout, final norm — hold ``s / TP`` positions on each
rank, split along dim 0 by megatron-core's own mechanism: the vocab-parallel embedding reduce-scatters,
each column-parallel linear all-gathers its input (keeping only the local shard for backward) and each
row-parallel linear reduce-scatters its output. Inside the regions (attention over the whole sequence
with this rank's heads, the MLP's split width, the vocab-parallel logits and loss) nothing changes, so
``cu_seqlens``, rotary positions, QK-norm and the KV cache see the whole sequence. Replicated
parameters (LayerNorms, row-parallel biases) then see only their rank's positions: their gradients
are all-reduced over the TP group as they are produced (:func:`_sum_gradient_over_tp`).

Parameter names are the canonical names of :mod:`megatron_stablelm.sharding`, which reads how each
one splits over tensor parallelism off the layer that owns it. The model computes
only: the attention backend and activation recomputation are applied from outside by
:func:`megatron_stablelm.parallelize.parallelize` (:func:`build_model` does), and the TP group is
passed in, never read from globals inside ``forward``.
"""

from __future__ import annotations

import math
import types
import zlib
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from megatron_stablelm import kernels, parallel
from megatron_stablelm.config import Config
from megatron_stablelm.config.precision import torch_dtype
from megatron_stablelm.kernels import fp8 as fp8_kernels
from megatron_stablelm.parallelize import parallelize
from megatron_stablelm.sharding import ShardSpec, model_splits


def _no_init(_: torch.Tensor) -> None:
    """Weights are initialised by :func:`init_weights` instead (TP-independent, see there)."""


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear. At TP=1 its autograd function reduces to a plain matmul
    but still costs a Python-level forward and backward per call (measurable on small models, and it
    forgoes the bias-add epilogue of ``addmm``), so a single-rank layout calls ``F.linear`` with the
    same parameters instead: the same math, no communication either way.

    ``fused_parts``: how many independent blocks its output rows hold (2 for ``[gate | up]``); each
    block is split across ranks on its own (read by :mod:`megatron_stablelm.sharding`).

    ``fp8``: the FP8 recipe its GEMMs run while training (set by
    :func:`~megatron_stablelm.parallelize.apply_fp8`; :mod:`megatron_stablelm.kernels.fp8`), or None."""

    fp8: str | None = None

    def __init__(self, *args, fused_parts: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fused_parts = fused_parts

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None):
        if self.fp8 is not None and self.training:
            weight = self.weight if weight is None else weight
            out = fp8_kernels.column_parallel(x, weight, self.fp8, self.tp_group, self.sequence_parallel)
            return _add_bias(self, out)
        if self.tp_group.size() > 1:  # with sequence parallelism megatron-core all-gathers x along dim 0
            return super().forward(x, weight=weight)
        weight = self.weight if weight is None else weight
        if self.skip_bias_add:
            return F.linear(x, weight), self.bias
        return F.linear(x, weight, self.bias), None


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's row-parallel linear, with the same single-rank shortcut as
    :class:`ColumnParallelLinear` (at TP=1 there is nothing to all-reduce), and its ``fp8``."""

    fp8: str | None = None

    def forward(self, x: torch.Tensor):
        if self.fp8 is not None and self.training:
            out = fp8_kernels.row_parallel(x, self.weight, self.fp8, self.tp_group, self.sequence_parallel)
            return _add_bias(self, out)
        if self.tp_group.size() > 1:  # all-reduce, or with sequence parallelism reduce-scatter (dim 0)
            return super().forward(x)
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None


def _add_bias(layer: ColumnParallelLinear | RowParallelLinear, out: torch.Tensor):
    """``(output, bias)`` as megatron-core's linears return it: the bias added, or handed back with
    ``skip_bias_add``."""
    if layer.skip_bias_add or layer.bias is None:
        return out, layer.bias if layer.skip_bias_add else None
    return out + layer.bias, None


class LayerNorm(nn.Module):
    """LayerNorm whose bias is optional (Stable LM 2 has none), over the last dim."""

    def __init__(self, size: int, eps: float, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)`` in one pass (the sequential-residual block)."""
        return kernels.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """GPT-NeoX's ``norm: rmsnorm`` (Llama's): a weight and no bias, ``rms_norm_epsilon``."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x + residual), x + residual)`` in one pass (the sequential-residual block)."""
        return kernels.add_rms_norm(x, residual, self.weight, self.eps)


def make_norm(cfg: Config, size: int, dtype: torch.dtype) -> LayerNorm | RMSNorm:
    """The config's norm (``norm``, its epsilon, LayerNorm's bias) over ``size`` features."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(size, cfg.norm_epsilon, dtype)
    return LayerNorm(size, cfg.norm_epsilon, cfg.norm_bias, dtype)


class PerHeadLayerNorm(nn.Module):
    """QK-norm: one LayerNorm per attention head (weights ``[local heads, head_dim]``), so its
    parameters split over TP by heads, as the heads do."""

    tp_param_splits = types.MappingProxyType({"weight": ShardSpec(0), "bias": ShardSpec(0)})

    def __init__(self, heads: int, head_dim: int, eps: float, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.per_head_layer_norm(x, self.weight, self.bias, self.eps)


class PerHeadRMSNorm(nn.Module):
    """QK-norm with ``norm: rmsnorm``: one RMSNorm per head (weights ``[local heads, head_dim]``, split
    over TP by heads)."""

    tp_param_splits = types.MappingProxyType({"weight": ShardSpec(0)})

    def __init__(self, heads: int, head_dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.per_head_rms_norm(x, self.weight, self.eps)


def make_per_head_norm(cfg: Config, heads: int, dtype: torch.dtype) -> PerHeadLayerNorm | PerHeadRMSNorm:
    """The config's norm for each of ``heads`` heads (QK-norm)."""
    if cfg.norm == "rmsnorm":
        return PerHeadRMSNorm(heads, cfg.head_dim, cfg.norm_epsilon, dtype)
    return PerHeadLayerNorm(heads, cfg.head_dim, cfg.norm_epsilon, cfg.qk_norm_bias, dtype)


class _SplitQKV(torch.autograd.Function):
    """Queries, keys and values out of the fused projection ``[s, b, kv_heads, group + 2, d]``.

    Why not plain slicing: autograd's backward of each slice is a zero-filled gradient of the *whole*
    fused tensor with the slice copied in, and the three are then summed, i.e. three fills, three copies
    and two additions of a ``[tokens, (heads + 2 kv_heads) d]`` tensor per layer (measured on H100 at
    Stable LM 2 1.6B, seq 4096: about 5% of the step). Here backward writes the three gradients once
    into one uninitialised buffer."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor):
        s, b, kv, slots, d = qkv.shape
        group = slots - 2
        ctx.shape, ctx.group = qkv.shape, group
        q = qkv[:, :, :, :group].reshape(s, b, kv * group, d)  # a view for multi-head (group 1)
        return q, qkv[:, :, :, group], qkv[:, :, :, group + 1]

    @staticmethod
    def backward(ctx, dq: torch.Tensor | None, dk: torch.Tensor | None, dv: torch.Tensor | None):
        group = ctx.group
        like = next(g for g in (dq, dk, dv) if g is not None)
        dqkv = like.new_empty(ctx.shape)
        if dq is not None:
            dq = dq.unflatten(2, (dq.shape[2] // group, group))  # splitting a dim is always a view
        for dst, grad in (
            (dqkv[:, :, :, :group], dq),
            (dqkv[:, :, :, group], dk),
            (dqkv[:, :, :, group + 1], dv),
        ):
            if grad is None:
                dst.zero_()
            else:
                dst.copy_(grad)
        return dqkv


def split_qkv(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q [s, b, heads, d]``, ``k``/``v`` ``[s, b, kv_heads, d]`` from the fused, KV-group-ordered
    projection output ``[s, b, kv_heads, group + 2, d]`` (see :mod:`megatron_stablelm.sharding`)."""
    return _SplitQKV.apply(qkv)


class SingleRankGroup:
    """A tensor-parallel group of one rank, for a model that needs no process group: one built on the
    meta device to read its whole shapes and splits. megatron-core's layers only ask a group its size
    and rank while they are built."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


TPGroup = dist.ProcessGroup | SingleRankGroup


@dataclass(frozen=True)
class LayerFactory:
    """What every parallel layer of one model is built with: megatron-core's config and the TP group."""

    mp: ModelParallelConfig
    tp_group: TPGroup

    @property
    def tp_size(self) -> int:
        return self.mp.tensor_model_parallel_size

    def column(self, inputs: int, outputs: int, bias: bool, **extra) -> ColumnParallelLinear:
        """Output rows split over TP, output left split (the next layer is row-parallel)."""
        return ColumnParallelLinear(
            inputs, outputs, config=self.mp, init_method=_no_init, bias=bias, gather_output=False,
            tp_group=self.tp_group, **extra,
        )  # fmt: skip

    def row(self, inputs: int, outputs: int, bias: bool) -> RowParallelLinear:
        """Input columns split over TP, output all-reduced (then the bias is added)."""
        return RowParallelLinear(
            inputs, outputs, config=self.mp, init_method=_no_init, bias=bias, input_is_parallel=True,
            skip_bias_add=False, tp_group=self.tp_group,
        )  # fmt: skip


class Attention(nn.Module):
    """Self-attention with fused, KV-group-ordered QKV (see :mod:`sharding`), GQA, QK-norm and partial
    rotary embedding.

    ``attend`` (the attention backend) and ``core`` (the span between the QKV and output projections,
    plain or recomputed in backward) are set from outside by
    :func:`~megatron_stablelm.parallelize.parallelize`; until then they are the process-wide default
    backend and the plain span."""

    def __init__(self, cfg: Config, build: LayerFactory) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.heads = cfg.num_attention_heads // build.tp_size
        self.kv_heads = cfg.kv_heads // build.tp_size
        self.group = self.heads // self.kv_heads
        self.dropout = cfg.attention_dropout
        self.attend: kernels.AttentionSelection = kernels.default_attention
        self.core: Callable[..., torch.Tensor] = kernels.attention_core
        qkv_out = (cfg.num_attention_heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.qkv = build.column(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = make_per_head_norm(cfg, self.heads, build.mp.params_dtype)
            self.k_norm = make_per_head_norm(cfg, self.kv_heads, build.mp.params_dtype)
        self.dense = build.row(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.dense_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        qkv, _ = self.qkv(x)  # with sequence parallelism x holds s / TP positions, qkv all of them
        s, b = qkv.shape[:2]
        q, k, v = split_qkv(qkv.view(s, b, self.kv_heads, self.group + 2, self.head_dim))
        if cache is not None:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = kernels.apply_rotary_qk(q, k, cos, sin)
            out = cache.attend(*(t.transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        else:
            dropout = self.dropout if self.training else 0.0
            # Heads are sharded across TP ranks, so on GPU their dropout masks must come from
            # megatron-core's per-rank tracker stream, not the stream shared by the TP group.
            rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout and q.is_cuda else nullcontext()
            with rng:
                out = self.core(
                    q, k, v, cos, sin, self.q_norm, self.k_norm, cu_seqlens, max_seqlen, dropout,
                    attend=self.attend,
                )  # fmt: skip
        out = out.reshape(s, b, self.heads * self.head_dim)
        return self.dense(out)[0]


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; gated (SwiGLU) when ``mlp_type`` is gated, fc1 then holds ``[gate | up]``."""

    def __init__(self, cfg: Config, build: LayerFactory) -> None:
        super().__init__()
        self.gated = cfg.is_gated_mlp
        width = cfg.ffn_hidden_size
        self.act_name = cfg.act_fn_name
        bias = cfg.mlp_bias
        if self.gated:
            self.fc1 = build.column(cfg.hidden_size, 2 * width, bias=bias, fused_parts=2)
        else:
            self.fc1 = build.column(cfg.hidden_size, width, bias=bias)
        self.fc2 = build.row(width, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x)
        if self.gated and self.act_name == "silu":
            h = kernels.swiglu(h)
        elif self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = _ACTIVATIONS[self.act_name](gate) * up
        else:
            h = _ACTIVATIONS[self.act_name](h)
        return self.fc2(h)[0]


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # GPT-NeoX's bias_gelu_fusion
    "silu": F.silu,
    "relu": F.relu,
}


class TransformerLayer(nn.Module):
    """Pre-norm block; sequential residual, or GPT-J parallel residual with one or two LayerNorms."""

    def __init__(self, cfg: Config, build: LayerFactory) -> None:
        super().__init__()
        dtype = build.mp.params_dtype
        self.parallel_residual = cfg.gpt_j_residual
        self.input_norm = make_norm(cfg, cfg.hidden_size, dtype)
        self.post_attention_norm = None if cfg.gpt_j_tied else make_norm(cfg, cfg.hidden_size, dtype)
        self.attention = Attention(cfg, build)
        self.mlp = MLP(cfg, build)
        self.hidden_dropout = cfg.hidden_dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.hidden_dropout and self.training):
            return x
        # Under sequence parallelism each TP rank holds different positions, so on GPU their masks come
        # from megatron-core's per-rank tracker stream (as Megatron-LM does), not the shared stream.
        split = self.mlp.fc2.sequence_parallel and x.is_cuda
        with tensor_parallel.get_cuda_rng_tracker().fork() if split else nullcontext():
            return F.dropout(x, self.hidden_dropout, True)

    def forward(
        self, x, cos, sin, cu_seqlens=None, max_seqlen=None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        normed = self.input_norm(x)
        attn = self._drop(self.attention(normed, cos, sin, cu_seqlens, max_seqlen, cache))
        if self.parallel_residual:
            mlp_in = normed if self.post_attention_norm is None else self.post_attention_norm(x)
            return x + attn + self._drop(self.mlp(mlp_in))
        mlp_in, x = self.post_attention_norm.add_norm(attn, x)
        return x + self._drop(self.mlp(mlp_in))


class LayerCache:
    """One layer's keys and values for incremental decoding, preallocated ``[b, max_len, kv_heads, d]``
    (this rank's KV heads)."""

    def __init__(self, owner: InferenceCache, k: torch.Tensor, v: torch.Tensor) -> None:
        self.owner, self.k, self.v = owner, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new keys/values after the cached ones; attend causally over all of them."""
        start, new = self.owner.length, q.shape[1]
        end = start + new
        if end > self.k.shape[1]:
            raise ValueError(f"sequence of {end} tokens exceeds the cache size {self.k.shape[1]}")
        self.k[:, start:end], self.v[:, start:end] = k, v
        keys, values = self.k[:, :end], self.v[:, :end]
        # query i (absolute position start+i) sees keys 0..start+i
        allowed = torch.ones(new, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, keys, values))
        out = F.scaled_dot_product_attention(
            qt, kt, vt, attn_mask=allowed, enable_gqa=qt.shape[1] != kt.shape[1]
        )
        return out.transpose(1, 2)


class InferenceCache:
    """Keys/values of every layer for generation with :meth:`StableLMModel.forward` (``cache=``)."""

    def __init__(self, model: StableLMModel, batch: int, max_len: int) -> None:
        attn = model.layers[0].attention
        param = next(model.parameters())
        shape = (batch, max_len, attn.kv_heads, attn.head_dim)
        self.length = 0
        self.layers = [
            LayerCache(
                self,
                torch.empty(shape, dtype=param.dtype, device=param.device),
                torch.empty(shape, dtype=param.dtype, device=param.device),
            )
            for _ in model.layers
        ]

    def advance(self, steps: int) -> None:
        self.length += steps


def model_parallel_config(
    dtype: torch.dtype, tp_size: int, sequence_parallel: bool = False
) -> ModelParallelConfig:
    """megatron-core's layer config: CPU allocation, no initialisation (see :func:`init_weights`),
    sequence parallelism as asked (megatron-core accepts it at ``tp_size`` > 1 only)."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        params_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=sequence_parallel,
    )


def _sum_gradient_over_tp(group: dist.ProcessGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook for a TP-replicated parameter under sequence parallelism: each rank's gradient
    covers only its own positions, the true gradient is their sum over the TP group. A tensor hook runs
    on each backward's gradient before it is accumulated into ``.grad`` (and before DeepSpeed's
    accumulation hooks move it into its fp32 buffers or partitions), so gradient accumulation, ZeRO
    stages and precisions all see the summed gradient, as at TP=1. Summed in fp32 (vectors of the
    hidden size: negligible traffic)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        total = grad.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        dist.all_reduce(total, group=group)
        return total.to(grad.dtype)

    return hook


class StableLMModel(nn.Module):
    """Embedding → layers → final LayerNorm → vocab-parallel LM head (tied or not).

    ``tp_group``: the tensor-parallel group the layers split over and communicate in (default: the
    current megatron-core TP group). ``splits`` maps every parameter name to its :class:`ShardSpec`."""

    def __init__(
        self,
        cfg: Config,
        vocab_size: int,
        dtype: torch.dtype = torch.float32,
        tp_group: TPGroup | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.tp_group = parallel.tp_group() if tp_group is None else tp_group
        tp = self.tp_group.size()
        if vocab_size % tp:
            raise ValueError(f"padded vocab {vocab_size} is not divisible by the tensor-parallel size {tp}")
        # sequence parallelism: megatron-core's, for the whole model (see the module doc)
        self.sequence_parallel = cfg.sequence_parallel_requested and tp > 1
        if self.sequence_parallel:
            parallel.allow_megatron_collectives_on_cpu()
        build = LayerFactory(model_parallel_config(dtype, tp, self.sequence_parallel), self.tp_group)
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            vocab_size, cfg.hidden_size, init_method=_no_init, config=build.mp, tp_group=self.tp_group,
            reduce_scatter_embeddings=self.sequence_parallel,
        )  # fmt: skip
        self.layers = nn.ModuleList(TransformerLayer(cfg, build) for _ in range(cfg.num_layers))
        self.final_norm = make_norm(cfg, cfg.hidden_size, dtype)
        self.output = build.column(
            cfg.hidden_size, vocab_size, bias=False, skip_weight_param_allocation=cfg.tied_embeddings
        )
        self.splits: dict[str, ShardSpec] = model_splits(self)
        # megatron-core marks sharded weights only when it initialises them itself (we do not: see
        # init_weights). DeepSpeed reads these marks to count each shard once in the gradient norm.
        for name, param in self.named_parameters():
            spec = self.splits[name]
            if spec.dim is not None:  # (megatron's setter asserts they are unset; some already are)
                param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, spec.dim, 1
            elif self.sequence_parallel:
                # Every replicated parameter lives between the TP regions (LayerNorms, row-parallel
                # biases): megatron-core's mark, which it sets on its own row-parallel biases.
                param.sequence_parallel = True
                param.register_hook(_sum_gradient_over_tp(self.tp_group))
        self._sp_layers = [
            m for m in self.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
        ]

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        labels: torch.Tensor | None = None,
        cache: InferenceCache | None = None,
    ) -> torch.Tensor:
        """Vocab-parallel logits ``[b, s, V/tp]``, or with ``labels`` the fp32 per-token loss ``[b, s]``.

        With ``cache`` (generation), ``tokens`` continue the cached sequence: positions start at
        ``cache.length`` and keys/values are appended to the cache."""
        split = self._split_sequence(tokens.shape[1])
        if split == self.sequence_parallel:
            return self._forward(tokens, position_ids, cu_seqlens, max_seqlen, labels, cache, split)
        with self._sequence_parallel_layers(split):
            return self._forward(tokens, position_ids, cu_seqlens, max_seqlen, labels, cache, split)

    def _split_sequence(self, s: int) -> bool:
        """Whether this call splits its ``s`` positions over TP: always under sequence parallelism,
        except for a length TP does not divide (a one-token decoding step, an odd prompt or scoring
        length), which runs with all-reduces instead: the same result, and without autograd there are
        no saved activations to split. Training needs every call split (a recomputed layer must run as
        its forward did), which ``seq_length % TP == 0`` guarantees (config validation)."""
        tp = self.tp_group.size()
        if not self.sequence_parallel or s % tp == 0:
            return self.sequence_parallel
        if self.training and torch.is_grad_enabled():
            raise ValueError(
                f"sequence parallelism splits the sequence over TP={tp}, but this batch has {s} positions; "
                "seq_length must be a multiple of model_parallel_size"
            )
        return False

    @contextmanager
    def _sequence_parallel_layers(self, enabled: bool):
        """megatron-core's layers read their ``sequence_parallel`` flag (the embedding its
        ``reduce_scatter_embeddings``) at each forward; set them for one call, then restore. Backward
        does not read them (the autograd functions keep what their forward did)."""
        layers = self._sp_layers
        try:
            for layer in layers:
                layer.sequence_parallel = enabled
            self.embedding.reduce_scatter_embeddings = enabled
            yield
        finally:
            for layer in layers:
                layer.sequence_parallel = self.sequence_parallel
            self.embedding.reduce_scatter_embeddings = self.sequence_parallel

    def run_layers(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, cache: InferenceCache | None = None):
        """The transformer layers in order (``parallelize.apply_full_recompute`` replaces this on the
        instance to recompute them in chunks)."""
        for index, layer in enumerate(self.layers):
            layer_cache = cache.layers[index] if cache is not None else None
            x = layer(x, cos, sin, cu_seqlens, max_seqlen, layer_cache)
        return x

    def _forward(self, tokens, position_ids, cu_seqlens, max_seqlen, labels, cache, split: bool):
        b, s = tokens.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + s, device=tokens.device).expand(b, s)
        if split:  # megatron-core's embedding transposes and reduce-scatters: [s / TP, b, h]
            x = self.embedding(tokens)
        else:
            x = self.embedding(tokens).transpose(0, 1).contiguous()  # [s, b, h]
        cos, sin = kernels.rotary_cos_sin(
            position_ids.transpose(0, 1), self.cfg.rotary_dim, self.cfg.rotary_emb_base, x.dtype
        )
        x = self.run_layers(x, cos, sin, cu_seqlens, max_seqlen, cache)
        if cache is not None:
            cache.advance(s)
        x = self.final_norm(x)
        if labels is not None and self.cfg.use_flash_cross_entropy:
            # LM head and loss fused, chunk by chunk: the [tokens, V/tp] logits never exist (one
            # extra head matmul in backward); the hidden gradient is all-reduced over TP inside.
            head = self.embedding.weight if self.cfg.tied_embeddings else self.output.weight
            if split:
                # every rank scores the whole sequence with its vocab slice; its hidden gradient is a
                # partial sum, which the gather's backward reduce-scatters (so the loss must not reduce)
                x = tensor_parallel.gather_from_sequence_parallel_region(
                    x, tensor_parallel_output_grad=True, group=self.tp_group
                )
            losses = kernels.fused_linear_cross_entropy(
                x, head, labels.transpose(0, 1), self.tp_group, reduce_input_grad=not split
            )
            return losses.transpose(0, 1)
        weight = self.embedding.weight if self.cfg.tied_embeddings else None
        logits, _ = self.output(x, weight=weight)  # [s, b, V/tp] (all positions: the head all-gathers)
        if labels is None:
            return logits.transpose(0, 1)
        # Chunked vocab-parallel cross-entropy: fp32 math on one block of logits at a time, so neither
        # fp32 logits of the whole vocab nor a gathered vocab are ever materialised. Nothing else reads
        # the logits after the loss (the head's backward needs its input and weight only), so the
        # logits gradient is written over them in place: one [tokens, V/tp] buffer fewer.
        losses = kernels.vocab_parallel_cross_entropy(
            logits, labels.transpose(0, 1), self.tp_group, inplace_backward=True
        )
        return losses.transpose(0, 1)

    # ------------------------------------------------------------------ canonical weights
    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This TP rank's shards under canonical names (no tied duplicates)."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def load_canonical_state_dict(self, full: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy whole-model tensors in, each split for this rank."""
        rank, size = self.tp_group.rank(), self.tp_group.size()
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(full))
        unexpected = sorted(set(full) - set(params))
        if strict and (missing or unexpected):
            raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                if name not in full:
                    continue
                shard = self.splits[name].split(full[name], rank, size)
                if shard.shape != param.shape:
                    raise ValueError(
                        f"{name}: checkpoint shard {tuple(shard.shape)} vs model {tuple(param.shape)}"
                    )
                param.copy_(shard)


def init_std(method: str, cfg: Config) -> float | None:
    """Standard deviation of GPT-NeoX's named init methods (None for the xavier ones)."""
    sigma, layers, hidden = cfg.init_method_std, cfg.num_layers, cfg.hidden_size
    return {
        "normal": sigma,
        "scaled_normal": sigma / math.sqrt(2.0 * layers),
        "small_init": math.sqrt(2.0 / (5.0 * hidden)),
        "wang_init": 2.0 / (layers * math.sqrt(hidden)),
    }.get(method)


_OUTPUT_LAYERS = (".attention.dense.weight", ".mlp.fc2.weight")


@torch.no_grad()
def init_weights(model: StableLMModel, seed: int) -> None:
    """Initialise every parameter as its *whole* canonical tensor drawn from a generator seeded by
    (seed, name), then keep this rank's shard. The result is the same model at every TP size, which
    the TP-equivalence tests and resharding rely on."""
    cfg = model.cfg
    rank, size = model.tp_group.rank(), model.tp_group.size()
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.zero_()
            continue
        if "norm" in name:
            param.fill_(1.0)
            continue
        method = cfg.output_layer_init_method if name.endswith(_OUTPUT_LAYERS) else cfg.init_method
        spec = model.splits[name]
        shape = spec.full_shape(param.shape, size)
        gen = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.empty(shape, dtype=torch.float32, device=param.device)
        std = init_std(method, cfg)
        if std is not None:
            full.normal_(0.0, std, generator=gen)
        else:
            fan_out, fan_in = shape[0], shape[1]
            gain = math.sqrt(2.0 / (fan_in + fan_out))
            if method == "xavier_uniform":
                bound = math.sqrt(3.0) * gain
                full.uniform_(-bound, bound, generator=gen)
            else:
                full.normal_(0.0, gain, generator=gen)
        param.copy_(spec.split(full, rank, size))


def shape_model(cfg: Config, vocab_size: int) -> StableLMModel:
    """The single-rank model on the meta device: whole shapes and splits, no memory, no process group,
    and no process-wide state touched."""
    with torch.device("meta"):
        return StableLMModel(cfg, vocab_size, tp_group=SingleRankGroup())


def canonical_shapes(cfg: Config, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Whole-model parameter shapes under canonical names."""
    return {name: tuple(param.shape) for name, param in shape_model(cfg, vocab_size).named_parameters()}


def config_splits(cfg: Config) -> dict[str, ShardSpec]:
    """How every parameter of ``cfg``'s model splits over TP, without building a real model (for tools
    that read or reshard checkpoints). The splits do not depend on the vocabulary size."""
    return shape_model(cfg, vocab_size=1).splits


def build_model(
    cfg: Config,
    vocab_size: int,
    dtype: str | torch.dtype = torch.float32,
    seed: int | None = None,
    *,
    tp_group: TPGroup | None = None,
    attention: str | None = None,
) -> StableLMModel:
    """Construct on the current default device, initialise (``seed`` defaults to the config's) and
    :func:`~megatron_stablelm.parallelize.parallelize` (``attention`` overrides the config's
    attention type; ``tp_group`` defaults to the current megatron-core TP group)."""
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    model = StableLMModel(cfg, vocab_size, dtype=dtype, tp_group=tp_group)
    init_weights(model, cfg.seed if seed is None else seed)
    return parallelize(model, cfg, attention=attention)
