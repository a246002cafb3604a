"""The StableLM transformer, on megatron-core's tensor-parallel layers.

One class covers every StableLM generation; the config picks the variant:

==========================  ======================================================================
Alpha v1 (GPT-NeoX)         GeLU MLP with biases, fused QKV with bias, two LayerNorms, parallel residual
Alpha v2                    SwiGLU, one shared LayerNorm (``gpt_j_tied``), parallel residual, no biases
3B-4E1T                     SwiGLU, sequential residual, LayerNorm with bias, no linear biases
Stable LM 2 1.6B            as 3B-4E1T plus Q/K/V-only biases (``use_qkv_bias``)
Stable LM 2 12B             GQA, per-head QK LayerNorm, parallel residual with one LayerNorm, no biases
==========================  ======================================================================

Activations are sequence-first ``[s, b, h]`` inside (megatron-core's convention); the public
interface is batch-first. Parameter names are the canonical names of :mod:`megatron_stablelm.sharding`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core import tensor_parallel
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from megatron_stablelm import kernels, parallel
from megatron_stablelm.config import Config
from megatron_stablelm.sharding import shard_spec

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _no_init(_: torch.Tensor) -> None:
    """Weights are initialised by :func:`init_weights` instead (TP-independent, see there)."""


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear. At TP=1 its autograd function reduces to a plain matmul
    but still costs a Python-level forward and backward per call (measurable on small models, and it
    forgoes the bias-add epilogue of ``addmm``), so a single-rank layout calls ``F.linear`` with the
    same parameters instead: the same math, no communication either way."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None):
        if self.tp_group.size() > 1:
            return super().forward(x, weight=weight)
        weight = self.weight if weight is None else weight
        if self.skip_bias_add:
            return F.linear(x, weight), self.bias
        return F.linear(x, weight, self.bias), None


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's row-parallel linear, with the same single-rank shortcut as
    :class:`ColumnParallelLinear` (at TP=1 there is nothing to all-reduce)."""

    def forward(self, x: torch.Tensor):
        if self.tp_group.size() > 1:
            return super().forward(x)
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None


