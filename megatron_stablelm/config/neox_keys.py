"""What this framework does with each GPT-NeoX key it does not read as a :class:`Config` field.

A NeoX user must be able to bring a config as it is. GPT-NeoX's argument dataclasses (and Stability
AI's fork) define many keys that only steer logging, profiling, launching or text generation; those
are accepted and reported once with the reason (``IGNORED_KEYS``, ``IGNORED_PREFIXES``). Keys that ask
for a model or a computation this framework cannot reproduce (mixture of experts, sparse or windowed
attention, Transformer Engine layers, preference training ...) are refused with the feature that is
missing (``REFUSED_KEYS``, ``REFUSED_PREFIXES``) — but only when their value turns the feature on: a
key left at GPT-NeoX's "off" value changes nothing and is reported as ignored. ``ALIASES`` are NeoX's
second spellings of keys read here, and ``UNSUPPORTED_VALUES`` names the feature behind a NeoX value of
a choice key this framework does not build.
"""

from __future__ import annotations

from typing import Any

_LAUNCH = "set by GPT-NeoX's launcher at run time; the launcher here derives it"
_DERIVED_ZERO = "GPT-NeoX copies it from zero_optimization, which is what is read here"
_MUP = "only used with use_mup, which is refused"
_TEXTGEN = "a text-generation option of GPT-NeoX; pass it to tools/generate.py"
_PROFILE = "profiling is done with tools/benchmark.py (PyTorch profiler)"
_COMET = "Comet logging is not supported; use W&B or TensorBoard"
_DEBUG_LOG = "this debugging metric is not logged"
_S3 = "S3 checkpoint sync is not implemented"
_FUSION = "element-wise fusions are chosen automatically"
_RUNNER = "an option of DeepSpeed's runner; the launcher here does not use it"
_DS_BLOCK = "a DeepSpeed block this framework does not pass on (the DeepSpeed config is built from the keys read here)"
_LOSS_SCALE = "fp16 loss scaling is set in the fp16 block"
_MOE_ONLY = "only used with mixture of experts (moe_num_experts > 1), which is refused"

