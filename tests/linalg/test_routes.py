"""Every solver route against a dense numpy SVD reference, on shared small cases.

The cases are linear models :math:`x_j = \\langle a_j, \\theta\\rangle` (``Q = 1``),
so that :math:`D = A` exactly and its spectrum is prescribed: full rank and
exactly rank-deficient (zero singular values), wide (:math:`QN < K`) and tall
(:math:`K < QN`).  The reference is computed with numpy from :math:`A` itself,
independently of subriemann: with :math:`A = U\\Sigma V^\\top` and
:math:`\\tau = 10^{-6}\\sigma_{\\max}` (no singular value lies near it),

* ``solve(u)`` :math:`= \\sum_i w_\\lambda(\\sigma_i)\\langle u_i,u\\rangle v_i`,
  :math:`w_\\lambda(\\sigma) = \\sigma/((1-\\lambda)+\\lambda\\sigma^2)`
  (only :math:`\\sigma_i>\\tau` at :math:`\\lambda = 1`);
* ``sharp(xi)`` :math:`= g_\\lambda^{-1}\\xi` (``numpy.linalg.solve``) for :math:`\\lambda<1`,
  ``pinv(A^T A)`` :math:`\\xi` at :math:`\\lambda = 1`;
* ``project(a)`` :math:`= V_rV_r^\\top a`;
* ``restricted_sharp(xi)``
  :math:`= V_r\\operatorname{diag}(1/((1-\\lambda)+\\lambda\\sigma_i^2))V_r^\\top\\xi`.

Tolerances.  The spectra have :math:`\\kappa \\le 4` on the kept singular values.  A
backward stable route (svd, lstsq) has relative error :math:`\\lesssim c\\,\\epsilon\\,\\kappa^2`
(squared for ``sharp`` at :math:`\\lambda = 1`, whose operator is :math:`(A^\\top A)^+`); the
Gram routes (ntk) square the condition once more; the Krylov routes stop at a relative
residual ``rtol = 1e-12``, which bounds the error by ``rtol`` times the condition of
their operator (at most :math:`\\kappa^2`, and the Frobenius-norm factor
:math:`|A|_F/\\sigma_{\\max} \\le \\sqrt{6}` of LSMR's stopping test).  With
:math:`c = 100`: ``C_EPS`` and ``C_RTOL`` below, far under any real disagreement.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import subriemann as sr
from subriemann.linalg import (
    ConvergenceWarning,
    PointState,
    SolverInfo,
    Threshold,
    make_route,
    size_policy,
)
from subriemann.linalg.routes import ROUTES, AutoRoute, NTKRoute, SolverRoute
from subriemann.losses import CrossEntropyLoss

EPS = float(np.finfo(np.float64).eps)
KAPPA = 4.0  # largest sigma_max / sigma_min over the kept singular values of the cases
C_EPS = 100.0 * EPS * KAPPA**4  # direct routes, condition squared twice at worst (ntk sharp)
C_RTOL = 100.0 * 1e-12 * KAPPA**2 * np.sqrt(6.0)  # Krylov routes at rtol = 1e-12
RTOL = 1e-6  # rank_rtol of the cases: tau = 1e-6 sigma_max, far from every sigma_i


@dataclass
class Case:
    """A linear model with Jacobian ``a`` ([QN, K]) and its numpy reference."""

    name: str
    a: np.ndarray

    def space(self) -> sr.ParameterSpace:
        qn, k = self.a.shape
        net = nn.Linear(k, 1, bias=False).double()
        with torch.no_grad():
            net.weight.copy_(torch.linspace(-0.5, 0.5, k, dtype=torch.float64))
        inputs = torch.as_tensor(self.a)
        targets = torch.zeros(qn, 1, dtype=torch.float64)
        return sr.ParameterSpace(net, inputs, targets, backend="func")

    def svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``U, s, V`` of the thin SVD and the mask ``s > tau`` (numpy)."""
        u, s, vt = np.linalg.svd(self.a, full_matrices=False)
        return u, s, vt.T, s > RTOL * s[0]

    def solve(self, rhs: np.ndarray, lam: float) -> np.ndarray:
        u, s, v, keep = self.svd()
        w = s / ((1.0 - lam) + lam * s**2)
        if lam == 1.0:
            w = np.where(keep, w, 0.0)
        return v @ (w * (u.T @ rhs))

    def sharp(self, xi: np.ndarray, lam: float) -> np.ndarray:
        gram = self.a.T @ self.a
        if lam == 1.0:
            return np.linalg.pinv(gram, rcond=1e-8, hermitian=True) @ xi
        return np.linalg.solve((1.0 - lam) * np.eye(gram.shape[0]) + lam * gram, xi)

    def project(self, x: np.ndarray) -> np.ndarray:
        _, _, v, keep = self.svd()
        return v[:, keep] @ (v[:, keep].T @ x)

    def restricted_sharp(self, xi: np.ndarray, lam: float) -> np.ndarray:
        _, s, v, keep = self.svd()
        vr, sr_ = v[:, keep], s[keep]
        return vr @ ((vr.T @ xi) / ((1.0 - lam) + lam * sr_**2))


