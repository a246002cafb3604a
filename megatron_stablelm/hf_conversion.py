"""Conversion between canonical framework tensors and Hugging Face ``transformers`` checkpoints.

Each HF architecture is one declarative table of :class:`KeyMap` rows: our canonical name, the HF
name(s), and the (invertible) layout transform between them. Everything else — which rows apply,
zero-filled biases HF always has, refusing what cannot be represented — is generic.

* ``StableLmForCausalLM``: Alpha v2, 3B-4E1T, Stable LM 2 (1.6B, 12B).
* ``GPTNeoXForCausalLM``: StableLM-Base-Alpha v1 (GeLU MLP, fused QKV with bias, two LayerNorms).
* ``LlamaForCausalLM``: every ``norm: rmsnorm`` model (GPT-NeoX's Llama, Llama 2, Code Llama and Llemma
  configs): RMSNorm, gated MLP, full rotary with any theta, GQA, tied or untied head, optional
  attention / MLP biases.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_stablelm.checkpoint.model_files import check_safetensors_file
from megatron_stablelm.config import Config, config_from_dict
from megatron_stablelm.config.choices import HF_ACTIVATION_NAMES
from megatron_stablelm.config.precision import SHORT_NAMES


class ConversionError(ValueError):
    """The model cannot be represented in the target format; the message says which key and why."""


# ---------------------------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class Transform:
    """``to_hf(ours, cfg) -> [hf tensors]`` and its inverse ``from_hf([hf tensors], cfg) -> ours``."""

    to_hf: Callable[[torch.Tensor, Config], list[torch.Tensor]]
    from_hf: Callable[[list[torch.Tensor], Config], torch.Tensor]


IDENTITY = Transform(lambda t, cfg: [t], lambda ts, cfg: ts[0])


def _qkv_to_hf(t: torch.Tensor, cfg: Config) -> list[torch.Tensor]:
    """Our rows are grouped per KV head ``[q_g (group·d) | k_g (d) | v_g (d)]``; HF has separate q/k/v."""
    d, kv, group = cfg.head_dim, cfg.kv_heads, cfg.num_attention_heads // cfg.kv_heads
    grouped = t.reshape(kv, group + 2, d, *t.shape[1:])
    q = grouped[:, :group].reshape(kv * group * d, *t.shape[1:])
    k = grouped[:, group].reshape(kv * d, *t.shape[1:])
    v = grouped[:, group + 1].reshape(kv * d, *t.shape[1:])
    return [q.contiguous(), k.contiguous(), v.contiguous()]


def _qkv_from_hf(ts: list[torch.Tensor], cfg: Config) -> torch.Tensor:
    q, k, v = ts
    d, kv, group = cfg.head_dim, cfg.kv_heads, cfg.num_attention_heads // cfg.kv_heads
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(kv, group, d, *rest), k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)], dim=1
    )
    return grouped.reshape(kv * (group + 2) * d, *rest).contiguous()


QKV_SPLIT = Transform(_qkv_to_hf, _qkv_from_hf)
GATE_UP = Transform(
    lambda t, cfg: [c.contiguous() for c in t.chunk(2, dim=0)], lambda ts, cfg: torch.cat(ts, 0)
)
PER_HEAD = Transform(lambda t, cfg: [row.clone() for row in t], lambda ts, cfg: torch.stack(ts, 0))


@dataclass(frozen=True)
class KeyMap:
    """One row: ``ours`` ↔ ``hf`` (names with ``{i}`` for the layer; ``{h}`` in a PER_HEAD row expands
    over the heads, whose count is ``heads(cfg)``)."""

    ours: str
    hf: tuple[str, ...]
    transform: Transform = IDENTITY
    heads: Callable[[Config], int] | None = None

    def hf_names(self, cfg: Config, layer: int | None) -> list[str]:
        names = [n.format(i=layer, h="{h}") for n in self.hf]
        if self.heads is not None:
            return [n.format(h=h) for n in names for h in range(self.heads(cfg))]
        return names


def _km(ours: str, *hf: str, transform: Transform = IDENTITY, heads=None) -> KeyMap:
    return KeyMap(ours, tuple(hf), transform, heads)


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    model_type: str
    keys: tuple[KeyMap, ...]
    zero_fill: tuple[str, ...]  # HF tensors (regex) the framework may lack: written as zeros
    ignore_on_import: tuple[str, ...] = ()  # HF buffers that are not weights
    disk_names: tuple[tuple[str, str], ...] = ()  # (module name, name HF writes on disk) where they differ


L = "model.layers.{i}"
STABLELM = Architecture(
    hf_class="StableLmForCausalLM",
    model_type="stablelm",
    keys=(
        _km("embedding.weight", "model.embed_tokens.weight"),
        _km("layers.{i}.input_norm.weight", f"{L}.input_layernorm.weight"),
        _km("layers.{i}.input_norm.bias", f"{L}.input_layernorm.bias"),
        _km("layers.{i}.post_attention_norm.weight", f"{L}.post_attention_layernorm.weight"),
        _km("layers.{i}.post_attention_norm.bias", f"{L}.post_attention_layernorm.bias"),
        _km(
            "layers.{i}.attention.qkv.weight",
            *(f"{L}.self_attn.{p}_proj.weight" for p in "qkv"),
            transform=QKV_SPLIT,
        ),
        _km(
            "layers.{i}.attention.qkv.bias",
            *(f"{L}.self_attn.{p}_proj.bias" for p in "qkv"),
            transform=QKV_SPLIT,
        ),
        _km(
            "layers.{i}.attention.q_norm.weight",
            f"{L}.self_attn.q_layernorm.norms.{{h}}.weight",
            transform=PER_HEAD,
            heads=lambda c: c.num_attention_heads,
        ),
        _km(
            "layers.{i}.attention.k_norm.weight",
            f"{L}.self_attn.k_layernorm.norms.{{h}}.weight",
            transform=PER_HEAD,
            heads=lambda c: c.kv_heads,
        ),
        _km("layers.{i}.attention.dense.weight", f"{L}.self_attn.o_proj.weight"),
        _km(
            "layers.{i}.mlp.fc1.weight",
            f"{L}.mlp.gate_proj.weight",
            f"{L}.mlp.up_proj.weight",
            transform=GATE_UP,
        ),
        _km("layers.{i}.mlp.fc2.weight", f"{L}.mlp.down_proj.weight"),
        _km("final_norm.weight", "model.norm.weight"),
        _km("final_norm.bias", "model.norm.bias"),
        _km("output.weight", "lm_head.weight"),
    ),
    zero_fill=(r"layernorm\.bias$", r"^model\.norm\.bias$"),
)

N = "gpt_neox.layers.{i}"
GPT_NEOX = Architecture(
    hf_class="GPTNeoXForCausalLM",
    model_type="gpt_neox",
    keys=(
        _km("embedding.weight", "gpt_neox.embed_in.weight"),
        _km("layers.{i}.input_norm.weight", f"{N}.input_layernorm.weight"),
        _km("layers.{i}.input_norm.bias", f"{N}.input_layernorm.bias"),
        _km("layers.{i}.post_attention_norm.weight", f"{N}.post_attention_layernorm.weight"),
        _km("layers.{i}.post_attention_norm.bias", f"{N}.post_attention_layernorm.bias"),
        # HF's per-head [q_h | k_h | v_h] rows are our KV-grouped layout with one query per group.
        _km("layers.{i}.attention.qkv.weight", f"{N}.attention.query_key_value.weight"),
        _km("layers.{i}.attention.qkv.bias", f"{N}.attention.query_key_value.bias"),
        _km("layers.{i}.attention.dense.weight", f"{N}.attention.dense.weight"),
        _km("layers.{i}.attention.dense.bias", f"{N}.attention.dense.bias"),
        _km("layers.{i}.mlp.fc1.weight", f"{N}.mlp.dense_h_to_4h.weight"),
        _km("layers.{i}.mlp.fc1.bias", f"{N}.mlp.dense_h_to_4h.bias"),
        _km("layers.{i}.mlp.fc2.weight", f"{N}.mlp.dense_4h_to_h.weight"),
        _km("layers.{i}.mlp.fc2.bias", f"{N}.mlp.dense_4h_to_h.bias"),
        _km("final_norm.weight", "gpt_neox.final_layer_norm.weight"),
        _km("final_norm.bias", "gpt_neox.final_layer_norm.bias"),
        _km("output.weight", "embed_out.weight"),
    ),
    zero_fill=(r"layernorm\.bias$", r"final_layer_norm\.bias$"),
    ignore_on_import=(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$",),
    # `transformers` calls the head lm_head in memory but saves it as embed_out, as GPT-NeoX always has.
    disk_names=(("lm_head.weight", "embed_out.weight"),),
)
LLAMA = Architecture(
    hf_class="LlamaForCausalLM",
    model_type="llama",
    keys=(
        _km("embedding.weight", "model.embed_tokens.weight"),
        _km("layers.{i}.input_norm.weight", f"{L}.input_layernorm.weight"),
        _km("layers.{i}.post_attention_norm.weight", f"{L}.post_attention_layernorm.weight"),
        _km(
            "layers.{i}.attention.qkv.weight",
            *(f"{L}.self_attn.{p}_proj.weight" for p in "qkv"),
            transform=QKV_SPLIT,
        ),
        _km(
            "layers.{i}.attention.qkv.bias",
            *(f"{L}.self_attn.{p}_proj.bias" for p in "qkv"),
            transform=QKV_SPLIT,
        ),
        _km("layers.{i}.attention.dense.weight", f"{L}.self_attn.o_proj.weight"),
        _km("layers.{i}.attention.dense.bias", f"{L}.self_attn.o_proj.bias"),
        _km(
            "layers.{i}.mlp.fc1.weight",
            f"{L}.mlp.gate_proj.weight",
            f"{L}.mlp.up_proj.weight",
            transform=GATE_UP,
        ),
        _km(
            "layers.{i}.mlp.fc1.bias",
            f"{L}.mlp.gate_proj.bias",
            f"{L}.mlp.up_proj.bias",
            transform=GATE_UP,
        ),
        _km("layers.{i}.mlp.fc2.weight", f"{L}.mlp.down_proj.weight"),
        _km("layers.{i}.mlp.fc2.bias", f"{L}.mlp.down_proj.bias"),
        _km("final_norm.weight", "model.norm.weight"),
        _km("output.weight", "lm_head.weight"),
    ),
    zero_fill=(),  # RMSNorm has no bias; every bias Llama has is switched by a flag we set
    ignore_on_import=(r"\.rotary_emb\.inv_freq$",),
)
ARCHITECTURES = {a.hf_class: a for a in (STABLELM, GPT_NEOX, LLAMA)}


# ---------------------------------------------------------------------------------------------- configs
# Config keys whose value HF stores unchanged under another name (or the same one): those of every
# class, then each class's own (Llama has no LayerNorm and no hidden dropout, the others no RMSNorm).
SAME_VALUE_KEYS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "init_method_std": "initializer_range",
    "attention_dropout": "attention_dropout",
}
_LAYERNORM_CLASS_KEYS = {"layernorm_epsilon": "layer_norm_eps", "hidden_dropout": "hidden_dropout"}
CLASS_VALUE_KEYS = {
    "StableLmForCausalLM": _LAYERNORM_CLASS_KEYS,
    "GPTNeoXForCausalLM": _LAYERNORM_CLASS_KEYS,
    "LlamaForCausalLM": {"rms_norm_epsilon": "rms_norm_eps"},
}


def value_keys(arch: Architecture) -> dict[str, str]:
    """Our key → HF key of every value ``arch``'s ``config.json`` stores unchanged."""
    return {**SAME_VALUE_KEYS, **CLASS_VALUE_KEYS[arch.hf_class]}


