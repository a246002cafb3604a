"""What a checkpoint command line (``tools/generate.py``, ``evaluate.py``, ``convert_*``, ``reshard_checkpoint.py``,
``inspect_checkpoint.py``) does around its work,
written once: the user's mistakes (a bad path, config, tokenizer, shard or task name) end in one
``error: ...`` line on stderr and exit status 2 instead of a traceback, and process groups the command
started itself are torn down however it ends, while groups a caller started (a test running the
command inside a TP=2 job) stay up for the caller.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch.distributed as dist

from megatron_stablelm import parallel
from megatron_stablelm.checkpoint import CheckpointError

# The errors a checkpoint command reports as the user's (their messages name the file, key or value).
# ConfigError, ConversionError, TokenizerError, ShardError, GenerationError and EvalTaskError are
# ValueErrors; FileExistsError is a refusal to overwrite.
USER_ERRORS: tuple[type[Exception], ...] = (CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def run_command(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``body(args)``'s exit status, or 2 after printing one of :data:`USER_ERRORS` as ``error: ...``."""
    started_here = not dist.is_initialized()
    try:
        return body(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if started_here and dist.is_initialized():
            parallel.destroy()
