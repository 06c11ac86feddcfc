"""Gradient flows (issue 4): integrators, rank events, stops and failures.

Every check compares :func:`subriemann.gradient_flow` with something computed
independently of the library:

* closed forms of [CM24] (the linear model :math:`x(s) = y + \\exp(-s\\mathcal K_\\lambda)(x_0-y)`,
  exact solutions of constructed one- and two-parameter models);
* :func:`scipy.integrate.solve_ivp` (DOP853, rtol 1e-12) on a dense numpy
  re-implementation of a one-hidden-layer tanh MLP, its Jacobian and
  :math:`V_\\lambda` (thin SVD);
* forward passes of :mod:`tests.references` (the torch model called directly).

Tolerances: at ``rtol=1e-10`` dopri5's global error on these O(1) problems is
about 1e-9, so trajectories are compared to 1e-8 (an order of margin);
event times are located to ``event_tol = 1e-9`` in s on a path whose own error
is ~1e-9, hence 1e-7.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from hypothesis import given, settings
from torch import nn

import subriemann as sr
from subriemann.flow import events as events_module
from subriemann.metrics import EuclideanMetric, InterpolatedMetric, OutputPullbackMetric
from tests.cases import (
    SquareAndLine,
    dead_units_space,
    flow_problem,
    mlp_problems,
    one_sample_space,
    run_event_flow,
)
from tests.references import flat_params, mse_by_hand, reference_outputs

CLOSE = dict(rtol=1e-10, atol=1e-12)  # global error ~1e-9 on these O(1) problems


# -- models with known flows ---------------------------------------------------------
class HalfSquare(nn.Module):
    r"""One parameter, one output: :math:`x = \tfrac12\theta^2` (so :math:`\sigma = |\theta|`).

    With :math:`y = 0` and :math:`\theta(0) = 1`: at :math:`\lambda = 0`,
    :math:`\partial_s\theta^2 = -\theta^4`, :math:`\theta^2 = 1/(1+s)`; at
    :math:`\lambda = 1`, :math:`\theta' = -x/\theta = -\theta/2`,
    :math:`\theta = e^{-s/2}`.  With ``nan_below`` the model returns NaN once
    :math:`\theta` falls below it.
    """

    def __init__(self, nan_below: float | None = None) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.ones(1, dtype=torch.float64))
        self.nan_below = nan_below

    def forward(self, x):
        out = 0.5 * self.theta**2 * x
        if self.nan_below is not None and float(self.theta.detach()) < self.nan_below:
            out = out * float("nan")
        return out


class Dip(nn.Module):
    r"""Two outputs :math:`x = (a, c(a)\,b)`, :math:`c(a) = (a - 1/2)^2 + m`.

    With :math:`y = 0`, :math:`b(0) = 0` stays 0 and :math:`a = e^{-s}` for every
    :math:`\lambda` (:math:`D = \mathrm{diag}(1, c(a))` at :math:`b = 0`), so
    :math:`\sigma_2 = c(e^{-s})` dips to :math:`m` at :math:`s = \ln 2` and comes
    back: with :math:`\tau` slightly above :math:`m` the rank goes 2 → 1 → 2 at
    :math:`s = -\ln(1/2 \pm \sqrt{\tau - m})`.
    """

    def __init__(self, m: float = 0.2) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(1, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.m = m

    def forward(self, x):
        c = (self.a - 0.5) ** 2 + self.m
        return torch.stack([self.a, c * self.b], dim=1) * x


# -- a dense numpy re-implementation of a one-hidden-layer tanh MLP ------------------------
class NumpyMLP:
    """``Linear(M, H) → tanh → Linear(H, Q)``; parameters in torch's order (W1, b1, W2, b2)."""

    def __init__(self, m: int, hdim: int, q: int, inputs: np.ndarray, y: np.ndarray) -> None:
        self.m, self.h, self.q, self.X, self.y = m, hdim, q, inputs, y

    def split(self, th):
        m, h, q = self.m, self.h, self.q
        i = 0
        w1 = th[i:i + h * m].reshape(h, m)
        i += h * m
        b1 = th[i:i + h]
        i += h
        w2 = th[i:i + q * h].reshape(q, h)
        i += q * h
        return w1, b1, w2, th[i:i + q]

    def outputs(self, th):
        w1, b1, w2, b2 = self.split(th)
        return (np.tanh(self.X @ w1.T + b1) @ w2.T + b2).reshape(-1)

    def jacobian(self, th):
        w1, b1, w2, b2 = self.split(th)
        n, m, h, q = self.X.shape[0], self.m, self.h, self.q
        hid = np.tanh(self.X @ w1.T + b1)  # [N, H]
        dact = 1 - hid**2
        jac = np.zeros((n, q, th.size))
        for j in range(n):
            for o in range(q):
                g = w2[o] * dact[j]  # d out / d pre-activation, [H]
                jac[j, o, : h * m] = np.outer(g, self.X[j]).reshape(-1)
                jac[j, o, h * m : h * m + h] = g
                jac[j, o, h * m + h + o * h : h * m + h + (o + 1) * h] = hid[j]
                jac[j, o, h * m + h + q * h + o] = 1.0
        return jac.reshape(n * q, th.size)

    def field(self, lam: float):
        def f(_s, th):
            d = self.jacobian(th)
            r = self.outputs(th) - self.y
            u, sig, vt = np.linalg.svd(d, full_matrices=False)
            w = sig / ((1 - lam) + lam * sig**2)
            return -vt.T @ (w * (u.T @ r))

        return f