IGNORED_KEYS: dict[str, str] = {
    # ---- features this framework does not have, whose keys change nothing when absent
    "s3_path": _S3,
    "s3_sync_interval": _S3,
    "s3_region": _S3,
    "s3_chunk_size": _S3,
    "coord_check": _MUP,
    "save_base_shapes": _MUP,
    "base_shapes_file": _MUP,
    "mup_init_scale": _MUP,
    "mup_attn_temp": _MUP,
    "mup_output_temp": _MUP,
    "mup_embedding_mult": _MUP,
    "mup_rp_embedding_mult": _MUP,
    "mup_width_scale": _MUP,
    # partition_activations and sequence_parallel are fields (megatron-core sequence parallelism)
    "synchronize_each_layer": "DeepSpeed's per-layer synchronisation for its activation partitioning; "
    "sequence parallelism (what partition_activations turns on here) needs none",
    "pipe_partition_method": "pipeline parallelism is not implemented",
    # ---- kernels and numerics chosen automatically (the function computed is the same)
    "scaled_upper_triang_masked_softmax_fusion": "attention kernels are chosen by attention_config",
    "scaled_masked_softmax_fusion": "attention kernels are chosen by attention_config",
    "bias_dropout_fusion": _FUSION,
    "rope_fusion": _FUSION,
    "layernorm_fusion": "LayerNorm kernels are chosen automatically",
    "use_flashattn_swiglu": "the SwiGLU kernel is chosen automatically",
    "attention_softmax_in_fp32": "attention softmax is always computed in fp32",
    "apply_query_key_layer_scaling": "it rescales and unscales the same scores; softmax is computed in fp32",
    "fp16_lm_cross_entropy": "the loss is always computed in fp32",
    "use_cpu_initialization": "weights are initialised per canonical tensor, the same on every device",
    "rotary_save_freqs_buffer": "rotary frequencies are recomputed, never stored in checkpoints",
    "use_bnb_optimizer": "bitsandbytes optimizers are not supported",
    "checkpoint_in_cpu": "activation checkpoints stay on the device",
    "contiguous_checkpointing": "activation checkpoints stay on the device",
    "deepspeed_activation_checkpointing": "checkpoint_activations selects recomputation",
    "prescale_gradients": "gradients are reduced by TrainingEngine (token-weighted mean)",
    "gradient_predivide_factor": "gradients are reduced by TrainingEngine (token-weighted mean)",
    "sparse_gradients": "embedding gradients are dense",
    # ---- keys GPT-NeoX derives or that only matter with a refused feature
    "scalenorm_epsilon": "only used with norm: scalenorm, which is refused",
    "rmsnorm_fusion": "the RMSNorm kernel is chosen automatically; it computes x * rsqrt(mean(x^2) + eps), the "
    "formula of GPT-NeoX's fused RMSNorm (rmsnorm_fusion: true), Llama's and transformers' (GPT-NeoX's unfused "
    "module divides by rms + eps instead: a relative difference of order eps / mean(x^2))",
    "rpe_num_buckets": "only used with pos_emb: rpe, which is refused",
    "rpe_max_distance": "only used with pos_emb: rpe, which is refused",
    "gmlp_attn_dim": "only used by gMLP layers (attention_config 'gmlp'/'amlp'), which are refused",
    "param_sharing_style": "only used with num_unique_layers, which is refused",
    "dim_att": "only used by RWKV layers (attention_config 'rwkv'), which are refused",
    "head_size": "only used by RWKV layers (attention_config 'rwkv'), which are refused",
    "ffn_dim": "only used by RWKV layers (attention_config 'rwkv'), which are refused",
    "expert_interval": _MOE_ONLY,
    "use_tutel": _MOE_ONLY,
    "create_moe_param_group": _MOE_ONLY,
    "enable_expert_tensor_parallelism": _MOE_ONLY,
    "weighted_sampler_alpha": "only used with weight_by_num_documents, which is refused",
    "allow_chopped": "only used with pack_impl other than 'packed', which is refused",
    "z_loss": "GPT-NeoX applies it to reward-model training only, which is refused",
    "curriculum_seqlen": "GPT-NeoX's internal curriculum state",
    "zero_stage": _DERIVED_ZERO,
    "zero_reduce_scatter": _DERIVED_ZERO,
    "zero_contiguous_gradients": _DERIVED_ZERO,
    "zero_reduce_bucket_size": _DERIVED_ZERO,
    "zero_allgather_bucket_size": _DERIVED_ZERO,
    "optimizer_type": "GPT-NeoX copies it from optimizer.type, which is what is read here",
    "lr": "GPT-NeoX copies it from optimizer.params.lr, which is what is read here",
    "clip_grad": "gradient_clipping (DeepSpeed's key) is what clips gradients",
    "hysteresis": _LOSS_SCALE,
    "dynamic_loss_scale": _LOSS_SCALE,
    "loss_scale": _LOSS_SCALE,
    "loss_scale_window": _LOSS_SCALE,
    "min_scale": _LOSS_SCALE,
    # ---- launching and run-time bookkeeping
    "world_size": _LAUNCH,
    "is_pipe_parallel": _LAUNCH,
    "local_rank": _LAUNCH,
    "rank": _LAUNCH,
    "global_num_gpus": _LAUNCH,
    "do_train": _LAUNCH,
    "do_valid": _LAUNCH,
    "do_test": _LAUNCH,
    "save_iters": "GPT-NeoX derives it from checkpoint_factor and extra_save_iters, as done here",
    "config_files": "GPT-NeoX's record of the merged files; the files given are recorded here",
    "git_hash": "informational only",
    "slurm_job_id": "informational only",
    "user_script": "train.py is the entry point",
    "deepspeed": "DeepSpeed is always used",
    "deepspeed_mpi": "the MPI launcher is not supported; use launcher: slurm or pdsh",
    "deepscale": "deprecated in GPT-NeoX",
    "deepscale_config": "deprecated in GPT-NeoX",
    "lazy_mpu_init": "process groups are built by the trainer",
    "onnx_safe": "ONNX export is not supported",
    "adlr_autoresume": "NVIDIA ADLR auto-resume is not supported; runs resume from 'latest'",
    "adlr_autoresume_interval": "NVIDIA ADLR auto-resume is not supported; runs resume from 'latest'",
    "short_seq_prob": "a BERT data option; GPT datasets do not use it",
    "use_shared_fs": "rank 0 builds the index caches under data_cache_dir and the others wait",
    "mmap_warmup": "indexed data is memory-mapped on demand",
    "char_level_ppl": "evaluation reports token-level perplexity",
    "checkpoint_validation_with_forward_pass": "checkpoints are validated by their recorded shapes",
    "checkpoint_scale": "checkpoint_factor is a linear interval ('log' spacing is not implemented)",
    "no_save_optim": "checkpoints always hold the optimizer state",
    "no_save_rng": "checkpoints always hold the RNG state",
    "no_load_optim": "finetune: true starts without the saved optimizer state",
    "no_load_rng": "finetune: true starts without the saved RNG state",
    "use_checkpoint_lr_scheduler": "the schedule is recomputed from the config at every step",
    "train_epochs": "give train_iters",
    "exit_interval": "stop a run with a signal; it saves and exits cleanly",
    "load_universal": "checkpoints load at any parallel layout without conversion",
    "eval_results_prefix": "tools/evaluate.py --output names the results file",
    # ---- logging, profiling and monitoring
    "wandb_init_all_ranks": "W&B runs on rank 0 only",
    "wandb_dir": "set the WANDB_DIR environment variable",
    "log_grad_pct_zeros": _DEBUG_LOG,
    "log_param_norm": _DEBUG_LOG,
    "log_optimizer_states": _DEBUG_LOG,
    "log_gradient_noise_scale": _DEBUG_LOG,
    "gradient_noise_scale_n_batches": _DEBUG_LOG,
    "gradient_noise_scale_cpu_offload": _DEBUG_LOG,
    "profile": _PROFILE,
    "profile_step_start": _PROFILE,
    "profile_step_stop": _PROFILE,
    "profile_backward": _PROFILE,
    "memory_profiling": _PROFILE,
    "memory_profiling_path": _PROFILE,
    "use_comet": _COMET,
    "dump_state": _DS_BLOCK,
    "flops_profiler": _DS_BLOCK,
    "communication_data_type": _DS_BLOCK,
    "autotuning": _DS_BLOCK,
    "activation_checkpointing": _DS_BLOCK,
    "data_efficiency": _DS_BLOCK,
    "tensorboard": _DS_BLOCK,
    "wandb": _DS_BLOCK,
    "csv_monitor": _DS_BLOCK,
    "elasticity": _DS_BLOCK,
    "comms_logger": _DS_BLOCK,
    "checkpoint": _DS_BLOCK,
    "data_types": _DS_BLOCK,
    "scheduler": "the learning-rate schedule comes from lr_decay_style, as in GPT-NeoX",
    "deepspeed_extra_args": _DS_BLOCK,
    # ---- text generation (GPT-NeoX's generate.py reads them from the training config)
    "text_gen_type": _TEXTGEN,
    "precompute_model_name": _TEXTGEN,
    "temperature": _TEXTGEN,
    "top_p": _TEXTGEN,
    "top_k": _TEXTGEN,
    "return_logits": _TEXTGEN,
    "maximum_tokens": _TEXTGEN,
    "prompt_end": _TEXTGEN,
    "sample_input_file": _TEXTGEN,
    "sample_output_file": _TEXTGEN,
    "num_samples": _TEXTGEN,
    "recompute": _TEXTGEN,
    # ---- DeepSpeed runner
    "force_multi": _RUNNER,
    "detect_nvlink_pairs": _RUNNER,
    "autotuning_run": _RUNNER,
    "no_ssh_check": _RUNNER,
    "comment": _RUNNER,
    "account": _RUNNER,
}

