"""tools/preprocess_data.py: shards readable by megatron-core, exact ids, clear errors, atomic output."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_stablelm.data.indexed import ShardWriter, check_shard, read_shard
from megatron_stablelm.data.preprocess import BadInputError, preprocess
from megatron_stablelm.tokenizers import HFTokenizer
from tests.data_helpers import random_text, tiny_tokenizer_files, write_jsonl


@pytest.fixture(scope="module")
def tok_file():
    return tiny_tokenizer_files()["json"]


def _corpus(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    texts = [random_text(rng, rng.randint(1, 60)) for _ in range(n)]
    texts[3] = ""  # empty document
    texts[5] = "ünïcödé 日本語 🙂 \u0000 \u2028 line\nbreaks"
    texts[7] = random_text(rng, 20000)  # very long document
    return texts


def test_interop_formats_workers(tmp_path, tok_file):
    """jsonl, .jsonl.gz, .jsonl.zst, parquet and a datasets dir, 2 workers: IndexedDataset reads back
    exactly the tokenizer's ids + EOD, in input order (an empty text: a document without a sequence,
    as Megatron-LM writes it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    parts = [_corpus(i, 40) for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", parts[0])
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in parts[1])
    raw = "".join(json.dumps({"text": t, "meta": 1}) + "\n" for t in parts[2]).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": parts[3]}), tmp_path / "d.parquet", row_group_size=7)
    import datasets

    datasets.Dataset.from_dict({"text": parts[4]}).save_to_disk(str(tmp_path / "e_ds"))
    inputs = [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet", "e_ds")]
    stats = preprocess(
        inputs,
        str(tmp_path / "out"),
        tokenizer_type="HFTokenizer",
        vocab_file=tok_file,
        workers=2,
        progress=False,
    )
    tok = HFTokenizer(tok_file)
    texts = [t for p in parts for t in p]
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    bounds = ds.document_indices
    assert len(bounds) - 1 == len(texts) == stats.documents
    assert len(ds) == len(texts) - stats.empty_documents and stats.empty_documents == len(parts)
    assert ds[0].dtype == np.uint16
    for i, text in enumerate(texts):
        doc = [t for seq in range(bounds[i], bounds[i + 1]) for t in ds[seq].tolist()]
        assert doc == (tok.encode(text) + [tok.eod] if text else []), i
    assert stats.tokens == int(ds.sequence_lengths.sum())
    assert not list(tmp_path.glob("*.tmp-*"))


def test_megatron_written_shard_reads_back(tmp_path, tok_file):
    """The other direction: a shard written by megatron-core's builder passes our checks and reads
    identically through our reader."""
    docs = [np.arange(n, dtype=np.int64) % 300 for n in (5, 1, 77, 300)]
    builder = IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=np.uint16)
    for d in docs:
        builder.add_document(d, [len(d)])
    builder.finalize(str(tmp_path / "m.idx"))
    info = check_shard(str(tmp_path / "m"), vocab_size=400)
    assert info.num_documents == 4 and info.num_tokens == sum(map(len, docs))
    ours = read_shard(str(tmp_path / "m"))
    assert [ours[i].tolist() for i in range(4)] == [d.tolist() for d in docs]


def test_no_eod_multiple_keys_and_int32(tmp_path, tok_file):
    rows = [{"text": "hello world", "code": "def f(): pass"}, {"text": "", "code": "x = 1"}]
    (tmp_path / "k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = preprocess(
        [str(tmp_path / "*.jsonl")],
        str(tmp_path / "o"),
        tokenizer_type="HFTokenizer",
        vocab_file=tok_file,
        jsonl_keys=["text", "code"],
        append_eod=False,
        progress=False,
    )
    tok = HFTokenizer(tok_file)
    code = IndexedDataset(str(tmp_path / "o_code_document"))
    text = IndexedDataset(str(tmp_path / "o_text_document"))
    assert [code[i].tolist() for i in range(2)] == [tok.encode(r["code"]) for r in rows]
    assert len(text) == 1 and stats.empty_documents == 1  # an empty document has no sequence
    assert text.document_indices.tolist() == [0, 1, 1]  # ... but is a document, as Megatron-LM writes it
    writer = ShardWriter(str(tmp_path / "big"), vocab_size=100289)
    writer.add_document(np.array([100288, 5]))
    writer.finalize()
    assert IndexedDataset(str(tmp_path / "big"))[0].dtype == np.int32


def test_bad_line_names_file_and_line(tmp_path, tok_file):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken\n{"other": "x"}\n{"text": 5}\n')
    out = str(tmp_path / "o")
    with pytest.raises(BadInputError, match=r"bad\.jsonl:4: malformed"):
        preprocess([str(path)], out, tokenizer_type="HFTokenizer", vocab_file=tok_file, progress=False)
    assert not list(tmp_path.glob("o_*"))  # nothing left behind, not even temporaries
    stats = preprocess(
        [str(path)],
        out,
        tokenizer_type="HFTokenizer",
        vocab_file=tok_file,
        skip_bad_lines=True,
        progress=False,
        workers=2,
    )
    assert stats.skipped_lines == 3 and stats.documents == 2
    with pytest.raises(FileNotFoundError, match="missing"):
        preprocess([str(tmp_path / "missing*.jsonl")], out, tokenizer_type="HFTokenizer", vocab_file=tok_file)


def test_cli(tmp_path, tok_file, capsys):
    import importlib.util
    from pathlib import Path

    write_jsonl(tmp_path / "in.jsonl", ["one doc", "two docs"])
    spec = importlib.util.spec_from_file_location(
        "preprocess_data", Path(__file__).resolve().parents[1] / "tools" / "preprocess_data.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(
        [
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output-prefix",
            str(tmp_path / "cli"),
            "--tokenizer-type",
            "HFTokenizer",
            "--vocab-file",
            tok_file,
            "--append-eod",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0 and "2 documents" in capsys.readouterr().out
    assert len(IndexedDataset(str(tmp_path / "cli_text_document"))) == 2
    rc = mod.main(
        [
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output-prefix",
            str(tmp_path / "x"),
            "--tokenizer-type",
            "HFTokenizer",
            "--vocab-file",
            str(tmp_path / "nope.json"),
        ]
    )
    assert rc == 2 and "nope.json" in capsys.readouterr().err  # bad input: exit 2, as every tool


def test_chunks_in_flight_are_bounded(tok_file):
    """The pool reads at most ``2 × workers`` chunks ahead of the writer (``Pool.imap`` would read the
    whole input ahead when tokenizing is the slower side, and memory would grow with the corpus)."""
    from megatron_stablelm.data.preprocess import _Pool

    pulled = []

    def chunks():
        for i in range(40):
            pulled.append(i)
            yield (("src", 1, "texts", [[f"document {i}"]]),)

    pool = _Pool(2, ("HFTokenizer", tok_file, ("text",), True, False, None))
    try:
        ahead = []
        for (result,) in pool.ordered(chunks()):
            ahead.append(len(pulled) - len(ahead))
            assert result[4] is None and len(result[0][0][1]) == 1
    finally:
        pool.close()
    assert len(ahead) == 40 and max(ahead) <= 2 * 2 + 1
