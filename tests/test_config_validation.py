"""The one config validator (every key's type and range), the batch-layout rule at a world size, and
the values derived on ``Config`` (ZeRO stage, Adam settings, schedule steps, architecture)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from megatron_stablelm.config import (
    ARCHITECTURE_KEYS,
    ATTENTION_TYPES,
    BatchLayout,
    ConfigError,
    config_from_dict,
    load_config,
    validate_layout,
)
from megatron_stablelm.data.datasets import data_layout, plan_splits
from tests.data_helpers import write_synthetic_shard
from tests.train_helpers import tiny_dict

ADAM = {"type": "Adam", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8}}


def adam(**params) -> dict:
    return {"type": "Adam", "params": {**ADAM["params"], **params}}


# (overrides, the key the message must name, the value it must show)
BAD_VALUES = [
    ({"eval_iters": -3}, "eval_iters", "-3"),
    ({"eval_interval": -1}, "eval_interval", "-1"),
    ({"num_kv_heads": 0}, "num_kv_heads", "0"),
    ({"gradient_clipping": -1}, "gradient_clipping", "-1"),
    ({"weight_decay": -0.5}, "weight_decay", "-0.5"),
    ({"log_interval": 0}, "log_interval", "0"),
    ({"extra_save_iters": ["a"]}, "extra_save_iters", "['a']"),
    ({"extra_save_iters": [10, -5]}, "extra_save_iters", "-5"),
    ({"seed": -1}, "seed", "-1"),
    ({"num_workers": -1}, "num_workers", "-1"),
    ({"train_iters": 0}, "train_iters", "0"),
    ({"lr_decay_iters": -10}, "lr_decay_iters", "-10"),
    ({"checkpoint_factor": 0}, "checkpoint_factor", "0"),
    ({"train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu", "0"),
    ({"max_nonfinite_steps": -2}, "max_nonfinite_steps", "-2"),
    ({"warmup": -0.1}, "warmup", "-0.1"),
    ({"cooldown": 1.5}, "cooldown", "1.5"),
    ({"hidden_dropout": 1.0}, "hidden_dropout", "1.0"),
    ({"master_port": 70000}, "master_port", "70000"),
    ({"lr_decay_style": "cosin"}, "lr_decay_style", "'cosin'"),
    ({"tokenizer_type": "GPT2BPETokenizer"}, "tokenizer_type", "'GPT2BPETokenizer'"),
    ({"min_lr": 0.5}, "min_lr", "0.5"),
    ({"optimizer": adam(lr="fast")}, "optimizer", "'fast'"),
    ({"optimizer": adam(lr=-1e-3)}, "optimizer", "-0.001"),
    ({"optimizer": adam(betas=[0.9])}, "optimizer", "[0.9]"),
    ({"optimizer": adam(betas=[0.9, 0.95, 0.99])}, "optimizer", "[0.9, 0.95, 0.99]"),
    ({"optimizer": adam(betas=[0.9, 1.0])}, "optimizer", "[0.9, 1.0]"),
    ({"optimizer": adam(betas="fast")}, "optimizer", "'fast'"),
    ({"optimizer": adam(eps=0)}, "optimizer", "0"),
    ({"optimizer": adam(impl="cuda")}, "optimizer", "'cuda'"),
    ({"optimizer": adam(momentum=0.9)}, "optimizer", "momentum"),
    ({"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}, "optimizer", "'SGD'"),
    ({"optimizer": {"type": "Adam", "params": {}}}, "optimizer", "optimizer.params.lr"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization", "stage 3"),
    ({"zero_optimization": {"stage": "one"}}, "zero_optimization", "'one'"),
    ({"bf16": {"enabled": "yes"}}, "bf16", "'yes'"),
    ({"train_data_paths": ["a", 3]}, "train_data_paths", "['a', 3]"),
    ({"attention_config": [[["flash_attn2"], 2]]}, "attention_config", "'flash_attn2'"),
]


@pytest.mark.parametrize("overrides, key, shown", BAD_VALUES, ids=[f"{k}={s}" for _, k, s in BAD_VALUES])
def test_bad_value_names_key_and_value_in_one_line(overrides, key, shown):
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny_dict(**overrides))
    message = str(err.value)
    assert "\n" not in message
    assert f"'{key}'" in message and shown in message, message


def test_file_is_named_for_a_bad_value_from_yaml(tmp_path):
    path = tmp_path / "run.yml"
    path.write_text(
        "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\neval_iters: -3\n"
    )
    with pytest.raises(ConfigError, match=r"run\.yml: key 'eval_iters': must be >= 0.*got -3$"):
        load_config([path], report_ignored=False)
    path.write_text(path.read_text().replace("eval_iters: -3", "optimizer: {params: {lr: fast}}"))
    with pytest.raises(
        ConfigError, match=r"run\.yml: key 'optimizer': `params\.lr` must be a number, got 'fast'"
    ):
        load_config([path], report_ignored=False)


def test_off_values_and_unset_keys_are_accepted():
    cfg = config_from_dict(
        tiny_dict(
            eval_interval=0, eval_iters=0, gradient_clipping=0, steps_per_print=0, extra_save_iters=[0, 3]
        )
    )
    assert cfg.eval_interval == 0 and cfg.extra_save_iters == [0, 3]
    assert config_from_dict(tiny_dict(num_kv_heads=None)).kv_heads == 4
    # YAML 1.1 reads 3e-4 (no dot) as a string: still a number
    assert config_from_dict(tiny_dict(optimizer=adam(lr="3e-4"))).peak_lr == pytest.approx(3e-4)


def test_padded_vocabulary_must_hold_every_token():
    """An explicit ``padded_vocab_size`` below the tokenizer's vocabulary is refused by name (the
    embedding would lack rows for the highest ids); equal or larger is kept, and leaving it out pads
    the tokenizer's size up to ``make_vocab_size_divisible_by`` x TP."""
    cfg = config_from_dict(tiny_dict(padded_vocab_size=256, vocab_file="tok.json"))
    with pytest.raises(
        ConfigError,
        match=r"`padded_vocab_size` 256 is smaller than .* \(400 tokens, `vocab_file` tok\.json\)",
    ):
        cfg.padded_vocab(400)
    assert cfg.padded_vocab(256) == 256 and cfg.padded_vocab(100) == 256 and cfg.padded_vocab(None) == 256
    auto = config_from_dict(tiny_dict(padded_vocab_size=None, make_vocab_size_divisible_by=128))
    assert auto.padded_vocab(400) == 512


