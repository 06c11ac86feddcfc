"""Continuation of flows through rank loss (subriemann/flow/continuation.py; issue 12, point 1).

References are independent of the engine: a direct numpy sum over an explicit
SVD for the filter, scipy's ``solve_ivp`` on the closed-form scalar ODE of a
constructed model, numpy's SVD of a dense Jacobian for the family.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import subriemann as sr
from subriemann.flow import continuation, engine
from subriemann.metrics import InterpolatedMetric, OutputMetric, OutputPullbackMetric
from tests.cases import SquareAndLine, case_named, one_sample_space
from tests.helpers import REPO_ROOT as ROOT


# -- the filter itself ----------------------------------------------------------------------
def _svd_problem(sv):
    g = np.random.default_rng(0)
    u, _ = np.linalg.qr(g.standard_normal((len(sv), len(sv))))
    v, _ = np.linalg.qr(g.standard_normal((len(sv) + 2, len(sv))))
    r = g.standard_normal(len(sv))
    return u, np.asarray(sv, dtype=float), v, r


def _grad_at(u, s, v, r):
    def grad(t: float) -> torch.Tensor:  # the hard-threshold pseudo-inverse, by hand
        keep = s > t
        return torch.from_numpy(v[:, keep] @ ((u[:, keep].T @ r) / s[keep]))
    return grad


@pytest.mark.parametrize("sv", [[1.0, 0.3, 5e-3, 2e-3, 1e-7], [1.0, 0.5, 0.2, 0.1]])
def test_filter_is_the_smoothstep_sum(sv):
    u, s, v, r = _svd_problem(sv)
    tau, top = 1e-6, 1e-2
    g, weights, dev = continuation.filtered_gradient(_grad_at(u, s, v, r), torch.tensor(s),
                                                     tau, top)
    w = np.array([continuation.smoothstep((x - tau) / (top - tau)) for x in s])
    ref = v @ (w * (u.T @ r) / s)  # the closed form sum_i w_i (u_i^T r) / sigma_i v_i
    exact = v[:, s > tau] @ ((u[:, s > tau].T @ r) / s[s > tau])
    # a few sums of O(|r| / sigma) terms: rounding ~ 1e-16 * 1e3
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert sorted(weights) == [i for i, x in enumerate(s) if tau < x < top]
    assert dev == pytest.approx(np.linalg.norm(ref - exact) / np.linalg.norm(exact), rel=1e-10)


def test_filter_is_continuous_at_both_ends_of_the_band():
    tau, top = 1e-4, 1e-2
    for edge in (tau, top):
        vals = []
        for eps in (-1e-9, 1e-9):
            u, s, v, r = _svd_problem([1.0, 0.2, edge + eps])
            vals.append(continuation.filtered_gradient(_grad_at(u, s, v, r), torch.tensor(s),
                                                       tau, top)[0])
        # C^1 smoothstep: the jump across an edge is O(eps / (top - tau)) * |r| / sigma
        assert float((vals[0] - vals[1]).norm()) < 1e-9 / (top - tau) * 10 / edge
    assert continuation.band_top(0.5, torch.tensor([1.0, 0.3]), 1e-3) == 0.0  # b <= tau


# -- a constructed case with a closed form, through three metrics -----------------------------
TAU, BAND, S_END = 0.01, 0.2, 8.0


def _weight(b, filtered):
    return continuation.smoothstep((b - TAU) / (BAND - TAU)) if filtered else 1.0


def _reference_b(rate, filtered):
    """b(s) of b' = -w((b - tau)/(top - tau)) * rate(b) (top = BAND * sigma_max, sigma_max = 1)."""

    def rhs(_s, y):
        return [-_weight(y[0], filtered) * rate(y[0])]

    sol = solve_ivp(rhs, (0.0, S_END), [1.0], rtol=1e-12, atol=1e-14, dense_output=True)
    return sol


