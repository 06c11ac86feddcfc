"""Critical sets: classification, dimension, continuation, on models with known critical sets.

Every model here has a critical set known in closed form:

* ``Line``: :math:`x = abX`.  For :math:`y \\not\\parallel X` the critical set is
  the hyperbola :math:`ab = c^* = \\langle X, y\\rangle/|X|^2` (dimension 1, two
  components, non-global) plus the saddle :math:`a = b = 0` (index 1).
* ``VecLine``: :math:`x = \\langle a, b\\rangle X`, :math:`a, b \\in \\mathbb{R}^2`:
  the quadric :math:`\\langle a, b\\rangle = c^*` (dimension 3, connected).
* A two-layer tanh net with a dead output unit at a global minimum:
  :math:`a_2 = 0` leaves :math:`w_2 \\in \\mathbb{R}^M` free (dimension M).
* An odd tanh unit plus a bias on symmetric data with even targets:
  :math:`C = \\tfrac12|a\\tanh(Xw)|^2 + \\tfrac12|c - y|^2` exactly, so
  :math:`\\{a = 0, c = \\bar y\\}` is a non-global critical set of dimension M.
* ``ThroughB``: :math:`x = F(B\\theta)`; at a non-degenerate critical point of
  :math:`C\\circ F` the critical set is :math:`\\theta^* + \\ker B`
  (dimension K - r).
* ``SinGate``: :math:`x = a\\sin(\\pi w)X + c` on symmetric data: on
  :math:`\\{a = 0, c = \\bar y\\}` the rank of D drops at every integer w, so
  tracking from w = 1/2 must stop at rank changes on both sides.
"""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch

import subriemann as sr
from subriemann.analysis import (
    CriticalSet,
    classify_equilibrium,
    refine_critical_point,
    track_critical_set,
)
from subriemann.app.plots_analysis import plot_critical_set

matplotlib.use("Agg")

F64 = torch.float64
EPS64 = float(torch.finfo(F64).eps)
pytestmark = pytest.mark.filterwarnings("ignore:structured NTK engine:UserWarning")


class Line(torch.nn.Module):
    """x = a b X with scalar a, b."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(1.0))
        self.b = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * self.b * x


class VecLine(torch.nn.Module):
    """x = <a, b> X with a, b in R^p."""

    def __init__(self, p: int = 2) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(p))
        self.b = torch.nn.Parameter(torch.ones(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a @ self.b) * x


class OddPlusBias(torch.nn.Module):
    """x = a tanh(X w) + c: odd in X, plus a constant."""

    def __init__(self, m: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(m))
        self.a = torch.nn.Parameter(torch.tensor(0.0))
        self.c = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * torch.tanh(x @ self.w) + self.c


class ThroughB(torch.nn.Module):
    """x = u1 tanh(u2 X + u3) with u = B theta: depends on theta only through B theta."""

    def __init__(self, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("B", b)
        self.theta = torch.nn.Parameter(torch.zeros(b.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.B @ self.theta
        return u[0] * torch.tanh(u[1] * x + u[2])


class TanhThroughB(torch.nn.Module):
    """x = tanh(X B theta): K parameters, r = B.shape[0] combinations."""

    def __init__(self, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("B", b)
        self.theta = torch.nn.Parameter(torch.zeros(b.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ (self.B @ self.theta))


class SinGate(torch.nn.Module):
    """x = a sin(pi w) X + c."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.a = torch.nn.Parameter(torch.tensor(0.0))
        self.c = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * torch.sin(math.pi * self.w) * x + self.c


def _t(*vals: float) -> torch.Tensor:
    return torch.tensor(vals, dtype=F64)


def _assert_on_set(cs: CriticalSet) -> None:
    """Every node is critical to the corrector's tolerance and C is constant per component."""
    tol = cs.tolerances["grad_tol"]
    for _, d in cs.graph.nodes(data=True):
        assert d["grad_norm"] <= tol
    for info in cs.component_info:
        assert info.cost_constant, info
        assert info.cost_spread <= cs.tolerances["cost_tol"]
        assert info.dimension_consistent, info.dimensions