# Our ``act_fn_name`` → the HF ``hidden_act`` an export writes (unless the config keeps the name it was
# imported with in ``hf_hidden_act``), and every HF name we read back (``gelu_new`` and ``gelu_fast``
# are the tanh approximation written out by hand: the same function up to rounding).
HF_ACTIVATIONS = {ours: names[0] for ours, names in HF_ACTIVATION_NAMES.items()}
_ACT_FN_OF_HF = {name: ours for ours, names in HF_ACTIVATION_NAMES.items() for name in names}
_ACTIVATION_KEYS = {  # our config keys for each act_fn_name
    "gelu": {"activation": "gelu", "bias_gelu_fusion": False},
    "gelu_tanh": {"activation": "gelu", "bias_gelu_fusion": True},
    "silu": {"activation": "silu"},
    "relu": {"activation": "relu"},
}


def hf_hidden_act(cfg: Config) -> str:
    """The ``hidden_act`` an export writes: the name the model was imported with, else the usual one."""
    return cfg.hf_hidden_act or HF_ACTIVATIONS[cfg.act_fn_name]


def architecture_for(cfg: Config) -> Architecture:
    """Llama's HF class for RMSNorm models; StableLM's for gated MLPs with LayerNorm; GPT-NeoX's for the
    Alpha v1 GeLU MLP. Refuses what the class cannot represent, naming the key."""
    if cfg.norm == "rmsnorm":
        problems = {
            "activation": not cfg.is_gated_mlp
            and "LlamaForCausalLM's MLP is gated (activation: swiglu, or mlp_type: llama)",
            "rotary_pct": cfg.rotary_dim != cfg.head_dim
            and "LlamaForCausalLM rotates the whole head (rotary_pct: 1)",
            "gpt_j_residual": cfg.gpt_j_residual and "LlamaForCausalLM's residual is sequential",
            "qk_norm": cfg.qk_norm and "LlamaForCausalLM has no QK-norm",
            "use_qkv_bias": cfg.qkv_bias != cfg.dense_bias
            and "LlamaForCausalLM has one attention_bias flag for Q/K/V and the output projection",
        }
        arch = LLAMA
    elif cfg.is_gated_mlp:
        problems = {
            "activation": cfg.act_fn_name != "silu" and "StableLmForCausalLM's gated MLP uses silu",
            "use_bias_in_mlp": cfg.mlp_bias and "StableLmForCausalLM has no MLP biases",
            "use_bias_in_attn_linear": cfg.dense_bias and "StableLmForCausalLM's o_proj has no bias",
            "use_bias_in_qk_norm": cfg.qk_norm
            and cfg.use_bias_in_qk_norm
            and "StableLmForCausalLM's QK LayerNorms have no bias",
            "gpt_j_tied": cfg.gpt_j_residual
            and not cfg.gpt_j_tied
            and "StableLmForCausalLM's parallel residual shares one LayerNorm (needs gpt_j_tied: true)",
        }
        arch = STABLELM
    else:
        problems = {
            "num_kv_heads": cfg.kv_heads != cfg.num_attention_heads and "GPTNeoXForCausalLM has no GQA",
            "qk_norm": cfg.qk_norm and "GPTNeoXForCausalLM has no QK-norm",
            "gpt_j_tied": cfg.gpt_j_tied and "GPTNeoXForCausalLM has two LayerNorms per layer",
            "use_bias_in_mlp": not cfg.mlp_bias and "GPTNeoXForCausalLM's MLP always has biases",
            "use_qkv_bias": cfg.qkv_bias != cfg.dense_bias
            and "GPTNeoXForCausalLM has one attention_bias flag for QKV and the output projection",
        }
        arch = GPT_NEOX
    for key, why in problems.items():
        if why:
            raise ConversionError(f"cannot export to {arch.hf_class}: config key '{key}': {why}")
    return arch


