"""The training job: setup (every check before the first step), train / evaluate / test, checkpoints.

Data comes from ``make_data(request: DataRequest)``, called once the process groups exist and the
checkpoint (if any) is loaded. It returns an object shaped like ``megatron_stablelm.data.DataIterators``:

* ``train``: this data-parallel rank's micro-batches, starting at global sample
  ``request.consumed_train_samples`` (the loader's whole state, so resuming is exact);
* ``valid``: continues across evaluations, starting at ``request.consumed_valid_samples``; each
  evaluation reads ``eval_iters × gradient_accumulation_steps`` micro-batches and advances the count
  by ``samples_per_eval``; ``test``: one evaluation at the end. Either may be ``None``.

Micro-batches follow the Batch contract of ARCHITECTURE.md. Tests pass deterministic synthetic data
(:mod:`megatron_stablelm.training.synthetic`); ``train.py`` passes the real pipeline.

Failure policy:

* a non-finite loss or gradient skips the update (DeepSpeed's overflow path, or the guarded optimizer
  without ZeRO), is logged and counted; ``max_nonfinite_steps`` in a row aborts with
  :class:`NonFiniteAbort` and *no* checkpoint is written while the streak lasts;
* SIGTERM (SLURM's preemption notice) or SIGINT (Ctrl-C) makes every rank finish the current
  iteration, save, and return with ``exit_reason`` ``"sigterm"``/``"sigint"`` (see
  :mod:`megatron_stablelm.signals`: a second Ctrl-C exits at once);
* configuration, batch arithmetic and checkpoint problems raise before any process group, model or
  checkpoint is touched.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from megatron_stablelm import metrics, parallel
from megatron_stablelm.checkpoint import CheckpointError
from megatron_stablelm.checkpoint.retention import prune_checkpoints
from megatron_stablelm.checkpoint.run_directory import RunDirectoryLock, check_writable
from megatron_stablelm.checkpoint.selection import (
    CheckpointInfo,
    ResumePlan,
    checkpoint_for_config,
    plan_resume,
)
from megatron_stablelm.checkpoint.training_state import (
    AsyncCheckpointWriter,
    load_model_weights,
    load_training_state,
    restore_rng,
    save_training_checkpoint,
)
from megatron_stablelm.config import BatchLayout, Config, ConfigError, validate_config, validate_layout
from megatron_stablelm.config.precision import bytes_per_value, optimizer_bytes_per_parameter
from megatron_stablelm.metrics import flops_per_token, peak_tflops
from megatron_stablelm.model import build_model, canonical_shapes
from megatron_stablelm.signals import STOP_FILE_REASON, StopRequest
from megatron_stablelm.training.engine import TrainingEngine
from megatron_stablelm.training.faults import Faults
from megatron_stablelm.training.logging import MetricsLogger, StepRecord
from megatron_stablelm.training.run_record import RunLog, RunRecord, active_run_log
from megatron_stablelm.training.schedules import schedule_from_config
from megatron_stablelm.training.spikes import (
    SpikeGuard,
    in_ranges,
    parse_iteration_ranges,
    read_skip_windows,
    record_skip_window,
)
from megatron_stablelm.training.watchdog import Watchdog


class DataIteratorsLike(Protocol):
    train: Iterator[dict] | None
    valid: Iterator[dict] | None
    test: Iterator[dict] | None
    samples_per_eval: int


@dataclass(frozen=True)
class DataRequest:
    """What the data factory needs to build this rank's iterators."""

    dp_rank: int
    dp_size: int
    layout: BatchLayout
    consumed_train_samples: int
    consumed_valid_samples: int
    device: torch.device


MakeData = Callable[[DataRequest], DataIteratorsLike]


