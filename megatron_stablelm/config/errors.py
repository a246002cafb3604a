"""The one exception type of configuration problems (its own module so every part can raise it)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the file and/or key at fault, and the value."""