# -- the linear network x = a b X ---------------------------------------------------
X_LIN = torch.tensor([[1.0], [2.0], [-1.0]], dtype=F64)
Y_LIN = torch.tensor([[1.0], [0.5], [1.0]], dtype=F64)  # not parallel to X: no global minimum
C_STAR = float((X_LIN * Y_LIN).sum() / (X_LIN**2).sum())


@pytest.fixture(scope="module")
def line_space():
    return sr.ParameterSpace(Line(), X_LIN, Y_LIN)


def test_line_hyperbola_non_global(line_space):
    a = 1.5 * math.sqrt(C_STAR)
    rep = classify_equilibrium(line_space, _t(a, C_STAR / a))
    assert rep.is_critical and not rep.is_global_minimum
    assert rep.kind == "non-global minimum"
    assert rep.dimension == 1 and rep.dimension_reliable and rep.dimension_gap > 1e10
    assert rep.index == 0
    assert rep.rank == 1 and rep.rank_deficit == 1  # min(QN, K) = 2
    assert rep.range_grad_norm < 1e-12
    # |P_perp grad_x C| = distance of y from the line R X
    resid = Y_LIN.double() - C_STAR * X_LIN.double()
    assert rep.perp_grad_norm == pytest.approx(float(resid.norm()), rel=1e-12)
    # Hessian = |X|^2 (b, a)(b, a)^T: eigenvalues 0 and |X|^2 (a^2 + b^2)
    lam = float((X_LIN**2).sum()) * (a**2 + (C_STAR / a) ** 2)
    assert rep.hessian_eigenvalues[-1].item() == pytest.approx(lam, rel=1e-12)
    assert rep.kernel_basis.shape == (2, 1)
    assert "critical-set dimension 1" in rep.summary()


def test_line_origin_is_a_saddle(line_space):
    rep = classify_equilibrium(line_space, torch.zeros(2, dtype=F64))
    assert rep.kind == "non-global saddle" and rep.is_saddle
    assert rep.index == 1 and rep.dimension == 0
    assert not rep.is_global_minimum
    assert rep.rank == 0


def test_line_global_minimum():
    y = 0.7 * X_LIN
    space = sr.ParameterSpace(Line(), X_LIN, y)
    rep = classify_equilibrium(space, _t(1.4, 0.5))
    assert rep.is_global_minimum and rep.kind == "global minimum"
    assert rep.output_grad_norm < 1e-14
    assert rep.dimension == 1 and rep.index == 0


def test_line_not_critical_then_refined(line_space):
    a = math.sqrt(C_STAR)
    theta = _t(a + 0.05, C_STAR / a - 0.03)
    rep = classify_equilibrium(line_space, theta)
    assert rep.kind == "not critical" and not rep.is_critical
    assert any("not a critical point" in n for n in rep.notes)
    fixed, gnorm = refine_critical_point(line_space, theta)
    assert gnorm < 1e-12
    assert float(fixed[0] * fixed[1]) == pytest.approx(C_STAR, abs=1e-12)
    # minimum-norm steps: the correction is normal to the hyperbola at the result
    normal = torch.stack([fixed[1], fixed[0]])
    d = theta - fixed
    assert abs(float(d @ normal)) / float(d.norm() * normal.norm()) > 0.95


def test_line_two_components(line_space):
    a = math.sqrt(C_STAR)
    seeds = torch.stack([_t(1.5 * a, C_STAR / (1.5 * a)), _t(-a, -C_STAR / a)])
    cs = track_critical_set(line_space, seeds, n_points=24, step=0.2)
    assert cs.status == "n_points reached"
    assert cs.n_components == 2
    assert cs.dimension == 1
    assert [c.dimension for c in cs.component_info] == [1, 1]
    _assert_on_set(cs)
    for comp, sign in zip(cs.components, (1.0, -1.0)):
        for n in comp:
            th = cs.graph.nodes[n]["theta"]
            assert float(th[0] * th[1]) == pytest.approx(C_STAR, abs=1e-9)
            assert float(th[0]) * sign > 0
    cost = 0.5 * float(((Y_LIN - C_STAR * X_LIN) ** 2).sum())
    assert cs.component_info[0].cost_mean == pytest.approx(cost, rel=1e-12)
    # the walk goes somewhere: both ends of each branch are explored
    assert all(c.diameter > 1.0 for c in cs.component_info)
    table = cs.component_table()
    assert len(table) == 2 and table[0]["seeds"] == [0] and table[1]["seeds"] == [1]
    assert "status: n_points reached" in cs.summary()
    assert cs.thetas.shape == (24, 2)


