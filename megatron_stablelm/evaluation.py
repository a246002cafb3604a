"""Evaluation of a framework checkpoint: validation loss/perplexity on indexed shards, and lm-eval tasks.

The trainer's validation loss (``tools/evaluate.py CHECKPOINT``, :func:`validation_sample` and
:func:`validation_loss`): the run's valid split as the trainer builds it, the samples of the trainer's
evaluation of that checkpoint (:func:`evaluation_start`), the same batch fields and loss mask, the model
in eval mode; so the number equals the ``[valid]`` loss of the training log. A shard's token stream
read in order (below) is a different sample, without document boundaries: on the demo it differs by
about 0.5-0.8 nats, which is why it is not the default.

Perplexity (``tools/evaluate.py --data``) reads each ``PREFIX.bin`` as the one token stream it is
(documents back to back, EOD-separated, as the trainer sees them) and cuts it into windows of
``seq_length + 1`` tokens that overlap by one, so every token but the first is predicted exactly once,
in order, with no sampling or shuffling: the number is reproducible and comparable across runs, TP
sizes and tokenizer-identical checkpoints. The loss is the model's vocab-parallel cross-entropy (the
training loss path); it is averaged over tokens, per dataset and over all of them.

:class:`MegatronLM` adapts a checkpoint to EleutherAI's ``lm-eval`` (an optional extra, ``pip install
lm-eval``): ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until``. Log-probabilities are
computed vocab-parallel by the training loss's kernel (``kernels/cross_entropy.py``: the log-sum-exp
and the greedy check are reduced over the TP group, never gathering ``[tokens, V]`` logits), so long
documents with a 100k vocabulary fit. Every TP rank runs the same requests; lm-eval's own data
parallelism is not used. Task names are checked against lm-eval's index (built-in tasks plus
``include_path``) before any model is loaded, so a typo fails at once.
"""

from __future__ import annotations

import difflib
import itertools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from megatron_stablelm import parallel
from megatron_stablelm.config import Config
from megatron_stablelm.data.indexed import check_shard
from megatron_stablelm.generation import (
    LoadedModel,
    SamplingParams,
    generate,
    load_checkpoint_model,
    load_tokenizer,
)
from megatron_stablelm.kernels.cross_entropy import vocab_parallel_target_log_prob
from megatron_stablelm.metrics import perplexity
from megatron_stablelm.model import StableLMModel
from megatron_stablelm.tokenizers import Tokenizer

__all__ = [
    "EvalTaskError",
    "HAVE_LM_EVAL",
    "MegatronLM",
    "ValidationSample",
    "check_tasks",
    "evaluate_loss",
    "evaluation_start",
    "run_eval_tasks",
    "token_windows",
    "validation_loss",
    "validation_sample",
]


class EvalTaskError(ValueError):
    """An lm-eval task that does not exist, or lm-eval missing; raised before any model is loaded."""


# ------------------------------------------------------------------------------------------- perplexity
def token_windows(prefix: str, seq_length: int, vocab_size: int | None = None) -> list[np.ndarray]:
    """The shard's token stream in windows of ``seq_length + 1`` tokens, consecutive windows sharing
    one token (the last window may be shorter). The shard is checked first (``ShardError`` naming the
    file for a missing or malformed shard, or ids beyond ``vocab_size``)."""
    info = check_shard(prefix, vocab_size, scan_tokens=vocab_size is not None)
    stream = np.memmap(prefix + ".bin", dtype=info.dtype, mode="r") if info.num_tokens else np.zeros(0)
    windows = []
    for start in range(0, max(info.num_tokens - 1, 0), seq_length):
        windows.append(np.asarray(stream[start : start + seq_length + 1], dtype=np.int64))
    return windows


