"""The mixture report: per training source, its tokens, weight, planned tokens and epochs.

Printed before training (``build_data_iterators(..., report=True)`` on rank 0) and by
``tools/mixture_report.py CONFIG...``. Planned tokens are ``weight x train samples x seq_length``;
epochs are planned tokens over the source's tokens. A source above ``mixture_epochs_warning`` epochs
is flagged: repeating data that often is a common, silent cause of overfitting in multi-epoch runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_stablelm.data.datasets import SplitPlan

__all__ = ["MixtureRow", "format_mixture_report", "mixture_rows"]


@dataclass(frozen=True)
class MixtureRow:
    source: str
    tokens: int
    weight: float
    planned_tokens: int
    epochs: float
    warn: bool


def mixture_rows(plan: SplitPlan, seq_length: int, warn_epochs: float) -> list[MixtureRow]:
    rows = []
    total = plan.num_samples * seq_length
    for src in plan.sources:
        planned = int(round(src.weight * total))
        epochs = planned / src.tokens if src.tokens else float("inf")
        rows.append(MixtureRow(src.prefix, src.tokens, src.weight, planned, epochs, epochs > warn_epochs))
    return rows


def format_mixture_report(plan: SplitPlan, seq_length: int, warn_epochs: float) -> str:
    rows = mixture_rows(plan, seq_length, warn_epochs)
    width = max(len("source"), *(len(r.source) for r in rows))
    lines = [
        f"data mixture ({plan.name}): {plan.num_samples:,} samples x {seq_length} tokens = "
        f"{plan.num_samples * seq_length:,} tokens",
        f"  {'source':<{width}}  {'tokens':>15}  {'weight':>7}  {'planned tokens':>15}  {'epochs':>7}",
    ]
    for r in rows:
        lines.append(
            f"  {r.source:<{width}}  {r.tokens:>15,}  {r.weight:>7.3f}  {r.planned_tokens:>15,}  {r.epochs:>7.2f}"
            + ("  WARNING: above mixture_epochs_warning" if r.warn else "")
        )
    for r in rows:
        if r.warn:
            lines.append(
                f"WARNING: '{r.source}' will be repeated {r.epochs:.2f} times (> mixture_epochs_warning="
                f"{warn_epochs:g})"
            )
    return "\n".join(lines)
