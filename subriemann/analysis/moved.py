"""Names that left :mod:`subriemann.analysis`, and where they live now.

The analysis layer holds mathematics only: plots and data loading moved up to
the application layer (:mod:`subriemann.app`), which the analysis may not
import.  Asking an analysis module for a moved name raises an
:class:`AttributeError` whose one line names the new home.

Examples
--------
>>> import subriemann.analysis
>>> subriemann.analysis.plot_critical_set  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
AttributeError: subriemann.analysis.plot_critical_set moved to subriemann.app.plots_analysis ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["MOVED", "moved_getattr"]

MOVED = {
    "plot_critical_set": "subriemann.app.plots_analysis",
    "plot_strata_graph": "subriemann.app.plots_analysis",
    "load_digits_problem": "subriemann.app.datasets",
    "DigitsProblem": "subriemann.app.datasets",
}
"""Moved name -> the module that holds it now."""


def moved_getattr(module: str, names: Iterable[str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that explains where the moved ``names`` of ``module`` went."""
    gone = {n: MOVED[n] for n in names}

    def __getattr__(name: str) -> Any:
        if name in gone:
            home = gone[name]
            raise AttributeError(
                f"{module}.{name} moved to {home} (analysis holds mathematics only): "
                f"from {home} import {name}"
            )
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
