"""The built-in metrics (:mod:`subriemann.metrics.builtin`) against independent dense references.

Every reference here is computed *outside* subriemann: the outputs come from
``torch.func.functional_call`` on a separate copy of the model, ``D`` from
``torch.func.jacrev`` of those outputs, :math:`\\nabla_x C` by hand, and the
linear algebra with numpy (``pinv`` with an explicit ``rcond``, ``solve``,
``svd``).

Tolerances
----------
All computations are float64, :math:`\\epsilon \\approx 2.2\\times10^{-16}`.
A backward-stable solve of a system of condition :math:`\\kappa` has relative
forward error :math:`\\lesssim c\\,\\epsilon\\,\\kappa`; for least squares with
a residual, :math:`\\lesssim c\\,\\epsilon\\,\\kappa(2 + \\kappa\\tan\\vartheta)`
(Wedin; :math:`\\tan\\vartheta = |P^\\perp g|/|Pg|`).  Both the library and the
reference commit such an error, so tolerances are that bound with
:math:`c = 100` (the dimension-dependent constant for these sizes), computed
from the reference SVD of each drawn network; routes that square the
condition number (the NTK eigendecomposition) get :math:`\\kappa^2`, and the
matrix-free solvers get their solver tolerance in place of :math:`\\epsilon`.
Drawn networks are kept when :math:`\\kappa(D) \\le 10^4`, which keeps the
smallest singular value 100 times above the default rank threshold
:math:`\\tau = 10^{-6}\\sigma_{\\max}` (so the reference and the library
agree on the rank).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.func import jacrev

import subriemann as sr
from subriemann.linalg import ConvergenceWarning, RankThresholdWarning
from subriemann.metrics import (
    BundleMetric,
    DampedMetric,
    EuclideanMetric,
    InterpolatedMetric,
    OutputPullbackMetric,
    ParameterMetric,
    SoftmaxFisherMetric,
    SumMetric,
)
from tests.cases import (
    HYP,
    Designed,
    DiagonalPlusPullback,
    MetricCase,
    designed_case,
    metric_cases,
    rank_deficient_case,
    tanh_case,
)
from tests.helpers import grad_np
from tests.references import EPS, RANK_RTOL, C, DenseMetricReference, rel

RTOL = RANK_RTOL  # default rank_rtol of the metrics
SOLVERS = ("svd", "ntk", "lstsq", "matrix_free")
MF_RTOL = 1e-12  # default solver_rtol of the matrix-free solvers


# ----------------------------------------------------------------------------------------
# docs/theory.md §2: every metric's gradient against its closed form
# ----------------------------------------------------------------------------------------
@HYP
@given(case=metric_cases(), lam=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]))
def test_gradients_match_closed_forms(case, lam):
    ref, th = case.ref, case.theta
    # Euclidean: D^T grad_x C
    e = grad_np(case.metric(EuclideanMetric), th)
    assert rel(e, ref.euclidean()) <= C * EPS
    # output pullback: D^+ grad_x C (numpy pinv, rcond = rank_rtol)
    p = grad_np(case.metric(OutputPullbackMetric), th)
    assert rel(p, ref.pullback()) <= ref.tol(1.0)
    # interpolated: ((1-lam)1 + lam D^T D)^{-1} D^T grad_x C
    v = grad_np(case.metric(InterpolatedMetric, lam=lam), th)
    assert rel(v, ref.interpolated(lam)) <= ref.tol(lam)
    # the two ends are reproduced exactly (same formula, not 1 - eps)
    if lam == 0.0:
        assert rel(v, e) <= C * EPS
    if lam == 1.0:
        assert rel(v, p) <= C * EPS
    # bundle: g_lam restricted to ran D^T
    b = grad_np(case.metric(BundleMetric, lam=lam), th)
    assert rel(b, ref.bundle(lam)) <= ref.tol(lam)


# ----------------------------------------------------------------------------------------
# docs/theory.md §8 item 1, horizontality, item 4
# ----------------------------------------------------------------------------------------
@HYP
@given(case=metric_cases())
def test_output_velocities_item1(case):
    """D V_0 = -D D^T grad_x C (1e-12) and D V_1 = -P grad_x C (1e-9); V = -gradient."""
    ref, th = case.ref, case.theta
    v0 = -grad_np(case.metric(EuclideanMetric), th)
    v1 = -grad_np(case.metric(OutputPullbackMetric), th)
    ntk_g = ref.D @ ref.D.T @ ref.g
    # relative to the scale |D|^2 |g| of the product (the sum D D^T g is formed in float64)
    assert np.linalg.norm(ref.D @ v0 + ntk_g) <= 1e-12 * ref.s[0] ** 2 * np.linalg.norm(ref.g)
    # D D^+ g = P g: error eps * kappa |g| <= 2e-12 |g| for kappa <= 1e4
    assert np.linalg.norm(ref.D @ v1 + ref.P @ ref.g) <= 1e-9 * np.linalg.norm(ref.g)


@HYP
@given(case=metric_cases(), lam=st.sampled_from([0.0, 0.5, 1.0]))
def test_horizontality(case, lam):
    """Every V_lam lies in ran D^T: |(1 - V_r V_r^T) V| is at rounding level."""
    ref, th = case.ref, case.theta
    for cls in (InterpolatedMetric, BundleMetric):
        v = grad_np(case.metric(cls, lam=lam), th)
        off = v - ref.Vr @ (ref.Vr.T @ v)
        # V = sum_i c_i v_i exactly; the off-frame part is rounding in the v_i (eps * size)
        assert np.linalg.norm(off) <= C * EPS * ref.kappa * np.linalg.norm(v) + 1e-300


@HYP
@given(case=metric_cases(), lam=st.sampled_from([0.0, 0.3, 1.0]))
def test_characterization_item4(case, lam):
    """g_lam(V_lam, w) = dC(w) for w in the distribution (1e-9), densely and via check_gradient."""
    ref, th = case.ref, case.theta
    tol = ref.characterization_tol()
    dc = ref.D.T @ ref.g
    rng = np.random.default_rng(0)
    for cls in (InterpolatedMetric, BundleMetric):
        metric = case.metric(cls, lam=lam)
        v = grad_np(metric, th)
        # the distribution: R^K for the interpolated metric at lam < 1, else ran D^T
        frame = np.eye(ref.K) if (cls is InterpolatedMetric and lam < 1) else ref.Vr
        w = frame @ rng.standard_normal((frame.shape[1], 6))
        lhs = v @ ref.g_lam(lam) @ w
        res = np.abs(lhs - dc @ w) / (np.linalg.norm(dc) * np.linalg.norm(w, axis=0))
        assert res.max() <= tol, (cls.__name__, res.max(), tol)
        space = metric.space
        check = sr.check_gradient(space, th, rtol=tol)
        assert check.passed, str(check)


# ----------------------------------------------------------------------------------------
# docs/theory.md §8 item 3: equal zeros for every lam, on a rank-deficient model x = F(B theta)
# ----------------------------------------------------------------------------------------
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(seed=st.integers(0, 1000))
def test_equal_zeros_rank_deficient(seed):
    crit, noncrit = rank_deficient_case(seed, True), rank_deficient_case(seed, False)
    ref = crit.ref
    assert ref.r < ref.QN < ref.K  # rank loss in the overparametrized regime
    kr = ref.s[0] / ref.s[ref.r - 1]  # condition of D on its numerical range
    assume(kr <= 1e3)
    assert np.linalg.norm(ref.D.T @ ref.g) <= 1e-12 * ref.s[0] * np.linalg.norm(ref.g)
    # "zero" up to rounding: the library's grad_x C = x - y is g plus the rounding of x
    # (eps |x|), and its ran D is the reference's rotated by eps * kappa_r; D^+ then divides
    # these components by sigma_r (the weights of V_lam never exceed 1/sigma_r + sigma_max).
    noise = C * EPS * (kr * np.linalg.norm(ref.g) + np.linalg.norm(ref.x))
    noise *= 1 / ref.s[ref.r - 1] + ref.s[0]
    for lam in (0.0, 0.25, 0.5, 0.75, 1.0):
        for cls in (InterpolatedMetric, BundleMetric):
            v = grad_np(crit.metric(cls, lam=lam), crit.theta)
            assert np.linalg.norm(v) <= noise, (cls.__name__, lam)
            w = grad_np(noncrit.metric(cls, lam=lam), noncrit.theta)
            assert np.linalg.norm(w) > 1e4 * noise, (cls.__name__, lam)


# ----------------------------------------------------------------------------------------
# solvers agree with the dense SVD path
# ----------------------------------------------------------------------------------------
def solver_tol(
    ref: DenseMetricReference, solver: str, lam: float, what: str = "gradient", bundle: bool = False
) -> float:
    """Agreement bound of ``solver`` with the SVD path.

    svd/lstsq: backward stable, eps * kappa_eff (kappa_eff: that of g_lam for
    lam < 1, of the least-squares problem at lam = 1, kappa^2 for sharp of a
    general covector at lam = 1, since (D^T D)^+ has condition kappa^2).
    ntk: the eigenvalues of D D^T carry the absolute error eps sigma_max^2, so
    every quantity built on them gains a factor kappa (kappa^2 instead of
    kappa); the bundle metric uses (D D^T)^+ for its projector onto ran D^T
    even at lam < 1.  matrix_free: the solver tolerance (1e-12) in place of
    eps, on the same condition numbers.
    """
    k = ref.kappa
    if lam == 1.0:
        base = k * (2 + k * ref.tan_theta()) if what == "gradient" else k**2
    else:
        base = ref.kappa_g(lam)
    if solver == "ntk" and (lam == 1.0 or bundle):
        base = max(base, k**2) * (k if what == "sharp" else 1.0)
    if bundle and solver == "matrix_free" and what == "sharp":
        base = max(base, k**2)  # the projection of a general covector is one LSMR solve
    unit = MF_RTOL if solver == "matrix_free" else EPS
    return C * unit * base + C * EPS * base


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@pytest.mark.parametrize("solver", SOLVERS[1:])
@given(case=metric_cases(), lam=st.sampled_from([0.3, 0.5, 1.0]))
def test_solvers_agree_with_svd(solver, case, lam):
    ref, th = case.ref, case.theta
    xi = torch.as_tensor(np.random.default_rng(1).standard_normal(ref.K))
    for cls in (InterpolatedMetric, BundleMetric):
        bundle = cls is BundleMetric
        base = case.metric(cls, lam=lam, solver="svd")
        g_svd, s_svd = base.gradient(th), base.sharp(xi, th)
        m = case.metric(cls, lam=lam, solver=solver)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)  # must converge here
            g, s = m.gradient(th), m.sharp(xi, th)
        assert rel(g, g_svd) <= solver_tol(ref, solver, lam, bundle=bundle), cls.__name__
        assert rel(s, s_svd) <= solver_tol(ref, solver, lam, "sharp", bundle), cls.__name__
        # the SVD path's sharp of a general covector against the dense reference
        expected = (
            ref.sharp_bundle(xi.numpy(), lam) if bundle else ref.sharp_interpolated(xi.numpy(), lam)
        )
        assert rel(s_svd, expected) <= solver_tol(ref, "svd", lam, "sharp")


NEAR_SINGULAR = [
    # (sigma_min/sigma_max, rank_rtol): threshold below sigma_min (kept) or above it (cut)
    (1e-5, 1e-6),
    (1e-5, 1e-4),
    (1e-9, 1e-6),
]


@pytest.mark.parametrize("ratio,rtol", NEAR_SINGULAR)
@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_near_singular_solvers(ratio, rtol, lam):
    """Solvers on D with sigma_min/sigma_max = ratio, one isolated small singular value."""
    sig = np.r_[np.linspace(1.0, 0.2, 9), ratio]
    case = designed_case(sig, k=30, rtol=rtol)
    ref, th = case.ref, case.theta
    s = ref.s / ref.s[0]
    assert 0.5 * ratio < s[-1] < 2 * ratio
    kept = s[-1] > rtol
    xi = torch.as_tensor(np.random.default_rng(2).standard_normal(ref.K))
    g_svd = case.metric(InterpolatedMetric, lam=lam, solver="svd", rank_rtol=rtol).gradient(th)
    assert rel(g_svd, ref.interpolated(lam)) <= C * EPS * (ref.kappa if kept else 1 / rtol)
    for solver in SOLVERS[1:]:
        m = case.metric(InterpolatedMetric, lam=lam, solver=solver, rank_rtol=rtol)
        if solver == "matrix_free" and lam == 1.0 and not kept:
            # a Krylov solver cannot cut the spectrum at tau: it must say so, never silently
            with pytest.warns(RankThresholdWarning, match="rank threshold"):
                g = m.gradient(th)
            assert torch.isfinite(g).all()
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            g = m.gradient(th)
            m.sharp(xi, th)
        if lam < 1.0:
            # g_lam >= (1 - lam): every route is well conditioned, kappa(g) <= 1 + sigma_max^2
            tol = C * (MF_RTOL if solver == "matrix_free" else EPS) * 2
        elif kept:
            # the 1/sigma_min component is resolved: svd/lstsq eps*kappa, ntk eps*kappa^2,
            # matrix_free rtol*kappa
            tol = (
                C
                * {
                    "ntk": EPS * ref.kappa**2,
                    "lstsq": EPS * ref.kappa,
                    "matrix_free": MF_RTOL * ref.kappa,
                }[solver]
            )
        else:
            # cut: the kept spectrum has condition <= 5, the routes agree to rounding;
            # the ntk route sees sigma_min^2 + O(eps) against tau^2 >> eps
            tol = C * EPS * 25
        assert rel(g, g_svd) <= tol, (solver, rel(g, g_svd), tol)


@pytest.mark.parametrize(
    "ratio,rank_atol,certified",
    [
        (1e-2, None, True),  # sigma_min^2 = 1e8 tau^2: the Cholesky certificate holds
        (1.2e-6, None, False),  # tau < sigma_min < sqrt(mu): certificate fails, eigh keeps it
        (5e-7, None, False),  # sigma_min < tau: certificate fails, eigh cuts it
        (1e-3, 1e-4, True),  # absolute threshold, sigma_min = 10 tau
        (1e-3, 2e-3, False),  # absolute threshold above sigma_min
    ],
)
def test_ntk_certified_cholesky(ratio, rank_atol, certified):
    """lam = 1, 'ntk': the Cholesky shortcut is taken exactly when it proves full rank.

    Either way the gradient is the thresholded pseudoinverse solution of the
    dense numpy reference, to the ntk route's eps * kappa^2 on the kept spectrum.
    """
    sig = np.r_[np.linspace(1.0, 0.2, 7), ratio]
    case = designed_case(sig, k=20)
    ref, th = case.ref, case.theta
    tau = rank_atol if rank_atol is not None else RTOL * ref.s[0]
    m = case.metric(InterpolatedMetric, lam=1.0, solver="ntk", rank_atol=rank_atol)
    g = m.gradient(th)
    cert = m.state(th).certified_cholesky(rank_atol, m.rank_rtol)
    assert (cert is not None) is certified
    # the pseudoinverse with the same threshold (numpy, from the dense D)
    u, s, vt = np.linalg.svd(ref.D, full_matrices=False)
    keep = s > tau
    expected = vt.T[:, keep] @ ((u[:, keep].T @ ref.g) / s[keep])
    kappa = s[0] / s[keep][-1]
    assert rel(g, expected) <= C * EPS * kappa**2, rel(g, expected)
    if certified:
        assert int(keep.sum()) == len(sig)  # a certificate never hides a rank loss


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_rank_deficient_solvers(lam):
    """Exactly rank-deficient D (x = F(B theta)): every solver, matrix-free included, agrees."""
    case = rank_deficient_case(3, critical=False)
    ref, th = case.ref, case.theta
    xi = torch.as_tensor(np.random.default_rng(3).standard_normal(ref.K))
    kr = ref.s[0] / ref.s[ref.r - 1]  # condition of D on its numerical range
    for cls in (InterpolatedMetric, BundleMetric):
        base = case.metric(cls, lam=lam, solver="svd")
        g_svd, s_svd = base.gradient(th), base.sharp(xi, th)
        ref_g = ref.bundle(lam) if (cls is BundleMetric or lam == 1.0) else ref.interpolated(lam)
        assert rel(g_svd, ref_g) <= C * EPS * kr**2
        for solver in SOLVERS[1:]:
            m = case.metric(cls, lam=lam, solver=solver)
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConvergenceWarning)
                g, s = m.gradient(th), m.sharp(xi, th)
            unit = MF_RTOL if solver == "matrix_free" else EPS
            assert rel(g, g_svd) <= C * unit * kr**2 + C * EPS * kr**2, (cls.__name__, solver)
            # sharp of a covector with components in ker D: (D^T D)^+ has condition kr^2
            assert rel(s, s_svd) <= C * unit * kr**3 + C * EPS * kr**3, (cls.__name__, solver)


def test_solver_choice_and_report():
    case = designed_case(np.linspace(1, 0.5, 4), k=12)
    m = case.metric(InterpolatedMetric, lam=1.0, solver="matrix_free")
    m.gradient(case.theta)
    info = m.last_solve
    assert info.solver == "lsmr" and info.converged and info.residual <= 10 * MF_RTOL
    assert info.iterations <= info.maxiter
    assert m.description()["solver"] == "matrix_free"
    assert case.metric(InterpolatedMetric, lam=0.5).solver == "svd"  # small: auto -> svd
    m = case.metric(InterpolatedMetric, lam=0.5, solver="matrix_free")
    m.gradient(case.theta)
    assert m.last_solve.solver == "cg" and m.last_solve.converged


# ----------------------------------------------------------------------------------------
# geodesics
# ----------------------------------------------------------------------------------------
def test_geodesic_interpolated_matches_independent_rk4():
    case = tanh_case((2, 2, 1), 4, seed=0)
    ref, th = case.ref, case.theta
    steps = 12
    metric = case.metric(InterpolatedMetric, lam=0.5, exp_steps=steps)
    v = 0.4 * torch.as_tensor(np.random.default_rng(4).standard_normal(ref.K))
    end = metric.exp(v, th)
    end_ref, energies = ref.geodesic(0.5, th, v, steps)
    # the same RK4 scheme on the same ODE: agreement to rounding, not to the step size
    assert rel(end - th, end_ref - th) <= 1e-10
    # the discrete geodesic conserves g(u, u) to RK4 accuracy O(h^4) ~ 1e-4 * |u|^2
    assert np.ptp(energies) <= 1e-4 * energies[0]
    # and converges: halving the step changes the end point by O(h^4)
    fine, _ = ref.geodesic(0.5, th, v, 2 * steps)
    assert rel(end - th, fine - th) <= 1e-4
    # analytic Christoffels against autodiff of the dense metric (geomstats' formula)
    gam = metric.christoffels(th)
    gm = torch.as_tensor(ref.g_lam(0.5))
    dg = torch.func.jacfwd(
        lambda t: (
            0.5 * torch.eye(ref.K, dtype=t.dtype)
            + 0.5 * jacrev(ref.outputs)(t).T @ jacrev(ref.outputs)(t)
        )
    )(th)
    # dg[i, j, l] = d_l g_ij;  Gamma_{l,ij} = (d_i g_lj + d_j g_li - d_l g_ij) / 2
    first = 0.5 * (torch.einsum("lji->lij", dg) + dg - torch.einsum("ijl->lij", dg))
    gam_ref = torch.einsum("kl,lij->kij", torch.linalg.inv(gm), first)
    assert rel(gam, gam_ref) <= 1e-10


def test_generic_geodesic_equation_matches_builtin():
    """Recipe (a) metric with g_{1/2}'s matrix: the generic geodesic path gives the same exp."""

    class Half(ParameterMetric):
        def metric_matrix(self, base_point):
            d = self.space.jacobian(base_point)
            return 0.5 * torch.eye(d.shape[1], dtype=d.dtype) + 0.5 * d.T @ d

    case = tanh_case((2, 2, 1), 4, seed=1)
    th = case.theta
    v = 0.3 * torch.as_tensor(np.random.default_rng(5).standard_normal(case.ref.K))
    a = case.metric(Half, exp_steps=6).exp(v, th)
    b = case.metric(InterpolatedMetric, lam=0.5, exp_steps=6).exp(v, th)
    assert rel(a - th, b - th) <= 1e-10


