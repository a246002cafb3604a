"""Model inspection without allocating weights: ``python -m megatron_stablelm.inspect CONFIG...``.

Prints the resolved architecture, the exact parameter count, the padded vocabulary and an estimate of
memory per GPU for the config's parallel layout. Both are arithmetic (:func:`parameters_per_gpu`, checked
against the model built on the meta device by tests/test_inspect.py, and :func:`activation_bytes`): no
weight is allocated and no model is built, so any config inspects at once, and train.py refuses a model
that cannot fit its device (:func:`check_fits`) before building anything.

Memory model (per GPU, bytes):

* weights: parameters / TP in the compute dtype (2 bytes for bf16/fp16, 4 for fp32);
* gradients: the same size as the weights (DeepSpeed keeps them in the compute dtype);
* optimizer: fp32 master weights (only with bf16/fp16) + Adam's two fp32 moments, divided by DP under
  ZeRO stage >= 1;
* activations: what autograd keeps for backward per micro-batch (:func:`activation_bytes`), counted
  tensor by tensor as this model saves them, in two parts per layer. Between the tensor-parallel
  regions (LayerNorm inputs, the linears' inputs, the residual stream: ``h`` wide) every rank holds the
  whole sequence, unless sequence parallelism splits it over TP. Inside them (QKV output, rotated Q/K,
  attention output, MLP hidden: split by heads or width) each rank holds ``1/TP``. The same split as
  Korthikanti et al. (2022), ``s·b·h·(10 + 24/TP)`` without and ``s·b·h·34/TP`` with sequence
  parallelism for GPT-3's layer, with this model's widths (GQA, SwiGLU, one or two LayerNorms).
  Full activation checkpointing keeps each checkpointed layer's input plus one chunk's activations
  during its recomputation. The LM head adds its input and the logits (or with
  ``use_flash_cross_entropy`` the gathered hidden states).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_stablelm.cli import add_config_arguments, overrides_from, parse_config_args, positive_int
from megatron_stablelm.config import Config, ConfigError, load_config
from megatron_stablelm.config.precision import bytes_per_value, optimizer_bytes_per_parameter

GIB = 1024**3


def resolve_vocab(cfg: Config, override: int | None = None) -> int:
    """Padded vocab: the command-line override, else :meth:`Config.padded_vocab` (the one rule:
    ``padded_vocab_size``, else the tokenizer's size padded), reading the tokenizer only when the
    rule needs it and its ``vocab_file`` is present."""
    if override is not None:
        return override
    if cfg.padded_vocab_size is not None:
        return cfg.padded_vocab()
    if cfg.vocab_file and Path(cfg.vocab_file).is_file():
        from megatron_stablelm.tokenizers import build_tokenizer

        return cfg.padded_vocab(build_tokenizer(cfg).vocab_size)
    raise ConfigError(
        f"cannot tell the vocabulary size: vocab_file {cfg.vocab_file!r} is not present and the config has no "
        "padded_vocab_size; pass --padded-vocab-size N"
    )


@dataclass
class MemoryEstimate:
    """Bytes per GPU. ``activations`` at the layout's own sequence-parallel setting; the other two
    fields say what it would be without and with sequence parallelism (equal at TP 1)."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    activations_without_sp: float = 0.0
    activations_with_sp: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def parameters_per_gpu(cfg: Config, vocab: int) -> int:
    """Parameters one GPU of a TP group holds (weights split over TP, norms and row-parallel biases
    replicated), counted from the config: no model is built, so even a config with 10⁷ layers is
    counted at once (tests/test_inspect.py checks it against the meta model's shapes and splits)."""
    tp, h, d = cfg.model_parallel_size, cfg.hidden_size, cfg.head_dim
    a, kv, ffn = cfg.num_attention_heads, cfg.kv_heads, cfg.ffn_hidden_size
    norm = h * (2 if cfg.norm_bias else 1)
    split = (a + 2 * kv) * d * (h + cfg.qkv_bias) + a * d * h  # QKV (+ bias), attention output
    split += (2 if cfg.is_gated_mlp else 1) * ffn * (h + cfg.mlp_bias) + ffn * h  # fc1 (+ bias), fc2
    if cfg.qk_norm:
        split += (a + kv) * d * (2 if cfg.qk_norm_bias else 1)
    replicated = norm * (1 if cfg.gpt_j_tied else 2) + h * (cfg.dense_bias + cfg.mlp_bias)
    embeddings = vocab * h * (1 if cfg.tied_embeddings else 2)
    return cfg.num_layers * (split // tp + replicated) + embeddings // tp + norm


def estimate_memory(cfg: Config, vocab: int, dp: int, flash: bool = True) -> MemoryEstimate:
    """The memory model of the module docstring at the ZeRO stage the run uses (bf16 and fp16 always
    run under ZeRO). Pure arithmetic, so it answers at once for any size."""
    tp = cfg.model_parallel_size
    per_gpu_params = parameters_per_gpu(cfg, vocab)
    weights = per_gpu_params * bytes_per_value(cfg.params_dtype_name)
    gradients = weights
    optimizer_bytes = per_gpu_params * optimizer_bytes_per_parameter(cfg.params_dtype_name)
    if cfg.effective_zero_stage >= 1:
        optimizer_bytes /= dp
    if cfg.effective_zero_stage >= 2:
        gradients /= dp
    without = activation_bytes(cfg, vocab, tp=tp, sequence_parallel=False, flash=flash)
    with_sp = activation_bytes(cfg, vocab, tp=tp, sequence_parallel=tp > 1, flash=flash)
    activations = with_sp if cfg.uses_sequence_parallel else without
    return MemoryEstimate(weights, gradients, optimizer_bytes, activations, without, with_sp)


def device_memory(local_rank: int = 0) -> tuple[int, str]:
    """(bytes, which memory) a training process has: its GPU's (the trainer runs on CUDA whenever it is
    available, on GPU ``LOCAL_RANK``), else the machine's RAM. Imports torch, so call it after the
    config checks (train.py's data checks import torch next anyway)."""
    import torch

    if torch.cuda.is_available():
        index = local_rank % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"GPU {index} ({props.name})"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"


def check_fits(cfg: Config, vocab: int, dp: int, capacity: int, device: str) -> None:
    """Refuse a model whose :func:`estimate_memory` per device exceeds ``capacity`` bytes, naming the
    sizes behind each part: building it would take minutes (or hang, at 10⁷ layers) before running out
    of memory. The estimate leaves out allocator overhead and workspaces (and the vocabulary when
    ``vocab`` is 0), so what it refuses cannot run."""
    mem = estimate_memory(cfg, vocab, dp)
    if mem.total <= capacity:
        return
    states = mem.weights + mem.gradients + mem.optimizer
    embedding = f" + vocabulary {vocab} × hidden_size {cfg.hidden_size}" if vocab else ""
    parts = {
        f"weights, gradients and optimizer states {_bytes(states)} ({parameters_per_gpu(cfg, vocab):.3g} "
        f"parameters per GPU: num_layers {cfg.num_layers} × hidden_size {cfg.hidden_size}{embedding})": states,
        f"activations {_bytes(mem.activations)} (seq_length {cfg.seq_length} × train_micro_batch_size_per_gpu "
        f"{cfg.train_micro_batch_size_per_gpu} × num_layers {cfg.num_layers} × hidden_size {cfg.hidden_size})": (
            mem.activations
        ),
    }
    detail = "; ".join(sorted(parts, key=parts.__getitem__, reverse=True))
    raise ConfigError(
        f"the model would run out of memory: it needs about {_bytes(mem.total)} per device (the estimate of "
        f"python -m megatron_stablelm.inspect), more than the {_bytes(capacity)} of {device}: {detail}"
    )


def _bytes(n: float) -> str:
    """``n`` bytes in GiB, or in the larger binary unit that keeps the number below 1024."""
    value = n / GIB
    for unit in ("GiB", "TiB", "PiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} EiB"


def activation_bytes(
    cfg: Config,
    vocab: int,
    *,
    tp: int,
    sequence_parallel: bool,
    micro_batch: int | None = None,
    flash: bool = True,
    fused_kernels: bool = True,
) -> float:
    """Bytes autograd keeps for backward per micro-batch on one GPU of a TP group of ``tp``.

    Counted as this model saves them (each storage once; ``w`` bytes per element of the compute dtype,
    ``t = tp``, ``t_sp = tp`` with sequence parallelism else 1, ``sb`` tokens):

    * between the TP regions, ``n·sb·h·w / t_sp`` per layer: the input of each LayerNorm and of each
      column-parallel linear (megatron-core's sequence-parallel linear keeps its local shard and
      all-gathers again in backward). ``n`` = 4 with a sequential residual (input norm, QKV input, the
      post-attention norm's input, MLP input), 3 with a parallel residual and two norms, 2 with one
      shared norm; plus LayerNorm statistics (fp32 mean and rstd) and 1-byte dropout masks;
    * inside them, ``sb·w / t`` per layer times: the fused QKV output ``(a + 2·kv)·d``, the rotated
      Q and K ``(a + kv)·d``, the attention output and the output projection's input ``2·a·d``, the
      MLP's up-projection and activation (``3·F`` gated, ``2·F`` otherwise); plus the attention
      log-sum-exp (fp32) or, without flash attention, the ``a·s²·b`` probabilities. With
      ``fused_kernels`` off (the PyTorch reference kernels of CPU runs) the per-head QK-norm also
      keeps its normalised Q and K, and SwiGLU its SiLU output: ``(a + kv)·d + F`` more;
    * full recomputation keeps each checkpointed chunk's input (split by ``t_sp``) and one chunk's
      activations while it is recomputed;
    * the LM head: its input and the final norm's, ``2·sb·h·w / t_sp``, the logits ``sb·V·w / t`` and
      the fp32 log-sum-exp; with ``use_flash_cross_entropy`` the (gathered) hidden states ``sb·h·w``
      instead of the logits.
    """
    s, b = cfg.seq_length, micro_batch or cfg.train_micro_batch_size_per_gpu
    h, d, a, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.kv_heads
    ffn = cfg.ffn_hidden_size
    w = bytes_per_value(cfg.params_dtype_name)
    sb, t = s * b, tp
    t_sp = tp if sequence_parallel else 1
    if cfg.gpt_j_residual:
        norms, wide = (1, 2) if cfg.gpt_j_tied else (2, 3)
    else:
        norms, wide = 2, 4
    between = wide * sb * h * w + norms * 2 * sb * 4
    if cfg.hidden_dropout:
        between += 2 * sb * h
    width = (a + 2 * kv) * d + (a + kv) * d + 2 * a * d + (3 if cfg.is_gated_mlp else 2) * ffn
    stats = 0  # fp32 per token
    if not fused_kernels:
        width += ((a + kv) * d if cfg.qk_norm else 0) + (ffn if cfg.is_gated_mlp else 0)
    if cfg.qk_norm:
        stats += 2 * (a + kv)  # the per-head norms' mean and rstd
    inside = sb * (width * w + stats * 4) / t
    inside += sb * a * 4 / t if flash else a * s * s * b * (w + 1) / t
    per_layer = between / t_sp + inside
    layers = cfg.num_layers
    if cfg.checkpoint_activations:
        chunk = max(1, cfg.checkpoint_num_layers)
        total = math.ceil(layers / chunk) * sb * h * w / t_sp + per_layer * chunk
    else:
        total = per_layer * layers
    head = 2 * sb * h * w / t_sp + sb * 4 * 2
    head += sb * h * w if cfg.use_flash_cross_entropy else sb * vocab * w / t
    return total + head


def _mlp_kind(cfg: Config) -> str:
    if not cfg.is_gated_mlp:
        return cfg.act_fn_name
    return "SwiGLU" if cfg.act_fn_name == "silu" else f"gated {cfg.act_fn_name}"


@dataclass
class CheckpointTraffic:
    """Bytes of one save (trainer checkpoint: ``checkpoint/training_state.py``). Every TP rank's files
    hold its shard of each parameter (replicated ones included); the optimizer state is fp32 Adam
    moments, plus fp32 master weights when training in bf16/fp16."""

    model: int  # every model shard file
    optimizer: int  # every optimizer file
    written_per_rank: int  # the most one rank writes: its optimizer share, plus a model shard on DP rank 0
    optimizer_per_rank: (
        int  # its optimizer share (ZeRO: its partition; without ZeRO: ~1/DP of the parameters)
    )
    optimizer_sent_per_rank: int = (
        0  # over the network to save the optimizer state: none (each rank writes its own)
    )

    @property
    def total(self) -> int:
        return self.model + self.optimizer


def checkpoint_traffic(cfg: Config, vocab: int, dp: int) -> CheckpointTraffic:
    """What one save writes and moves, from the config alone."""
    per_tp_rank = parameters_per_gpu(cfg, vocab)
    tp = cfg.model_parallel_size
    width = bytes_per_value(cfg.params_dtype_name)
    state = per_tp_rank * optimizer_bytes_per_parameter(cfg.params_dtype_name)
    share = math.ceil(state / dp)
    return CheckpointTraffic(tp * per_tp_rank * width, tp * state, share + per_tp_rank * width, share)


def report(cfg: Config, vocab: int, dp: int) -> str:
    total = parameters_per_gpu(dataclasses.replace(cfg, model_parallel_size=1), vocab)  # the whole model
    embedding = vocab * cfg.hidden_size * (1 if cfg.tied_embeddings else 2)
    mem = estimate_memory(cfg, vocab, dp)
    residual = "sequential"
    if cfg.gpt_j_residual:
        residual = "parallel (one shared LayerNorm)" if cfg.gpt_j_tied else "parallel (two LayerNorms)"
    biases = [
        f"qkv={cfg.qkv_bias}",
        f"attn_out={cfg.dense_bias}",
        f"mlp={cfg.mlp_bias}",
        f"norms={cfg.norm_bias}",
    ]
    lines = [
        f"config:              {', '.join(cfg.config_files) or '<dict>'}",
        f"layers × hidden:     {cfg.num_layers} × {cfg.hidden_size}",
        f"attention:           {cfg.num_attention_heads} heads, {cfg.kv_heads} KV heads, head dim {cfg.head_dim}"
        f"{(', per-head QK ' + ('RMSNorm' if cfg.norm == 'rmsnorm' else 'LayerNorm')) if cfg.qk_norm else ''}",
        f"rotary:              {cfg.rotary_dim}/{cfg.head_dim} dims ({cfg.rotary_pct:.0%}), base {cfg.rotary_emb_base:g}",
        f"mlp:                 {_mlp_kind(cfg)} width {cfg.ffn_hidden_size}",
        f"residual:            {residual}",
        f"norm:                {cfg.norm}, eps {cfg.norm_epsilon:g}",
        f"biases:              {', '.join(biases)}",
        f"embeddings:          {'tied' if cfg.tied_embeddings else 'untied'}",
        f"sequence length:     {cfg.seq_length}",
        f"padded vocab:        {vocab:,}",
        f"parameters:          {total:,} ({total / 1e9:.3f} B; {total - embedding:,} non-embedding)",
        f"parallel layout:     TP={cfg.model_parallel_size} × DP={dp} ({cfg.model_parallel_size * dp} GPUs), "
        f"ZeRO stage {cfg.effective_zero_stage}, {cfg.params_dtype_name}",
        f"micro-batch:         {cfg.train_micro_batch_size_per_gpu} × {cfg.seq_length} tokens, "
        f"activation checkpointing {'on' if cfg.checkpoint_activations else 'off'}",
        "memory per GPU (estimate):",
        f"  weights            {mem.weights / GIB:8.2f} GiB",
        f"  gradients          {mem.gradients / GIB:8.2f} GiB",
        f"  optimizer states   {mem.optimizer / GIB:8.2f} GiB",
        f"  activations        {mem.activations / GIB:8.2f} GiB (flash attention, {_sp_state(cfg)})",
        f"  total              {mem.total / GIB:8.2f} GiB",
        f"activations per GPU at TP={cfg.model_parallel_size} (micro-batch {cfg.train_micro_batch_size_per_gpu}):",
        f"  sequence parallel off {mem.activations_without_sp / GIB:8.2f} GiB",
    ]
    if cfg.model_parallel_size > 1:
        lines.append(f"  sequence parallel on  {mem.activations_with_sp / GIB:8.2f} GiB")
    else:
        lines.append("  sequence parallel on  (acts only at TP > 1: the same)")
    save = checkpoint_traffic(cfg, vocab, dp)
    lines += [
        f"checkpoint (one save): {save.total / GIB:8.2f} GiB: weights {save.model / GIB:.2f} GiB, "
        f"optimizer state {save.optimizer / GIB:.2f} GiB",
        f"  each rank writes   {save.optimizer_per_rank / GIB:8.2f} GiB of optimizer state (its share; "
        f"DP rank 0 of each TP group also {(save.written_per_rank - save.optimizer_per_rank) / GIB:.2f} GiB of weights)",
        f"  each rank sends    {save.optimizer_sent_per_rank:8d} B of optimizer state over the network (it writes its own ZeRO partition)",
    ]
    return "\n".join(lines)


def _sp_state(cfg: Config) -> str:
    if cfg.uses_sequence_parallel:
        return "sequence parallelism on"
    if cfg.sequence_parallel_requested:
        return "sequence parallelism asked for, acts only at TP > 1"
    return "sequence parallelism off"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_stablelm.inspect", description=__doc__.split("\n")[0]
    )
    add_config_arguments(parser)
    parser.add_argument("--padded-vocab-size", type=positive_int, default=None)
    parser.add_argument("--dp", type=positive_int, default=1, help="data-parallel size for the ZeRO estimate")
    args = parse_config_args(parser, argv)
    try:
        cfg = load_config(args.configs, overrides_from(args))
        vocab = resolve_vocab(cfg, args.padded_vocab_size)
        print(report(cfg, vocab, args.dp))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
