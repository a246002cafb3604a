"""Model inspection without allocating weights: ``python -m megatron_stablelm.inspect CONFIG...``.

Prints the resolved architecture, the exact parameter count, the padded vocabulary and an estimate of
memory per GPU for the config's parallel layout. The model is built on the meta device, so a 12B
config inspects in a second on a laptop.

Memory model (per GPU, bytes):

* weights: parameters / TP in the compute dtype (2 bytes for bf16/fp16, 4 for fp32);
* gradients: the same size as the weights (DeepSpeed keeps them in the compute dtype);
* optimizer: fp32 master weights (only with bf16/fp16) + Adam's two fp32 moments, divided by DP under
  ZeRO stage >= 1;
* activations: what backward keeps per micro-batch. Without recomputation each layer keeps about
  ``s·b·h·(10 + 24/TP) + 5·a·s²·b/TP`` bytes in 16-bit (the estimate of Korthikanti et al., 2022; the
  ``s²`` attention-score term disappears with flash attention); with full activation checkpointing each
  layer keeps its 16-bit input ``2·s·b·h`` plus one layer's worth during its recomputation. Logits and
  the loss add ``4·s·b·V/TP`` (fp32).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_stablelm.cli import add_config_arguments, overrides_from, parse_config_args
from megatron_stablelm.config import Config, ConfigError, load_config

GIB = 1024**3


def resolve_vocab(cfg: Config, override: int | None = None) -> int:
    """Padded vocab: command-line override, else the config's ``padded_vocab_size``, else the
    tokenizer's size (when its ``vocab_file`` is present) padded by GPT-NeoX's rule."""
    if override is not None:
        return override
    if cfg.padded_vocab_size is not None:
        return cfg.padded_vocab_size
    if cfg.vocab_file and Path(cfg.vocab_file).is_file():
        from megatron_stablelm.tokenizers import build_tokenizer

        return cfg.padded_vocab(build_tokenizer(cfg).vocab_size)
    raise ConfigError(
        f"cannot tell the vocabulary size: vocab_file {cfg.vocab_file!r} is not present and the config has no "
        "padded_vocab_size; pass --padded-vocab-size N"
    )


@dataclass
class MemoryEstimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def estimate_memory(
    cfg: Config, shapes: dict[str, tuple[int, ...]], vocab: int, dp: int, flash: bool = True
) -> MemoryEstimate:
    from megatron_stablelm.model import config_splits

    tp = cfg.model_parallel_size
    splits = config_splits(cfg)
    per_gpu_params = 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        per_gpu_params += n if splits[name].dim is None else n // tp
    dtype = cfg.params_dtype_name
    width = 4 if dtype == "fp32" else 2
    weights = per_gpu_params * width
    gradients = per_gpu_params * width
    optimizer_bytes = per_gpu_params * (8 + (4 if dtype != "fp32" else 0))
    if cfg.zero_stage >= 1:
        optimizer_bytes /= dp
    if cfg.zero_stage >= 2:
        gradients /= dp
    s, b, h, a = cfg.seq_length, cfg.train_micro_batch_size_per_gpu, cfg.hidden_size, cfg.num_attention_heads
    per_layer = s * b * h * (10 + 24 / tp) + (0 if flash else 5 * a * s * s * b / tp)
    if cfg.checkpoint_activations:
        layers_kept = math.ceil(cfg.num_layers / max(1, cfg.checkpoint_num_layers))
        activations = layers_kept * 2 * s * b * h + per_layer * max(1, cfg.checkpoint_num_layers)
    else:
        activations = per_layer * cfg.num_layers
    activations += 4 * s * b * vocab / tp
    return MemoryEstimate(weights, gradients, optimizer_bytes, activations)


def _mlp_kind(cfg: Config) -> str:
    if not cfg.is_gated_mlp:
        return cfg.act_fn_name
    return "SwiGLU" if cfg.act_fn_name == "silu" else f"gated {cfg.act_fn_name}"


def report(cfg: Config, vocab: int, dp: int) -> str:
    from megatron_stablelm.model import canonical_shapes

    shapes = canonical_shapes(cfg, vocab)
    total = sum(math.prod(s) for s in shapes.values())
    embedding = math.prod(shapes["embedding.weight"]) + (
        math.prod(shapes["output.weight"]) if "output.weight" in shapes else 0
    )
    mem = estimate_memory(cfg, shapes, vocab, dp)
    residual = "sequential"
    if cfg.gpt_j_residual:
        residual = "parallel (one shared LayerNorm)" if cfg.gpt_j_tied else "parallel (two LayerNorms)"
    biases = [
        f"qkv={cfg.qkv_bias}",
        f"attn_out={cfg.dense_bias}",
        f"mlp={cfg.use_bias_in_mlp}",
        f"norms={cfg.use_bias_in_norms}",
    ]
    lines = [
        f"config:              {', '.join(cfg.config_files) or '<dict>'}",
        f"layers × hidden:     {cfg.num_layers} × {cfg.hidden_size}",
        f"attention:           {cfg.num_attention_heads} heads, {cfg.kv_heads} KV heads, head dim {cfg.head_dim}"
        f"{', per-head QK LayerNorm' if cfg.qk_norm else ''}",
        f"rotary:              {cfg.rotary_dim}/{cfg.head_dim} dims ({cfg.rotary_pct:.0%}), base {cfg.rotary_emb_base:g}",
        f"mlp:                 {_mlp_kind(cfg)} width {cfg.ffn_hidden_size}",
        f"residual:            {residual}",
        f"norm:                {cfg.norm}, eps {cfg.layernorm_epsilon:g}",
        f"biases:              {', '.join(biases)}",
        f"embeddings:          {'tied' if cfg.tied_embeddings else 'untied'}",
        f"sequence length:     {cfg.seq_length}",
        f"padded vocab:        {vocab:,}",
        f"parameters:          {total:,} ({total / 1e9:.3f} B; {total - embedding:,} non-embedding)",
        f"parallel layout:     TP={cfg.model_parallel_size} × DP={dp} ({cfg.model_parallel_size * dp} GPUs), "
        f"ZeRO stage {cfg.zero_stage}, {cfg.params_dtype_name}",
        f"micro-batch:         {cfg.train_micro_batch_size_per_gpu} × {cfg.seq_length} tokens, "
        f"activation checkpointing {'on' if cfg.checkpoint_activations else 'off'}",
        "memory per GPU (estimate):",
        f"  weights            {mem.weights / GIB:8.2f} GiB",
        f"  gradients          {mem.gradients / GIB:8.2f} GiB",
        f"  optimizer states   {mem.optimizer / GIB:8.2f} GiB",
        f"  activations        {mem.activations / GIB:8.2f} GiB (flash attention)",
        f"  total              {mem.total / GIB:8.2f} GiB",
    ]
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a data-parallel size or a vocabulary cannot be 0)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_stablelm.inspect", description=__doc__.split("\n")[0]
    )
    add_config_arguments(parser)
    parser.add_argument("--padded-vocab-size", type=_positive_int, default=None)
    parser.add_argument(
        "--dp", type=_positive_int, default=1, help="data-parallel size for the ZeRO estimate"
    )
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