def test_euclidean_exp_is_a_straight_line():
    case = tanh_case((2, 2, 1), 4, seed=0)
    metric = case.metric(EuclideanMetric)
    v = torch.randn(case.ref.K, dtype=torch.float64)
    assert torch.equal(metric.exp(v, case.theta), case.theta + v)
    state = torch.stack([case.theta, v])
    assert torch.equal(metric.geodesic_equation(state)[1], torch.zeros_like(v))


# ----------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lam", [1.5, -0.1, 1 + 1e-12])
def test_lam_outside_unit_interval(small_case, lam):
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        small_case.fresh().equip_with_metric(InterpolatedMetric, lam=lam)
    with pytest.raises(ValueError, match=r"lam must lie in \[0, 1\]"):
        BundleMetric(small_case.fresh(), lam=lam)


def test_lam_nan_and_wrong_type(small_case):
    with pytest.raises(ValueError, match="NaN"):
        InterpolatedMetric(small_case.fresh(), lam=float("nan"))
    for bad in ("0.5", None, True, [0.5], torch.tensor([0.1, 0.2]), 0.5j):
        with pytest.raises(TypeError, match="lam must be a real"):
            InterpolatedMetric(small_case.fresh(), lam=bad)
    # numpy and 0-d tensor scalars are real numbers
    assert InterpolatedMetric(small_case.fresh(), lam=np.float32(0.25)).lam == 0.25
    assert InterpolatedMetric(small_case.fresh(), lam=torch.tensor(1.0)).lam == 1.0
    with pytest.raises(TypeError, match="lam = 1 fixed"):
        OutputPullbackMetric(small_case.fresh(), lam=0.5)


