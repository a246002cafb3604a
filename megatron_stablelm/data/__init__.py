"""The data pipeline: tokenizers, indexed shards, blended multi-epoch datasets, per-rank micro-batches.

Public API (what the trainer calls)
-----------------------------------
``build_tokenizer(cfg) -> Tokenizer``
    From ``cfg.tokenizer_type`` ('HFTokenizer' | 'TiktokenTokenizer') and ``cfg.vocab_file`` (a local
    ``tokenizer.json`` / ``.tiktoken`` file; never downloaded). ``tok.vocab_size``, ``tok.eod``,
    ``tok.encode(text)``, ``tok.encode_batch(texts)``, ``tok.decode(ids)``. Errors:
    ``TokenizerError`` (a ``ValueError``) naming the key or file. The embedding size is
    ``cfg.padded_vocab(tok.vocab_size)``.

``build_data_iterators(cfg, tokenizer, *, dp_rank=0, dp_size=1, consumed_train_samples=0,
consumed_valid_samples=0, num_workers=None, device=None, report=True) -> DataIterators``
    Call on every rank after the process groups exist (or without any, single process). It checks
    every shard first (missing file, magic, ``.idx`` vs ``.bin``, ids >= vocab: ``ShardError``/``DataError``,
    both ``ValueError``, naming the file or key), builds each split sized for the whole run, rank 0
    building missing index caches in ``cfg.data_cache_dir`` (default: ``index-cache/`` beside the first
    training shard) while the others wait at a barrier, and prints the mixture report on rank 0.
    Every cache file is checked from its ``.npy`` header and read without pickle; a bad one is rebuilt
    in a private cache directory and refused (``DataError`` naming it) in a shared one
    (:mod:`megatron_stablelm.data.index_cache`). Shards may hold empty documents (Megatron-LM's).
    ``.train`` / ``.valid`` / ``.test`` are iterators of micro-batches (``None`` for a split without
    data), each a dict as in ARCHITECTURE.md's batch contract: ``tokens``, ``labels`` ``[b, s]`` int64,
    ``loss_mask`` ``[b, s]`` float32, ``position_ids`` ``[b, s]`` int64, and with
    ``reset_attention_mask`` ``cu_seqlens`` (int32, over the flattened ``b*s`` tokens) and
    ``max_seqlen`` (int). ``b`` is ``train_micro_batch_size_per_gpu`` (``eval_batch_size`` or that
    for valid/test). Tensors are on ``device`` (CPU when ``None``).

    Sizes: global batch ``G = micro x accumulation x dp_size``, the layout of
    :func:`megatron_stablelm.config.validate_layout` (the trainer's rule: the accumulation is derived
    from ``train_batch_size`` when ``gradient_accumulation_steps`` is left at 1). Train holds
    ``train_iters x G`` samples; the trainer pulls ``accumulation`` micro-batches per step. Each
    evaluation reads ``eval_iters x accumulation`` micro-batches per rank from ``.valid``, which continues
    across evaluations (sized for ``train_iters // eval_interval + 1`` of them); ``.test`` holds one
    evaluation.

    State: the loader state is only ``consumed_train_samples`` (``iteration x G`` when the global
    batch never changed) and ``consumed_valid_samples`` (evaluations done x
    ``DataIterators.samples_per_eval``). Every global batch is one contiguous range of the seeded,
    global sample order, dealt to ranks in ``micro``-sized pieces, so a run resumed from these counts,
    with the same or a different ``dp_size``, reads exactly the samples it has not read: none repeated,
    none skipped. The same config and seed always give the same order.

``DataIterators.samples_per_eval``, ``.datasets`` (the megatron-core datasets, the per-split plans and
the batch layout), ``.report`` (the mixture report text).

Masks: ``reset_position_ids`` restarts positions after each EOD; ``reset_attention_mask`` gives
document boundaries (a document ends with its EOD; every row starts one) as ``cu_seqlens`` --
never a dense mask; ``eod_mask_loss`` zeroes the loss where the target is EOD.

Tools: ``tools/preprocess_data.py`` (shards), ``tools/train_tokenizer.py``,
``tools/mixture_report.py CONFIG...``, ``tools/make_demo_corpus.py --out data/demo``,
``tools/bench_data.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_stablelm.config import Config
from megatron_stablelm.data.errors import DataError
from megatron_stablelm.data.indexed import ShardError, check_shard
from megatron_stablelm.data.loader import Collate, document_fields, make_loader
from megatron_stablelm.lazy import lazy_attributes
from megatron_stablelm.tokenizers import Tokenizer, TokenizerError, build_tokenizer

if TYPE_CHECKING:
    from megatron_stablelm.data.datasets import TrainingDatasets

# The megatron-core dataset machinery loads on first use (PEP 562), so that checking a shard or a
# tokenizer reports bad input without the seconds of importing megatron-core.
__getattr__ = lazy_attributes(
    __name__,
    "megatron_stablelm.data.datasets",
    {"TrainingDatasets", "build_datasets", "plan_splits", "samples_per_eval"},
)


__all__ = [
    "DataError",
    "DataIterators",
    "ShardError",
    "Tokenizer",
    "TokenizerError",
    "build_data_iterators",
    "build_datasets",
    "build_tokenizer",
    "check_shard",
    "document_fields",
    "mixture_report",
]


@dataclass
class DataIterators:
    """This rank's micro-batch iterators and what the trainer needs to count evaluation samples."""

    train: Iterator[dict] | None
    valid: Iterator[dict] | None
    test: Iterator[dict] | None
    datasets: TrainingDatasets
    samples_per_eval: int
    report: str


