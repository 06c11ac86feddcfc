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


def import_geomstats():
    """Import geomstats with the pytorch backend and return the module.

    Returns
    -------
    geomstats : module

    Raises
    ------
    ImportError
        If geomstats was already imported, or is requested through
        ``GEOMSTATS_BACKEND``, with a backend other than pytorch.
    """
    if "geomstats" in sys.modules:
        import geomstats.backend as gs

        name = getattr(gs, "__name__", "")
        backend = os.environ.get("GEOMSTATS_BACKEND", "numpy")
        if _REQUIRED not in name and backend != _REQUIRED:
            raise _backend_error(backend)
        return sys.modules["geomstats"]

    requested = os.environ.get("GEOMSTATS_BACKEND")
    if requested is not None and requested != _REQUIRED:
        raise _backend_error(requested)
    os.environ["GEOMSTATS_BACKEND"] = _REQUIRED
    dtype = torch.get_default_dtype()
    try:
        import geomstats
        import geomstats.backend  # noqa: F401
        import geomstats.geometry.base  # noqa: F401
        import geomstats.geometry.riemannian_metric  # noqa: F401
        import geomstats.geometry.sub_riemannian_metric  # noqa: F401
    finally:
        torch.set_default_dtype(dtype)
    return geomstats


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