def numpy_reference(space, p, lam: float, s_eval):
    w = p.spec.widths
    ref = NumpyMLP(w[0], w[1], w[2], p.inputs.double().numpy(), space.y.numpy())
    sol = scipy.integrate.solve_ivp(
        ref.field(lam), (0.0, float(s_eval[-1])), flat_params(p.model).numpy(),
        method="DOP853", t_eval=s_eval, rtol=1e-12, atol=1e-14,
    )
    assert sol.success
    return sol.y.T, ref


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_flow_matches_solve_ivp_on_numpy_mlp(lam):
    # K = 3*5+5+5*2+2 = 32 > QN = 8, full rank: no rank events.
    space, p = flow_problem((3, 5, 2), 4, seed=3, metric=InterpolatedMetric, lam=lam)
    s_eval = np.linspace(0.0, 0.6, 4)
    traj = sr.gradient_flow(space, space.initial_point(), 0.6, save_at=s_eval, **CLOSE)
    assert traj.status.code == "s_end_reached"
    np.testing.assert_array_equal(traj.s.numpy(), s_eval)
    th_ref, ref = numpy_reference(space, p, lam, s_eval)
    # dopri5 at rtol 1e-10 (global error ~1e-9), DOP853 at 1e-12
    np.testing.assert_allclose(traj.theta.numpy(), th_ref, atol=1e-8, rtol=0)
    x_ref = np.stack([ref.outputs(t) for t in th_ref])
    np.testing.assert_allclose(traj.outputs.numpy(), x_ref, atol=1e-8, rtol=0)
    sv_ref = np.stack([np.linalg.svd(ref.jacobian(t), compute_uv=False) for t in th_ref])
    np.testing.assert_allclose(traj.singular_values.numpy(), sv_ref, atol=1e-8, rtol=0)