def test_bad_solver_and_options(small_case):
    with pytest.raises(ValueError, match="solver must be one of"):
        InterpolatedMetric(small_case.fresh(), lam=0.5, solver="cholesky")
    with pytest.raises(ValueError, match="rank_rtol"):
        InterpolatedMetric(small_case.fresh(), lam=0.5, rank_rtol=2.0)
    with pytest.raises(ValueError, match="maxiter"):
        InterpolatedMetric(small_case.fresh(), lam=0.5, maxiter=0)
    with pytest.raises(ValueError, match="damping"):
        DampedMetric(small_case.fresh(), EuclideanMetric(small_case.fresh()), damping=-1.0)
    space = small_case.fresh()
    with pytest.raises(ValueError, match="weights must be finite and non-negative"):
        SumMetric(space, [EuclideanMetric(space)], weights=[float("nan")])
    with pytest.raises(ValueError, match="Q >= 2"):
        SoftmaxFisherMetric(space)


def test_point_of_wrong_shape(small_case):
    m = small_case.metric(InterpolatedMetric, lam=0.5)
    th = small_case.theta
    with pytest.raises(ValueError, match="shape"):
        m.gradient(th[:-1])
    with pytest.raises(ValueError, match="shape"):
        m.gradient(torch.cat([th, th]))
    with pytest.raises(TypeError, match="dtype"):
        m.gradient(th.float())
    with pytest.raises(ValueError, match="shape"):
        m.inner_product(th[:-1], th[:-1], th)
    with pytest.raises(ValueError, match="shape"):
        m.sharp(th[:-1], th)
    with pytest.raises(ValueError, match="shape"):
        m.metric_matrix(th[:-1])