def test_line_balanced_flows_end_on_both_branches(line_space):
    """The Euclidean flow keeps a^2 - b^2 (the balanced invariant): it ends on the branch of
    the hyperbola a b = c* fixed by its start, and tracking from the two ends gives the two
    components."""
    ends = []
    for start in (_t(1.0, 0.3), _t(-0.8, -0.2)):
        traj = sr.gradient_flow(line_space, start, 15.0, rtol=1e-9, atol=1e-11)
        end = traj.theta[-1]
        inv0 = float(start[0] ** 2 - start[1] ** 2)
        assert float(end[0] ** 2 - end[1] ** 2) == pytest.approx(inv0, abs=1e-7)
        rep = classify_equilibrium(line_space, end)
        assert rep.kind == "non-global minimum" and rep.dimension == 1
        assert float(end[0] * end[1]) == pytest.approx(C_STAR, abs=1e-7)
        ends.append(end)
    cs = track_critical_set(line_space, torch.stack(ends), n_points=12, step=0.25)
    assert cs.n_components == 2 and cs.dimension == 1
    assert all(c.seeds == [i] for i, c in enumerate(cs.component_info))
    _assert_on_set(cs)


def test_isolated_critical_point(line_space):
    cs = track_critical_set(line_space, torch.zeros(2, dtype=F64), n_points=5)
    assert cs.graph.number_of_nodes() == 1 and cs.dimension == 0
    assert cs.status == "isolated critical point at node 0 (dimension 0)"
    assert cs.start_report.kind == "non-global saddle"


def test_line_corrector_failure_stops_cleanly(line_space):
    a = math.sqrt(C_STAR)
    cs = track_critical_set(
        line_space, _t(a, C_STAR / a), n_points=10, step=0.3, max_correction=1e-9, max_halvings=1
    )
    assert cs.graph.number_of_nodes() == 1
    assert cs.status == "corrector failed at node 0"
    assert {t["code"] for t in cs.terminations} == {"corrector_failed"}


def test_seed_far_from_critical_raises(line_space):
    # far from the hyperbola and from the origin: the corrector may not move far
    with pytest.raises(ValueError, match="no start point"):
        track_critical_set(line_space, _t(3.0, 3.0), n_points=3, corrector_iters=2)


def test_vector_line_one_component_dimension_3():
    space = sr.ParameterSpace(VecLine(2), X_LIN, Y_LIN)
    s = math.sqrt(C_STAR / 2)
    seeds = torch.stack([_t(s, s, s, s), _t(s + 0.15, s, s, s - 0.15)])  # (a, b)
    assert float(seeds[1, :2] @ seeds[1, 2:]) == pytest.approx(C_STAR)
    cs = track_critical_set(space, seeds, n_points=20, step=0.15)
    assert cs.dimension == 3
    assert cs.n_components == 1  # the two seeds' explorations meet
    assert cs.component_info[0].seeds == [0, 1]
    _assert_on_set(cs)


def _rotated_kernels(monkeypatch, seed: int) -> None:
    """Make the dense spectrum return its Hessian kernel in another orthonormal basis.

    An eigensolver returns an arbitrary basis of a repeated eigenvalue's eigenspace
    (here the kernel), and which one depends on the rounding of the BLAS path
    (SSE4.2, AVX2, AVX-512).  Rotating it by a fixed random orthogonal matrix plays
    the part of another CPU.
    """
    from subriemann.analysis.critical import spectrum as critical

    dense = critical._dense_spectrum

    def rotated(*args, **kwargs):
        spec = dense(*args, **kwargs)
        d = spec.kernel_basis.shape[1]
        if d > 1:
            g = torch.Generator().manual_seed(seed)
            q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
            spec.kernel_basis = spec.kernel_basis @ q
        return spec

    monkeypatch.setattr(critical, "_dense_spectrum", rotated)


