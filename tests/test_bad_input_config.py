"""Bad configs given to train.py end in one ``error: ...`` line naming the file, key or value, exit 2,
before anything heavy is built and with nothing written: unreadable files, malformed overrides, keys
given twice, DeepSpeed sub-keys DeepSpeed would refuse a minute later, impossible splits and weights,
models that cannot fit their device, output directories that cannot be written.

Everything runs in this process (``load_config``, the checks, or ``train.main`` for the end-to-end
cases), so the file takes seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import train
from megatron_stablelm.checkpoint.layout import CheckpointError
from megatron_stablelm.checkpoint.run_directory import unwritable_reason
from megatron_stablelm.config import ConfigError, load_config, read_yaml
from megatron_stablelm.config.choices import DEEPSPEED_FP16_KEYS, DEEPSPEED_ZERO_KEYS
from megatron_stablelm.inspect import GIB, check_fits
from megatron_stablelm.training.run_record import RunRecord

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "tiny" / "stablelm-2-1_6b.yml")
MINIMAL = "num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\n"
TRAINING = "train_iters: 2\noptimizer: {type: Adam, params: {lr: 0.001}}\n"


def write(tmp_path: Path, text: str | bytes, name: str = "c.yml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def load(tmp_path: Path, text: str = "", overrides: list[str] | None = None):
    return load_config(
        [write(tmp_path, MINIMAL + TRAINING + text)], overrides, training=True, report_ignored=False
    )


def train_error(argv: list[str], capsys) -> str:
    """``train.main(argv)`` must exit 2 with one ``error:`` line on stderr; returns that line."""
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[train.py] error: "), err
    return err[0]


# ------------------------------------------------------------------ 1-3: files and overrides that are not YAML
def test_binary_config_file_names_the_file(tmp_path):
    garbage = write(tmp_path, bytes([0xD4, 0x9F, 0x00, 0xFF, 0x81]) * 40, "garbage.yml")
    with pytest.raises(ConfigError, match=r"garbage\.yml: not valid YAML: not a text file"):
        load_config([garbage])


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ("seq_length=[1,", "expected the node content"),
        ("x=!!python/object/apply:os.system ['touch {marker}']", "could not determine a constructor"),
    ],
    ids=["unclosed-list", "python-tag"],
)
def test_malformed_override_names_the_override(tmp_path, override, problem):
    marker = tmp_path / "payload-ran"
    override = override.format(marker=marker)
    with pytest.raises(ConfigError, match="--override '") as err:
        load(tmp_path, overrides=[override])
    assert override in str(err.value) and problem in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()  # safe loading: the tag is refused, never run


def test_directory_given_as_config_is_called_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a config file"):
        load_config([tmp_path])


# ------------------------------------------------------------------ 4: a key given twice in one file
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train_iters: 3\n",
            "key 'train_iters' is given twice, as 'train_iters' on line 5 and as 'train_iters' on line 7",
        ),
        (
            "train-iters: 3\n",
            "key 'train_iters' is given twice, as 'train_iters' on line 5 and as 'train-iters' on line 7",
        ),
        ("zero_optimization: {stage: 1, stage: 2}\n", "key 'stage' is given twice, as 'stage' on line 7"),
    ],
    ids=["same-spelling", "dash-and-underscore", "nested-block"],
)
def test_key_given_twice_in_one_file_is_refused_with_both_lines(tmp_path, text, message):
    with pytest.raises(ConfigError, match=r"c\.yml: ") as err:
        load(tmp_path, text)
    assert message in str(err.value)


def test_every_shipped_config_has_each_key_once():
    for path in sorted((REPO / "configs").rglob("*.yml")):
        read_yaml(path)


def test_later_files_still_override_earlier_ones(tmp_path):
    later = write(tmp_path, "train-iters: 7\n", "later.yml")
    cfg = load_config([write(tmp_path, MINIMAL + TRAINING), later], report_ignored=False)
    assert cfg.train_iters == 7


# ------------------------------------------------------------------ 5: DeepSpeed's blocks
def test_unknown_zero_sub_key_is_refused_up_front(tmp_path):
    with pytest.raises(
        ConfigError, match="unknown sub-key 'allgather_partitionz'.*did you mean 'allgather_partitions'"
    ):
        load(tmp_path, "zero_optimization: {stage: 1, allgather_partitionz: true}\n")
    load(tmp_path, "zero_optimization: {stage: 1, cpu_offload: false, stage3_prefetch_bucket_size: 10}\n")


def test_unknown_fp16_sub_key_is_refused_when_fp16_is_used(tmp_path):
    with pytest.raises(ConfigError, match="key 'fp16': unknown sub-key 'loss_scale_windw'"):
        load(tmp_path, "fp16: {enabled: true, type: float16, loss_scale_windw: 100}\n")
    load(tmp_path, "fp16: {enabled: false, loss_scale_windw: 100}\n")  # not handed to DeepSpeed


def test_deepspeed_key_lists_match_the_installed_deepspeed():
    """The lists in config/choices.py are DeepSpeed's own models' fields and aliases (importing them at
    validation would import torch)."""
    from deepspeed.runtime.precision_config import DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    def names(model) -> set[str]:
        return {name for key, f in model.model_fields.items() for name in (key, f.alias) if name}

    assert names(DeepSpeedZeroConfig) == DEEPSPEED_ZERO_KEYS
    assert names(DeepSpeedFP16Config) == DEEPSPEED_FP16_KEYS


# ------------------------------------------------------------------ 6-7: data split and weights
def test_split_of_zeros_names_split(tmp_path):
    with pytest.raises(ConfigError, match="key 'split': gives every split a share of 0"):
        load(tmp_path, "split: 0,0,0\n")
    load(tmp_path, "split: 0,1,0\n")


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_weights_without_paths_name_both_keys(tmp_path, split):
    with pytest.raises(ConfigError, match=f"key '{split}_data_weights'.*{split}_data_paths is not set"):
        load(tmp_path, f"{split}_data_weights: [1.0]\n")


# ------------------------------------------------------------------ 8: sizes that cannot run
def test_integer_key_written_as_yaml_text_says_so(tmp_path):
    with pytest.raises(ConfigError, match="'train_iters' must be int, got '1e15'.*YAML reads '1e15' as text"):
        load(tmp_path, overrides=["train_iters=1e15"])
    assert load(tmp_path, overrides=["train_iters=1.0e+15"]).train_iters == 10**15


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (
            "num_layers=10000000",
            "weights, gradients and optimizer states 7.3 TiB (5e+11 parameters per GPU: num_layers 10000000",
        ),
        ("seq_length=1000000000", "activations 9.6 TiB (seq_length 1000000000"),
        (
            "train_micro_batch_size_per_gpu=100000000",
            "activations 30.8 TiB (seq_length 32 × train_micro_batch_size_per_gpu 100000000",
        ),
    ],
    ids=["layers", "sequence", "micro-batch"],
)
def test_model_larger_than_the_device_is_refused_naming_the_sizes(tmp_path, override, named):
    cfg = load(tmp_path, overrides=[override])  # fp32, no vocabulary: a lower bound
    with pytest.raises(
        ConfigError, match="would run out of memory: it needs about .* more than the 23.0 GiB of RAM"
    ) as err:
        check_fits(cfg, 0, 1, 23 * GIB, "RAM")
    assert named in str(err.value)


def test_shipped_configs_fit_the_devices_they_are_meant_for():
    """Every shipped config on a node of 80 GB GPUs (79 GiB usable), the tiny ones in 1 GiB."""
    for path in sorted((REPO / "configs").glob("stablelm-*.yml")):
        cfg = load_config([path], report_ignored=False)
        check_fits(cfg, cfg.padded_vocab_size, 8 // cfg.model_parallel_size, 79 * GIB, "an H100")
    for path in sorted((REPO / "configs" / "tiny").glob("*.yml")):
        cfg = load_config([path], report_ignored=False)
        check_fits(cfg, cfg.padded_vocab_size, 1, GIB, "a small machine")


def test_train_refuses_a_model_too_large_before_building_it(tmp_path, capsys):
    run = tmp_path / "run"
    config = write(tmp_path, TRAINING + f"save: {run}\n")
    line = train_error([TINY, str(config), "--synthetic-data", "--override", "num_layers=10000000"], capsys)
    assert "would run out of memory" in line and "num_layers 10000000" in line
    assert not run.exists()


# ------------------------------------------------------------------ 9: output directories
def test_unwritable_log_dir_is_refused_before_training(tmp_path, capsys):
    blocker = write(tmp_path, "a file, not a directory", "blocker")
    run = tmp_path / "run"
    config = write(tmp_path, TRAINING + f"save: {run}\nlog_dir: {blocker}/logs\n")
    line = train_error([TINY, str(config), "--synthetic-data"], capsys)
    assert (
        f"key 'log_dir': {blocker}/logs: the log directory is not writable ({blocker} is not a directory)"
        in line
    )
    assert not run.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "c.yml"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert unwritable_reason(locked / "run" / "logs") == f"{locked} is not writable (Permission denied)"


def test_writable_directories_pass_and_are_not_created(tmp_path):
    assert unwritable_reason(tmp_path / "new" / "run") is None and unwritable_reason(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_run_record_names_a_directory_it_cannot_write(tmp_path):
    blocker = write(tmp_path, "x", "blocker")
    with pytest.raises(CheckpointError, match=f"cannot write the run's record: {blocker}/logs"):
        RunRecord(tmp_path / "run", blocker / "logs").start({})


def test_a_run_whose_sample_indexes_cannot_fit_is_refused_naming_train_iters(tmp_path):
    """``train_iters: 10**15`` with real data: refused while planning (the indexes' lower bound exceeds
    the cache disk), not a memory error deep in the index build."""
    from megatron_stablelm.data import DataError
    from megatron_stablelm.data.datasets import plan_splits
    from tests.data_helpers import data_config, write_synthetic_shard

    prefix = str(tmp_path / "shard")
    write_synthetic_shard(prefix, [40] * 20, eod=0, vocab=100)
    paths = dict(train_data_paths=[prefix], data_cache_dir=str(tmp_path / "cache"))
    assert plan_splits(data_config(**paths), 100, scan_tokens=False)[0].num_samples == 50 * 4
    with pytest.raises(DataError, match=r"train_iters=1000000000000000, .* GiB free"):
        plan_splits(data_config(train_iters=10**15, **paths), 100, scan_tokens=False)
    assert not (tmp_path / "cache").exists()
