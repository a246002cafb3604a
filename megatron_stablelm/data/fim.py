"""Fill-in-the-middle (FIM) for code sources, applied per document while samples are read.

Why: Stability's code models were trained the StarCoder way (its GPT-NeoX fork's ``fim_rate`` /
``fim_spm_rate``): a fraction of the documents is cut into prefix / middle / suffix and reordered
around sentinel tokens, so the model learns to infill. Here it is a per-source option, off by default.

Where it happens. megatron-core's ``GPTDataset`` packs each source's shuffled documents into windows
of ``seq_length + 1`` tokens (its sample index). :class:`FIMDataset` wraps one source's dataset and,
for each sample, reads the same window as megatron-core, but as its *document pieces* (from the sample
index: a piece never crosses a document boundary), and transforms each piece with probability
``rate``. Nothing in the cached indexes changes, so FIM and non-FIM runs share one index cache.

The transform of a piece (tokens, its document's trailing EOD kept out of the span and after it)::

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle [EOD]
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle [EOD]

(SPM is the variant StarCoder trained with: the prefix sentinel first, then the suffix.) The two cut
points are drawn uniformly over the piece's *token* boundaries. Token rather than character cuts
(StarCoder decodes, cuts characters and re-encodes) because they are exact: no re-tokenisation, so
the transformed piece is exactly its tokens plus three sentinels, decodes to the same bytes, and a
piece cut from the middle of a document (a window starts or ends inside it) never has a half
multi-byte character to re-encode; and the data loader needs no tokenizer. The cost is that a middle
always starts on a token boundary of the original tokenisation.

Length: every FIM span adds three sentinels, and a sample must stay exactly ``seq_length + 1``
tokens. The pieces are transformed in order into an output of that length; the raw tokens that no
longer fit are the window's last ``3 x (FIM spans)`` tokens, which are dropped (as the GPT-NeoX fork
and StarCoder drop what overflows). A FIM span that would overflow is made from the part of its
piece that fits, so no span is ever cut: every span, its parts put back in order, is exactly a run of
original tokens of one document, and the sample's content is the window's first ``seq + 1 - 3k``
tokens in order. A piece with no tokens left for a span (or none at all) stays as it is.

Determinism: the draws of a sample come from a generator seeded by (``seed``, split, source,
per-source sample index), four draws per piece in order whatever the outcome. A sample is therefore
a pure function of the config and its index: any sample, any worker, any resume point gives the same
tokens, and the loader's only state stays the number of samples consumed.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from megatron_stablelm.data.errors import DataError

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDataset

    from megatron_stablelm.tokenizers import Tokenizer

__all__ = [
    "FIMDataset",
    "FIMSettings",
    "FIMSentinels",
    "Piece",
    "fim_sample",
    "fim_sentinels",
    "sample_pieces",
]

# Mixed into every generator seed so FIM's draws never coincide with another user of ``seed``.
_SEED_TAG = zlib.crc32(b"megatron_stablelm fill-in-the-middle")
SENTINELS_PER_SPAN = 3


@dataclass(frozen=True)
class FIMSentinels:
    """Token ids of the three sentinels a FIM span uses."""

    prefix: int
    middle: int
    suffix: int


@dataclass(frozen=True)
class FIMSettings:
    """How one source is transformed: the FIM and SPM rates, the sentinel ids, the EOD id, and the
    ``stream`` integers (seed, split, source) that seed its per-sample draws."""

    rate: float
    spm_rate: float
    sentinels: FIMSentinels
    eod: int
    stream: tuple[int, ...]


@dataclass(frozen=True)
class Piece:
    """A run of one document's tokens inside a sample window. ``ends_document``: the run reaches the
    end of its document (so a trailing EOD there is the document's own). ``document`` is False for
    megatron-core's padding, which is never transformed."""

    tokens: np.ndarray
    ends_document: bool
    document: bool = True


def fim_sentinels(tokenizer: Tokenizer, names: Sequence[str], keys: Sequence[str]) -> FIMSentinels:
    """The ids of the prefix / middle / suffix sentinels ``names`` (from config keys ``keys``).

    A sentinel must be one token of the tokenizer that decodes to its name (an added / special token
    such as StarCoder's ``<fim_prefix>``) and not the EOD token. Raises :class:`DataError` naming the
    key, the token and the tokenizer file otherwise: without the sentinels the model could not be
    prompted for infilling, and a multi-token "sentinel" would be indistinguishable from text.
    """
    ids = []
    for key, name in zip(keys, names):
        encoded = tokenizer.encode(name)
        if not _is_token(tokenizer, name):
            other = _other_spelling(name)
            hint = f"; it has {other!r}: set {key}: '{other}'" if _is_token(tokenizer, other) else ""
            raise DataError(
                f"key '{key}': the tokenizer '{tokenizer.vocab_file}' has no token {name!r} "
                f"(it encodes to {len(encoded)} tokens){hint}; FIM needs the sentinel tokens"
            )
        if encoded[0] == tokenizer.eod:
            raise DataError(f"key '{key}': {name!r} is the end-of-document token of '{tokenizer.vocab_file}'")
        ids.append(int(encoded[0]))
    if len(set(ids)) != len(ids):
        raise DataError(f"keys {', '.join(keys)}: the FIM sentinels {list(names)} are not distinct tokens")
    return FIMSentinels(*ids)


def _is_token(tokenizer: Tokenizer, name: str) -> bool:
    """Whether ``name`` is one token of ``tokenizer`` (it encodes to one id that decodes to it)."""
    encoded = tokenizer.encode(name)
    return len(encoded) == 1 and tokenizer.decode(encoded) == name


def _other_spelling(name: str) -> str:
    """StarCoder's ``<fim_prefix>`` <-> Arcade100k's ``<|fim_prefix|>`` (Stability's tokenizer)."""
    if name.startswith("<|") and name.endswith("|>"):
        return f"<{name[2:-2]}>"
    if name.startswith("<") and name.endswith(">"):
        return f"<|{name[1:-1]}|>"
    return name


def sample_rng(stream: Sequence[int], index: int) -> np.random.Generator:
    """The generator of sample ``index`` of the source ``stream`` identifies (seed, split, source)."""
    return np.random.default_rng([_SEED_TAG, *(int(s) for s in stream), int(index)])


def fim_sample(
    pieces: Sequence[Piece], length: int, settings: FIMSettings, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """The window ``pieces`` with FIM applied per piece, exactly ``length`` tokens, and the number of
    FIM spans. See the module docstring for the format, the length rule and the draws."""
    sent, eod = settings.sentinels, settings.eod
    # four draws per piece, in order, whatever happens to it: a piece's draws never depend on another's
    draws = rng.random((len(pieces), 4)).tolist()
    out = np.empty(length, dtype=np.int64)
    used = spans = 0

    def put(part) -> None:
        nonlocal used
        out[used : used + len(part)] = part
        used += len(part)

    for piece, (u_fim, u_spm, u_a, u_b) in zip(pieces, draws):
        room = length - used
        if room <= 0:
            break
        tokens = piece.tokens
        n = len(tokens)
        tail = int(piece.ends_document and n > 0 and tokens[-1] == eod)
        n -= tail  # the span's tokens: the document's own EOD stays after it
        if n + SENTINELS_PER_SPAN + tail > room:  # only part of the piece fits: no EOD, fewer tokens
            n, tail = room - SENTINELS_PER_SPAN, 0
        if not (piece.document and u_fim < settings.rate and n > 0):
            put(tokens[:room])
            continue
        lo, hi = sorted((int(u_a * (n + 1)), int(u_b * (n + 1))))
        if u_spm < settings.spm_rate:  # SPM: <P> <S> suffix <M> prefix middle
            put((sent.prefix, sent.suffix))
            put(tokens[hi:n])
            put((sent.middle,))
            put(tokens[:hi])
        else:  # PSM: <P> prefix <S> suffix <M> middle
            put((sent.prefix,))
            put(tokens[:lo])
            put((sent.suffix,))
            put(tokens[hi:n])
            put((sent.middle,))
            put(tokens[lo:hi])
        put(tokens[n : n + tail])
        spans += 1
    if used != length:  # the pieces always cover the window; this guards the arithmetic
        raise AssertionError(f"FIM sample has {used} tokens, expected {length}")
    return out, spans


def sample_pieces(dataset: GPTDataset, idx: int) -> list[Piece]:
    """Sample ``idx`` of megatron-core's ``GPTDataset`` as document pieces: the same tokens its
    ``_query_document_sample_shuffle_indices`` concatenates (from the shuffle, sample and document
    indexes), kept apart per document, then its padding if any."""
    extra = int(dataset.config.add_extra_token_to_sequence)
    lengths = dataset.dataset.sequence_lengths
    j = int(dataset.shuffle_index[idx])
    beg, beg_offset = (int(v) for v in dataset.sample_index[j])
    end, end_offset = (int(v) for v in dataset.sample_index[j + 1])
    pieces = []
    for i in range(beg, end + 1):
        doc = int(dataset.document_index[i])
        start = beg_offset if i == beg else 0
        stop = end_offset + extra if i == end else int(lengths[doc])
        tokens = dataset.dataset.get(doc, offset=start, length=stop - start)
        pieces.append(Piece(np.asarray(tokens, dtype=np.int64), stop >= int(lengths[doc])))
    total = sum(len(p.tokens) for p in pieces)
    want = dataset.config.sequence_length + extra
    if total < want:
        pad = np.full(want - total, dataset._pad_token_id, dtype=np.int64)
        pieces.append(Piece(pad, False, document=False))
    return pieces


class FIMDataset(torch.utils.data.Dataset):
    """One source's megatron-core ``GPTDataset`` with FIM applied to its samples (see the module
    docstring). Offers what ``BlendedDataset`` reads of its parts (``index_split``,
    ``unique_identifiers``), so a split's sources are blended as before; with ``rate`` 0 it hands the
    wrapped samples through unchanged (a split's parts must all be of one type)."""

    def __init__(self, dataset: GPTDataset, settings: FIMSettings) -> None:
        if not dataset.config.add_extra_token_to_sequence:  # what build_datasets always configures
            raise ValueError("FIMDataset needs samples of sequence_length + 1 tokens")
        self.dataset = dataset
        self.settings = settings
        self.index_split = dataset.index_split
        self.unique_identifiers = {
            **dataset.unique_identifiers,
            "fim": {"rate": settings.rate, "spm_rate": settings.spm_rate, "stream": list(settings.stream)},
        }

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        """The wrapped dataset's other attributes (its indexes, config ...), for tools that read them."""
        if name == "dataset":  # not set yet (unpickling in a worker): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if self.settings.rate == 0:
            return self.dataset[idx]
        length = self.dataset.config.sequence_length + 1
        text, _ = fim_sample(
            sample_pieces(self.dataset, idx), length, self.settings, sample_rng(self.settings.stream, idx)
        )
        text = torch.from_numpy(text)
        tokens, labels = text[:-1].clone(), text[1:].clone()
        pad = self.dataset._pad_token_id
        loss_mask = (labels != pad).to(torch.float32)  # megatron-core masks only its padding here
        tokens[tokens == pad] = 0
        labels[labels == pad] = 0
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": torch.arange(len(tokens), dtype=torch.int64),
        }