def hf_config(
    cfg: Config, vocab_size: int, dtype: torch.dtype, eod_id: int | None = None, bos_id: int | None = None
):
    """The ``transformers`` config object for ``cfg``. ``eod_id`` becomes ``eos_token_id`` (and
    ``bos_token_id``, unless ``bos_id`` is given)."""
    from transformers import GPTNeoXConfig, LlamaConfig, StableLmConfig

    arch = architecture_for(cfg)
    common = dict(
        vocab_size=vocab_size,
        **{theirs: getattr(cfg, ours) for ours, theirs in value_keys(arch).items()},
        intermediate_size=cfg.ffn_hidden_size,
        hidden_act=hf_hidden_act(cfg),
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=cfg.tied_embeddings,
        architectures=[arch.hf_class],
        torch_dtype=dtype,
    )
    if eod_id is not None:
        common.update(bos_token_id=eod_id if bos_id is None else bos_id, eos_token_id=eod_id)
    if arch is LLAMA:
        return LlamaConfig(
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.head_dim,
            attention_bias=cfg.dense_bias,
            mlp_bias=cfg.mlp_bias,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_emb_base},
            **common,
        )
    common.update(partial_rotary_factor=cfg.rotary_pct, rope_theta=cfg.rotary_emb_base)
    if arch is STABLELM:
        return StableLmConfig(
            num_key_value_heads=cfg.kv_heads,
            use_qkv_bias=cfg.qkv_bias,
            qk_layernorm=cfg.qk_norm,
            use_parallel_residual=cfg.gpt_j_residual,
            **common,
        )
    return GPTNeoXConfig(
        use_parallel_residual=cfg.gpt_j_residual,
        attention_bias=cfg.dense_bias,
        rotary_pct=cfg.rotary_pct,
        rotary_emb_base=cfg.rotary_emb_base,
        **common,
    )


