"""Tokenizers selected by the config's ``tokenizer_type`` / ``vocab_file``, all loaded from local files.

Three kinds are supported, the two the StableLM family was trained with and GPT-NeoX's SentencePiece one:

* ``TiktokenTokenizer`` (Arcade100k, Stable LM 2): a tiktoken ``Encoding`` built from a ``.tiktoken``
  ranks file (one ``base64(token_bytes) rank`` per line) with the cl100k split pattern changed to split
  every digit on its own, and the special tokens appended after the ranks.
* ``HFTokenizer`` (GPT-NeoX-20B, StableLM-3B-4E1T / Alpha): a ``tokenizer.json`` read by the
  ``tokenizers`` library.
* ``SPMTokenizer`` (GPT-NeoX's Llama family configs): a SentencePiece ``.model`` read by the
  ``sentencepiece`` package, as GPT-NeoX reads it (see :class:`SPMTokenizer` for its end-of-document id).

Both expose what the data pipeline and megatron-core's datasets need, duck-typed the same way:
``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``, ``encode`` / ``encode_batch`` and
``decode``. Nothing here ever touches the network: a missing file is a :class:`TokenizerError` that
says which file to provide.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megatron_stablelm.config.choices import TOKENIZER_TYPES

__all__ = [
    "ARCADE100K_PATTERN",
    "ARCADE100K_SPECIAL_TOKENS",
    "HFTokenizer",
    "SPMTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerError",
    "build_tokenizer",
    "hf_tokenizer_from_sentencepiece",
    "hf_tokenizer_from_tiktoken",
    "load_tiktoken_ranks",
    "tokenizer_in_directory",
    "write_tiktoken_ranks",
]


class TokenizerError(ValueError):
    """A tokenizer could not be built; the message names the file or key at fault."""


# The cl100k pre-tokenisation pattern with ``\p{N}{1,3}`` replaced by ``\p{N}``: Arcade100k splits
# numbers into single digits (better arithmetic), everything else is as in cl100k.
ARCADE100K_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Arcade100k's special tokens, in id order. They follow the ranks: with the published 100,256-rank
# file the first one (EOD) is 100257, because cl100k left id 100256 unused and Arcade100k kept that
# gap; with any other ranks file they start right after the last rank.
ARCADE100K_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<gh_stars>",
    "<filename>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
    "<|endofprompt|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|pause|>",
    *(f"<|reg{i}|>" for i in range(8)),
    "<|extra0|>",
)
_CL100K_RANKS = 100256  # number of ranks in cl100k / arcade100k; their specials start one id later

_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")

# tiktoken's built-in encodings that are a single ranks file at this address.
_BUILTIN_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"


class Tokenizer(ABC):
    """What every tokenizer offers. ``pad`` is -1: the data pipeline never pads training samples,
    and megatron-core masks any padding it does produce (for which it needs an id outside the vocab)."""

    name: str
    vocab_file: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (special tokens included, before padding)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """The end-of-document id appended after every document."""

    @property
    def pad(self) -> int:
        return -1

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What makes two tokenizers the same for megatron-core's index-cache hash: the class and the
        content of the vocabulary file (not its path, so a copied file still hits the cache)."""
        return OrderedDict([("class", type(self).__name__), ("vocab_sha1", _sha1_file(self.vocab_file))])

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no EOD appended)."""

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    # megatron-style aliases
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.vocab_file!r}, vocab_size={self.vocab_size}, eod={self.eod})"


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha1_file(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha1(usedforsecurity=False)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


# ----------------------------------------------------------------------------------------- tiktoken
def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a ``.tiktoken`` ranks file (``base64 rank`` per line) with clear errors."""
    path = str(path)
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
                if len(parts) != 2:
                    raise ValueError
            except (ValueError, IndexError, base64.binascii.Error):
                raise TokenizerError(
                    f"{path}:{line_no}: not a tiktoken ranks line (expected 'base64 rank')"
                ) from None
            ranks[token] = rank
    if not ranks:
        raise TokenizerError(f"{path}: the tiktoken ranks file is empty")
    return ranks


