r"""Continuation of a flow through rank loss: a smooth spectral filter on a band above tau.

With a hard rank threshold :math:`\tau` the :math:`\lambda = 1` vector field
:math:`-D^+_\tau\nabla_xC = -\sum_{\sigma_i>\tau}\sigma_i^{-1}(u_i^\top r)\,v_i`
jumps where a singular value crosses :math:`\tau`, and it is stiff just above
(:math:`|\partial_s\theta|\sim|r|/\sigma_{\min}`).  The flow instead uses, on
the band :math:`\tau<\sigma\le b`,

.. math::

    F = -\sum_i w\!\left(\frac{\sigma_i-\tau}{b-\tau}\right)
        \frac{u_i^\top r}{\sigma_i}\,v_i,\qquad
    w(t) = 3t^2-2t^3 \ (0\le t\le 1),\quad w = 0 \text{ below},\ 1 \text{ above},

with :math:`b = \beta\,\sigma_{\max}` (``rank_band`` :math:`=\beta`; no band, i.e. the
hard threshold, when :math:`b \le \tau`, e.g. for a large absolute ``rank_atol``):
exact for :math:`\sigma_i \ge b`, continuous (:math:`C^1` in :math:`\sigma`) at both
ends of the band, and :math:`|F| \le \tfrac{3}{2}|r|/b`.  It is built from the
metric's own thresholded gradients only, so every metric goes through the
same code: with :math:`G(t)` the gradient at threshold :math:`t`,

.. math::

    F = -\Bigl(G(t_0) + \sum_{j\ge1} w_j\,\bigl(G(t_j) - G(t_{j-1})\bigr)\Bigr),

where :math:`t_0 = b` and :math:`t_j` separates the :math:`j`-th direction of
the band from the next (:math:`t_m = \tau`), so that :math:`G(t_j) - G(t_{j-1})`
is that direction's term.  The exact field is :math:`-G(\tau)`; the relative
deviation :math:`|F + G(\tau)|/|G(\tau)|` is reported per segment
(:class:`~subriemann.flow.trajectory.Segment`).

A direction whose :math:`\sigma_k \le \tau` is dropped exactly as before (the
rank events are located and recorded unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import astuple, replace

import torch
from torch import Tensor

from subriemann.flow.trajectory import Segment

__all__ = ["band_top", "band_weights", "smoothstep", "deviation", "filtered_gradient",
           "SegmentBook"]

def smoothstep(t: float) -> float:
    """:math:`w(t) = 3t^2 - 2t^3` on :math:`[0, 1]`, 0 below and 1 above (:math:`C^1`)."""
    return float(band_weights(torch.tensor(float(t), dtype=torch.float64), 0.0, 1.0))


def band_top(tau: float, sv: Tensor, rank_band: float) -> float:
    r"""The top :math:`b = \beta\sigma_{\max}` of the band (0: none, also when :math:`b\le\tau`)."""
    smax = float(sv[0]) if sv.numel() else 0.0
    top = rank_band * smax
    return top if top > tau > 0.0 else 0.0


def band_weights(sv: Tensor, tau: float, top: float) -> Tensor:
    r"""The weights :math:`w((\sigma_i - \tau)/(b - \tau))` of the filter, ``[..., r]``:
    0 at :math:`\sigma \le \tau`, 1 at :math:`\sigma \ge b` (``top`` :math:`= b > \tau`).

    Examples
    --------
    >>> import torch
    >>> w = band_weights(torch.tensor([2.0, 0.55, 0.1, 0.0], dtype=torch.float64), 0.1, 1.0)
    >>> [round(x, 6) for x in w.tolist()]
    [1.0, 0.5, 0.0, 0.0]
    """
    t = ((sv - tau) / (top - tau)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def band_indices(sv: Tensor, tau: float, top: float) -> list[int]:
    """Indices of the singular values in the band :math:`(\\tau, b)` (descending order)."""
    return [i for i in range(sv.numel()) if tau < float(sv[i]) < top]


def deviation(filtered: Tensor, exact: Tensor) -> float:
    r"""The filter's relative deviation :math:`|G_w - G(\tau)|/|G(\tau)|` (0 when
    :math:`G(\tau) = 0`)."""
    norm = float(exact.norm())
    return float((filtered - exact).norm()) / norm if norm > 0 else 0.0


def filtered_gradient(grad_at: Callable[[float], Tensor], sv: Tensor, tau: float, top: float
                      ) -> tuple[Tensor, dict[int, float], float]:
    r"""The filtered gradient, the weights :math:`w` of the band directions, the deviation.

    ``grad_at(t)`` is the metric's gradient with hard threshold ``t``;
    ``sv`` the singular values (descending) the thresholds are placed
    between.  The deviation is :math:`|G_w - G(\tau)|/|G(\tau)|` (0 when no
    direction is in the band; then ``grad_at(tau)`` is returned as it is).
    """
    band = band_indices(sv, tau, top)
    if not band:
        return grad_at(tau), {}, 0.0
    g_prev = grad_at(top)
    out = g_prev
    weights: dict[int, float] = {}
    n = sv.numel()
    ws = band_weights(sv, tau, top)
    for k in band:
        sk = float(sv[k])
        below = float(sv[k + 1]) if k + 1 < n else 0.0
        t_k = tau if k == band[-1] or below <= tau else math.sqrt(sk * below)
        g_k = grad_at(t_k)
        w = float(ws[k])
        weights[k] = w
        out = out + w * (g_k - g_prev)
        g_prev = g_k
    return out, weights, deviation(out, g_prev)


class SegmentBook:
    r"""The open and closed segments of a flow, per singular-value index.

    A direction :math:`k` is *filtered* while :math:`\tau < \sigma_k < b`
    and *dropped* while :math:`\sigma_k \le \tau`; a segment is a maximal
    stretch of accepted states in one of those modes.  Updated once per
    accepted step (so a resumed run updates it exactly as the uninterrupted one).
    """

    def __init__(self) -> None:
        self.closed: list[Segment] = []
        self.open: dict[int, Segment] = {}

    def update(self, s: float, sv: Tensor, tau: float, top: float, deviation: float) -> None:
        """Record the modes at the accepted state ``s`` with singular values ``sv``."""
        for k in range(sv.numel()):
            sk = float(sv[k])
            mode = "dropped" if sk <= tau else "filtered" if sk < top else None
            seg = self.open.get(k)
            if seg is not None and seg.kind != mode:
                self.closed.append(replace(seg, s_end=s))
                del self.open[k]
                seg = None
            if mode is None:
                continue
            dev = deviation if mode == "filtered" else 0.0
            if seg is None:
                self.open[k] = Segment(k, mode, s, s, dev, tau, top)
            else:
                self.open[k] = replace(seg, s_end=s, max_deviation=max(seg.max_deviation, dev))

    def segments(self) -> list[Segment]:
        """Every segment, closed ones first, by start."""
        return sorted(self.closed + list(self.open.values()), key=lambda g: (g.s_start, g.index))

    def to_meta(self) -> dict[str, list[list]]:
        return {"closed": [list(astuple(g)) for g in self.closed],
                "open": [list(astuple(g)) for g in self.open.values()]}

    @classmethod
    def from_meta(cls, meta: dict[str, list[list]] | None) -> SegmentBook:
        book = cls()
        if meta:
            book.closed = [Segment(*g) for g in meta.get("closed", [])]
            book.open = {int(g[0]): Segment(*g) for g in meta.get("open", [])}
        return book
