"""Tokenize corpora into Megatron/GPT-NeoX indexed shards (``PREFIX_text_document.bin`` / ``.idx``).

Example::

    python tools/preprocess_data.py --input 'data/raw/*.jsonl.zst' --output-prefix data/web \
        --tokenizer-type TiktokenTokenizer --vocab-file arcade100k.tiktoken --append-eod --workers 16

The shards are megatron-core's mmap indexed-dataset format, readable by its ``IndexedDataset`` and
byte for byte what Megatron-LM's ``tools/preprocess_data.py`` writes for the same ids. Bad input (a
malformed line, a missing file or tokenizer, an input without tokens, an output that cannot be
written) prints one ``error: ...`` line and exits 2; nothing on disk changes.
"""

from __future__ import annotations

import argparse
import sys

from megatron_stablelm.data.indexed import ShardError
from megatron_stablelm.data.preprocess import BadInputError, preprocess
from megatron_stablelm.tokenizers import TOKENIZER_TYPES, TokenizerError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files or globs: .jsonl, .jsonl.gz, .jsonl.zst, .parquet, or a datasets directory",
    )
    p.add_argument("--jsonl-keys", nargs="+", default=["text"], help="fields to tokenize (one shard each)")
    p.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file", required=True, help="tokenizer.json or .tiktoken ranks file")
    p.add_argument("--merge-file", default=None, help="accepted for GPT-NeoX compatibility; unused")
    p.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=10000, help="documents between progress updates")
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed lines")
    p.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="GPT-NeoX compatibility")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--allow-empty", action="store_true", help="write a shard without tokens instead of failing"
    )
    args = p.parse_args(argv)
    try:
        stats = preprocess(
            args.input,
            args.output_prefix,
            tokenizer_type=args.tokenizer_type,
            vocab_file=args.vocab_file,
            jsonl_keys=args.jsonl_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            log_interval=args.log_interval,
            skip_bad_lines=args.skip_bad_lines,
            progress=not args.no_progress,
            allow_empty=args.allow_empty,
        )
    except (BadInputError, ShardError, TokenizerError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{stats.documents:,} documents, {stats.tokens:,} tokens, {stats.bytes / 1e6:.1f} MB in "
        f"{stats.seconds:.1f}s ({stats.mb_per_s:.2f} MB/s, {stats.tokens_per_s:,.0f} tokens/s); "
        f"skipped {stats.skipped_lines} bad lines, {stats.empty_documents} empty documents"
    )
    for key, prefix in stats.outputs.items():
        print(f"  {key}: {prefix}.bin / .idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