def write_tiktoken_ranks(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write ``ranks`` as a ``.tiktoken`` file, ordered by rank."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")


class TiktokenTokenizer(Tokenizer):
    """Arcade100k-style tiktoken tokenizer from a local ranks file.

    ``special_tokens`` defaults to Arcade100k's list. Text is encoded with special tokens recognised
    (like the ``tokenizers`` library does for added tokens), so both tokenizer kinds treat a literal
    ``<|endoftext|>`` in the data the same way.
    """

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        *,
        pattern: str = ARCADE100K_PATTERN,
        special_tokens: Sequence[str] = ARCADE100K_SPECIAL_TOKENS,
        eod_token: str = "<|endoftext|>",
    ) -> None:
        import tiktoken

        self.vocab_file = str(vocab_file)
        self.name = Path(self.vocab_file).stem
        if os.path.isfile(self.vocab_file):
            ranks = load_tiktoken_ranks(self.vocab_file)
            max_rank = max(ranks.values())
            start = _CL100K_RANKS + 1 if len(ranks) == _CL100K_RANKS else max_rank + 1
            specials = {tok: start + i for i, tok in enumerate(special_tokens)}
            self._encoding = tiktoken.Encoding(
                name=self.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
            )
        else:
            self._encoding = _builtin_tiktoken(self.vocab_file)
            self.vocab_file = _builtin_cache_path(self.vocab_file)
        if eod_token not in self._encoding._special_tokens:
            raise TokenizerError(f"{vocab_file}: the tokenizer has no end-of-document token {eod_token!r}")
        self._eod = self._encoding._special_tokens[eod_token]

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._encoding._special_tokens)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self._encoding.encode(t, allowed_special="all") for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids])


def _builtin_cache_path(name: str) -> str:
    import tempfile

    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    key = hashlib.sha1(_BUILTIN_URL.format(name=name).encode(), usedforsecurity=False).hexdigest()
    return os.path.join(cache_dir, key)


def _builtin_tiktoken(name: str) -> Any:
    """A tiktoken built-in encoding, only if its file is already in tiktoken's cache."""
    import tiktoken

    if name not in tiktoken.list_encoding_names():
        raise TokenizerError(
            f"vocab_file '{name}' does not exist (and is not a built-in tiktoken encoding name)"
        )
    url = _BUILTIN_URL.format(name=name)
    if not os.path.isfile(_builtin_cache_path(name)):
        raise TokenizerError(
            f"vocab_file '{name}' names a built-in tiktoken encoding that is not cached on this machine "
            f"and nothing is downloaded: fetch {url} (for Stable LM 2: arcade100k.tiktoken from the "
            f"model's repository) and set vocab_file to the local file"
        )
    return tiktoken.get_encoding(name)


