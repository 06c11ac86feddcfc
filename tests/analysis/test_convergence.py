"""Discrete AdaptedGD iterates vs the gradient flow, and the linear-convergence certificate.

References: closed forms on a linear model x = A theta (MSE), and ``sr.gradient_flow``
integrated at a tight tolerance (an independent integrator: dopri5 on the metric's
``gradient``, not AdaptedGD's push-through step).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import subriemann as sr
from subriemann.analysis import adapted_rate, apriori_steps, linear_convergence_certificate
from subriemann.optim import AdaptedGD


def _linear(n=5, m=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    net = torch.nn.Linear(m, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.randn(1, m, generator=g, dtype=torch.float64))
    x = torch.randn(n, m, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    return net, x, y


def _tanh(seed=0, n=6, h=12):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, h), torch.nn.Tanh(), torch.nn.Linear(h, 1)
    ).double()
    x = torch.randn(n, 2, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    return net, x, y


def _theta(net):
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def test_discrete_lam1_matches_closed_form_and_its_error_to_the_flow_is_order_eta():
    # x = A theta, D = A: the flow has r(s) = e^{-s} r0, theta(s) = theta0 - (1 - e^{-s}) A^+ r0;
    # the iterates have r_k = (1 - eta)^k r0, theta_k = theta0 - (1 - (1 - eta)^k) A^+ r0.
    errors = []
    for eta in (0.2, 0.1, 0.05):
        net, x, y = _linear()
        a = x.numpy()
        th0 = _theta(net).numpy()
        step = np.linalg.pinv(a) @ (a @ th0 - y.numpy().ravel())
        opt = AdaptedGD(net, lam=1.0, lr=eta)
        k = round(1.0 / eta)
        for _ in range(k):
            opt.step(x, y)
        exact_k = th0 - (1 - (1 - eta) ** k) * step
        # the recursion is exact up to round-off: k steps of relative error kappa^2 eps each
        kappa = np.linalg.cond(a)
        np.testing.assert_allclose(
            _theta(net).numpy(),
            exact_k,
            rtol=0,
            atol=100 * k * kappa**2 * np.finfo(float).eps * np.abs(step).max(),
        )
        flow = th0 - (1 - math.exp(-1.0)) * step
        errors.append(float(np.linalg.norm(_theta(net).numpy() - flow)))
    # Euler is first order: (1 - eta)^{1/eta} - e^{-1} = -e^{-1} eta / 2 + O(eta^2)
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(1.7 < r < 2.3 for r in ratios), ratios


def test_discrete_iterates_track_gradient_flow_of_a_tanh_network():
    lam, s_end = 0.5, 1.0
    net, x, y = _tanh()
    space = sr.ParameterSpace(net, x, y).equip_with_metric(sr.metrics.InterpolatedMetric, lam=lam)
    th0 = space.initial_point()
    traj = sr.gradient_flow(
        space, th0, s_end, rtol=1e-11, atol=1e-13, save_at=[s_end], monitor_rank=False
    )
    flow = traj.theta[-1]
    errors = []
    for eta in (0.1, 0.05, 0.025):
        net_k, _, _ = _tanh()
        opt = AdaptedGD(net_k, lam=lam, lr=eta)
        for _ in range(round(s_end / eta)):
            opt.step(x, y)
        errors.append(float((_theta(net_k) - flow).norm() / (flow - th0).norm()))
    # global error of explicit Euler: c * eta + O(eta^2); the flow's own error (rtol 1e-11)
    # is far below the smallest Euler error (~1e-3 here)
    assert errors[-1] < 0.05
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(1.6 < r < 2.4 for r in ratios), (errors, ratios)


def test_certificate_lam0_linear_closed_form_and_tightness():
    # Euclidean flow on x = A theta: C(s) = 1/2 sum_i e^{-2 sigma_i^2 s} <u_i, r0>^2, and
    # mu = sigma_min(A)^2 for all s.  With r0 along u_min the bound is an equality.
    net, x, y = _linear()
    a = x.numpy()
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    th0 = _theta(net).numpy()
    for target_resid, tight in ((None, False), (u[:, -1], True)):
        if target_resid is not None:  # choose y so that r0 = A theta0 - y = u_min
            y = torch.from_numpy((a @ th0 - target_resid)[:, None])
        space = sr.ParameterSpace(net, x, y)
        traj = sr.gradient_flow(
            space, space.initial_point(), 1.0, rtol=1e-10, atol=1e-13, min_saves=20
        )
        cert = linear_convergence_certificate(traj)
        np.testing.assert_allclose(cert.mu, s[-1] ** 2, rtol=1e-10)  # sigma from SVD at each s
        assert cert.lam == 0.0 and cert.holds
        r0 = a @ th0 - y.numpy().ravel()
        closed = 0.5 * (np.exp(-2 * np.outer(cert.s, s**2)) * (u.T @ r0) ** 2).sum(1)
        # dopri5 at rtol 1e-10 over s <= 1: a relative error of a few 1e-9 in C
        np.testing.assert_allclose(cert.cost, closed, rtol=1e-7)
        if tight:
            np.testing.assert_allclose(cert.cost, cert.bound, rtol=1e-7)
        else:  # strictly below the bound once s > 0 (the other directions decay faster)
            assert np.all(cert.cost[1:] < 0.999 * cert.bound[1:])


def test_certificate_lam1_uniform_rate_and_apriori_stopping_time():
    net, x, y = _tanh(n=5, h=16)
    space = sr.ParameterSpace(net, x, y).equip_with_metric(sr.metrics.OutputPullbackMetric)
    th0 = space.initial_point()
    c0 = float(space.cost(th0))
    eps = 1e-3 * c0
    traj = sr.gradient_flow(space, th0, 4.0, rtol=1e-9, atol=1e-12, min_saves=100)
    cert = linear_convergence_certificate(traj, eps=eps)
    assert np.all(cert.mu == 1.0) and cert.holds
    # [Che23]: C(s) = e^{-2s} C(0) exactly (full rank): the bound is attained
    np.testing.assert_allclose(cert.cost, c0 * np.exp(-2 * cert.s), rtol=1e-7)
    t_eps = 0.5 * math.log(c0 / eps)
    assert cert.stopping_time == pytest.approx(t_eps)
    spacing = float(np.diff(cert.s).max())
    assert t_eps <= cert.measured_time <= t_eps + spacing


def test_discrete_lam1_apriori_steps_vs_measured():
    # linear model: C_k = (1 - eta)^{2k} C_0 exactly, so the predicted count is the measured one
    for eta in (0.3, 0.5, 0.9):
        net, x, y = _linear()
        opt = AdaptedGD(net, lam=1.0, lr=eta)
        c0 = opt.step(x, y)
        costs = [c0] + [opt.step(x, y) for _ in range(34)]  # costs[k]: after k steps
        eps = 3e-10 * c0  # away from the boundaries (1 - eta)^{2k} = eps / c0
        measured = next(i for i, c in enumerate(costs) if c <= eps)
        assert measured == apriori_steps(c0, eps, eta)


def test_certificate_from_an_adapted_training_run():
    # arrays form: s_k = k eta, the full-batch cost before each step, mu recorded by the step
    net, x, y = _tanh(n=6, h=24)
    opt = AdaptedGD(net, lam=0.5, lr=0.05, record_spectrum=True)
    costs, mus = [], []
    for _ in range(40):
        theta_before = _theta(net)
        costs.append(opt.step(x, y))
        mus.append(opt.last_step.groups[0]["mu"])
    # the recorded rate at the last point against numpy's SVD of the jacrev Jacobian there:
    # mu = min sigma^2 / (0.5 + 0.5 sigma^2); the Gram eigenvalues carry an error of
    # eps * sigma_max^2, so the relative error of mu is at most ~kappa^2 eps
    space = sr.ParameterSpace(net, x, y)
    d = space.jacobian(theta_before).numpy()
    sv = np.linalg.svd(d, compute_uv=False)
    ref = float(np.min(sv**2 / (0.5 + 0.5 * sv**2)))
    assert mus[-1] == pytest.approx(ref, rel=100 * (sv[0] / sv[-1]) ** 2 * 2.2e-16)
    assert adapted_rate(sv, 0.5, 6) == pytest.approx(ref, rel=1e-14)
    s = 0.05 * np.arange(40)
    cert = linear_convergence_certificate(s=s, cost=costs, mu=mus, lam=0.5)
    # small steps on a smooth problem: the discrete run obeys the flow's bound
    assert cert.holds and cert.worst_ratio <= 1.0
    assert 0 < min(mus) <= max(mus) < 2.0


def test_certificate_errors():
    with pytest.raises(ValueError, match="pass traj"):
        linear_convergence_certificate(s=[0.0], cost=[1.0])
    with pytest.raises(ValueError, match="same length"):
        linear_convergence_certificate(s=[0.0, 1.0], cost=[1.0], mu=[1.0])
    with pytest.raises(ValueError, match="lr"):
        apriori_steps(1.0, 1e-3, 2.5)
    assert adapted_rate([2.0, 1.0], 1.0, 3) == 0.0  # QN > rank: a kernel, no rate
    assert adapted_rate([2.0, 1e-9], 1.0, 2, tau=1e-6) == 0.0  # a cut direction
