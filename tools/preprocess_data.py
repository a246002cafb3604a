"""Tokenize corpora into Megatron/GPT-NeoX indexed shards (``.bin`` / ``.idx``).

Plain inputs (one pass, ``PREFIX_text_document.bin`` / ``.idx`` per JSON key)::

    python tools/preprocess_data.py --input 'data/raw/*.jsonl.zst' --output-prefix data/web \
        --tokenizer-type TiktokenTokenizer --vocab-file arcade100k.tiktoken --append-eod --workers 16

A corpus by its recipe (``megatron_stablelm/data/recipes/*.yml``; ``--list-sources``, ``--describe``),
written to ``OUTPUT_ROOT/<source>/<subset>.bin`` / ``.idx``::

    python tools/preprocess_data.py --source culturax --subset de fr --input-root RAW/culturax \
        --output-root data --tokenizer-type TiktokenTokenizer --vocab-file arcade100k.tiktoken \
        --append-eod --workers 16

Large corpora: every input file becomes a resumable piece; ``--shard I/N`` does the I-th of N shares
(one SLURM array task each: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``), a re-run does
only the pieces without a completion marker, and ``--merge`` (same arguments, no ``--shard``) joins
the pieces into the final prefix. Without ``--shard`` one job does all pieces and merges.

The shards are megatron-core's mmap indexed-dataset format, readable by its ``IndexedDataset`` and
byte for byte what Megatron-LM's ``tools/preprocess_data.py`` writes for the same ids. Outputs appear
under their final names only when complete. Bad input (a malformed line, a missing file, field,
subset or tokenizer, an input without tokens, a half-written piece, an output that cannot be
written) prints one ``error: ...`` line naming the file and exits 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_stablelm.cli import positive_int
from megatron_stablelm.data.errors import DataError
from megatron_stablelm.data.indexed import ShardError
from megatron_stablelm.data.preprocess import (
    READERS,
    BadInputError,
    PreprocessStats,
    Target,
    expand_inputs,
    merge_targets,
    parse_shard,
    preprocess,
    preprocess_targets,
)
from megatron_stablelm.tokenizers import TOKENIZER_TYPES, TokenizerError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    plain = p.add_argument_group("plain inputs")
    plain.add_argument(
        "--input",
        nargs="+",
        help="files or globs: .jsonl, .jsonl.gz, .jsonl.zst, .parquet, or a datasets directory",
    )
    plain.add_argument("--output-prefix", help="writes PREFIX_{key}_document.bin / .idx")
    plain.add_argument(
        "--jsonl-keys", nargs="+", default=["text"], help="fields to tokenize (one shard each)"
    )
    recipe = p.add_argument_group("corpus recipes")
    recipe.add_argument("--source", help="a recipe: a shipped source name or a recipe .yml file")
    recipe.add_argument("--list-sources", action="store_true", help="print the shipped recipes and exit")
    recipe.add_argument(
        "--describe", action="store_true", help="print the recipe (download, input files) and exit"
    )
    recipe.add_argument(
        "--input-root", help="where the corpus was downloaded (the recipe's `files` globs are relative to it)"
    )
    recipe.add_argument("--output-root", help="writes OUTPUT_ROOT/<source>/<subset>.bin / .idx")
    recipe.add_argument("--subset", nargs="+", default=None, help="subsets (folders or set names) to select")
    recipe.add_argument("--exclude-subset", nargs="+", default=[], help="subsets to leave out (e.g. Books3)")
    large = p.add_argument_group("large corpora")
    large.add_argument(
        "--shard", help="I/N: this job's share of the input files (pieces only; merge with --merge)"
    )
    large.add_argument(
        "--merge", action="store_true", help="only merge finished pieces into the final prefixes"
    )
    large.add_argument("--no-merge", action="store_true", help="make the pieces only")
    large.add_argument("--keep-parts", action="store_true", help="keep the pieces after merging")
    large.add_argument(
        "--reader", choices=READERS, default="native", help="datasets: load_dataset(streaming=True)"
    )
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    p.add_argument("--vocab-file", help="tokenizer.json, .tiktoken ranks file or SentencePiece .model")
    p.add_argument("--merge-file", default=None, help="accepted for GPT-NeoX compatibility; unused")
    p.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    p.add_argument("--workers", type=positive_int, default=1)
    p.add_argument(
        "--log-interval", type=positive_int, default=10000, help="documents between progress updates"
    )
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed lines")
    p.add_argument("--dataset-impl", default="mmap", choices=["mmap"], help="GPT-NeoX compatibility")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--allow-empty", action="store_true", help="write a shard without tokens instead of failing"
    )
    return p


def _plain_target(args: argparse.Namespace) -> Target:
    """The plain inputs as one target for ``--shard`` / ``--merge``: pieces are named after each file's
    path relative to the inputs' common folder."""
    files = expand_inputs(args.input)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    outputs = {k: f"{args.output_prefix}_{k}_document" for k in args.jsonl_keys}
    return Target(args.output_prefix, tuple(files), outputs, root)