def _architecture_of(hf: dict) -> Architecture:
    """The HF class ``AutoModelForCausalLM`` builds: from ``model_type``, else ``architectures``."""
    by_type = {a.model_type: a for a in ARCHITECTURES.values()}
    named = (hf.get("architectures") or [None])[0]
    model_type = hf.get("model_type")
    if model_type is None and named in ARCHITECTURES:
        return ARCHITECTURES[named]
    if model_type not in by_type:
        raise ConversionError(
            f"config.json: unsupported model_type {model_type!r} (architectures {named!r}); expected "
            f"one of {sorted(by_type)}"
        )
    arch = by_type[model_type]
    if named is not None and named != arch.hf_class:
        raise ConversionError(f"config.json: model_type {model_type!r} but architectures names {named!r}")
    return arch


def hf_config_from_dict(hf: dict):
    """``transformers``' own config object for a ``config.json`` dict, so every absent key takes the
    value ``transformers`` gives it (rotary fraction, epsilon, old-style ``rope_scaling`` ...)."""
    from transformers import GPTNeoXConfig, LlamaConfig, StableLmConfig

    cls = {GPT_NEOX: GPTNeoXConfig, STABLELM: StableLmConfig, LLAMA: LlamaConfig}[_architecture_of(hf)]
    try:
        return cls.from_dict(hf)
    except (TypeError, ValueError, StrictDataclassError) as err:
        raise ConversionError(
            f"config.json: {cls.__name__} refuses it: {' '.join(str(err).split())}"
        ) from None


