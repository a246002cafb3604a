"""What every command line of the project does the same way, written once.

* The config arguments: ``CONFIG [CONFIG ...] [--override KEY=VALUE ...]`` (:func:`add_config_arguments`,
  :func:`overrides_from`). ``--override`` takes one or more ``KEY=VALUE`` items, may be repeated and
  may come anywhere on the line: a token after it without ``=`` is a config path, not a swallowed
  override, so ``--override seq_length=64 configs/demo.yml`` reads the config.
* Numbers: :func:`positive_int` / :func:`non_negative_int` as argparse types, so a count of 0 or
  below is refused by argparse (one ``error:`` line naming the flag, exit 2) before any work.
* Around a checkpoint command's work (``tools/generate.py``, ``evaluate.py``, ``convert_*``,
  ``reshard_checkpoint.py``, ``inspect_checkpoint.py``, :func:`run_command`): the user's mistakes (a
  bad path, config, tokenizer, shard or task name) end in one ``error: ...`` line on stderr and exit
  status 2 instead of a traceback, and process groups the command started itself are torn down however
  it ends, while groups a caller started (a test running the command inside a TP=2 job) stay up.
* Which errors are the user's: :data:`USER_ERRORS` for the tools, :func:`training_user_errors` for
  ``train.py`` (narrower, see there).

This module imports neither torch nor megatron-core, so a command checks its input in a fraction of a
second before it loads anything heavy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from megatron_stablelm.checkpoint.layout import CheckpointError

# The errors a command reports as the user's (their messages name the file, key or value).
# ConfigError, ConversionError, TokenizerError, ShardError, GenerationError and EvalTaskError are
# ValueErrors; FileExistsError is a refusal to overwrite. A tool's work is short and reads the user's
# input throughout, so any ValueError is taken as bad input; training uses the narrower
# :func:`training_user_errors`.
USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def training_user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input to ``train.py`` (exit 2, one line) rather than a bug (a
    traceback). Only this project's own error types (and a missing file): hours into a run a bare
    ``ValueError`` comes from torch, DeepSpeed or megatron-core and needs its traceback, so
    :data:`USER_ERRORS`' blanket ``ValueError`` would hide it. The data errors are added when the data
    pipeline imports (``--synthetic-data`` runs without it)."""
    from megatron_stablelm.config import ConfigError

    errors: tuple[type[BaseException], ...] = (ConfigError, CheckpointError, FileNotFoundError)
    try:
        from megatron_stablelm.data import DataError, ShardError, TokenizerError
    except ImportError:
        return errors
    return (*errors, DataError, ShardError, TokenizerError)


OVERRIDE_HELP = (
    "config overrides, values read as YAML (e.g. --override train_iters=10 save=runs/x); "
    "repeatable, anywhere on the line"
)


class _OverrideAction(argparse.Action):
    """Collects ``KEY=VALUE`` items into ``dest``; items without ``=`` go back to the config paths."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        overrides = list(getattr(namespace, self.dest, None) or [])
        strays = list(getattr(namespace, "_stray_configs", None) or [])
        for item in values:
            (overrides if "=" in item else strays).append(item)
        setattr(namespace, self.dest, overrides)
        namespace._stray_configs = strays


def add_config_arguments(parser: argparse.ArgumentParser, *, dest: str = "configs") -> None:
    """``CONFIG [CONFIG ...]`` (into ``dest``) and ``--override/-o KEY=VALUE ...``, in any order; read
    the command line with :func:`parse_config_args`, the overrides with :func:`overrides_from`."""
    parser.add_argument(
        dest, nargs="*", metavar="CONFIG", help="YAML config files, merged in order (later wins)"
    )
    parser.add_argument(
        "--override",
        "-o",
        nargs="+",
        action=_OverrideAction,
        default=[],
        metavar="KEY=VALUE",
        help=OVERRIDE_HELP,
    )


def parse_config_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *, dest: str = "configs"
) -> argparse.Namespace:
    """Parse a command line set up by :func:`add_config_arguments`: options and config paths may be
    intermixed, config paths that followed ``--override`` rejoin the others, all in command-line order
    (the merge order), and at least one config is required (argparse's error, exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_intermixed_args(argv)
    configs = list(getattr(args, dest) or []) + (vars(args).pop("_stray_configs", None) or [])
    if not configs:
        parser.error("at least one CONFIG is required")
    setattr(args, dest, sorted(configs, key=argv.index))
    return args


def overrides_from(args: argparse.Namespace) -> list[str]:
    """The ``KEY=VALUE`` overrides of a namespace built by :func:`add_config_arguments`, in order."""
    return list(getattr(args, "override", None) or [])


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a size, a count or an interval of 0 cannot work), so argparse
    refuses a bad value with one ``error:`` line naming the flag, before the command does anything."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (a count where 0 is meaningful)."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def run_command(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``body(args)``'s exit status, or 2 after printing one of :data:`USER_ERRORS` as ``error: ...``."""
    started_here = not _process_group_up()
    try:
        return body(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if started_here and _process_group_up():
            from megatron_stablelm import parallel

            parallel.destroy()


def _process_group_up() -> bool:
    """Whether torch.distributed has a group, without importing torch when nothing has yet."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()
