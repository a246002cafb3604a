#!/usr/bin/env python
"""Train a StableLM model: ``python train.py CONFIG [CONFIG ...] [--override key=value ...]``.

Works as one process (CPU or one GPU), under ``torchrun --nproc-per-node N train.py ...`` and under
``deepspeed train.py ...`` (which passes ``--local_rank``); the launchers' ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` are read by torch.distributed. The backend is NCCL on
GPU and gloo on CPU unless ``distributed_backend`` says otherwise.

Exit codes: 0 finished (or saved and stopped on SIGTERM), 2 bad config/checkpoint/data (reported
before the first step; nothing is written), 3 stopped after ``max_nonfinite_steps`` non-finite steps.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("configs", nargs="+", help="YAML config files, merged in order (later wins)")
    p.add_argument(
        "--override",
        "-o",
        action="append",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, YAML-typed values (e.g. --override train_iters=10 save=ckpt/run1)",
    )
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    p.add_argument(
        "--synthetic-data",
        action="store_true",
        help="train on deterministic synthetic tokens instead of the configured data (smoke tests, benchmarks)",
    )
    return p.parse_args(argv)


def _tokenizer_and_vocab(cfg, synthetic: bool):
    """(tokenizer or None, padded vocabulary). Synthetic data needs no tokenizer when the config gives
    ``padded_vocab_size``."""
    from megatron_stablelm.config import ConfigError

    if synthetic and not cfg.vocab_file:
        if cfg.padded_vocab_size is None:
            raise ConfigError("--synthetic-data needs padded_vocab_size (or a tokenizer vocab_file)")
        return None, cfg.padded_vocab(None)
    from megatron_stablelm.data import build_tokenizer

    tokenizer = build_tokenizer(cfg)
    return tokenizer, cfg.padded_vocab(tokenizer.vocab_size)


def _data_factory(cfg, tokenizer, padded: int, synthetic: bool):
    """``make_data(request)`` for the trainer: the real pipeline, or deterministic synthetic tokens."""

    def make_data(req):
        if synthetic:
            from megatron_stablelm.training.synthetic import SyntheticData

            vocab_size = tokenizer.vocab_size if tokenizer is not None else padded
            return SyntheticData(
                cfg.seq_length,
                vocab_size,
                req.layout.micro,
                req.layout.accumulation,
                req.dp_rank,
                req.dp_size,
                cfg.seed,
                eval_iters=cfg.eval_iters,
            ).iterators(req.consumed_train_samples, req.consumed_valid_samples)
        from megatron_stablelm.data import build_data_iterators

        return build_data_iterators(
            cfg,
            tokenizer,
            dp_rank=req.dp_rank,
            dp_size=req.dp_size,
            consumed_train_samples=req.consumed_train_samples,
            consumed_valid_samples=req.consumed_valid_samples,
            device=req.device,
        )

    return make_data


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (exit 2, one line) rather than a bug (traceback)."""
    from megatron_stablelm.checkpoint import CheckpointError
    from megatron_stablelm.config import ConfigError

    errors: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, FileNotFoundError)
    try:
        from megatron_stablelm.data import DataError, ShardError, TokenizerError
    except ImportError:  # the data pipeline is optional for --synthetic-data
        return errors
    return (*errors, DataError, ShardError, TokenizerError)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    from megatron_stablelm.parallel import adopt_slurm_environment

    adopt_slurm_environment()  # deepspeed --launcher slurm: one srun task per rank

    # Imports after argument parsing so that --help is instant.
    from megatron_stablelm import parallel
    from megatron_stablelm.config import load_config
    from megatron_stablelm.training.loop import NonFiniteAbort, Trainer, world_from_env

    rank = world_from_env()[0]
    user_errors = _user_errors()

    def fail(message: str, code: int) -> int:
        print(f"[train.py] error: {message}", file=sys.stderr, flush=True)
        parallel.destroy()
        return code

    try:
        overrides = [item for group in args.override for item in group]
        cfg = load_config(args.configs, overrides, report_ignored=rank == 0, training=True)
        tokenizer, padded = _tokenizer_and_vocab(cfg, args.synthetic_data)
        trainer = Trainer(
            cfg, _data_factory(cfg, tokenizer, padded, args.synthetic_data), padded_vocab=padded
        )
        trainer.setup()
        result = trainer.train()
    except NonFiniteAbort as err:
        return fail(str(err), 3)
    except user_errors as err:
        return fail(str(err), 2)
    except Exception:
        traceback.print_exc()
        parallel.destroy()
        return 1
    if rank == 0:
        last = result.checkpoints[-1] if result.checkpoints else "none"
        print(
            f"[train.py] {result.exit_reason} at iteration {result.state.iteration}; last checkpoint: {last}",
            flush=True,
        )
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