# -- docs/theory.md §8 item 8: C is non-increasing along every flow of the family
@settings(max_examples=3, deadline=None)
@given(problem=mlp_problems(max_depth=2, max_width=4, max_samples=4, max_outputs=2))
def test_cost_non_increasing(problem):
    space = problem.space()
    theta0 = space.initial_point()
    for metric, kw in ((EuclideanMetric, {}), (InterpolatedMetric, {"lam": 0.5}),
                       (OutputPullbackMetric, {})):
        space.equip_with_metric(metric, **kw)
        traj = sr.gradient_flow(space, theta0, 0.5, rtol=1e-7, atol=1e-10, min_saves=10)
        assert len(traj) >= 2, traj.status
        c = traj.cost.numpy()
        # dC/ds <= 0 exactly; the saved costs carry round-off ~1e-15 C(0)
        assert np.all(np.diff(c) <= 1e-12 * c[0] + 1e-300), (metric.__name__, np.diff(c).max())
        # the saved cost is the cost of the saved theta (independent forward pass)
        for i in (0, len(traj) // 2, len(traj) - 1):
            x = reference_outputs(problem.model, problem.inputs, traj.theta[i])
            assert abs(float(mse_by_hand(x, space.y)) - c[i]) <= 1e-12 * max(1.0, c[0])


# -- docs/theory.md §8 item 5: a fixed linear model flows by exp(-s K_lambda)
def linear_closed_form(x_in: np.ndarray, q: int, x0, y, lam: float, s_eval) -> np.ndarray:
    """``nn.Linear(M, Q)``: D[(j,o), (o',m)] = δ X_jm, D[(j,o), b_o'] = δ; K_λ by pinv, expm."""
    n, m = x_in.shape
    d = np.zeros((n * q, q * m + q))
    for j in range(n):
        for o in range(q):
            d[j * q + o, o * m : (o + 1) * m] = x_in[j]
            d[j * q + o, q * m + o] = 1.0
    ntk = d @ d.T
    kern = ntk @ np.linalg.pinv((1 - lam) * np.eye(n * q) + lam * ntk, rcond=1e-10)
    return np.stack([y + scipy.linalg.expm(-s * kern) @ (x0 - y) for s in s_eval])


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n", [3, 6], ids=["full-rank", "rank-deficient"])
def test_linear_model_closed_form(lam, n):
    # Linear(3, 2): K = 8; N = 3 gives rank QN = 6, N = 6 gives rank 8 < QN = 12 (P constant).
    gen = torch.Generator().manual_seed(n)
    model = nn.Linear(3, 2)
    x_in = 0.5 * torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    space = sr.ParameterSpace(model, x_in, y)
    space.equip_with_metric(InterpolatedMetric, lam=lam)
    s_eval = [0.0, 0.5, 1.0, 2.0]
    traj = sr.gradient_flow(space, space.initial_point(), 2.0, save_at=s_eval, **CLOSE)
    assert traj.status.code == "s_end_reached"
    ref = linear_closed_form(x_in.numpy(), 2, traj.outputs[0].numpy(), space.y.numpy(), lam,
                             s_eval)
    np.testing.assert_allclose(traj.outputs.numpy(), ref, atol=1e-9, rtol=0)


# -- Euler = discrete damped Gauss-Newton / LM; RK4 order ---------------------------------------
def test_euler_step_is_damped_gauss_newton_on_linear_model():
    # theory §3: full rank QN (N = 3 <= M + 1), lambda = 1: x_{n+1} - y = (1 - eta)(x_n - y).
    gen = torch.Generator().manual_seed(1)
    space = sr.ParameterSpace(nn.Linear(3, 2), torch.randn(3, 3, generator=gen),
                              torch.randn(3, 2, generator=gen))
    space.equip_with_metric(OutputPullbackMetric)
    eta = 0.1
    traj = sr.gradient_flow(space, space.initial_point(), 1.0, method="euler", step_size=eta,
                            min_saves=2)
    assert traj.counters["n_steps"] == 10 and len(traj) == 11
    r = traj.outputs - space.y
    ratio = r[1:] / r[:-1]
    np.testing.assert_allclose(ratio.numpy(), 1 - eta, rtol=1e-12)


def test_euler_step_is_levenberg_marquardt():
    # lambda = 1/2: theta_{n+1} = theta_n - (eta/lam)(eps 1 + D^T D)^{-1} D^T (x - y), eps = 1.
    space, p = flow_problem((2, 4, 1), 3, seed=5, metric=InterpolatedMetric, lam=0.5)
    traj = sr.gradient_flow(space, space.initial_point(), 0.3, method="euler", step_size=0.1,
                            min_saves=2)
    ref = NumpyMLP(2, 4, 1, p.inputs.double().numpy(), space.y.numpy())
    th = flat_params(p.model).numpy()
    for i in range(3):
        d = ref.jacobian(th)
        step = np.linalg.solve(np.eye(th.size) + d.T @ d, d.T @ (ref.outputs(th) - ref.y))
        th = th - (0.1 / 0.5) * step
        np.testing.assert_allclose(traj.theta[i + 1].numpy(), th, atol=1e-12, rtol=0)


def test_rk4_is_fourth_order():
    space, p = flow_problem((2, 6, 1), 4, seed=2, metric=InterpolatedMetric, lam=0.5)
    theta0 = space.initial_point()
    exact = numpy_reference(space, p, 0.5, [0.0, 1.0])[0][-1]  # solve_ivp, rtol 1e-12
    errors = []
    for h in (0.25, 0.125, 0.0625):
        traj = sr.gradient_flow(space, theta0, 1.0, method="rk4", step_size=h)
        assert traj.counters["nfev"] == 4 * round(1.0 / h) + 1 and len(traj) == round(1 / h) + 1
        errors.append(float(np.linalg.norm(traj.theta[-1].numpy() - exact)))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    # a clean fourth order (the errors, ~1e-4 .. 1e-6, sit far above the reference's 1e-11)
    assert np.all((orders > 3.6) & (orders < 4.4)), (errors, orders)


# -- rank events at analytically known times --------------------------------------------------
@pytest.mark.parametrize(
    "lam, s_star, final",
    [(0.0, 3.0, "s_end_reached"), (1.0, 2 * math.log(2), "equilibrium_reached")],
)
def test_rank_drop_one_to_zero(lam, s_star, final):
    space = one_sample_space(HalfSquare(), 0.0, InterpolatedMetric, lam=lam, rank_atol=0.5)
    traj = sr.gradient_flow(space, space.initial_point(), 5.0, rtol=1e-10, atol=1e-12)
    assert traj.status.code == final, traj.status
    assert len(traj.events) == 1
    ev = traj.events[0]
    # event_tol 1e-9 on a path integrated to ~1e-10
    assert abs(ev.s - s_star) < 1e-7
    assert (ev.rank_before, ev.rank_after, ev.index, ev.tau) == (1, 0, 0, 0.5)
    assert float(ev.singular_values_before[0]) > 0.5 >= float(ev.singular_values_after[0])
    assert 0 < ev.s_bracket <= 1e-9
    assert abs(float(ev.theta[0]) - 0.5) < 1e-7  # sigma = |theta| = tau at the crossing
    assert ev.t == pytest.approx(1 - math.exp(-ev.s), abs=1e-15)
    # the rank recorded at the saved points flips at the event
    before, after = traj.s < ev.s, traj.s > ev.s
    assert bool((traj.rank[before] == 1).all()) and bool((traj.rank[after] == 0).all())
    if lam == 1.0:  # D^+ vanishes on the rank-0 stratum: the flow stops at the crossing
        assert float(traj.theta[-1][0]) == pytest.approx(0.5, abs=1e-7)
    else:  # theta^2 = 1/(1+s) carries on through the event
        assert float(traj.theta[-1][0]) ** 2 == pytest.approx(1 / 6, abs=1e-8)


@pytest.mark.parametrize("lam, s_star", [(0.0, 3.0), (1.0, 2 * math.log(2))])
def test_two_output_rank_two_to_one(lam, s_star):
    space = one_sample_space(SquareAndLine(), [1.0, 0.0], InterpolatedMetric, lam=lam,
                             rank_atol=0.5)
    traj = sr.gradient_flow(space, space.initial_point(), 20.0, rtol=1e-10, atol=1e-12,
                            stall_tol=1e-6)
    assert [(e.rank_before, e.rank_after, e.index) for e in traj.events] == [(2, 1, 1)]
    assert abs(traj.events[0].s - s_star) < 1e-7
    if lam == 1.0:
        # docs/theory.md §5: the rank-1 flow ends at P(x - y) = 0 with C = (1/8)^2 / 2 > 0
        assert traj.status.code == "equilibrium_reached"
        a, b = traj.theta[-1].tolist()
        # stopped at |V| = |1 - a| <= 1e-6 |V(0)|
        assert a == pytest.approx(1.0, abs=2e-6) and b == pytest.approx(0.5, abs=1e-7)
        assert traj.final_cost == pytest.approx(0.5 / 64, rel=1e-6)
        assert int(traj.rank[-1]) == 1
    else:  # the Euclidean flow goes on to the global minimum, slowly: b^2 = 1/(1+s)
        assert traj.status.code == "s_end_reached"
        assert float(traj.theta[-1][1]) ** 2 == pytest.approx(1 / 21, rel=1e-7)


def test_stop_on_rank_change():
    space = one_sample_space(SquareAndLine(), [1.0, 0.0], OutputPullbackMetric, rank_atol=0.5)
    traj = sr.gradient_flow(space, space.initial_point(), 5.0, stop_on_rank_change=True,
                            rtol=1e-10, atol=1e-12)
    assert traj.status.code == "rank_change"
    assert len(traj.events) == 1
    ev = traj.events[0]
    # theta of the event is the far end of the final bracket, s + bracket / 2
    assert float(traj.s[-1]) == ev.s + 0.5 * ev.s_bracket and ev.s_bracket <= 1e-9
    assert torch.equal(traj.theta[-1], ev.theta)
    assert int(traj.rank[-1]) == 1 and int(traj.rank[-2]) == 2
    assert ev.s == pytest.approx(2 * math.log(2), abs=1e-7)


def test_without_rank_monitor_singular_values_are_computed_at_saved_points():
    space = one_sample_space(SquareAndLine(), [1.0, 0.0], EuclideanMetric, rank_atol=0.5)
    traj = sr.gradient_flow(space, space.initial_point(), 4.0, monitor_rank=False,
                            save_at=[1.0, 2.0, 4.0])
    assert traj.events == []
    # D = diag(1, b) with b^2 = 1/(1+s): sigma = (1, 1/sqrt(1+s)), rank 2 -> 1 after s = 3
    expected = torch.stack([torch.ones(4), 1 / torch.sqrt(1 + traj.s)], dim=1).double()
    torch.testing.assert_close(traj.singular_values, expected, atol=1e-7, rtol=0)
    assert traj.rank.tolist() == [2, 2, 2, 1]


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_steps_are_capped_so_a_dip_below_tau_is_seen(lam, monkeypatch):
    # sigma_2 dips 0.1% below tau for Delta s = 0.057, less than the natural step (~0.1)
    m, depth = 0.2, 1e-3
    tau = m / (1 - depth)
    half = math.sqrt(tau - m)
    expected = [-math.log(0.5 + half), -math.log(0.5 - half)]
    space = one_sample_space(Dip(m), [0.0, 0.0], InterpolatedMetric, lam=lam, rank_atol=tau)

    def run():
        return sr.gradient_flow(space, space.initial_point(), 3.0, rtol=1e-8, atol=1e-12,
                                min_saves=2)

    traj = run()
    assert [(e.rank_before, e.rank_after) for e in traj.events] == [(2, 1), (1, 2)]
    for ev, s in zip(traj.events, expected):
        assert abs(ev.s - s) < 1e-7
    # control: the same flow without the cap steps over the dip and sees no event
    monkeypatch.setattr(events_module, "cap_near_tau", lambda fl, h, st: h)
    assert run().events == []


class Slide(nn.Module):
    r""":math:`x = (a, b^3/3 + ab)`, :math:`D = [[1, 0], [b, b^2 + a]]`: singular at b^2 = -a.

    From :math:`(a, b) = (-1/2, 1)` towards :math:`y = (1, -1)` the adapted flow
    drives :math:`b^2 + a` (about :math:`\sigma_2`) down with speed
    :math:`\sim 1/\sigma_2`, while the rank-1 field (:math:`a' = 1 - a`,
    :math:`b' \approx 0`) drives it back up: both sides of :math:`\sigma_2 = \tau`
    point at the boundary, and the flow slides along it (a Filippov sliding mode).
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([-0.5], dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))

    def forward(self, x):
        return torch.stack([self.a, self.b**3 / 3 + self.a * self.b], dim=1) * x


def test_sliding_on_a_rank_boundary_reports_chattering():
    # the hard threshold (rank_band=0): the last resort of the continuation
    space = one_sample_space(Slide(), [1.0, -1.0], OutputPullbackMetric, rank_rtol=1e-4)
    traj = sr.gradient_flow(space, space.initial_point(), 2.0, min_saves=2, rank_band=0.0)
    assert traj.status.code == "rank_chattering", traj.status
    assert not traj.status.successful
    ranks = [(e.rank_before, e.rank_after) for e in traj.events]
    assert ranks[-4:] in ([(2, 1), (1, 2)] * 2, [(1, 2), (2, 1)] * 2)
    assert traj.events[-1].s - traj.events[-4].s < 1e-3
    # it stopped on the boundary: sigma_2 of D (by hand) is at tau
    a, b = traj.theta[-1].tolist()
    sig = np.linalg.svd(np.array([[1.0, 0.0], [b, b * b + a]]), compute_uv=False)
    assert abs(sig[1] - traj.rank_tau) < 0.5 * traj.rank_tau
    assert bool(torch.isfinite(traj.theta).all())
    assert "tried: hard threshold" in traj.status.message


# -- failures and stops -------------------------------------------------------------------
def _fixed_step_reference(method: str, h: float, nan_below: float) -> list[float]:
    """The Euler / RK4 iterates of theta' = -theta^3/2 (lambda = 0) up to the step that
    would evaluate the model below ``nan_below``."""
    f = lambda th: -0.5 * th**3  # noqa: E731
    out = [1.0]
    while True:
        th = out[-1]
        if method == "euler":
            stages, new = [th], th + h * f(th)
        else:
            k1 = f(th)
            y2 = th + 0.5 * h * k1
            k2 = f(y2)
            y3 = th + 0.5 * h * k2
            k3 = f(y3)
            y4 = th + h * k3
            k4 = f(y4)
            stages, new = [y2, y3, y4], th + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if min(stages + [new]) < nan_below:
            return out
        out.append(new)


@pytest.mark.parametrize("method", ["dopri5", "rk4", "euler"])
def test_nan_stops_with_last_good_state(method):
    # lambda = 0: theta^2 = 1/(1+s); the model is NaN once theta < 0.6, i.e. s > 1/0.36 - 1
    s_nan = 1 / 0.36 - 1
    space = one_sample_space(HalfSquare(nan_below=0.6), 0.0, EuclideanMetric)
    h = 0.01
    traj = sr.gradient_flow(space, space.initial_point(), 4.0, method=method,
                            **({"step_size": h} if method != "dopri5" else {}))
    assert traj.status.code == "nonfinite", traj.status
    assert "nan" in traj.status.message.lower()
    assert bool(torch.isfinite(traj.theta).all()) and bool(torch.isfinite(traj.cost).all())
    assert float(traj.theta[-1][0]) >= 0.6
    s_last = float(traj.s[-1])
    if method == "dopri5":
        # the step shrinks (x 1/4 per failure) up to the edge; the path is exact to ~1e-9
        assert -1e-7 < s_nan - s_last < 1e-6
        assert float(traj.theta[-1][0]) ** 2 == pytest.approx(1 / (1 + s_last), rel=1e-8)
    else:
        # the fixed-step iterates, by hand, up to the last step whose stages stay finite
        ref = _fixed_step_reference(method, h, 0.6)
        assert len(traj) == len(ref) and s_last == pytest.approx(h * (len(ref) - 1), abs=1e-12)
        np.testing.assert_allclose(traj.theta[:, 0].numpy(), ref, rtol=1e-13)


def test_nan_from_the_metric_keeps_the_trajectory(monkeypatch):
    space, _ = flow_problem((2, 4, 1), 3, seed=1)
    metric = space.metric
    calls = {"n": 0}
    original = metric.gradient

    def gradient(theta):
        calls["n"] += 1
        v = original(theta)
        return v * float("nan") if calls["n"] > 40 else v

    monkeypatch.setattr(metric, "gradient", gradient)
    traj = sr.gradient_flow(space, space.initial_point(), 5.0)
    assert traj.status.code == "nonfinite"
    assert 1 < len(traj) and float(traj.s[-1]) < 5.0
    assert bool(torch.isfinite(traj.theta).all())
    assert traj.counters["nfev"] > 40


def test_nonfinite_initial_point_raises():
    space, _ = flow_problem((2, 4, 1), 3)
    theta = space.initial_point()
    theta[0] = float("nan")
    with pytest.raises(ValueError, match="cannot start"):
        sr.gradient_flow(space, theta, 1.0)


def test_cost_tol_stall_and_budgets():
    space, _ = flow_problem((2, 6, 1), 3, seed=4)
    theta0 = space.initial_point()
    c0 = float(space.cost(theta0))

    traj = sr.gradient_flow(space, theta0, 20.0, cost_tol=1e-6 * c0, rtol=1e-6)
    assert traj.status.code == "cost_tol_reached"
    assert traj.cost[-1] <= 1e-6 * c0 < traj.cost[-2]

    # |V| = e^{-s}|V(0)|-ish at lambda = 1: stall_tol 1e-4 stops near s = log(1e4)
    traj = sr.gradient_flow(space, theta0, 50.0, stall_tol=1e-4, rtol=1e-6, min_saves=2)
    assert traj.status.code == "equilibrium_reached"
    assert traj.grad_norm[-1] <= 1e-4 * traj.grad_norm[0] < traj.grad_norm[-2]
    assert 5.0 < float(traj.s[-1]) < 15.0

    traj = sr.gradient_flow(space, theta0, 5.0, max_steps=7)
    assert traj.status.code == "max_steps_reached" and traj.counters["n_steps"] == 7
    assert float(traj.s[-1]) < 5.0

    traj = sr.gradient_flow(space, theta0, 5.0, max_time=0.0)
    assert traj.status.code == "max_time_reached" and len(traj) == 1

    traj = sr.gradient_flow(space, theta0, 5.0, cost_tol=2 * c0)
    assert traj.status.code == "cost_tol_reached" and len(traj) == 1


def test_max_time_stops_inside_a_step(monkeypatch):
    """A budget that runs out between two stages ends the flow there: the step is dropped
    and the trajectory ends at the last accepted state.  The clock is simulated: each
    evaluation of the metric's gradient takes 1 s of it, so a dopri5 step takes 6."""
    from subriemann.flow import engine

    clock = {"t": 0.0}
    monkeypatch.setattr(engine, "time", type("Clock", (), {
        "perf_counter": staticmethod(lambda: clock["t"])}))
    space, _ = flow_problem((2, 6, 1), 3, seed=4, metric=EuclideanMetric)
    theta0 = space.initial_point()
    real = EuclideanMetric.gradient

    def slow(self, base_point):
        clock["t"] += 1.0
        return real(self, base_point)

    monkeypatch.setattr(EuclideanMetric, "gradient", slow)
    traj = sr.gradient_flow(space, theta0, 5.0, max_time=8.5)
    assert traj.status.code == "max_time_reached" and "inside the step" in traj.status.message
    # 1 (theta0) + 6 (the first step, accepted at t = 7) + 2 (the next step's stages that
    # began before t = 8.5): the third stage of the second step is never evaluated
    assert traj.counters["nfev"] == 9 and traj.counters["n_steps"] == 1
    assert float(traj.s[-1]) > 0.0

    traj = sr.gradient_flow(space, theta0, 1.0)
    assert traj.status.code == "s_end_reached" and traj.status.successful
    assert float(traj.s[-1]) == 1.0


def test_monitor_time_counts_spectra_and_event_location(monkeypatch):
    """``counters["monitor_time"]`` is the time of the spectra and of the sub-steps that
    locate events, nothing else.  The clock is simulated: a vector field costs 1 s of it,
    a spectrum 100 s, so every second of it is attributed by construction."""
    from subriemann.flow import engine

    clock = {"t": 0.0, "sv": 0}
    monkeypatch.setattr(engine, "time", type("Clock", (), {
        "perf_counter": staticmethod(lambda: clock["t"])}))
    real = engine.Flow.compute

    def timed(self, kind, payload):
        if kind == "sv":
            clock["t"] += 100.0
            clock["sv"] += 1
        elif kind == "field":
            clock["t"] += 1.0
        return real(self, kind, payload)

    monkeypatch.setattr(engine.Flow, "compute", timed)
    traj = run_event_flow()
    c = traj.counters
    assert len(traj.events) == 1 and c["n_spectra"] == clock["sv"]
    assert c["wall_time"] == 100.0 * clock["sv"] + c["nfev"]
    located = c["monitor_time"] - 100.0 * c["n_spectra"]  # fields evaluated by the location
    assert located == int(located) and located >= 5  # at least one dopri5 sub-step
    assert c["nfev"] - located >= 5 * c["n_steps"]  # the steps' own stages are not counted


def test_equilibrium_at_the_start():
    space, _ = flow_problem((2, 4, 1), 3)
    space_y = sr.ParameterSpace(space.module, space.inputs, space.outputs(space.initial_point())
                                .reshape(3, 1))
    traj = sr.gradient_flow(space_y, space_y.initial_point(), 1.0)
    assert traj.status.code == "equilibrium_reached" and len(traj) == 1


def test_saving():
    space, _ = flow_problem((2, 4, 1), 3)
    theta0 = space.initial_point()
    # default: every accepted step, and at least 50 evenly spaced times
    traj = sr.gradient_flow(space, theta0, 1.0, rtol=1e-6)
    assert len(traj) >= 50 and len(traj) == traj.counters["n_steps"] + 1
    grid = np.linspace(0, 1.0, 50)
    assert np.abs(grid[:, None] - traj.s.numpy()[None, :]).min(axis=1).max() < 1e-15
    assert bool((torch.diff(traj.s) > 0).all())
    # save_at: exactly the requested times (and s = 0)
    want = [0.25, 1.0, 0.5, 1.75]
    traj = sr.gradient_flow(space, theta0, 2.0, save_at=want)
    assert traj.s.tolist() == [0.0, 0.25, 0.5, 1.0, 1.75]
    traj = sr.gradient_flow(space, theta0, 2.0, save_at=[0.0, 2.0])
    assert traj.s.tolist() == [0.0, 2.0]
    # an early stop keeps the last good state as well
    traj = sr.gradient_flow(space, theta0, 2.0, save_at=[1.0, 2.0], max_steps=2)
    assert traj.status.code == "max_steps_reached" and len(traj) == 2
    assert 0 < float(traj.s[-1]) < 1.0


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(s_end=-1.0), ValueError, "s_end must be a positive"),
        (dict(s_end=0.0), ValueError, "s_end must be a positive"),
        (dict(s_end=math.nan), ValueError, "s_end"),
        (dict(s_end="1"), TypeError, "s_end must be a number"),
        (dict(method="rk45"), ValueError, "method must be one of"),
        (dict(rtol=-1e-8), ValueError, "rtol must be a non-negative"),
        (dict(rtol=0.0, atol=0.0), ValueError, "cannot both be 0"),
        (dict(step_size=0.1), ValueError, "step_size is for"),
        (dict(method="euler", step_size=0.0), ValueError, "step_size must be a positive"),
        (dict(save_at=[0.5, 1.5]), ValueError, r"save_at must be .* in \[0, s_end=1.0\]"),
        (dict(save_at=[-0.1]), ValueError, "save_at"),
        (dict(save_at=[]), ValueError, "save_at"),
        (dict(save_at=["a"]), TypeError, "save_at"),
        (dict(max_steps=-1), ValueError, "max_steps must be an integer"),
        (dict(checkpoint_every=0), ValueError, "checkpoint_every"),
        (dict(event_tol=0.0), ValueError, "event_tol must be a positive"),
        (dict(rank_method="qr"), ValueError, "rank_method must be one of"),
    ],
)
def test_bad_options(kwargs, exc, match):
    space, _ = flow_problem((2, 3, 1), 2)
    kwargs = {"s_end": 1.0} | kwargs
    s_end = kwargs.pop("s_end")
    with pytest.raises(exc, match=match):
        sr.gradient_flow(space, space.initial_point(), s_end, **kwargs)


