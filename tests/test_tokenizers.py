"""Tokenizers: every kind (tokenizer.json, tiktoken ranks, SentencePiece) loads from local files, round-trips
text, and fails clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from megatron_stablelm.tokenizers import (
    ARCADE100K_SPECIAL_TOKENS,
    HFTokenizer,
    TiktokenTokenizer,
    TokenizerError,
    build_tokenizer,
    hf_tokenizer_from_tiktoken,
    write_tiktoken_ranks,
)
from tests.data_helpers import tiny_tokenizer_files

TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "Ünïcödé: 日本語のテキスト, данные, emoji 🙂 and\ttabs\r\n",
    "",
    "numbers 1234567 and 3.14159",
    "a literal <|endoftext|> inside",
]


@pytest.fixture(scope="module")
def files():
    return tiny_tokenizer_files()


@pytest.mark.parametrize("kind", ["HFTokenizer", "TiktokenTokenizer"])
def test_round_trip_and_batch(files, kind):
    tok = build_tokenizer(
        tokenizer_type=kind, vocab_file=files["json" if kind == "HFTokenizer" else "tiktoken"]
    )
    assert tok.decode([tok.eod]) == "<|endoftext|>"
    batch = tok.encode_batch(TEXTS)
    for text, ids in zip(TEXTS, batch):
        assert ids == tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
    # the special token in text is recognised, as tokenizers does for added tokens
    assert tok.eod in tok.encode(TEXTS[-1])
    # megatron-core's duck-typed needs
    assert tok.pad == -1 and tok.unique_identifiers["vocab_sha1"]


@pytest.mark.parametrize("kind", ["HFTokenizer", "TiktokenTokenizer"])
def test_digits_are_single_tokens(files, kind):
    tok = build_tokenizer(
        tokenizer_type=kind, vocab_file=files["json" if kind == "HFTokenizer" else "tiktoken"]
    )
    ids = tok.encode("9876543210")
    assert [tok.decode([i]) for i in ids] == list("9876543210")


def test_tiktoken_matches_hf_vocabulary(files):
    """The .tiktoken written by train_tokenizer is the same vocabulary, specials moved to the end."""
    hf, tk = HFTokenizer(files["json"]), TiktokenTokenizer(files["tiktoken"])
    assert hf.eod == 0 and tk.eod == hf.vocab_size - 1
    for text in TEXTS[:4]:
        assert [tk.decode([i]) for i in tk.encode(text)] == [hf.decode([i]) for i in hf.encode(text)]


def test_arcade100k_special_token_ids(tmp_path):
    """With the published 100,256 ranks, <|endoftext|> is 100257 and the vocab 100289 (as Stable LM 2)."""
    ranks = {bytes([b]): b for b in range(256)}
    for i in range(100256 - 256):
        ranks[b"\xff" + i.to_bytes(3, "big")] = 256 + i
    path = tmp_path / "arcade100k.tiktoken"
    write_tiktoken_ranks(ranks, path)
    tok = build_tokenizer(tokenizer_type="TiktokenTokenizer", vocab_file=str(path))
    assert tok.eod == 100257
    assert tok.vocab_size == 100257 + len(ARCADE100K_SPECIAL_TOKENS) == 100289
    assert tok.special_tokens["<|im_end|>"] == 100257 + ARCADE100K_SPECIAL_TOKENS.index("<|im_end|>")


def test_errors_name_the_file(tmp_path, monkeypatch):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match="nope.json"):
        build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=missing)
    with pytest.raises(TokenizerError, match="nope.tiktoken"):
        build_tokenizer(tokenizer_type="TiktokenTokenizer", vocab_file=str(tmp_path / "nope.tiktoken"))
    with pytest.raises(TokenizerError, match="vocab_file"):
        build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=None)
    with pytest.raises(TokenizerError, match="tokenizer_type"):
        build_tokenizer(tokenizer_type="SPMTokenizer", vocab_file=missing)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("!!notbase64 x\n")
    with pytest.raises(TokenizerError, match="bad.tiktoken:1"):
        build_tokenizer(tokenizer_type="TiktokenTokenizer", vocab_file=str(bad))
    # a built-in encoding that is not cached: say what to provide, never download
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty-cache"))
    with pytest.raises(TokenizerError, match=r"not cached.*cl100k_base\.tiktoken"):
        build_tokenizer(tokenizer_type="TiktokenTokenizer", vocab_file="cl100k_base")


def test_tokenizer_ids_fit_shard_dtype(files):
    from megatron_stablelm.data.indexed import token_dtype

    assert token_dtype(HFTokenizer(files["json"]).vocab_size) is np.uint16
    assert token_dtype(65536) is np.uint16 and token_dtype(100289) is np.int32


def _auto_tokenizer(tok: TiktokenTokenizer, out) -> object:
    """``tok`` exported as ``tokenizer.json`` + the ``tokenizer_config.json`` of ``convert_to_hf``."""
    from transformers import AutoTokenizer

    hf_tokenizer_from_tiktoken(tok).save(str(out / "tokenizer.json"))
    eod = tok.decode([tok.eod])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod, "bos_token": eod}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(out)


def test_tiktoken_exports_to_auto_tokenizer(files, tmp_path):
    """Same ids from `transformers`' AutoTokenizer as from tiktoken, special tokens included."""
    tok = TiktokenTokenizer(files["tiktoken"])
    auto = _auto_tokenizer(tok, tmp_path)
    for text in [*TEXTS, "<|im_start|>user\n12<|im_end|><|fim_prefix|>x<|reg3|>"]:
        assert auto(text)["input_ids"] == tok.encode(text), text
        assert auto.decode(tok.encode(text)) == text
    assert auto.eos_token_id == tok.eod
    assert {t: auto.convert_tokens_to_ids(t) for t in tok.special_tokens} == tok.special_tokens


