"""Fault injection for tests and for operators rehearsing a failure: ``MEGATRON_STABLELM_FAULTS``.

A comma-separated list, read once at start-up by every rank:

* ``spike@N``: iteration ``N``'s loss is multiplied by :data:`SPIKE_FACTOR` on every rank (its
  gradient too), so the spike handling (:mod:`.spikes`) can be seen to skip it or roll back;
* ``gradspike@N``: iteration ``N``'s gradient (not its loss) is multiplied by :data:`SPIKE_FACTOR`,
  for ``spike_grad_norm_ratio``;
* ``hang@R:N``: rank ``R`` stops making progress at iteration ``N`` (it sleeps before the step's
  first collective, as a rank stuck on a dead peer or a stalled filesystem would), so the hang
  watchdog (:mod:`.watchdog`) can be seen to fire on every rank.

E.g. ``MEGATRON_STABLELM_FAULTS=spike@120,spike@121,hang@3:400``.

Unset (the normal case), nothing is injected. A malformed value is refused at start-up, naming it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

FAULTS_ENV = "MEGATRON_STABLELM_FAULTS"
SPIKE_FACTOR = 100.0


@dataclass(frozen=True)
class Faults:
    hangs: dict[int, int] = field(default_factory=dict)  # rank -> iteration
    spikes: frozenset[int] = frozenset()  # iterations
    grad_spikes: frozenset[int] = frozenset()  # iterations

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Faults:
        text = (os.environ if environ is None else environ).get(FAULTS_ENV, "").strip()
        hangs: dict[int, int] = {}
        spikes: set[int] = set()
        grad_spikes: set[int] = set()
        for item in filter(None, (part.strip() for part in text.split(","))):
            kind, _, where = item.partition("@")
            rank, _, iteration = where.rpartition(":")
            if kind in ("spike", "gradspike") and not rank and iteration.isdigit():
                (spikes if kind == "spike" else grad_spikes).add(int(iteration))
            elif kind == "hang" and rank.isdigit() and iteration.isdigit():
                hangs[int(rank)] = int(iteration)
            else:
                raise ValueError(
                    f"{FAULTS_ENV}: cannot read {item!r} (expected spike@ITERATION, gradspike@ITERATION or "
                    "hang@RANK:ITERATION)"
                )
        return cls(hangs, frozenset(spikes), frozenset(grad_spikes))

    def loss(self, iteration: int, loss):
        """A micro-batch's summed loss, spiked at the iterations ``spike@N`` names."""
        if iteration in self.grad_spikes:
            loss = _ScaleGradient.apply(loss)
        return loss * SPIKE_FACTOR if iteration in self.spikes else loss

    def before_step(self, iteration: int, rank: int) -> None:
        """Called at the start of every iteration: the injected hang, if this is its rank and step."""
        if self.hangs.get(rank) == iteration:
            print(f"[faults] rank {rank}: injected hang at iteration {iteration}", flush=True)
            _injected_hang()


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times :data:`SPIKE_FACTOR` (a spike the loss does not show)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * SPIKE_FACTOR


def _injected_hang() -> None:
    """The frame a hang dump must name: sleeps until the watchdog (or the launcher) ends the process."""
    while True:
        time.sleep(3600)