def _to_device(loader, device) -> Iterator[dict]:
    """The loader's batches moved to ``device``. The loader's iterator is created here, not at the
    first ``next``: creating it draws a seed from the global generator, which must happen while the
    iterators are built (a resumed run restores the generators after that), not inside a step."""
    batches = iter(loader)
    return (
        {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
        for b in batches
    )


def _rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def mixture_report(cfg: Config, tokenizer: Tokenizer | None = None, *, dp_size: int = 1) -> str:
    """The training mixture report without building any index (only the ``.idx`` files are read)."""
    from megatron_stablelm.data.datasets import plan_splits
    from megatron_stablelm.data.mixture import format_mixture_report

    plans = plan_splits(cfg, tokenizer.vocab_size if tokenizer else None, dp_size, scan_tokens=False)
    return format_mixture_report(plans[0], cfg.seq_length, cfg.mixture_epochs_warning)


def build_data_iterators(
    cfg: Config,
    tokenizer: Tokenizer,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    consumed_train_samples: int = 0,
    consumed_valid_samples: int = 0,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    report: bool = True,
) -> DataIterators:
    """Train/valid/test micro-batch iterators for data-parallel rank ``dp_rank`` of ``dp_size``
    (see the module docstring for sizes, state and resumption)."""
    from megatron_stablelm.data.datasets import build_datasets, samples_per_eval
    from megatron_stablelm.data.mixture import format_mixture_report

    datasets = build_datasets(cfg, tokenizer, dp_size=dp_size)
    layout = datasets.layout
    text = format_mixture_report(datasets.plans[0], cfg.seq_length, cfg.mixture_epochs_warning)
    if report and _rank0():
        print(text, flush=True)
    collate = Collate(
        tokenizer.eod,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
    )
    workers = cfg.num_workers if num_workers is None else num_workers
    pin = device is not None and torch.device(device).type == "cuda"

    per_rank = {"dp_rank": dp_rank, "dp_size": dp_size, "pin_memory": pin}

    def loader(ds, consumed: int, micro: int, nw: int):
        if ds is None:
            return None
        dl = make_loader(ds, collate, consumed=consumed, micro=micro, num_workers=nw, **per_rank)
        return iter(dl) if device is None else _to_device(dl, device)

    return DataIterators(
        train=loader(datasets.train, consumed_train_samples, layout.micro, workers),
        valid=loader(datasets.valid, consumed_valid_samples, cfg.eval_micro_batch, min(workers, 1)),
        test=loader(datasets.test, 0, cfg.eval_micro_batch, 0),
        datasets=datasets,
        samples_per_eval=samples_per_eval(cfg, layout),
        report=text,
    )
