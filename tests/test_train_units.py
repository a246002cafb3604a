"""Trainer pieces that need no process group: schedules, parameter groups, batch arithmetic, the
generated DeepSpeed config, model FLOPs, and the pre-flight checks that must fail before step 1."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from torch import nn

from megatron_stablelm.checkpoint import CheckpointError, write_model_files
from megatron_stablelm.config import ConfigError, config_from_dict, load_config, validate_layout
from megatron_stablelm.metrics import flops_per_token as model_flops_per_token
from megatron_stablelm.training.engine import deepspeed_config
from megatron_stablelm.training.loop import Trainer
from megatron_stablelm.training.optimizer import decays, param_groups
from megatron_stablelm.training.schedules import LRSchedule, schedule_from_config, warmup_steps
from tests.train_helpers import REPO, tiny_dict

P, M, W, T = 1e-3, 1e-4, 10, 100


def sched(style: str, cooldown: int = 0, decay: int = T) -> LRSchedule:
    return LRSchedule(style, P, M, W, decay, T, cooldown)


def expected(style: str, t: int) -> float:
    """The formulas, written independently of the implementation."""
    if t <= W:
        return P * t / W
    r = min((t - W) / (T - W), 1.0)
    cosine = M + (P - M) * 0.5 * (1 + math.cos(math.pi * r))
    if style == "constant":
        return P
    if style == "linear":
        return M + (P - M) * (1 - r)
    if style == "cosine":
        return cosine
    if style == "inverse_sqrt":
        return max(M, P * math.sqrt(W / t))
    handover = W + (T - W) / 2
    return cosine if t <= handover else max(M, (P + M) / 2 * math.sqrt(handover / t))


@pytest.mark.parametrize(
    "style", ["constant", "linear", "cosine", "inverse_sqrt", "hybrid_cosine_inv_sqrt_2"]
)
def test_schedule_matches_formula(style):
    s = sched(style)
    for t in (0, 1, W // 2, W, 32, (W + T) // 2, 55, 80, T):  # warmup start/end, mid-run, end
        assert s(t) == pytest.approx(expected(style, t), rel=1e-12, abs=1e-15), (style, t)
    assert s(1) == pytest.approx(P / W)
    assert s(W) == pytest.approx(P)


def test_schedule_endpoints():
    assert sched("linear")(T) == pytest.approx(M)
    assert sched("cosine")(T) == pytest.approx(M)
    assert sched("cosine")(55) == pytest.approx((P + M) / 2)
    assert sched("hybrid_cosine_inv_sqrt_2")(55) == pytest.approx((P + M) / 2)
    assert sched("inverse_sqrt")(T) == pytest.approx(P * math.sqrt(W / T))


def test_cooldown_decays_linearly_to_zero():
    s = sched("cosine", cooldown=10)
    base = sched("cosine")
    assert s(90) == pytest.approx(base(90))
    assert s(95) == pytest.approx(base(90) * 0.5)
    assert s(T) == 0.0
    for t in range(90, T):
        assert s(t + 1) <= s(t)


def test_hybrid_is_continuous_and_monotone():
    s = sched("hybrid_cosine_inv_sqrt_2")
    h = s.handover
    eps = 1e-6
    assert abs(s._base(h + eps) - s._base(h - eps)) < 1e-9
    values = [s(t) for t in range(W, 5000)]
    assert all(b <= a + 1e-18 for a, b in zip(values, values[1:]))
    # the steepest step-to-step change anywhere is small: no jump
    assert max(a - b for a, b in zip(values, values[1:])) < (P - M) * 0.05
    long = LRSchedule("hybrid_cosine_inv_sqrt_2", P, M, W, T, 10**9)
    assert long(10**8) == pytest.approx(M)  # floored at min_lr
    assert values[-1] >= M


def test_warmup_fraction_or_iterations():
    assert warmup_steps(0.1, 100) == 10
    assert warmup_steps(5, 100) == 5
    cfg = config_from_dict(tiny_dict(train_iters=200, warmup=0.05, lr_decay_iters=150))
    s = schedule_from_config(cfg)
    assert (s.warmup, s.decay_iters, s.peak) == (10, 150, 2e-3)


def test_schedule_needs_lr_and_train_iters():
    with pytest.raises(ConfigError, match="optimizer.params.lr"):
        schedule_from_config(config_from_dict(tiny_dict(optimizer={"type": "Adam", "params": {}})))
    with pytest.raises(ConfigError, match="train_iters"):
        schedule_from_config(config_from_dict(tiny_dict(train_iters=None)))


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(8, 4)
        self.dense = nn.Linear(4, 4)
        self.input_norm = nn.LayerNorm(4)
        self.q_norm = nn.Module()
        self.q_norm.weight = nn.Parameter(torch.ones(2, 2))  # per-head QK-norm: 2-D, still a norm


def test_weight_decay_only_on_weight_matrices():
    groups = param_groups(_Toy(), 0.1)
    names = {id(p): n for n, p in _Toy().named_parameters()}
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 2 and len(no_decay["params"]) == 4
    del names
    assert decays("layers.0.attention.qkv.weight", torch.zeros(3, 3))
    assert decays("embedding.weight", torch.zeros(3, 3))
    assert not decays("layers.0.attention.qkv.bias", torch.zeros(3))
    assert not decays("layers.0.attention.q_norm.weight", torch.zeros(3, 3))
    assert not decays("final_norm.weight", torch.zeros(3))


def test_validate_layout():
    cfg = config_from_dict(tiny_dict(model_parallel_size=2, train_batch_size=8))
    layout = validate_layout(cfg, 4)
    assert (layout.micro, layout.accumulation, layout.dp_size, layout.global_batch) == (2, 2, 2, 8)
    with pytest.raises(ConfigError, match="does not fit the world size"):
        validate_layout(config_from_dict(tiny_dict(train_batch_size=6, gradient_accumulation_steps=2)), 4)
    with pytest.raises(ConfigError, match="does not divide the world size"):
        validate_layout(config_from_dict(tiny_dict(model_parallel_size=2)), 3)


def test_deepspeed_config_from_stablelm_2_config():
    cfg = load_config([REPO / "configs" / "stablelm-2-1_6b.yml"], report_ignored=False)
    ds = deepspeed_config(cfg, validate_layout(cfg, 8))
    assert ds["train_batch_size"] == 2 * 2 * 8
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["communication_data_type"] == "fp32"  # fp32_allreduce
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 1.0
    fp32 = config_from_dict(tiny_dict(zero_optimization={"stage": 0}))
    assert (
        deepspeed_config(fp32, validate_layout(fp32, 1))["gradient_clipping"] == 0.0
    )  # clipped by the guard
    assert (
        config_from_dict(tiny_dict(precision="bf16", zero_optimization={"stage": 0})).effective_zero_stage
        == 1
    )


def test_model_flops_per_token():
    cfg = config_from_dict(tiny_dict())
    h, s, v, f, layers = 64, 32, 256, cfg.ffn_hidden_size, 2
    # causal attention: scores and weighted sum over half the sequence on average (metrics.py)
    per_layer = 2 * h * 3 * h + 2 * h * h + 2 * h * f * 2 + 2 * f * h + 2 * s * h
    assert model_flops_per_token(cfg, v) == 3 * (layers * per_layer + 2 * h * v)


def _preflight(values: dict, monkeypatch=None, world: int = 1) -> Trainer:
    if monkeypatch is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
    trainer = Trainer(config_from_dict(values), lambda req: None, padded_vocab=256, log=lambda m: None)
    trainer.preflight()
    return trainer


def test_preflight_rejects_batch_arithmetic(monkeypatch):
    with pytest.raises(ConfigError, match=r"train_batch_size=6 must equal .* data-parallel size \(4"):
        _preflight(tiny_dict(train_batch_size=6, gradient_accumulation_steps=2), monkeypatch, world=4)


def test_preflight_rejects_load_without_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        _preflight(tiny_dict(load=str(tmp_path / "empty"), save=str(tmp_path / "out")))
    with pytest.raises(CheckpointError, match="does not exist"):
        _preflight(tiny_dict(load=str(tmp_path / "missing")))
    # load == save and empty: the first launch of an auto-resuming job starts from scratch
    assert _preflight(tiny_dict(load=str(tmp_path / "run"), save=str(tmp_path / "run"))).checkpoint is None


def test_preflight_rejects_other_architecture(tmp_path):
    saved = config_from_dict(tiny_dict())
    write_model_files(tmp_path / "iter_0000001", saved, 0, 1, {"embedding.weight": torch.zeros(256, 64)}, 256)
    (tmp_path / "latest").write_text("iter_0000001\n")
    with pytest.raises(
        CheckpointError, match=r"architecture differs[\s\S]*hidden_size: checkpoint 64, config 128"
    ):
        _preflight(tiny_dict(hidden_size=128, load=str(tmp_path)))
    with pytest.raises(CheckpointError, match="num_layers: checkpoint 2, config 3"):
        _preflight(tiny_dict(num_layers=3, load=str(tmp_path)))
    assert _preflight(tiny_dict(load=str(tmp_path), seq_length=16)).checkpoint.path.name == "iter_0000001"


class _FakeWandb:
    def __init__(self) -> None:
        self.calls: list = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return type("Run", (), {"dir": "/tmp/wandb/offline-run"})()

    def log(self, values, step, commit=None):
        self.calls.append(("log", step, values))

    def finish(self):
        self.calls.append(("finish",))


def _logger(cfg, printed):
    from megatron_stablelm.training.logging import MetricsLogger

    return MetricsLogger(cfg, 1e6, 100.0, 1, 10, rank=0, print_fn=printed.append)


def test_log_line_and_wandb_offline(monkeypatch):
    from megatron_stablelm.training.logging import StepRecord

    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    printed: list[str] = []
    logger = _logger(config_from_dict(tiny_dict(use_wandb=True, wandb_project="p", log_interval=2)), printed)
    logger.open_trackers()
    assert fake.calls[0][1]["mode"] == "offline" and "offline-run" in printed[0]
    rec = dict(lr=1e-3, grad_norm=0.5, loss_scale=None, seconds=0.5, tokens=1000, skipped=False)
    assert logger.record(StepRecord(iteration=1, loss=4.0, **rec)) is None
    line = logger.record(StepRecord(iteration=2, loss=3.0, **rec))
    for part in ("iter 2/10", "tokens 2K", "loss 3.5000", "lr 1.000e-03", "grad_norm 0.500", "tok/s 2K",
                 "TFLOP/s/GPU 0.00", "MFU 0.0%", "mem ", "ETA 0:00:04"):  # fmt: skip
        assert part in line, part
    logged = [c for c in fake.calls if c[0] == "log"][0]
    assert logged[1] == 2 and logged[2]["train/loss"] == 3.5 and logged[2]["train/tokens_per_second"] == 2000
    logger.close()
    assert fake.calls[-1] == ("finish",)


def test_missing_tracker_packages_fail_before_training(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ConfigError, match="wandb"):
        _logger(config_from_dict(tiny_dict(use_wandb=True)), []).open_trackers()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="TensorBoard"):
        _logger(config_from_dict(tiny_dict(tensorboard_dir=str(tmp_path))), []).open_trackers()


def test_real_tensorboard_and_wandb_offline(monkeypatch, tmp_path):
    """The real packages: TensorBoard events read back with TensorBoard's own reader; W&B runs offline
    (no network here) into a run directory, with the logged scalars in its summary."""
    pytest.importorskip("tensorboard")
    wandb = pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megatron_stablelm.training.logging import StepRecord

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tb_dir = tmp_path / "tb"
    printed: list[str] = []
    cfg = config_from_dict(
        tiny_dict(use_wandb=True, wandb_project="p", tensorboard_dir=str(tb_dir), log_interval=1)
    )
    logger = _logger(cfg, printed)
    logger.open_trackers()
    rec = dict(lr=1e-3, grad_norm=0.5, loss_scale=None, seconds=0.5, tokens=1000, skipped=False)
    for it, loss in ((1, 4.0), (2, 3.0), (3, 2.5)):
        logger.record(StepRecord(iteration=it, loss=loss, **rec))
    assert wandb.run.summary["train/loss"] == 2.5
    logger.close()
    assert any(line.startswith("[wandb] offline run") for line in printed)
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    losses = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert losses == [(1, 4.0), (2, 3.0), (3, 2.5)]
    assert "train/mfu" in events.Tags()["scalars"]


def _launch_free_env(monkeypatch) -> None:
    """train.main in this process as a one-process start: no launcher variables around."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)