@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_matrix_free_not_converged_warns_with_residual(lam):
    case = designed_case(np.logspace(0, -3, 10), k=30)
    m = case.metric(InterpolatedMetric, lam=lam, solver="matrix_free", maxiter=2)
    with pytest.warns(ConvergenceWarning, match=r"did not converge .* relative residual"):
        m.gradient(case.theta)
    assert not m.last_solve.converged and m.last_solve.residual > m.solver_rtol
    with pytest.warns(ConvergenceWarning, match="relative residual"):
        m.sharp(torch.ones(case.ref.K, dtype=torch.float64), case.theta)


def test_distribution_refuses_at_large_k(small_case, monkeypatch):
    import subriemann.metrics.base as base

    monkeypatch.setattr(base, "DENSE_K_LIMIT", 5)
    th = small_case.theta
    for cls in (InterpolatedMetric, BundleMetric, EuclideanMetric, DiagonalPlusPullback):
        m = small_case.metric(cls)
        with pytest.raises(ValueError, match="operator forms"):
            m.distribution(th)
        if cls is not DiagonalPlusPullback:  # a user's metric_matrix is the user's code
            with pytest.raises(ValueError, match="operator forms"):
                m.metric_matrix(th)
    # the operator forms still work, and check_gradient falls back to sharp directions
    space = small_case.fresh().equip_with_metric(InterpolatedMetric, lam=1.0)
    assert space.metric.gradient(th).shape == th.shape
    check = sr.check_gradient(space, th)
    assert check.passed and check.distribution_dim == -1


