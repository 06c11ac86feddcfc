"""Nyström-preconditioned CG (:mod:`subriemann.linalg.nystrom`): sketch, PCG, the metric route.

The memory-budgeted Jacobian is tested in ``tests/engines/test_func.py``, the Gram
singular values in ``tests/linalg/test_krylov.py``, the rank monitor in
``tests/flow/test_engine.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import subriemann as sr
from subriemann.linalg import ConvergenceWarning, pcg
from subriemann.linalg.routes.nystrom import (
    CholeskyPreconditioner,
    NystromPreconditioner,
    NystromRoute,
    NystromSolver,
    formed_gram,
    nystrom_sketch,
)
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


@pytest.mark.parametrize("n, width, dead", [(60, 12, 0), (60, 12, 4), (4, 24, 0), (4, 24, 6)])
@pytest.mark.parametrize("lam", [0.3, 0.9])
def test_nystrom_route_matches_svd(n: int, width: int, dead: int, lam: float) -> None:
    # K = 74 < QN = 120 (n = 60) and QN = 8 < K = 146 (n = 4), full-rank and rank-deficient
    # D.  Both routes give g_lam^{-1} D^T r exactly up to the CG tolerance 1e-12 times
    # cond(g_lam) <= 1 + lam sigma_max^2 / (1 - lam) ~ 1e3: 1e-8 relative is safe.
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


def _structured(n: int, width: int, dead: int) -> sr.ParameterSpace:
    """``dead_units_space`` on the structured engine (the Gram matrix from layer factors)."""
    sp = dead_units_space(n, width, dead=dead)
    return sr.ParameterSpace(sp.module, sp.inputs, sp.targets, backend="structured")


@pytest.mark.parametrize("n, dead", [(60, 0), (60, 4), (4, 0), (4, 6)])
@pytest.mark.parametrize("use_gram", [True, False])
def test_nystrom_route_on_factor_engine_matches_svd(n: int, dead: int, use_gram: bool) -> None:
    # The structured engine forms G from layer factors: the route factors G + mu 1
    # (use_gram) or sketches by products.  K = 74 < QN = 120 (n = 60) and QN = 8 < K
    # (n = 4), full-rank and rank-deficient D.  Both routes solve the SPD system
    # of condition <= 1 + lam sigma_max^2 / (1 - lam) ~ 1e3 to rtol 1e-12: 1e-8 relative.
    sp = _structured(n, 12, dead)
    th = sp.initial_point()
    route = NystromRoute(use_gram=use_gram)
    m = sp.equip_with_metric(InterpolatedMetric, lam=0.5, solver=route).metric
    for point in (th, th + 1e-3):  # built at the first point, reused at the second
        ref = sp.equip_with_metric(InterpolatedMetric, lam=0.5, solver="svd").metric
        expected = ref.gradient(point)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            got = m.gradient(point)
        assert torch.allclose(got, expected, rtol=0, atol=1e-8 * float(expected.norm()))
        assert m.last_solve.converged and m.last_solve.iterations <= 30
    solver = m._nystrom
    assert solver.builds == 1
    assert solver.sketch_source == ("gram" if use_gram else "products")
    exact = isinstance(solver.precond, CholeskyPreconditioner)
    assert exact == use_gram


def _spectrum_gram(n: int, decay: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    s = decay ** torch.arange(n, dtype=torch.float64) * 1e3
    return (q * s) @ q.T


def test_adaptive_rank_certifies_the_condition_number() -> None:
    # G with eigenvalues 1e3 * 0.93^i (n = 200): about 95 exceed mu = 1.  The build stops
    # once lam_hat_l <= rho mu and lam_hat_l + E <= 2 rho mu, E = |G - G_hat| estimated from
    # below by power iteration.  Independent check with a dense eigendecomposition: the
    # condition number of P^-1 (G + mu) obeys FTU's bound (lam_hat_l + mu + E) / mu with the
    # true E, which the 10-step power iteration does not underestimate by much.
    g = _spectrum_gram(200, 0.93, 3)
    mu = 1.0
    solver = NystromSolver(rank0=8)
    pre = solver.build(lambda w: w @ g, 200, mu, g)
    assert isinstance(pre, NystromPreconditioner) and pre.rank < 200
    ghat = (pre.u * pre.lam_hat) @ pre.u.T
    e_true = float(torch.linalg.matrix_norm(g - ghat, ord=2))
    assert solver.last_error <= e_true * (1 + 1e-8)  # power iteration: from below
    assert float(pre.lam_hat[-1]) <= mu and float(pre.lam_hat[-1]) + e_true <= 3.0 * mu
    pinv = torch.stack([pre.apply(c) for c in torch.eye(200, dtype=torch.float64)], dim=1)
    ev = torch.linalg.eigvals(pinv @ (g + mu * torch.eye(200, dtype=torch.float64))).real
    kappa = float(ev.max() / ev.min())
    assert kappa <= (float(pre.lam_hat[-1]) + mu + e_true) / mu * (1 + 1e-8)
    b = torch.randn(200, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, info = NystromSolver(rank0=8).solve(lambda w: w @ g, b, mu)
    assert info.converged and info.iterations <= 30


def test_reused_preconditioner_is_rebuilt_within_the_solve() -> None:
    # A preconditioner from a far-away G0 gets reuse_iters iterations at G1; then one is built
    # at G1 and CG goes on from its iterate.  The answer meets rtol (true residual) and agrees
    # with a direct solve: cond(G1 + mu) ~ 1e3, rtol 1e-12: 1e-8 relative is safe.
    g0, g1 = _spectrum_gram(120, 0.9, 5), _spectrum_gram(120, 0.9, 6)
    mu = 1.0
    b = torch.randn(120, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    solver = NystromSolver(rank0=8, reuse_iters=3)
    solver.solve(lambda w: w @ g0, b, mu)
    assert solver.builds == 1
    z, info = solver.solve(lambda w: w @ g1, b, mu)
    ref = torch.linalg.solve(g1 + mu * torch.eye(120, dtype=torch.float64), b)
    assert solver.builds == 2 and "rebuilt after 3 iterations" in info.reason
    assert info.converged and info.iterations > 3
    assert float((g1 @ z + mu * z - b).norm() / b.norm()) <= 10 * 1e-12
    assert torch.allclose(z, ref, rtol=0, atol=1e-8 * float(ref.norm()))


def test_sketch_of_zero_gram() -> None:
    # G = 0 (every unit dead): the Nystrom approximation is 0 up to the stabilising shift
    # (raised to eps when |G Omega| = 0, so the eigenvalues are eps - eps (1 + O(eps))),
    # with orthonormal U; it used to loop forever
    omega = torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, lam = nystrom_sketch(omega, torch.zeros(10, 4, dtype=torch.float64))
    assert float(lam.abs().max()) <= 1e-28
    assert torch.allclose(u.T @ u, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_formed_gram_policy() -> None:
    # G is taken only when it is cheap: from layer factors within the budget, or already held
    # by the point.  Where it is taken, it is D^T D (K = 74 < QN = 120) against jacrev's D.
    sp = _structured(60, 12, 0)
    state = sp.point_state(sp.initial_point())
    n = sp.dim
    assert formed_gram(state, False, n * n * 8 - 1) is None  # one byte short of the budget
    g = formed_gram(state, False, n * n * 8)
    assert g is not None
    d = torch.func.jacrev(sp.outputs)(sp.initial_point())
    assert torch.allclose(g, d.T @ d, rtol=0, atol=1e-12 * float((d.T @ d).norm()))
    generic = dead_units_space(60, 12)  # no layer factors: products, unless the point holds G
    st = generic.point_state(generic.initial_point())
    assert formed_gram(st, False, 1 << 30) is None
    st.param_gram  # noqa: B018  (formed, e.g. by the rank monitor)
    assert formed_gram(st, False, 0) is not None