class NonFiniteAbort(RuntimeError):
    """Too many consecutive non-finite steps; the run stopped without saving."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_valid_samples: int = 0
    consumed_tokens: int = 0
    skipped_iterations: int = 0
    nonfinite_iterations: int = 0
    nonfinite_in_a_row: int = 0
    spike_skips: int = 0  # updates skipped because the loss spiked (spikes.py)
    grad_norm_spikes: int = 0  # applied updates whose gradient norm spiked
    data_skipped_iterations: int = 0  # iterations of a skip window: batches read and dropped

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RunResult:
    exit_reason: str  # "done" | "sigterm" | "sigint"
    state: TrainState
    losses: dict[int, float] = field(
        default_factory=dict
    )  # iteration -> loss (DP-averaged; nan if non-finite)
    lrs: dict[int, float] = field(default_factory=dict)
    evals: list[dict[str, float]] = field(default_factory=list)
    test: dict[str, float] | None = None
    checkpoints: list[str] = field(default_factory=list)
    start_iteration: int = 0


FaultHook = Callable[[int, int, torch.Tensor], torch.Tensor]  # (iteration, micro, loss) -> loss


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as the launcher (torchrun, deepspeed, SLURM via them) provides them."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def seed_everything(seed: int) -> None:
    """Same seed on every rank: tensor-parallel ranks must draw identical dropout masks for their
    replicated activations (megatron-core's CUDA tracker separates the TP-sharded regions on GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _masked_sum(losses: torch.Tensor, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the counted token losses, number of counted tokens) of a micro-batch."""
    mask = batch["loss_mask"].to(losses.dtype)
    return (losses * mask).sum(), mask.sum()


class Trainer:
    """One training job: the policy (steps, evaluation and save cadence, signals, failure rules).
    ``setup()`` does every check and build step; ``train()`` runs it. The mechanics live elsewhere:
    :class:`~megatron_stablelm.training.engine.TrainingEngine` (DeepSpeed) and
    :mod:`megatron_stablelm.checkpoint` (the on-disk format)."""

    def __init__(
        self,
        cfg: Config,
        make_data: MakeData,
        *,
        padded_vocab: int,
        log: Callable[[str], None] = print,
        fault_hook: FaultHook | None = None,
        stop: StopRequest | None = None,
        resume: ResumePlan | None = None,
        layout: BatchLayout | None = None,
    ) -> None:
        self.cfg = cfg
        # What train.py already decided before the heavy imports (config validated, batch layout at this
        # world size, where the run starts): handed over, so the preflight does not check it twice.
        self.resume = resume
        self._checked_layout = layout
        self.make_data = make_data
        self.padded_vocab = padded_vocab
        self._log = log
        self.fault_hook = fault_hook
        self.stop = stop  # None: train() installs its own handlers for its duration
        self.record: RunRecord | None = None  # rank 0's files beside the checkpoints
        # train.log's lines, held until the record starts: train.py's capture of everything printed,
        # or else this trainer's own lines (None once there is no record to keep them for)
        self.run_log: RunLog | None = active_run_log() or RunLog()
        self.state = TrainState()
        self._step_seconds = 0.0
        self.checkpoint: CheckpointInfo | None = None
        self.writer = AsyncCheckpointWriter()  # async_save: the save in flight
        self.checkpoints_published: list[str] = []  # what this run published, in order
        self.watchdog: Watchdog | None = None  # started by train()

    def log(self, message: str) -> None:
        if self.rank == 0:
            self._emit(message)

    def _emit(self, line: str) -> None:
        """Print a line (rank 0) and keep it for the run's log file (a capture has it once printed)."""
        self._log(line)
        if self.run_log is not None and not self.run_log.captures_output:
            self.run_log.line(line)

    @property
    def rank(self) -> int:
        return world_from_env()[0]

    # ------------------------------------------------------------------ setup
    def preflight(self) -> None:
        """All checks that need no process group: batch arithmetic, schedule, optimizer block,
        checkpoint to load (existence, completeness, architecture). Raises ConfigError/CheckpointError."""
        cfg = self.cfg
        _, world = world_from_env()
        if self._checked_layout is None:
            validate_config(cfg, training=True)
        self.layout = self._checked_layout or validate_layout(cfg, world)
        if self.layout.accumulation != cfg.gradient_accumulation_steps:
            self.log(
                f"[setup] gradient_accumulation_steps = {self.layout.accumulation}, derived from train_batch_size"
            )
        self.schedule = schedule_from_config(cfg)
        try:
            self.faults = Faults.from_env()
            self.skip_windows = parse_iteration_ranges(cfg.skip_train_iteration_range)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.spikes = SpikeGuard(
            cfg.spike_loss_ratio,
            cfg.spike_rollback_skips,
            cfg.spike_rollback_window,
            cfg.spike_grad_norm_ratio,
        )
        if cfg.padded_vocab_size is None and self.padded_vocab % cfg.model_parallel_size:
            raise ConfigError(
                f"padded vocab {self.padded_vocab} is not divisible by TP={cfg.model_parallel_size}"
            )
        if (cfg.checkpoint_factor or cfg.extra_save_iters) and not cfg.save:
            self.log(
                "[setup] checkpoint_factor/extra_save_iters are set but `save` is not: nothing will be saved"
            )
        self.checkpoint = self._find_checkpoint()
        self.prec = cfg.params_dtype_name
        if cfg.effective_zero_stage != cfg.zero_stage:
            self.log(
                f"[setup] {self.prec} runs under ZeRO stage {cfg.effective_zero_stage} (fp32 master weights "
                "and optimizer states, one checkpoint format); stage 0 is only for fp32"
            )
        self.flops_per_token = flops_per_token(cfg, self.padded_vocab)
        self.metrics = MetricsLogger(
            cfg,
            self.flops_per_token,
            peak_tflops(cfg, self.prec),
            world,
            cfg.train_iters,
            rank=self.rank,
            print_fn=self._emit,
        )
        self.metrics.open_trackers()

    def _find_checkpoint(self) -> CheckpointInfo | None:
        """Where the run starts (:func:`plan_resume`: this run's own progress in ``save`` first, then
        ``load``), said in one line; None to start from scratch."""
        cfg = self.cfg
        self.resume = self.resume or plan_resume(cfg, self.padded_vocab)
        info = self.resume.checkpoint
        self.log(f"[setup] {self.resume.line}")
        if info is None:
            return None
        for warning in info.warnings:
            self.log(f"[setup] WARNING: {warning}")
        if info.train_state is None or (cfg.finetune and not self.resume.own_progress):
            what = "weights only" if info.train_state is None else "finetune: weights only"
            self.log(f"[setup] loading {info.path} ({what}); iteration, optimizer and data restart")
        elif info.iteration >= cfg.train_iters:
            self.log(
                f"[setup] checkpoint {info.path} is at iteration {info.iteration} "
                f">= train_iters={cfg.train_iters}: nothing to train"
            )
        return info

    def setup(self) -> None:
        self.preflight()
        cfg = self.cfg
        parallel.initialize(cfg.model_parallel_size, cfg.distributed_backend or parallel.default_backend())
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        self._claim_save_directory()
        try:
            self._build()
        except BaseException:
            if self._lock is not None:  # a run that failed to start leaves no trace
                self._lock.release(remove_if_created_empty=True)
                self._lock = None
            raise

    def _build(self) -> None:
        """Model, engine, resumed state and data; every rank."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        with torch.device(self.device):
            self.model = build_model(cfg, self.padded_vocab, dtype=cfg.params_dtype, seed=cfg.seed)
        if self.checkpoint is not None:
            load_model_weights(self.checkpoint, self.model)
        self.engine = TrainingEngine(cfg, self.model, self.layout)
        resuming = (
            self.checkpoint is not None
            and self.checkpoint.train_state is not None
            and (self.resume.own_progress or not cfg.finetune)
        )
        if resuming:
            self._resume(self.checkpoint)
        if cfg.save and self.resume.start_over is None:  # a start-over sets the old run's windows aside
            try:
                self._add_skip_windows(read_skip_windows(cfg.save))
            except ValueError as err:
                raise CheckpointError(str(err)) from None
        self.start_iteration = self.state.iteration
        self.metrics.consumed_tokens = self.state.consumed_tokens
        self.data = self.make_data(
            DataRequest(
                dp_rank=parallel.dp_rank(),
                dp_size=parallel.dp_size(),
                layout=self.layout,
                consumed_train_samples=self.state.consumed_samples,
                consumed_valid_samples=self.state.consumed_valid_samples,
                device=self.device,
            )
        )
        # Last: building the data iterators draws from the global generator (DataLoader seeds).
        if resuming and not restore_rng(self.checkpoint, log=self.log):
            seed_everything(cfg.seed + self.state.iteration)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(
            f"[setup] world {dist.get_world_size()} = TP {parallel.tp_size()} × DP {parallel.dp_size()}; "
            f"{self.prec}, ZeRO {self.engine.zero_stage}"
            f"{', sequence parallel' if getattr(self.model, 'sequence_parallel', False) else ''}; "
            f"global batch {self.layout.global_batch} "
            f"= micro {self.layout.micro} × accumulation {self.layout.accumulation} × DP {self.layout.dp_size}; "
            f"{n_params / 1e6:.2f}M parameters on TP rank 0; {self.flops_per_token / 1e9:.3f} GFLOP/token"
        )
        self._start_record()

    def _start_record(self) -> None:
        """Once setup has succeeded (a run that fails to start leaves the run directory as it was):
        the run's files beside its checkpoints, with everything logged so far."""
        if not self.cfg.save or self.rank != 0:
            if self.run_log is not None:
                self.run_log.close()
            self.run_log = None
            return
        self.record = RunRecord(self.cfg.save, self.cfg.log_dir)
        self.record.start(self.cfg.to_dict(), self.run_log)
        self.metrics.sink = lambda values: self.record.metrics("train", values)

    def _claim_save_directory(self) -> None:
        """Before anything is built: the save directory is this run's alone (a lock), writable, and has
        room for one checkpoint. Rank 0 checks; every rank fails together."""
        self._lock = None
        if not self.cfg.save:
            return
        error = None
        if self.rank == 0:
            try:
                self._lock = RunDirectoryLock(self.cfg.save).acquire()
                self.log("[setup] " + check_writable(self.cfg.save, self._checkpoint_bytes()))
            except CheckpointError as err:
                error = str(err)
                if self._lock is not None:
                    self._lock.release(remove_if_created_empty=True)
                    self._lock = None
        if self._any_rank(error is not None):
            raise CheckpointError(error or f"rank 0 could not claim the save directory {self.cfg.save}")

    def _checkpoint_bytes(self) -> int:
        """Size of one checkpoint: weights in the training dtype, fp32 Adam moments, and fp32 master
        weights when training in lower precision (from shapes alone, on the meta device)."""
        numel = sum(math.prod(shape) for shape in canonical_shapes(self.cfg, self.padded_vocab).values())
        return numel * (bytes_per_value(self.prec) + optimizer_bytes_per_parameter(self.prec))

    def _resume(self, info: CheckpointInfo) -> None:
        saved = load_training_state(info, self.engine)
        for key in TrainState().as_dict():
            if key in saved and key != "nonfinite_in_a_row":
                setattr(self.state, key, int(saved[key]))
        self.spikes.load_state_dict(saved.get("spikes"))
        self._add_skip_windows([tuple(w) for w in saved.get("skip_windows", [])])
        self.log(
            f"[setup] resumed from {info.path}: iteration {self.state.iteration}, "
            f"{self.state.consumed_samples} samples consumed (saved at TP={saved.get('tp_size')} "
            f"DP={saved.get('dp_size')}, now TP={parallel.tp_size()} DP={parallel.dp_size()})"
        )

    # ------------------------------------------------------------------ one iteration
    def train_step(self, data: Iterator[dict]) -> StepRecord:
        """One optimizer step at the schedule's learning rate (the token-mean weighting over all
        micro-batches and data-parallel ranks is :meth:`TrainingEngine.step`'s), and its accounting."""
        start = time.perf_counter()
        step_number = self.state.iteration + 1
        lr = self.schedule(step_number)
        self.engine.set_lr(lr)
        batches = [_to_device(next(data), self.device) for _ in range(self.layout.accumulation)]

        def hook(micro: int, loss: torch.Tensor) -> torch.Tensor:
            loss = self.faults.loss(step_number, loss)
            return self.fault_hook(step_number, micro, loss) if self.fault_hook is not None else loss

        seen: dict[str, Any] = {}

        def drop_update(loss_sum: torch.Tensor, step_tokens: torch.Tensor) -> bool:
            """The spike decision, on the step's loss reduced over DP (the same value on every rank)."""
            seen["loss"] = self._step_loss(loss_sum, step_tokens)
            mean, nonfinite = seen["loss"]
            seen["spike"] = not nonfinite and self.spikes.is_spike(step_number, mean)
            return seen["spike"]

        gate = drop_update if self.spikes.enabled else None
        loss_sum, step_tokens, outcome = self.engine.step(batches, hook, gate)
        mean_loss, nonfinite_loss = seen.get("loss") or self._step_loss(loss_sum, step_tokens)
        spike = seen.get("spike", False)
        if spike:
            self._count_spike(step_number, mean_loss)
        # fp16 overflow skips are the loss scaler's normal business, not a non-finite step
        nonfinite = nonfinite_loss or (not outcome.applied and self.prec != "fp16" and not spike)
        if nonfinite and outcome.applied:
            self.log(f"[train] WARNING: iteration {step_number}: non-finite loss but the update was applied")
        self._count_step(step_number, outcome.applied, nonfinite, nonfinite_loss, outcome.grad_norm)
        grad_spike = outcome.applied and self.spikes.is_grad_spike(step_number, outcome.grad_norm)
        if grad_spike:
            self.state.grad_norm_spikes += 1
            self.log(
                f"[train] iteration {step_number}: gradient norm {outcome.grad_norm:.4g} is "
                f"{outcome.grad_norm / self.spikes.grad_ewm:.2f}x its running mean (spike_grad_norm_ratio "
                f"{self.cfg.spike_grad_norm_ratio:g}); the update was applied (the norm comes with it) and "
                "counts toward a rollback"
            )
        return StepRecord(
            iteration=step_number,
            loss=mean_loss,
            lr=lr,
            grad_norm=outcome.grad_norm,
            loss_scale=outcome.loss_scale,
            seconds=time.perf_counter() - start,
            tokens=self.layout.global_batch * self.cfg.seq_length,
            skipped=not outcome.applied,
            spike=spike,
            grad_spike=grad_spike,
        )

    def _count_spike(self, step_number: int, loss: float) -> None:
        self.state.spike_skips += 1
        ewm = self.spikes.ewm
        self.log(
            f"[train] iteration {step_number}: loss {loss:.4f} is {loss / ewm:.2f}x its running mean {ewm:.4f} "
            f"(spike_loss_ratio {self.cfg.spike_loss_ratio:g}): update skipped "
            f"({len(self.spikes.recent_skips)} in the last {self.spikes.rollback_window} iterations, "
            f"{self.state.spike_skips} in total)"
        )

    def _skip_iteration(self) -> StepRecord:
        """An iteration of a skip window: its micro-batches are read and dropped, its number passes (the
        schedule and the sample stream go on as if it had trained), and nothing is updated."""
        step_number = self.state.iteration + 1
        if not in_ranges(step_number - 1, self.skip_windows) or step_number - 1 == self.start_iteration:
            end = next(b for a, b in self.skip_windows if a <= step_number <= b)
            self.log(f"[train] skip window: iterations {step_number}-{end} read and drop their batches")
        for _ in range(self.layout.accumulation):
            next(self.data.train)
        state = self.state
        state.iteration = step_number
        state.consumed_samples += self.layout.global_batch
        state.consumed_tokens += self.layout.global_batch * self.cfg.seq_length
        state.data_skipped_iterations += 1
        return StepRecord(step_number, math.nan, self.schedule(step_number), None, None, 0.0, 0, True)

    def _step_loss(self, loss_sum: torch.Tensor, step_tokens: torch.Tensor) -> tuple[float, bool]:
        """(token mean of the step's loss over all DP ranks, whether any rank saw a non-finite loss).
        TP ranks hold the same value; every rank must agree on "non-finite", hence the world MAX."""
        if self._any_rank(not math.isfinite(float(loss_sum))):
            return math.nan, True
        total = loss_sum.detach().to(torch.float64).reshape(1)
        dist.all_reduce(total, group=parallel.dp_group())
        return float(total.item()) / max(float(step_tokens.item()), 1.0), False

    def _count_step(
        self, step_number: int, applied: bool, nonfinite: bool, nonfinite_loss: bool, grad_norm: float | None
    ) -> None:
        state = self.state
        state.iteration = step_number
        state.consumed_samples += self.layout.global_batch
        state.consumed_tokens += self.layout.global_batch * self.cfg.seq_length
        state.skipped_iterations += 0 if applied else 1
        if not nonfinite:
            state.nonfinite_in_a_row = 0
            return
        state.nonfinite_iterations += 1
        state.nonfinite_in_a_row += 1
        self.log(
            f"[train] iteration {step_number}: non-finite {'loss' if nonfinite_loss else 'gradient'} "
            f"(grad norm {grad_norm}); update skipped ({state.nonfinite_in_a_row} in a row, "
            f"{state.nonfinite_iterations} in total)"
        )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data: Iterator[dict] | None, name: str) -> dict[str, float] | None:
        if data is None or not self.cfg.eval_iters:
            return None
        if name == "valid":
            self.state.consumed_valid_samples += int(self.data.samples_per_eval)
        self.engine.train(False)
        totals = torch.zeros(2, dtype=torch.float64)
        try:
            for _ in range(self.cfg.eval_iters * self.layout.accumulation):
                batch = _to_device(next(data), self.device)
                loss_sum, count = _masked_sum(self.engine.losses(batch), batch)
                totals[0] += float(loss_sum)
                totals[1] += float(count)
        except StopIteration:
            pass
        finally:
            self.engine.train()
        totals = totals.to(self.device)
        dist.all_reduce(totals, group=parallel.dp_group())
        loss = float(totals[0] / totals[1].clamp(min=1))
        if self.watchdog is not None:
            self.watchdog.beat(f"{name} evaluation at iteration {self.state.iteration}")
        result = {"iteration": self.state.iteration, "loss": loss, "ppl": metrics.perplexity(loss)}
        self.log(f"[{name}] iteration {self.state.iteration} | loss {loss:.4f} | ppl {result['ppl']:.3f}")
        self.metrics.scalars({f"{name}/loss": loss, f"{name}/ppl": result["ppl"]}, self.state.iteration)
        if self.record is not None:
            self.record.metrics(name, result)
        return result

    # ------------------------------------------------------------------ checkpoints
    def save(self, reason: str) -> bool:
        """Save this iteration (or, with ``async_save``, start saving it in the background); whether a
        save was made or started. Published saves reach :meth:`_published`."""
        if not self.cfg.save:
            return False
        if self.state.nonfinite_in_a_row:
            self.log(
                f"[checkpoint] not saving at iteration {self.state.iteration} ({reason}): the last "
                f"{self.state.nonfinite_in_a_row} iteration(s) were non-finite"
            )
            return False
        self._collect_save(wait=True)  # one save in flight at a time
        start = time.perf_counter()
        start_over = self.resume.start_over if self.resume else None
        if start_over is not None:  # the first save of a start-over: move aside what it would overwrite
            if self.rank == 0:
                start_over.apply(self.log)
            self.resume.start_over = None
        vocab_size = self.checkpoint.meta.vocab_size if self.checkpoint else None  # kept from an import
        args = (
            self.cfg.save,
            self.engine,
            self.cfg,
            self.padded_vocab,
            self._train_state_record(),
            vocab_size,
        )
        if self.cfg.async_save:
            snap = self.writer.start(*args)
            self._async_reason = reason
            self.log(
                f"[checkpoint] saving iteration {snap.iteration} in the background ({reason}): "
                f"{snap.nbytes / 2**30:.2f} GiB copied to host memory; training waited "
                f"{time.perf_counter() - start:.2f}s"
            )
        else:
            path = save_training_checkpoint(*args)
            self._published(path, reason, time.perf_counter() - start)
        if self.watchdog is not None:
            self.watchdog.beat(f"save of iteration {self.state.iteration}")
        return True

    def _collect_save(self, wait: bool) -> None:
        """Publish the background save once every rank has written it (collective while one is in
        flight; ``wait``: block until then). A failed write raises here, on every rank."""
        if self.writer.pending:
            path = self.writer.poll(wait)
            if path is not None:
                seconds = time.perf_counter() - self.writer.started
                self._published(path, f"{self._async_reason}, written in the background", seconds)

    def _published(self, path: Path, reason: str, seconds: float) -> None:
        self.log(f"[checkpoint] saved {path} ({reason}) in {seconds:.1f}s")
        self.checkpoints_published.append(str(path))
        if self.watchdog is not None:
            self.watchdog.beat(f"save of {path.name}")
        if self.cfg.keep_last_n_checkpoints and self.rank == 0:
            for old in prune_checkpoints(self.cfg.save, self.cfg.keep_last_n_checkpoints):
                self.log(
                    f"[checkpoint] removed {old} (keep_last_n_checkpoints={self.cfg.keep_last_n_checkpoints})"
                )

    def _train_state_record(self) -> dict[str, Any]:
        """What a checkpoint keeps of the run's progress: the counters, the spike guard's running mean,
        and the skip windows (so a resume anywhere reproduces the same sample stream)."""
        return dict(
            self.state.as_dict(),
            spikes=self.spikes.state_dict(),
            skip_windows=[list(w) for w in self.skip_windows],
        )

    def _add_skip_windows(self, windows: list[tuple[int, int]]) -> None:
        self.skip_windows = sorted(set(self.skip_windows) | {(int(a), int(b)) for a, b in windows})

    def _should_save(self, iteration: int) -> bool:
        cfg = self.cfg
        if cfg.checkpoint_factor and iteration % cfg.checkpoint_factor == 0:
            return True
        return bool(cfg.extra_save_iters) and iteration in set(cfg.extra_save_iters)

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank: every rank must take the same branch."""
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (every rank must leave the loop at the same step)."""
        return self._any_rank(self.stop.requested() is not None)

    # ------------------------------------------------------------------ the loop
    def train(self) -> RunResult:
        result = RunResult(
            "done", self.state, checkpoints=self.checkpoints_published, start_iteration=self.start_iteration
        )
        own_handlers = self.stop is None
        if own_handlers:
            self.stop = StopRequest().install()
        self.stop.training = True
        try:
            if self.data.train is None:
                raise ConfigError("no training data: set train_data_paths (or data_path)")
            self.engine.train()
            dump_dir = self.cfg.log_dir or self.cfg.save or "."
            self.watchdog = Watchdog(self.cfg.watchdog_timeout, dump_dir, dist.get_rank()).start()
            self._last_saved = self.start_iteration if self.checkpoint is not None else None
            self._nonfinite_at_start = self.state.nonfinite_iterations
            self._step_seconds = 0.0  # time in train_step alone: the summary's throughput
            started = time.perf_counter()
            while self.state.iteration < self.cfg.train_iters:
                if self._iteration(result):
                    result.exit_reason = (self.stop.requested() or "SIGTERM").lower()
                    break
            else:
                self._finish(result)
            self._summarise(result, time.perf_counter() - started)
            return result
        finally:
            if self.watchdog is not None:
                self.watchdog.stop()
            if own_handlers:
                self.stop.uninstall()
            if getattr(self, "_lock", None) is not None:
                self._lock.release()
            self.metrics.close()

    def _summarise(self, result: RunResult, seconds: float) -> None:
        """The end-of-run summary: printed, and kept in the run directory (``summary.json``).
        Throughput and MFU count the training steps' time only; ``seconds`` (the whole loop) also holds
        checkpoint saves and evaluations (a 1.6B save with its fp32 optimizer state takes ~40 s on a
        GPU: counted in, 16 steps would read as 6% MFU instead of 44%), reported beside it. The summary
        describes the run: a start that trained nothing (``train_iters`` already reached) keeps it."""
        steps = self.state.iteration - self.start_iteration
        if not steps and self.record is not None and self.record.summary_path.is_file():
            self.log(f"[train] nothing trained by this start: {self.record.summary_path} left as it was")
            return
        tokens = steps * self.layout.global_batch * self.cfg.seq_length
        step_seconds = self._step_seconds
        tok_s = tokens / step_seconds if step_seconds > 0 and steps else 0.0
        mfu = metrics.mfu(tok_s, self.flops_per_token, self.metrics.peak, self.metrics.world_size)
        valid = [e["loss"] for e in result.evals if math.isfinite(e["loss"])]
        last = (
            result.checkpoints[-1]
            if result.checkpoints
            else (self.checkpoint.path if self.checkpoint else None)
        )
        summary = {
            "exit_reason": result.exit_reason,
            "iteration": self.state.iteration,
            "iterations_this_run": steps,
            "tokens_this_run": tokens,
            "training_seconds": round(seconds, 1),
            "step_seconds": round(step_seconds, 3),
            "other_seconds": round(max(seconds - step_seconds, 0.0), 3),  # saves, evaluations
            "tokens_per_s": round(tok_s, 1),
            "mfu": round(mfu, 4) if mfu is not None else None,
            "best_valid_loss": min(valid) if valid else None,
            "last_checkpoint": str(last) if last else None,
        }
        if self.record is not None:
            self.log("[train] summary: " + self.record.finish(summary))
        else:
            self.log("[train] summary: " + " | ".join(f"{k} {v}" for k, v in summary.items()))

    def _save_into(self, result: RunResult, reason: str) -> None:
        if self.save(reason):
            self._last_saved = self.state.iteration

    def _iteration(self, result: RunResult) -> bool:
        """One step (or an iteration of a skip window) and what follows it (rollback, evaluation, save);
        True when a SIGTERM stopped the run."""
        step_number = self.state.iteration + 1
        if in_ranges(step_number, self.skip_windows):
            rec = self._skip_iteration()
            self.metrics.consumed_tokens = self.state.consumed_tokens
        else:
            self.faults.before_step(step_number, dist.get_rank())
            rec = self.train_step(self.data.train)
            self._step_seconds += rec.seconds
            result.losses[rec.iteration] = rec.loss
            result.lrs[rec.iteration] = rec.lr
            self.metrics.record(rec)
        self.watchdog.beat(f"iteration {rec.iteration}")
        if (rec.spike or rec.grad_spike) and self.spikes.should_roll_back(rec.iteration):
            self._roll_back(result)
            return False
        limit = self.cfg.max_nonfinite_steps
        if limit and limit > 0 and self.state.nonfinite_in_a_row >= limit:
            self._collect_save(wait=True)  # a good save still being written is kept
            raise NonFiniteAbort(
                f"{self.state.nonfinite_in_a_row} consecutive non-finite iterations (max_nonfinite_steps="
                f"{limit}) at iteration {self.state.iteration}; stopping without saving. The last good "
                f"checkpoint is {result.checkpoints[-1] if result.checkpoints else 'the one loaded (if any)'}"
            )
        it = self.state.iteration
        # evaluate before saving, so a checkpoint includes the evaluation's data position
        if self.cfg.eval_interval and it % self.cfg.eval_interval == 0 and it < self.cfg.train_iters:
            ev = self.evaluate(self.data.valid, "valid")
            if ev:
                result.evals.append(ev)
        if self._should_save(it):
            self._save_into(result, "periodic")
        self._collect_save(wait=False)
        if not self._stop_agreed():
            return False
        name = self.stop.requested() or "a stop signal on another rank"
        if name == STOP_FILE_REASON:
            name = f"the stop file {self.stop.stop_file}"
        self.log(f"[train] {name} received: saving at iteration {it} and exiting")
        if self._last_saved != it:
            self._save_into(result, (self.stop.requested() or "stop").lower())
        self._collect_save(wait=True)
        return True

    def _roll_back(self, result: RunResult) -> None:
        """Too many spikes in a row: reload this run's last checkpoint (weights, optimizer, counters, RNG,
        data position) in place and skip every iteration from it to the current one. The window is
        written to the run directory at once (and into every later checkpoint), so a crash before the
        next save still resumes into the same stream."""
        self._collect_save(wait=True)
        resumed = self.checkpoint is not None and self.checkpoint.train_state is not None
        target = result.checkpoints[-1] if result.checkpoints else (self.checkpoint.path if resumed else None)
        now = self.state.iteration
        if target is None:
            raise NonFiniteAbort(
                f"{len(self.spikes.recent_skips)} loss spikes within {self.spikes.rollback_window} iterations at "
                f"iteration {now} and no checkpoint of this run to roll back to; stopping without saving"
            )
        info = checkpoint_for_config(self.cfg, target, self.padded_vocab)
        window = (info.iteration + 1, now)
        self.log(
            f"[train] {len(self.spikes.recent_skips)} loss spikes within {self.spikes.rollback_window} "
            f"iterations: rolling back to {info.path} and skipping iterations {window[0]}-{window[1]}"
        )
        load_model_weights(info, self.model)
        self.engine.sync_master_weights()
        self.state.__dict__.update(TrainState().as_dict())
        self._resume(info)
        self._add_skip_windows([window])
        if self.rank == 0 and self.cfg.save:
            record_skip_window(self.cfg.save, window, f"rollback after loss spikes at iteration {now}")
        self.data = self.make_data(
            DataRequest(
                parallel.dp_rank(), parallel.dp_size(), self.layout,
                self.state.consumed_samples, self.state.consumed_valid_samples, self.device,
            )
        )  # fmt: skip
        if not restore_rng(info, log=self.log):
            seed_everything(self.cfg.seed + self.state.iteration)
        self.metrics.consumed_tokens = self.state.consumed_tokens
        self._last_saved = info.iteration

    def _finish(self, result: RunResult) -> None:
        """End of training: final save, validation and test (nothing when there was nothing to train).
        A run none of whose steps applied an update (every one non-finite: NaN weights, a broken data
        shard) is not a success, whatever ``max_nonfinite_steps`` allowed."""
        steps = self.state.iteration - self.start_iteration
        if steps == 0 and self.checkpoint is not None:
            return
        if steps and self.state.nonfinite_iterations - self._nonfinite_at_start >= steps:
            self._collect_save(wait=True)
            raise NonFiniteAbort(
                f"none of the {steps} iterations of this run applied an update (every one non-finite); "
                "stopping without saving"
            )
        if self._last_saved != self.state.iteration:
            self._save_into(result, "end of training")
        self._collect_save(wait=True)
        ev = self.evaluate(self.data.valid, "valid")
        if ev:
            result.evals.append(ev)
        result.test = self.evaluate(self.data.test, "test")


def run(
    cfg: Config,
    make_data: MakeData,
    *,
    padded_vocab: int,
    log: Callable[[str], None] = print,
    fault_hook: FaultHook | None = None,
) -> RunResult:
    """Setup and train; the process groups stay up (callers tear them down)."""
    trainer = Trainer(cfg, make_data, padded_vocab=padded_vocab, log=log, fault_hook=fault_hook)
    trainer.setup()
    return trainer.train()
