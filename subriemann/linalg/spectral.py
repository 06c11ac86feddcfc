r"""The rank threshold and the solver size policy: one home each.

The rank threshold (docs/theory.md §7): singular values :math:`\sigma_i \le \tau`
of :math:`D` are treated as zero, with

.. math::

    \tau = \begin{cases} \texttt{rank\_atol} & \text{if given,}\\
    \texttt{rank\_rtol}\cdot\sigma_{\max} & \text{otherwise.}\end{cases}

Every part of subriemann that decides a rank (the metrics' solves, the flow's
rank monitor, the critical-set analysis, the optimizer, the report) computes
:math:`\tau` with :func:`rank_threshold`, so a recorded ``rank_rtol`` always
means the same thing.
"""

from __future__ import annotations

__all__ = ["rank_threshold"]


def rank_threshold(sigma_max: float, rank_rtol: float, rank_atol: float | None = None) -> float:
    r"""The threshold :math:`\tau` below which a singular value counts as zero.

    Parameters
    ----------
    sigma_max : float
        Largest singular value :math:`\sigma_{\max}` of :math:`D` (``0`` for an
        empty or zero matrix).
    rank_rtol : float
        Relative threshold, used when ``rank_atol`` is ``None``.
    rank_atol : float, optional
        Absolute threshold; overrides ``rank_rtol``.

    Returns
    -------
    float
        ``rank_atol`` if given, else ``rank_rtol * sigma_max``.

    Examples
    --------
    >>> rank_threshold(2.0, 1e-6)
    2e-06
    >>> rank_threshold(2.0, 1e-6, rank_atol=0.5)
    0.5
    """
    if rank_atol is not None:
        return float(rank_atol)
    return float(rank_rtol) * float(sigma_max)
