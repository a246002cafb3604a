"""GPT-NeoX configs load as NeoX users write them: bookkeeping keys, newer spellings, refusals that
name the missing feature, and the ``model.yml`` + ``local_setup.yml`` pair."""

from __future__ import annotations

import inspect as pyinspect
import sys
import textwrap

import pytest
import torch

from megatron_stablelm import parallel
from megatron_stablelm.config import FIELDS, ConfigError, load_config
from megatron_stablelm.config.neox_keys import ALIASES, ignored_reason, refused_feature
from megatron_stablelm.inspect import main as inspect_main
from megatron_stablelm.model import build_model, canonical_shapes

# A small model in GPT-NeoX's own style: JSON-like YAML, dashed keys, NeoX's newer spellings.
NEOX_MODEL = textwrap.dedent(
    """\
    {
      "pipe_parallel_size": 1, "model_parallel_size": 1,
      "num_layers": 2, "hidden_size": 48, "num_attention_heads": 4, "num_kv_heads": 2,
      "seq_length": 64, "max_position_embeddings": 64, "pos_emb": "rotary", "rotary_pct": 0.5,
      "norm": "layernorm", "layernorm_fusion": false, "activation": "swiglu",
      "attention_config": [[["flash"], "all"]], "no_weight_tying": true, "gpt_j_residual": false,
      "output_layer_parallelism": "column", "use_bias_in_attn_linear": false, "use_bias_in_mlp": false,
      "rms_norm_epsilon": 1.0e-6, "gmlp_attn_dim": 64, "moe_num_experts": 1, "te_fp8_format": "hybrid",
      "sliding_window_width": null, "use_qk_layernorm": false, "rope_fusion": false,
      "scaled-upper-triang-masked-softmax-fusion": true, "bias-dropout-fusion": true,
      "optimizer": {"type": "Adam", "params": {"lr": 0.0006, "betas": [0.9, 0.95], "eps": 1.0e-8}},
      "min_lr": 0.00006, "zero_optimization": {"stage": 1, "overlap_comm": true},
      "train_micro_batch_size_per_gpu": 2, "gas": 4, "gradient_clipping": 1.0,
      "hidden_dropout": 0.0, "attention_dropout": 0.0, "precision": "bfloat16", "bf16": {"enabled": true},
      "train_iters": 320000, "lr_decay_iters": 320000, "lr_decay_style": "cosine", "warmup": 0.01,
      "distributed_backend": "nccl", "checkpoint_factor": 10000, "eval_interval": 1000, "eval_iters": 10,
      "keep_last_n_checkpoints": 3, "eval_limit": 0.25, "eval_num_fewshot": 5,
      "wandb_id": "3f87uku2", "wandb_resume": "allow", "s3_region": "us-east-1", "global_num_gpus": 8,
      "comment": "cluster-rules", "deepspeed_extra_args": {"comms_logger": {"enabled": false}},
      "text_gen_type": "unconditional", "sample_input_file": "in.txt", "sample_output_file": "out.txt",
      "maximum_tokens": 102, "prompt_end": "\\n", "temperature": 1.0, "top_p": 0.0, "top_k": 0,
      "recompute": false, "num_samples": 10,
      "profile": false, "profile_step_start": 10, "profile_step_stop": 12, "memory_profiling_path": "mem",
      "use_comet": false, "comet_workspace": "w", "comet_project": "p", "comet_tags": ["a"],
      "log_interval": 100, "steps_per_print": 10, "wall_clock_breakdown": true,
      "tokenizer_type": "HFTokenizer", "padded_vocab_size": 256,
    }
    """
)

# GPT-NeoX's documented local_setup.yml: paths and logging, merged after the model file.
LOCAL_SETUP = textwrap.dedent(
    """\
    {
      "data_path": "data/enwik8/enwik8_text_document",
      "vocab_file": "data/tokenizer.json",
      "merge_file": "data/gpt2-merges.txt",
      "save": "checkpoints",
      "load": "checkpoints",
      "checkpoint_validation_with_forward_pass": False,
      "tensorboard_dir": "tensorboard",
      "log_dir": "logs",
      "use_wandb": True,
      "wandb_host": "https://api.wandb.ai",
      "wandb_project": "neox"
    }
    """
)

