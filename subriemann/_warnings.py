"""Warnings issued once per process."""

from __future__ import annotations

import warnings

_SEEN: set[str] = set()


def warn_once(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue ``message`` the first time only."""
    if message in _SEEN:
        return
    _SEEN.add(message)
    warnings.warn(message, category, stacklevel=3)
