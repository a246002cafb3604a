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


@functools.cache
def tiny_sentencepiece_model(eod_piece: bool = False) -> str:
    """A SentencePiece BPE ``.model`` shaped like Llama's (byte fallback, identity normalisation,
    ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no ``<|endoftext|>``), 400 pieces (256 of them bytes), trained once per test session
    in well under a second; ``eod_piece`` adds GPT-NeoX's ``<|endoftext|>`` as a user-defined piece."""
    import sentencepiece

    rng = random.Random(1)
    out = Path(tempfile.mkdtemp(prefix="tiny_spm_"))
    (out / "corpus.txt").write_text("\n".join(random_text(rng, 60) for _ in range(300)), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity", unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, user_defined_symbols=["<|endoftext|>"] if eod_piece else [], minloglevel=2,
    )  # fmt: skip
    return str(out / "tokenizer.model")


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


def source_read_order(blend, source: int) -> np.ndarray:
    """The sample indexes of ``blend.datasets[source]`` in the order the run reads them (the blend's
    order, whole run)."""
    n = len(blend)
    ids = np.asarray(blend.dataset_index[:n])
    return np.asarray(blend.dataset_sample_index[:n])[ids == source]


def index_tokens(arrays, lengths, order) -> np.ndarray:
    """``[n, 2]`` (document, token offset) pairs that the samples ``order`` of a GPTDataset read as
    inputs, in that order, from its ``(document_index, sample_index, shuffle_index)`` and sequence
    lengths: brute force, one sample and one document piece at a time. A sample's last token (the
    extra label token, which the next sample starts with) is not counted."""
    doc_index, sample_index, shuffle_index = arrays
    out = []
    for j in order:
        k = int(shuffle_index[int(j)])
        (p0, o0), (p1, o1) = sample_index[k], sample_index[k + 1]
        for p in range(int(p0), int(p1) + 1):
            doc = int(doc_index[p])
            start = int(o0) if p == p0 else 0
            end = int(o1) if p == p1 else int(lengths[doc])
            out.extend((doc, t) for t in range(start, end))
    return np.array(out, dtype=np.int64).reshape(-1, 2)


def read_order_tokens(blend, source: int) -> np.ndarray:
    """(document, token offset) pairs the run reads from ``blend.datasets[source]``, in read order."""
    ds = blend.datasets[source]
    arrays = (ds.document_index, ds.sample_index, ds.shuffle_index)
    return index_tokens(arrays, ds.dataset.sequence_lengths, source_read_order(blend, source))


def write_records(path: Path, records: list[dict]) -> Path:
    """``records`` in the file's real format, by its name: .parquet (pyarrow), .jsonl.zst (zstandard),
    .jsonl.gz or .jsonl; parent folders are created (corpus layouts are folder trees)."""
    import gzip

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=max(1, len(records) // 2))
        return path
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if path.name.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdCompressor().compress(raw)
    elif path.name.endswith(".gz"):
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def shard_documents(prefix: str) -> list[list[int]]:
    """Every document of a shard, as megatron-core's ``IndexedDataset`` reads it (empty ones included)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    bounds = ds.document_indices
    return [
        [t for seq in range(bounds[i], bounds[i + 1]) for t in ds[seq].tolist()]
        for i in range(len(bounds) - 1)
    ]