def _common_values(c, arch: Architecture) -> dict:
    """Our config keys for what the HF classes share, read off ``transformers``' config object."""
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(
            f"config.json: rope_scaling/rope_parameters type {rope['rope_type']!r} is not supported "
            "(only default RoPE); refusing rather than converting a model that computes otherwise"
        )
    if c.hidden_act not in _ACT_FN_OF_HF:
        raise ConversionError(
            f"config.json: hidden_act {c.hidden_act!r} is not supported; expected one of "
            f"{sorted(_ACT_FN_OF_HF)}"
        )
    act_fn = _ACT_FN_OF_HF[c.hidden_act]
    values = dict(
        **{ours: getattr(c, theirs) for ours, theirs in value_keys(arch).items()},
        seq_length=c.max_position_embeddings,
        max_position_embeddings=c.max_position_embeddings,
        intermediate_size=c.intermediate_size,
        **_ACTIVATION_KEYS[act_fn],
        rotary_pct=float(rope.get("partial_rotary_factor", 1.0)),
        rotary_emb_base=float(rope["rope_theta"]),
        no_weight_tying=not c.tie_word_embeddings,
        gpt_j_residual=bool(getattr(c, "use_parallel_residual", False)),
    )
    if c.hidden_act != HF_ACTIVATIONS[act_fn]:
        values["hf_hidden_act"] = c.hidden_act  # e.g. gelu_new: written back as it was read
    dtype = str(c.dtype).removeprefix("torch.") if c.dtype is not None else None
    if dtype in SHORT_NAMES:  # HF writes torch's name of the dtype
        values["precision"] = SHORT_NAMES[dtype]
    return values


def config_from_hf(hf: dict, norm_bias: bool, overrides: dict | None = None) -> Config:
    """Our config for an HF ``config.json`` (as a dict); absent keys take ``transformers``' defaults.
    ``norm_bias``: whether the checkpoint's LayerNorm biases carry information (HF StableLM always
    stores them, zero for Stable LM 2 12B)."""
    c = hf_config_from_dict(hf)
    arch = _architecture_of(hf)
    values = _common_values(c, arch)
    values.update(padded_vocab_size=c.vocab_size, use_bias_in_norms=norm_bias)
    if arch is LLAMA:
        heads, kv = c.num_attention_heads, c.num_key_value_heads
        if c.head_dim != c.hidden_size // heads:
            raise ConversionError(
                f"config.json: head_dim {c.head_dim} is not hidden_size / num_attention_heads "
                f"({c.hidden_size} / {heads}); the framework derives the head size from them"
            )
        values.update(
            norm="rmsnorm",
            use_bias_in_norms=False,
            mlp_type="gated",
            num_kv_heads=kv,
            attention_head_type="multihead" if kv == heads else "groupedquery",
            use_bias_in_attn_linear=bool(c.attention_bias),
            use_bias_in_mlp=bool(c.mlp_bias),
            hidden_dropout=0.0,  # LlamaForCausalLM has none
        )
    elif arch is STABLELM:
        kv, heads = c.num_key_value_heads, c.num_attention_heads
        values.update(
            mlp_type="gated",
            num_kv_heads=kv,
            attention_head_type="multihead" if kv == heads else "groupedquery",
            use_bias_in_attn_linear=False,
            use_qkv_bias=bool(c.use_qkv_bias),
            use_bias_in_mlp=False,
            qk_norm=bool(c.qk_layernorm),
            gpt_j_tied=bool(c.use_parallel_residual),
        )
    else:
        values.update(
            mlp_type="regular",
            use_bias_in_attn_linear=bool(c.attention_bias),
            use_bias_in_mlp=True,
        )
    values.update(overrides or {})
    return config_from_dict(values)