@torch.no_grad()
def evaluate_loss(
    model: StableLMModel,
    prefixes: Sequence[str],
    seq_length: int,
    *,
    batches: int | None = None,
    max_tokens: int | None = None,
    micro_batch_size: int = 4,
    vocab_size: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Token-averaged loss and perplexity of each indexed dataset (``PREFIX`` of ``.bin``/``.idx``)
    and over all of them. Per dataset, ``batches`` caps the micro-batches and ``max_tokens`` the
    predicted tokens (whole micro-batches: the first ones reaching it); ``progress`` shows a bar per
    dataset on stderr. Every shard is checked before the first forward pass. Call on every TP rank."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    all_windows = {prefix: token_windows(prefix, seq_length, vocab_size) for prefix in prefixes}
    model.eval()
    device = next(model.parameters()).device
    results: dict[str, Any] = {"datasets": {}}
    total_loss, total_tokens = 0.0, 0
    for prefix, windows in all_windows.items():
        every = _micro_batches(windows, seq_length, micro_batch_size)
        groups = _first_batches(every, batches, max_tokens)
        loss_sum, tokens = 0.0, 0
        bar = tqdm(groups, desc=prefix, unit="batch", disable=not progress, file=sys.stderr)
        for group in bar:
            batch = torch.from_numpy(np.stack(group)).to(device)
            losses = model(batch[:, :-1], labels=batch[:, 1:])
            loss_sum += losses.double().sum().item()
            tokens += losses.numel()
            bar.set_postfix(loss=f"{loss_sum / tokens:.4f}", tokens=tokens, refresh=False)
        results["datasets"][prefix] = _summary(loss_sum, tokens)
        results["datasets"][prefix]["complete"] = len(groups) == len(every)
        total_loss += loss_sum
        total_tokens += tokens
    results.update(_summary(total_loss, total_tokens))
    return results


def _micro_batches(
    windows: list[np.ndarray], seq_length: int, micro_batch_size: int
) -> list[list[np.ndarray]]:
    """Full windows in micro-batches, then each shorter (last) window alone."""
    full = [w for w in windows if len(w) == seq_length + 1]
    groups = [full[i : i + micro_batch_size] for i in range(0, len(full), micro_batch_size)]
    return groups + [[w] for w in windows if len(w) != seq_length + 1]


def _first_batches(
    groups: list[list[np.ndarray]], batches: int | None, max_tokens: int | None
) -> list[list[np.ndarray]]:
    """At most ``batches`` micro-batches, and only the first ones that together predict at least
    ``max_tokens`` tokens."""
    if batches is not None:
        groups = groups[:batches]
    if max_tokens is None:
        return groups
    kept, tokens = [], 0
    for group in groups:
        if tokens >= max_tokens:
            break
        kept.append(group)
        tokens += sum(len(w) - 1 for w in group)
    return kept


def _summary(loss_sum: float, tokens: int) -> dict[str, Any]:
    if tokens == 0:
        return {"loss": None, "perplexity": None, "tokens": 0}
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}


# ----------------------------------------------------------------------------- the trainer's validation
@dataclass
class ValidationSample:
    """The samples of the trainer's valid split that one of its evaluations read, as micro-batches."""

    batches: Iterator[dict]
    first: int  # position of the first sample in the valid split's (seeded, blended) order
    samples: int  # samples_per_eval: eval_iters × eval micro-batch × accumulation × DP of the run
    micro_batch_size: int
    iteration: int  # the checkpoint's iteration