def test_bad_points():
    space, _ = flow_problem((2, 3, 1), 2)
    theta = space.initial_point()
    with pytest.raises(ValueError, match=r"shape \(13,\)"):
        sr.gradient_flow(space, theta[:-1], 1.0)
    with pytest.raises(ValueError, match="shape"):
        sr.gradient_flow(space, theta.reshape(1, 1, -1), 1.0)
    with pytest.raises(TypeError, match="dtype"):
        sr.gradient_flow(space, theta.float(), 1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        sr.gradient_flow(space, theta.numpy(), 1.0)
    with pytest.raises(TypeError, match="ParameterSpace"):
        sr.gradient_flow("space", theta, 1.0)
    with pytest.raises(ValueError, match="single initial point"):
        sr.gradient_flow(space, theta.expand(2, -1), 1.0, checkpoint="x.npz")


def test_threshold_fixed_and_metric_restored():
    space, _ = flow_problem((2, 4, 1), 3)
    metric = space.metric
    assert metric.rank_atol is None
    traj = sr.gradient_flow(space, space.initial_point(), 1.0)
    assert metric.rank_atol is None  # restored
    assert traj.metric["rank_atol"] is None and traj.metric["class"] == "OutputPullbackMetric"
    sv0 = torch.linalg.svdvals(space.jacobian(space.initial_point()))
    assert traj.rank_tau == pytest.approx(1e-6 * float(sv0[0]), rel=1e-12)
    assert traj.rank_rtol == 1e-6


def test_euclidean_rank_monitor_uses_ntk_eigenvalues():
    space, _ = flow_problem((2, 6, 1), 4, metric=EuclideanMetric)
    traj = sr.gradient_flow(space, space.initial_point(), 0.5, min_saves=3)
    assert traj.settings["rank_method"] == "auto"
    ref = torch.stack([torch.linalg.svdvals(space.jacobian(t)) for t in traj.theta])
    # eigenvalues of D D^T resolve sigma to ~eps sigma_max^2 / sigma
    torch.testing.assert_close(traj.singular_values, ref, atol=1e-7, rtol=1e-7)
    traj2 = sr.gradient_flow(space, space.initial_point(), 0.5, min_saves=3, rank_method="metric")
    torch.testing.assert_close(traj2.singular_values, ref, atol=1e-10, rtol=1e-10)
    # the same flow: the dense D that the SVD caches changes the VJP's rounding only, which
    # the step-size controller may turn into different (equally accurate, rtol 1e-8) steps
    torch.testing.assert_close(traj.theta[-1], traj2.theta[-1], atol=1e-9, rtol=0)


def test_progress_bar(capsys):
    space, _ = flow_problem((2, 3, 1), 2)
    traj = sr.gradient_flow(space, space.initial_point(), 0.5, progress=True)
    assert traj.status.code == "s_end_reached"
    assert "s=" in capsys.readouterr().err


@pytest.mark.parametrize("solver", ["svd", "ntk"])
def test_float32_adapted_flow(solver):
    """float32 end to end: the lam = 1 flow still gives C(s) = e^{-2s} C(0) (docs/theory.md §3).

    In float32 the solves carry errors of about eps_32 * kappa(D) (svd) or
    eps_32 * kappa(D)^2 (ntk), with eps_32 = 1.2e-7 and kappa(D) ~ 10 here,
    so the decay law holds to ~1e-4 relative instead of float64's 1e-8; the
    rank threshold must sit above what float32 resolves (rank_rtol 1e-3).
    """
    space, _ = flow_problem((2, 8, 1), 4, seed=3, metric=OutputPullbackMetric,
                            dtype=torch.float32, solver=solver, rank_rtol=1e-3)
    theta0 = space.initial_point()
    assert theta0.dtype == torch.float32
    traj = sr.gradient_flow(space, theta0, 2.0, rtol=1e-5, atol=1e-7)
    assert traj.status.code == "s_end_reached"
    assert traj.theta.dtype == torch.float32 and traj.cost.dtype == torch.float32
    ratio = traj.cost.double() / float(traj.cost[0])
    expected = torch.exp(-2.0 * traj.s.double())
    assert float((ratio - expected).abs().max()) <= 1e-4


@pytest.mark.parametrize("lam, at_rejections", [(0.5, False), (1.0, True)])
def test_rank_monitor_skips_rejected_steps_where_the_field_is_continuous(
    monkeypatch: pytest.MonkeyPatch, lam: float, at_rejections: bool
) -> None:
    # A first step far too long forces rejections.  For lam < 1 the field is continuous
    # across rank changes: singular values only at s = 0, at accepted steps and saved rows.
    from subriemann.flow import engine as flow_mod

    sp = dead_units_space(6, 8)
    sp.equip_with_metric(InterpolatedMetric, lam=lam, solver="svd")
    assert sp.metric.field_may_jump is at_rejections
    calls = []
    real = flow_mod.Flow.sv

    def counting(self, theta):
        calls.append(1)
        return real(self, theta)

    monkeypatch.setattr(flow_mod.Flow, "sv", counting)
    traj = flow_mod.gradient_flow(sp, sp.initial_point(), 0.5, first_step=50.0, min_saves=0)
    n_steps, n_rej = traj.counters["n_steps"], traj.counters["n_rejected"]
    assert n_rej > 0 and not traj.events
    expected = 1 + n_steps + (n_rej if at_rejections else 0)
    assert len(calls) == expected


def test_field_may_jump_by_metric() -> None:
    # the flow's rank monitor skips rejected steps only where the gradient is continuous
    # across rank changes: Euclidean and g_lam (lam < 1); bundle metrics drop sigma <= tau
    sp = dead_units_space(6, 8)
    m = sr.metrics
    assert sp.equip_with_metric(m.EuclideanMetric).metric.field_may_jump is False
    assert sp.equip_with_metric(InterpolatedMetric, lam=0.0).metric.field_may_jump is False
    assert sp.equip_with_metric(InterpolatedMetric, lam=1.0).metric.field_may_jump is True
    assert sp.equip_with_metric(m.OutputPullbackMetric).metric.field_may_jump is True
    assert sp.equip_with_metric(m.BundleMetric, lam=0.5).metric.field_may_jump is True
