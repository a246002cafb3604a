#!/usr/bin/env python
r"""Evaluate a framework checkpoint: validation loss/perplexity on indexed datasets, and lm-eval tasks.

    python tools/evaluate.py CHECKPOINT        # the trainer's validation loss of this checkpoint
    python tools/evaluate.py CHECKPOINT --data data/val_text_document [PREFIX ...] \
        [--seq-length 4096] [--max-tokens 131072 | --batches 100] [--micro-batch-size 4]
    python tools/evaluate.py CHECKPOINT --tasks hellaswag arc_easy [--num-fewshot 0] [--limit 100]
    python tools/evaluate.py CHECKPOINT --tasks my_task --include-path my_tasks/ --no-default-tasks
    python tools/evaluate.py CHECKPOINT --tasks            # the config's eval_tasks
    torchrun --nproc-per-node 2 tools/evaluate.py CHECKPOINT ...   # TP=2 (TP = world size)

Without ``--data`` or ``--tasks`` it reports the validation loss the trainer logs: the run's valid
split built as the trainer builds it (shards, seed, blend, document fields, ``eod_mask_loss``), the
samples of the trainer's evaluation of this checkpoint (``samples_per_eval`` of them, from where the
run's validation iterator stood; see megatron_stablelm/evaluation.py), the model in eval mode. Its
``validation.loss`` is the ``[valid] iteration N | loss`` of the training log for the checkpoint of
iteration N (the final one included). ``--data PREFIX`` instead reads a shard's token stream in
consecutive windows of ``--seq-length`` (default: the config's), every token but the first predicted
once, attention across document boundaries: a number comparable between any two checkpoints, but
not the trainer's; each dataset stops after ``--max-tokens`` predicted tokens (default 131072, 0 for
the whole shard). A progress line goes to stderr. lm-eval is an optional extra (``pip install
lm-eval``); unknown task names, missing shards and unreadable checkpoints are reported before any
model is loaded (the model code is not even imported until the input is known to be good). Results
are printed as one JSON object (first rank only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_stablelm.cli import non_negative_int, positive_int, run_command

if TYPE_CHECKING:  # for the annotation only: like every heavy import here, loaded inside the functions
    from megatron_stablelm.checkpoint.meta import ModelMeta

DEFAULT_MAX_TOKENS = 131072  # per dataset: a perplexity within ~1% in minutes on a CPU, not hours
DEFAULT_MICRO_BATCH = 4  # --data windows and lm-eval requests; validation: the config's eval batch
STREAM_FLAGS = ("seq_length", "max_tokens", "batches")  # what only --data windows take


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint directory, or run directory with a 'latest' file")
    p.add_argument("--data", nargs="+", help="indexed dataset prefixes (PREFIX.bin / PREFIX.idx)")
    p.add_argument("--seq-length", type=positive_int, help="window length (default: the config's seq_length)")
    p.add_argument(
        "--max-tokens",
        type=non_negative_int,
        help=f"--data: predicted tokens per dataset, in whole micro-batches (default {DEFAULT_MAX_TOKENS}; 0: all)",
    )
    p.add_argument("--batches", type=positive_int, help="--data: at most this many micro-batches per dataset")
    p.add_argument(
        "--micro-batch-size",
        type=positive_int,
        help=f"default: the config's eval batch for the validation loss, else {DEFAULT_MICRO_BATCH}",
    )
    p.add_argument("--tasks", nargs="*", help="lm-eval tasks (no names: the config's eval_tasks)")
    p.add_argument("--include-path", nargs="+", help="directories of extra lm-eval task YAMLs")
    p.add_argument("--no-default-tasks", action="store_true", help="index only --include-path tasks (fast)")
    p.add_argument(
        "--num-fewshot",
        type=non_negative_int,
        help="lm-eval: few-shot examples (default: the config's eval_num_fewshot)",
    )
    p.add_argument(
        "--limit",
        type=float,
        help="lm-eval: at most this many (or this fraction of) documents per task (default: the config's eval_limit)",
    )
    p.add_argument("--tokenizer", help="for lm-eval: tokenizer file/directory (default: the config's)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the checkpoint's")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when available, else cpu")
    p.add_argument("--output", help="also write the JSON results here")
    return p


def _lm_eval_summary(results: dict) -> dict:
    """The JSON-serialisable part of lm-eval's results (metrics per task, versions, n-shot)."""
    keep = ("results", "groups", "versions", "n-shot", "higher_is_better")
    return json.loads(json.dumps({k: results[k] for k in keep if k in results}, default=str))


