"""Fill-in-the-middle, by brute force: every FIM span parsed back out of the samples, its parts put back
in order and compared with the raw megatron-core window; the FIM and SPM rates counted over many
samples; determinism and resumption; bad keys and tokenizers refused in one line."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from megatron_stablelm.config import ConfigError, load_config
from megatron_stablelm.data import DataError, build_data_iterators, build_datasets, build_tokenizer
from megatron_stablelm.data.datasets import FIM_SENTINEL_KEYS
from megatron_stablelm.data.fim import (
    FIMSentinels,
    FIMSettings,
    Piece,
    fim_sample,
    fim_sentinels,
    sample_pieces,
    sample_rng,
)
from megatron_stablelm.data.indexed import ShardWriter
from megatron_stablelm.data.tokenizer_training import EOD_TOKEN, train_bpe_tokenizer
from tests.data_helpers import data_config, random_text, tiny_tokenizer_files

SENTINELS = ("<fim_prefix>", "<fim_middle>", "<fim_suffix>")


# ------------------------------------------------------------------------------------------ the checker
def check_fim_sample(out, raw, sent: FIMSentinels, eod: int, doc_of=None) -> list[tuple[int, bool]]:
    """Parse ``out`` (a transformed window) against ``raw`` (the untransformed one) and assert the FIM
    contract. Returns ``(original length, P and S adjacent)`` per FIM span.

    * every span is whole: ``<P> a <S> b <M> c`` with one of each sentinel, ended by EOD or the sample;
    * ``a + c + b`` (PSM: prefix middle suffix; SPM: a is empty and c = prefix + middle) is exactly the
      next run of raw tokens, free of EOD and, with ``doc_of``, inside one document;
    * all content put back in order is the raw window's first ``len(raw) - 3 x spans`` tokens.
    """
    out, raw = [int(t) for t in out], [int(t) for t in raw]
    assert len(out) == len(raw)
    ids = (sent.prefix, sent.middle, sent.suffix)
    rebuilt: list[int] = []
    spans = []
    segments, start = [], 0
    for i, t in enumerate(out):  # split after each EOD
        if t == eod:
            segments.append(out[start : i + 1])
            start = i + 1
    segments.append(out[start:])
    for seg in segments:
        if not any(t in ids for t in seg):
            rebuilt.extend(seg)
            continue
        tail = seg[-1:] if seg and seg[-1] == eod else []
        body = seg[: len(seg) - len(tail)]
        assert body[0] == sent.prefix, f"a FIM span must start with the prefix sentinel: {seg}"
        assert [body.count(t) for t in ids] == [1, 1, 1], f"a span needs each sentinel once: {seg}"
        s, m = body.index(sent.suffix), body.index(sent.middle)
        assert 0 < s < m, f"sentinels out of order: {seg}"
        original = body[1:s] + body[m + 1 :] + body[s + 1 : m]
        pos = len(rebuilt)
        assert original == raw[pos : pos + len(original)], "a span's parts do not rebuild the raw tokens"
        assert eod not in original, "a FIM span crosses a document end"
        if doc_of is not None:
            assert len({doc_of[p] for p in range(pos, pos + len(original))}) == 1, "span over 2 documents"
        spans.append((len(original), s == 1))
        rebuilt.extend(original + tail)
    assert rebuilt == raw[: len(raw) - 3 * len(spans)], "the sample's content is not the raw window's"
    return spans


# ------------------------------------------------------------------------------------------ pure transform
def random_window(rng: np.random.Generator, length: int, eod: int, mean_doc: int):
    """A window of ``length`` tokens over random documents ending with EOD, as megatron-core's sample
    index cuts it (first and last documents partial), with each token's document number."""
    lengths = rng.integers(1, 2 * mean_doc, size=(2 * length) // mean_doc + 4)
    ends = np.cumsum(lengths)
    stream = rng.integers(10, 1000, ends[-1])
    stream[ends - 1] = eod
    doc_of = np.repeat(np.arange(len(lengths)), lengths)
    begin = int(rng.integers(0, len(stream) - length))
    pieces = []
    for k in range(doc_of[begin], doc_of[begin + length - 1] + 1):
        lo, hi = max(ends[k] - lengths[k], begin), min(ends[k], begin + length)
        pieces.append(Piece(stream[lo:hi], hi == ends[k]))
    return pieces, stream[begin : begin + length], doc_of[begin : begin + length]


def settings(rate: float, spm: float, stream=(1234, 0, 0)) -> FIMSettings:
    return FIMSettings(rate, spm, FIMSentinels(1, 2, 3), 0, stream)


def expected_adjacent(lengths_spm: list[tuple[int, bool]], spm_rate: float) -> float:
    """Expected number of spans whose <P> is followed by <S>: every SPM span, and the PSM spans whose
    prefix came out empty (probability 1 - (n/(n+1))^2 for n tokens: either cut at 0)."""
    return sum(spm_rate + (1 - spm_rate) * (1 - (n / (n + 1)) ** 2) for n, _ in lengths_spm)


@pytest.mark.parametrize("rate,spm", [(0.3, 0.4), (1.0, 0.0), (1.0, 1.0)])
def test_transform_brute_force(rate, spm):
    """Thousands of random windows: every sample exact in length, every span whole and rebuilding its
    document's tokens, no span over a document end, FIM and SPM rates within binomial tolerance."""
    rng = np.random.default_rng(7)
    length, samples = 1025, 120
    cfg = settings(rate, spm)
    pieces_seen = fim_seen = 0
    spans_all = []
    for idx in range(samples):
        pieces, raw, doc_of = random_window(rng, length, 0, mean_doc=int(rng.choice([4, 30])))
        out, spans = fim_sample(pieces, length, cfg, sample_rng(cfg.stream, idx))
        assert len(out) == length
        found = check_fim_sample(out, raw, cfg.sentinels, 0, doc_of)
        assert len(found) == spans
        # rate: over the output's document runs with content (the one cut by the window end may differ)
        runs = np.split(out, np.flatnonzero(out == 0) + 1)
        pieces_seen += sum(1 for r in runs if len(r) > 1 or (len(r) == 1 and r[0] != 0))
        fim_seen += spans
        spans_all += found
    slack = 4 * np.sqrt(pieces_seen * rate * (1 - rate)) + samples  # + one cut run per sample
    assert abs(fim_seen - rate * pieces_seen) <= slack, (fim_seen, pieces_seen)
    adjacent = sum(a for _, a in spans_all)
    expected = expected_adjacent(spans_all, spm)
    assert abs(adjacent - expected) <= 4 * np.sqrt(len(spans_all) * 0.25) + 1, (adjacent, expected)
    if rate == 1.0:
        assert pieces_seen > 5000


def test_transform_is_a_function_of_seed_split_source_and_index():
    rng = np.random.default_rng(3)
    pieces, _, _ = random_window(rng, 257, 0, 20)
    cfg = settings(0.5, 0.5)
    first = fim_sample(pieces, 257, cfg, sample_rng(cfg.stream, 5))[0]
    assert np.array_equal(first, fim_sample(pieces, 257, cfg, sample_rng(cfg.stream, 5))[0])
    others = [
        fim_sample(pieces, 257, cfg, sample_rng(cfg.stream, 6))[0],
        fim_sample(pieces, 257, cfg, sample_rng((1234, 0, 1), 5))[0],
        fim_sample(pieces, 257, cfg, sample_rng((99, 0, 0), 5))[0],
    ]
    assert all(not np.array_equal(first, o) for o in others)


def test_rate_zero_and_short_pieces_are_left_alone():
    cfg = settings(1.0, 0.0)
    # the first document becomes a 6-token span; the 1 token of room left is too little for another
    # span, so the second document's first token stays as it is
    pieces = [Piece(np.array([5, 6, 0]), True), Piece(np.array([8, 9, 10, 11]), False)]
    out, spans = fim_sample(pieces, 7, cfg, sample_rng(cfg.stream, 0))
    assert spans == 1 and len(out) == 7 and out[-2:].tolist() == [0, 8]
    assert check_fim_sample(out, np.array([5, 6, 0, 8, 9, 10, 11]), cfg.sentinels, 0) == [(2, out[1] == 3)]
    out, spans = fim_sample(pieces, 7, settings(0.0, 0.0), sample_rng(cfg.stream, 0))
    assert spans == 0 and out.tolist() == [5, 6, 0, 8, 9, 10, 11]
    # padding is never transformed
    pad = [Piece(np.array([5, 0]), True), Piece(np.full(4, -1), False, document=False)]
    out, _ = fim_sample(pad, 6, cfg, sample_rng(cfg.stream, 0))
    assert out[-1] == -1


@pytest.mark.parametrize("mutant", ["swap", "drop_sentinel", "cross_document", "wrong_length"])
def test_the_checker_catches_broken_transforms(mutant):
    """The brute-force checker is not vacuous: each way of breaking a correct sample is caught."""
    cfg = settings(1.0, 0.0)
    raw = np.array([11, 12, 13, 14, 0, 21, 22, 0, 31, 32, 33, 34], dtype=np.int64)
    # a whole PSM span, then one made of the single token of the next document that still fits
    good = [1, 11, 3, 13, 14, 2, 12, 0, 1, 21, 3, 2]
    assert check_fim_sample(good, raw, cfg.sentinels, 0) == [(4, False), (1, False)]
    bad = {
        "swap": [1, 11, 3, 12, 2, 13, 14, 0, 1, 21, 3, 2],  # middle and suffix exchanged
        "drop_sentinel": [1, 11, 13, 14, 2, 12, 0, 1, 21, 3, 2, 22],
        "cross_document": [1, 11, 3, 14, 0, 2, 12, 13, 0, 1, 21, 3],  # an EOD inside the span
        "wrong_length": good[:-1],
    }[mutant]
    with pytest.raises(AssertionError):
        check_fim_sample(bad, raw, cfg.sentinels, 0)


# ------------------------------------------------------------------------------------------ real datasets
@pytest.fixture(scope="module")
def fim_tok(tmp_path_factory):
    rng = random.Random(1)
    texts = [random_text(rng, 100) for _ in range(100)]
    out = tmp_path_factory.mktemp("fim_tok")
    specials = (EOD_TOKEN, *SENTINELS, "<fim_pad>")
    path = train_bpe_tokenizer(texts, out, vocab_size=400, min_frequency=1, special_tokens=specials)["json"]
    return build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, fim_tok):
    d = tmp_path_factory.mktemp("fim_shards")
    rng = random.Random(2)
    texts = {}
    for name in ("code", "text"):
        texts[name] = [random_text(rng, rng.randint(1, 20)) for _ in range(1000)]
        writer = ShardWriter(str(d / name), fim_tok.vocab_size)
        for ids in fim_tok.encode_batch(texts[name]):
            writer.add_document(np.array([*ids, fim_tok.eod]))
        writer.finalize()
    return {"dir": d, "code": str(d / "code"), "text": str(d / "text"), "texts": texts}


