"""GPT-NeoX-compatible configuration: load, merge, type-check and validate YAML configs.

A run is described by one or more YAML files merged in order (later files win, key by key at the top
level), exactly as GPT-NeoX does, so Stability AI's published StableLM configs load unchanged. Keys may
be spelled with ``-`` or ``_``. Every key is declared once below, with its type and GPT-NeoX default.

Three kinds of key exist:

* used keys: fields of :class:`Config`;
* accepted-but-ignored keys (``IGNORED_KEYS``): features this framework does not have (s3 sync, muP,
  ...). They are reported once, never silently dropped and never fatal;
* anything else is an error naming the file and the nearest known key.

All validation happens in :func:`load_config` before any model, process group or data is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the file and/or key at fault."""


# Keys of GPT-NeoX / Stability's configs for features this framework does not implement. They are
# accepted (so published configs load as they are) and reported once, with the reason.
IGNORED_KEYS: dict[str, str] = {
    "s3_path": "S3 checkpoint sync is not implemented",
    "s3_sync_interval": "S3 checkpoint sync is not implemented",
    "use_mup": "muP is not implemented",
    "coord_check": "muP is not implemented",
    "save_base_shapes": "muP is not implemented",
    "base_shapes_file": "muP is not implemented",
    "mup_init_scale": "muP is not implemented",
    "mup_attn_temp": "muP is not implemented",
    "mup_output_temp": "muP is not implemented",
    "mup_embedding_mult": "muP is not implemented",
    "mup_rp_embedding_mult": "muP is not implemented",
    "mup_width_scale": "muP is not implemented",
    "partition_activations": "activation partitioning across TP ranks is not implemented",
    "synchronize_each_layer": "only meaningful for DeepSpeed activation partitioning",
    "scaled_upper_triang_masked_softmax_fusion": "attention kernels are chosen by attention_config",
    "scaled_masked_softmax_fusion": "attention kernels are chosen by attention_config",
    "bias_gelu_fusion": "element-wise fusions are chosen automatically (exact GeLU is used)",
    "bias_dropout_fusion": "element-wise fusions are chosen automatically",
    "rope_fusion": "element-wise fusions are chosen automatically",
    "use_bnb_optimizer": "bitsandbytes optimizers are not supported",
    "checkpoint_in_cpu": "activation checkpoints stay on the device",
    "contiguous_checkpointing": "activation checkpoints stay on the device",
    "profile_backward": "use the PyTorch profiler through tools/benchmark.py",
    "memory_profiling": "use the PyTorch profiler through tools/benchmark.py",
    "git_hash": "informational only",
    "user_script": "train.py is the entry point",
    "deepspeed_mpi": "the MPI launcher is not supported; use launcher: slurm or pdsh",
}

_PIPELINE_NOTE = "pipeline parallelism is not implemented (pipe_parallel_size > 1 runs as 1 stage)"

NORMS = ("layernorm",)
ACTIVATIONS = ("gelu", "silu", "swish", "relu")
POS_EMBS = ("rotary",)
ATTENTION_HEAD_TYPES = ("multihead", "groupedquery", "multiquery")
MLP_TYPES = ("regular", "gated", "llama")
INIT_METHODS = ("normal", "scaled_normal", "small_init", "wang_init", "xavier_uniform", "xavier_normal")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse_sqrt", "hybrid_cosine_inv_sqrt_2")
ATTENTION_TYPES = ("global", "flash", "sdpa", "math")
PRECISIONS = ("fp32", "float32", "fp16", "float16", "bf16", "bfloat16")