# Keys of GPT-NeoX's and Stability AI's argument dataclasses (names only), each of which must be known.
NEOX_KEY_NAMES = """
pipe_parallel_size model_parallel_size pipe_partition_method world_size is_pipe_parallel sequence_parallel
expert_interval precision num_layers hidden_size intermediate_size mlp_multiple_of expansion_factor
num_attention_heads num_kv_heads seq_length sliding_window_width max_position_embeddings norm
layernorm_fusion rmsnorm_fusion use_qk_layernorm layernorm_epsilon rms_norm_epsilon scalenorm_epsilon
pos_emb rpe_num_buckets rpe_max_distance opt_pos_emb_offset no_weight_tying attention_config
attention_head_type sparsity_config num_unique_layers param_sharing_style make_vocab_size_divisible_by
activation use_flashattn_swiglu scaled_upper_triang_masked_softmax_fusion scaled_masked_softmax_fusion
bias_gelu_fusion bias_dropout_fusion rope_fusion fp16_lm_cross_entropy init_method_std
apply_query_key_layer_scaling use_cpu_initialization attention_softmax_in_fp32 rotary_pct rotary_emb_base
rotary_interleaved rotary_scale_base rotary_save_freqs_buffer init_method output_layer_init_method
gmlp_attn_dim gpt_j_residual gpt_j_tied use_bias_in_norms use_bias_in_attn_linear use_bias_in_mlp
soft_prompt_tuning mamba_selective_scan_fusion mamba_causal_conv_fusion mamba_inner_func_fusion
mamba_selective_fp32_params mamba_use_bias_in_conv mamba_use_bias_in_linears output_layer_parallelism
dim_att head_size ffn_dim optimizer_type use_bnb_optimizer zero_stage zero_reduce_scatter
zero_contiguous_gradients zero_reduce_bucket_size zero_allgather_bucket_size lr lr_decay_style
lr_decay_iters lr_decay_fraction min_lr warmup override_lr_scheduler use_checkpoint_lr_scheduler
use_wandb wandb_group wandb_team wandb_project wandb_host wandb_init_all_ranks wandb_id wandb_resume
wandb_dir wandb_name slurm_job_id git_hash log_dir tensorboard_dir use_comet comet_workspace
comet_project comet_experiment_name comet_tags comet_others log_interval log_grad_pct_zeros
log_param_norm log_grad_norm log_optimizer_states log_gradient_noise_scale gradient_noise_scale_n_batches
gradient_noise_scale_cpu_offload memory_profiling memory_profiling_path profile profile_step_start
profile_step_stop distributed_backend local_rank rank lazy_mpu_init short_seq_prob eod_mask_loss
adlr_autoresume adlr_autoresume_interval seed onnx_safe deepscale deepscale_config deepspeed_mpi
deepspeed_slurm user_script iteration do_train do_valid do_test save_iters global_num_gpus
tokenizer_type padded_vocab_size data_path use_shared_fs train_data_paths train_label_data_paths
train_reward_data_paths test_data_paths test_label_data_paths valid_data_paths pos_train_data_paths
neg_valid_label_data_paths train_data_weights valid_data_weights test_data_weights
weight_by_num_documents weighted_sampler_alpha data_impl pack_impl dataset_impl train_impl dpo_fp32
dpo_beta kto_beta z_loss allow_chopped mmap_warmup save s3_path s3_region s3_chunk_size s3_sync_interval
config_files load checkpoint_validation_with_forward_pass checkpoint_scale checkpoint_factor
extra_save_iters no_save_optim no_save_rng no_load_optim no_load_rng finetune batch_size train_iters
train_epochs eval_iters eval_batch_size keep_last_n_checkpoints eval_interval split vocab_file merge_file
num_workers exit_interval attention_dropout hidden_dropout weight_decay checkpoint_activations
checkpoint_num_layers deepspeed_activation_checkpointing contiguous_checkpointing checkpoint_in_cpu
synchronize_each_layer profile_backward partition_activations gas clip_grad hysteresis dynamic_loss_scale
loss_scale loss_scale_window min_scale char_level_ppl use_mup coord_check save_base_shapes
base_shapes_file mup_init_scale mup_attn_temp mup_output_temp mup_embedding_mult mup_rp_embedding_mult
mup_width_scale text_gen_type precompute_model_name temperature top_p top_k return_logits maximum_tokens
prompt_end sample_input_file sample_output_file num_samples recompute eval_results_prefix eval_tasks
eval_limit eval_num_fewshot moe_top_k use_tutel moe_num_experts moe_loss_coeff moe_type moe_glu
enable_expert_tensor_parallelism create_moe_param_group deepspeed train_batch_size
train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp32_allreduce
prescale_gradients gradient_predivide_factor sparse_gradients fp16 bf16 amp gradient_clipping
zero_optimization curriculum_learning curriculum_seqlen steps_per_print wall_clock_breakdown dump_state
flops_profiler communication_data_type autotuning activation_checkpointing sparse_attention
data_efficiency tensorboard wandb csv_monitor elasticity comms_logger compression_training checkpoint
data_types deepspeed_extra_args load_universal hostfile include exclude num_nodes num_gpus master_port
master_addr launcher force_multi detect_nvlink_pairs autotuning_run no_ssh_check comment
te_columnparallel te_rowparallel te_layernorm_mlp te_mha te_fp8_format te_fp8_amax_history_len
""".split()


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("key", NEOX_KEY_NAMES)
def test_every_neox_key_is_known(key):
    """Each key is read, an alias, ignored with a reason, or refused when it turns a feature on."""
    assert key in FIELDS or key in ALIASES or ignored_reason(key) is not None, key