def test_a_save_directory_held_by_a_live_run_is_refused_before_anything_heavy(tmp_path, monkeypatch, capsys):
    """The run-directory lock is probed by train.py before megatron-core or DeepSpeed is imported (the
    trainer's own claim came after ~18 s of set-up), and the refusal names the directory and its holder."""
    import time

    import train
    from megatron_stablelm.checkpoint.run_directory import RunDirectoryLock
    from tests.train_helpers import write_config

    _launch_free_env(monkeypatch)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "tiny.yml", tiny_dict(train_iters=2, save=str(run)))
    held = RunDirectoryLock(run).acquire()  # the live run: this process

    def set_up(*_args):
        raise AssertionError("the start went on past the fail-fast checks")

    monkeypatch.setattr(train, "_tokenizer_and_vocab", set_up)  # the next step, and all after it
    heavy = ("deepspeed", "megatron.core")
    before = {m for m in sys.modules if m.startswith(heavy)}
    try:
        start = time.perf_counter()
        code = train.main([str(cfg), "--synthetic-data"])
        seconds = time.perf_counter() - start
    finally:
        held.release()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"{run} is in use by another training run (pid {os.getpid()} on " in err[0], err
    assert {m for m in sys.modules if m.startswith(heavy)} == before  # refused before importing them
    assert seconds < 5, seconds
    assert sorted(p.name for p in run.iterdir()) == []  # the holder's note went with its lock


def test_deepspeed_start_compiles_and_waits_on_nothing(tmp_path, monkeypatch):
    """DeepSpeed's CPU backend loads its shared-memory op (serving inference only) unless it is marked
    incompatible: it compiled it into the per-user torch extension cache (31-106 s whenever another
    environment had built it last) and waited forever on a lock a killed build left there. With a stale
    lock in a private extension directory, the op is now skipped at once and nothing is built."""
    import threading

    from megatron_stablelm.training.deepspeed_setup import import_deepspeed

    build_dir = tmp_path / "torch_extensions" / "deepspeed_shm_comm"
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()  # a build killed half-way: torch's FileBaton waits for it forever
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import_deepspeed()
    from deepspeed.comm.torch import build_shm_op

    result: list = []
    worker = threading.Thread(target=lambda: result.append(build_shm_op()), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert result == [None], "DeepSpeed built or waited for its shared-memory op"
    assert sorted(p.name for p in build_dir.iterdir()) == ["lock"]  # nothing compiled