@pytest.mark.parametrize("solver", SOLVERS)
def test_absolute_threshold_matches_relative(solver):
    """rank_atol = rank_rtol * sigma_max gives the same rank, threshold and gradient."""
    case = designed_case(np.r_[np.linspace(1.0, 0.2, 5), 1e-8], k=20, rtol=1e-6)
    th = case.theta
    rel_m = case.metric(InterpolatedMetric, lam=1.0, solver="svd")
    tau = rel_m.rank_threshold(th)
    abs_m = case.metric(InterpolatedMetric, lam=1.0, solver=solver, rank_atol=tau)
    assert abs_m.rank_threshold(th) == tau and abs_m.rank(th) == rel_m.rank(th) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        # the cut singular value (1e-8) is isolated: LSMR's condition limit catches it
        warnings.simplefilter("ignore", RankThresholdWarning)  # (inserted first: wins)
        g = abs_m.gradient(th)
    # the kept spectrum has condition 5; matrix-free stops before resolving 1e-8
    tol = 1e-6 if solver == "matrix_free" else C * EPS * 25
    assert rel(g, rel_m.gradient(th)) <= tol


# -- the lam = 1 direction meets ACCURACY or says so (issue 13) ------------------------
def _pinv_direction(case, rank_rtol: float = RTOL) -> np.ndarray:
    """D^+ g with numpy's SVD pseudoinverse and the same relative threshold (the reference).

    numpy's SVD is backward stable: its error is <= C eps kappa = 2e-9 at kappa = 1e5, so a
    route that meets ACCURACY = 1e-8 against the SVD route is within 1.2e-8 of it.
    """
    return np.linalg.pinv(case.ref.D, rcond=rank_rtol) @ case.ref.g


