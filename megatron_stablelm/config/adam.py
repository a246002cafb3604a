"""The GPT-NeoX ``optimizer`` block, read once into :class:`AdamSettings`.

The block is free-form YAML (``{type: Adam, params: {lr: 3.0e-4, betas: [0.9, 0.95], eps: 1.0e-8}}``),
so its contents are checked here rather than by the key-level type check: the validator calls
:func:`read_adam_block` on the config's block and the optimizer builds from the same result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from megatron_stablelm.config.choices import ADAM_IMPLS, ADAM_TYPES
from megatron_stablelm.config.errors import ConfigError

DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_EPS = 1e-8
LR_REQUIRED = "the learning rate `optimizer.params.lr` is required"


@dataclass(frozen=True)
class AdamSettings:
    """Adam with decoupled weight decay (AdamW). ``impl`` picks the kernel (one of ``ADAM_IMPLS``);
    the weight decay comes from the top-level ``weight_decay`` key, per parameter group."""

    type: str
    lr: float
    betas: tuple[float, float]
    eps: float
    impl: str

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``torch.optim.AdamW`` (and apex's FusedAdam)."""
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps}


def _number(name: str, value: Any, where: str) -> float:
    """A YAML number, or a string PyYAML leaves unparsed (``3e-4`` has no dot, so YAML 1.1 reads a
    string); anything else names the parameter and the value."""
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError
        number = float(value)
    except ValueError:
        raise ConfigError(f"{where}key 'optimizer': `{name}` must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{where}key 'optimizer': `{name}` must be finite, got {value!r}")
    return number


def _betas(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{where}key 'optimizer': `params.betas` must be two numbers, got {value!r}")
    betas = tuple(_number(f"params.betas[{i}]", b, where) for i, b in enumerate(value))
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"{where}key 'optimizer': `params.betas` must lie in [0, 1), got {value!r}")
    return betas  # type: ignore[return-value]


def read_adam_block(block: Mapping[str, Any] | None, where: str = "") -> AdamSettings:
    """The settings of an ``optimizer`` block (``None``: the defaults, which still need an ``lr``).
    ``where`` prefixes the messages (``"file.yml: "``)."""
    block = block or {}
    if not isinstance(block.get("type", "Adam"), str):
        raise ConfigError(f"{where}key 'optimizer': `type` must be a string, got {block.get('type')!r}")
    kind = block.get("type", "Adam").lower()
    if kind not in ADAM_TYPES:
        raise ConfigError(
            f"{where}key 'optimizer': type {block.get('type')!r} is not supported; use Adam or AdamW"
        )
    params = block.get("params") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}key 'optimizer': `params` must be a mapping, got {params!r}")
    params = dict(params)
    if "lr" not in params:
        raise ConfigError(f"{where}key 'optimizer': {LR_REQUIRED}")
    lr = _number("params.lr", params.pop("lr"), where)
    if lr <= 0:
        raise ConfigError(f"{where}key 'optimizer': `params.lr` must be positive, got {lr!r}")
    betas = _betas(params.pop("betas", DEFAULT_BETAS), where)
    eps = _number("params.eps", params.pop("eps", DEFAULT_EPS), where)
    if eps <= 0:
        raise ConfigError(f"{where}key 'optimizer': `params.eps` must be positive, got {eps!r}")
    params.pop("weight_decay", None)  # the top-level `weight_decay` key governs, per group
    impl = "apex" if kind == "apex_adam" else str(params.pop("impl", "auto")).lower()
    params.pop("impl", None)
    if impl not in ADAM_IMPLS:
        raise ConfigError(
            f"{where}key 'optimizer': unknown impl {impl!r}; expected one of {', '.join(ADAM_IMPLS)}"
        )
    if params:
        raise ConfigError(f"{where}key 'optimizer': unsupported Adam parameters {sorted(params)}")
    return AdamSettings(kind, lr, betas, eps, impl)
