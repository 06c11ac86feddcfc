"""Messages for users: warnings issued once per process, an error as one line."""

from __future__ import annotations

import warnings

__all__ = ["warn_once", "one_line"]

_SEEN: set[str] = set()


def warn_once(message: str, category: type[Warning] = UserWarning) -> None:
    """Issue ``message`` the first time only."""
    if message in _SEEN:
        return
    _SEEN.add(message)
    warnings.warn(message, category, stacklevel=3)


def one_line(err: BaseException, *, first_line: bool = False) -> str:
    """``"TypeError: message"`` on one line: the whole message, or only its first line.

    Examples
    --------
    >>> one_line(ValueError("bad\\n  value"))
    'ValueError: bad value'
    >>> one_line(ValueError("bad\\n  value"), first_line=True)
    'ValueError: bad'
    >>> one_line(KeyError())
    'KeyError'
    """
    text = str(err).strip()
    if first_line:
        text = text.splitlines()[0] if text else ""
    msg = " ".join(text.split())
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__