ACC_TOL = 1.2e-8  # ACCURACY plus the reference's own C eps kappa (kappa <= 1e5 below)


def test_ntk_lam1_full_rank_ill_conditioned_is_refined():
    """kappa(D) = 1e5, full rank: the push-through solve alone is off by ~eps kappa^2 = 2e-6;
    iterative refinement brings it to ACCURACY, and last_solve says so."""
    sig = np.geomspace(1.0, 1e-5, 16)
    case = designed_case(sig, k=40)
    m = case.metric(InterpolatedMetric, lam=1.0, solver="ntk")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # AccuracyWarning, ConvergenceWarning
        g = m.gradient(case.theta)
    assert rel(g, _pinv_direction(case)) <= ACC_TOL, rel(g, _pinv_direction(case))
    assert m.last_solve.solver == "ntk" and m.last_solve.converged
    assert m.last_solve.iterations >= 1 and "refinement" in m.last_solve.reason
    assert m.last_solve.residual <= m.accuracy


def test_ntk_lam1_well_conditioned_certified_without_refinement():
    """kappa(D) = 5: lambda_min(D D^T) > eta / accuracy is certified by one shifted Cholesky
    factorization, and no refinement step is spent."""
    case = designed_case(np.linspace(1.0, 0.2, 12), k=30)
    m = case.metric(InterpolatedMetric, lam=1.0, solver="ntk")
    g = m.gradient(case.theta)
    assert m.last_solve.iterations == 0 and "a priori" in m.last_solve.reason
    assert rel(g, _pinv_direction(case)) <= C * EPS * 5