# Whole families of keys, by prefix: (reason, refused feature when the value is true/non-empty).
IGNORED_PREFIXES: dict[str, str] = {
    "comet_": _COMET,
    "mamba_": "only used by Mamba layers (attention_config 'mamba'), which are refused",
    "dpo_": "only used with train_impl: dpo, which is refused",
    "kto_": "only used with train_impl: kto, which is refused",
    "moe_": _MOE_ONLY,
}

# key -> (the missing feature, GPT-NeoX's values that leave it off).
REFUSED_KEYS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "use_mup": ("muP (maximal update parametrisation)", (False, None)),
    "moe_num_experts": ("mixture of experts (MoE)", (1, None)),
    "sparsity_config": ("DeepSpeed sparse attention", (None, {})),
    "sparse_attention": ("DeepSpeed sparse attention", (None, {})),
    "sliding_window_width": ("sliding-window attention", (None,)),
    "num_unique_layers": ("parameter sharing across layers", (None,)),
    "rotary_scale_base": ("xPos rotary scaling", (None,)),
    "opt_pos_emb_offset": ("learned position embeddings (OPT)", (0, None)),
    "soft_prompt_tuning": ("soft prompt tuning", (None, {}, {"enabled": False})),
    "model_arch": ("encoder-decoder (T5) models", ("gpt2", None)),
    "num_encoder_layers": ("encoder-decoder (T5) models", (None,)),
    "weight_by_num_documents": ("data weights from document counts", (False, None)),
    "train_impl": ("DPO / KTO / reward-model training", ("normal", None)),
    "dataset_impl": ("pairwise (preference) datasets", ("gpt2", None)),
    "pack_impl": ("unpacked data ('packed' is what the data pipeline does)", ("packed", None)),
    "lr_decay_fraction": ("lr_decay_fraction (give lr_decay_iters instead)", (None,)),
    "curriculum_learning": ("curriculum learning (sequence-length warm-up)", (None, {}, {"enabled": False})),
    "compression_training": ("DeepSpeed compression training", (None, {})),
    "amp": ("Apex AMP (use the bf16 or fp16 block)", (None, {}, {"enabled": False})),
    "use_qk_layernorm": (
        "GPT-NeoX's QK LayerNorm (one norm over all heads of a token, shared by queries and keys); "
        "qk_norm: true is StableLM 2's per-head norm, a different model",
        (False, None),
    ),
}
for _split in ("train", "valid", "test"):
    for _kind in ("label", "reward"):
        REFUSED_KEYS[f"{_split}_{_kind}_data_paths"] = ("label / reward datasets", (None, []))
    for _sign in ("pos", "neg"):
        REFUSED_KEYS[f"{_sign}_{_split}_data_paths"] = ("preference (DPO/KTO) datasets", (None, []))
        REFUSED_KEYS[f"{_sign}_{_split}_label_data_paths"] = ("preference (DPO/KTO) datasets", (None, []))