def test_training_only_keys_are_required_only_for_training():
    model_only = tiny_dict(train_iters=None, optimizer=None)
    cfg = config_from_dict(model_only)  # what inspection, conversion and generation load
    with pytest.raises(ConfigError, match="'train_iters' is required"):
        config_from_dict(model_only, training=True)
    with pytest.raises(ConfigError, match=r"key 'optimizer': .*optimizer\.params\.lr` is required"):
        config_from_dict(tiny_dict(optimizer=None), training=True)
    with pytest.raises(ConfigError, match="key 'train_iters': required for training"):
        cfg.warmup_steps  # noqa: B018 - the property raises
    config_from_dict(tiny_dict(), training=True)


def test_every_attention_type_loads_from_yaml(tmp_path):
    assert set(ATTENTION_TYPES) == {"flash", "sdpa", "math", "global", "flash_attn", "flex"}
    for kind in ATTENTION_TYPES:
        path = tmp_path / f"{kind}.yml"
        path.write_text(
            f'num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\nattention_config: [[["{kind}"], 2]]\n'
        )
        assert load_config([path], report_ignored=False).attention_config == [[[kind], 2]]


# ---------------------------------------------------------------------------------------------- layout
def expected_layout(tp: int, world: int, micro: int, gas: int, tbs: int | None) -> BatchLayout | None:
    """The definition, by search: ``micro × accumulation × dp == train_batch_size``, where the
    accumulation is the configured one, or any positive integer when it was left at 1."""
    if world % tp:
        return None
    dp = world // tp
    if tbs is None:
        return BatchLayout(micro, gas, dp)
    candidates = range(1, tbs + 1) if gas == 1 else [gas]
    solutions = [acc for acc in candidates if micro * acc * dp == tbs]
    return BatchLayout(micro, solutions[0], dp) if len(solutions) == 1 else None