def test_neox_model_with_bookkeeping_keys_loads(tmp_path, capsys):
    cfg = load_config([write(tmp_path, "model.yml", NEOX_MODEL)])
    # implemented with GPT-NeoX's meaning
    assert cfg.gradient_accumulation_steps == 4  # gas
    assert (cfg.keep_last_n_checkpoints, cfg.eval_limit, cfg.eval_num_fewshot) == (3, 0.25, 5)
    assert (cfg.wandb_id, cfg.wandb_resume) == ("3f87uku2", "allow")
    assert cfg.kv_heads == 2 and cfg.attention_head_type is None  # GQA from num_kv_heads alone
    assert cfg.is_gated_mlp and cfg.act_fn_name == "silu"
    from megatron_stablelm.config import expand_attention_config

    assert expand_attention_config(cfg.attention_config, cfg.num_layers) == ["flash", "flash"]
    # accepted, reported once each with the reason
    out = capsys.readouterr().out
    for key in ("layernorm_fusion", "s3_region", "global_num_gpus", "comment", "deepspeed_extra_args",
                "text_gen_type", "maximum_tokens", "profile_step_start", "memory_profiling_path",
                "comet_workspace", "gmlp_attn_dim", "moe_num_experts", "te_fp8_format"):  # fmt: skip
        assert out.count(f"ignoring '{key}'") == 1, key
    assert "did you mean" not in out


def test_model_file_plus_local_setup(tmp_path):
    cfg = load_config(
        [write(tmp_path, "model.yml", NEOX_MODEL), write(tmp_path, "local_setup.yml", LOCAL_SETUP)]
    )
    assert (cfg.save, cfg.load, cfg.log_dir, cfg.tensorboard_dir) == (
        "checkpoints",
        "checkpoints",
        "logs",
        "tensorboard",
    )
    assert cfg.use_wandb and cfg.wandb_project == "neox" and cfg.num_layers == 2
    assert "checkpoint_validation_with_forward_pass" in cfg.ignored_keys


