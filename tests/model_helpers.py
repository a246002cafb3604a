"""Tiny versions of every StableLM architecture, for parity and parallelism tests."""

from __future__ import annotations

import torch

from megatron_stablelm.config import Config, config_from_dict

_BASE = dict(
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
)

# Each mirrors the published architecture (see configs/), shrunk.
TINY_ARCHS: dict[str, dict] = {
    "stablelm-2-1_6b": dict(
        mlp_type="gated", activation="silu", use_bias_in_norms=True, use_bias_in_attn_linear=False,
        use_qkv_bias=True, use_bias_in_mlp=False,
    ),
    "stablelm-2-12b": dict(
        num_attention_heads=8, num_kv_heads=2, attention_head_type="groupedquery", qk_norm=True,
        mlp_type="gated", activation="silu", gpt_j_residual=True, gpt_j_tied=True, use_bias_in_norms=False,
        use_bias_in_attn_linear=False, use_bias_in_mlp=False,
    ),
    "stablelm-3b-4e1t": dict(
        mlp_type="gated", activation="silu", use_bias_in_norms=True, use_bias_in_attn_linear=False,
        use_bias_in_mlp=False,
    ),
    "stablelm-base-alpha-v1": dict(activation="gelu", gpt_j_residual=True, init_method="small_init",
                                   output_layer_init_method="wang_init"),
    "stablelm-base-alpha-v2": dict(
        mlp_type="gated", activation="silu", gpt_j_residual=True, gpt_j_tied=True, use_bias_in_norms=True,
        use_bias_in_attn_linear=False, use_bias_in_mlp=False,
    ),
}


def tiny_config(arch: str, **overrides) -> Config:
    return config_from_dict({**_BASE, **TINY_ARCHS[arch], **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Perturb every parameter (norm weights, biases too) so that no path is trivially zero or one.
    The perturbation is a function of the canonical name and the local shard, so callers give each
    TP rank the same canonical tensors through load_canonical_state_dict instead."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in sorted(model.named_parameters()):
        param.add_(torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype) * 0.05)