def _cfg(corpus, tmp, tok, **kw):
    base = dict(
        seq_length=512,
        train_iters=100,
        train_data_paths=[corpus["code"], corpus["text"]],
        train_data_weights=[0.5, 0.5],
        train_data_fim_rates=[0.6, 0.0],
        fim_spm_rate=0.5,
        valid_data_paths=[corpus["code"]],
        data_cache_dir=str(tmp / "cache"),
        vocab_file=tok.vocab_file,
    )
    base.update(kw)
    return data_config(**base)


def _sentinel_ids(tok) -> FIMSentinels:
    prefix, middle, suffix = (tok.encode(s)[0] for s in SENTINELS)
    return FIMSentinels(prefix, middle, suffix)


def test_fim_datasets_by_brute_force(corpus, fim_tok, tmp_path):
    """Every training sample against megatron-core's own raw window: code samples carry whole FIM
    spans rebuilding their documents (decoding to the corpus' texts), text samples are untouched, the
    code rate is within tolerance, and the validation split (fim_rate 0) has no sentinel at all."""
    ds = build_datasets(_cfg(corpus, tmp_path, fim_tok), fim_tok)
    train, sent, eod = ds.train, _sentinel_ids(fim_tok), fim_tok.eod
    originals = set(corpus["texts"]["code"])
    runs = spans = whole_docs = 0
    for idx in range(len(train)):
        sample = train[idx]
        out = np.append(sample["tokens"].numpy(), sample["labels"][-1].item())
        assert np.array_equal(sample["labels"][:-1], sample["tokens"][1:])
        assert sample["loss_mask"].eq(1).all()
        source = train.datasets[int(sample["dataset_id"])]
        raw = source.dataset._query_document_sample_shuffle_indices(int(train.dataset_sample_index[idx]))[0]
        # our reading of the window as document pieces is megatron-core's own sample
        pieces = sample_pieces(source.dataset, int(train.dataset_sample_index[idx]))
        assert np.array_equal(np.concatenate([p.tokens for p in pieces]), raw)
        found = check_fim_sample(out, raw, sent, eod)
        if int(sample["dataset_id"]) == 1:
            assert found == [] and np.array_equal(out, raw)
            continue
        spans += len(found)
        segments = np.split(out, np.flatnonzero(out == eod) + 1)
        runs += sum(1 for s in segments if len(s) > 1)
        for seg in segments[1:-1]:  # whole documents: decode the FIM ones, parts back in order
            if seg[0] == sent.prefix:
                body = seg[:-1].tolist()
                s, m = body.index(sent.suffix), body.index(sent.middle)
                assert fim_tok.decode(body[1:s] + body[m + 1 :] + body[s + 1 : m]) in originals
                whole_docs += 1
    assert whole_docs > 100
    code_samples = int((np.asarray(train.dataset_index) == 0).sum())
    slack = 4 * np.sqrt(0.24 / runs) + code_samples / runs  # + the run each sample's end may cut
    assert abs(spans / runs - 0.6) < slack < 0.1, (spans, runs, slack)
    for idx in range(len(ds.valid)):  # valid_data_fim_rates unset and fim_rate 0: no FIM there
        assert not np.isin(ds.valid[idx]["tokens"].numpy(), list(sent.__dict__.values())).any()


