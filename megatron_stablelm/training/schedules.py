"""Learning-rate schedules: a pure function of the optimizer-step number.

The schedule is stateless on purpose: the learning rate of step ``t`` depends only on ``t`` and the
config, so a resumed run (or one resumed at another data-parallel size) gets exactly the same rates
without restoring scheduler state, and a skipped (non-finite) step does not shift the curve.

Conventions. ``t`` is the 1-based index of the optimizer step being taken (the first update uses
``t = 1``; the iteration counter after it is 1). With ``W`` warmup steps, ``D`` the decay horizon
(``lr_decay_iters``, default ``train_iters``), ``T = train_iters``, peak ``p`` (``optimizer.params.lr``)
and floor ``m`` (``min_lr``):

* warmup (``t <= W``): ``p * t / W``; so the first step is not wasted at lr 0;
* then, with progress ``r = clip((t - W) / (D - W), 0, 1)``:

  - ``constant``:      ``p``
  - ``linear``:        ``m + (p - m) (1 - r)``
  - ``cosine``:        ``m + (p - m) (1 + cos(pi r)) / 2``
  - ``inverse_sqrt``:  ``max(m, p sqrt(max(W, 1) / t))`` (continuous at ``t = W``)
  - ``hybrid_cosine_inv_sqrt_2`` (Stable LM 2): the cosine above until the hand-over step
    ``H = W + (D - W) / 2`` (where it has reached ``(p + m) / 2``), then an inverse-square-root tail
    ``max(m, (p + m) / 2 * sqrt(H / t))``. Both pieces equal ``(p + m) / 2`` at ``t = H``, so the
    curve is continuous and non-increasing after warmup; the tail decays more slowly than the cosine
    would, which keeps the rate useful for continued pre-training and a final cooldown.

* ``cooldown`` (a fraction ``c`` of ``T``): over the last ``C = round(c T)`` steps the rate falls
  linearly from its value at ``T - C`` to 0 at ``T``: ``f(T - C) (T - t) / C``.

``warmup`` is a fraction of ``train_iters`` when below 1 and a number of steps when 1 or more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_stablelm.config import Config, warmup_steps

__all__ = ["LRSchedule", "schedule_from_config", "warmup_steps"]  # warmup_steps: from the config


@dataclass(frozen=True)
class LRSchedule:
    """Resolved schedule parameters (all in optimizer steps). The values are checked where they come
    from: :func:`megatron_stablelm.config.validate_config` (style, ``min_lr`` <= peak, ranges)."""

    style: str
    peak: float
    min_lr: float
    warmup: int
    decay_iters: int
    train_iters: int
    cooldown: int = 0

    @property
    def handover(self) -> float:
        """Step at which the hybrid schedule switches from cosine to inverse square root."""
        return self.warmup + max(self.decay_iters - self.warmup, 0) / 2.0

    def _base(self, t: float) -> float:
        p, m, w = self.peak, self.min_lr, self.warmup
        if w > 0 and t <= w:
            return p * t / w
        if self.style == "constant":
            return p
        if self.style == "inverse_sqrt":
            return max(m, p * math.sqrt(max(w, 1) / max(t, 1)))
        span = self.decay_iters - w
        r = 1.0 if span <= 0 else min(max((t - w) / span, 0.0), 1.0)
        if self.style == "linear":
            return m + (p - m) * (1.0 - r)
        cosine = m + (p - m) * 0.5 * (1.0 + math.cos(math.pi * r))
        if self.style == "cosine":
            return cosine
        h = self.handover
        if t <= h or span <= 0:
            return cosine
        return max(m, 0.5 * (p + m) * math.sqrt(h / t))

    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (1-based)."""
        t = max(int(step), 0)
        if self.cooldown > 0:
            start = self.train_iters - self.cooldown
            if t > start:
                return self._base(start) * max(self.train_iters - t, 0) / self.cooldown
        return self._base(t)


def schedule_from_config(cfg: Config) -> LRSchedule:
    """The schedule of a run. The step counts are ``Config`` properties, which raise
    :class:`~megatron_stablelm.config.ConfigError` when ``train_iters`` or the learning rate is unset."""
    return LRSchedule(
        style=cfg.lr_decay_style,
        peak=cfg.peak_lr,
        min_lr=float(cfg.min_lr),
        warmup=cfg.warmup_steps,
        decay_iters=cfg.lr_decay_steps,
        train_iters=cfg.required_train_iters,
        cooldown=cfg.cooldown_steps,
    )