@pytest.mark.parametrize("solver", ["auto", "ntk"])
def test_lam1_sigma_near_threshold_falls_back_to_svd(solver):
    """sigma_r = 1.2 tau: the eigenvalues of D D^T carry an error eps sigma_max^2 ~ 2e-4 sigma_r^2,
    so the thresholded eigendecomposition is off by ~1e-4 (it was, silently).  The error
    estimate sees it and the SVD takes over; a rank-deficient tail (1e-9) is cut."""
    sig = np.r_[np.linspace(1.0, 0.2, 7), 1.2e-6, 1e-9]
    case = designed_case(sig, k=20)
    m = case.metric(InterpolatedMetric, lam=1.0, solver=solver)
    g = m.gradient(case.theta)
    # reference error: C eps / (sigma_r - sigma_{r+1}) = C eps / 1.2e-6 ~ 2e-8 (gap-limited)
    tol = ACC_TOL + C * EPS / 1.2e-6
    assert rel(g, _pinv_direction(case)) <= tol, rel(g, _pinv_direction(case))
    if solver == "ntk":
        assert m.last_solve.solver == "svd" and "fallback" in m.last_solve.reason


def test_lam1_accuracy_warning_when_no_fallback(monkeypatch):
    """Where D is too large for the SVD fallback, the ntk route warns, and its estimate is an
    honest bound on the actual error."""
    from subriemann.linalg.routes import ntk

    monkeypatch.setattr(ntk, "SVD_FALLBACK_LIMIT", 0)
    sig = np.r_[np.linspace(1.0, 0.2, 7), 1.2e-6, 1e-9]
    case = designed_case(sig, k=20)
    m = case.metric(InterpolatedMetric, lam=1.0, solver="ntk")
    with pytest.warns(sr.linalg.AccuracyWarning, match="estimated relative error"):
        g = m.gradient(case.theta)
    err = rel(g, _pinv_direction(case))
    assert not m.last_solve.converged
    assert m.accuracy < err <= m.last_solve.residual, (err, m.last_solve.residual)