def test_tiktoken_export_keeps_the_arcade100k_id_gap(tmp_path):
    """With the published 100,256 ranks the special tokens start at 100257; the export keeps that."""
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"\xff" + i.to_bytes(3, "big"): 256 + i for i in range(100256 - 256)})
    ranks[b"ab"] = ranks.pop(b"\xff" + (100255 - 256).to_bytes(3, "big"))  # one real merge, the last rank
    write_tiktoken_ranks(ranks, tmp_path / "arcade100k.tiktoken")
    tok = TiktokenTokenizer(tmp_path / "arcade100k.tiktoken")
    auto = _auto_tokenizer(tok, tmp_path)
    text = "abc<|endoftext|>ab<|im_end|>"
    assert auto(text)["input_ids"] == tok.encode(text) == [100255, 99, 100257, 100255, 100278]


# ------------------------------------------------------------------------------------------ SentencePiece
SPM_TEXTS = [
    *TEXTS,
    "  leading and  double spaces ",
    "bytes outside the model: ʃ ∮ 𝄞",
    "<s> </s> <unk> as text",
]


@pytest.mark.parametrize("eod_piece", [False, True], ids=["llama-like", "with-endoftext"])
def test_spm_tokenizer_gives_sentencepiece_ids(eod_piece):
    """GPT-NeoX's SPMTokenizer: the ids are sentencepiece's own ``encode`` (no BOS/EOS added) and the
    end of document is ``piece_to_id("<|endoftext|>")``, which is the unknown piece (0) for a model
    without it, as GPT-NeoX appends it to Llama's."""
    import sentencepiece

    from tests.data_helpers import tiny_sentencepiece_model

    path = tiny_sentencepiece_model(eod_piece)
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    tok = build_tokenizer(tokenizer_type="SPMTokenizer", vocab_file=path)
    assert tok.encode_batch(SPM_TEXTS) == [sp.encode(t) for t in SPM_TEXTS]
    assert [tok.decode(sp.encode(t)) for t in SPM_TEXTS] == [sp.decode(sp.encode(t)) for t in SPM_TEXTS]
    assert tok.vocab_size == sp.get_piece_size() == 400
    assert tok.eod == sp.piece_to_id("<|endoftext|>")
    if eod_piece:
        assert tok.eod == 3 and not tok.eod_is_unknown and tok.eos_id == 3
    else:
        assert tok.eod == sp.unk_id() == 0 and tok.eod_is_unknown and tok.eos_id == sp.eos_id() == 2
    assert tok.unique_identifiers["class"] == "SPMTokenizer"
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        build_tokenizer(tokenizer_type="SPMTokenizer", vocab_file=tiny_tokenizer_files()["json"])


def test_spm_preprocessing_appends_neox_eod(tmp_path):
    """tools/preprocess_data.py's pipeline with SPMTokenizer: each document is sentencepiece's ids
    followed by the end-of-document id GPT-NeoX appends (the unknown piece for a Llama-like model)."""
    import sentencepiece

    from megatron_stablelm.data.preprocess import preprocess
    from tests.data_helpers import shard_documents, tiny_sentencepiece_model, write_jsonl

    path = tiny_sentencepiece_model()
    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    texts = [t for t in SPM_TEXTS if t]
    src = write_jsonl(tmp_path / "docs.jsonl", texts)
    preprocess(
        [str(src)], str(tmp_path / "spm"), tokenizer_type="SPMTokenizer", vocab_file=path, progress=False
    )
    docs = shard_documents(str(tmp_path / "spm_text_document"))
    assert docs == [sp.encode(t) + [sp.unk_id()] for t in texts]