# ---------------------------------------------------------------------------------------------- tensors
def _rows(arch: Architecture, cfg: Config) -> list[tuple[str, KeyMap, int | None]]:
    rows = []
    for km in arch.keys:
        if "{i}" in km.ours:
            rows.extend((km.ours.format(i=i), km, i) for i in range(cfg.num_layers))
        else:
            rows.append((km.ours, km, None))
    return rows


def _expected_hf_shapes(cfg: Config, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The HF model's own state-dict shapes, from ``transformers`` on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(cfg, vocab_size, torch.float32))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tied_embeddings:
        shapes.pop("lm_head.weight", None)
    for module_name, disk_name in architecture_for(cfg).disk_names:
        if module_name in shapes:
            shapes[disk_name] = shapes.pop(module_name)
    return shapes


def to_hf_state_dict(cfg: Config, ours: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Canonical tensors → HF tensors. Every HF tensor is accounted for: mapped, zero-filled (biases
    HF always has), or the conversion is refused."""
    arch = architecture_for(cfg)
    expected = _expected_hf_shapes(cfg, vocab_size)
    out: dict[str, torch.Tensor] = {}
    used = set()
    for name, km, layer in _rows(arch, cfg):
        if name not in ours:
            continue
        used.add(name)
        for hf_name, tensor in zip(km.hf_names(cfg, layer), km.transform.to_hf(ours[name], cfg), strict=True):
            out[hf_name] = tensor
    leftover = sorted(set(ours) - used)
    if leftover:
        raise ConversionError(f"{arch.hf_class} has no place for framework tensors {leftover[:4]}")
    dtype = next(iter(ours.values())).dtype
    for hf_name, shape in expected.items():
        if hf_name in out:
            if tuple(out[hf_name].shape) != shape:
                raise ConversionError(
                    f"{hf_name}: shape {tuple(out[hf_name].shape)}, {arch.hf_class} expects {shape}"
                )
        elif any(re.search(p, hf_name) for p in arch.zero_fill):
            out[hf_name] = torch.zeros(shape, dtype=dtype)
        else:
            raise ConversionError(f"{arch.hf_class} needs '{hf_name}', which the framework model lacks")
    unknown = sorted(set(out) - set(expected))
    if unknown:
        raise ConversionError(f"{arch.hf_class} has no tensor {unknown[:4]}")
    return out


def from_hf_state_dict(
    cfg: Config, hf: dict[str, torch.Tensor], model_names: list[str]
) -> dict[str, torch.Tensor]:
    """HF tensors → canonical tensors for a model whose parameter names are ``model_names``. HF
    tensors with no place in the framework must be zero biases, else the conversion is refused."""
    arch = architecture_for(cfg)
    aliases = dict(arch.disk_names)
    hf = {aliases.get(k, k): v for k, v in hf.items()}
    wanted = set(model_names)
    out: dict[str, torch.Tensor] = {}
    consumed = set()
    for name, km, layer in _rows(arch, cfg):
        if name not in wanted:
            continue
        names = km.hf_names(cfg, layer)
        missing = [n for n in names if n not in hf]
        if missing:
            raise ConversionError(f"the HF checkpoint lacks {missing[0]} (needed for '{name}')")
        out[name] = km.transform.from_hf([hf[n] for n in names], cfg)
        consumed.update(names)
    absent = sorted(wanted - set(out))
    if absent:
        raise ConversionError(f"no HF tensor maps to framework tensors {absent[:4]}")
    for hf_name in sorted(set(hf) - consumed):
        if any(re.search(p, hf_name) for p in arch.ignore_on_import):
            continue
        if cfg.tied_embeddings and hf_name in ("lm_head.weight", *aliases.values()):
            if not torch.equal(hf[hf_name], out["embedding.weight"]):
                raise ConversionError("lm_head.weight differs from the embedding but the config ties them")
            continue
        zero_ok = any(re.search(p, hf_name) for p in arch.zero_fill)
        if zero_ok and not torch.any(hf[hf_name]):
            continue
        why = (
            "it is non-zero but the config has use_bias_in_norms: false"
            if zero_ok
            else "no framework tensor maps to it"
        )
        raise ConversionError(f"cannot represent HF tensor '{hf_name}': {why}")
    return out


# config.json keys that give tensor shapes: absent, ``transformers``' default (a 2560-wide model...) is
# taken, which the tensors then contradict.
_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def check_hf_shapes(cfg: Config, hf_cfg: dict, tensors: dict[str, torch.Tensor], vocab_size: int) -> None:
    """Every HF tensor has the shape ``config.json`` describes (the HF model on the meta device), so a
    config that contradicts its own weights is refused naming the tensor and the keys ``config.json``
    lacks, instead of failing inside a layout transform."""
    expected = _expected_hf_shapes(cfg, vocab_size)
    for name, tensor in sorted(tensors.items()):
        shape = expected.get(name)
        if shape is not None and tuple(tensor.shape) != shape:
            absent = ", ".join(key for key in _SHAPE_KEYS if key not in hf_cfg)
            hint = f"; it lacks {absent} (transformers' defaults were taken)" if absent else ""
            raise ConversionError(
                f"config.json describes '{name}' as {shape} but the tensor is {tuple(tensor.shape)}{hint}"
            )


VOCAB_ROWS = ("embedding.weight", "output.weight")  # canonical tensors with one row per token


def padded_import_vocab(cfg: Config, vocab: int, tp: int) -> int:
    """Embedding rows of an imported model: the trainer's padding of the HF vocabulary (a multiple of
    ``make_vocab_size_divisible_by`` × TP, 128 × TP by default), so the checkpoint splits over any TP
    size its heads allow, whatever TP it was imported at; the export cuts the rows back to the HF size."""
    return dataclasses.replace(cfg, padded_vocab_size=None, model_parallel_size=tp).padded_vocab(vocab)


def pad_vocab_rows(tensors: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """``tensors`` with zero rows appended to the embedding and LM head up to ``rows``."""
    out = dict(tensors)
    for name in VOCAB_ROWS:
        if name in out and out[name].shape[0] < rows:
            t = out[name]
            out[name] = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return out


# ---------------------------------------------------------------------------------------------- files
def read_hf_dir(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``config.json`` and all tensors of an HF model directory (single or sharded safetensors)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face model directory)")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ConversionError(f"{config_path}: not a readable JSON file ({err})") from None
    if not isinstance(hf_cfg, dict):
        raise ConversionError(f"{config_path}: expected a JSON object, got {type(hf_cfg).__name__}")
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConversionError(f"{index}: not a readable safetensors index ({err!r})") from None
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConversionError(
            f"{directory}: no model.safetensors (or index); only safetensors checkpoints are read"
        )
    for fname in files:  # every file complete before any is read
        check_safetensors_file(directory / fname)
    tensors = {}
    for fname in files:
        with safe_open(str(directory / fname), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    return hf_cfg, tensors


def hf_norm_bias_used(hf_cfg: dict, tensors: dict[str, torch.Tensor]) -> bool:
    arch = _architecture_of(hf_cfg)
    return any(torch.any(t) for k, t in tensors.items() if any(re.search(p, k) for p in arch.zero_fill))


def write_hf_dir(
    directory: str | Path,
    cfg: Config,
    ours: dict[str, torch.Tensor],
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    eod_id: int | None = None,
    bos_id: int | None = None,
) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``AutoModelForCausalLM.from_pretrained`` loads."""
    directory = Path(directory)
    tensors = {k: v.to(dtype).contiguous() for k, v in to_hf_state_dict(cfg, ours, vocab_size).items()}
    directory.mkdir(parents=True, exist_ok=True)
    hf_config(cfg, vocab_size, dtype, eod_id, bos_id).save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
