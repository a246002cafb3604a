"""Deterministic synthetic token data in the Batch contract (ARCHITECTURE.md).

Sample ``i`` of the run is a function of ``(seed, i)`` only, and each data-parallel rank takes its slice
of every global batch exactly like the real loader, so runs at different DP/TP sizes, and resumed runs,
see the same samples. Used by the equivalence and resume tests and by ``train.py --synthetic-data``
(benchmarks, smoke tests). The token stream has learnable structure (a noisy repeating pattern) so
the loss visibly falls.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

# Web text (RefinedWeb and the like): log-normal document lengths in tokens, sigma 1, mean ~700.
WEB_DOCUMENT_SIGMA = 1.0
WEB_DOCUMENT_MEAN = 700


def web_document_length(rng: np.random.Generator) -> int:
    """One document length drawn like web text (mean ~700 tokens, at least 2): the packed documents
    of the GPU checks' real shard and of ``tools/benchmark.py --documents web``."""
    mu = math.log(WEB_DOCUMENT_MEAN) - WEB_DOCUMENT_SIGMA**2 / 2
    return int(np.clip(rng.lognormal(mu, WEB_DOCUMENT_SIGMA), 2, 200_000))


def web_document_tokens(rows: int, seq_length: int, vocab_size: int, eod: int, seed: int) -> np.ndarray:
    """``[rows, seq_length + 1]`` random tokens cut from one stream of web-like documents, each ending
    with ``eod``, consecutive rows overlapping by one token as megatron-core's samples do (so the
    inputs are ``[:, :-1]`` and the labels ``[:, 1:]``)."""
    rng = np.random.default_rng(seed)
    total = rows * seq_length + 1
    stream = rng.integers(0, vocab_size, size=total)
    stream[stream == eod] = (eod + 1) % vocab_size
    end = 0
    while True:
        end += web_document_length(rng)
        if end > total:
            break
        stream[end - 1] = eod
    starts = np.arange(rows) * seq_length
    return stream[starts[:, None] + np.arange(seq_length + 1)]


def sample(index: int, seq_length: int, vocab_size: int, seed: int) -> torch.Tensor:
    """``seq_length + 1`` tokens of sample ``index``: a per-sample arithmetic progression modulo a
    small alphabet, with 10% random tokens."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    alphabet = max(2, min(vocab_size, 64))
    start = int(torch.randint(0, alphabet, (1,), generator=gen))
    stride = int(torch.randint(1, 4, (1,), generator=gen))
    tokens = (start + stride * torch.arange(seq_length + 1)) % alphabet
    noise = torch.rand(seq_length + 1, generator=gen) < 0.1
    tokens[noise] = torch.randint(0, vocab_size, (int(noise.sum()),), generator=gen)
    return tokens.long()


@dataclass
class SyntheticIterators:
    """Same shape as ``megatron_stablelm.data.DataIterators`` (what the trainer reads)."""

    train: Iterator[dict]
    valid: Iterator[dict]
    test: Iterator[dict]
    samples_per_eval: int


@dataclass
class SyntheticData:
    """Per-rank micro-batch iterators over :func:`sample`, dealt like the real loader: each global batch
    is a contiguous range of sample indices, rank ``r`` takes the ``r``-th block of
    ``micro × accumulation`` samples, in micro-batches."""

    seq_length: int
    vocab_size: int
    micro_batch: int
    accumulation: int
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 1234
    eval_iters: int = 1

    def _iterate(self, consumed_samples: int, seed: int, limit: int | None = None) -> Iterator[dict]:
        per_rank = self.micro_batch * self.accumulation
        global_batch = per_rank * self.dp_size
        start = consumed_samples
        produced = 0
        while limit is None or produced < limit:
            base = start + self.dp_rank * per_rank
            for m in range(self.accumulation):
                first = base + m * self.micro_batch
                rows = torch.stack(
                    [
                        sample(first + j, self.seq_length, self.vocab_size, seed)
                        for j in range(self.micro_batch)
                    ]
                )
                b, s = rows.shape[0], self.seq_length
                yield {
                    "tokens": rows[:, :-1].contiguous(),
                    "labels": rows[:, 1:].contiguous(),
                    "loss_mask": torch.ones(b, s, dtype=torch.float32),
                    "position_ids": torch.arange(s).expand(b, s).contiguous(),
                }
            start += global_batch
            produced += 1

    def iterators(
        self, consumed_train_samples: int = 0, consumed_valid_samples: int = 0
    ) -> SyntheticIterators:
        global_batch = self.micro_batch * self.accumulation * self.dp_size
        return SyntheticIterators(
            train=self._iterate(consumed_train_samples, self.seed),
            valid=self._iterate(consumed_valid_samples, self.seed + 1),
            test=self._iterate(0, self.seed + 2),
            samples_per_eval=self.eval_iters * global_batch,
        )
