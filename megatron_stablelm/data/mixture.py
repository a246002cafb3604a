"""The mixture report: per training source, its tokens, weight, planned tokens and epochs.

Printed before training (``build_data_iterators(..., report=True)`` on rank 0) and by
``tools/mixture_report.py CONFIG...``. Planned tokens are ``weight x train samples x seq_length``;
epochs are planned tokens over the source's tokens. A source above ``mixture_epochs_warning`` epochs
is flagged: repeating data that often is a common, silent cause of overfitting in multi-epoch runs.
Beside the weight (the source's share of what training reads) the report prints the source's share
of the data on disk, so an up- or down-sampled source stands out.

The data configs in ``configs/data/`` name shards relative to a data root (``data/<source>/<subset>``);
:func:`with_data_root` resolves them against another directory for the tools, because the config
format has no data-root key of its own.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from megatron_stablelm.config import Config
from megatron_stablelm.config.choices import DATA_SPLITS
from megatron_stablelm.data.datasets import SplitPlan

__all__ = ["MixtureRow", "format_mixture_report", "mixture_rows", "with_data_root"]


@dataclass(frozen=True)
class MixtureRow:
    source: str
    tokens: int
    weight: float  # share of the training samples
    data_share: float  # share of the split's tokens on disk
    planned_tokens: int
    epochs: float
    warn: bool


def mixture_rows(plan: SplitPlan, seq_length: int, warn_epochs: float) -> list[MixtureRow]:
    """One row per source of ``plan``: what the sampler will draw from it and how often that
    repeats it, computed from the ``.idx`` token counts alone (no index is built)."""
    rows = []
    total = plan.num_samples * seq_length
    data_tokens = plan.tokens
    for src in plan.sources:
        planned = int(round(src.weight * total))
        epochs = planned / src.tokens if src.tokens else float("inf")
        share = src.tokens / data_tokens if data_tokens else 0.0
        rows.append(
            MixtureRow(src.prefix, src.tokens, src.weight, share, planned, epochs, epochs > warn_epochs)
        )
    return rows


def format_mixture_report(plan: SplitPlan, seq_length: int, warn_epochs: float) -> str:
    """The report as text: a header with the run's samples and tokens, one line per source (tokens
    on disk, data share, weight, planned tokens, epochs), a total line, then one warning per source
    repeated more than ``warn_epochs`` times."""
    rows = mixture_rows(plan, seq_length, warn_epochs)
    width = max(len("source"), len("total"), *(len(r.source) for r in rows))
    planned_total = plan.num_samples * seq_length
    data_total = plan.tokens
    lines = [
        f"data mixture ({plan.name}): {plan.num_samples:,} samples x {seq_length} tokens = "
        f"{planned_total:,} tokens",
        f"  {'source':<{width}}  {'tokens':>17}  {'data %':>6}  {'weight':>7}  {'planned tokens':>17}  {'epochs':>7}",
    ]
    for r in rows:
        lines.append(
            f"  {r.source:<{width}}  {r.tokens:>17,}  {100 * r.data_share:>6.2f}  {r.weight:>7.4f}  "
            f"{r.planned_tokens:>17,}  {r.epochs:>7.2f}"
            + ("  WARNING: above mixture_epochs_warning" if r.warn else "")
        )
    overall = planned_total / data_total if data_total else float("inf")
    lines.append(
        f"  {'total':<{width}}  {data_total:>17,}  {100.0:>6.2f}  {1.0:>7.4f}  {planned_total:>17,}  {overall:>7.2f}"
    )
    for r in rows:
        if r.tokens <= seq_length:  # a truncated or nearly empty shard, most likely
            lines.append(
                f"WARNING: '{r.source}' holds {r.tokens:,} tokens in the {plan.name} split, fewer than one "
                f"sample ({seq_length + 1} tokens): every sample repeats it within itself"
            )
        elif r.warn:
            lines.append(
                f"WARNING: '{r.source}' will be repeated {r.epochs:.2f} times (> mixture_epochs_warning="
                f"{warn_epochs:g})"
            )
    return "\n".join(lines)


def planned_dp_size(cfg: Config, dp_size: int | None) -> int:
    """The data-parallel size the tools plan a run's samples for: ``dp_size`` when given, else what the
    config's ``train_batch_size`` implies (global ÷ micro × accumulation), else 1."""
    if dp_size is not None:
        return dp_size
    per_dp = cfg.train_micro_batch_size_per_gpu * cfg.gradient_accumulation_steps
    return cfg.train_batch_size // per_dp if cfg.train_batch_size else 1


def with_data_root(cfg: Config, root: str) -> Config:
    """``cfg`` with every relative shard prefix (``data_path``, ``*_data_paths``) resolved against
    ``root`` instead of the working directory; absolute prefixes are kept. The tools' ``--data-root``:
    the data configs name ``data/<source>/<subset>`` and the shards may live anywhere."""

    def rebase(path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(root, path)

    changes: dict[str, object] = {}
    if cfg.data_path:
        changes["data_path"] = rebase(cfg.data_path)
    for split in DATA_SPLITS:
        paths = getattr(cfg, f"{split}_data_paths")
        if paths:
            changes[f"{split}_data_paths"] = [rebase(p) for p in paths]
    if not changes:
        return cfg
    return dataclasses.replace(cfg, **changes)
