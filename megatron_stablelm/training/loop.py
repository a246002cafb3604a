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
* SIGTERM (SLURM's preemption notice) makes every rank finish the current iteration, save, and return
  with ``exit_reason == "sigterm"``;
* configuration, batch arithmetic and checkpoint problems raise before any process group, model or
  checkpoint is touched.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from megatron_stablelm import checkpointing as ckpt
from megatron_stablelm import parallel
from megatron_stablelm.config import Config, ConfigError
from megatron_stablelm.model import build_model
from megatron_stablelm.training import checkpoint as tckpt
from megatron_stablelm.training.engine import (
    BatchLayout,
    batch_layout,
    build_engine,
    effective_zero_stage,
    precision,
    uses_hp_mapping,
)
from megatron_stablelm.training.logging import MetricsLogger, StepRecord, model_flops_per_token, peak_tflops
from megatron_stablelm.training.optimizer import build_optimizer, optimizer_settings
from megatron_stablelm.training.schedules import schedule_from_config


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

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class RunResult:
    exit_reason: str  # "done" | "sigterm"
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


class Trainer:
    """One training job. ``setup()`` does every check and build step; ``train()`` runs it."""

    def __init__(
        self,
        cfg: Config,
        make_data: MakeData,
        *,
        padded_vocab: int,
        log: Callable[[str], None] = print,
        fault_hook: FaultHook | None = None,
        handle_sigterm: bool = True,
    ) -> None:
        self.cfg = cfg
        self.make_data = make_data
        self.padded_vocab = padded_vocab
        self._log = log
        self.fault_hook = fault_hook
        self.handle_sigterm = handle_sigterm
        self._sigterm = False
        self.state = TrainState()
        self.checkpoint: tckpt.CheckpointInfo | None = None

    # ------------------------------------------------------------------ helpers
    def log(self, message: str) -> None:
        if self.rank == 0:
            self._log(message)

    @property
    def rank(self) -> int:
        return world_from_env()[0]

    # ------------------------------------------------------------------ setup
    def preflight(self) -> None:
        """All checks that need no process group: batch arithmetic, schedule, optimizer block,
        checkpoint to load (existence, completeness, architecture). Raises ConfigError/CheckpointError."""
        cfg = self.cfg
        _, world = world_from_env()
        self.layout = batch_layout(cfg, world)
        if self.layout.accumulation != cfg.gradient_accumulation_steps:
            self.log(
                f"[setup] gradient_accumulation_steps = {self.layout.accumulation}, derived from train_batch_size"
            )
            cfg = self.cfg = dataclasses.replace(cfg, gradient_accumulation_steps=self.layout.accumulation)
        self.schedule = schedule_from_config(cfg)
        optimizer_settings(cfg)
        if cfg.padded_vocab_size is None and self.padded_vocab % cfg.model_parallel_size:
            raise ConfigError(
                f"padded vocab {self.padded_vocab} is not divisible by TP={cfg.model_parallel_size}"
            )
        if cfg.checkpoint_factor is not None and cfg.checkpoint_factor <= 0:
            raise ConfigError("key 'checkpoint_factor': must be positive")
        if (cfg.checkpoint_factor or cfg.extra_save_iters) and not cfg.save:
            self.log(
                "[setup] checkpoint_factor/extra_save_iters are set but `save` is not: nothing will be saved"
            )
        self.checkpoint = None
        if cfg.load:
            load = Path(cfg.load)
            fresh_resume_dir = (
                cfg.save is not None
                and load.resolve() == Path(cfg.save).resolve()
                and not (load / ckpt.LATEST_FILE).exists()
                and not (load / ckpt.META_FILE).exists()
                and cfg.iteration is None
            )
            if fresh_resume_dir:
                # load == save with nothing in it yet: the first launch of an auto-resuming job.
                self.log(f"[setup] no checkpoint in {load} yet (load == save): starting from scratch")
            else:
                self.checkpoint = tckpt.inspect_checkpoint(cfg, load, self.padded_vocab)
                if self.checkpoint.train_state is None or cfg.finetune:
                    what = "weights only" if self.checkpoint.train_state is None else "finetune: weights only"
                    self.log(
                        f"[setup] loading {self.checkpoint.path} ({what}); iteration, optimizer and data restart"
                    )
                elif self.checkpoint.iteration >= cfg.train_iters:
                    self.log(
                        f"[setup] checkpoint {self.checkpoint.path} is at iteration {self.checkpoint.iteration} "
                        f">= train_iters={cfg.train_iters}: nothing to train"
                    )
        self.prec = precision(cfg)
        self.zero_stage = effective_zero_stage(cfg)
        if self.zero_stage != cfg.zero_stage:
            self.log(
                f"[setup] {self.prec} runs under ZeRO stage {self.zero_stage} (fp32 master weights and "
                "optimizer states, one checkpoint format); stage 0 is only for fp32"
            )
        self.flops_per_token = model_flops_per_token(cfg, self.padded_vocab)
        self.metrics = MetricsLogger(
            cfg,
            self.flops_per_token,
            peak_tflops(cfg, self.prec),
            world,
            cfg.train_iters,
            rank=self.rank,
            print_fn=self._log,
        )
        self.metrics.open_trackers()

    def setup(self) -> None:
        self.preflight()
        cfg = self.cfg
        backend = cfg.distributed_backend or parallel.default_backend()
        parallel.initialize(cfg.model_parallel_size, backend)
        self.device = (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        seed_everything(cfg.seed)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.prec]
        with torch.device(self.device):
            self.model = build_model(cfg, self.padded_vocab, dtype=dtype, seed=cfg.seed)
        if self.checkpoint is not None:
            tckpt.load_model_weights(self.checkpoint, self.model)
        self.hp = self.zero_stage > 0
        self.base_optimizer = build_optimizer(cfg, self.model, self.device, guarded=not self.hp)
        if not self.hp:
            self.base_optimizer.configure_guard(cfg.gradient_clipping, parallel.tp_group(), None)
        self.engine = build_engine(cfg, self.model, self.base_optimizer, self.layout)
        self.hp = uses_hp_mapping(self.engine)
        resumed = self.checkpoint is not None and self.checkpoint.train_state is not None and not cfg.finetune
        if resumed:
            saved = tckpt.load_training_state(
                self.checkpoint,
                model=self.model,
                engine=self.engine,
                base_optimizer=self.base_optimizer,
                hp=self.hp,
                log=self.log,
            )
            for key in TrainState().as_dict():
                if key in saved and key != "nonfinite_in_a_row":
                    setattr(self.state, key, int(saved[key]))
            if not saved.get("rng_restored"):
                seed_everything(cfg.seed + self.state.iteration)
            self.log(
                f"[setup] resumed from {self.checkpoint.path}: iteration {self.state.iteration}, "
                f"{self.state.consumed_samples} samples consumed (saved at TP={saved.get('tp_size')} "
                f"DP={saved.get('dp_size')}, now TP={parallel.tp_size()} DP={parallel.dp_size()})"
            )
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
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(
            f"[setup] world {dist.get_world_size()} = TP {parallel.tp_size()} × DP {parallel.dp_size()}; "
            f"{self.prec}, ZeRO {self.engine.zero_optimization_stage()}; global batch {self.layout.global_batch} "
            f"= micro {self.layout.micro} × accumulation {self.layout.accumulation} × DP {self.layout.dp_size}; "
            f"{n_params / 1e6:.2f}M parameters on TP rank 0; {self.flops_per_token / 1e9:.3f} GFLOP/token"
        )

    # ------------------------------------------------------------------ one iteration
    def _forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        losses = self.engine(
            batch["tokens"],
            batch.get("position_ids"),
            batch.get("cu_seqlens"),
            batch.get("max_seqlen"),
            labels=batch["labels"],
        )
        mask = batch["loss_mask"].to(losses.dtype)
        count = mask.sum()
        return (losses * mask).sum() / count.clamp(min=1.0), count

    def _set_lr(self, lr: float) -> None:
        for group in self.base_optimizer.param_groups:
            group["lr"] = lr

    def train_step(self, data: Iterator[dict]) -> StepRecord:
        start = time.perf_counter()
        step_number = self.state.iteration + 1
        lr = self.schedule(step_number)
        self._set_lr(lr)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # one host sync per iteration
        for micro in range(self.layout.accumulation):
            batch = _to_device(next(data), self.device)
            loss, _ = self._forward_loss(batch)
            if self.fault_hook is not None:
                loss = self.fault_hook(step_number, micro, loss)
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += loss.detach().double()
        applied = bool(self.engine.was_step_applied())
        # loss: mean over micro-batches, averaged over DP ranks (TP ranks hold the same value); every
        # rank must agree on "non-finite", hence the MAX over the whole world.
        local = float(loss_sum) / self.layout.accumulation
        bad = not math.isfinite(local)
        stats = torch.tensor(
            [0.0 if bad else local, 1.0 if bad else 0.0], dtype=torch.float64, device=self.device
        )
        dist.all_reduce(stats, group=parallel.dp_group())
        flag = torch.tensor([float(stats[1].item() > 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        nonfinite_loss = bool(flag.item() > 0)
        mean_loss = math.nan if nonfinite_loss else float(stats[0].item()) / parallel.dp_size()
        grad_norm = (
            self.engine.get_global_grad_norm()
            if self.hp
            else getattr(self.base_optimizer, "last_grad_norm", None)
        )
        grad_norm = float(grad_norm) if grad_norm is not None else None
        if self.prec == "fp16":
            nonfinite = nonfinite_loss  # overflow skips are the loss scaler's normal business
        else:
            nonfinite = nonfinite_loss or not applied
        if nonfinite and applied:
            self.log(f"[train] WARNING: iteration {step_number}: non-finite loss but the update was applied")
        gb = self.layout.global_batch
        self.state.iteration = step_number
        self.state.consumed_samples += gb
        tokens = gb * self.cfg.seq_length
        self.state.consumed_tokens += tokens
        if not applied:
            self.state.skipped_iterations += 1
        if nonfinite:
            self.state.nonfinite_iterations += 1
            self.state.nonfinite_in_a_row += 1
            self.log(
                f"[train] iteration {step_number}: non-finite {'loss' if nonfinite_loss else 'gradient'} "
                f"(grad norm {grad_norm}); update skipped ({self.state.nonfinite_in_a_row} in a row, "
                f"{self.state.nonfinite_iterations} in total)"
            )
        else:
            self.state.nonfinite_in_a_row = 0
        scale = getattr(self.engine.optimizer, "cur_scale", None) if self.prec == "fp16" else None
        return StepRecord(
            iteration=step_number,
            loss=mean_loss,
            lr=lr,
            grad_norm=grad_norm,
            loss_scale=float(scale) if scale is not None else None,
            seconds=time.perf_counter() - start,
            tokens=tokens,
            skipped=not applied,
        )

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data: Iterator[dict] | None, name: str) -> dict[str, float] | None:
        if data is None or not self.cfg.eval_iters:
            return None
        if name == "valid":
            self.state.consumed_valid_samples += int(self.data.samples_per_eval)
        self.engine.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        try:
            for _ in range(self.cfg.eval_iters * self.layout.accumulation):
                batch = _to_device(next(data), self.device)
                losses = self.engine(
                    batch["tokens"],
                    batch.get("position_ids"),
                    batch.get("cu_seqlens"),
                    batch.get("max_seqlen"),
                    labels=batch["labels"],
                )
                mask = batch["loss_mask"].to(losses.dtype)
                totals[0] += float((losses * mask).sum())
                totals[1] += float(mask.sum())
        except StopIteration:
            pass
        finally:
            self.engine.train()
        totals = totals.to(self.device)
        dist.all_reduce(totals, group=parallel.dp_group())
        loss = float(totals[0] / totals[1].clamp(min=1))
        result = {"iteration": self.state.iteration, "loss": loss, "ppl": math.exp(min(loss, 80.0))}
        self.log(f"[{name}] iteration {self.state.iteration} | loss {loss:.4f} | ppl {result['ppl']:.3f}")
        self.metrics.scalars({f"{name}/loss": loss, f"{name}/ppl": result["ppl"]}, self.state.iteration)
        return result

    # ------------------------------------------------------------------ checkpoints
    def save(self, reason: str) -> str | None:
        if not self.cfg.save:
            return None
        if self.state.nonfinite_in_a_row:
            self.log(
                f"[checkpoint] not saving at iteration {self.state.iteration} ({reason}): the last "
                f"{self.state.nonfinite_in_a_row} iteration(s) were non-finite"
            )
            return None
        start = time.perf_counter()
        path = tckpt.save_training_checkpoint(
            self.cfg.save,
            cfg=self.cfg,
            model=self.model,
            engine=self.engine,
            base_optimizer=self.base_optimizer,
            hp=self.hp,
            padded_vocab=self.padded_vocab,
            train_state=self.state.as_dict(),
        )
        self.log(f"[checkpoint] saved {path} ({reason}) in {time.perf_counter() - start:.1f}s")
        return str(path)

    def _should_save(self, iteration: int) -> bool:
        cfg = self.cfg
        if cfg.checkpoint_factor and iteration % cfg.checkpoint_factor == 0:
            return True
        return bool(cfg.extra_save_iters) and iteration in set(cfg.extra_save_iters)

    def _sigterm_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self._sigterm else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------ the loop
    def train(self) -> RunResult:
        cfg = self.cfg
        result = RunResult("done", self.state, start_iteration=self.start_iteration)
        previous = None
        if self.handle_sigterm:
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            data = self.data.train
            if data is None:
                raise ConfigError("no training data: set train_data_paths (or data_path)")
            self.engine.train()
            last_saved = self.start_iteration if self.checkpoint is not None else None
            while self.state.iteration < cfg.train_iters:
                rec = self.train_step(data)
                result.losses[rec.iteration] = rec.loss
                result.lrs[rec.iteration] = rec.lr
                self.metrics.record(rec)
                limit = cfg.max_nonfinite_steps
                if limit and limit > 0 and self.state.nonfinite_in_a_row >= limit:
                    raise NonFiniteAbort(
                        f"{self.state.nonfinite_in_a_row} consecutive non-finite iterations (max_nonfinite_steps="
                        f"{limit}) at iteration {self.state.iteration}; stopping without saving. The last good "
                        f"checkpoint is {result.checkpoints[-1] if result.checkpoints else 'the one loaded (if any)'}"
                    )
                it = self.state.iteration
                # evaluate before saving, so a checkpoint includes the evaluation's data position
                if cfg.eval_interval and it % cfg.eval_interval == 0 and it < cfg.train_iters:
                    ev = self.evaluate(self.data.valid, "valid")
                    if ev:
                        result.evals.append(ev)
                if self._should_save(it):
                    path = self.save("periodic")
                    if path:
                        result.checkpoints.append(path)
                        last_saved = it
                if self._sigterm_agreed():
                    self.log(f"[train] SIGTERM received: saving at iteration {it} and exiting")
                    if last_saved != it:
                        path = self.save("sigterm")
                        if path:
                            result.checkpoints.append(path)
                    result.exit_reason = "sigterm"
                    return result
            it = self.state.iteration
            if it > self.start_iteration or self.checkpoint is None:
                if last_saved != it:
                    path = self.save("end of training")
                    if path:
                        result.checkpoints.append(path)
                ev = self.evaluate(self.data.valid, "valid")
                if ev:
                    result.evals.append(ev)
                result.test = self.evaluate(self.data.test, "test")
            return result
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self.metrics.close()

    def _on_sigterm(self, signum, frame) -> None:  # noqa: ARG002
        self._sigterm = True


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
