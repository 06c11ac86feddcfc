"""Import geomstats with the pytorch backend, without side effects on the user.

geomstats reads ``GEOMSTATS_BACKEND`` once, at its first import, and its
pytorch backend sets torch's *global* default dtype to float64.  subriemann
needs the pytorch backend but must not change the process for its user, so
this module

* sets ``GEOMSTATS_BACKEND=pytorch`` only if geomstats has not been imported
  yet and the variable is unset;
* raises :class:`ImportError` with instructions if geomstats is already
  imported (or requested) with another backend;
* restores :func:`torch.get_default_dtype` after geomstats changed it.

subriemann itself never relies on the default dtype: every tensor it creates
has an explicit ``dtype`` (float64 unless the user asks otherwise).
"""

from __future__ import annotations

import logging
import os
import sys

import torch

_REQUIRED = "pytorch"


def _backend_error(found: str) -> ImportError:
    return ImportError(
        f"subriemann needs geomstats' '{_REQUIRED}' backend, but geomstats uses "
        f"(or was asked for) the '{found}' backend. Set the environment variable "
        f"GEOMSTATS_BACKEND={_REQUIRED} before the first import of geomstats "
        "(or import subriemann before geomstats) and restart Python."
    )


def _loaded_backend() -> str:
    """Name of the backend of the geomstats already in ``sys.modules``."""
    import geomstats.backend as gs

    # geomstats names its backend module ``geomstats.<backend>``.
    name = str(getattr(gs, "__name__", ""))
    if name.startswith("geomstats.") and name != "geomstats.backend":
        return name.rsplit(".", 1)[-1]
    try:  # fall back to what geomstats itself read at its import
        from geomstats._backend import BACKEND_NAME
    except ImportError:  # pragma: no cover - layout of another geomstats version
        return os.environ.get("GEOMSTATS_BACKEND", "numpy")
    return str(BACKEND_NAME)


def _import_submodules() -> None:
    import geomstats
    import geomstats.backend  # noqa: F401
    import geomstats.geometry.base  # noqa: F401
    import geomstats.geometry.riemannian_metric  # noqa: F401
    import geomstats.geometry.sub_riemannian_metric  # noqa: F401

    del geomstats


def import_geomstats():
    """Import geomstats with the pytorch backend and return the module.

    Torch's default dtype is the same after the call as before it, whether
    geomstats is imported here or was imported before.

    Returns
    -------
    geomstats : module

    Raises
    ------
    ImportError
        If geomstats was already imported, or is requested through
        ``GEOMSTATS_BACKEND``, with a backend other than pytorch.  The
        message says what to do.
    """
    dtype = torch.get_default_dtype()
    if "geomstats" in sys.modules:
        found = _loaded_backend()
        if found != _REQUIRED:
            raise _backend_error(found)
        try:  # the geometry submodules may not be imported yet
            _import_submodules()
        finally:
            torch.set_default_dtype(dtype)
        return sys.modules["geomstats"]

    requested = os.environ.get("GEOMSTATS_BACKEND")
    if requested is not None and requested != _REQUIRED:
        raise _backend_error(requested)
    os.environ["GEOMSTATS_BACKEND"] = _REQUIRED
    # geomstats also configures the *root* logger at import (level INFO, a stderr
    # handler): undo that too, so the user's logging is what it was.
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        _import_submodules()
    finally:
        torch.set_default_dtype(dtype)
        root.setLevel(level)
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
    return sys.modules["geomstats"]


class default_dtype:
    """Context manager that sets torch's default dtype temporarily.

    geomstats' pytorch backend creates its constants with torch's default
    dtype; calls into geomstats are wrapped in ``default_dtype(torch.float64)``
    so that they run in float64 without changing the user's global setting.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._saved: torch.dtype | None = None

    def __enter__(self) -> default_dtype:
        self._saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._saved is not None
        torch.set_default_dtype(self._saved)