def test_vector_line_exploration_independent_of_kernel_basis(monkeypatch):
    """The sampled set (nodes, edges, components) does not depend on the basis in which
    the eigensolver returns the 3-dimensional kernel: only the kernel (its projector)
    is geometry."""
    space = sr.ParameterSpace(VecLine(2), X_LIN, Y_LIN)
    s = math.sqrt(C_STAR / 2)
    seeds = torch.stack([_t(s, s, s, s), _t(s + 0.15, s, s, s - 0.15)])
    runs = []
    for seed in (None, 1, 2):
        if seed is not None:
            _rotated_kernels(monkeypatch, seed)
        cs = track_critical_set(space, seeds, n_points=20, step=0.15)
        assert cs.n_components == 1
        runs.append(cs)
    # node positions agree to the corrector's accuracy: |F| <= grad_tol moves a node by
    # at most grad_tol / h_min normal to the set (h_min = smallest non-zero Hessian
    # eigenvalue, ~1 here), far below 1e-6
    ref = runs[0].thetas
    for cs in runs[1:]:
        assert cs.thetas.shape == ref.shape
        assert float(torch.cdist(cs.thetas, ref).min(dim=1).values.max()) < 1e-6
        assert sorted(map(sorted, cs.graph.edges)) == sorted(map(sorted, runs[0].graph.edges))


def test_explorations_within_one_step_are_linked():
    """Two explorations of one connected set whose nodes come within one step h of each
    other are one component (the link is verified by correcting the midpoint onto the
    set), even where no predictor lands within merge_rtol * h of the other's nodes."""
    space = sr.ParameterSpace(VecLine(2), X_LIN, Y_LIN)
    s = math.sqrt(C_STAR / 2)
    # two seeds 1.6 h apart on the quadric; one step from each brings them within h
    seeds = torch.stack([_t(s, s, s, s), _t(s + 0.16, s, s, s - 0.16)])
    cs = track_critical_set(space, seeds, n_points=4, step=0.15, merge_rtol=0.01)
    assert cs.n_components == 1
    links = [e for e in cs.graph.edges(data=True) if e[2]["step"] == "link"]
    assert links and all(e[2]["length"] <= 0.15 for e in links)
    _assert_on_set(cs)


# -- two-layer tanh net with a dead output unit ---------------------------------------
def _dead_unit_global(m: int = 2):
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Linear(m, 2, bias=False), torch.nn.Tanh(), torch.nn.Linear(2, 1, bias=False)
    )
    x = torch.randn(8, m, generator=g)
    w1, w2 = torch.randn(m, generator=g), torch.randn(m, generator=g)
    with torch.no_grad():
        net[0].weight.copy_(torch.stack([w1, w2]))
        net[2].weight.copy_(torch.tensor([[1.3, 0.0]]))
    y = 1.3 * torch.tanh(x @ w1).unsqueeze(1)  # unit 1 fits exactly, unit 2 is dead
    space = sr.ParameterSpace(net, x, y)
    return space, space.initial_point()