def test_fim_samples_resume_and_repeat_exactly(corpus, fim_tok, tmp_path):
    """The loader's only state is still the number of samples consumed: a run resumed at any sample
    reads the same FIM samples as an uninterrupted one, and a rebuilt run the same again."""
    cfg = _cfg(corpus, tmp_path, fim_tok)

    def rows(consumed, n):
        it = build_data_iterators(cfg, fim_tok, consumed_train_samples=consumed, report=False).train
        return [r.tolist() for b in itertools.islice(it, n) for r in b["tokens"]]

    full = rows(0, 12)
    assert any(_sentinel_ids(fim_tok).prefix in r for r in full)
    assert rows(0, 12) == full
    assert rows(6, 9) == full[6:24]
    # and out of order, sample by sample: no hidden state in the dataset
    train = build_datasets(cfg, fim_tok).train
    order = list(range(24))
    random.Random(0).shuffle(order)
    got = {i: train[i]["tokens"].tolist() for i in order}
    assert [got[i] for i in range(24)] == full[:24]


# ------------------------------------------------------------------------------------------ bad input
def _yaml(tmp_path, text: str):
    path = tmp_path / "fim.yml"
    path.write_text("num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\n" + text)
    return path


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("fim_rate: 1.5\n", "fim_rate", "1.5"),
        ("fim_spm_rate: -0.1\n", "fim_spm_rate", "-0.1"),
        ("train_data_paths: [a, b]\ntrain_data_fim_rates: [0.5]\n", "train_data_fim_rates", "1 rates for 2"),
        ("train_data_paths: [a]\ntrain_data_fim_rates: [2]\n", "train_data_fim_rates", "2"),
        ("train_data_paths: [a]\ntrain_data_fim_rates: [yes]\n", "train_data_fim_rates", "True"),
        ("valid_data_fim_rates: [0.5]\n", "valid_data_fim_rates", "valid_data_paths is not set"),
        ("fim_suffix_token: <fim_prefix>\n", "fim_suffix_token", "'<fim_prefix>'"),
        ("fim_fragment_rate: 0.5\n", "fim_fragment_rate", "0.5"),
    ],
)
def test_bad_fim_keys_fail_in_one_line(tmp_path, text, key, value):
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config([path])
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and f"'{key}'" in msg and value in msg, msg