@dataclass
class Config:
    """Every key the framework reads, with GPT-NeoX's defaults. Field names use ``_``."""

    # ---------------------------------------------------------------- model shape
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_kv_heads: int | None = None  # None: same as num_attention_heads
    attention_head_type: str = "multihead"
    seq_length: int | None = None
    max_position_embeddings: int | None = None  # None: seq_length
    intermediate_size: int | None = None  # per-branch MLP width; None: derived (4h, or 8/3h rounded)
    mlp_type: str = "regular"
    mlp_multiple_of: int = 256
    activation: str = "gelu"
    norm: str = "layernorm"
    layernorm_epsilon: float = 1.0e-5
    pos_emb: str = "rotary"
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    rotary_interleaved: bool = False
    gpt_j_residual: bool = False  # parallel attention + MLP residual
    gpt_j_tied: bool = False  # ... with one shared input LayerNorm
    qk_norm: bool = False  # per-head LayerNorm on queries and keys
    use_bias_in_norms: bool = True
    use_bias_in_qk_norm: bool = False
    use_bias_in_attn_linear: bool = True  # Q/K/V *and* attention output projection biases
    use_qkv_bias: bool | None = None  # Q/K/V-only bias (Stable LM 2 1.6B); None: use_bias_in_attn_linear
    use_bias_in_mlp: bool = True
    no_weight_tying: bool = False
    output_layer_parallelism: str = "column"
    attention_config: list | None = None  # e.g. [[["flash"], 24]]
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method: str = "normal"
    output_layer_init_method: str = "scaled_normal"
    init_method_std: float = 0.02
    use_flash_cross_entropy: bool = False  # fused LM head + loss, never materialising the logits

    # ---------------------------------------------------------------- tokenizer / vocab
    tokenizer_type: str = "HFTokenizer"
    vocab_file: str | None = None
    merge_file: str | None = None
    padded_vocab_size: int | None = None  # explicit override of the padded vocab
    make_vocab_size_divisible_by: int = 128

    # ---------------------------------------------------------------- parallelism
    model_parallel_size: int = 1
    pipe_parallel_size: int = 0
    distributed_backend: str | None = None  # None: nccl on GPU, gloo on CPU

    # ---------------------------------------------------------------- precision
    precision: str | None = None
    bf16: dict | None = None
    fp16: dict | None = None
    fp32_allreduce: bool = False
    full_precision_lm_cross_entropy: bool = False

    # ---------------------------------------------------------------- optimisation
    optimizer: dict | None = None
    zero_optimization: dict | None = None
    train_batch_size: int | None = None
    train_micro_batch_size_per_gpu: int = 1
    gradient_accumulation_steps: int = 1
    gradient_clipping: float = 1.0
    weight_decay: float = 0.01
    train_iters: int | None = None
    lr_decay_iters: int | None = None
    lr_decay_style: str = "linear"
    warmup: float = 0.01
    min_lr: float = 0.0
    cooldown: float = 0.0
    override_lr_scheduler: bool = False
    seed: int = 1234
    max_nonfinite_steps: int = 10  # abort after this many skipped non-finite steps in a row

    # ---------------------------------------------------------------- activation memory
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = 1
    recompute_granularity: str | None = None  # None / "full" / "selective"

    # ---------------------------------------------------------------- data
    data_path: str | None = None
    split: str = "969,30,1"  # train,valid,test document shares of a single data_path
    train_data_paths: list | None = None
    train_data_weights: list | None = None
    valid_data_paths: list | None = None
    valid_data_weights: list | None = None
    test_data_paths: list | None = None
    test_data_weights: list | None = None
    data_impl: str = "mmap"
    data_cache_dir: str | None = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    num_workers: int = 2
    mixture_epochs_warning: float = 4.0

    # ---------------------------------------------------------------- evaluation
    eval_interval: int = 1000
    eval_iters: int = 100
    eval_batch_size: int | None = None
    eval_tasks: list | None = None

    # ---------------------------------------------------------------- checkpoints
    save: str | None = None
    load: str | None = None
    checkpoint_factor: int | None = None
    extra_save_iters: list | None = None
    iteration: int | None = None
    finetune: bool = False
    no_checkpoint_arg_validation: bool = False

    # ---------------------------------------------------------------- logging
    log_interval: int = 100
    steps_per_print: int = 10
    log_grad_norm: bool = False
    wall_clock_breakdown: bool = False
    tensorboard_dir: str | None = None
    use_wandb: bool = False
    wandb_host: str | None = None
    wandb_team: str | None = None
    wandb_project: str | None = None
    wandb_group: str | None = None
    wandb_name: str | None = None
    peak_tflops: float | None = None  # per-device peak for MFU; None: detected from the device

    # ---------------------------------------------------------------- launch
    launcher: str = "pdsh"
    deepspeed_slurm: bool = False
    hostfile: str | None = None
    include: str | None = None
    exclude: str | None = None
    num_gpus: int | None = None
    num_nodes: int | None = None
    master_port: int = 29500
    master_addr: str | None = None

    # ---------------------------------------------------------------- bookkeeping (not user keys)
    config_files: list = field(default_factory=list)
    ignored_keys: dict = field(default_factory=dict)

    # ================================================================ derived architecture
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def is_gated_mlp(self) -> bool:
        return self.mlp_type in ("gated", "llama")

    @property
    def ffn_hidden_size(self) -> int:
        """Per-branch MLP width: 4h for a plain MLP; 8/3·h rounded up to ``mlp_multiple_of`` if gated."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        if not self.is_gated_mlp:
            return 4 * self.hidden_size
        width = int(2 * self.hidden_size * 4 / 3)
        return self.mlp_multiple_of * math.ceil(width / self.mlp_multiple_of)

    @property
    def qkv_bias(self) -> bool:
        return self.use_bias_in_attn_linear if self.use_qkv_bias is None else self.use_qkv_bias

    @property
    def dense_bias(self) -> bool:
        """Bias of the attention output projection."""
        return self.use_bias_in_attn_linear

    @property
    def tied_embeddings(self) -> bool:
        return not self.no_weight_tying

    @property
    def act_fn_name(self) -> str:
        return "silu" if self.activation == "swish" else self.activation

    @property
    def tp(self) -> int:
        return self.model_parallel_size

    def padded_vocab(self, vocab_size: int | None = None) -> int:
        """The embedding rows: ``padded_vocab_size`` if given, else ``vocab_size`` rounded up to a
        multiple of ``make_vocab_size_divisible_by × TP`` (GPT-NeoX's rule)."""
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        if vocab_size is None:
            raise ConfigError(
                "the vocabulary size is unknown: give `padded_vocab_size` (or the tokenizer's `vocab_file`)"
            )
        multiple = self.make_vocab_size_divisible_by * self.model_parallel_size
        return multiple * math.ceil(vocab_size / multiple)

    # ================================================================ derived training settings
    @property
    def params_dtype_name(self) -> str:
        if self.bf16 and self.bf16.get("enabled", True):
            return "bf16"
        if self.fp16 and self.fp16.get("enabled", True):
            return "fp16"
        if self.precision in ("bf16", "bfloat16"):
            return "bf16"
        if self.precision in ("fp16", "float16"):
            return "fp16"
        return "fp32"

    @property
    def zero_stage(self) -> int:
        return int((self.zero_optimization or {}).get("stage", 0))

    def to_dict(self) -> dict[str, Any]:
        """The resolved user keys (bookkeeping fields left out); what checkpoints store."""
        skip = {"config_files", "ignored_keys"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_NOT_USER_KEYS = {"config_files", "ignored_keys"}
KNOWN_KEYS = sorted(set(FIELDS) - _NOT_USER_KEYS | set(IGNORED_KEYS))
_TYPE_HINTS = typing.get_type_hints(Config)


def normalize_key(key: str) -> str:
    return str(key).replace("-", "_")


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """One config file as a dict with normalised keys. PyYAML reads NeoX's JSON-like files as they are
    (``#`` comments, trailing commas, ``540_000``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = normalize_key(raw_key)
        if key in out:
            raise ConfigError(f"{path}: key '{key}' is given twice (as '{raw_key}' and another spelling)")
        out[key] = value
    return out


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check ``value`` against the declared type of ``key``; convert the lossless cases YAML produces
    (int for float, '1e-5' strings for float)."""
    hint = _TYPE_HINTS[key]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: key '{key}' may not be null")
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if isinstance(base, types.GenericAlias):
        base = typing.get_origin(base)

    def bad() -> ConfigError:
        return ConfigError(
            f"{source}: key '{key}' must be {getattr(base, '__name__', base)}, got {value!r} "
            f"({type(value).__name__})"
        )

    if base is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if base is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        if isinstance(value, float) and not value.is_integer():
            raise bad()
        return int(value)
    if base is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.replace("_", ""))
            except ValueError:
                raise bad() from None
        raise bad()
    if base is str:
        if isinstance(value, str):
            return value
        raise bad()
    if base is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise bad()
    if base is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise bad()
    return value


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--override '{text}': expected key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    return normalize_key(key.strip()), value


def load_config(
    paths: Sequence[str | Path] | str | Path,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    *,
    validate: bool = True,
    report_ignored: bool = True,
) -> Config:
    """Merge the YAML files in order (later wins), apply ``key=value`` overrides, type-check, validate.

    Raises :class:`ConfigError` naming the file and key for unknown keys, wrong types and impossible
    combinations; nothing is built before this returns.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise ConfigError("no config file given")
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    ignored: dict[str, str] = {}
    layers: list[tuple[str, dict[str, Any]]] = [(str(p), read_yaml(p)) for p in paths]
    if overrides:
        items = overrides.items() if isinstance(overrides, Mapping) else map(_parse_override, overrides)
        layers.append(("--override", {normalize_key(k): v for k, v in items}))
    for source, data in layers:
        for key, value in data.items():
            if key in IGNORED_KEYS:
                ignored[key] = IGNORED_KEYS[key]
                continue
            if key not in FIELDS or key in _NOT_USER_KEYS:
                raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key)}")
            merged[key] = _coerce(key, value, source)
            origin[key] = source
    cfg = Config(**merged)
    cfg.config_files = [str(p) for p in paths]
    if cfg.pipe_parallel_size > 1:
        ignored["pipe_parallel_size"] = _PIPELINE_NOTE
    cfg.ignored_keys = ignored
    if validate:
        validate_config(cfg, origin)
    if report_ignored and ignored:
        for key, why in sorted(ignored.items()):
            print(f"[config] ignoring '{key}': {why}")
    if report_ignored and "pos_emb" not in merged:
        # GPT-NeoX's default is learned absolute positions, which no StableLM uses and this framework
        # does not build; say so rather than silently running a different model.
        print("[config] 'pos_emb' not given: using rotary (GPT-NeoX would default to learned embeddings)")
    return cfg


def config_from_dict(values: Mapping[str, Any], *, validate: bool = True) -> Config:
    """A :class:`Config` from a plain dict (tests, checkpoints); same checks as :func:`load_config`."""
    merged = {}
    for key, value in values.items():
        key = normalize_key(key)
        if key in IGNORED_KEYS:
            continue
        if key not in FIELDS or key in _NOT_USER_KEYS:
            raise ConfigError(f"<dict>: unknown key '{key}'{_suggest(key)}")
        merged[key] = _coerce(key, value, "<dict>")
    cfg = Config(**merged)
    if validate:
        validate_config(cfg, {k: "<dict>" for k in merged})
    return cfg


def validate_config(cfg: Config, origin: Mapping[str, str] | None = None) -> None:
    """Check values and their combinations; each message says which key and why."""
    origin = origin or {}

    def fail(key: str, why: str) -> None:
        where = origin.get(key)
        prefix = f"{where}: " if where else ""
        raise ConfigError(f"{prefix}key '{key}': {why}")

    for key in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        value = getattr(cfg, key)
        if value is None:
            files = ", ".join(cfg.config_files) or "the config"
            raise ConfigError(f"key '{key}' is required but missing from {files}")
        if value <= 0:
            fail(key, f"must be positive, got {value}")

    def choice(key: str, allowed: Sequence[str]) -> None:
        value = getattr(cfg, key)
        if value not in allowed:
            fail(key, f"unknown value {value!r}; expected one of {', '.join(allowed)}")

    choice("norm", NORMS)
    choice("activation", ACTIVATIONS)
    choice("pos_emb", POS_EMBS)
    choice("attention_head_type", ATTENTION_HEAD_TYPES)
    choice("mlp_type", MLP_TYPES)
    choice("init_method", INIT_METHODS)
    choice("output_layer_init_method", INIT_METHODS)
    choice("lr_decay_style", LR_DECAY_STYLES)
    if cfg.precision is not None:
        choice("precision", PRECISIONS)
    if cfg.output_layer_parallelism != "column":
        fail("output_layer_parallelism", "only 'column' is supported")
    if cfg.data_impl != "mmap":
        fail("data_impl", f"only 'mmap' indexed datasets are supported, got {cfg.data_impl!r}")
    if cfg.rotary_interleaved:
        fail("rotary_interleaved", "interleaved (GPT-J style) rotary is not supported; StableLM uses false")
    if cfg.recompute_granularity not in (None, "full", "selective"):
        fail("recompute_granularity", "expected 'full' or 'selective'")
    if cfg.distributed_backend not in (None, "nccl", "gloo"):
        fail("distributed_backend", f"expected 'nccl' or 'gloo', got {cfg.distributed_backend!r}")

    heads, kv = cfg.num_attention_heads, cfg.kv_heads
    if cfg.hidden_size % heads:
        fail("hidden_size", f"{cfg.hidden_size} is not divisible by num_attention_heads={heads}")
    if kv <= 0 or heads % kv:
        fail("num_kv_heads", f"num_attention_heads={heads} is not divisible by num_kv_heads={kv}")
    if cfg.attention_head_type == "multihead" and kv != heads:
        fail("attention_head_type", f"'multihead' needs num_kv_heads == num_attention_heads, got {kv}")
    if cfg.attention_head_type == "multiquery" and kv != 1:
        fail("attention_head_type", f"'multiquery' needs num_kv_heads == 1, got {kv}")
    if cfg.model_parallel_size < 1:
        fail("model_parallel_size", "must be >= 1")
    tp = cfg.model_parallel_size
    if heads % tp:
        fail(
            "model_parallel_size",
            f"num_attention_heads={heads} is not divisible by the tensor-parallel size {tp}",
        )
    if kv % tp:
        fail("model_parallel_size", f"num_kv_heads={kv} is not divisible by the tensor-parallel size {tp}")
    if cfg.ffn_hidden_size % tp:
        fail("model_parallel_size", f"the MLP width {cfg.ffn_hidden_size} is not divisible by TP={tp}")
    if not 0.0 < cfg.rotary_pct <= 1.0:
        fail("rotary_pct", f"must be in (0, 1], got {cfg.rotary_pct}")
    if cfg.rotary_dim % 2:
        fail("rotary_pct", f"gives an odd rotary dimension {cfg.rotary_dim} (head dim {cfg.head_dim})")
    if cfg.gpt_j_tied and not cfg.gpt_j_residual:
        fail("gpt_j_tied", "needs gpt_j_residual: true")
    if cfg.max_position_embeddings is not None and cfg.seq_length > cfg.max_position_embeddings:
        fail("seq_length", f"{cfg.seq_length} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    if cfg.padded_vocab_size is not None and cfg.padded_vocab_size % tp:
        fail("padded_vocab_size", f"{cfg.padded_vocab_size} is not divisible by TP={tp}")
    for key in ("hidden_dropout", "attention_dropout"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            fail(key, "must be in [0, 1)")
    if cfg.init_method_std <= 0:
        fail("init_method_std", "must be positive")
    if cfg.train_micro_batch_size_per_gpu < 1:
        fail("train_micro_batch_size_per_gpu", "must be >= 1")
    if cfg.gradient_accumulation_steps < 1:
        fail("gradient_accumulation_steps", "must be >= 1")
    if cfg.attention_config is not None:
        expand_attention_config(cfg.attention_config, cfg.num_layers, origin.get("attention_config"))
    for prefix in ("train", "valid", "test"):
        paths = getattr(cfg, f"{prefix}_data_paths")
        weights = getattr(cfg, f"{prefix}_data_weights")
        if paths and weights and len(paths) != len(weights):
            fail(f"{prefix}_data_weights", f"{len(weights)} weights for {len(paths)} paths")
        if weights and any((not isinstance(w, (int, float))) or w < 0 for w in weights):
            fail(f"{prefix}_data_weights", "weights must be non-negative numbers")
    if cfg.bf16 and cfg.bf16.get("enabled", True) and cfg.fp16 and cfg.fp16.get("enabled", True):
        fail("fp16", "bf16 and fp16 cannot both be enabled")
    if cfg.zero_stage not in (0, 1, 2, 3):
        fail("zero_optimization", f"unknown ZeRO stage {cfg.zero_stage}")
    if not 0.0 <= cfg.cooldown < 1.0:
        fail("cooldown", "is a fraction of train_iters in [0, 1)")
    if cfg.warmup < 0:
        fail("warmup", "must be >= 0")
    parts = cfg.split.split(",")
    if not 1 <= len(parts) <= 3 or any(not p.strip().replace(".", "", 1).isdigit() for p in parts):
        fail("split", f"expected up to three comma-separated non-negative numbers, got {cfg.split!r}")


def expand_attention_config(spec: list, num_layers: int, source: str | None = None) -> list[str]:
    """GPT-NeoX's ``[[["flash"], 24]]`` → one attention type per layer."""
    where = f"{source}: " if source else ""
    out: list[str] = []
    try:
        for kinds, count in spec:
            if isinstance(kinds, str):
                kinds = [kinds]
            for _ in range(int(count) // len(kinds)):
                out.extend(kinds)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}key 'attention_config': expected [[[type, ...], n_layers], ...]") from None
    for kind in out:
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
