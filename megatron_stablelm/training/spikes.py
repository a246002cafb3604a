"""Loss spikes: skip the update of a spiking step; roll back past a window that keeps spiking.

Large runs spike. Two remedies from the literature, both off by default here:

* **Gradient-norm spikes** (``spike_grad_norm_ratio``, same running mean): the norm is known only
  after the update, so such a step is logged and counted toward a rollback rather than skipped.
* **Skip the step** (metaseq's ``ewm_ratio_to_skip_batch``, off by default there too): the step's loss
  (token mean over every DP rank, so every rank decides alike) is compared with an exponentially
  weighted mean of the previous steps' losses, span 9 (metaseq's); above ``spike_loss_ratio`` times that
  mean, the update is not applied. The mean is not updated by a skipped step. metaseq scales the
  gradient down by ratio^-4 instead of dropping it; here the step is skipped outright, so that
  "skipped" means exactly "as if this step's update never happened".
* **Roll back and skip the data** (PaLM: restart about 100 steps before the spike and skip 200-500
  batches; Megatron-DeepSpeed's ``--skip-train-iteration-range``): after ``spike_rollback_skips``
  skipped steps within ``spike_rollback_window`` iterations, the run reloads its last checkpoint and
  skips every iteration from there to the current one: their batches are read and dropped, their
  iteration numbers pass (so the LR schedule and the sample stream continue where they would have),
  and no update is applied. The window is recorded (``skip_windows.json`` in the run directory and each
  later checkpoint's training state), so any resume reproduces the same stream; listing it by hand in
  ``skip_train_iteration_range`` has the same effect.

The running mean and the recent skips travel in the checkpoint's training state, so a resumed run
decides exactly as the uninterrupted one would have.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_stablelm.checkpoint.layout import SKIP_WINDOWS_FILE, staging_name

EWM_SPAN = 9  # metaseq's span for its loss mean


def parse_iteration_ranges(
    values: list | None, key: str = "skip_train_iteration_range"
) -> list[tuple[int, int]]:
    """``["101-200", "251-300", 7]`` → ``[(101, 200), (251, 300), (7, 7)]`` (inclusive, 1-based
    iteration numbers); a malformed item raises ``ValueError`` naming it."""
    ranges = []
    for item in values or []:
        text = str(item).strip()
        first, sep, last = text.partition("-")
        try:
            a, b = int(first), int(last) if sep else int(first)
        except ValueError:
            raise ValueError(f"{key}: cannot read {item!r} (expected 'A-B' or one iteration)") from None
        if not 1 <= a <= b:
            raise ValueError(f"{key}: {item!r} is not a range of iterations 1 <= A <= B")
        ranges.append((a, b))
    return sorted(ranges)


def in_ranges(iteration: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a <= iteration <= b for a, b in ranges)


def _exceeds(mean: float | None, value: float, ratio: float) -> tuple[bool, float]:
    """(whether ``value`` spikes above ``ratio`` × ``mean``, the mean it leaves): a spike does not move
    the mean (metaseq's rule); anything else joins it with span :data:`EWM_SPAN`."""
    if mean is not None and value > ratio * mean:
        return True, mean
    alpha = 2.0 / (EWM_SPAN + 1)
    return False, value if mean is None else (1 - alpha) * mean + alpha * value


@dataclass
class SpikeGuard:
    """The decision, on values every rank shares (so every rank takes the same branch).

    The loss is known before the update, so a loss spike skips it. The gradient norm is known only
    once DeepSpeed has stepped (ZeRO computes it inside its optimizer step), so a gradient-norm spike
    cannot be skipped: it is logged and counted toward the rollback, which undoes it."""

    ratio: float | None
    rollback_skips: int | None = None
    rollback_window: int = 100
    grad_ratio: float | None = None
    ewm: float | None = None  # running mean of the accepted steps' losses
    grad_ewm: float | None = None  # running mean of the accepted steps' gradient norms
    recent_skips: list[int] = field(default_factory=list)  # iterations that spiked (toward a rollback)

    @property
    def enabled(self) -> bool:
        return bool(self.ratio)

    def is_spike(self, iteration: int, loss: float) -> bool:
        """Whether the step's loss spikes; otherwise it joins the running mean."""
        if not self.enabled:
            return False
        spike, self.ewm = _exceeds(self.ewm, loss, self.ratio)
        if spike:
            self.recent_skips.append(iteration)
        return spike

    def is_grad_spike(self, iteration: int, grad_norm: float | None) -> bool:
        """Whether an applied step's gradient norm spiked (``spike_grad_norm_ratio``)."""
        if not self.grad_ratio or grad_norm is None or grad_norm != grad_norm:  # off, or NaN
            return False
        spike, self.grad_ewm = _exceeds(self.grad_ewm, grad_norm, self.grad_ratio)
        if spike and iteration not in self.recent_skips:
            self.recent_skips.append(iteration)
        return spike

    def should_roll_back(self, iteration: int) -> bool:
        self.recent_skips = [i for i in self.recent_skips if i > iteration - self.rollback_window]
        return bool(self.rollback_skips) and len(self.recent_skips) >= self.rollback_skips

    def state_dict(self) -> dict:
        return {"ewm": self.ewm, "grad_ewm": self.grad_ewm, "recent_skips": list(self.recent_skips)}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.ewm = state.get("ewm")
        self.grad_ewm = state.get("grad_ewm")
        self.recent_skips = [int(i) for i in state.get("recent_skips", [])]


def read_skip_windows(run_dir: str | Path) -> list[tuple[int, int]]:
    """The windows a rollback recorded in run directory ``run_dir`` (``skip_windows.json``)."""
    path = Path(run_dir) / SKIP_WINDOWS_FILE
    if not path.is_file():
        return []
    try:
        return [(int(w["first"]), int(w["last"])) for w in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: cannot read the recorded skip windows ({err})") from None


def record_skip_window(run_dir: str | Path, window: tuple[int, int], reason: str) -> None:
    """Add ``window`` to the run directory's record (replaced atomically)."""
    path = Path(run_dir) / SKIP_WINDOWS_FILE
    entries = json.loads(path.read_text()) if path.is_file() else []
    entries.append(
        {"first": window[0], "last": window[1], "reason": reason, "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    )
    tmp = path.with_name(staging_name(path.name))
    tmp.write_text(json.dumps(entries, indent=1) + "\n")
    tmp.replace(path)
