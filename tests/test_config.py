"""GPT-NeoX-compatible config loading: merging, key spellings, published-config syntax, validation."""

from __future__ import annotations

import textwrap

import pytest

from megatron_stablelm.config import ConfigError, load_config

# Every key Stability AI's published StableLM pretraining configs use, in their JSON-like YAML style
# (comments, trailing commas, 540_000, dashed and underscored spellings mixed).
PUBLISHED_STYLE = textwrap.dedent(
    """\
    {
      # parallelism settings
      "pipe-parallel-size": 1,
      "model-parallel-size": 2,
      "num-layers": 4, "hidden-size": 128, "num-attention-heads": 8, "num_kv_heads": 4,
      "seq-length": 256, "max-position-embeddings": 256,
      "attention_head_type": "groupedquery", "qk_norm": true, "norm": "layernorm", "pos-emb": "rotary",
      "rotary_pct": 0.25, "rotary_emb_base": 10_000, "rotary_interleaved": false,  # GPT-NeoX style
      "mlp_multiple_of": 256, "mlp_type": "gated", "activation": "silu", "no-weight-tying": true,
      "gpt_j_residual": true, "gpt_j_tied": true, "output_layer_parallelism": "column",
      "init_method": "normal", "output_layer_init_method": "scaled_normal", "init_method_std": 0.01,
      "use_bias_in_norms": false, "use_bias_in_qk_norm": false, "use_bias_in_attn_linear": false,
      "use_bias_in_mlp": false, "use_flash_cross_entropy": true, "bias-gelu-fusion": false,
      "scaled-upper-triang-masked-softmax-fusion": false, "attention-config": [[["flash"], 4]],
      "optimizer": {"type": "Adam", "params": {"lr": 3.0e-4, "betas": [0.9, 0.95], "eps": 0.00000001,},},
      "min_lr": 3.0e-5, "train-iters": 540_000, "lr-decay-iters": 540_000,
      "lr-decay-style": "hybrid_cosine_inv_sqrt_2", "warmup": 0.0065, "cooldown": 0.,
      "override_lr_scheduler": false, "reset_attention_mask": true, "reset_position_ids": true,
      "zero_optimization": {"stage": 1, "allgather_partitions": true, "allgather_bucket_size": 5_000_000_000,
                            "overlap_comm": true, "reduce_scatter": true, "cpu_offload": false,},
      "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 8, "data-impl": "mmap",
      "eval-interval": 5_000, "eval-iters": 10, "eval_batch_size": 1, "eval_tasks": [],
      "checkpoint-activations": true, "checkpoint-num-layers": 4, "partition-activations": true,
      "synchronize-each-layer": true, "gradient_clipping": 0.75, "weight-decay": 0.1,
      "hidden-dropout": 0, "attention-dropout": 0,
      "bf16": { "enabled": true }, "precision": "bfloat16", "fp16": {"enabled": false},
      "full_precision_lm_cross_entropy": true, "fp32_allreduce": true, "num-workers": 2,
      "distributed-backend": "nccl", "checkpoint-factor": 2_000, "s3_sync_interval": 20_000,
      "extra-save-iters": [0], "save": "", "load": "", "s3_path": "", "iteration": 84000, "finetune": false,
      "no_checkpoint_arg_validation": true,
      "train_data_paths": [], "train_data_weights": [],
      "valid-data-paths": ["val_text_document"], "valid-data-weights": [1.0,],
      "test-data-paths": ["val_text_document"], "test-data-weights": [1.0,],
      "tokenizer-type": "TiktokenTokenizer", "vocab-file": "arcade100k.tiktoken",
      "log-interval": 10, "steps_per_print": 10, "wall_clock_breakdown": true, "log-grad-norm": true,
      "use_wandb": true, "wandb_host": "https://example.invalid", "wandb_team": "t", "wandb_project": "",
      "wandb_group": "", "wandb_name": "",
      # "wandb_id": "",
      "use-mup": false, "save-base-shapes": false, "base-shapes-file": "shapes/base", "coord-check": false,
      "launcher": "slurm", "deepspeed_slurm": true, "seed": 2345678926,
    }
    """
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_published_style_config_loads_unchanged(tmp_path, capsys):
    cfg = load_config([write(tmp_path, "a.yml", PUBLISHED_STYLE)])
    assert cfg.num_layers == 4 and cfg.model_parallel_size == 2 and cfg.kv_heads == 4
    assert cfg.train_iters == 540_000 and cfg.rotary_emb_base == 10_000.0
    assert cfg.optimizer["params"]["eps"] == pytest.approx(1e-8)
    assert cfg.zero_stage == 1 and cfg.params_dtype_name == "bf16"
    assert cfg.ffn_hidden_size == 512  # 8/3 * 128 = 341.3 -> rounded up to a multiple of 256
    out = capsys.readouterr().out
    for key in (
        "s3_path",
        "use_mup",
        "base_shapes_file",
        "coord_check",
        "save_base_shapes",
        "s3_sync_interval",
    ):
        assert out.count(f"'{key}'") == 1, key  # reported once, not dropped silently
    assert set(cfg.ignored_keys) >= {"s3_path", "use_mup", "synchronize_each_layer"}
    # partition-activations at TP=2 is read: megatron-core sequence parallelism, said at start-up
    assert cfg.uses_sequence_parallel and "partition_activations" not in cfg.ignored_keys
    assert "'partition_activations: true' → megatron-core sequence parallelism over TP=2" in out


def test_later_files_win_and_overrides(tmp_path):
    base = write(
        tmp_path, "base.yml", "num-layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\n"
    )
    extra = write(tmp_path, "extra.yml", "num_layers: 3\nseq-length: 16\n")
    cfg = load_config([base, extra], overrides=["hidden_size=128", "train_iters=5"])
    assert (cfg.num_layers, cfg.seq_length, cfg.hidden_size, cfg.train_iters) == (3, 16, 128, 5)
    assert cfg.max_position_embeddings is None and cfg.rotary_emb_base == 10000.0  # GPT-NeoX defaults
    assert cfg.padded_vocab(50277) == 50304  # multiple of 128 x TP
    assert load_config([base], overrides=["model_parallel_size=4"]).padded_vocab(50277) == 50688


MINIMAL = "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\n"


@pytest.mark.parametrize(
    "extra, pattern",
    [
        ("num_layer: 3\n", r"bad\.yml: unknown key 'num_layer'; did you mean 'num_layers'\?"),
        ("hidden_size: sixty\n", r"bad\.yml: key 'hidden_size' must be int"),
        ("use_bias_in_mlp: 1\n", r"key 'use_bias_in_mlp' must be bool"),
        ("hidden_size: 66\n", r"key 'hidden_size': 66 is not divisible by num_attention_heads=4"),
        (
            "num_kv_heads: 3\n",
            r"key 'num_kv_heads': num_attention_heads=4 is not divisible by num_kv_heads=3",
        ),
        ("model_parallel_size: 8\n", r"key 'model_parallel_size': num_attention_heads=4 is not divisible"),
        (
            "num_attention_heads: 8\nnum_kv_heads: 2\nattention_head_type: groupedquery\nmodel_parallel_size: 4\n",
            r"num_kv_heads=2 is not divisible by the tensor-parallel size 4",
        ),
        ("norm: scalenorm\n", r"key 'norm': unknown value 'scalenorm'"),
        ("activation: tanh\n", r"key 'activation': unknown value 'tanh'"),
        ("pos_emb: alibi\n", r"key 'pos_emb': unknown value 'alibi'"),
        ("attention_head_type: sparse\n", r"key 'attention_head_type': unknown value 'sparse'"),
        (
            "num_kv_heads: 2\nattention_head_type: multihead\n",
            r"'multihead' needs num_kv_heads == num_attention_heads",
        ),
        ("attention_config: [[['flash'], 3]]\n", r"'attention_config': covers 3 layers, num_layers is 2"),
        (
            "train_data_paths: [a, b]\ntrain_data_weights: [1.0]\n",
            r"train_data_weights': 1 weights for 2 paths",
        ),
        ("gpt_j_tied: true\n", r"gpt_j_tied': needs gpt_j_residual"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, extra, pattern):
    text = MINIMAL + extra
    lines = {}
    for line in text.splitlines():  # later lines replace earlier ones (keys given twice are an error)
        lines[line.split(":")[0]] = line
    with pytest.raises(ConfigError, match=pattern):
        load_config([write(tmp_path, "bad.yml", "\n".join(lines.values()) + "\n")])


def test_missing_required_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match="'seq_length' is required"):
        load_config([write(tmp_path, "a.yml", "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\n")])
    with pytest.raises(ConfigError, match="config file not found: .*nope.yml"):
        load_config([tmp_path / "nope.yml"])
    with pytest.raises(ConfigError, match="given twice"):
        load_config([write(tmp_path, "b.yml", MINIMAL + "num-layers: 3\n")])
