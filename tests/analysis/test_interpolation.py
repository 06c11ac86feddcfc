"""Theory diagnostics of flows (issue 4; docs/theory.md §3, §4, §8 items 2, 5, 6).

* §8 item 2: for MSE and λ = 1 with full rank, |x(s) − y| = e^{−s}|x(0) − y| and
  x(s(t)) = t·y + (1 − t)·x(0) on overparametrized tanh MLPs, to 1e-8 at
  rtol 1e-11 (the integrator's global error there is ~1e-11 relative);
  checked with an independent forward pass, and through
  ``linear_interpolation_residual``, ``decay_rate`` and ``apriori_stopping_time``.
* §8 item 6 / Prop 2.5: a model rank-deficient by construction, x = F(Bθ),
  ends at P(x − y) = 0 with C > 0, and its deviation z(t) from the straight line
  matches the propagator formula (2.58), with U from ``solve_ivp`` on a numpy
  re-implementation; for constant P (a linear model with a rank-deficient data
  matrix) z(t) = t P^⊥(x(0) − y) exactly.
* §8 item 5: ``output_flow`` is y + exp(−s𝒦_λ)(x(0) − y) (numpy/scipy expm), the
  network's flow for a linear model, and the network's flow to first order in s.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
from torch import nn

import subriemann as sr
from subriemann.analysis import (
    apriori_stopping_time,
    decay_rate,
    interpolation_deviation,
    kernel_eigh,
    linear_interpolation_residual,
    output_flow,
)
from subriemann.metrics import InterpolatedMetric, OutputPullbackMetric
from tests.cases import SquareAndLine, flow_problem, one_sample_space
from tests.references import mse_by_hand, reference_outputs


# -- §8 item 2: exponential decay and the straight line -------------------------------------
@pytest.fixture(
    scope="module",
    params=[((3, 16, 1), 6, 0), ((2, 8, 8, 2), 4, 1)],
    ids=["3-16-1 N=6", "2-8-8-2 N=4"],
)
def adapted(request):
    widths, n, seed = request.param
    space, p = flow_problem(widths, n, seed)
    assert space.dim > space.output_dim  # overparametrized
    traj = sr.gradient_flow(space, space.initial_point(), 4.0, rtol=1e-11, atol=1e-13,
                            min_saves=21)
    assert traj.status.code == "s_end_reached" and not traj.events
    assert bool((traj.rank == space.output_dim).all())
    return space, p, traj


def test_decay_and_straight_line(adapted):
    space, p, traj = adapted
    s = traj.s.numpy()
    # independent: the torch model called directly at the saved theta
    x = np.stack([reference_outputs(p.model, p.inputs, th).numpy() for th in traj.theta])
    y = space.y.numpy()
    r0 = np.linalg.norm(x[0] - y)
    decay = np.abs(np.linalg.norm(x - y, axis=1) - np.exp(-s) * r0) / r0
    t = 1.0 - np.exp(-s)
    line = np.linalg.norm(x - (t[:, None] * y + (1 - t[:, None]) * x[0]), axis=1) / r0
    assert decay.max() < 1e-8 and line.max() < 1e-8, (decay.max(), line.max())
    # the library's diagnostic says the same
    res = linear_interpolation_residual(traj)
    assert res < 1e-8 and res == pytest.approx(line.max(), abs=1e-13)
    per = linear_interpolation_residual(traj, per_point=True)
    assert per.shape == (len(traj),) and float(per[0]) == 0.0
    fit = decay_rate(traj)
    assert fit.rate == pytest.approx(2.0, abs=1e-8) and fit.relative_error < 1e-8
    assert fit.points == len(traj) and (fit.s_min, fit.s_max) == (0.0, 4.0)
    fit = decay_rate(traj, s_min=1.0, s_max=3.0)
    assert fit.rate == pytest.approx(2.0, abs=1e-8) and fit.points < len(traj)


def test_full_rank_flow_has_no_rank_loss_bend(adapted):
    space, _, traj = adapted
    sub = dataclasses.replace(
        traj, **{k: getattr(traj, k)[::5] for k in
                 ("s", "theta", "outputs", "cost", "grad_norm", "singular_values", "rank")}
    )
    dev = interpolation_deviation(sub, space)
    assert dev.applies
    assert float(dev.z_propagator.abs().max()) < 1e-14  # P^perp = 0: U = 1 (to round-off)
    assert dev.propagator_error < 1e-8  # z itself is integration error
    assert dev.rank_loss_fraction < 1e-2  # the (tiny) bend is integration error, not rank loss


def test_other_lambdas_bend_and_decay_differently():
    # negative control: lambda = 1/2 is not the adapted flow
    space, _ = flow_problem((3, 16, 1), 6, 0, metric=InterpolatedMetric, lam=0.5)
    traj = sr.gradient_flow(space, space.initial_point(), 3.0, rtol=1e-8)
    assert linear_interpolation_residual(traj) > 1e-3
    assert abs(decay_rate(traj).rate - 2.0) > 0.1
    assert not interpolation_deviation(traj, space).applies


def test_apriori_stopping_time(adapted):
    space, _, traj = adapted
    theta0 = space.initial_point()
    c0 = float(traj.cost[0])
    eps = 1e-3 * c0
    big_t = apriori_stopping_time(space, theta0, eps)
    assert big_t == pytest.approx(0.5 * math.log(1e3), rel=1e-15)
    # the actual s where C = eps, by log-linear interpolation of the saved costs
    c = traj.cost.numpy()
    i = int(np.argmax(c <= eps))
    s0, s1, l0, l1 = float(traj.s[i - 1]), float(traj.s[i]), math.log(c[i - 1]), math.log(c[i])
    s_eps = s0 + (math.log(eps) - l0) * (s1 - s0) / (l1 - l0)
    assert s_eps == pytest.approx(big_t, abs=1e-8)  # log C is linear in s: exact up to 1e-11
    # and a flow with cost_tol stops at the first accepted step past T (rtol 1e-8: C is
    # e^{-2s} C(0) to ~1e-8 relative, i.e. s to ~1e-8)
    stop = sr.gradient_flow(space, theta0, 4.0, cost_tol=eps, min_saves=2)
    assert stop.status.code == "cost_tol_reached"
    assert float(stop.s[-2]) < big_t + 1e-7 and big_t <= float(stop.s[-1]) + 1e-7
    assert apriori_stopping_time(space, theta0, 2 * c0) == 0.0


def test_apriori_stopping_time_warns_and_validates():
    space, _ = flow_problem((3, 16, 1), 6, 0)
    with pytest.raises(ValueError, match="eps must be a positive"):
        apriori_stopping_time(space, space.initial_point(), 0.0)
    under, _ = flow_problem((2, 2, 1), 10, 0)  # K = 9 < QN = 10
    with pytest.warns(UserWarning, match="cannot have rank QN"):
        apriori_stopping_time(under, under.initial_point(), 1e-3)
    x_in = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]])  # K = 3 = QN, rank 2
    lin = sr.ParameterSpace(nn.Linear(2, 1), x_in, torch.randn(3, 1))
    with pytest.warns(UserWarning, match=r"rank-deficient .*rank 2 < QN = 3"):
        apriori_stopping_time(lin, lin.initial_point(), 1e-3)
    ce, _ = flow_problem((2, 4, 3), 3, 0, loss="cross_entropy")
    with pytest.raises(ValueError, match="MSE"):
        apriori_stopping_time(ce, ce.initial_point(), 1e-3)


# -- §8 item 6: rank deficient by construction, x = F(B theta) -------------------------------
class Composite(nn.Module):
    r""":math:`x = \tanh(AB\theta + c)`, :math:`\theta \in R^6`, :math:`B\theta \in R^2`.

    One output per sample (input ``e_j`` picks row ``j``), :math:`QN = 4`:
    :math:`D = \mathrm{diag}(1 - x^2)AB` has rank :math:`\le 2 < QN`.
    """

    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randn(2, 6, generator=g, dtype=torch.float64) / 6**0.5)
        self.register_buffer("A", torch.randn(4, 2, generator=g, dtype=torch.float64))
        self.register_buffer("c", 0.1 * torch.randn(4, generator=g, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(6, generator=g, dtype=torch.float64))
        self.y = torch.randn(4, 1, generator=g, dtype=torch.float64)

    def forward(self, e):
        return e @ torch.tanh(self.A @ (self.B @ self.theta) + self.c)[:, None]

    # the same model by hand, in numpy
    def np_outputs(self, th):
        return np.tanh(self.A.numpy() @ (self.B.numpy() @ th) + self.c.numpy())

    def np_jacobian(self, th):
        x = self.np_outputs(th)
        return (1 - x**2)[:, None] * (self.A.numpy() @ self.B.numpy())


def np_range_projector(d: np.ndarray, rank: int) -> np.ndarray:
    u = np.linalg.svd(d)[0][:, :rank]
    return u @ u.T


@pytest.fixture(scope="module")
def composite():
    model = Composite()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # generic engine for a custom module
        space = sr.ParameterSpace(model, torch.eye(4, dtype=torch.float64), model.y)
    space.equip_with_metric(OutputPullbackMetric)  # tau = 1e-6 sigma_max >> noise ~1e-17
    s_eval = np.linspace(0.0, 8.0, 161)
    traj = sr.gradient_flow(space, space.initial_point(), 8.0, save_at=s_eval, rtol=1e-10,
                            atol=1e-12)
    assert traj.status.code == "s_end_reached" and not traj.events
    # sigma_2 stays bounded away from tau (no rank events), sigma_3,4 are round-off
    assert float(traj.singular_values[:, 1].min()) > 0.04 > 1e3 * traj.rank_tau
    assert float(traj.singular_values[:, 2:].max()) < 1e-12
    assert bool((traj.rank == 2).all())
    # independent reference: theta and the propagator U by solve_ivp, D by hand
    y = model.y.numpy().ravel()

    def rhs(_s, z):
        th, u = z[:6], z[6:].reshape(4, 4)
        d = model.np_jacobian(th)
        dth = -np.linalg.pinv(d, rcond=1e-8) @ (model.np_outputs(th) - y)
        q = np.eye(4) - np_range_projector(d, 2)
        return np.concatenate([dth, (q @ u).ravel()])

    z0 = np.concatenate([space.initial_point().numpy(), np.eye(4).ravel()])
    sol = scipy.integrate.solve_ivp(rhs, (0.0, 8.0), z0, t_eval=s_eval, method="DOP853",
                                    rtol=1e-12, atol=1e-14)
    assert sol.success
    return space, model, traj, sol


def test_rank_deficient_flow_ends_on_a_critical_point_with_positive_cost(composite):
    space, model, traj, sol = composite
    np.testing.assert_allclose(traj.theta.numpy(), sol.y[:6].T, atol=1e-8, rtol=0)
    # horizontality: theta moves only in ran D^T within ran B^T; ker B is untouched
    b = model.B.numpy()
    ker = np.eye(6) - np.linalg.pinv(b) @ b
    drift = ker @ (traj.theta.numpy() - traj.theta[0].numpy()).T
    assert np.abs(drift).max() < 1e-12
    # carry on to a stationary point: P(x - y) -> 0 like e^{-s}, with C > 0
    end = sr.gradient_flow(space, traj.theta[-1], 22.0, rtol=1e-10, atol=1e-12, min_saves=2)
    assert end.status.code in ("s_end_reached", "equilibrium_reached")
    th = end.theta[-1].numpy()
    r = model.np_outputs(th) - model.y.numpy().ravel()
    pr = np_range_projector(model.np_jacobian(th), 2) @ r
    r0 = float((traj.outputs[0] - space.y).norm())
    assert np.linalg.norm(pr) < 1e-8 * r0
    assert end.final_cost > 0.1 * float(traj.cost[0])  # a non-global critical point
    c = np.concatenate([traj.cost.numpy(), end.cost.numpy()])
    assert np.all(np.diff(c) <= 1e-14)
    assert end.final_cost == pytest.approx(0.5 * float(r @ r), rel=1e-12)


def test_deviation_matches_the_propagator_formula(composite):
    space, model, traj, sol = composite
    s = sol.t
    r0 = (traj.outputs[0] - space.y).numpy()
    u = sol.y[6:].T.reshape(-1, 4, 4)
    z_ref = np.exp(-s)[:, None] * np.einsum("nij,j->ni", u - np.eye(4), r0)  # (2.58)
    dev = interpolation_deviation(traj, space)
    assert dev.applies
    scale = np.linalg.norm(r0)
    # z from the flow's outputs is (2.58) with the exact U, to the integration error
    assert np.abs(dev.z.numpy() - z_ref).max() < 1e-8 * scale
    assert float(dev.z.norm(dim=1).max()) > 0.3 * scale  # a real bend
    # the library's U (exponential midpoint on the saved path, h = 0.05): second order
    err = np.linalg.norm(dev.z_propagator.numpy() - z_ref, axis=1).max() / scale
    assert err < 1e-4 and dev.propagator_error < 1e-4
    assert dev.rank_loss_fraction == pytest.approx(1.0, abs=1e-3)
    coarse = dataclasses.replace(
        traj, **{k: getattr(traj, k)[::2] for k in
                 ("s", "theta", "outputs", "cost", "grad_norm", "singular_values", "rank")}
    )
    err2 = interpolation_deviation(coarse, space).propagator_error
    assert 3.5 < err2 / dev.propagator_error < 4.5  # halving h divides the error by 4
    # z splits on ran D and its complement, with P by hand
    for i in (10, 80, 160):
        q = np.eye(4) - np_range_projector(model.np_jacobian(traj.theta[i].numpy()), 2)
        np.testing.assert_allclose(dev.z_perp[i].numpy(), q @ dev.z[i].numpy(), atol=1e-12)
    torch.testing.assert_close(dev.z_range + dev.z_perp, dev.z, rtol=0, atol=1e-15)
    assert set(dev.norms) == {"z", "z_range", "z_perp", "z_propagator"}


def test_constant_projector_gives_an_exact_straight_deviation():
    # Linear(2, 1) on N = 5 points: D = [X 1] has rank 3 < QN = 5, and P is constant.
    gen = torch.Generator().manual_seed(4)
    x_in = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    space = sr.ParameterSpace(nn.Linear(2, 1), x_in, torch.randn(5, 1, generator=gen))
    space.equip_with_metric(OutputPullbackMetric)
    traj = sr.gradient_flow(space, space.initial_point(), 12.0, rtol=1e-10, atol=1e-12)
    d = np.hstack([x_in.numpy(), np.ones((5, 1))])
    p = d @ np.linalg.pinv(d)
    x0, y = traj.outputs[0].numpy(), space.y.numpy()
    t = traj.t.numpy()
    z_exact = t[:, None] * ((np.eye(5) - p) @ (x0 - y))[None, :]  # docs/theory.md §4
    dev = interpolation_deviation(traj, space)
    scale = np.linalg.norm(x0 - y)
    assert np.abs(dev.z.numpy() - z_exact).max() < 1e-9 * scale
    assert np.abs(dev.z_propagator.numpy() - z_exact).max() < 1e-12 * scale  # exact for const P
    assert float(dev.z_range.abs().max()) < 1e-9 * scale  # the bend is all in (ran D)^perp
    # x(s) = y + (e^{-s} P + P^perp)(x(0) - y), so x~(1) = P y + P^perp x(0)
    x_exact = y + (np.exp(-traj.s.numpy())[:, None, None] * p + (np.eye(5) - p)) @ (x0 - y)
    np.testing.assert_allclose(traj.outputs.numpy(), x_exact, atol=1e-9 * scale)


def test_deviation_across_a_rank_event():
    # x = (a, b^2/2), y = (1, 0), tau = 1/2: rank 2 -> 1 at s* = 2 ln 2, then b = 1/2 frozen:
    # z = 0 before s*, z = (0, 1/8 - e^{-s}/2) after (a = 1 - e^{-s} throughout).
    space = one_sample_space(SquareAndLine(), [1.0, 0.0], OutputPullbackMetric, rank_atol=0.5)
    traj = sr.gradient_flow(space, space.initial_point(), 5.0, save_at=np.linspace(0, 5, 11),
                            rtol=1e-10, atol=1e-12)
    assert len(traj.events) == 1
    s = traj.s.numpy()
    z2 = np.where(s > 2 * math.log(2), 0.125 - 0.5 * np.exp(-s), 0.0)
    dev = interpolation_deviation(traj, space)
    np.testing.assert_allclose(dev.z.numpy(), np.stack([0 * s, z2], axis=1), atol=1e-8)
    # P jumps at the event; splitting the interval there keeps U exact (P is piecewise
    # constant), where the midpoint rule across the jump would be off by O(h) = 0.1
    assert dev.propagator_error < 1e-8
    assert dev.rank_loss_fraction == pytest.approx(1.0, abs=1e-7)


# -- §8 item 5: the linearized output flow -----------------------------------------------------
def np_kernel(d: np.ndarray, lam: float) -> np.ndarray:
    ntk = d @ d.T
    return ntk @ np.linalg.pinv((1 - lam) * np.eye(len(ntk)) + lam * ntk, rcond=1e-10)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_output_flow_is_the_closed_form_and_the_linear_model_flow(lam):
    gen = torch.Generator().manual_seed(2)
    x_in = 0.5 * torch.randn(6, 2, generator=gen, dtype=torch.float64)  # rank 3 < QN = 6
    space = sr.ParameterSpace(nn.Linear(2, 1), x_in, torch.randn(6, 1, generator=gen))
    space.equip_with_metric(InterpolatedMetric, lam=lam)
    theta0 = space.initial_point()
    s = [0.0, 0.3, 1.0, 2.5]
    out = output_flow(space, theta0, s, lam=lam)
    d = np.hstack([x_in.numpy(), np.ones((6, 1))])
    x0, y = space.outputs(theta0).numpy(), space.y.numpy()
    ref = np.stack([y + scipy.linalg.expm(-si * np_kernel(d, lam)) @ (x0 - y) for si in s])
    np.testing.assert_allclose(out.outputs.numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(out.cost.numpy(), [float(mse_by_hand(torch.tensor(r), space.y))
                                                  for r in ref], rtol=1e-12)
    np.testing.assert_allclose(out.t.numpy(), 1 - np.exp(-np.array(s)), atol=1e-15)
    # kappa_i = sigma_i^2 / ((1 - lam) + lam sigma_i^2)
    sig2 = np.sort(np.linalg.svd(d, compute_uv=False) ** 2)
    kap = np.sort(out.kappa.numpy())[-3:]
    np.testing.assert_allclose(kap, sig2 / ((1 - lam) + lam * sig2), rtol=1e-10)
    # a linear model *is* its linearization: the network flow agrees
    traj = sr.gradient_flow(space, theta0, 2.5, save_at=s, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(traj.outputs.numpy(), ref, atol=1e-9)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_output_flow_is_the_network_flow_to_first_order(lam):
    space, _ = flow_problem((3, 16, 1), 6, 0, metric=InterpolatedMetric, lam=lam)
    theta0 = space.initial_point()
    s = [0.001, 0.002, 0.004]  # s * sigma_max^2 ~ 0.1: the small-s regime (NTK up to ~35)
    lin = output_flow(space, theta0, s, lam=lam).outputs
    net = sr.gradient_flow(space, theta0, s[-1], save_at=s, rtol=1e-12, atol=1e-14).outputs[1:]
    x0 = space.outputs(theta0)
    gap = (net - lin).norm(dim=1).numpy()
    move = (net - x0).norm(dim=1).numpy()
    if lam == 1.0:
        # full rank: K_1 = P = 1 all along, the network's outputs follow the linear flow exactly
        assert gap.max() < 1e-12 * move.max()
        return
    # same velocity at s = 0, so the gap is O(s^2) while the motion is O(s)
    np.testing.assert_allclose(gap[1:] / gap[:-1], 4.0, rtol=0.15)
    np.testing.assert_allclose(move[1:] / move[:-1], 2.0, rtol=0.15)
    assert np.all(gap < 0.05 * move)


def test_output_flow_cross_entropy_and_errors():
    space, _ = flow_problem((2, 5, 3), 3, 1, InterpolatedMetric, loss="cross_entropy", lam=0.5)
    theta0 = space.initial_point()
    out = output_flow(space, theta0, [1.0, 0.5], lam=0.5, n_steps=400)
    u, kappa = kernel_eigh(space, theta0, 0.5)
    k = (u * kappa) @ u.T
    y = space.y.numpy().reshape(3, 3)

    def rhs(_s, x):
        z = x.reshape(3, 3)
        sm = np.exp(z - z.max(axis=1, keepdims=True))
        sm /= sm.sum(axis=1, keepdims=True)
        return -k.numpy() @ (sm - y).ravel()

    sol = scipy.integrate.solve_ivp(rhs, (0, 1.0), space.outputs(theta0).numpy(),
                                    t_eval=[0.5, 1.0], rtol=1e-12, atol=1e-14)
    # RK4 with h = 1/400: error ~1e-11
    np.testing.assert_allclose(out.outputs.numpy()[::-1], sol.y.T, atol=1e-9)
    with pytest.raises(ValueError, match="non-negative"):
        output_flow(space, theta0, [-1.0])
    with pytest.raises(ValueError, match="lam"):
        output_flow(space, theta0, [1.0], lam=1.5)
