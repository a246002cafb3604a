#!/usr/bin/env python
"""Show what a framework checkpoint holds: training progress, config, and every tensor.

    python tools/inspect_checkpoint.py CHECKPOINT [--no-norms] [--json]

CHECKPOINT is a checkpoint directory or a run directory with a ``latest`` file. Printed: the
iteration and consumed samples/tokens (from the trainer's ``train_state.json``; a weights-only
checkpoint, e.g. one converted from Hugging Face, has none), the TP size, dtype and padded vocabulary,
an architecture summary of the config, the files with their sizes (optimizer shards, RNG states), and
each whole-model tensor (merged over the TP shards) with its shape, dtype and L2 norm. Norms read every
tensor once, one at a time; ``--no-norms`` reads only the metadata. Nothing is modified.
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_stablelm.checkpoint.describe import describe_checkpoint, format_report
from megatron_stablelm.cli import run_command


def _inspect(args: argparse.Namespace) -> int:
    info = describe_checkpoint(args.checkpoint, norms=not args.no_norms)
    print(json.dumps(info, indent=1, default=str) if args.json else format_report(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--no-norms", action="store_true", help="metadata only; do not read the tensors")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return run_command(_inspect, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