@pytest.mark.parametrize(
    "extra, feature",
    [
        ("moe_num_experts: 8\n", "mixture of experts"),
        ("sliding_window_width: 512\n", "sliding-window attention"),
        ("te_columnparallel: true\n", "Transformer Engine"),
        ("use_mup: true\n", "muP"),
        ("sparsity_config: {block: 16}\n", "sparse attention"),
        ("use_qk_layernorm: true\n", "one norm over all heads"),
        ("train_impl: dpo\n", "DPO"),
        ("norm: scalenorm\n", "ScaleNorm"),
        ("norm: te_rmsnorm\n", "Transformer Engine norms"),
        ("pos_emb: learned\n", "learned absolute position embeddings"),
        ("attention_config: [[[mamba], all]]\n", "Mamba layers"),
        ("attention_config: [[[local], 2]]\n", "local (windowed) attention"),
        ("tokenizer_type: GPT2BPETokenizer\n", "GPT-2 BPE"),
        ("activation: bilinear\n", "bilinear"),
    ],
)
def test_refusals_name_the_missing_feature(tmp_path, extra, feature):
    base = "num_layers: 2\nhidden_size: 48\nnum_attention_heads: 4\nseq_length: 32\n"
    with pytest.raises(ConfigError, match="bad.yml: key") as err:
        load_config([write(tmp_path, "bad.yml", base + extra)], report_ignored=False)
    assert feature in str(err.value) and "did you mean" not in str(err.value)


def test_refused_keys_at_neox_defaults_change_nothing():
    for key, off in [("moe_num_experts", 1), ("sparsity_config", {}), ("use_mup", False),
                     ("soft_prompt_tuning", {"enabled": False, "num_tokens": 10}), ("te_mha", False),
                     ("te_fp8_amax_history_len", 1024), ("train_impl", "normal")]:  # fmt: skip
        assert refused_feature(key, off) is None, key
        assert ignored_reason(key) is not None, key


def test_alias_and_its_key_must_agree(tmp_path):
    base = "num_layers: 2\nhidden_size: 48\nnum_attention_heads: 4\nseq_length: 32\n"
    with pytest.raises(ConfigError, match="'gas' \\(2\\) contradicts 'gradient_accumulation_steps' \\(4\\)"):
        load_config([write(tmp_path, "a.yml", base + "gradient_accumulation_steps: 4\ngas: 2\n")])
    cfg = load_config([write(tmp_path, "b.yml", base + "gas: 2\nbatch_size: 3\n")], report_ignored=False)
    assert (cfg.gradient_accumulation_steps, cfg.train_micro_batch_size_per_gpu) == (2, 3)


def test_multiquery_without_num_kv_heads_means_one_kv_head(tmp_path):
    path = write(tmp_path, "mq.yml", "num_layers: 2\nhidden_size: 48\nnum_attention_heads: 4\nseq_length: 32\n"
                 "attention_head_type: multiquery\n")  # fmt: skip
    cfg = load_config([path], report_ignored=False)
    shapes = canonical_shapes(cfg, 128)
    assert cfg.kv_heads == 1
    assert shapes["layers.0.attention.qkv.weight"][0] == (4 + 2 * 1) * 12  # Q heads + one K + one V


def _mlp_width(tmp_path, text):
    base = "num_layers: 1\nnum_attention_heads: 4\nseq_length: 32\npadded_vocab_size: 128\n"
    return load_config([write(tmp_path, "m.yml", base + text)], report_ignored=False).ffn_hidden_size


def test_swiglu_widths_match_llama(tmp_path):
    """GPT-NeoX's Llama configs (intermediate_size 8h, mlp_multiple_of 256, swiglu) give Llama's widths."""
    from transformers import LlamaConfig

    llama = LlamaConfig()  # Llama-2-7B shape
    width = _mlp_width(tmp_path, f"hidden_size: {llama.hidden_size}\nactivation: swiglu\n"
                       f"intermediate_size: {8 * llama.hidden_size}\nmlp_multiple_of: 256\n")  # fmt: skip
    assert width == llama.intermediate_size == 11008
    width_13b = _mlp_width(
        tmp_path, "hidden_size: 5120\nactivation: swiglu\nintermediate_size: 40960\nmlp_multiple_of: 256\n"
    )
    assert width_13b == 13824  # Llama-2-13B


