"""Nyström-preconditioned CG (:mod:`subriemann.linalg.nystrom`): sketch, PCG, the metric route.

The memory-budgeted Jacobian is tested in ``tests/engines/test_func.py``, the Gram
singular values in ``tests/linalg/test_krylov.py``, the rank monitor in
``tests/flow/test_engine.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from subriemann.linalg import ConvergenceWarning, pcg
from subriemann.linalg.routes.nystrom import NystromRoute, NystromSolver, nystrom_sketch
from subriemann.metrics import InterpolatedMetric
from tests.cases import dead_units_space


def test_sketch_is_exact_for_low_rank() -> None:
    # Nystrom with a sketch of rank >= rank(G) reproduces G (range(G Omega) = range(G));
    # the only error is the stabilising shift nu ~ sqrt(n) eps |G|, so 1e-10 relative.
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    g = a @ a.T
    omega = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    u, lam = nystrom_sketch(omega, g @ omega)
    approx = (u * lam) @ u.T
    assert torch.allclose(approx, g, atol=1e-10 * float(g.norm()))
    ref = torch.linalg.eigvalsh(g).flip(0)[:8]
    assert torch.allclose(lam, ref.clamp_min(0.0), atol=1e-10 * float(ref[0]))


def test_pcg_matches_direct_solve_and_preconditioning_helps() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(60, 60, generator=gen, dtype=torch.float64)
    s = torch.logspace(3, -2, 60, dtype=torch.float64)
    q = torch.linalg.qr(a)[0]
    g = (q * s) @ q.T
    mu = 0.1
    b = torch.randn(60, generator=gen, dtype=torch.float64)
    ref = torch.linalg.solve(g + mu * torch.eye(60, dtype=torch.float64), b)
    solver = NystromSolver(rank0=4, max_rank=60)
    z, info = solver.solve(lambda w: w @ g, b, mu, rtol=1e-12)
    # |z - ref| <= cond(G + mu) * rtol * |b| / |G + mu| ~ 1e4 * 1e-12: 1e-7 relative is safe
    assert info.converged and torch.allclose(z, ref, rtol=0, atol=1e-7 * float(ref.norm()))
    plain, info0 = pcg(lambda v: g @ v + mu * v, b, rtol=1e-12)
    assert info0.converged and info.iterations < info0.iterations
    # the adaptive rank stops once lam_hat_l <= mu, so cond(P^-1 A) stays small
    assert solver.precond is not None and float(solver.precond.lam_hat[-1]) <= mu
    assert info.iterations <= 30


@pytest.mark.parametrize("n, width, dead", [(30, 12, 0), (30, 12, 4), (4, 24, 0), (4, 24, 6)])
@pytest.mark.parametrize("lam", [0.3, 0.9])
def test_nystrom_route_matches_svd(n: int, width: int, dead: int, lam: float) -> None:
    # K < QN (n = 30) and QN < K (n = 4), full-rank and rank-deficient D.  Both routes give
    # g_lam^{-1} D^T r exactly up to the CG tolerance 1e-12 times cond(g_lam) <= 1 + lam
    # sigma_max^2 / (1 - lam) ~ 1e3: 1e-8 relative is safe.
    sp = dead_units_space(n, width, dead=dead)
    th = sp.initial_point()
    ref = sp.equip_with_metric(InterpolatedMetric, lam=lam, solver="svd").metric.gradient(th)
    m = sp.equip_with_metric(InterpolatedMetric, lam=lam, solver="nystrom").metric
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        got = m.gradient(th)
    assert torch.allclose(got, ref, rtol=0, atol=1e-8 * float(ref.norm()))
    assert m.last_solve.solver == "pcg" and m.last_solve.converged
    # the preconditioner is reused at a nearby point and the answer is still exact
    th2 = th + 1e-3
    ref2 = sp.equip_with_metric(InterpolatedMetric, lam=lam, solver="svd").metric.gradient(th2)
    builds = m._nystrom.builds
    got2 = m.gradient(th2)
    assert torch.allclose(got2, ref2, rtol=0, atol=1e-8 * float(ref2.norm()))
    assert m._nystrom.builds == builds


def test_nystrom_route_warns_when_it_misses_its_tolerance() -> None:
    # the accuracy contract: meet solver_rtol or warn, and say so in last_solve
    # (a rank-2 preconditioner: with the adaptive rank, n = 60 here, one iteration is exact)
    sp = dead_units_space(30, 12)
    route = NystromRoute(maxiter=1, rank0=2, max_rank=2)
    m = sp.equip_with_metric(InterpolatedMetric, lam=0.5, solver=route).metric
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        m.gradient(sp.initial_point())
    assert m.last_solve is not None and not m.last_solve.converged
    assert m.last_solve.residual > m.solver_rtol
