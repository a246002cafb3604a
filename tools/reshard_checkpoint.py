#!/usr/bin/env python
"""Change the tensor-parallel size of a checkpoint (model shards and, by default, optimizer state).

    python tools/reshard_checkpoint.py SRC DST --tp N [--no-optimizer] [--skip-unknown] [--force]

SRC is a checkpoint directory or a run directory with a ``latest`` file. DST becomes a run directory
holding the checkpoint under the same ``iter_NNNNNNN`` name plus a ``latest`` pointer, so a training
config can ``load: DST`` and resume. DST must not exist unless ``--force``, which replaces it only
once the new one is complete (as ``tools/convert_to_hf.py --force`` does). What happens to each file is described in
:mod:`megatron_stablelm.checkpoint.reshard`.
"""

from __future__ import annotations

import argparse
import sys

from megatron_stablelm.checkpoint.reshard import reshard_checkpoint
from megatron_stablelm.cli import positive_int, run_command


def _reshard(args: argparse.Namespace) -> int:
    out = reshard_checkpoint(
        args.src,
        args.dst,
        args.tp,
        optimizer=not args.no_optimizer,
        skip_unknown=args.skip_unknown,
        force=args.force,
    )
    print(f"wrote {out} (TP={args.tp})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory, or run directory with a 'latest' file")
    p.add_argument("dst", help="new run directory (must not exist unless --force)")
    p.add_argument("--tp", type=positive_int, required=True, help="the new tensor-parallel size")
    p.add_argument("--no-optimizer", action="store_true", help="leave the optimizer state out")
    p.add_argument("--skip-unknown", action="store_true", help="leave out files this tool does not know")
    p.add_argument("--force", action="store_true", help="replace DST (only once the new one is complete)")
    return run_command(_reshard, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
