"""The :class:`Config` dataclass: every key the framework reads, and every value derived from them.

A derived value (the KV-head count, the MLP width, the precision, the effective ZeRO stage, the Adam
settings, the schedule's step counts, the architecture that checkpoints compare) is a property here
and nowhere else, so the trainer, the tools and the checks all read the same answer. The properties
assume a validated config (:func:`megatron_stablelm.config.validate_config`); the ones only training
needs (``adam``, ``peak_lr``, ``warmup_steps`` ...) raise :class:`ConfigError` when their keys are unset.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from megatron_stablelm.config.adam import AdamSettings, read_adam_block
from megatron_stablelm.config.choices import (
    ARCHITECTURE_KEYS,
    GATED_ACTIVATIONS,
    GATED_MLP_TYPES,
)
from megatron_stablelm.config.errors import ConfigError
from megatron_stablelm.config.precision import SHORT_NAMES, torch_dtype

if TYPE_CHECKING:
    import torch

BOOKKEEPING_FIELDS = ("config_files", "ignored_keys")


def positive(default: Any = None) -> Any:
    """A field for a count, size or scale: the validator requires > 0 when it is given."""
    return field(default=default, metadata={"minimum": 0, "strict": True})


def non_negative(default: Any, zero_means: str = "") -> Any:
    """A field the validator requires to be >= 0; ``zero_means`` (for the message) says what 0 does."""
    return field(default=default, metadata={"minimum": 0, "strict": False, "zero_means": zero_means})


def _round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


def warmup_steps(warmup: float, train_iters: int) -> int:
    """``warmup`` < 1 is a fraction of ``train_iters``; >= 1 is a step count."""
    if warmup >= 1:
        return int(round(warmup))
    return int(round(warmup * train_iters))


@dataclass
class Config:
    """Every key the framework reads, with GPT-NeoX's defaults. Field names use ``_``."""

    # ---------------------------------------------------------------- model shape
    num_layers: int | None = positive()
    hidden_size: int | None = positive()
    num_attention_heads: int | None = positive()
    num_kv_heads: int | None = positive()  # None: 1 for multiquery, else num_attention_heads
    attention_head_type: str | None = None  # None: from num_kv_heads (GPT-NeoX: MHA, GQA or MQA)
    seq_length: int | None = positive()
    max_position_embeddings: int | None = positive()  # None: seq_length
    intermediate_size: int | None = positive()  # MLP width; see ffn_hidden_size for each rule
    expansion_factor: float | None = positive()  # GPT-NeoX: intermediate_size = factor × hidden_size
    mlp_type: str = "regular"
    mlp_multiple_of: int | None = positive()  # None: 256 for mlp_type gated, 1 (GPT-NeoX's) otherwise
    activation: str = "gelu"
    bias_gelu_fusion: bool = False  # GPT-NeoX: GeLU in its tanh approximation (act_fn_name "gelu_tanh")
    hf_hidden_act: str | None = None  # the HF name of the activation, kept from an import for the export
    norm: str = "layernorm"  # or rmsnorm (weight only: GPT-NeoX's RMSNorm has no bias)
    layernorm_epsilon: float = positive(1.0e-5)
    rms_norm_epsilon: float = positive(1.0e-8)  # GPT-NeoX's default; its Llama configs set 1e-6 / 1e-5
    pos_emb: str = "rotary"
    rotary_pct: float = 1.0
    rotary_emb_base: float = positive(10000.0)
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
    init_method_std: float = positive(0.02)
    use_flash_cross_entropy: bool = False  # fused LM head + loss, never materialising the logits

    # ---------------------------------------------------------------- tokenizer / vocab
    tokenizer_type: str = "HFTokenizer"
    vocab_file: str | None = None
    merge_file: str | None = None
    padded_vocab_size: int | None = positive()  # explicit override of the padded vocab
    make_vocab_size_divisible_by: int = positive(128)

    # ---------------------------------------------------------------- parallelism
    model_parallel_size: int = positive(1)
    pipe_parallel_size: int = non_negative(0)  # 0 and 1: one stage (GPT-NeoX's meanings); more is refused
    sequence_parallel: bool = False  # megatron-core sequence parallelism at model_parallel_size > 1
    partition_activations: bool = False  # GPT-NeoX's activation partitioning: sequence parallelism here
    distributed_backend: str | None = None  # None: nccl on GPU, gloo on CPU

    # ---------------------------------------------------------------- precision
    precision: str | None = None
    bf16: dict | None = None
    fp16: dict | None = None
    fp32_allreduce: bool = False
    full_precision_lm_cross_entropy: bool = False
    fp8: str | None = None  # FP8 GEMMs in the linear layers: tensorwise / rowwise (kernels/fp8.py)

    # ---------------------------------------------------------------- optimisation
    optimizer: dict | None = None
    zero_optimization: dict | None = None
    train_batch_size: int | None = positive()
    train_micro_batch_size_per_gpu: int = positive(1)
    gradient_accumulation_steps: int = positive(1)
    gradient_clipping: float = non_negative(1.0, zero_means="turns clipping off")
    weight_decay: float = non_negative(0.01)
    train_iters: int | None = positive()
    lr_decay_iters: int | None = positive()
    lr_decay_style: str = "linear"
    warmup: float = non_negative(0.01)
    min_lr: float = non_negative(0.0)
    cooldown: float = 0.0
    override_lr_scheduler: bool = False
    seed: int = non_negative(1234)
    max_nonfinite_steps: int = non_negative(10, zero_means="never aborts")  # skipped steps in a row
    watchdog_timeout: float = non_negative(1800.0, zero_means="turns the hang watchdog off")  # seconds
    spike_loss_ratio: float | None = positive()  # skip an update whose loss exceeds this x its running mean
    spike_grad_norm_ratio: float | None = positive()  # a gradient norm above this x its running mean
    spike_rollback_skips: int | None = positive()  # this many spike skips within the window: roll back
    spike_rollback_window: int = positive(100)  # iterations
    skip_train_iteration_range: list | None = None  # ["A-B", ...]: iterations whose batches are dropped

    # ---------------------------------------------------------------- activation memory
    checkpoint_activations: bool = False
    checkpoint_num_layers: int = positive(1)
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
    num_workers: int = non_negative(2, zero_means="loads in the main process")
    mixture_epochs_warning: float = positive(4.0)
    # fill-in-the-middle (megatron_stablelm/data/fim.py): the GPT-NeoX fork's keys, plus a per-source rate
    fim_rate: float = 0.0  # every source of every split; 0: off
    fim_spm_rate: float = 0.5  # share of FIM documents in SPM order (else PSM)
    train_data_fim_rates: list | None = None  # one per train_data_paths entry; None: fim_rate for each
    valid_data_fim_rates: list | None = None
    test_data_fim_rates: list | None = None
    fim_prefix_token: str = "<fim_prefix>"
    fim_middle_token: str = "<fim_middle>"
    fim_suffix_token: str = "<fim_suffix>"

    # ---------------------------------------------------------------- evaluation
    eval_interval: int = non_negative(1000, zero_means="turns periodic evaluation off")
    eval_iters: int = non_negative(100, zero_means="turns evaluation off")
    eval_batch_size: int | None = positive()
    eval_tasks: list | None = None
    eval_limit: float | None = positive()  # lm-eval: documents per task (>= 1) or a fraction (< 1)
    eval_num_fewshot: int | None = non_negative(None)  # lm-eval: few-shot examples per prompt

    # ---------------------------------------------------------------- checkpoints
    save: str | None = None
    load: str | None = None
    checkpoint_factor: int | None = positive()
    extra_save_iters: list | None = None
    iteration: int | None = non_negative(None)
    finetune: bool = False
    start_from_load: bool = False  # start over from `load` although `save` holds this run's progress
    no_checkpoint_arg_validation: bool = False
    keep_last_n_checkpoints: int | None = positive()  # None: keep every checkpoint
    async_save: bool = False  # write checkpoints in the background (training continues)

    # ---------------------------------------------------------------- logging
    log_interval: int = positive(100)
    steps_per_print: int = non_negative(10, zero_means="turns DeepSpeed's progress line off")
    log_grad_norm: bool = False
    wall_clock_breakdown: bool = False
    tensorboard_dir: str | None = None
    log_dir: str | None = None  # where the run writes its log file
    use_wandb: bool = False
    wandb_host: str | None = None
    wandb_team: str | None = None
    wandb_project: str | None = None
    wandb_group: str | None = None
    wandb_name: str | None = None
    wandb_id: str | None = None  # the W&B run to continue (with wandb_resume)
    wandb_resume: str | None = None  # wandb.init's resume mode: allow / must / never / auto
    peak_tflops: float | None = positive()  # per-device peak for MFU; None: detected from the device

    # ---------------------------------------------------------------- launch
    launcher: str = "pdsh"
    deepspeed_slurm: bool = False
    hostfile: str | None = None
    include: str | None = None
    exclude: str | None = None
    num_gpus: int | None = positive()
    num_nodes: int | None = positive()
    master_port: int = positive(29500)
    master_addr: str | None = None

    # ---------------------------------------------------------------- bookkeeping (not user keys)
    config_files: list = field(default_factory=list)
    ignored_keys: dict = field(default_factory=dict)

    # ================================================================ derived architecture
    @property
    def kv_heads(self) -> int:
        """``num_kv_heads``; without it one for ``multiquery`` (GPT-NeoX's MQA), else one per head."""
        if self.num_kv_heads is not None:
            return self.num_kv_heads
        return 1 if self.attention_head_type == "multiquery" else self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def max_positions(self) -> int:
        """The longest sequence the model is built for: ``max_position_embeddings``, else ``seq_length``."""
        return self.max_position_embeddings or self.seq_length

    @property
    def is_gated_mlp(self) -> bool:
        return self.mlp_type in GATED_MLP_TYPES or self.activation in GATED_ACTIVATIONS

    @property
    def ffn_hidden_size(self) -> int:
        """Per-branch MLP width (the second projection's input).

        ``mlp_type: gated`` (Stability AI's fork): ``intermediate_size`` as given, else 8/3·h rounded
        up to ``mlp_multiple_of`` (256). Otherwise GPT-NeoX's rule, :attr:`neox_mlp_widths`."""
        if self.mlp_type in GATED_MLP_TYPES:
            if self.intermediate_size is not None:
                return self.intermediate_size
            return _round_up(int(2 * self.hidden_size * 4 / 3), self.mlp_multiple_of or 256)
        return self.neox_mlp_widths[1]

    @property
    def neox_mlp_widths(self) -> tuple[int, int]:
        """GPT-NeoX's (first projection's output, second projection's input) widths: from
        ``intermediate_size``, else ``expansion_factor × h``, else 4h; a gated activation takes 2/3 of
        it for both branches together; the first width is rounded up to 2 × ``mlp_multiple_of``, the
        second to ``mlp_multiple_of`` (a plain MLP without ``mlp_multiple_of`` is not rounded)."""
        h = self.hidden_size
        base = self.intermediate_size or (int(self.expansion_factor * h) if self.expansion_factor else 4 * h)
        multiple = self.mlp_multiple_of or 1
        if self.activation in GATED_ACTIVATIONS:
            both = int(base * 2 / 3)
            return _round_up(both, 2 * multiple), _round_up(both // 2, multiple)
        if self.mlp_multiple_of is None:
            return base, base
        return _round_up(base, 2 * multiple), _round_up(base, multiple)

    @property
    def norm_epsilon(self) -> float:
        """The epsilon of every norm: ``rms_norm_epsilon`` for RMSNorm, else ``layernorm_epsilon``
        (GPT-NeoX's two keys)."""
        return self.rms_norm_epsilon if self.norm == "rmsnorm" else self.layernorm_epsilon

    @property
    def norm_bias(self) -> bool:
        """Whether the norms have a bias: ``use_bias_in_norms`` for LayerNorm; RMSNorm never has one
        (GPT-NeoX's RMSNorm is a weight only, as Llama's)."""
        return self.use_bias_in_norms and self.norm != "rmsnorm"

    @property
    def mlp_bias(self) -> bool:
        """Whether the MLP projections have biases: ``use_bias_in_mlp``, except for GPT-NeoX's
        ``mlp_type: llama`` (its LLaMAParallelMLP has none)."""
        return self.use_bias_in_mlp and self.mlp_type != "llama"

    @property
    def qk_norm_bias(self) -> bool:
        """Whether the per-head QK norms have a bias (``use_bias_in_qk_norm``, LayerNorm only)."""
        return self.qk_norm and self.use_bias_in_qk_norm and self.norm != "rmsnorm"

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
        """The function the MLP computes: GPT-NeoX's ``bias_gelu_fusion`` is GeLU's tanh form."""
        if self.activation == "gelu" and self.bias_gelu_fusion:
            return "gelu_tanh"
        if self.activation in GATED_ACTIVATIONS:
            return GATED_ACTIVATIONS[self.activation]
        return "silu" if self.activation == "swish" else self.activation

    def architecture(self) -> dict[str, Any]:
        """The values of ``ARCHITECTURE_KEYS``: equal for two configs iff a checkpoint of one loads
        into the model of the other and computes the same function."""
        return {key: getattr(self, key) for key in ARCHITECTURE_KEYS}

    def padded_vocab(self, vocab_size: int | None = None) -> int:
        """The embedding rows: ``padded_vocab_size`` if given, else ``vocab_size`` rounded up to a
        multiple of ``make_vocab_size_divisible_by × TP`` (GPT-NeoX's rule)."""
        if self.padded_vocab_size is not None:
            if vocab_size is not None and self.padded_vocab_size < vocab_size:
                # the embedding would have no row for the tokenizer's highest ids: an index error in
                # the first forward pass instead of this line
                raise ConfigError(
                    f"`padded_vocab_size` {self.padded_vocab_size} is smaller than the tokenizer's "
                    f"vocabulary ({vocab_size} tokens, `vocab_file` {self.vocab_file}): raise it to at "
                    f"least {vocab_size}, or leave it out to pad the vocabulary automatically"
                )
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
        """'fp32' | 'bf16' | 'fp16' from the ``bf16`` / ``fp16`` blocks, else ``precision``."""
        if self.bf16 and self.bf16.get("enabled", True):
            return "bf16"
        if self.fp16 and self.fp16.get("enabled", True):
            return "fp16"
        return SHORT_NAMES.get(self.precision, "fp32")

    @property
    def params_dtype(self) -> torch.dtype:
        """The torch dtype of :attr:`params_dtype_name` (torch is imported only here, so reading a
        config, as the launcher does, never needs it)."""
        return torch_dtype(self.params_dtype_name)

    @property
    def sequence_parallel_requested(self) -> bool:
        """Whether the config asks for sequence parallelism: our ``sequence_parallel`` key, or GPT-NeoX's
        ``partition_activations`` (its way of splitting activations over the TP ranks, which
        megatron-core's sequence parallelism replaces). It only acts at a TP size above 1."""
        return bool(self.sequence_parallel or self.partition_activations)

    @property
    def uses_sequence_parallel(self) -> bool:
        """Sequence parallelism at the config's own ``model_parallel_size`` (a model built over another
        TP group decides from :attr:`sequence_parallel_requested` and that group's size)."""
        return self.sequence_parallel_requested and self.model_parallel_size > 1

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage the config asks for (``zero_optimization.stage``, default 0)."""
        return int((self.zero_optimization or {}).get("stage", 0))

    @property
    def effective_zero_stage(self) -> int:
        """The stage a run uses: bf16 and fp16 always run under ZeRO (stage >= 1), which keeps fp32
        master weights, fp32 gradient accumulation for bf16 and one checkpoint format; at DP=1 stage
        1 partitions nothing. (Stage 3 is rejected by the validator.)"""
        if self.params_dtype_name != "fp32":
            return max(self.zero_stage, 1)
        return self.zero_stage

    @property
    def adam(self) -> AdamSettings:
        """The ``optimizer`` block read into Adam settings; raises if it has no learning rate."""
        return read_adam_block(self.optimizer)

    @property
    def peak_lr(self) -> float:
        """The schedule's peak: ``optimizer.params.lr``."""
        return self.adam.lr

    @property
    def required_train_iters(self) -> int:
        """``train_iters``, which training (and nothing else) requires."""
        if self.train_iters is None:
            raise ConfigError("key 'train_iters': required for training (the schedule counts its steps)")
        return self.train_iters

    @property
    def warmup_steps(self) -> int:
        """``warmup`` in optimizer steps (a fraction of ``train_iters`` when below 1)."""
        return warmup_steps(self.warmup, self.required_train_iters)

    @property
    def lr_decay_steps(self) -> int:
        """The decay horizon: ``lr_decay_iters``, default ``train_iters``."""
        train_iters = self.required_train_iters
        return train_iters if self.lr_decay_iters is None else self.lr_decay_iters

    @property
    def cooldown_steps(self) -> int:
        """``cooldown`` (a fraction of ``train_iters``) in optimizer steps."""
        return int(round(self.cooldown * self.required_train_iters))

    @property
    def eval_micro_batch(self) -> int:
        """Micro-batch size of evaluation: ``eval_batch_size``, else the training micro-batch."""
        return self.eval_batch_size or self.train_micro_batch_size_per_gpu

    def to_dict(self) -> dict[str, Any]:
        """The resolved user keys (bookkeeping fields left out); what checkpoints store."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in BOOKKEEPING_FIELDS
        }
