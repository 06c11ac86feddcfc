r"""The output pullback :math:`D^\top D`: the adapted flow (docs/theory.md §2)."""

from __future__ import annotations

from typing import Any

from subriemann.metrics.interpolated import InterpolatedMetric

__all__ = ["OutputPullbackMetric"]


class OutputPullbackMetric(InterpolatedMetric):
    r"""The pullback :math:`D^\top D` of the Euclidean output metric: the adapted flow (2.26).

    :math:`\operatorname{grad}C = D^+\nabla_x C`; the output flow is
    :math:`\partial_s x = -P\nabla_x C` (2.27).  It is Riemannian only where
    :math:`\operatorname{rank}D = K`; elsewhere ``sharp`` acts on the
    distribution :math:`\operatorname{ran}D^\top`.  Same as
    ``InterpolatedMetric(lam=1.0)``; the keyword arguments are those of
    :class:`~subriemann.metrics.InterpolatedMetric` (``solver``, ``rank_rtol``, ...).

    Raises
    ------
    TypeError
        When ``lam`` is passed (it is fixed at 1).
    """

    def __init__(self, space, **kwargs: Any) -> None:
        if "lam" in kwargs:
            raise TypeError(
                "OutputPullbackMetric has lam = 1 fixed; use InterpolatedMetric(lam=...)"
            )
        super().__init__(space, 1.0, **kwargs)