def test_layout_rule_matches_the_arithmetic_definition():
    base = config_from_dict(tiny_dict())
    checked = derived = 0
    for tp, micro, gas, tbs in itertools.product((1, 2, 4), (1, 2, 3), (1, 2, 3), (None, *range(1, 25))):
        cfg = dataclasses.replace(
            base,
            model_parallel_size=tp,
            train_micro_batch_size_per_gpu=micro,
            gradient_accumulation_steps=gas,
            train_batch_size=tbs,
        )
        for world in range(1, 9):
            want = expected_layout(tp, world, micro, gas, tbs)
            if want is None:
                with pytest.raises(ConfigError) as err:
                    validate_layout(cfg, world)
                assert "\n" not in str(err.value)
                assert "model_parallel_size" in str(err.value) or f"train_batch_size={tbs}" in str(err.value)
                continue
            got = validate_layout(cfg, world)
            assert got == want and got.global_batch == micro * got.accumulation * (world // tp)
            checked += 1
            derived += got.accumulation != gas
            # the data pipeline sees the same layout at this data-parallel size, by construction
            assert data_layout(cfg, world // tp) == got
    assert checked > 400 and derived > 50


def test_data_is_sized_by_the_trainer_layout_with_derived_accumulation(tmp_path):
    """train_batch_size with gradient_accumulation_steps left at 1: the trainer derives accumulation
    4 at DP=2; the data splits must be sized with it (they used to raise instead)."""
    prefix = str(tmp_path / "shard")
    write_synthetic_shard(prefix, [40] * 50, eod=0, vocab=100)
    cfg = config_from_dict(
        tiny_dict(
            train_micro_batch_size_per_gpu=2,
            gradient_accumulation_steps=1,
            train_batch_size=16,
            train_iters=10,
            eval_interval=5,
            eval_iters=3,
            eval_batch_size=1,
            train_data_paths=[prefix],
            valid_data_paths=[prefix],
            test_data_paths=[prefix],
        )
    )
    trainer = validate_layout(cfg, world_size=2)
    assert (trainer.micro, trainer.accumulation, trainer.dp_size) == (2, 4, 2)
    train, valid, test = plan_splits(cfg, 100, dp_size=2, scan_tokens=False)
    per_eval = 3 * 1 * 4 * 2  # eval_iters x eval micro x accumulation x DP
    assert train.num_samples == 10 * 16
    assert valid.num_samples == (10 // 5 + 1) * per_eval and test.num_samples == per_eval


# ---------------------------------------------------------------------------------------------- derived
def test_effective_zero_stage():
    stage = {
        (precision, requested): config_from_dict(
            tiny_dict(precision=precision, zero_optimization={"stage": requested})
        ).effective_zero_stage
        for precision in ("fp32", "bf16", "fp16")
        for requested in (0, 1, 2)
    }
    assert stage == {
        ("fp32", 0): 0,
        ("fp32", 1): 1,
        ("fp32", 2): 2,
        ("bf16", 0): 1,
        ("bf16", 1): 1,
        ("bf16", 2): 2,
        ("fp16", 0): 1,
        ("fp16", 1): 1,
        ("fp16", 2): 2,
    }


def test_adam_settings_and_schedule_steps():
    cfg = config_from_dict(
        tiny_dict(
            optimizer={
                "type": "apex_adam",
                "params": {"lr": "1e-3", "betas": [0.8, 0.9], "weight_decay": 0.3},
            },
            train_iters=200,
            warmup=0.05,
            cooldown=0.1,
            lr_decay_iters=150,
        )
    )
    settings = cfg.adam
    assert (settings.type, settings.impl, settings.betas, settings.eps) == (
        "apex_adam",
        "apex",
        (0.8, 0.9),
        1e-8,
    )
    assert settings.kwargs() == {"lr": 1e-3, "betas": (0.8, 0.9), "eps": 1e-8}
    assert cfg.peak_lr == 1e-3
    assert (cfg.warmup_steps, cfg.lr_decay_steps, cfg.cooldown_steps) == (10, 150, 20)
    assert config_from_dict(tiny_dict(warmup=7, train_iters=200)).warmup_steps == 7  # >= 1: steps
    assert config_from_dict(tiny_dict(train_iters=40)).lr_decay_steps == 40  # default: train_iters


def test_architecture_compares_what_the_model_computes():
    base = config_from_dict(tiny_dict())
    assert tuple(base.architecture()) == ARCHITECTURE_KEYS
    # two spellings of one model: "llama" is the gated MLP; rotary_pct 0.25 and 0.26 give 4 of 16 dims
    same = config_from_dict(tiny_dict(mlp_type="llama", rotary_pct=0.26, activation="swish", seed=7))
    assert same.architecture() == base.architecture()
    for change in (
        {"hidden_size": 128},
        {"rotary_pct": 0.5},
        {"use_qkv_bias": False},
        {"layernorm_epsilon": 1e-6},
    ):
        other = config_from_dict(tiny_dict(**change)).architecture()
        assert other != base.architecture(), change
    assert (
        base.max_positions == 64
        and config_from_dict(tiny_dict(max_position_embeddings=None)).max_positions == 32
    )