def test_dead_unit_global_minimum():
    space, theta = _dead_unit_global(m=2)
    rep = classify_equilibrium(space, theta)
    assert rep.kind == "global minimum"
    assert rep.dimension == 2 and rep.dimension_reliable  # w_2 in R^2 is free
    assert rep.index == 0
    assert rep.rank == 4  # K = 6; the two w_2 columns of D vanish
    cs = track_critical_set(space, theta, n_points=12, step=0.25)
    assert cs.dimension == 2 and cs.n_components == 1
    _assert_on_set(cs)
    k = space.layout.slices()
    for _, d in cs.graph.nodes(data=True):
        w = d["theta"][k[0]].reshape(2, 2)
        a = d["theta"][k[1]]
        # distance to the set <= grad_tol / (smallest nonzero Hessian eigenvalue ~ 1e-2)
        assert torch.allclose(w[0], theta[k[0]].reshape(2, 2)[0], atol=1e-6)  # unit 1 fixed
        assert abs(float(a[1])) < 1e-6  # a_2 = 0 all along
    moved = [float((d["theta"] - theta).norm()) for _, d in cs.graph.nodes(data=True)]
    assert max(moved) > 0.4


def _odd_space(m: int = 2):
    g = torch.Generator().manual_seed(2)
    xh = torch.randn(4, m, generator=g)
    yh = torch.randn(4, 1, generator=g)
    x, y = torch.cat([xh, -xh]), torch.cat([yh, yh])  # symmetric inputs, even targets
    return sr.ParameterSpace(OddPlusBias(m), x, y), float(y.mean())


def test_dead_unit_non_global_critical_set():
    space, ybar = _odd_space(m=2)
    theta = _t(0.7, -0.4, 0.0, ybar)  # (w, a, c)
    rep = classify_equilibrium(space, theta)
    assert rep.kind == "non-global minimum"
    assert rep.dimension == 2 and rep.index == 0
    assert rep.rank == 2 and rep.rank_deficit == 2  # min(QN, K) = min(8, 4)
    assert rep.perp_grad_norm > 0.5 and rep.range_grad_norm < 1e-12
    cs = track_critical_set(space, theta, n_points=15, step=0.2)
    assert cs.dimension == 2 and cs.n_components == 1
    _assert_on_set(cs)
    for _, d in cs.graph.nodes(data=True):
        assert abs(float(d["theta"][2])) < 1e-10 and float(d["theta"][3]) == pytest.approx(ybar)


# -- x = F(B theta) -----------------------------------------------------------------
def _through_b(representable: bool):
    g = torch.Generator().manual_seed(0)
    k, r = 8, 3
    b = torch.randn(r, k, generator=g, dtype=F64)
    x = torch.linspace(-2, 2, 8, dtype=F64).unsqueeze(1)
    u_true = torch.tensor([1.2, 0.8, 0.3], dtype=F64)
    y = u_true[0] * torch.tanh(u_true[1] * x + u_true[2])
    if not representable:
        y = y + 0.2 * torch.cos(3 * x)
    # independent fit in u-space (Gauss-Newton on 3 parameters), then theta = B^+ u
    from scipy.optimize import least_squares

    xs, ys = x.numpy().ravel(), y.numpy().ravel()
    fit = least_squares(
        lambda u: u[0] * np.tanh(u[1] * xs + u[2]) - ys, u_true.numpy() + 0.05, xtol=1e-15,
        ftol=1e-15, gtol=1e-15,
    )
    u_star = torch.tensor(fit.x, dtype=F64)
    theta = torch.linalg.pinv(b) @ u_star + _kernel_vec(b, 0.3)
    return sr.ParameterSpace(ThroughB(b), x, y), theta, b


def _kernel_vec(b: torch.Tensor, scale: float) -> torch.Tensor:
    _, _, vh = torch.linalg.svd(b)
    return scale * vh[-1]  # a unit vector of ker B


@pytest.mark.parametrize("representable", [True, False])
def test_through_b_kernel_dimension(representable):
    space, theta, b = _through_b(representable)
    theta, _ = refine_critical_point(space, theta)
    rep = classify_equilibrium(space, theta)
    k, r = b.shape[1], b.shape[0]
    assert rep.dimension == k - r and rep.dimension_reliable
    assert rep.is_global_minimum == representable
    assert rep.kind == ("global minimum" if representable else "non-global minimum")
    # the Hessian kernel is ker B
    kb = rep.kernel_basis
    assert torch.allclose(b @ kb, torch.zeros(r, k - r, dtype=F64), atol=1e-8)
    if not representable:
        cs = track_critical_set(space, theta, n_points=10, step=0.3)
        assert cs.dimension == k - r
        _assert_on_set(cs)
        u0 = b @ theta
        for _, d in cs.graph.nodes(data=True):  # moving along ker B: B theta is constant
            assert torch.allclose(b @ d["theta"], u0, atol=1e-8)