def _checked_inputs(
    args: argparse.Namespace, ckpt: Path, meta: ModelMeta, cfg
) -> tuple[list[str] | None, list[str] | None]:
    """The datasets and lm-eval tasks to run (no datasets and no tasks: the trainer's validation
    loss; no task names: the config's), every shard and ``--seq-length`` (against the checkpoint's
    positions) checked before anything is loaded."""
    from megatron_stablelm.data.indexed import check_shard

    tasks = args.tasks
    if tasks is not None and not tasks:
        tasks = list(cfg.eval_tasks or [])
        if not tasks:
            raise ValueError(f"{ckpt}: the config has no eval_tasks; name the tasks")
    if args.data is None and tasks is None:
        given = [f"--{k.replace('_', '-')}" for k in STREAM_FLAGS if getattr(args, k) is not None]
        if given:
            raise ValueError(
                f"{'/'.join(given)} only apply to --data windows; without --data the trainer's validation "
                "sample is read as the trainer reads it"
            )
    if args.seq_length is not None and args.seq_length > cfg.max_positions:
        raise ValueError(
            f"--seq-length {args.seq_length} exceeds the model's {cfg.max_positions} positions "
            f"(max_position_embeddings of {ckpt})"
        )
    for prefix in args.data or []:
        check_shard(prefix, meta.padded_vocab_size)
    return args.data, tasks


def evaluate_from_args(args: argparse.Namespace) -> int:
    """Check all input (shards or the trainer's valid split, then task names against lm-eval's index),
    load the checkpoint at the launcher's TP size, evaluate, and print the JSON report (first rank
    only)."""
    from megatron_stablelm import checkpoint

    ckpt, meta, cfg = checkpoint.read_header(args.checkpoint)
    data, tasks = _checked_inputs(args, ckpt, meta, cfg)
    import torch.distributed as dist

    from megatron_stablelm import evaluation
    from megatron_stablelm.checkpoint.selection import read_train_state
    from megatron_stablelm.generation import load_checkpoint_model
    from megatron_stablelm.tokenizers import load_tokenizer

    first_rank = not dist.is_initialized() or dist.get_rank() == 0
    manager = tokenizer = sample = None
    if tasks is not None:
        manager = evaluation.check_tasks(tasks, args.include_path, not args.no_default_tasks)
    if tasks is not None or data is None:
        tokenizer = load_tokenizer(cfg, args.tokenizer)
    if data is None and tasks is None:
        sample = evaluation.validation_sample(cfg, tokenizer, read_train_state(ckpt), args.micro_batch_size)
        if first_rank:
            print(
                f"validation: samples {sample.first}-{sample.first + sample.samples - 1} of the valid split, "
                f"those of the trainer's evaluation of iteration {sample.iteration}",
                file=sys.stderr,
            )
    loaded = load_checkpoint_model(ckpt, device=args.device, dtype=args.dtype)
    micro = args.micro_batch_size or DEFAULT_MICRO_BATCH
    report: dict = {"checkpoint": str(ckpt)}
    if sample is not None:
        report["validation"] = evaluation.validation_loss(loaded.model, sample, progress=first_rank)
    if data:
        seq_length = args.seq_length or cfg.seq_length
        report["perplexity"] = evaluation.evaluate_loss(
            loaded.model,
            data,
            seq_length,
            batches=args.batches,
            max_tokens=(DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens) or None,
            micro_batch_size=micro,
            progress=first_rank,
        )
        report["perplexity"]["seq_length"] = seq_length
    if tasks is not None:
        from lm_eval import simple_evaluate

        lm = evaluation.MegatronLM(loaded=loaded, tokenizer=tokenizer, batch_size=micro)
        limit = cfg.eval_limit if args.limit is None else args.limit
        limit = limit if limit is None or limit < 1 else int(limit)
        results = simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=cfg.eval_num_fewshot if args.num_fewshot is None else args.num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
        report["lm_eval"] = _lm_eval_summary(results)
    if first_rank:
        text = json.dumps(report, indent=1)
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(evaluate_from_args, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
