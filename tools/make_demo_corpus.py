"""Build the demo corpus from text every machine of this kind has, then its tokenizer and shards.

    python tools/make_demo_corpus.py --out data/demo

writes, under ``--out``:

* ``code.jsonl``  -- the Python standard library's sources (one file per document);
* ``prose.jsonl`` -- Python's own help topics (``pydoc_data``), ``/usr/share/common-licenses`` and
  the packages' ``/usr/share/doc/*/copyright`` and changelogs (one text per document);
* ``tokenizer.json`` (+ ``tokenizer.tiktoken``): a byte-level BPE trained on both;
* ``code_text_document.{bin,idx}``, ``prose_text_document.{bin,idx}``: the shards, EOD appended.

* ``manifest.json``: the settings and each file's SHA-256, written last.

Config keys for a run: ``tokenizer_type: HFTokenizer``, ``vocab_file: data/demo/tokenizer.json``,
``train_data_paths: [data/demo/code_text_document, data/demo/prose_text_document]``. Nothing is
downloaded; the order of documents is sorted, so the corpus is the same on every run of one machine.

Re-running is safe and cheap: the jsonl files are written again (a second); when the manifest records
the same settings and jsonl files and every listed file is unchanged, everything is reused. Otherwise
all is built in a staging directory inside ``--out`` and moved into place only when complete, and the
``index-cache`` of the previous shards is removed.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator

from megatron_stablelm.data.preprocess import preprocess
from megatron_stablelm.data.tokenizer_training import train_bpe_tokenizer

MAX_DOC_CHARS = 200_000
MANIFEST = "manifest.json"


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


SOURCES = {"code": code_documents, "prose": prose_documents}
JSONL_FILES = tuple(f"{name}.jsonl" for name in SOURCES)


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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _reusable(out: str, staging: str, settings: dict) -> bool:
    """Whether ``out`` already holds exactly what this run would build: its manifest records the same
    settings and the same freshly written jsonl files, and every file it lists is unchanged."""
    try:
        with open(os.path.join(out, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest["settings"] != settings or any(
            files[name] != _sha256(os.path.join(staging, name)) for name in JSONL_FILES
        ):
            return False
        return all(_sha256(os.path.join(out, name)) == digest for name, digest in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(staging: str, settings: dict, workers: int, t0: float) -> None:
    """The tokenizer and the shards, from the jsonl files already in ``staging``."""

    def texts() -> Iterator[str]:
        for name in JSONL_FILES:
            with open(os.path.join(staging, name), encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]

    paths = train_bpe_tokenizer(texts(), staging, vocab_size=settings["vocab_size"], write_tiktoken=True)
    print(f"tokenizer: trained ({time.perf_counter() - t0:.1f}s)")
    for name in SOURCES:
        stats = preprocess(
            [os.path.join(staging, f"{name}.jsonl")],
            os.path.join(staging, name),
            tokenizer_type="HFTokenizer",
            vocab_file=paths["json"],
            workers=workers,
            progress=False,
        )
        print(f"{name}_text_document: {stats.documents} documents, {stats.tokens:,} tokens")


def _publish(staging: str, out: str) -> None:
    """Move the built files into ``out``, the manifest last, and drop the index cache built on the
    previous shards (megatron-core keys it by path, not content, so it would be stale)."""
    shutil.rmtree(os.path.join(out, "index-cache"), ignore_errors=True)
    names = sorted(n for n in os.listdir(staging) if n != MANIFEST) + [MANIFEST]
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(out, name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/demo")
    p.add_argument("--max-mb", type=float, default=4.0, help="cap per source (MB of jsonl)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    settings = {"max_mb": args.max_mb, "vocab_size": args.vocab_size}
    try:
        os.makedirs(args.out, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".staging-", dir=args.out)
    except OSError as err:
        print(f"error: cannot write '{args.out}': {err.strerror or err}", file=sys.stderr)
        return 2
    try:
        for name, docs in SOURCES.items():
            n, size = write_jsonl(os.path.join(staging, f"{name}.jsonl"), docs(), int(args.max_mb * 1e6))
            print(f"{name}.jsonl: {n} documents, {size / 1e6:.1f} MB")
        if _reusable(args.out, staging, settings):
            print(f"'{args.out}' already holds this corpus, tokenizer and shards: reused")
            return 0
        _build(staging, settings, args.workers, t0)
        files = {name: _sha256(os.path.join(staging, name)) for name in sorted(os.listdir(staging))}
        with open(os.path.join(staging, MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"settings": settings, "files": files}, f, indent=1)
        _publish(staging, args.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