def _summary(stats: PreprocessStats) -> None:
    print(
        f"{stats.documents:,} documents, {stats.tokens:,} tokens, {stats.bytes / 1e6:.1f} MB in "
        f"{stats.seconds:.1f}s ({stats.mb_per_s:.2f} MB/s, {stats.tokens_per_s:,.0f} tokens/s); "
        f"skipped {stats.skipped_lines} bad lines, {stats.empty_documents} empty documents"
        + (f", {stats.filtered_documents:,} documents of unselected sets" if stats.filtered_documents else "")
    )


def _run(args: argparse.Namespace, p: argparse.ArgumentParser) -> int:
    from megatron_stablelm.data import recipes

    if args.list_sources:
        for name in recipes.available_sources():
            print(f"{name:12s} {recipes.load_recipe(name).description}")
        return 0
    if args.source is not None:
        recipe = recipes.load_recipe(args.source)
        if args.describe:
            print(recipe.describe())
            return 0
        if args.input or args.output_prefix:
            p.error("--source takes --input-root/--output-root, not --input/--output-prefix")
        if not (args.input_root and args.output_root):
            p.error("--source needs --input-root and --output-root")
        targets = recipes.recipe_targets(
            recipe, args.input_root, args.output_root, args.subset, args.exclude_subset
        )
        keys = [recipe.text_field]
    else:
        if not (args.input and args.output_prefix):
            p.error("give --input and --output-prefix, or --source (see --list-sources)")
        if args.subset or args.exclude_subset or args.input_root or args.output_root:
            p.error("--subset, --exclude-subset, --input-root and --output-root go with --source")
        targets = [_plain_target(args)] if (args.shard or args.merge) else []
        keys = args.jsonl_keys
    if not (args.tokenizer_type and args.vocab_file):
        p.error("--tokenizer-type and --vocab-file are required")
    if args.merge and (args.shard or args.no_merge):
        p.error("--merge runs on its own, after every --shard job finished")
    common = dict(
        tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file,
        jsonl_keys=keys,
        append_eod=args.append_eod,
        skip_bad_lines=args.skip_bad_lines,
        allow_empty=args.allow_empty,
    )
    if not targets:  # plain inputs, one pass
        stats = preprocess(
            args.input,
            args.output_prefix,
            workers=args.workers,
            log_interval=args.log_interval,
            progress=not args.no_progress,
            reader=args.reader,
            **common,
        )
        _summary(stats)
        for key, prefix in stats.outputs.items():
            print(f"  {key}: {prefix}.bin / .idx")
        return 0
    if args.merge:
        merge_targets(targets, keep_parts=args.keep_parts, **common)
        return 0
    shard = parse_shard(args.shard) if args.shard else (0, 1)
    stats = preprocess_targets(
        targets,
        workers=args.workers,
        shard=shard,
        merge=not (args.shard or args.no_merge),
        keep_parts=args.keep_parts,
        reader=args.reader,
        progress=not args.no_progress,
        log_interval=args.log_interval,
        **common,
    )
    _summary(stats)
    print(f"{stats.pieces_done} pieces written, {stats.pieces_skipped} already done")
    if args.shard:
        print("when every shard job has finished: the same command with --merge instead of --shard")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        return _run(args, p)
    except (BadInputError, ShardError, TokenizerError, DataError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