def evaluation_start(cfg: Config, train_state: dict | None, per_eval: int) -> int:
    """First sample (in the valid order) of the trainer's evaluation of the model a checkpoint holds.

    Why not simply the first samples: the trainer's validation iterator continues across evaluations,
    so each logged ``[valid]`` loss reads its own ``per_eval`` samples, and only those give the same
    number. A checkpoint's ``consumed_valid_samples`` says where the iterator stood at the save, and
    the trainer's order of events (``Trainer._iteration``, ``Trainer._finish``) says which evaluation
    that was: at an ``eval_interval`` iteration before ``train_iters`` it evaluates, then saves (the
    evaluation read the samples just before the count); at ``train_iters`` it saves, then evaluates
    (the final evaluation reads the samples from the count). Any other checkpoint was not evaluated:
    its sample is the one the next evaluation reads. A weights-only checkpoint gets the first one.
    """
    state = train_state or {}
    consumed = int(state.get("consumed_valid_samples", 0))
    iteration = int(state.get("iteration", 0))
    evaluated_then_saved = (
        bool(cfg.eval_interval)
        and iteration % cfg.eval_interval == 0
        and iteration < (cfg.train_iters or 0)
        and consumed >= per_eval
    )
    return consumed - per_eval if evaluated_then_saved else consumed


