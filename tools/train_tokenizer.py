"""Train a byte-level BPE tokenizer on local text; writes tokenizer.json (and optionally .tiktoken).

Example::

    python tools/train_tokenizer.py --input data/demo/*.jsonl --out data/tok --vocab-size 8192 --tiktoken

Inputs are plain-text files (one document per file) or .jsonl files (the ``--jsonl-key`` field of each
line). Nothing is downloaded. Every input is checked before training, and a tokenizer already in
``--out`` is replaced only with ``--force`` (shards tokenized with it would no longer match).
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from megatron_stablelm.cli import run_command


def input_files(patterns: list[str]) -> list[str]:
    """The files the patterns name, in order; a pattern that matches no file is an error."""
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else [])
        if not matched:
            raise FileNotFoundError(f"--input '{pattern}' matches no file")
        files += matched
    return files


def iter_texts(paths: list[str], key: str) -> Iterator[str]:
    for path in paths:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except json.JSONDecodeError as err:
                            raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
                        if not isinstance(record, dict) or key not in record:
                            raise ValueError(f"{path}:{number}: no '{key}' field (see --jsonl-key)")
                        yield record[key]
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def check_has_text(paths: list[str], key: str) -> None:
    """Refuse inputs without a single non-blank text, which would train a tokenizer of bytes only and
    report success. Reads only up to the first text, so a real corpus costs nothing."""
    if not any(text.strip() for text in iter_texts(paths, key)):
        named = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        raise ValueError(f"--input: no text to train on in {named}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="text or .jsonl files / globs")
    p.add_argument("--jsonl-key", default="text")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--tiktoken", action="store_true", help="also write tokenizer.tiktoken (ranks file)")
    p.add_argument("--force", action="store_true", help="replace a tokenizer already in --out")
    return p


def train_from_args(args: argparse.Namespace) -> int:
    files = input_files(args.input)
    check_has_text(files, args.jsonl_key)
    written = ["tokenizer.json"] + (["tokenizer.tiktoken"] if args.tiktoken else [])
    existing = [str(Path(args.out) / name) for name in written if (Path(args.out) / name).exists()]
    if existing and not args.force:
        raise FileExistsError(f"{', '.join(existing)} exists; refusing to overwrite it (use --force)")
    from megatron_stablelm.data.tokenizer_training import train_bpe_tokenizer

    paths = train_bpe_tokenizer(
        iter_texts(files, args.jsonl_key),
        args.out,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        write_tiktoken=args.tiktoken,
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(train_from_args, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
