"""Micro-batches for each data-parallel rank, and the document-aware fields of the batch contract.

Sample order is global and fixed by the datasets (seeded); a run's position in it is one integer, the
number of samples consumed. From ``consumed`` on, the samples are dealt out in chunks of
``micro x dp``: micro-step ``k`` gives rank ``r`` the samples
``consumed + k*micro*dp + r*micro + [0, micro)``. Every global batch (``grad_accum`` micro-steps) is
therefore the same contiguous range of samples whatever ``dp`` is, and a run resumed at
``consumed`` -- with the same or another data-parallel size -- reads exactly the samples not yet read.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["Collate", "MicroBatchSampler", "document_fields", "make_loader"]


class MicroBatchSampler:
    """Index lists of this rank's micro-batches, from sample ``consumed`` until the dataset ends
    (a last partial ``micro x dp`` chunk is dropped)."""

    def __init__(self, total: int, consumed: int, micro: int, dp_rank: int, dp_size: int) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
        if micro < 1:
            raise ValueError(f"micro-batch size must be >= 1, got {micro}")
        if consumed < 0:
            raise ValueError(f"consumed samples must be >= 0, got {consumed}")
        self.total, self.consumed, self.micro = total, consumed, micro
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __len__(self) -> int:
        return max(0, (self.total - self.consumed) // (self.micro * self.dp_size))

    def __iter__(self) -> Iterator[list[int]]:
        chunk = self.micro * self.dp_size
        start = self.consumed + self.dp_rank * self.micro
        for k in range(len(self)):
            first = start + k * chunk
            yield list(range(first, first + self.micro))


def document_fields(
    tokens: np.ndarray,
    eod: int,
    *,
    reset_position_ids: bool,
    reset_attention_mask: bool,
) -> tuple[np.ndarray, np.ndarray | None, int | None]:
    """Position ids ``[b, s]`` and, with ``reset_attention_mask``, ``cu_seqlens`` over the flattened
    ``b*s`` tokens and the longest document.

    A document ends with (and includes) its EOD token; each row of the batch also starts a document.
    This is megatron-core's convention for ``reset_position_ids`` / ``reset_attention_mask``, expressed
    as flash-attn varlen boundaries instead of a dense mask.
    """
    b, s = tokens.shape
    starts = np.zeros((b, s), dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eod
    cols = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))
    if reset_position_ids:
        last_start = np.maximum.accumulate(np.where(starts, cols, 0), axis=1)
        position_ids = cols - last_start
    else:
        position_ids = np.array(cols)
    if not reset_attention_mask:
        return position_ids, None, None
    cu = np.append(np.flatnonzero(starts), b * s).astype(np.int32)
    return position_ids, cu, int(np.diff(cu).max())


class Collate:
    """Stack megatron-core samples into the batch contract of ARCHITECTURE.md.

    ``eod_mask_loss`` zeroes the loss where the *target* is EOD (the issue's definition; megatron-core
    instead masks where the input is EOD).
    """

    def __init__(
        self, eod: int, *, reset_position_ids: bool, reset_attention_mask: bool, eod_mask_loss: bool
    ):
        self.eod = eod
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask
        self.eod_mask_loss = eod_mask_loss

    def __call__(self, samples: Sequence[dict]) -> dict:
        tokens = torch.stack([s["tokens"] for s in samples])
        labels = torch.stack([s["labels"] for s in samples])
        loss_mask = torch.stack([s["loss_mask"] for s in samples]).to(torch.float32)
        if self.eod_mask_loss:
            loss_mask[labels == self.eod] = 0.0
        pos, cu, max_len = document_fields(
            tokens.numpy(),
            self.eod,
            reset_position_ids=self.reset_position_ids,
            reset_attention_mask=self.reset_attention_mask,
        )
        batch = {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": torch.from_numpy(pos),
        }
        if cu is not None:
            batch["cu_seqlens"] = torch.from_numpy(cu)
            batch["max_seqlen"] = max_len
        return batch


class _Fetch(torch.utils.data.Dataset):
    """Hands megatron-core samples through, keeping only the fields the batch uses."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        sample = self.dataset[idx]
        return {"tokens": sample["tokens"], "labels": sample["labels"], "loss_mask": sample["loss_mask"]}


def make_loader(
    dataset,
    collate: Collate,
    *,
    consumed: int,
    micro: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over this rank's micro-batches; order does not depend on ``num_workers``."""
    sampler = MicroBatchSampler(len(dataset), consumed, micro, dp_rank, dp_size)
    return torch.utils.data.DataLoader(
        _Fetch(dataset),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
