"""The two checks that config validation is made of, shared by every layer that checks keys."""
from __future__ import annotations

from typing import Any


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: one line saying what was wrong and
    what is accepted."""
    if not condition:
        raise ValueError(message)


def positive_int(value: Any, name: str) -> None:
    """Require ``value`` (the config key ``name``) to be an integer > 0."""
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{name} must be a positive integer, got {value!r}")
