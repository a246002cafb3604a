"""The batch arithmetic of a run at a given world size: the one rule the trainer and the data share.

``global batch = micro × accumulation × data-parallel size``, with the data-parallel size
``world size / model_parallel_size``. ``train_batch_size`` is optional; given with
``gradient_accumulation_steps`` left at 1 the accumulation is derived from it (as DeepSpeed does),
otherwise all three must agree. Both the trainer and the data pipeline call :func:`validate_layout`,
so they agree on the accumulation by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_stablelm.config.errors import ConfigError
from megatron_stablelm.config.schema import Config


@dataclass(frozen=True)
class BatchLayout:
    """How a global batch splits: ``global = micro × accumulation × data-parallel size``."""

    micro: int
    accumulation: int
    dp_size: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.dp_size


def validate_layout(cfg: Config, world_size: int) -> BatchLayout:
    """The batch layout of ``cfg`` on ``world_size`` processes; :class:`ConfigError` naming the keys
    and the numbers when tensor parallelism does not divide the world or the batch sizes disagree."""
    tp = cfg.model_parallel_size
    if world_size < 1 or world_size % tp:
        raise ConfigError(
            f"key 'model_parallel_size': {tp} does not divide the world size {world_size} "
            f"(launch a multiple of {tp} processes)"
        )
    dp = world_size // tp
    micro, gas = cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
    tbs = cfg.train_batch_size
    if tbs is not None and micro * gas * dp != tbs:
        if gas == 1 and tbs % (micro * dp) == 0:
            gas = tbs // (micro * dp)
        else:
            raise ConfigError(
                f"batch arithmetic does not fit the world size: train_batch_size={tbs} must equal "
                f"train_micro_batch_size_per_gpu ({micro}) × gradient_accumulation_steps ({gas}) × "
                f"data-parallel size ({dp} = {world_size} processes / model_parallel_size {tp}) = "
                f"{micro * gas * dp}"
            )
    return BatchLayout(micro, gas, dp)
