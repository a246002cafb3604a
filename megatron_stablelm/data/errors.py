"""The data pipeline's user-facing error, in a module of its own so that every data module (plans,
index caches) can raise it without importing the others. ``train.py`` reports it as bad input: one
``error:`` line naming the file or key, exit status 2."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A data configuration or data file problem, raised before training; the message names the key or
    file."""