# Prefixes of switches refused when on: prefix -> (feature, whether a non-zero number also turns it on).
REFUSED_PREFIXES: dict[str, tuple[str, bool]] = {
    "te_": ("Transformer Engine layers", False),  # te_ numbers (amax history, margin) are settings
    # fim_rate, fim_spm_rate and the sentinel names are fields; the other FIM switches are not built
    "fim_": ("fill-in-the-middle options beyond fim_rate and fim_spm_rate (e.g. fragment-level FIM)", True),
}

# GPT-NeoX's second spellings of keys read here.
ALIASES: dict[str, str] = {
    "gas": "gradient_accumulation_steps",
    "batch_size": "train_micro_batch_size_per_gpu",
}

# (key, GPT-NeoX value) -> the feature it needs, for choice keys whose value this framework lacks.
UNSUPPORTED_VALUES: dict[tuple[str, str], str] = {
    ("norm", "scalenorm"): "ScaleNorm",
    ("norm", "te_rmsnorm"): "Transformer Engine norms",
    ("norm", "te_layernorm"): "Transformer Engine norms",
    ("pos_emb", "learned"): "learned absolute position embeddings",
    ("pos_emb", "sinusoidal"): "sinusoidal position embeddings",
    ("pos_emb", "rpe"): "T5 relative position buckets",
    ("pos_emb", "alibi"): "ALiBi",
    ("pos_emb", "none"): "models without position information",
    ("activation", "softsign"): "the softsign activation",
    ("activation", "mish"): "the mish activation",
    ("activation", "bilinear"): "the bilinear (ungated-identity) GLU",
    ("activation", "glu"): "the sigmoid GLU",
    ("lr_decay_style", "exponential"): "exponential learning-rate decay",
    ("output_layer_parallelism", "row"): "a row-parallel output layer (GPT-NeoX refuses it too)",
    ("data_impl", "cached"): "cached indexed datasets (use mmap)",
    ("tokenizer_type", "GPT2BPETokenizer"): "GPT-2 BPE files (vocab.json + merges.txt); save them as one "
    "tokenizer.json with the `tokenizers` library and use HFTokenizer",
    (
        "tokenizer_type",
        "HFGPT2Tokenizer",
    ): "transformers' GPT-2 tokenizer; use HFTokenizer with a tokenizer.json",
    ("tokenizer_type", "CharLevelTokenizer"): "a character-level tokenizer",
}

# ``attention_config`` types of GPT-NeoX this framework does not build.
UNSUPPORTED_ATTENTION: dict[str, str] = {
    "local": "local (windowed) attention",
    "sparse_fixed": "DeepSpeed sparse attention",
    "sparse_variable": "DeepSpeed sparse attention",
    "bigbird": "DeepSpeed sparse attention",
    "bslongformer": "DeepSpeed sparse attention",
    "gmlp": "gMLP layers",
    "amlp": "gMLP layers",
    "mamba": "Mamba layers",
    "rwkv": "RWKV layers",
}


def _is_off(value: Any, off: tuple[Any, ...]) -> bool:
    if value is None or (isinstance(value, dict) and value.get("enabled") is False):
        return True
    return any(value == v and type(value) is type(v) for v in off)


def refused_feature(key: str, value: Any) -> str | None:
    """The feature ``key: value`` asks for that this framework lacks; None when it asks for nothing."""
    if key in REFUSED_KEYS:
        feature, off = REFUSED_KEYS[key]
        return None if _is_off(value, off) else feature
    for prefix, (feature, numbers_count) in REFUSED_PREFIXES.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0
        if key.startswith(prefix) and (value is True or (numbers_count and number)):
            return feature
    return None


def ignored_reason(key: str) -> str | None:
    """Why an accepted NeoX key is not read, or None when the key is not one of GPT-NeoX's."""
    if key in IGNORED_KEYS:
        return IGNORED_KEYS[key]
    if key in REFUSED_KEYS:
        return f"left at GPT-NeoX's default, which keeps {REFUSED_KEYS[key][0]} off"
    for prefix, reason in IGNORED_PREFIXES.items():
        if key.startswith(prefix):
            return reason
    for prefix, (feature, _) in REFUSED_PREFIXES.items():
        if key.startswith(prefix):
            return f"left off: {feature} are not implemented"
    return None
