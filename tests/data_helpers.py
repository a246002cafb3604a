"""Shared fixtures of the data tests: a tiny tokenizer trained in well under a second, tiny corpora."""

from __future__ import annotations

import functools
import json
import random
import tempfile
from pathlib import Path

import numpy as np

from megatron_stablelm.config import Config

WORDS = (
    "the model reads tokens from shards and samples documents by weight over several epochs while "
    "every rank takes its slice of the global batch def class return import numpy torch 0 1 2 3 4 5 6 "
    "7 8 9 ünïcödé 日本語 данные αβγ 🙂"
).split()


def random_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_files() -> dict[str, str]:
    """tokenizer.json and tokenizer.tiktoken of a 400-token BPE, trained once per test session."""
    from megatron_stablelm.data.tokenizer_training import train_bpe_tokenizer

    rng = random.Random(0)
    texts = [random_text(rng, 200) for _ in range(200)]
    out = tempfile.mkdtemp(prefix="tiny_tok_")
    return train_bpe_tokenizer(texts, out, vocab_size=400, min_frequency=1, write_tiktoken=True)


def write_jsonl(path: Path, texts: list[str], key: str = "text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}, ensure_ascii=False) + "\n")
    return path


def write_synthetic_shard(prefix: str, doc_lengths, eod: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """A shard of random documents of the given lengths, each ending with ``eod``; returns the docs."""
    from megatron_stablelm.data.indexed import ShardWriter

    rng = np.random.default_rng(seed)
    writer = ShardWriter(prefix, vocab)
    docs = []
    for n in doc_lengths:
        doc = rng.integers(0, vocab, size=int(n))
        doc[doc == eod] = (eod + 1) % vocab
        doc[-1] = eod
        writer.add_document(doc)
        docs.append(doc)
    writer.finalize()
    return docs


def data_config(**kw) -> Config:
    base = dict(
        seq_length=32,
        train_iters=50,
        eval_iters=2,
        eval_interval=25,
        train_micro_batch_size_per_gpu=2,
        gradient_accumulation_steps=2,
        num_workers=0,
        seed=1234,
    )
    base.update(kw)
    return Config(**base)