CASES = {
    # lambda = 1: b' = -(b^2/2)/b
    "pullback": (OutputPullbackMetric, {}, lambda b: b / 2, True),
    # lambda < 1: b' = -b (b^2/2) / ((1 - lam) + lam b^2); its (Cholesky) gradient has no
    # threshold and cannot jump (field_may_jump is False), so the flow spends no filter on it
    "lambda<1": (InterpolatedMetric, {"lam": 0.9}, lambda b: b**3 / (2 * (0.1 + 0.9 * b * b)),
                 False),
    # custom output metric G = 2 I: grad = D^+ G^{-1} r, b' = -(b^2/2)/(2b)
    "custom": (OutputMetric, {"output_metric": lambda x: 2 * torch.eye(2, dtype=x.dtype)},
               lambda b: b / 4, True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_constructed_case_follows_the_filtered_ode(name, monkeypatch):
    metric, kw, rate, filtered = CASES[name]
    space = one_sample_space(SquareAndLine(), [1.0, 0.0], metric, rank_atol=TAU, **kw)
    calls = []
    real = engine.Flow.band_field
    monkeypatch.setattr(engine.Flow, "band_field", lambda *a: calls.append(1) or real(*a))
    traj = sr.gradient_flow(space, space.initial_point(), S_END, rtol=1e-10, atol=1e-12,
                            rank_band=BAND)
    assert traj.status.code == "s_end_reached"
    # one filter for every metric whose field depends on tau (from one factorization for
    # "pullback", as the sum of thresholded gradients for "custom"); none where it cannot jump
    assert bool(calls) == filtered == space.metric.field_may_jump
    ref = _reference_b(rate, filtered)
    # both integrate to ~1e-10 relative; the C^1 kinks of w at the band's edges cost a few
    # rejected steps, not accuracy
    b = traj.theta[:, 1].numpy()
    np.testing.assert_allclose(b, ref.sol(traj.s.numpy())[0], rtol=1e-6, atol=1e-9)
    if not filtered:  # sigma_2 = b crosses into the band: no segment, no filter evaluation
        assert b[-1] < BAND and traj.segments == []
        return
    assert b[-1] > TAU and not traj.events  # sigma_2 approaches tau; the smoothstep holds it
    # the segment: direction 2 filtered from the first accepted step with b < top to the end
    cross = [float(s) for s, bb in zip(traj.s, b) if bb < BAND]
    seg = traj.segments[0]
    assert (seg.index, seg.kind, seg.tau, seg.band_top) == (1, "filtered", TAU, BAND)
    assert seg.s_start == pytest.approx(cross[0], abs=1e-12)
    assert seg.s_end == S_END
    # the deviation |F - F_tau| / |F_tau| at the end, by hand
    a_rate = float(traj.outputs[-1, 0] - 1.0) * (0.5 if name == "custom" else 1.0)
    w = _weight(b[-1], True)
    dev_end = (1 - w) * rate(b[-1]) / math.hypot(a_rate, rate(b[-1]))
    assert dev_end <= seg.max_deviation * (1 + 1e-6) and seg.max_deviation <= 1.0
    assert "direction 2 filtered from s = " in str(seg)


def test_hard_threshold_is_rank_band_zero():
    space = one_sample_space(SquareAndLine(), [1.0, 0.0], OutputPullbackMetric, rank_atol=TAU)
    traj = sr.gradient_flow(space, space.initial_point(), 12.0, rtol=1e-10, atol=1e-12,
                            rank_band=0.0, stall_tol=1e-6)
    # b = exp(-s/2) crosses tau at s = 2 ln(100); the rank-1 field then leaves b alone
    assert [(e.rank_before, e.rank_after, e.index) for e in traj.events] == [(2, 1, 1)]
    assert traj.events[0].s == pytest.approx(2 * math.log(100), abs=1e-7)
    assert [g.kind for g in traj.segments] == ["dropped"]
    assert traj.segments[0].s_start == pytest.approx(traj.events[0].s, abs=1e-6)
    with pytest.raises(ValueError, match="rank_band"):
        sr.gradient_flow(space, space.initial_point(), 1.0, rank_band=1.5)


def test_segments_are_saved_and_resumed_bit_exactly(tmp_path):
    space = one_sample_space(SquareAndLine(), [1.0, 0.0], OutputPullbackMetric, rank_atol=TAU)
    theta0 = space.initial_point()
    opts = dict(rtol=1e-10, atol=1e-12, rank_band=BAND)
    full = sr.gradient_flow(space, theta0, S_END, **opts)
    part = sr.gradient_flow(space, theta0, S_END, checkpoint=tmp_path / "run",
                            max_steps=full.counters["n_steps"] - 10, **opts)
    assert part.status.code == "max_steps_reached" and part.segments  # stopped inside a segment
    done = sr.gradient_flow(space, theta0, S_END, resume=tmp_path / "run", **opts)
    assert torch.equal(done.theta, full.theta) and done.segments == full.segments
    back = sr.Trajectory.load(done.save(tmp_path / "out"))
    assert back.segments == full.segments


# -- the former chattering / stiff cases of the family --------------------------------------
def _family():
    spec = importlib.util.spec_from_file_location("rank_loss_family",
                                                  ROOT / "benchmarks" / "rank_loss_family.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rank_loss_family"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind, seed", [("narrow", 3), ("K~QN", 1), ("no-bias", 2),
                                        ("duplicated", 0)])
def test_family_member_meets_the_acceptance(kind, seed):
    # narrow 3 and K~QN 1 stopped with rank_chattering before, no-bias 2 ran out of 30 s at
    # s = 0.016 (stiff, no event); duplicated 0 already reached s_end
    fam = _family()
    row = fam.one_flow(kind, seed, s_end=10.0, max_time=120.0)
    assert row["status"] == "s_end_reached", row["message"]
    assert row["max_cost_rise"] <= 1e-12 * row["cost0"]
    assert row["stationarity"] <= 1e-3
    assert row["events_checked"] == row["events"]


def test_band_filter_takes_the_spectrum_from_the_gradients_eigh(monkeypatch):
    """At lam = 1 with K < QN the 'ntk' route's gradient takes eigh of D^T D; the band filter
    reads its singular values from it (one eigh per point, no eigvalsh besides)."""
    space = case_named("mlp-tall").space(backend="func")
    metric = sr.metrics.InterpolatedMetric(space, lam=1.0, solver="ntk")
    assert space.output_dim > space.dim
    calls = []
    real = torch.linalg.eigvalsh
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda a: calls.append(1) or real(a))
    theta = space.initial_point() + 1e-3
    s = metric.gradient_spectrum(theta)
    metric.gradient(theta)
    assert not calls
    ref = torch.linalg.svdvals(space.jacobian(theta))
    keep = ref > 1e-6 * ref[0]
    assert torch.allclose(s[keep], ref[keep], rtol=1e-8, atol=0)