class LayerNorm(nn.Module):
    """LayerNorm whose bias is optional (Stable LM 2 has none), over the last dim."""

    def __init__(self, size: int, eps: float, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(size, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.layer_norm(x, self.weight, self.bias, self.eps)


class PerHeadLayerNorm(nn.Module):
    """QK-norm: one LayerNorm per attention head (weights ``[local heads, head_dim]``)."""

    def __init__(self, heads: int, head_dim: int, eps: float, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.per_head_layer_norm(x, self.weight, self.bias, self.eps)


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


class Attention(nn.Module):
    """Self-attention with fused, KV-group-ordered QKV (see :mod:`sharding`), GQA, QK-norm and partial
    rotary embedding."""

    def __init__(self, cfg: Config, mp: ModelParallelConfig) -> None:
        super().__init__()
        tp = mp.tensor_model_parallel_size
        self.head_dim = cfg.head_dim
        self.heads = cfg.num_attention_heads // tp
        self.kv_heads = cfg.kv_heads // tp
        self.group = self.heads // self.kv_heads
        self.dropout = cfg.attention_dropout
        self.selective_recompute = cfg.recompute_granularity == "selective"
        dtype = mp.params_dtype
        qkv_out = (cfg.num_attention_heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.qkv = ColumnParallelLinear(
            cfg.hidden_size, qkv_out, config=mp, init_method=_no_init, bias=cfg.qkv_bias, gather_output=False
        )
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            eps, bias = cfg.layernorm_epsilon, cfg.use_bias_in_qk_norm
            self.q_norm = PerHeadLayerNorm(self.heads, self.head_dim, eps, bias, dtype)
            self.k_norm = PerHeadLayerNorm(self.kv_heads, self.head_dim, eps, bias, dtype)
        self.dense = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim,
            cfg.hidden_size,
            config=mp,
            init_method=_no_init,
            bias=cfg.dense_bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        s, b, _ = x.shape
        qkv, _ = self.qkv(x)
        q, k, v = split_qkv(qkv.view(s, b, self.kv_heads, self.group + 2, self.head_dim))
        if cache is not None:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = kernels.apply_rotary_qk(q, k, cos, sin)
            out = cache.attend(*(t.transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        else:
            # QK-norm, rotary and attention; under selective recomputation this span is recomputed in
            # backward instead of keeping its intermediates (no matmul is redone).
            dropout = self.dropout if self.training else 0.0
            # Heads are sharded across TP ranks, so on GPU their dropout masks must come from
            # megatron-core's per-rank tracker stream, not the stream shared by the TP group.
            rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout and q.is_cuda else nullcontext()
            with rng:
                out = kernels.recompute_attention_core(
                    q, k, v, cos, sin, self.q_norm, self.k_norm, cu_seqlens, max_seqlen, dropout,
                    enabled=self.training and self.selective_recompute,
                )  # fmt: skip
        out = out.reshape(s, b, self.heads * self.head_dim)
        return self.dense(out)[0]


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; gated (SwiGLU) when ``mlp_type`` is gated, fc1 then holds ``[gate | up]``."""

    def __init__(self, cfg: Config, mp: ModelParallelConfig) -> None:
        super().__init__()
        self.gated = cfg.is_gated_mlp
        width = cfg.ffn_hidden_size
        self.act_name = cfg.act_fn_name
        self.fc1 = ColumnParallelLinear(
            cfg.hidden_size,
            2 * width if self.gated else width,
            config=mp,
            init_method=_no_init,
            bias=cfg.use_bias_in_mlp,
            gather_output=False,
        )
        self.fc2 = RowParallelLinear(
            width,
            cfg.hidden_size,
            config=mp,
            init_method=_no_init,
            bias=cfg.use_bias_in_mlp,
            input_is_parallel=True,
            skip_bias_add=False,
        )

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
    "silu": F.silu,
    "relu": F.relu,
}


class TransformerLayer(nn.Module):
    """Pre-norm block; sequential residual, or GPT-J parallel residual with one or two LayerNorms."""

    def __init__(self, cfg: Config, mp: ModelParallelConfig) -> None:
        super().__init__()
        dtype, eps, bias = mp.params_dtype, cfg.layernorm_epsilon, cfg.use_bias_in_norms
        self.parallel_residual = cfg.gpt_j_residual
        self.input_norm = LayerNorm(cfg.hidden_size, eps, bias, dtype)
        self.post_attention_norm = None if cfg.gpt_j_tied else LayerNorm(cfg.hidden_size, eps, bias, dtype)
        self.attention = Attention(cfg, mp)
        self.mlp = MLP(cfg, mp)
        self.hidden_dropout = cfg.hidden_dropout

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.hidden_dropout, self.training) if self.hidden_dropout else x

    def forward(
        self, x, cos, sin, cu_seqlens=None, max_seqlen=None, cache: LayerCache | None = None
    ) -> torch.Tensor:
        normed = self.input_norm(x)
        attn = self._drop(self.attention(normed, cos, sin, cu_seqlens, max_seqlen, cache))
        if self.parallel_residual:
            mlp_in = normed if self.post_attention_norm is None else self.post_attention_norm(x)
            return x + attn + self._drop(self.mlp(mlp_in))
        norm = self.post_attention_norm
        mlp_in, x = kernels.add_layer_norm(attn, x, norm.weight, norm.bias, norm.eps)
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


def model_parallel_config(cfg: Config, dtype: torch.dtype) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=parallel.tp_size(),
        params_dtype=dtype,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


class StableLMModel(nn.Module):
    """Embedding → layers → final LayerNorm → vocab-parallel LM head (tied or not)."""

    def __init__(self, cfg: Config, vocab_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        tp = parallel.tp_size()
        if vocab_size % tp:
            raise ValueError(f"padded vocab {vocab_size} is not divisible by the tensor-parallel size {tp}")
        mp = model_parallel_config(cfg, dtype)
        kernels.select_attention_backend(
            kernels.attention_type_from_config(cfg.attention_config, cfg.num_layers)
        )
        self.embedding = tensor_parallel.VocabParallelEmbedding(
            vocab_size, cfg.hidden_size, init_method=_no_init, config=mp
        )
        self.layers = nn.ModuleList(TransformerLayer(cfg, mp) for _ in range(cfg.num_layers))
        self.final_norm = LayerNorm(cfg.hidden_size, cfg.layernorm_epsilon, cfg.use_bias_in_norms, dtype)
        self.output = ColumnParallelLinear(
            cfg.hidden_size,
            vocab_size,
            config=mp,
            init_method=_no_init,
            bias=False,
            gather_output=False,
            skip_weight_param_allocation=cfg.tied_embeddings,
        )
        self.checkpoint_layers = cfg.checkpoint_num_layers if cfg.checkpoint_activations else 0
        # megatron-core marks sharded weights only when it initialises them itself (we do not: see
        # init_weights). DeepSpeed reads these marks to count each shard once in the gradient norm.
        for name, param in self.named_parameters():
            spec = self.canonical_spec(name)
            if spec.dim is not None:  # (megatron's setter asserts they are unset; some already are)
                param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, spec.dim, 1

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
        b, s = tokens.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + s, device=tokens.device).expand(b, s)
        x = self.embedding(tokens).transpose(0, 1).contiguous()  # [s, b, h]
        cos, sin = kernels.rotary_cos_sin(
            position_ids.transpose(0, 1), self.cfg.rotary_dim, self.cfg.rotary_emb_base, x.dtype
        )
        for index, layer in enumerate(self.layers):
            if cache is not None:
                x = layer(x, cos, sin, cache=cache.layers[index])
            elif self.training and self.checkpoint_layers and index % max(1, self.checkpoint_layers) == 0:
                x = _checkpointed(layer, x, cos, sin, cu_seqlens, max_seqlen)
            else:
                x = layer(x, cos, sin, cu_seqlens, max_seqlen)
        if cache is not None:
            cache.advance(s)
        x = self.final_norm(x)
        if labels is not None and self.cfg.use_flash_cross_entropy:
            # LM head and loss fused, chunk by chunk: the [tokens, V/tp] logits never exist (one
            # extra head matmul in backward); the hidden gradient is all-reduced over TP inside.
            head = self.embedding.weight if self.cfg.tied_embeddings else self.output.weight
            losses = kernels.fused_linear_cross_entropy(x, head, labels.transpose(0, 1), parallel.tp_group())
            return losses.transpose(0, 1)
        weight = self.embedding.weight if self.cfg.tied_embeddings else None
        logits, _ = self.output(x, weight=weight)  # [s, b, V/tp]
        if labels is None:
            return logits.transpose(0, 1)
        # Chunked vocab-parallel cross-entropy: fp32 math on one block of logits at a time, so neither
        # fp32 logits of the whole vocab nor a gathered vocab are ever materialised. Nothing else reads
        # the logits after the loss (the head's backward needs its input and weight only), so the
        # logits gradient is written over them in place: one [tokens, V/tp] buffer fewer.
        losses = kernels.vocab_parallel_cross_entropy(
            logits, labels.transpose(0, 1), parallel.tp_group(), inplace_backward=True
        )
        return losses.transpose(0, 1)

    # ------------------------------------------------------------------ canonical weights
    def canonical_spec(self, name: str):
        return shard_spec(name, self.cfg.is_gated_mlp)

    def local_state_dict(self) -> dict[str, torch.Tensor]:
        """This TP rank's shards under canonical names (no tied duplicates)."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def load_canonical_state_dict(self, full: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy whole-model tensors in, each split for this rank."""
        rank, size = parallel.tp_rank(), parallel.tp_size()
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(full))
        unexpected = sorted(set(full) - set(params))
        if strict and (missing or unexpected):
            raise KeyError(f"state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, param in params.items():
                if name not in full:
                    continue
                shard = self.canonical_spec(name).split(full[name], rank, size)
                if shard.shape != param.shape:
                    raise ValueError(
                        f"{name}: checkpoint shard {tuple(shard.shape)} vs model {tuple(param.shape)}"
                    )
                param.copy_(shard)


def _checkpointed(layer: TransformerLayer, x, cos, sin, cu_seqlens, max_seqlen) -> torch.Tensor:
    """Full activation recomputation of one layer. On GPU through megatron-core's checkpoint, which
    restores its CUDA RNG tracker so dropout is reproducible; megatron's needs CUDA, so on CPU through
    torch's (which restores the CPU RNG state)."""
    if x.is_cuda:
        return tensor_parallel.checkpoint(layer, False, x, cos, sin, cu_seqlens, max_seqlen)
    return torch.utils.checkpoint.checkpoint(
        layer, x, cos, sin, cu_seqlens, max_seqlen, use_reentrant=False, preserve_rng_state=True
    )


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
    rank, size = parallel.tp_rank(), parallel.tp_size()
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.zero_()
            continue
        if "norm" in name:
            param.fill_(1.0)
            continue
        method = cfg.output_layer_init_method if name.endswith(_OUTPUT_LAYERS) else cfg.init_method
        spec = model.canonical_spec(name)
        shape = list(param.shape)
        if spec.dim is not None:
            shape[spec.dim] *= size
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


def canonical_shapes(cfg: Config, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Whole-model parameter shapes under canonical names, from a model built on the meta device (no
    memory is allocated) at the current TP size, scaled back to whole tensors."""
    with torch.device("meta"):
        model = StableLMModel(cfg, vocab_size)
    size = parallel.tp_size()
    shapes = {}
    for name, param in model.named_parameters():
        shape = list(param.shape)
        spec = model.canonical_spec(name)
        if spec.dim is not None:
            shape[spec.dim] *= size
        shapes[name] = tuple(shape)
    return shapes


def build_model(
    cfg: Config, vocab_size: int, dtype: str | torch.dtype = torch.float32, seed: int | None = None
):
    """Construct on the current default device and initialise (``seed`` defaults to the config's)."""
    if isinstance(dtype, str):
        dtype = _DTYPES[dtype]
    model = StableLMModel(cfg, vocab_size, dtype=dtype)
    init_weights(model, cfg.seed if seed is None else seed)
    return model