# ---------------------------------------------------------------------------------------- HF tokenizers
class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` (e.g. GPT-NeoX-20B's) through the ``tokenizers`` library."""

    def __init__(self, vocab_file: str | os.PathLike, *, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _HFTok

        self.vocab_file = str(vocab_file)
        self.name = Path(self.vocab_file).stem
        try:
            self._tok = _HFTok.from_file(self.vocab_file)
        except Exception as err:  # the library's error does not say which file
            raise TokenizerError(f"{self.vocab_file}: not a valid tokenizer.json ({err})") from None
        candidates = (eod_token,) if eod_token else _EOD_CANDIDATES
        eod = next(
            (self._tok.token_to_id(t) for t in candidates if self._tok.token_to_id(t) is not None), None
        )
        if eod is None:
            raise TokenizerError(
                f"{self.vocab_file}: no end-of-document token found (tried {', '.join(candidates)})"
            )
        self._eod = int(eod)
        self._vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


# ------------------------------------------------------------------------------------------ SentencePiece
# The piece GPT-NeoX's SentencePiece tokenizer takes as its end-of-document token.
SPM_EOD_PIECE = "<|endoftext|>"


class SPMTokenizer(Tokenizer):
    """A SentencePiece ``.model`` through the ``sentencepiece`` package, as GPT-NeoX's ``SPMTokenizer``
    reads it: ids are ``SentencePieceProcessor.encode``'s (no BOS or EOS added), the vocabulary is the
    model's piece count, and the end-of-document id is ``piece_to_id("<|endoftext|>")``. A model
    without that piece (Llama's, Code Llama's) answers with its unknown piece's id (``<unk>``, 0):
    that is the id GPT-NeoX appends after every document of such a model, kept here so that shards
    preprocessed by GPT-NeoX and by this framework hold the same ids (:attr:`eod_is_unknown` says so)."""

    def __init__(self, vocab_file: str | os.PathLike) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError(
                "tokenizer_type SPMTokenizer needs the sentencepiece package: pip install sentencepiece"
            ) from None
        self.vocab_file = str(vocab_file)
        self.name = Path(self.vocab_file).stem
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=self.vocab_file)
        except (OSError, RuntimeError) as err:  # the library's error does not always name the file
            raise TokenizerError(f"{self.vocab_file}: not a SentencePiece model ({err})") from None
        self._eod = int(self._sp.piece_to_id(SPM_EOD_PIECE))

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eod_is_unknown(self) -> bool:
        """The model has no ``<|endoftext|>`` piece: documents end with the unknown piece, as in GPT-NeoX."""
        return self._sp.id_to_piece(self._eod) != SPM_EOD_PIECE

    @property
    def bos_id(self) -> int:
        """The model's own beginning-of-sequence id (-1 when it has none)."""
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        """The end-of-sequence id an exported model stops at: ``<|endoftext|>`` when the model has it
        (the end-of-document token it was trained with), else the model's own EOS piece (``</s>``)."""
        return self._eod if not self.eod_is_unknown or self._sp.eos_id() < 0 else int(self._sp.eos_id())

    def piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def hf_tokenizer_from_sentencepiece(path: str | os.PathLike) -> Any:
    """A ``tokenizers.Tokenizer`` encoding like the SentencePiece model at ``path`` (its normaliser,
    dummy prefix, byte fallback, BPE merges from the piece scores or unigram scores), built by
    ``transformers``' own SentencePiece converter, so ``AutoTokenizer`` loads it without
    ``sentencepiece``. No BOS is added, as the framework trains."""
    from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

    extractor = SentencePieceExtractor(str(path))
    vocab = extractor.extract(None)["vocab"]
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(extractor.proto, vocab, legacy=True)
    if tokenizer is None:
        raise TokenizerError(f"{path}: transformers cannot convert this SentencePiece model")
    return tokenizer


# ----------------------------------------------------------------------------------------- export / import
def tokenizer_in_directory(directory: str | os.PathLike) -> tuple[str, Path] | None:
    """``(tokenizer_type, file)`` of the tokenizer a model directory holds: a ``.tiktoken`` ranks file
    (Arcade100k, the form the framework trains with), else a ``tokenizer.json``, else a SentencePiece
    ``tokenizer.model``; None if none."""
    directory = Path(directory)
    ranks = sorted(directory.glob("*.tiktoken"))
    if ranks:
        return "TiktokenTokenizer", ranks[0]
    if (directory / "tokenizer.json").is_file():
        return "HFTokenizer", directory / "tokenizer.json"
    if (directory / "tokenizer.model").is_file():
        return "SPMTokenizer", directory / "tokenizer.model"
    return None


def tokenizer_type_of_file(path: str | os.PathLike) -> str:
    """The ``tokenizer_type`` of a tokenizer file, from its suffix."""
    suffix = Path(path).suffix
    return {".tiktoken": "TiktokenTokenizer", ".model": "SPMTokenizer"}.get(suffix, "HFTokenizer")


def load_tokenizer(cfg: Any, path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint's user: ``path`` (a ``tokenizer.json``, a ``.tiktoken`` ranks file,
    a SentencePiece ``.model``, or a directory holding one) when given, else the checkpoint config's ``tokenizer_type``/``vocab_file``."""
    if path is None:
        if not cfg.vocab_file:
            raise TokenizerError(
                "the checkpoint's config names no vocab_file; give the tokenizer with --tokenizer"
            )
        return build_tokenizer(cfg)
    path = Path(path)
    if path.is_dir():
        found = tokenizer_in_directory(path)
        if found is None:
            raise TokenizerError(
                f"tokenizer directory '{path}' holds no tokenizer.json, .tiktoken or tokenizer.model file"
            )
        kind, path = found
    elif not path.is_file():
        raise TokenizerError(f"tokenizer file '{path}' does not exist")
    else:
        kind = tokenizer_type_of_file(path)
    return build_tokenizer(tokenizer_type=kind, vocab_file=str(path))


def hf_tokenizer_from_tiktoken(tok: TiktokenTokenizer) -> Any:
    """A ``tokenizers.Tokenizer`` giving ``tok``'s ids, special tokens included, so that
    ``AutoTokenizer`` loads an Arcade100k-style tokenizer without remote code. ``transformers``'
    tiktoken converter derives the BPE merges from the ranks; the special tokens keep ``tok``'s ids
    (with the published ranks they start one id after the last rank, a gap the converter would close)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTok
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _RanksConverter(TikTokenConverter):
        def load_tiktoken_bpe(self, tiktoken_url: str) -> dict[bytes, int]:
            return tok._encoding._mergeable_ranks

    converted = _RanksConverter(pattern=tok._encoding._pat_str).converted()
    spec = json.loads(converted.to_str())
    spec["model"]["vocab"].update(tok.special_tokens)
    result = HFTok.from_str(json.dumps(spec))
    result.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t in sorted(tok.special_tokens, key=tok.special_tokens.get)
        ]
    )
    return result


# ---------------------------------------------------------------------------------------------- factory
def build_tokenizer(
    cfg: Any = None, *, tokenizer_type: str | None = None, vocab_file: str | None = None
) -> Tokenizer:
    """The tokenizer named by ``cfg.tokenizer_type`` / ``cfg.vocab_file`` (or the keyword overrides).

    Raises :class:`TokenizerError` naming the key or file for an unknown type or a missing file, so a
    run fails before any process group or model is built.
    """
    tokenizer_type = tokenizer_type or getattr(cfg, "tokenizer_type", None) or "HFTokenizer"
    vocab_file = vocab_file or getattr(cfg, "vocab_file", None)
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(
            f"key 'tokenizer_type': {tokenizer_type!r} is not supported; expected one of "
            f"{', '.join(TOKENIZER_TYPES)}"
        )
    if not vocab_file:
        raise TokenizerError(f"key 'vocab_file' is required for tokenizer_type {tokenizer_type}")
    if tokenizer_type in ("HFTokenizer", "SPMTokenizer"):
        if not os.path.isfile(vocab_file):
            raise TokenizerError(
                f"vocab_file '{vocab_file}' does not exist (tokenizer_type {tokenizer_type})"
            )
        return HFTokenizer(vocab_file) if tokenizer_type == "HFTokenizer" else SPMTokenizer(vocab_file)
    if not os.path.isfile(vocab_file) and os.sep not in vocab_file and not vocab_file.endswith(".tiktoken"):
        return TiktokenTokenizer(vocab_file)  # a built-in encoding name; fails clearly if not cached
    if not os.path.isfile(vocab_file):
        raise TokenizerError(f"vocab_file '{vocab_file}' does not exist (tokenizer_type TiktokenTokenizer)")
    return TiktokenTokenizer(vocab_file)