# -- the filter from one factorization (weighted_gradient) ----------------------------------
def _band_setup(case: str, solver: str):
    """lambda = 1 on ``case`` with tau and the band top placed between the singular values
    of D (dense SVD of the torch.func Jacobian: the independent reference), 2 directions
    in the band and one dropped."""
    space = case_named(case).space(backend="func")
    theta = space.initial_point() + 1e-2
    u, s, vh = torch.linalg.svd(space.jacobian(theta), full_matrices=False)
    r = space.point_state(theta).output_grad
    k = int((s > 1e-8 * s[0]).sum())  # the numerical rank of D
    tau = float(s[k - 1] + s[k - 2]) / 2  # sigma_k dropped
    top = float(s[k - 4] + s[k - 5]) / 2  # sigma_{k-3}, sigma_{k-2}... in the band
    keep = s > tau
    w = torch.where(keep, continuation.band_weights(s, tau, top), 0.0)
    ref = vh.T @ (torch.where(keep, w / s, 0.0) * (u.T @ r))
    metric = InterpolatedMetric(space, lam=1.0, solver=solver, rank_atol=tau)
    return space, metric, theta, s, tau, top, ref


@pytest.mark.parametrize("solver", ["ntk", "svd"])
@pytest.mark.parametrize("case", ["mlp-tall", "mlp-ce"])
def test_weighted_gradient_is_the_filtered_sum(case, solver):
    """sum_i w_i (u_i^T r) / sigma_i v_i against the dense SVD.  The ntk route squares D: a
    coefficient carries a relative error up to eta / sigma_i^2, eta ~ n eps sigma_max^2
    (n <= 100 here), so 1e3 eps (sigma_max / sigma_live)^2 bounds it."""
    space, metric, theta, s, tau, top, ref = _band_setup(case, solver)
    got = metric.weighted_gradient(theta, lambda x: continuation.band_weights(x, tau, top))
    assert got is not None and metric.last_solve.converged
    live = float(s[s > tau][-1])
    tol = 1e3 * torch.finfo(torch.float64).eps * (float(s[0]) / live) ** 2
    assert float((got - ref).norm()) <= tol * float(ref.norm())
    assert InterpolatedMetric(space, lam=0.5).weighted_gradient(theta, torch.ones_like) is None


@pytest.mark.parametrize("solver", ["ntk", "svd"])
def test_band_field_takes_one_factorization(solver, monkeypatch):
    """The flow's band field from weighted_gradient is the sum of thresholded gradients (the
    generic filter, forced by a metric that offers no weights) and costs one exact gradient
    (for the deviation) instead of one per direction in the band."""
    space, metric, theta, s, tau, top, ref = _band_setup("mlp-tall", solver)
    fl = engine.Flow(space, metric, sr.flow.FlowOptions(s_end=1.0, rank_band=top / float(s[0])))
    fl.tau = tau
    calls = []
    real = InterpolatedMetric.gradient
    monkeypatch.setattr(InterpolatedMetric, "gradient",
                        lambda self, p: calls.append(1) or real(self, p))
    fast = fl.band_field(theta)
    dev_fast = fl.last_filter[1]
    assert len(calls) == 1
    monkeypatch.setattr(InterpolatedMetric, "weighted_gradient", lambda self, p, w: None)
    slow = fl.band_field(theta)
    assert len(calls) > 3  # one per threshold: the band's top, each band direction
    live = float(s[s > tau][-1])
    tol = 1e3 * torch.finfo(torch.float64).eps * (float(s[0]) / live) ** 2
    assert float((fast - slow).norm()) <= tol * float(slow.norm())
    assert float((fast - ref).norm()) <= tol * float(ref.norm())
    assert dev_fast == pytest.approx(fl.last_filter[1], rel=1e-6, abs=tol)
