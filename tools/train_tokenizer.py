"""Train a byte-level BPE tokenizer on local text; writes tokenizer.json (and optionally .tiktoken).

Example::

    python tools/train_tokenizer.py --input data/demo/*.jsonl --out data/tok --vocab-size 8192 --tiktoken

Inputs are plain-text files (one document per file) or .jsonl files (the ``--jsonl-key`` field of each
line). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Iterator

from megatron_stablelm.data.tokenizer_training import train_bpe_tokenizer


def iter_texts(patterns: list[str], key: str) -> Iterator[str]:
    for pattern in patterns:
        paths = sorted(glob.glob(pattern)) or [pattern]
        for path in paths:
            if path.endswith(".jsonl"):
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            yield json.loads(line)[key]
            else:
                with open(path, encoding="utf-8", errors="replace") as f:
                    yield f.read()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text or .jsonl files / globs")
    p.add_argument("--jsonl-key", default="text")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--tiktoken", action="store_true", help="also write tokenizer.tiktoken (ranks file)")
    args = p.parse_args(argv)
    paths = train_bpe_tokenizer(
        iter_texts(args.input, args.jsonl_key),
        args.out,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        write_tiktoken=args.tiktoken,
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
