#!/usr/bin/env python
"""Train a StableLM model: ``python train.py CONFIG [CONFIG ...] [--override key=value ...]``.

Works as one process (CPU or one GPU), under ``torchrun --nproc-per-node N train.py ...`` and under
``deepspeed train.py ...`` (which passes ``--local_rank``); the launchers' ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` are read by torch.distributed. The backend is NCCL on
GPU and gloo on CPU unless ``distributed_backend`` says otherwise.

Exit codes: 0 finished (or nothing left to train: said in one line, nothing written), or saved and stopped
on SIGTERM/SIGINT (or SIGTERM before training started);
2 bad config/checkpoint/data (reported before the first step; nothing is written); 3 stopped after
``max_nonfinite_steps`` non-finite steps, or no step of the run applied an update; 4 the hang watchdog
found no progress for ``watchdog_timeout`` seconds (stacks in ``hang_rank<R>.txt``); 130 Ctrl-C before training started, or a second Ctrl-C
(see ``megatron_stablelm/signals.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from megatron_stablelm.cli import add_config_arguments, parse_config_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_config_arguments(p)
    p.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher"
    )
    p.add_argument(
        "--synthetic-data",
        action="store_true",
        help="train on deterministic synthetic tokens instead of the configured data (smoke tests, benchmarks)",
    )
    return parse_config_args(p, argv)


def _tokenizer_and_vocab(cfg, synthetic: bool):
    """(tokenizer or None, padded vocabulary). Synthetic data needs no tokenizer when the config gives
    ``padded_vocab_size``."""
    if synthetic and not cfg.vocab_file:
        return None, cfg.padded_vocab(None)  # ConfigError when the config gives no padded_vocab_size
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


def _check_shards(cfg, vocab_size: int) -> None:
    """The start-up check of every shard the config names (constant time each: both files, the
    ``.idx`` header and size, the ``.bin`` size it implies), before the heavy imports. The results
    are remembered in this process (keyed by each file's size and mtime), so the data building
    (``plan_splits``) reuses them instead of checking again; the full check (pointers, token ids) runs
    there, once per shard version and on one rank (``megatron_stablelm/data/indexed.py``). Shards that
    do not exist yet are listed all at once first, each with the recipe command that makes it."""
    from megatron_stablelm.data import check_shard
    from megatron_stablelm.data.recipes import check_shards_present

    check_shards_present(cfg)
    prefixes = [cfg.data_path] if cfg.data_path else []
    for split in ("train", "valid", "test"):
        prefixes += getattr(cfg, f"{split}_data_paths") or []
    for prefix in dict.fromkeys(prefixes):
        check_shard(prefix, vocab_size, scan_tokens=False)


class LaunchError(ValueError):
    """The launcher's environment (``RANK``, ``WORLD_SIZE``, ...) describes no possible job."""


def _launch_position(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) from the launcher's environment, read without importing torch, and checked:
    a stale ``WORLD_SIZE=2`` left in a shell would otherwise make a one-process start wait forever for
    a peer. Which variables a value came from is named in the error."""
    env = os.environ if env is None else env
    values = {}
    for key, fallback, default in (("RANK", "SLURM_PROCID", "0"), ("WORLD_SIZE", "SLURM_NTASKS", "1")):
        name = key if key in env else fallback if fallback in env else None
        raw = env[name] if name else default
        try:
            values[key] = (int(raw), name)
        except ValueError:
            raise LaunchError(f"{name}={raw!r} in the environment is not a whole number") from None
    (rank, rank_var), (world, world_var) = values["RANK"], values["WORLD_SIZE"]
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(
            f"{rank_var or 'RANK'}={rank} and {world_var or 'WORLD_SIZE'}={world} in the environment describe "
            "no possible job (0 <= rank < world size); a launcher sets them: unset them to run one process"
        )
    if world > 1 and rank_var == "RANK" and "MASTER_ADDR" not in env:
        raise LaunchError(
            f"RANK={rank} WORLD_SIZE={world} in the environment but no MASTER_ADDR to meet the other ranks at: "
            "start through a launcher (deepspeed, torchrun, python -m megatron_stablelm.launch), or unset "
            "RANK and WORLD_SIZE to run one process"
        )
    return rank, world


def _teardown() -> None:
    """Tear down the process groups if this process got as far as creating them."""
    parallel = sys.modules.get("megatron_stablelm.parallel")
    if parallel is not None:
        parallel.destroy()


def _fail(message: str, code: int) -> int:
    """One line on stderr (whatever the message's own line breaks), the process groups torn down."""
    print(f"[train.py] error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    _teardown()
    return code


def _check_inputs(args: argparse.Namespace, rank: int, world: int):
    """Everything that can be checked before importing megatron-core or DeepSpeed: the config (keys,
    types, ranges, combinations), the batch layout at this world size, the output directories and
    whether the model fits its device. Seconds, not minutes; nothing is written."""
    from megatron_stablelm.cli import overrides_from
    from megatron_stablelm.config import load_config, validate_layout

    cfg = load_config(args.configs, overrides_from(args), report_ignored=rank == 0, training=True)
    layout = validate_layout(cfg, world)
    _check_run_resources(cfg, layout.dp_size, rank)
    return cfg, layout


def _check_run_resources(cfg, dp_size: int, rank: int) -> None:
    """``save`` is not held by a live run (its lock, probed: the trainer takes it later), the
    directories the run will write (``save`` on every rank, which all write their shards there; the log
    and TensorBoard directories on rank 0, their only writer) can be created, and the model fits its
    device (``inspect.check_fits``; it imports torch, which the data checks import next anyway).
    ConfigError naming the key, directory, holder or sizes."""
    from megatron_stablelm.checkpoint.run_directory import in_use_reason, unwritable_reason
    from megatron_stablelm.config import ConfigError
    from megatron_stablelm.inspect import check_fits, device_memory

    if cfg.save and (busy := in_use_reason(cfg.save)):
        raise ConfigError(f"key 'save': {busy}")
    directories = {"save": "save", "log_dir": "log", "tensorboard_dir": "TensorBoard"}
    for key, name in directories.items() if rank == 0 else [("save", "save")]:
        directory = getattr(cfg, key)
        if directory and (why := unwritable_reason(directory)):
            raise ConfigError(f"key '{key}': {directory}: the {name} directory is not writable ({why})")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    check_fits(cfg, cfg.padded_vocab_size or 0, dp_size, *device_memory(local_rank))


def _nothing_left(cfg, resume) -> str | None:
    """The line that ends a start whose checkpoint has already reached ``train_iters`` (the README's
    command run again once finished), or None. Such a start ends here, before anything is built or
    written: the run directory, ``summary.json`` included, keeps describing the run, not this start."""
    info = resume.checkpoint
    if info is None or resume.start_iteration(cfg) < cfg.train_iters:
        return None
    return (
        f"[train.py] nothing left to train: {info.path} is at iteration {info.iteration} and train_iters is "
        f"{cfg.train_iters}; nothing was written (raise train_iters to train further)"
    )


def _rank_or_zero() -> int:
    """This process's rank as the launcher says, 0 where it says nothing sensible (reported later)."""
    try:
        return _launch_position()[0]
    except LaunchError:
        return 0


def _train(args: argparse.Namespace, stop) -> int:
    if args.local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)
    try:
        rank, world = _launch_position()
    except LaunchError as err:
        return _fail(str(err), 2)
    from megatron_stablelm.config import ConfigError

    try:
        cfg, layout = _check_inputs(args, rank, world)
    except ConfigError as err:
        return _fail(str(err), 2)

    from megatron_stablelm.cli import training_user_errors

    user_errors = training_user_errors()
    try:  # the tokenizer and every shard's header, still before megatron-core and DeepSpeed
        tokenizer, padded = _tokenizer_and_vocab(cfg, args.synthetic_data)
        if not args.synthetic_data:
            _check_shards(cfg, tokenizer.vocab_size)
        from megatron_stablelm.checkpoint.selection import plan_resume

        resume = plan_resume(cfg, padded)  # where the run starts: checked complete, and this model's
    except user_errors as err:
        return _fail(str(err), 2)
    if (done := _nothing_left(cfg, resume)) is not None:
        if rank == 0:
            print(done, flush=True)
        return 0

    from megatron_stablelm.parallel import adopt_slurm_environment
    from megatron_stablelm.training.loop import NonFiniteAbort, Trainer

    adopt_slurm_environment()  # deepspeed --launcher slurm: one srun task per rank
    try:
        if not args.synthetic_data:  # the mixture: weights, splits, samples per source
            from megatron_stablelm.data import plan_splits

            plan_splits(cfg, tokenizer.vocab_size, layout.dp_size, scan_tokens=False)
        trainer = Trainer(
            cfg,
            _data_factory(cfg, tokenizer, padded, args.synthetic_data),
            padded_vocab=padded,
            stop=stop,
            resume=resume,
            layout=layout,
        )
        trainer.setup()
        result = trainer.train()
    except NonFiniteAbort as err:
        return _fail(str(err), 3)
    except user_errors as err:
        return _fail(str(err), 2)
    except Exception:
        traceback.print_exc()
        _teardown()
        return 1
    if rank == 0:
        last = (
            result.checkpoints[-1]
            if result.checkpoints
            else (trainer.checkpoint.path if trainer.checkpoint else "none")
        )
        print(
            f"[train.py] {result.exit_reason} at iteration {result.state.iteration}; last checkpoint: {last}",
            flush=True,
        )
    _teardown()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_stablelm.signals import StopBeforeTraining, StopRequest
    from megatron_stablelm.training.run_record import capture_output

    stop = StopRequest().install()  # before anything heavy: a signal during start-up stops quietly
    # rank 0's printed lines become the run's train.log (held in memory until the run's record starts)
    console = capture_output() if _rank_or_zero() == 0 else contextlib.nullcontext()
    try:
        with console:
            return _train(args, stop)
    except StopBeforeTraining as stopped:
        print(
            f"[train.py] {stopped.signal_name} before training started: stopped; nothing was written",
            file=sys.stderr,
            flush=True,
        )
        _teardown()
        return 0 if stopped.signal_name == "SIGTERM" else 130
    finally:
        stop.uninstall()


if __name__ == "__main__":
    sys.exit(main())
