"""The check that config validation is made of, shared by every layer that checks keys
(the rules of numeric keys are in ``sde/config_rules.py``)."""
from __future__ import annotations


def require(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: one line saying what was wrong and
    what is accepted."""
    if not condition:
        raise ValueError(message)