def test_lanczos_matches_dense():
    g = torch.Generator().manual_seed(0)
    k, r, n = 40, 36, 50
    b = torch.randn(r, k, generator=g, dtype=F64) / math.sqrt(k)
    x = torch.randn(n, r, generator=g, dtype=F64) / math.sqrt(r)
    theta = torch.randn(k, generator=g, dtype=F64)
    y = torch.tanh(x @ (b @ theta)).unsqueeze(1)
    space = sr.ParameterSpace(TanhThroughB(b), x, y)
    dense = classify_equilibrium(space, theta, hessian="dense")
    lanczos = classify_equilibrium(space, theta, hessian="lanczos", n_eigs=10)
    assert dense.dimension == lanczos.dimension == k - r
    assert lanczos.hessian_method == "lanczos" and not lanczos.dimension_lower_bound
    # The gap a_{k+1} / max(a_k, eps A) divides by the largest kernel eigenvalue, which is
    # zero in exact arithmetic: its computed value is round-off (it differs between BLAS
    # paths), so only bounds are asserted.  Both solvers give kernel eigenvalues of
    # backward-error size, at most about K eps A (A = largest |eigenvalue|), so both gaps
    # are at least a_{k+1} / (K eps A), and a_{k+1}, the smallest non-zero |eigenvalue|,
    # agrees: ARPACK's tolerance 1e-10 bounds its Ritz-value error by 1e-10 A.
    a_dense = dense.hessian_eigenvalues.abs().sort().values
    a_lz = lanczos.hessian_eigenvalues.abs().sort().values
    scale = float(a_dense[-1])
    assert float(a_lz[k - r]) == pytest.approx(float(a_dense[k - r]), abs=1e-10 * scale)
    bound = float(a_dense[k - r]) / (k * EPS64 * scale)
    assert bound > 1e3 * dense.tolerances["min_gap"]  # a clear gap, not a marginal one
    assert dense.dimension_gap >= bound and lanczos.dimension_gap >= bound
    assert dense.dimension_reliable and lanczos.dimension_reliable
    assert lanczos.hessian_eigenvalues.numel() < k
    assert any("computed part" in note for note in lanczos.notes)
    assert lanczos.kernel_basis.shape == (k, k - r)
    # the kernel found by deflated Lanczos is the kernel found densely
    proj = dense.kernel_basis @ (dense.kernel_basis.T @ lanczos.kernel_basis)
    assert torch.allclose(proj, lanczos.kernel_basis, atol=1e-6)
    # too few Lanczos rounds for the kernel: a lower bound, said so
    low = classify_equilibrium(space, theta, hessian="lanczos", n_eigs=10, max_rounds=1)
    assert low.dimension_lower_bound and 1 <= low.dimension <= k - r
    assert not low.dimension_reliable and any("at least" in note for note in low.notes)


# -- a set that ends at rank changes ------------------------------------------------
def test_tracking_stops_at_rank_changes():
    xh = torch.tensor([[0.5], [1.0], [1.5]])
    x = torch.cat([xh, -xh])
    y = torch.cat([xh**2, xh**2])
    space = sr.ParameterSpace(SinGate(), x, y)
    theta = _t(0.5, 0.0, float(y.mean()))
    rep = classify_equilibrium(space, theta)
    assert rep.dimension == 1 and rep.rank == 2
    cs = track_critical_set(space, theta, n_points=60, step=0.1)
    assert cs.status != "n_points reached"
    assert cs.graph.number_of_nodes() < 60
    assert "rank changed" in cs.status
    assert {t["code"] for t in cs.terminations} == {"rank_change"}
    ws = [float(d["theta"][0]) for _, d in cs.graph.nodes(data=True)]
    assert 0.0 < min(ws) < 0.1 and 0.9 < max(ws) < 1.0  # up to, never across, w = 0 and w = 1
    _assert_on_set(cs)