def test_neox_fim_keys_are_read(tmp_path):
    cfg = load_config([_yaml(tmp_path, "fim_rate: 0.5\nfim-spm-rate: 0.25\n")])
    assert (cfg.fim_rate, cfg.fim_spm_rate) == (0.5, 0.25)


def test_tokenizer_without_sentinels_fails_naming_them(corpus, tmp_path):
    """A FIM source with a tokenizer lacking the sentinels stops before any index is built, in one line
    naming the key, the token and the tokenizer file."""
    plain = build_tokenizer(tokenizer_type="HFTokenizer", vocab_file=tiny_tokenizer_files()["json"])
    cfg = data_config(
        train_data_paths=[corpus["code"]], fim_rate=0.5, data_cache_dir=str(tmp_path / "cache"), eval_iters=0
    )
    with pytest.raises(DataError) as err:
        build_datasets(cfg, plain)
    msg = str(err.value)
    assert (
        "\n" not in msg and "'fim_prefix_token'" in msg and "<fim_prefix>" in msg and plain.vocab_file in msg
    )
    assert not (tmp_path / "cache").exists()


def test_arcade100k_spelling_is_hinted_and_accepted():
    """Stability's Arcade100k spells the sentinels ``<|fim_prefix|>``: the default names fail with the
    setting to use, and configured to them the ids are Arcade100k's special tokens."""
    arcade = build_tokenizer(
        tokenizer_type="TiktokenTokenizer", vocab_file=tiny_tokenizer_files()["tiktoken"]
    )
    with pytest.raises(DataError, match=r"set fim_prefix_token: '<\|fim_prefix\|>'"):
        fim_sentinels(arcade, SENTINELS, FIM_SENTINEL_KEYS)
    ids = fim_sentinels(arcade, ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"], FIM_SENTINEL_KEYS)
    assert ids == FIMSentinels(
        *(arcade.special_tokens[f"<|fim_{p}|>"] for p in ("prefix", "middle", "suffix"))
    )