def test_ntk_lam1_tall_d_ill_conditioned():
    """K < QN: the D^T D route squares kappa = 1e5 too; the estimate sends it to the SVD."""
    rng = np.random.default_rng(5)
    n, k = 40, 8
    u = np.linalg.qr(rng.standard_normal((n, k)))[0]
    v = np.linalg.qr(rng.standard_normal((k, k)))[0]
    a = torch.as_tensor(u @ np.diag(np.geomspace(1.0, 1e-5, k)) @ v.T)
    case = MetricCase(Designed(k), a, torch.as_tensor(rng.standard_normal((n, 1))), backend="func")
    m = case.metric(InterpolatedMetric, lam=1.0, solver="ntk")
    g = m.gradient(case.theta)
    # least squares with a residual: C eps kappa (2 + kappa tan) (module docstring)
    ref = _pinv_direction(case)
    r = case.ref.g - case.ref.D @ ref
    tan = np.linalg.norm(r) / np.linalg.norm(case.ref.g - r)
    assert rel(g, ref) <= ACC_TOL + C * EPS * 1e5 * (2 + 1e5 * tan), rel(g, ref)
    assert m.last_solve.solver == "svd"


def test_matrix_free_lam1_announces_its_error():
    """LSMR to solver_rtol = 1e-10 on kappa = 1e5: the forward error can reach 2 kappa rtol =
    2e-5 > ACCURACY, and the solve says so (AccuracyWarning); the estimate bounds the error."""
    case = designed_case(np.geomspace(1.0, 1e-5, 16), k=40)
    m = case.metric(InterpolatedMetric, lam=1.0, solver="matrix_free", solver_rtol=1e-10)
    with pytest.warns(sr.linalg.AccuracyWarning, match="estimated relative error"):
        g = m.gradient(case.theta)
    info = m.last_solve
    assert rel(g, _pinv_direction(case)) <= 2.0 * info.cond * info.residual + 1e-10


@pytest.mark.parametrize(
    "qn,k,route",
    [
        (24, 1441, "svd"),  # the main job: tiny, the SVD is cheap
        (128, 4801, "ntk"),  # benchmark S: push-through with certified accuracy
        (1024, 75268, "ntk"),  # M
        (512, 1117185, "ntk"),  # L
        (5000, 100, "svd"),  # tall, D formed anyway
        (100_000, 1000, "ntk"),  # tall and large: D^T D
        (30_000, 40_000, "matrix_free"),
    ],
)
def test_auto_route_table(qn, k, route):
    from subriemann.linalg import size_policy as _auto_route

    assert _auto_route(qn, k) == route


def test_accuracy_is_validated():
    case = designed_case(np.linspace(1.0, 0.5, 3), k=6)
    with pytest.raises(ValueError, match="accuracy"):
        case.metric(InterpolatedMetric, lam=1.0, accuracy=0.0)