def _designed(name: str, qn: int, k: int, sigmas: list[float], seed: int) -> Case:
    rng = np.random.default_rng(seed)
    m = len(sigmas)
    u = np.linalg.qr(rng.standard_normal((qn, m)))[0]
    v = np.linalg.qr(rng.standard_normal((k, m)))[0]
    return Case(name, u @ np.diag(sigmas) @ v.T)


CASES = [
    _designed("wide-full", 6, 10, [2.0, 1.6, 1.2, 1.0, 0.8, 0.5], 0),
    _designed("wide-deficient", 6, 10, [2.0, 1.6, 1.0, 0.5, 0.0, 0.0], 1),
    _designed("tall-full", 12, 5, [2.0, 1.5, 1.0, 0.7, 0.5], 2),
    _designed("tall-deficient", 12, 5, [2.0, 1.5, 0.5, 0.0, 0.0], 3),
]


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request) -> Case:
    return request.param


def _rel(got: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got.numpy() - ref) / max(np.linalg.norm(ref), 1e-300))


def _tol(route: SolverRoute) -> float:
    return C_RTOL if "iterative" in route.tags else C_EPS


def _fresh_state(case: Case) -> PointState:
    space = case.space()
    return space.point_state(space.initial_point())


def _vectors(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(7)
    qn, k = case.a.shape
    return torch.as_tensor(rng.standard_normal(qn)), torch.as_tensor(rng.standard_normal(k))


@pytest.mark.parametrize("name", list(ROUTES))
@pytest.mark.parametrize("lam", [0.4, 1.0])
def test_route_against_dense_svd(case: Case, name: str, lam: float) -> None:
    """solve, sharp, project, restricted_sharp and bundle_solve of every route."""
    route = make_route(name)
    thr = Threshold(RTOL)
    u, xi = _vectors(case)
    tol = _tol(route)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # convergence, accuracy, rank threshold
        st = _fresh_state(case)
        v, info = route.solve(st, u, lam, thr)
        assert isinstance(info, SolverInfo) and info.converged, info
        err = _rel(v, case.solve(u.numpy(), lam))
        assert err <= tol, (name, err)
        st = _fresh_state(case)
        s, _ = route.sharp(st, xi, lam, thr)
        assert _rel(s, case.sharp(xi.numpy(), lam)) <= tol
        st = _fresh_state(case)
        p, _ = route.project(st, xi, thr)
        assert _rel(p, case.project(xi.numpy())) <= tol
        st = _fresh_state(case)
        r, _ = route.restricted_sharp(st, xi, lam, thr)
        assert _rel(r, case.restricted_sharp(xi.numpy(), lam)) <= tol
        st = _fresh_state(case)
        b, _ = route.bundle_solve(st, u, lam, thr)
        # the bundle gradient: restricted_sharp of D^T u; the uncut Krylov answer agrees
        # here because the dropped singular values are exactly 0 (weight 0)
        ref = case.restricted_sharp(case.a.T @ u.numpy(), lam)
        assert _rel(b, ref) <= tol


@pytest.mark.parametrize("name", list(ROUTES))
def test_route_singular_values_and_threshold(case: Case, name: str) -> None:
    """The route's singular values (its own factorization) and tau against numpy's SVD.

    The Gram eigenvalues carry an absolute error ~ eps sigma_max^2 in sigma^2: the zero
    singular values come out below sqrt(100 eps) sigma_max = 1.5e-7 sigma_max."""
    route = make_route(name)
    st = _fresh_state(case)
    s = route.singular_values(st).numpy()
    _, ref, _, keep = case.svd()
    assert s.shape == ref.shape
    assert np.allclose(s[keep], ref[keep], rtol=1e-12 * KAPPA**2, atol=0)
    assert np.all(s[~keep] <= np.sqrt(100 * EPS) * ref[0])
    assert route.tau(st, Threshold(RTOL)) == pytest.approx(RTOL * ref[0], rel=1e-12)
    assert route.tau(st, Threshold(RTOL, rank_atol=0.25)) == 0.25
    for lam in (0.5, 1.0):  # what a metric at lam reports (ntk at lam = 1, K < QN: its eigh)
        s = route.spectrum(_fresh_state(case), lam).numpy()
        assert np.allclose(s[keep], ref[keep], rtol=1e-12 * KAPPA**2, atol=0)
        assert np.all(s[~keep] <= np.sqrt(100 * EPS) * ref[0])


def test_routes_as_metric_solvers(case: Case) -> None:
    """A metric built with a route name or a route object delegates to it."""
    space = case.space()
    th = space.initial_point()
    u = space.point_state(th).output_grad.numpy()
    for solver in (*ROUTES, NTKRoute(accuracy=1e-9)):
        m = sr.metrics.InterpolatedMetric(space, lam=1.0, solver=solver)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            g = m.gradient(th)
        assert _rel(g, case.solve(u, 1.0)) <= _tol(m.route)
        assert m.last_solve is not None and m.last_solve.converged
        assert m.description()["solver"] == m.solver == m.route.name


@pytest.mark.parametrize(
    "qn,k,route",
    [
        (24, 1441, "svd"),  # small: the reference is cheap
        (1024, 75_268, "ntk"),  # wide: push-through in R^QN
        (5000, 100, "svd"),  # tall, D formed anyway
        (100_000, 1000, "ntk"),  # tall and large: D^T D
        (30_000, 40_000, "matrix_free"),  # both large
    ],
)
def test_auto_route_picks_by_size(qn: int, k: int, route: str) -> None:
    """AutoRoute follows the size policy; with require={'exact_cut'} it never goes Krylov."""
    assert AutoRoute().select(qn, k).name == route == size_policy(qn, k)
    exact = AutoRoute(require={"exact_cut"}).select(qn, k)
    assert "exact_cut" in exact.tags
    assert exact.name == (route if route != "matrix_free" else "ntk")


def test_auto_route_delegates_at_a_point(case: Case) -> None:
    """As a route, AutoRoute answers as the route it selects (svd at this size)."""
    auto, thr = AutoRoute(), Threshold(RTOL)
    u, _ = _vectors(case)
    st = _fresh_state(case)
    assert auto.resolve(*case.a.shape).name == "svd"
    v, info = auto.solve(st, u, 1.0, thr)
    assert info.solver == "svd" and _rel(v, case.solve(u.numpy(), 1.0)) <= C_EPS
    out = auto.weighted_solve(st, u, torch.ones_like, thr)  # weights 1: the lam = 1 solve
    assert out is not None and out[1].solver == "svd"
    assert _rel(out[0], case.solve(u.numpy(), 1.0)) <= C_EPS


def test_make_route_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="solver must be one of"):
        make_route("cholesky")
    with pytest.raises(TypeError, match="solver must be a string"):
        make_route(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown route tags"):
        AutoRoute(require={"fast"})
    with pytest.raises(ValueError, match="accuracy"):
        NTKRoute(accuracy=2.0)
    with pytest.raises(ValueError, match="maxiter"):
        make_route("matrix_free", maxiter=0)


def test_output_spectrum_against_numpy(case: Case) -> None:
    """PointState.output_spectrum: U_r U_r^T and sigma against numpy's SVD (rounding)."""
    st = _fresh_state(case)
    u, s = st.output_spectrum()
    ur, sr_, _, keep = case.svd()
    assert np.allclose(s.numpy()[keep], sr_[keep], rtol=1e-13, atol=0)
    proj = u.numpy()[:, keep] @ u.numpy()[:, keep].T
    assert np.allclose(proj, ur[:, keep] @ ur[:, keep].T, atol=1e-13)


def test_metric_capabilities() -> None:
    """What the flow asks the metrics instead of their classes."""
    space = CASES[0].space()
    m = sr.metrics
    cases = [
        (m.EuclideanMetric(space), True, "cost_grad", False),
        (m.InterpolatedMetric(space, lam=0.0), True, "cost_grad", False),
        (m.InterpolatedMetric(space, lam=0.5), False, "svd", False),
        (m.InterpolatedMetric(space, lam=0.5, solver="ntk"), False, None, False),
        (m.OutputPullbackMetric(space), False, "svd", True),
        (m.BundleMetric(space, lam=0.0), False, "svd", True),
        (m.DampedMetric(space, m.OutputPullbackMetric(space), damping=0.1), False, None, True),
    ]
    for metric, euclidean, needs, jumps in cases:
        assert metric.is_euclidean is euclidean, metric
        assert metric.gradient_needs == needs, metric
        assert metric.field_may_jump is jumps, metric


def test_softmax_hessian_is_the_losses_one() -> None:
    """The cross-entropy Hessian product and blocks against autodiff of the loss value."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    y = torch.softmax(torch.randn(4, 3, generator=gen, dtype=torch.float64), -1)
    v = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    hess = torch.autograd.functional.hessian(lambda z: CrossEntropyLoss().value(z, y), x)
    ref = torch.einsum("iajb,jb->ia", hess, v)
    assert torch.allclose(CrossEntropyLoss.hessian_vec(x, v), ref, atol=1e-14)
    blocks = torch.stack([hess[j, :, j, :] for j in range(4)])
    assert torch.allclose(CrossEntropyLoss.hessian_blocks(x), blocks, atol=1e-14)


@pytest.mark.parametrize(("n", "sample_side"), [(40, False), (16, True)])
def test_ntk_route_uses_the_engines_parameter_space_solve_when_k_below_qn(
    monkeypatch, n, sample_side
):
    """K < QN, lam < 1, structured engine: the ``ntk`` route solves ((1-lam)1 + lam D^T D) x =
    D^T u through the engine's factor-based solve (never forming D), and agrees with the SVD
    route.  Both are backward stable solves of an SPD system of condition
    kappa <= 1 + lam sigma_max^2 / (1 - lam) (~1e2 here): agreement to 1e-10 relative.
    The output layer is eliminated on the parameter side at N = 40 and on the sample side
    at N = 16 (N^2 <= 2 N m' + m'^2 + 5 m' |C| / 8 with m' = 9, |C| = 20)."""
    from subriemann.engines import StructuredBackend, kspace

    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 4, 4)), torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(8, 3),
    ).double()  # fmt: skip
    x, y = torch.randn(n, 16, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    space = sr.ParameterSpace(net, x, y, backend="structured")
    assert space.dim < space.output_dim  # K = 47 < QN = 3 N
    sides: list[bool] = []
    real_side = kspace.sample_side_solve
    monkeypatch.setattr(
        kspace, "sample_side_solve",
        lambda *a: (lambda out: sides.append(out is not None) or out)(real_side(*a)),
    )  # fmt: skip
    calls: list[float] = []
    real = StructuredBackend.solve_param_gram

    def spy(self, theta, rhs, shift):
        calls.append(shift)
        return real(self, theta, rhs, shift)

    monkeypatch.setattr(StructuredBackend, "solve_param_gram", spy)
    theta = space.initial_point() + 0.1
    ntk = sr.metrics.InterpolatedMetric(space, lam=0.4, solver="ntk").gradient(theta)
    svd = sr.metrics.InterpolatedMetric(space, lam=0.4, solver="svd").gradient(theta)
    assert calls == [pytest.approx(0.6 / 0.4)]
    assert sides == [sample_side]
    assert float((ntk - svd).norm() / svd.norm()) <= 1e-10


def test_ntk_route_reuses_one_factorization_for_repeated_solves_at_a_point(monkeypatch):
    """The band filter asks one solve per band direction at the same point: the engine's
    solve serves the first, one Cholesky factor of the Gram matrix the rest.  Every answer
    agrees with the SVD route (backward-stable SPD solves, kappa ~1e2: 1e-10 relative)."""
    from subriemann.engines import StructuredBackend

    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    x, y = torch.randn(30, 3), torch.randn(30, 4)
    space = sr.ParameterSpace(net.double(), x.double(), y.double(), backend="structured")
    assert space.dim < space.output_dim  # K = 44 < QN = 120
    calls: list[int] = []
    real = StructuredBackend.solve_param_gram
    monkeypatch.setattr(
        StructuredBackend, "solve_param_gram",
        lambda self, *a: calls.append(1) or real(self, *a),
    )  # fmt: skip
    theta = space.initial_point()
    ntk = sr.metrics.InterpolatedMetric(space, lam=0.3, solver="ntk")
    svd = sr.metrics.InterpolatedMetric(space, lam=0.3, solver="svd")
    for k in range(3):
        u = torch.randn(space.output_dim, dtype=torch.float64)
        a, b = ntk.sharp_pullback(u, theta), svd.sharp_pullback(u, theta)
        assert float((a - b).norm() / b.norm()) <= 1e-10, k
    assert len(calls) == 1
