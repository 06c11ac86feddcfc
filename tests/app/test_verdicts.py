"""The report's verdicts (:mod:`subriemann.app.verdicts`), against closed forms (issue 14).

* the error estimate ε of the computed outputs bounds the distance to the
  exact adapted MSE flow :math:`x(s) = y + e^{-s}(x(0) - y)` (docs/theory.md §3),
  and the band-filter part bounds the distance between a filtered flow and the
  unfiltered one;
* every check can fail: a flow whose outputs or cost were tampered with gets
  ``failed``;
* expectations only where the theory makes them (the Euclidean flow has none).

Tiny problems (N = 4, a 6-unit tanh MLP, s_end = 1; one flow to s = 32).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import subriemann as sr
from subriemann.app.report import analyse_flow
from subriemann.app.verdicts import on_hyperplanes, output_error
from subriemann.flow import gradient_flow

S_END = 1.0
GRID = np.linspace(0.0, S_END, 11)


def _space(loss: str, eps: float = 0.2) -> tuple[sr.ParameterSpace, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(3)
    q = 3 if loss == "cross_entropy" else 1
    model = torch.nn.Sequential(torch.nn.Linear(2, 6), torch.nn.Tanh(), torch.nn.Linear(6, q))
    if loss == "cross_entropy":
        y = (1 - eps) * torch.eye(3, dtype=torch.float64)[torch.tensor([0, 1, 2, 0])] + eps / 3
    else:
        y = torch.randn(4, 1, generator=g, dtype=torch.float64)
    space = sr.ParameterSpace(model.double(), x, y, loss=loss)
    return space, space.initial_point()


@pytest.fixture(scope="module")
def mse_flows() -> dict[str, sr.Trajectory]:
    space, theta0 = _space("mse")
    out = {}
    for name, metric, band in (("pullback", sr.metrics.OutputPullbackMetric, 0.0),
                               ("banded", sr.metrics.OutputPullbackMetric, 0.5),
                               ("euclidean", sr.metrics.EuclideanMetric, 0.0)):
        space.equip_with_metric(metric)
        out[name] = gradient_flow(space, theta0, S_END, rtol=1e-8, atol=1e-10, save_at=GRID,
                                  rank_band=band)
    return out


@pytest.fixture(scope="module")
def ce_pullback() -> sr.Trajectory:
    space, theta0 = _space("cross_entropy")
    space.equip_with_metric(sr.metrics.OutputPullbackMetric)
    return gradient_flow(space, theta0, S_END, rtol=1e-8, atol=1e-10, rank_band=0.0)


def _verdicts(traj: sr.Trajectory, lam: float | None) -> dict[str, dict]:
    entry, _ = analyse_flow(traj, None, lam=lam, deviation=False)
    return {v["check"]: v for v in entry["verdicts"]}


def test_output_error_bounds_the_distance_to_the_exact_adapted_flow(mse_flows):
    traj = mse_flows["pullback"]
    assert int(traj.rank.min()) == 4  # rank D = QN: the closed form applies
    x0, y = traj.outputs[0], traj.targets
    exact = y + torch.exp(-traj.s)[:, None] * (x0 - y)  # docs/theory.md §3
    actual = float((traj.outputs - exact).norm(dim=1).max())
    err = output_error(traj)
    assert err.band_filter == 0.0  # rank_band = 0: no filter
    assert actual <= err.total
    assert err.total < 1e-4 * float((x0 - y).norm())  # and the estimate is not vacuous


def test_band_error_bounds_the_change_made_by_the_filter(mse_flows):
    """rank_band = 0.5 filters the small directions: the filtered flow leaves the exact one
    by more than the integration error, and ε_band accounts for it."""
    filtered, exact = mse_flows["banded"], mse_flows["pullback"]
    assert torch.allclose(filtered.s, exact.s)  # same saved times (save_at)
    diff = float((filtered.outputs - exact.outputs).norm(dim=1).max())
    err_f, err_e = output_error(filtered), output_error(exact)
    assert err_f.band_filter > 0.0 and diff > 10 * (err_f.integration + err_e.integration)
    assert diff <= err_f.total + err_e.total


def test_adapted_mse_flow_holds_its_predictions_and_tampering_fails_them(mse_flows):
    traj = mse_flows["pullback"]
    v = _verdicts(traj, 1.0)
    assert {k: v[k]["outcome"] for k in ("descent", "decay_rate", "straight_line")} == {
        "descent": "held", "decay_rate": "held", "straight_line": "held"}
    assert v["decay_rate"]["expected"] == 2.0 and v["decay_rate"]["tolerance"] < 1e-2
    # a cost that decays at rate 1.9 instead of 2, and one that rises once
    slower = dataclasses.replace(traj, cost=traj.cost * torch.exp(0.1 * traj.s))
    assert _verdicts(slower, 1.0)["decay_rate"]["outcome"] == "failed"
    bump = traj.cost.clone()
    bump[5] = 2 * bump[4]
    assert _verdicts(dataclasses.replace(traj, cost=bump), 1.0)["descent"]["outcome"] == "failed"
    # outputs off the straight line by 1e-3 of |x(0) - y|
    off = traj.outputs.clone()
    off[5] += 1e-3 * (traj.outputs[0] - traj.targets).norm()
    bent = _verdicts(dataclasses.replace(traj, outputs=off), 1.0)
    assert bent["straight_line"]["outcome"] == "failed"


def test_euclidean_flow_has_no_expected_rate(mse_flows):
    traj = mse_flows["euclidean"]
    entry, _ = analyse_flow(traj, None, lam=0.0, deviation=False)
    assert entry["decay_rate"]["expected"] is None
    assert entry["decay_rate"]["relative_error"] is None
    v = {x["check"]: x for x in entry["verdicts"]}
    assert v["decay_rate"]["outcome"] == "no prediction" and v["decay_rate"]["expected"] is None
    assert v["descent"]["outcome"] == "held"
    assert "straight_line" not in v


def test_cross_entropy_hyperplane_check(ce_pullback):
    traj = ce_pullback
    v = _verdicts(traj, 1.0)
    x = traj.outputs.numpy().reshape(len(traj), 4, 3)
    drift = np.abs(x.sum(-1) - x[0].sum(-1)).max()  # independent of hyperplane_sums
    assert v["hyperplane_sums"]["measured"] == pytest.approx(drift, rel=1e-12)
    assert v["hyperplane_sums"]["outcome"] == "held"
    # s_end = 1 is far from the late-time window: said, not guessed
    assert v["late_rate"]["outcome"] == "not checked" and "--s-end" in v["late_rate"]["note"]
    # one sample's logits pushed along 1 by 1e-3: the sums are no longer constant
    pushed = traj.outputs.clone().reshape(len(traj), 4, 3)
    pushed[-1, 0] += 1e-3
    tampered = dataclasses.replace(traj, outputs=pushed.reshape(len(traj), 12))
    assert _verdicts(tampered, 1.0)["hyperplane_sums"]["outcome"] == "failed"
    # ... which on_hyperplanes takes out again, leaving the cost unchanged
    back = on_hyperplanes(tampered)
    y = traj.targets.reshape(4, 3)
    assert torch.allclose(back.outputs.reshape(-1, 4, 3).sum(-1), pushed[:1].sum(-1))
    lse = torch.logsumexp(back.outputs.reshape(-1, 4, 3), dim=-1, keepdim=True)
    cost = -(y * (back.outputs.reshape(-1, 4, 3) - lse)).sum(dim=(1, 2))
    assert torch.allclose(cost, traj.cost, rtol=1e-12, atol=0)
    # other flows are only measured: the theory predicts nothing for their sums
    other = _verdicts(traj, 0.5)["hyperplane_sums"]
    assert other["outcome"] == "no prediction" and other["expected"] is None


def test_late_rate_of_a_long_adapted_flow_is_mu():
    """Labels smoothed with ε = 0.75, Q = 3: μ = ε/Q (docs/theory.md §6); the flow reaches
    the fit window (|x − x*| <= 1e-3 |x(0) − x*|) by s ≈ 28.  The 5 % tolerance covers the
    fit's bias from the next-slowest rate, >= 1.5 μ for these labels (docs/cross_entropy.md)."""
    space, theta0 = _space("cross_entropy", eps=0.75)
    space.equip_with_metric(sr.metrics.OutputPullbackMetric)
    traj = gradient_flow(space, theta0, 32.0, rtol=1e-8, atol=1e-10)
    late = _verdicts(traj, 1.0)["late_rate"]
    assert late["expected"] == pytest.approx(0.75 / 3, rel=1e-12)
    assert late["outcome"] == "held", late
    assert abs(late["measured"] - 0.25) < 0.05 * 0.25