# -- plots and input validation -----------------------------------------------------
def test_plot_critical_set(line_space, tmp_path):
    import matplotlib.pyplot as plt

    a = math.sqrt(C_STAR)
    cs = track_critical_set(line_space, torch.stack([_t(a, C_STAR / a), _t(-a, -C_STAR / a)]),
                            n_points=8, step=0.2)
    ax = plot_critical_set(cs)
    assert "2 component(s)" in ax.get_title()
    ax.figure.savefig(tmp_path / "cs.png")
    plt.close(ax.figure)
    assert (tmp_path / "cs.png").stat().st_size > 1000
    with pytest.raises(TypeError, match="CriticalSet"):
        plot_critical_set("nope")


def test_bad_input(line_space):
    theta = _t(1.0, 0.1)
    with pytest.raises(TypeError, match="ParameterSpace"):
        classify_equilibrium("space", theta)
    with pytest.raises(ValueError, match="shape"):
        classify_equilibrium(line_space, torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="hessian"):
        classify_equilibrium(line_space, theta, hessian="exact")
    with pytest.raises(ValueError, match="lanczos"):
        classify_equilibrium(line_space, theta, hessian="lanczos")  # K = 2
    with pytest.raises(ValueError, match="tol"):
        classify_equilibrium(line_space, theta, tol=-1.0)
    with pytest.raises(TypeError, match="n_points"):
        track_critical_set(line_space, theta, n_points=2.5)
    with pytest.raises(ValueError, match="step"):
        track_critical_set(line_space, theta, step=0.0)
    with pytest.raises(TypeError, match="theta_star"):
        track_critical_set(line_space, "theta")
    with pytest.raises(ValueError, match="no points"):
        track_critical_set(line_space, [])


# -- the tracker, one step at a time ---------------------------------------------------
def test_tracker_steps_along_the_hyperbola(line_space):
    """CriticalSetTracker: start() puts the corrected seed on ab = c*, every step() adds
    nodes on it within a predictor step of an existing node, and result() summarizes
    the same walk as track_critical_set."""
    from subriemann.analysis.critical import CriticalSetTracker, TrackingOptions

    a = math.sqrt(C_STAR)
    start = _t(1.1 * a, 0.95 * C_STAR / a)  # near the set, not on it
    tracker = CriticalSetTracker(line_space, start, TrackingOptions(n_points=7, step=0.2))
    tracker.start()
    assert tracker.graph.number_of_nodes() == 1 and list(tracker.frontier) == [0]
    sizes = [1]
    while tracker.step():
        sizes.append(tracker.graph.number_of_nodes())
    sizes.append(tracker.graph.number_of_nodes())
    assert sizes == sorted(sizes) and sizes[-1] == 7  # one node expanded per step
    # every node on the hyperbola: |F| <= grad_tol moves a node by at most grad_tol / h_min
    # normal to the set (h_min ~ |X|^2 (a^2 + b^2) >= 2 |X|^2 c*), far below 1e-8
    th = torch.stack([d["theta"] for _, d in tracker.graph.nodes(data=True)])
    assert torch.allclose(th[:, 0] * th[:, 1], torch.full((7,), C_STAR, dtype=F64), atol=1e-8)
    for u, v in tracker.graph.edges:  # continuation steps are at most one predictor step long
        assert float((th[u] - th[v]).norm()) <= 0.2 * (1 + 0.5) + 1e-12
    cs = tracker.result()
    again = track_critical_set(line_space, start, n_points=7, step=0.2)
    assert cs.status == again.status == "n_points reached"
    assert cs.dimension == again.dimension == 1
    assert torch.allclose(cs.thetas, again.thetas, rtol=0, atol=1e-12)
    _assert_on_set(cs)
    with pytest.raises(TypeError, match="TrackingOptions"):
        CriticalSetTracker(line_space, start, {"n_points": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma_drop"):
        TrackingOptions(sigma_drop=1.5)