def validation_sample(
    cfg: Config, tokenizer: Tokenizer, train_state: dict | None, micro_batch_size: int | None = None
) -> ValidationSample:
    """The trainer's valid split built as the trainer builds it (same shards, seed, sizes and batch
    fields, at the run's data-parallel size from ``train_state``; a weights-only checkpoint: DP 1),
    and the micro-batches of the evaluation :func:`evaluation_start` picks. Every shard is checked and
    every index built (or read from the run's cache) here, before any model is loaded."""
    from megatron_stablelm.data import build_datasets, samples_per_eval
    from megatron_stablelm.data.loader import Collate, make_loader

    no_validation = (
        "the checkpoint's config describes no trainer's validation (it needs train_iters, eval_iters > 0 "
        "and valid_data_paths or a valid share of 'split' of data_path); give --data PREFIX or --tasks"
    )
    if not (cfg.train_iters and cfg.eval_iters and (cfg.valid_data_paths or cfg.data_path)):
        raise ValueError(no_validation)
    state = train_state or {}
    datasets = build_datasets(cfg, tokenizer, dp_size=int(state.get("dp_size", 1)))
    per_eval = samples_per_eval(cfg, datasets.layout)
    if datasets.valid is None:
        raise ValueError(no_validation)
    micro = micro_batch_size or cfg.eval_micro_batch
    if per_eval % micro:
        raise ValueError(
            f"--micro-batch-size {micro} does not divide the {per_eval} samples of an evaluation"
        )
    first = evaluation_start(cfg, state, per_eval)
    collate = Collate(
        tokenizer.eod,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
    )
    loader = make_loader(datasets.valid, collate, consumed=first, micro=micro, dp_rank=0, dp_size=1)
    batches = itertools.islice(loader, per_eval // micro)
    return ValidationSample(batches, first, per_eval, micro, int(state.get("iteration", 0)))


@torch.no_grad()
def validation_loss(
    model: StableLMModel, sample: ValidationSample, *, progress: bool = False
) -> dict[str, Any]:
    """The loss the trainer logs for ``sample``: the model in eval mode, the training loss path with the
    batch's document fields, the token mean over the counted (``loss_mask``) targets."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum, tokens = 0.0, 0
    total = sample.samples // sample.micro_batch_size
    bar = tqdm(sample.batches, "validation", total, unit="batch", disable=not progress, file=sys.stderr)
    for batch in bar:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        losses = model(
            batch["tokens"], batch["position_ids"], batch.get("cu_seqlens"), batch.get("max_seqlen"),
            labels=batch["labels"],
        )  # fmt: skip
        mask = batch["loss_mask"].to(losses.dtype)
        loss_sum += float((losses * mask).sum())
        tokens += int(mask.sum())
        bar.set_postfix(loss=f"{loss_sum / max(tokens, 1):.4f}", refresh=False)
    return {
        **_summary(loss_sum, tokens),
        "first_sample": sample.first,
        "samples": sample.samples,
        "iteration": sample.iteration,
    }


# ------------------------------------------------------------------------------------------------ lm-eval
try:
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register_model

    HAVE_LM_EVAL = True
except ImportError:  # optional extra
    _LMBase = object
    HAVE_LM_EVAL = False

    def _register_model(*names):
        return lambda cls: cls


_INSTALL_HINT = "lm-eval is not installed; install the optional extra with `pip install lm-eval`"


def _require_lm_eval() -> None:
    if not HAVE_LM_EVAL:
        raise EvalTaskError(_INSTALL_HINT)


def _task_manager(include_path: str | Path | Sequence[str | Path] | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    paths = None
    if include_path is not None:
        paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path)]
        for p in paths:
            if not Path(p).exists():
                raise EvalTaskError(f"lm-eval include path '{p}' does not exist")
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def check_tasks(
    tasks: Sequence[str],
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
):
    """lm-eval's task manager, after checking that every name in ``tasks`` is a task, group or tag it
    knows; raises :class:`EvalTaskError` naming the unknown ones (with near matches)."""
    _require_lm_eval()
    if not tasks:
        raise EvalTaskError("no lm-eval task given (pass task names, or set eval_tasks in the config)")
    manager = _task_manager(include_path, include_defaults)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3)
            hints.append(f"'{name}'" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = f" or under {include_path}" if include_path else ""
        raise EvalTaskError(f"unknown lm-eval task(s) {'; '.join(hints)}: not among lm-eval's tasks{where}")
    return manager


@_register_model("megatron_stablelm")
class MegatronLM(_LMBase):
    """A framework checkpoint as an ``lm_eval.api.model.LM``.

    ``MegatronLM(checkpoint="runs/x")`` loads at the launcher's TP size; ``MegatronLM(loaded=...,
    tokenizer=...)`` wraps a model already in memory (e.g. inside the trainer). Also registered as
    ``--model megatron_stablelm --model_args checkpoint=PATH`` for lm-eval's own command line.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        *,
        loaded: LoadedModel | None = None,
        tokenizer: Tokenizer | str | Path | None = None,
        batch_size: int | str = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        device: str | None = None,
        dtype: str | None = None,
        seed: int | str = 0,
        **_: Any,  # lm-eval passes max_batch_size etc. to every model
    ) -> None:
        _require_lm_eval()
        super().__init__()
        if loaded is None:
            if checkpoint is None:
                raise ValueError("MegatronLM needs a checkpoint path or a loaded model")
            loaded = load_checkpoint_model(checkpoint, device=device, dtype=dtype)
        self.loaded = loaded
        self.model = loaded.model
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = load_tokenizer(loaded.cfg, tokenizer)
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = int(max_length) if max_length is not None else loaded.cfg.max_positions
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _token_logprobs(
        self, tokens: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each target and whether it is the argmax, vocab-parallel: ``[b, s]`` each."""
        group = parallel.tp_group() if parallel.tp_size() > 1 else None
        return vocab_parallel_target_log_prob(self.model(tokens), targets, group)

    def _score(self, requests: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
        """Each request is (inputs, targets, n): the sum of log p(target) over the last ``n`` positions
        and whether all of them are greedy. Longest first, right-padded (causal: padding never leaks)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
        device = next(self.model.parameters()).device
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            width = len(requests[chunk[0]][0])
            tokens = torch.zeros(len(chunk), width, dtype=torch.long)
            targets = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, i in enumerate(chunk):
                inp, tgt, _ = requests[i]
                tokens[row, : len(inp)] = torch.tensor(inp)
                targets[row, : len(tgt)] = torch.tensor(tgt)
            logprob, greedy = self._token_logprobs(tokens.to(device), targets.to(device))
            for row, i in enumerate(chunk):
                inp, _, n = requests[i]
                lp, gr = logprob[row, len(inp) - n : len(inp)], greedy[row, len(inp) - n : len(inp)]
                out[i] = (float(lp.double().sum()), bool(gr.all()))
        return out

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # a context's trailing spaces belong to the continuation (the word boundary is its first token)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.tokenizer.eod], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        if whole[: len(ctx)] != ctx:  # tokens merged across the boundary: encode the parts apart
            return ctx, self.tokenizer.encode(continuation)
        return ctx, whole[len(ctx) :]

    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Token-level ``loglikelihood``: the context is cut from the left to fit ``max_length``."""
        requests = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("an lm-eval continuation encoded to no tokens")
            seq = (ctx + cont)[-(self.max_length + 1) :]
            requests.append((seq[:-1], seq[1:], min(len(cont), len(seq) - 1)))
        return self._score(requests)

    def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
        """lm-eval's ``(context, continuation)`` requests → (sum log p(continuation), all greedy)."""
        pairs = [self._encode_pair(*r.args) for r in requests]
        results = self.loglikelihood_tokens(pairs)
        for r, res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", r.args, res)
        return results

    def rolling_windows(self, tokens: list[int]) -> list[tuple[list[int], list[int], int]]:
        """Score every token once, conditioned on EOD then as much preceding text as fits: the targets
        are cut into chunks of ``max_length``; each chunk's window is the ``max_length`` tokens ending
        at it (so later chunks see a full context), scoring only the chunk's own tokens."""
        seq = [self.tokenizer.eod, *tokens]
        windows = []
        for s0 in range(0, len(tokens), self.max_length):
            e0 = min(s0 + self.max_length, len(tokens))
            a = max(0, e0 - self.max_length)
            windows.append((seq[a:e0], seq[a + 1 : e0 + 1], e0 - s0))
        return windows

    def loglikelihood_rolling(self, requests: list) -> list[float]:
        """Whole-document log-likelihood of each ``(text,)`` request (see :meth:`rolling_windows`)."""
        results = []
        for r in requests:
            (text,) = r.args[:1]
            windows = self.rolling_windows(self.tokenizer.encode(text))
            total = sum(lp for lp, _ in self._score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) continuation of each ``(context, gen_kwargs)``, cut at
        the first ``until`` string; stops at EOD and ``max_gen_toks``."""
        results = []
        eod = self.tokenizer.eod
        for r in requests:
            context, gen_kwargs = r.args[0], dict(r.args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            max_new = max(1, min(max_new, self.max_length - 1))
            temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
            sample = bool(gen_kwargs.pop("do_sample", False)) and temperature > 0
            params = SamplingParams(
                greedy=not sample,
                temperature=temperature if sample else 1.0,
                top_k=int(gen_kwargs.pop("top_k", 0) or 0),
                top_p=float(gen_kwargs.pop("top_p", 1.0) or 1.0),
            )
            prompt = self.tokenizer.encode(context) if context else [eod]
            prompt = prompt[-(self.max_length - max_new) :]

            def stop(new: list[int], until=until) -> bool:
                return bool(until) and any(u in self.tokenizer.decode(new) for u in until)

            new = generate(
                self.model,
                [prompt],
                max_new,
                params,
                eos_id=eod,
                stop=stop,
                seed=self.seed,
                vocab_limit=self.tokenizer.vocab_size,
            )[0]
            if new and new[-1] == eod:
                new = new[:-1]
            text = self.tokenizer.decode(new)
            for u in until:
                if u and u in text:
                    text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", r.args, text)
            results.append(text)
        return results


def run_eval_tasks(
    model: str | Path | MegatronLM,
    tasks: Sequence[str],
    *,
    include_path: str | Path | Sequence[str | Path] | None = None,
    include_defaults: bool = True,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    tokenizer: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on a checkpoint path (or an adapter) and return lm-eval's results dict.
    Task names are checked before the checkpoint is loaded."""
    from lm_eval import simple_evaluate

    manager = check_tasks(tasks, include_path, include_defaults)
    lm = (
        model
        if isinstance(model, MegatronLM)
        else MegatronLM(model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    )
    return simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )
