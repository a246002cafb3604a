"""The one validator of a config: every check that is a pure function of its values.

No world size, no files: those are :func:`megatron_stablelm.config.validate_layout` (batch arithmetic at
a world size) and the data / checkpoint code (shards, tokenizer files, saved architectures). Each
message is one line naming the file (when known), the key and the bad value.

``train_iters`` and the optimizer's learning rate are required only with ``training=True``: tools
that build a model from a config or a checkpoint's ``config.yml`` (inspection, conversion, generation)
have neither, and a config without them is complete for them.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from megatron_stablelm.config.adam import read_adam_block
from megatron_stablelm.config.choices import (
    ACTIVATIONS,
    ATTENTION_HEAD_TYPES,
    ATTENTION_TYPES,
    DATA_IMPLS,
    DATA_SPLITS,
    DEEPSPEED_FP16_KEYS,
    DEEPSPEED_ZERO_KEYS,
    DISTRIBUTED_BACKENDS,
    FP8_RECIPES,
    FP16_KEYS_DROPPED,
    GATED_ACTIVATIONS,
    GATED_MLP_TYPES,
    HF_ACTIVATION_NAMES,
    INIT_METHODS,
    LR_DECAY_STYLES,
    MLP_TYPES,
    NORMS,
    OUTPUT_LAYER_PARALLELISMS,
    POS_EMBS,
    PRECISIONS,
    RECOMPUTE_GRANULARITIES,
    TOKENIZER_TYPES,
    WANDB_RESUME_MODES,
    ZERO_KEYS_DROPPED,
    ZERO_STAGES,
)
from megatron_stablelm.config.errors import ConfigError
from megatron_stablelm.config.neox_keys import UNSUPPORTED_ATTENTION, UNSUPPORTED_VALUES
from megatron_stablelm.config.schema import Config

REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length")
REQUIRED_FOR_TRAINING = ("train_iters",)

# Keys that must be one of a list of values (None allowed where the key is optional).
CHOICES: dict[str, Sequence[Any]] = {
    "norm": NORMS,
    "activation": ACTIVATIONS,
    "pos_emb": POS_EMBS,
    "attention_head_type": ATTENTION_HEAD_TYPES,
    "mlp_type": MLP_TYPES,
    "init_method": INIT_METHODS,
    "output_layer_init_method": INIT_METHODS,
    "lr_decay_style": LR_DECAY_STYLES,
    "precision": PRECISIONS,
    "output_layer_parallelism": OUTPUT_LAYER_PARALLELISMS,
    "data_impl": DATA_IMPLS,
    "recompute_granularity": RECOMPUTE_GRANULARITIES,
    "fp8": FP8_RECIPES,
    "distributed_backend": DISTRIBUTED_BACKENDS,
    "tokenizer_type": TOKENIZER_TYPES,
    "wandb_resume": WANDB_RESUME_MODES,
}
STRING_LISTS = ("train_data_paths", "valid_data_paths", "test_data_paths", "eval_tasks")


class _Checker:
    """``fail(key, why)`` raises one line: ``file: key 'k': why`` (the file when the key's origin is
    known)."""

    def __init__(self, cfg: Config, origin: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.origin = origin

    def where(self, key: str) -> str:
        source = self.origin.get(key)
        return f"{source}: " if source else ""

    def fail(self, key: str, why: str) -> None:
        raise ConfigError(f"{self.where(key)}key '{key}': {why}")


def validate_config(cfg: Config, origin: Mapping[str, str] | None = None, *, training: bool = False) -> None:
    """Check every key's type, range and allowed values, and their combinations. ``origin`` maps keys
    to the file that set them (for the messages); ``training`` also requires what only training needs
    (``train_iters``, the optimizer's learning rate)."""
    check = _Checker(cfg, origin or {})
    _check_required(check, REQUIRED + (REQUIRED_FOR_TRAINING if training else ()))
    _check_ranges(check)
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value is not None and value not in allowed:
            feature = UNSUPPORTED_VALUES.get((key, value))
            missing = f" (GPT-NeoX's {feature}: not implemented here)" if feature else ""
            check.fail(key, f"unknown value {value!r}{missing}; expected one of {', '.join(allowed)}")
    if cfg.wandb_resume == "must" and not cfg.wandb_id:
        check.fail("wandb_resume", "'must' continues an existing run: give its wandb_id")
    if cfg.rotary_interleaved:
        check.fail(
            "rotary_interleaved",
            "interleaved (GPT-J style) rotary is not supported; StableLM uses false",
        )
    hf_names = HF_ACTIVATION_NAMES.get(cfg.act_fn_name, ())
    if cfg.hf_hidden_act is not None and cfg.hf_hidden_act not in hf_names:
        names = ", ".join(hf_names) or "none"
        check.fail(
            "hf_hidden_act",
            f"{cfg.hf_hidden_act!r} is not a Hugging Face name of the MLP's activation {cfg.act_fn_name!r} "
            f"(its names: {names})",
        )
    _check_model_shape(check)
    _check_mlp_width(check)
    _check_parallel_shape(check)
    _check_lists(check)
    _check_fim(check)
    _check_precision_and_zero(check)
    _check_fp8(check)
    _check_schedule(check, training)
    _check_long_run(check)
    if cfg.attention_config is not None:
        expand_attention_config(cfg.attention_config, cfg.num_layers, check.origin.get("attention_config"))


def _check_required(check: _Checker, keys: Sequence[str]) -> None:
    for key in keys:
        if getattr(check.cfg, key) is None:
            files = ", ".join(check.cfg.config_files) or "the config"
            raise ConfigError(f"key '{key}' is required but missing from {files}")


def _check_ranges(check: _Checker) -> None:
    cfg = check.cfg
    for spec in dataclasses.fields(cfg):  # the ranges declared beside the keys (positive / non_negative)
        value = getattr(cfg, spec.name)
        if "minimum" not in spec.metadata or value is None:
            continue
        if spec.metadata["strict"] and not value > 0:
            check.fail(spec.name, f"must be positive, got {value}")
        if not spec.metadata["strict"] and not value >= 0:
            zero = f" (0 {spec.metadata['zero_means']})" if spec.metadata["zero_means"] else ""
            check.fail(spec.name, f"must be >= 0{zero}, got {value}")
    if cfg.master_port > 65535:
        check.fail("master_port", f"must be a TCP port (1 to 65535), got {cfg.master_port}")
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            check.fail(key, f"must be in [0, 1), got {getattr(cfg, key)}")
    if not 0.0 < cfg.rotary_pct <= 1.0:
        check.fail("rotary_pct", f"must be in (0, 1], got {cfg.rotary_pct}")
    if not 0.0 <= cfg.cooldown < 1.0:
        check.fail("cooldown", f"is a fraction of train_iters in [0, 1), got {cfg.cooldown}")


def _check_model_shape(check: _Checker) -> None:
    cfg, fail = check.cfg, check.fail
    heads, kv = cfg.num_attention_heads, cfg.kv_heads
    if cfg.hidden_size % heads:
        fail(
            "hidden_size",
            f"{cfg.hidden_size} is not divisible by num_attention_heads={heads}",
        )
    if heads % kv:
        fail(
            "num_kv_heads",
            f"num_attention_heads={heads} is not divisible by num_kv_heads={kv}",
        )
    if cfg.attention_head_type == "multihead" and kv != heads:
        fail(
            "attention_head_type",
            f"'multihead' needs num_kv_heads == num_attention_heads, got {kv}",
        )
    if cfg.attention_head_type == "multiquery" and kv != 1:
        fail("attention_head_type", f"'multiquery' needs num_kv_heads == 1, got {kv}")
    if cfg.rotary_dim % 2:
        fail(
            "rotary_pct",
            f"gives an odd rotary dimension {cfg.rotary_dim} (head dim {cfg.head_dim})",
        )
    if cfg.gpt_j_tied and not cfg.gpt_j_residual:
        fail("gpt_j_tied", "needs gpt_j_residual: true")
    if cfg.max_position_embeddings is not None and cfg.seq_length > cfg.max_position_embeddings:
        fail(
            "seq_length",
            f"{cfg.seq_length} exceeds max_position_embeddings={cfg.max_position_embeddings}",
        )


def _check_mlp_width(check: _Checker) -> None:
    """The two MLP width rules (Stability's ``mlp_type: gated``, GPT-NeoX's gated activations) are
    exclusive, and GPT-NeoX's rule must give two projections that fit together."""
    cfg, fail = check.cfg, check.fail
    if cfg.intermediate_size is not None and cfg.expansion_factor is not None:
        fail("expansion_factor", "give either intermediate_size or expansion_factor, not both")
    if cfg.mlp_type in GATED_MLP_TYPES:
        if cfg.activation in GATED_ACTIVATIONS:
            fail(
                "activation",
                f"{cfg.activation!r} is GPT-NeoX's gated MLP with its own width rule; with mlp_type "
                f"{cfg.mlp_type!r} use activation: {GATED_ACTIVATIONS[cfg.activation]}",
            )
        if cfg.expansion_factor is not None:
            fail(
                "expansion_factor",
                f"is GPT-NeoX's width rule; with mlp_type {cfg.mlp_type!r} give intermediate_size",
            )
        return
    first, second = cfg.neox_mlp_widths
    branches = 2 if cfg.is_gated_mlp else 1
    if first != branches * second:
        named = ("mlp_multiple_of", "intermediate_size", "expansion_factor", "activation")
        fail(
            next((key for key in named if key in check.origin), "mlp_multiple_of"),
            f"GPT-NeoX's rounding gives a first MLP projection of {first} outputs for {branches} × {second} "
            "inputs of the second (GPT-NeoX cannot build it either); change intermediate_size or mlp_multiple_of",
        )


def _check_parallel_shape(check: _Checker) -> None:
    """What tensor parallelism must divide; the world size is :func:`validate_layout`'s business."""
    cfg, fail = check.cfg, check.fail
    tp, heads, kv = cfg.model_parallel_size, cfg.num_attention_heads, cfg.kv_heads
    if heads % tp:
        fail(
            "model_parallel_size",
            f"num_attention_heads={heads} is not divisible by the tensor-parallel size {tp}",
        )
    if kv % tp:
        fail(
            "model_parallel_size",
            f"num_kv_heads={kv} is not divisible by the tensor-parallel size {tp}",
        )
    if cfg.ffn_hidden_size % tp:
        fail(
            "model_parallel_size",
            f"the MLP width {cfg.ffn_hidden_size} is not divisible by TP={tp}",
        )
    if cfg.padded_vocab_size is not None and cfg.padded_vocab_size % tp:
        fail("padded_vocab_size", f"{cfg.padded_vocab_size} is not divisible by TP={tp}")
    if cfg.pipe_parallel_size > 1:
        # Running it as one stage would silently change the data-parallel size (world / TP instead of
        # world / (TP × PP)) and with it the global batch.
        fail(
            "pipe_parallel_size",
            f"{cfg.pipe_parallel_size} asks for pipeline parallelism, which is not implemented; use 0 or 1 "
            "(one stage) and split the model with model_parallel_size (tensor parallelism, with "
            "sequence_parallel: true to split the activations too)",
        )
    if cfg.uses_sequence_parallel and cfg.seq_length is not None and cfg.seq_length % tp:
        key = "sequence_parallel" if cfg.sequence_parallel else "partition_activations"
        fail(key, f"splits the sequence over TP={tp}, but seq_length={cfg.seq_length} is not divisible by it")


def _check_lists(check: _Checker) -> None:
    cfg, fail = check.cfg, check.fail
    for key in STRING_LISTS:
        value = getattr(cfg, key)
        if value and not all(isinstance(item, str) for item in value):
            fail(key, f"must be a list of strings, got {value!r}")
    for prefix in DATA_SPLITS:
        paths = getattr(cfg, f"{prefix}_data_paths")
        weights = getattr(cfg, f"{prefix}_data_weights")
        if weights and not paths:
            fail(
                f"{prefix}_data_weights",
                f"gives a weight per {prefix}_data_paths entry, but {prefix}_data_paths is not set",
            )
        if paths and weights and len(paths) != len(weights):
            fail(
                f"{prefix}_data_weights",
                f"{len(weights)} weights for {len(paths)} paths",
            )
        if weights and any(isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0 for w in weights):
            fail(
                f"{prefix}_data_weights",
                f"weights must be non-negative numbers, got {weights!r}",
            )
    saves = cfg.extra_save_iters
    if saves and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in saves):
        fail(
            "extra_save_iters",
            f"must be a list of iteration numbers (integers >= 0), got {saves!r}",
        )
    parts = cfg.split.split(",")
    if not 1 <= len(parts) <= 3 or any(not p.strip().replace(".", "", 1).isdigit() for p in parts):
        fail(
            "split",
            f"expected up to three comma-separated non-negative numbers, got {cfg.split!r}",
        )
    if not any(float(p) for p in parts):  # the shares are normalised by their sum
        fail("split", f"gives every split a share of 0 ({cfg.split!r}); at least one must be positive")


def _check_fim(check: _Checker) -> None:
    """Fill-in-the-middle: rates are probabilities, per-source rates line up with their paths, and the
    three sentinels are distinct names (whether the tokenizer has them is checked with the data)."""
    cfg, fail = check.cfg, check.fail
    for key in ("fim_rate", "fim_spm_rate"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            fail(key, f"is a probability in [0, 1], got {getattr(cfg, key)}")
    for prefix in DATA_SPLITS:
        key, rates = f"{prefix}_data_fim_rates", getattr(cfg, f"{prefix}_data_fim_rates")
        if rates is None:
            continue
        paths = getattr(cfg, f"{prefix}_data_paths")
        if not paths:
            fail(key, f"gives a rate per {prefix}_data_paths entry, but {prefix}_data_paths is not set")
        if len(rates) != len(paths):
            fail(key, f"{len(rates)} rates for {len(paths)} paths")
        for rate in rates:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                fail(key, f"rates must be probabilities in [0, 1], got {rate!r} in {rates!r}")
    names = {key: getattr(cfg, key) for key in ("fim_prefix_token", "fim_middle_token", "fim_suffix_token")}
    for key, name in names.items():
        if not name:
            fail(key, "must name a token, got an empty string")
    if len(set(names.values())) != len(names):
        fail("fim_suffix_token", f"the three FIM sentinels must differ, got {list(names.values())}")


def _check_long_run(check: _Checker) -> None:
    """The loss-spike and skip-window keys (training/spikes.py)."""
    cfg = check.cfg
    if cfg.spike_loss_ratio is not None and cfg.spike_loss_ratio <= 1:
        check.fail(
            "spike_loss_ratio", f"must exceed 1 (a multiple of the running mean), got {cfg.spike_loss_ratio}"
        )
    if cfg.spike_loss_ratio and cfg.params_dtype_name == "fp16":
        check.fail(
            "spike_loss_ratio",
            "cannot be used with fp16: a skipped spike goes through the overflow path, which fp16's loss "
            "scaler would count as an overflow (use bf16)",
        )
    if cfg.spike_grad_norm_ratio is not None and cfg.spike_grad_norm_ratio <= 1:
        check.fail("spike_grad_norm_ratio", f"must exceed 1, got {cfg.spike_grad_norm_ratio}")
    if cfg.spike_rollback_skips and not (cfg.spike_loss_ratio or cfg.spike_grad_norm_ratio):
        check.fail("spike_rollback_skips", "counts spikes: set spike_loss_ratio or spike_grad_norm_ratio too")
    from megatron_stablelm.training.spikes import parse_iteration_ranges

    try:
        parse_iteration_ranges(cfg.skip_train_iteration_range)
    except ValueError as err:
        check.fail("skip_train_iteration_range", str(err).split(": ", 1)[1])


def _check_precision_and_zero(check: _Checker) -> None:
    cfg, fail = check.cfg, check.fail
    for key in ("bf16", "fp16"):
        block = getattr(cfg, key)
        if block and not isinstance(block.get("enabled", True), bool):
            fail(key, f"`enabled` must be true or false, got {block.get('enabled')!r}")
    if cfg.bf16 and cfg.bf16.get("enabled", True) and cfg.fp16 and cfg.fp16.get("enabled", True):
        fail("fp16", "bf16 and fp16 cannot both be enabled")
    _check_deepspeed_block(check, "zero_optimization", DEEPSPEED_ZERO_KEYS | ZERO_KEYS_DROPPED)
    if cfg.params_dtype_name == "fp16":  # the engine hands the block to DeepSpeed only then
        _check_deepspeed_block(check, "fp16", DEEPSPEED_FP16_KEYS | FP16_KEYS_DROPPED)
    stage = (cfg.zero_optimization or {}).get("stage", 0)
    if stage == 3:
        fail("zero_optimization", "ZeRO stage 3 is not supported (use 0, 1 or 2)")
    if isinstance(stage, bool) or stage not in ZERO_STAGES:
        fail(
            "zero_optimization",
            f"unknown ZeRO stage {stage!r}; expected one of 0, 1, 2",
        )


def _check_deepspeed_block(check: _Checker, key: str, allowed: frozenset[str]) -> None:
    """A block handed to DeepSpeed has only keys its config model knows: DeepSpeed would refuse any
    other only when its engine starts, a minute into the run."""
    unknown = sorted(str(sub) for sub in getattr(check.cfg, key) or {} if sub not in allowed)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        check.fail(key, f"unknown sub-key '{unknown[0]}' (DeepSpeed's config has no such key){hint}")


def _check_fp8(check: _Checker) -> None:
    """FP8 GEMMs (``fp8``, megatron_stablelm/kernels/fp8.py): bf16 or fp32 compute, and the dimensions
    of every linear's three GEMMs on one TP rank multiples of 16 (``torch._scaled_mm``'s constraint).
    The device is checked where the model runs."""
    cfg = check.cfg
    if cfg.fp8 is None:
        return
    if cfg.params_dtype_name == "fp16":
        check.fail(
            "fp8",
            f"{cfg.fp8!r} needs bf16 (or fp32) training, not fp16: fp16's loss scaling and FP8's "
            "per-tensor scales are not combined here; use bf16",
        )
    tp = cfg.model_parallel_size
    dims = (
        ("hidden_size", cfg.hidden_size),
        ("the QKV outputs per TP rank", (cfg.num_attention_heads + 2 * cfg.kv_heads) * cfg.head_dim // tp),
        ("the attention output's inputs per TP rank", cfg.num_attention_heads * cfg.head_dim // tp),
        ("the MLP width per TP rank", cfg.ffn_hidden_size // tp),
        ("the tokens of a micro-batch", cfg.seq_length * cfg.train_micro_batch_size_per_gpu),
    )
    for what, size in dims:
        if size % 16:
            check.fail("fp8", f"FP8 GEMMs need multiples of 16, but {what} is {size}")


def _check_schedule(check: _Checker, training: bool) -> None:
    """The optimizer block (when given, or always for training) and the schedule against its peak."""
    cfg = check.cfg
    if cfg.optimizer is None and not training:
        return
    adam = read_adam_block(cfg.optimizer, check.where("optimizer"))
    if cfg.min_lr > adam.lr:
        check.fail(
            "min_lr",
            f"{cfg.min_lr} is above the peak learning rate optimizer.params.lr={adam.lr}",
        )


def expand_attention_config(spec: list, num_layers: int, source: str | None = None) -> list[str]:
    """GPT-NeoX's ``[[["flash"], 24]]`` → one attention type per layer (``"all"``: every layer)."""
    where = f"{source}: " if source else ""
    out: list[str] = []
    try:
        for kinds, count in spec:
            if isinstance(kinds, str):
                kinds = [kinds]
            repeats = num_layers if count == "all" else int(count) // len(kinds)
            for _ in range(repeats):
                out.extend(kinds)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{where}key 'attention_config': expected [[[type, ...], n_layers], ...], got {spec!r}"
        ) from None
    for kind in out:
        if kind in UNSUPPORTED_ATTENTION:
            raise ConfigError(
                f"{where}key 'attention_config': {kind!r} needs {UNSUPPORTED_ATTENTION[kind]}, which is "
                f"not implemented; expected one of {', '.join(ATTENTION_TYPES)}"
            )
        if kind not in ATTENTION_TYPES:
            raise ConfigError(
                f"{where}key 'attention_config': unknown attention type {kind!r}; "
                f"expected one of {', '.join(ATTENTION_TYPES)}"
            )
    if len(out) != num_layers:
        raise ConfigError(
            f"{where}key 'attention_config': covers {len(out)} layers, num_layers is {num_layers}"
        )
    return out
