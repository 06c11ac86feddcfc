"""Old module paths of the flat layout still import: ``subriemann.cli`` is ``subriemann.app.cli``.

The library was reorganized into layers (see ``docs/architecture.md``).  Code
written against the old paths keeps working: ``import subriemann.jacobian``
or ``from subriemann.cli import main`` load the module at its new home and
register it under the old name too, with a :class:`DeprecationWarning`.
Nothing inside the library uses these names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

MOVED = {
    "subriemann.jacobian": "subriemann.engines",
    "subriemann.structured": "subriemann.engines.structured",
    "subriemann.nystrom": "subriemann.linalg.routes.nystrom",
    "subriemann.linalg.nystrom": "subriemann.linalg.routes.nystrom",
    "subriemann.linalg.dense": "subriemann.linalg",
    "subriemann.metrics.builtin": "subriemann.metrics",
    "subriemann.check": "subriemann.metrics.check",
    "subriemann.trajectory": "subriemann.flow.trajectory",
    "subriemann.lockstep": "subriemann.flow.lockstep",
    "subriemann.cli": "subriemann.app.cli",
    "subriemann.report": "subriemann.app.report",
    "subriemann.plots": "subriemann.app.plots",
    "subriemann.datasets": "subriemann.app.datasets",
    "subriemann.models": "subriemann.app.models",
    "subriemann.sweep": "subriemann.app.sweep",
}
"""Old module name → its home now.  Submodules follow their package."""


def _new_name(fullname: str) -> str | None:
    for old, new in MOVED.items():
        if fullname == old or fullname.startswith(old + "."):
            return new + fullname[len(old):]
    return None


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and hands back the module loaded at its new name."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):  # noqa: ANN201
        new = _new_name(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, origin=new)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        assert spec.origin is not None
        warnings.warn(
            f"{spec.name} moved to {spec.origin}; the old name will be removed",
            DeprecationWarning,
            stacklevel=3,
        )
        return importlib.import_module(spec.origin)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was executed under its new name."""


def install() -> None:
    """Put the alias finder on :data:`sys.meta_path` (once)."""
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        # first: an old submodule name (``subriemann.sweep.cells``) must not be found by
        # the path finder under its moved parent's __path__ and executed a second time
        sys.meta_path.insert(0, _Alias())
