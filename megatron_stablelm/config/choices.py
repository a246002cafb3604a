"""Every list of allowed values a config key can take, defined once.

The validator checks keys against these tuples and the code that acts on a value imports the same
tuple (kernels, tokenizers, the optimizer), so a value the config accepts is always one the code can
run, and the error message lists exactly what is allowed.
"""

from __future__ import annotations

from megatron_stablelm.config.precision import SHORT_NAMES

NORMS = ("layernorm", "rmsnorm")
# GPT-NeoX's gated activations: the MLP is gated with this activation and sized by GPT-NeoX's rule.
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
ACTIVATIONS = ("gelu", "silu", "swish", "relu", *GATED_ACTIVATIONS)
# ``hf_hidden_act``: the names ``transformers`` gives each function the MLP computes (``act_fn_name``),
# the first the one an export writes unless the config kept another from an import. ``gelu_new`` and
# ``gelu_fast`` are GeLU's tanh approximation written out by hand (equal to ``gelu_pytorch_tanh`` up to
# rounding).
HF_ACTIVATION_NAMES = {
    "gelu": ("gelu",),
    "gelu_tanh": ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"),
    "silu": ("silu", "swish"),
    "relu": ("relu",),
}
POS_EMBS = ("rotary",)
ATTENTION_HEAD_TYPES = ("multihead", "groupedquery", "multiquery")
MLP_TYPES = ("regular", "gated", "llama")
GATED_MLP_TYPES = ("gated", "llama")
INIT_METHODS = (
    "normal",
    "scaled_normal",
    "small_init",
    "wang_init",
    "xavier_uniform",
    "xavier_normal",
)
LR_DECAY_STYLES = (
    "constant",
    "linear",
    "cosine",
    "inverse_sqrt",
    "hybrid_cosine_inv_sqrt_2",
)
# ``attention_config`` entries: GPT-NeoX's names ("global", "flash") and this framework's kernels.
ATTENTION_TYPES = ("flash", "sdpa", "math", "global", "flash_attn", "flex")
# ``precision``: both spellings of each (config/precision.py owns the names and their dtypes)
PRECISIONS = tuple(SHORT_NAMES)
# ``optimizer.type`` (case-insensitive): all are Adam with decoupled weight decay, as in GPT-NeoX.
ADAM_TYPES = ("adam", "adamw", "fusedadam", "fused_adam", "apex_adam")
ADAM_IMPLS = ("auto", "torch", "torch_fused", "apex")
ZERO_STAGES = (0, 1, 2)
# The keys of the blocks handed to DeepSpeed, whose pydantic models refuse any other key only when the
# engine starts, a minute into a run: the fields and aliases of DeepSpeed's DeepSpeedZeroConfig and
# DeepSpeedFP16Config (kept here because importing DeepSpeed imports torch; tests/test_bad_input_config.py
# compares them with the installed DeepSpeed's models, so they cannot drift).
DEEPSPEED_ZERO_KEYS = frozenset(
    """allgather_bucket_size allgather_partitions allgather_sequential compute_grad_norm contiguous_gradients
    cpu_offload cpu_offload_param cpu_offload_use_pin_memory elastic_checkpoint enable_sanity_checks
    gather_16bit_weights_on_model_save ignore_unused_parameters leaf_module legacy_stage1
    load_from_fp32_weights log_trace_cache_warnings max_live_parameters max_reuse_distance
    memory_efficient_linear model_persistence_threshold module_granularity_threshold offload_optimizer
    offload_param overlap_comm override_module_apply param_persistence_threshold parameter_alignment
    pipeline_loading_checkpoint prefetch_bucket_size reduce_bucket_size reduce_scatter round_robin_gradients
    save_muon_momentum_buffer_in_memory stage stage3_allgather_sequential
    stage3_gather_16bit_weights_on_model_save stage3_gather_fp16_weights_on_model_save
    stage3_max_live_parameters stage3_max_reuse_distance stage3_model_persistence_threshold
    stage3_module_granularity_threshold stage3_param_persistence_threshold stage3_prefetch_bucket_size
    stage3_use_all_reduce_for_fetch_params sub_group_size use_all_reduce_for_fetch_params
    use_multi_rank_bucket_allreduce zenflow zero_hpz_partition_size zero_quantized_gradients
    zero_quantized_nontrainable_weights zero_quantized_weights""".split()
)
DEEPSPEED_FP16_KEYS = frozenset(
    """auto_cast consecutive_hysteresis enabled fp16_master_weights_and_grads hysteresis initial_scale_power
    loss_scale loss_scale_window min_loss_scale""".split()
)
# GPT-NeoX's ZeRO keys that the engine drops before DeepSpeed sees them (CPU offload is not done here).
ZERO_KEYS_DROPPED = frozenset(
    {"cpu_offload", "cpu_offload_params", "cpu_offload_use_pin_memory", "load_from_fp32_weights"}
)
FP16_KEYS_DROPPED = frozenset({"type"})  # GPT-NeoX's precision name inside the block
RECOMPUTE_GRANULARITIES = ("full", "selective")
# ``fp8``: torchao's scaling recipes for FP8 GEMMs in the linear layers (megatron_stablelm/kernels/fp8.py)
FP8_RECIPES = ("tensorwise", "rowwise")
DISTRIBUTED_BACKENDS = ("nccl", "gloo")
DATA_IMPLS = ("mmap", "infer")  # GPT-NeoX's "infer" finds the mmap format, the only one written here
OUTPUT_LAYER_PARALLELISMS = ("column",)
TOKENIZER_TYPES = ("HFTokenizer", "TiktokenTokenizer", "SPMTokenizer")
# ``wandb_resume``: the modes of ``wandb.init(resume=...)``.
WANDB_RESUME_MODES = ("allow", "must", "never", "auto")
# The data splits, as spelled in the ``{split}_data_paths`` / ``{split}_data_weights`` keys.
DATA_SPLITS = ("train", "valid", "test")

# The properties of a config whose difference makes a checkpoint compute another function (or have
# other shapes). Derived values (``kv_heads``, ``rotary_dim``, ``is_gated_mlp`` ...) rather than the
# keys that spell them, so two spellings of one model compare equal.
ARCHITECTURE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "kv_heads",
    "ffn_hidden_size",
    "is_gated_mlp",
    "act_fn_name",
    "norm",
    "norm_epsilon",
    "pos_emb",
    "rotary_dim",
    "rotary_emb_base",
    "gpt_j_residual",
    "gpt_j_tied",
    "qk_norm",
    "norm_bias",
    "qk_norm_bias",
    "qkv_bias",
    "dense_bias",
    "mlp_bias",
    "tied_embeddings",
)
