"""Every list of allowed values a config key can take, defined once.

The validator checks keys against these tuples and the code that acts on a value imports the same
tuple (kernels, tokenizers, the optimizer), so a value the config accepts is always one the code can
run, and the error message lists exactly what is allowed.
"""

from __future__ import annotations

NORMS = ("layernorm",)
# GPT-NeoX's gated activations: the MLP is gated with this activation and sized by GPT-NeoX's rule.
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu", "reglu": "relu"}
ACTIVATIONS = ("gelu", "silu", "swish", "relu", *GATED_ACTIVATIONS)
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
BF16_NAMES = ("bf16", "bfloat16")
FP16_NAMES = ("fp16", "float16")
PRECISIONS = ("fp32", "float32", *FP16_NAMES, *BF16_NAMES)
# ``optimizer.type`` (case-insensitive): all are Adam with decoupled weight decay, as in GPT-NeoX.
ADAM_TYPES = ("adam", "adamw", "fusedadam", "fused_adam", "apex_adam")
ADAM_IMPLS = ("auto", "torch", "torch_fused", "apex")
ZERO_STAGES = (0, 1, 2)
RECOMPUTE_GRANULARITIES = ("full", "selective")
DISTRIBUTED_BACKENDS = ("nccl", "gloo")
DATA_IMPLS = ("mmap", "infer")  # GPT-NeoX's "infer" finds the mmap format, the only one written here
OUTPUT_LAYER_PARALLELISMS = ("column",)
TOKENIZER_TYPES = ("HFTokenizer", "TiktokenTokenizer")
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
    "layernorm_epsilon",
    "pos_emb",
    "rotary_dim",
    "rotary_emb_base",
    "gpt_j_residual",
    "gpt_j_tied",
    "qk_norm",
    "use_bias_in_norms",
    "use_bias_in_qk_norm",
    "qkv_bias",
    "dense_bias",
    "use_bias_in_mlp",
    "tied_embeddings",
)
