"""Train a small byte-level BPE tokenizer on local text, so tests and the demo never download one.

The pre-tokeniser is Arcade100k's split pattern (single digits), so the same vocabulary can be written
both as a ``tokenizer.json`` (for :class:`~megatron_stablelm.tokenizers.HFTokenizer`) and as a
``.tiktoken`` ranks file (for :class:`~megatron_stablelm.tokenizers.TiktokenTokenizer`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from megatron_stablelm.tokenizers import ARCADE100K_PATTERN, write_tiktoken_ranks

EOD_TOKEN = "<|endoftext|>"


def train_bpe_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 4096,
    min_frequency: int = 2,
    special_tokens: tuple[str, ...] = (EOD_TOKEN,),
    write_tiktoken: bool = False,
) -> dict[str, str]:
    """Train on ``texts`` and write ``tokenizer.json`` (and ``tokenizer.tiktoken``) under ``out_dir``.

    Returns the written paths by kind (``"json"``, ``"tiktoken"``).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(ARCADE100K_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "tokenizer.json")}
    tok.save(paths["json"])
    if write_tiktoken:
        paths["tiktoken"] = str(out / "tokenizer.tiktoken")
        write_tiktoken_ranks(hf_vocab_to_ranks(tok.get_vocab(), set(special_tokens)), paths["tiktoken"])
    return paths


def hf_vocab_to_ranks(vocab: dict[str, int], special: set[str]) -> dict[bytes, int]:
    """A byte-level BPE vocabulary (GPT-2 byte-to-unicode strings) as tiktoken ranks: the tokens'
    bytes, ranked in id order (= merge order), specials left out (tiktoken appends them itself)."""
    from tokenizers import pre_tokenizers  # noqa: F401  (keeps the import cost where it is needed)

    decode = _unicode_to_byte()
    ranks: dict[bytes, int] = {}
    for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        if token in special:
            continue
        ranks[bytes(decode[c] for c in token)] = len(ranks)
    return ranks


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's reversible byte → printable-character table, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}
