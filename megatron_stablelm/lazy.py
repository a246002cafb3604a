"""Attributes of a package that load their module on first use (PEP 562).

Why: a command that only reports a bad path or a bad config must answer in seconds, so the packages
it imports early (``checkpoint``, ``data``) keep their torch / megatron-core modules behind their
first use instead of importing them with the package.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any


def lazy_attributes(package: str, module: str, names: Iterable[str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` serving ``names`` from ``module``."""
    served = frozenset(names)

    def __getattr__(name: str) -> Any:  # noqa: N807 - the module hook's required name
        if name in served:
            return getattr(importlib.import_module(module), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