def test_plain_mlp_is_rounded_as_neox_rounds_it(tmp_path):
    assert _mlp_width(tmp_path, "hidden_size: 64\nintermediate_size: 200\nmlp_multiple_of: 64\n") == 256
    assert _mlp_width(tmp_path, "hidden_size: 64\nintermediate_size: 200\n") == 200  # no multiple: as given
    assert _mlp_width(tmp_path, "hidden_size: 64\nexpansion_factor: 3\n") == 192
    with pytest.raises(ConfigError, match="m.yml: key .mlp_multiple_of.*GPT-NeoX cannot build it"):
        _mlp_width(tmp_path, "hidden_size: 64\nintermediate_size: 120\nmlp_multiple_of: 50\n")
    with pytest.raises(ConfigError, match="either intermediate_size or expansion_factor"):
        _mlp_width(tmp_path, "hidden_size: 64\nintermediate_size: 120\nexpansion_factor: 2\n")


@pytest.fixture
def single_rank():
    parallel.initialize(1)
    yield
    parallel.destroy()


def test_swiglu_is_the_gated_silu_mlp(tmp_path, single_rank):
    """NeoX's ``activation: swiglu`` builds the same model as Stability's ``mlp_type: gated`` + silu of
    the same width: same parameters, same outputs."""
    neox = load_config([write(tmp_path, "model.yml", NEOX_MODEL)], report_ignored=False)
    stability = load_config(
        [write(tmp_path, "model.yml", NEOX_MODEL)],
        overrides=["activation=silu", "mlp_type=gated", f"intermediate_size={neox.ffn_hidden_size}"],
        report_ignored=False,
    )
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    a, b = build_model(neox, 256, seed=3).eval(), build_model(stability, 256, seed=3).eval()
    assert canonical_shapes(neox, 256) == canonical_shapes(stability, 256)
    with torch.no_grad():
        torch.testing.assert_close(a(tokens), b(tokens), rtol=0, atol=0)


def test_wandb_id_and_resume_reach_wandb_init(tmp_path, monkeypatch):
    import wandb as real_wandb

    from megatron_stablelm.training.logging import MetricsLogger

    calls = []

    class FakeWandb:
        def init(self, **kwargs):
            pyinspect.signature(real_wandb.init).bind(**kwargs)  # the real API accepts these arguments
            calls.append(kwargs)
            return type("Run", (), {"dir": "offline"})()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb())
    cfg = load_config(
        [write(tmp_path, "model.yml", NEOX_MODEL)], overrides=["use_wandb=true"], report_ignored=False
    )
    MetricsLogger(cfg, 1.0, None, 1, 10, print_fn=lambda *_: None).open_trackers()
    assert calls[0]["id"] == "3f87uku2" and calls[0]["resume"] == "allow"
    with pytest.raises(ConfigError, match="wandb_resume.*give its wandb_id"):
        load_config(
            [write(tmp_path, "model.yml", NEOX_MODEL)], overrides=["wandb_id=null", "wandb_resume=must"]
        )


def test_inspect_reports_bad_neox_input_in_one_line(tmp_path, capsys):
    model = write(tmp_path, "model.yml", NEOX_MODEL)
    assert inspect_main([str(model)]) == 0
    assert "KV heads" in capsys.readouterr().out
    assert inspect_main([str(model), "--override", "tokenizer_type=GPT2BPETokenizer"]) == 2
    assert inspect_main([str(model), "--override", "make_vocab_size_divisible_by=0"]) == 2
    err = capsys.readouterr().err
    assert "GPT-2 BPE" in err and "make_vocab_size_divisible_by" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:
        inspect_main([str(model), "--dp", "0"])
    assert exit_.value.code == 2 and "--dp: expected a positive integer, got 0" in capsys.readouterr().err
