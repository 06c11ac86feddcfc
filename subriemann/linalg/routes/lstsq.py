r"""The ``"lstsq"`` route: LAPACK least squares on stacked matrices, never the normal equations.

At :math:`\lambda=1`, ``gelsd`` on :math:`D` with ``rcond`` :math:`=\tau/\sigma_{\max}`;
for :math:`\lambda<1` the full-rank stacked problem in the smaller space by QR
(``gels``).  ``sharp`` and ``project`` use the thin SVD (the same dense
factorization), as the ``"svd"`` route.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from subriemann.linalg.info import SolverInfo
from subriemann.linalg.routes.base import Threshold
from subriemann.linalg.routes.svd import SVDRoute
from subriemann.linalg.state import PointState

__all__ = ["LstsqRoute"]


class LstsqRoute(SVDRoute):
    r"""Least squares on the dense :math:`D` (``gelsd`` at :math:`\lambda = 1`, QR otherwise).

    For :math:`\lambda < 1` and :math:`QN \le K`:
    :math:`w = \arg\min_w |\sqrt\lambda D^\top w|^2 + |\sqrt{1-\lambda}\,w - u/\sqrt{1-\lambda}|^2`,
    :math:`v = D^\top w`; for :math:`K<QN`:
    :math:`v = \lambda^{-1}\arg\min_v |Dv-u|^2+\varepsilon|v|^2`,
    :math:`\varepsilon=(1-\lambda)/\lambda`.  Cost: form :math:`D`; ``gelsd`` at
    :math:`O(QN^2K)`, QR of a :math:`(K+QN)\times\min(QN,K)` matrix.  Backward
    stable, :math:`\epsilon\kappa`.
    """

    name = "lstsq"
    tags = frozenset({"dense", "exact_cut", "backward_stable"})
    factorization = "svd"

    @staticmethod
    def rcond(state: PointState, threshold: Threshold) -> float:
        r""":math:`\tau/\sigma_{\max}` for ``gelsd``."""
        if threshold.rank_atol is None:
            return threshold.rank_rtol
        smax = state.sigma_max()
        return threshold.rank_atol / smax if smax > 0 else 0.0

    def solve(
        self, state: PointState, rhs: Tensor, lam: float, threshold: Threshold
    ) -> tuple[Tensor, SolverInfo]:
        d, u = state.jacobian, rhs
        k, qn = state.space.dim, state.space.output_dim
        if lam == 1.0:
            sol = torch.linalg.lstsq(
                d.cpu(), u.cpu().unsqueeze(1), rcond=self.rcond(state, threshold), driver="gelsd"
            ).solution
            return sol.squeeze(1).to(u.device), SolverInfo.direct("lstsq", "gelsd on D")
        info = SolverInfo.direct("lstsq", "QR of the stacked full-rank problem")
        if state.output_is_smaller:
            # min_w |A w - b|, A = [sqrt(lam) D^T; sqrt(1-lam) 1], b = [0; u/sqrt(1-lam)]:
            # A^T A = (1-lam)1 + lam D D^T and A^T b = u.  Full column rank: QR.
            eye = math.sqrt(1.0 - lam) * torch.eye(qn, dtype=d.dtype, device=d.device)
            a = torch.cat([math.sqrt(lam) * d.T, eye])
            b = torch.cat([u.new_zeros(k), u / math.sqrt(1.0 - lam)])
            w = torch.linalg.lstsq(a.cpu(), b.cpu().unsqueeze(1), driver="gels").solution
            return state.vjp(w.squeeze(1).to(u.device)), info
        eye = math.sqrt((1.0 - lam) / lam) * torch.eye(k, dtype=d.dtype, device=d.device)
        a = torch.cat([d, eye])
        b = torch.cat([u, u.new_zeros(k)])
        sol = torch.linalg.lstsq(a.cpu(), b.cpu().unsqueeze(1), driver="gels").solution
        return sol.squeeze(1).to(u.device) / lam, info
