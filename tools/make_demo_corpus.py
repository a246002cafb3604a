"""Build the demo corpus from text every machine of this kind has, then its tokenizer and shards.

    python tools/make_demo_corpus.py --out data/demo

writes, under ``--out``:

* ``code.jsonl``  -- the Python standard library's sources (one file per document);
* ``prose.jsonl`` -- Python's own help topics (``pydoc_data``), ``/usr/share/common-licenses`` and
  the packages' ``/usr/share/doc/*/copyright`` and changelogs (one text per document);
* ``tokenizer.json`` (+ ``tokenizer.tiktoken``): a byte-level BPE trained on both;
* ``code_text_document.{bin,idx}``, ``prose_text_document.{bin,idx}``: the shards, EOD appended.

Config keys for a run: ``tokenizer_type: HFTokenizer``, ``vocab_file: data/demo/tokenizer.json``,
``train_data_paths: [data/demo/code_text_document, data/demo/prose_text_document]``. Nothing is
downloaded; the order of documents is sorted, so the corpus is the same on every run of one machine.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import sysconfig
import time
from collections.abc import Iterator

from megatron_stablelm.data.preprocess import preprocess
from megatron_stablelm.data.tokenizer_training import train_bpe_tokenizer

MAX_DOC_CHARS = 200_000


def code_documents() -> Iterator[str]:
    stdlib = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if "site-packages" in path or "test" in os.path.relpath(path, stdlib).split(os.sep)[0]:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            yield text[:MAX_DOC_CHARS]


def prose_documents() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield topics[name]
    except ImportError:
        pass
    paths = sorted(glob.glob("/usr/share/common-licenses/*")) + sorted(
        glob.glob("/usr/share/doc/*/copyright")
    )
    paths += sorted(glob.glob("/usr/share/doc/*/changelog*.gz")) + sorted(
        glob.glob("/usr/share/doc/*/README*")
    )
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            if path.endswith(".gz"):
                with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                    text = f.read(MAX_DOC_CHARS)
            else:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read(MAX_DOC_CHARS)
        except OSError:
            continue
        if text.strip():
            yield text


def write_jsonl(path: str, docs: Iterator[str], max_bytes: int) -> tuple[int, int]:
    n = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            n += 1
            size += len(line.encode("utf-8"))
            if size >= max_bytes:
                break
    return n, size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/demo")
    p.add_argument("--max-mb", type=float, default=4.0, help="cap per source (MB of jsonl)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    cap = int(args.max_mb * 1e6)
    sources = {"code": code_documents(), "prose": prose_documents()}
    for name, docs in sources.items():
        n, size = write_jsonl(os.path.join(args.out, f"{name}.jsonl"), docs, cap)
        print(f"{name}.jsonl: {n} documents, {size / 1e6:.1f} MB")

    def texts() -> Iterator[str]:
        for name in sources:
            with open(os.path.join(args.out, f"{name}.jsonl"), encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]

    paths = train_bpe_tokenizer(texts(), args.out, vocab_size=args.vocab_size, write_tiktoken=True)
    print(f"tokenizer: {paths['json']} ({time.perf_counter() - t0:.1f}s)")
    for name in sources:
        stats = preprocess(
            [os.path.join(args.out, f"{name}.jsonl")],
            os.path.join(args.out, name),
            tokenizer_type="HFTokenizer",
            vocab_file=paths["json"],
            workers=args.workers,
            progress=False,
        )
        print(f"{name}_text_document: {stats.documents} documents, {stats.tokens:,} tokens")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
