"""Cross-entropy geometry (issue 6; docs/theory.md §6 and §8 item 7).

The flows run on random small MLP classifiers with smoothed labels, in float64,
overparametrized (K ≥ QN) and of full rank QN along the orbit.  Every reference
is computed outside :mod:`subriemann.analysis.cross_entropy`: the final outputs
by calling the model directly (:func:`tests.references.reference_outputs`), the
sums, the limit, the softmax, the rate and the entropy with numpy, and the
Fisher gradient with ``numpy.linalg.pinv`` of the dense :math:`D^\\top G D`
(:math:`D` from ``torch.func.jacrev``).

Tolerances: the adapted flows run at ``rtol=1e-11, atol=1e-12``; the
hyperplane sums are then constant to 1e-12–1e-13 (asserted: 1e-10), and the
flows run until :math:`e^{-\\mu s}|x(0) - x^*|` is about 1e-9 (asserted:
:math:`|x(s) - x^*| \\le` 1e-8).  The two label sets are smoothed one-hot
labels, whose slowest mode :math:`\\mu` is separated from the next rate by a
factor ≥ 1.5, so a fit over the linear regime isolates it (2%).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import subriemann as sr
from subriemann.analysis import cross_entropy as ce
from subriemann.app.datasets import load_digits_problem
from subriemann.metrics import EuclideanMetric, InterpolatedMetric, SoftmaxFisherMetric
from tests.cases import make_mlp
from tests.references import reference_jacobian, reference_outputs

TIGHT = dict(rtol=1e-11, atol=1e-12)


# -- independent numpy references -----------------------------------------------------------
def np_softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def np_limit(x0: np.ndarray, y: np.ndarray) -> np.ndarray:
    q = y.shape[1]
    c = x0.sum(axis=1, keepdims=True)
    ly = np.log(y)
    return ly + (c - ly.sum(axis=1, keepdims=True)) / q


def np_mu(y: np.ndarray) -> float:
    """Smallest eigenvalue of diag y - y y^T on the complement of 1, per sample (QR basis)."""
    q = y.shape[1]
    basis = np.linalg.qr(np.concatenate([np.ones((q, 1)), np.eye(q)[:, : q - 1]], axis=1))[0]
    b = basis[:, 1:]  # orthonormal basis of 1^perp
    return min(
        float(np.linalg.eigvalsh(b.T @ (np.diag(row) - np.outer(row, row)) @ b).min())
        for row in y
    )


def np_ce(x: np.ndarray, y: np.ndarray) -> float:
    z = x - x.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-(y * logp).sum())


def one_hot(labels: list[int], q: int) -> torch.Tensor:
    return nn.functional.one_hot(torch.tensor(labels), q).to(torch.float64)


# -- the flows ------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor  # [N, Q] float64, smoothed
    space: sr.ParameterSpace
    traj: sr.Trajectory


def _inputs(n: int, m: int, seed: int) -> torch.Tensor:
    return torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CASES = {
    # Q = 2, tanh: mu = 2 * 0.6 * 0.4 = 0.48 for every sample
    "q2_tanh": dict(widths=(3, 10, 2), act="tanh", n=6, eps=0.8, s_end=45.0, seed=0),
    # Q = 3, softplus: smoothed one-hot with eps = 0.75 -> y = (0.5, 0.25, 0.25), mu = 0.25,
    # next rate 0.375
    "q3_softplus": dict(widths=(3, 8, 3), act="softplus", n=4, eps=0.75, s_end=85.0, seed=1),
}


def build_case(name: str) -> Case:
    c = CASES[name]
    q = c["widths"][-1]
    model = make_mlp(c["widths"], c["act"], seed=c["seed"])
    x = _inputs(c["n"], c["widths"][0], seed=10 + c["seed"])
    y = ce.smooth_labels(one_hot([j % q for j in range(c["n"])], q), c["eps"])
    space = sr.ParameterSpace(model, x, y, loss="cross_entropy")
    space.equip_with_metric(InterpolatedMetric, lam=1.0)
    assert space.dim >= space.output_dim
    traj = sr.gradient_flow(space, space.initial_point(), s_end=c["s_end"], **TIGHT)
    return Case(name, model, x, y, space, traj)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request) -> Case:
    return build_case(request.param)


# -- §8 item 7: hyperplanes, limit, rate ------------------------------------------------------
def test_adapted_flow_keeps_every_hyperplane(case: Case):
    traj = case.traj
    assert traj.status.successful, traj.status
    n, q = case.targets.shape
    assert int(traj.rank.min()) == n * q  # full rank along the orbit
    hs = ce.hyperplane_sums(traj)
    assert hs.adapted and hs.full_rank
    assert hs.sums.shape == (len(traj), n)
    assert hs.max_drift < 1e-10
    assert hs.total_drift < 1e-10
    # independently: sums of the model's own outputs at the start and the end
    x0 = reference_outputs(case.model, case.inputs, traj.theta[0]).numpy().reshape(n, q)
    x1 = reference_outputs(case.model, case.inputs, traj.theta[-1]).numpy().reshape(n, q)
    assert np.abs(x1.sum(axis=1) - x0.sum(axis=1)).max() < 1e-10
    sums = traj.outputs.numpy().reshape(len(traj), n, q).sum(axis=2)
    assert np.abs(sums - sums[0]).max() == pytest.approx(hs.max_drift, abs=1e-15)


def test_adapted_flow_converges_to_the_predicted_limit(case: Case):
    traj = case.traj
    n, q = case.targets.shape
    y = case.targets.numpy()
    x0 = reference_outputs(case.model, case.inputs, traj.theta[0]).numpy().reshape(n, q)
    x1 = reference_outputs(case.model, case.inputs, traj.theta[-1]).numpy().reshape(n, q)
    star = np_limit(x0, y)
    le = ce.limit_error(traj)
    assert le.finite and le.limit.limit is not None
    np.testing.assert_allclose(le.limit.limit.numpy(), star, rtol=0, atol=1e-12)
    assert float(le.distance[0]) > 0.5  # a real distance to cover
    assert le.final is not None and le.final < 1e-8
    assert np.linalg.norm(x1 - star) < 1e-8  # independent
    assert float(le.minimizer_distance[-1]) < 1e-8
    np.testing.assert_allclose(np_softmax(x1), y, rtol=0, atol=1e-8)
    assert traj.final_cost == pytest.approx(ce.minimum_cost(case.targets), rel=1e-13)
    # the distance decreases monotonically (a contraction on each hyperplane)
    assert bool((le.distance[1:] <= le.distance[:-1] * (1 + 1e-9) + 1e-13).all())


def test_fitted_rate_is_mu(case: Case):
    mu = ce.asymptotic_rate(case.targets)
    assert mu == pytest.approx(np_mu(case.targets.numpy()), rel=1e-12)
    fit = ce.fitted_rate(case.traj)
    assert fit.quantity == "distance" and fit.expected == mu and fit.mu == mu
    assert fit.points >= 10
    assert fit.relative_error < 0.02, str(fit)
    # C - C* decays at twice the rate
    fit_c = ce.fitted_rate(case.traj, quantity="cost")
    assert fit_c.expected == pytest.approx(2 * mu)
    assert fit_c.relative_error < 0.02, str(fit_c)


# -- negative controls ------------------------------------------------------------------------
def test_standard_flow_moves_the_hyperplanes():
    c = CASES["q2_tanh"]
    model = make_mlp(c["widths"], c["act"], seed=c["seed"])
    x = _inputs(c["n"], c["widths"][0], seed=10 + c["seed"])
    y = ce.smooth_labels(one_hot([j % 2 for j in range(c["n"])], 2), c["eps"])
    space = sr.ParameterSpace(model, x, y, loss="cross_entropy")
    space.equip_with_metric(EuclideanMetric)
    traj = sr.gradient_flow(space, space.initial_point(), s_end=3.0, rtol=1e-9, atol=1e-11)
    hs = ce.hyperplane_sums(traj)
    assert not hs.adapted
    assert hs.max_drift > 1e-2  # clearly nonzero (measured: 0.065; lambda = 1: 6e-14)
    # the cost falls, but towards a minimizer on other hyperplanes
    assert traj.final_cost < float(traj.cost[0])
    le = ce.limit_error(traj)
    assert le.final is not None and le.final > 1e-2
    with pytest.raises(ValueError, match="run the flow longer"):
        ce.fitted_rate(traj)


def _one_hidden_unit_space(bias: bool) -> sr.ParameterSpace:
    """A tanh MLP 3 -> 1 -> 3 on N = 8 samples: K = 10 (7 without the last bias) < QN = 24.

    Too few hidden features: rank D = K < QN, constant along the short flow below
    (sigma_min / sigma_max stays above 4e-2, far above the threshold 1e-6).
    """
    n, q = 8, 3
    model = make_mlp((3, 1, q), "tanh", seed=0)
    if not bias:
        last = nn.Linear(1, q, bias=False)
        with torch.no_grad():
            last.weight.copy_(model[2].weight)
        model[2] = last
    x = _inputs(n, 3, seed=20)
    y = ce.smooth_labels(one_hot([j % q for j in range(n)], q), 0.3)
    return sr.ParameterSpace(model, x, y, loss="cross_entropy")


def test_rank_loss_with_last_layer_bias_keeps_only_the_total():
    """With a last-layer bias, b -> (b, ..., b) puts 1_{QN} in ran D, so P1 = 1 and
    d/ds <1, x> = -<1, P grad_x C> = -<P1, grad_x C> = -<1, grad_x C> = 0 at any rank.
    The per-sample indicators 1_j are not in ran D here, so the per-sample sums move."""
    space = _one_hidden_unit_space(bias=True)
    space.equip_with_metric(InterpolatedMetric, lam=1.0)
    theta0 = space.initial_point()
    d = reference_jacobian(space.module, space.inputs, theta0)
    ones = torch.ones(space.output_dim, dtype=torch.float64)

    def range_residual(v: torch.Tensor) -> float:
        coef = torch.linalg.lstsq(d, v.unsqueeze(1)).solution
        return float((d @ coef).squeeze(1).sub(v).norm())

    assert range_residual(ones) < 1e-12  # 1_{QN} in ran D
    first = torch.zeros(space.output_dim, dtype=torch.float64)
    first[:3] = 1.0
    assert range_residual(first) > 0.1  # 1_1 is not
    traj = sr.gradient_flow(space, theta0, s_end=2.0, **TIGHT)
    assert traj.status.code == "s_end_reached", traj.status
    assert space.dim == 10 < space.output_dim
    assert int(traj.rank.min()) == int(traj.rank.max()) == 10  # rank loss, constant
    hs = ce.hyperplane_sums(traj)
    assert hs.adapted and not hs.full_rank
    assert hs.max_drift > 0.1  # per-sample sums move (measured: 0.30)
    assert hs.total_drift < 1e-10  # the total does not (measured: 8e-13)
    # no convergence to x*: C stays far above C* = sum_j H(y_j)
    le = ce.limit_error(traj)
    assert le.final is not None and le.final > 1.0
    assert traj.final_cost - ce.minimum_cost(space.targets) > 1.0


def test_rank_loss_without_last_layer_bias_moves_the_total_too():
    space = _one_hidden_unit_space(bias=False)
    space.equip_with_metric(InterpolatedMetric, lam=1.0)
    traj = sr.gradient_flow(space, space.initial_point(), s_end=1.0, **TIGHT)
    assert int(traj.rank.min()) == space.dim < space.output_dim
    hs = ce.hyperplane_sums(traj)
    assert hs.total_drift > 1e-2  # measured: 0.53


def test_trained_last_layer_keeps_every_sum_at_any_rank():
    """A model linear in its parameters with shared features, x_j = W phi_j + b, has
    ran D = S (x) R^Q (S = span of the feature columns in R^N), so P = Pi_S (x) 1_Q commutes
    with summing each sample's logits: every <1, x_j> is kept even though rank D < QN."""
    n, q = 8, 3
    gen = torch.Generator().manual_seed(7)
    lin = nn.Linear(2, q, dtype=torch.float64)
    u = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    y = ce.smooth_labels(one_hot([j % q for j in range(n)], q), 0.3)
    space = sr.ParameterSpace(lin, u, y, loss="cross_entropy")
    space.equip_with_metric(InterpolatedMetric, lam=1.0)
    traj = sr.gradient_flow(space, space.initial_point(), s_end=5.0, **TIGHT)
    assert int(traj.rank.max()) == 9 < space.output_dim
    hs = ce.hyperplane_sums(traj)
    assert hs.max_drift < 1e-10
    assert traj.final_cost - ce.minimum_cost(y) > 1e-2  # and still no convergence to x*


# -- one-hot labels: no finite limit ----------------------------------------------------------
def test_one_hot_labels_report_no_finite_limit():
    y = one_hot([0, 2, 1, 2], 3)
    x0 = _inputs(4, 3, seed=3)
    lim = ce.predicted_limit(x0, y)
    assert lim.finite is False and lim.limit is None
    assert "no finite limit" in lim.message and "no finite limit" in str(lim)
    assert lim.diverging.tolist() == [True] * 4
    assert lim.minimum_cost == 0.0
    d = lim.divergence_direction
    assert d is not None and bool(torch.isfinite(d).all())
    # independent: (1_S/|S| - 1/Q) normalized, with S the support of y_j
    for j, row in enumerate(y.numpy()):
        s = row > 0
        u = s / s.sum() - 1.0 / 3
        np.testing.assert_allclose(d[j].numpy(), u / np.linalg.norm(u), atol=1e-15)
    np.testing.assert_allclose(d.sum(dim=1).numpy(), 0.0, atol=1e-15)  # on the hyperplane
    np.testing.assert_allclose(d.norm(dim=1).numpy(), 1.0, atol=1e-15)
    with pytest.raises(ce.NoFiniteLimitError, match="no finite limit") as info:
        lim.require()
    assert info.value.limit is lim
    assert ce.asymptotic_rate(y) == 0.0
    assert ce.minimum_cost(y) == 0.0


def test_one_hot_flow_diverges_along_the_reported_direction():
    model = make_mlp((3, 10, 2), "tanh", seed=0)
    x = _inputs(6, 3, seed=10)
    y = one_hot([j % 2 for j in range(6)], 2)
    space = sr.ParameterSpace(model, x, y, loss="cross_entropy")
    space.equip_with_metric(InterpolatedMetric, lam=1.0)
    traj = sr.gradient_flow(space, space.initial_point(), s_end=4.0, **TIGHT)
    assert traj.status.successful and int(traj.rank.min()) == space.output_dim
    le = ce.limit_error(traj)
    assert not le.finite and le.distance is None and le.final is None
    assert "no finite limit" in le.message
    coord = le.divergence_coordinate
    assert coord is not None and bool(torch.isfinite(coord).all())
    assert bool((coord[1:] > coord[:-1]).all())  # strictly increasing
    # the sums are still conserved (the hyperplanes exist, the minimizer does not)
    assert ce.hyperplane_sums(traj).max_drift < 1e-10
    with pytest.raises(ce.NoFiniteLimitError, match="smooth_labels"):
        ce.fitted_rate(traj)


def test_mixed_labels_flag_only_the_diverging_samples():
    y = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    lim = ce.predicted_limit(torch.zeros(3, 3), y)
    assert not lim.finite and lim.limit is None
    assert lim.diverging.tolist() == [False, True, True]
    d = lim.divergence_direction
    assert d is not None
    assert d[0].abs().max() == 0.0
    np.testing.assert_allclose(d[2].numpy(), np.array([1, 1, -2]) / math.sqrt(6), atol=1e-15)
    assert ce.minimum_cost(y) == pytest.approx(
        -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5)) + math.log(2), rel=1e-14
    )


# -- the prediction itself ------------------------------------------------------------------------
def test_predicted_limit_is_the_minimizer_on_each_hyperplane():
    rng = np.random.default_rng(0)
    n, q = 5, 4
    y = rng.dirichlet(np.ones(q), size=n)
    x0 = rng.normal(size=(n, q)) * 3
    lim = ce.predicted_limit(torch.from_numpy(x0.reshape(-1)), torch.from_numpy(y))  # flat x0
    assert lim.finite and lim.divergence_direction is None
    star = lim.limit.numpy()
    np.testing.assert_allclose(np_softmax(star), y, rtol=1e-13, atol=0)
    np.testing.assert_allclose(star.sum(axis=1), x0.sum(axis=1), atol=1e-12)
    np.testing.assert_allclose(lim.offsets.numpy(), x0.sum(axis=1), atol=1e-12)
    np.testing.assert_allclose(star, np_limit(x0, y), atol=1e-12)
    # strictly minimal on the product of hyperplanes: moving within 1^perp raises C
    c_star = np_ce(star, y)
    entropy = float(-(y * np.log(y)).sum())
    assert c_star == pytest.approx(entropy, rel=1e-13)
    assert ce.minimum_cost(torch.from_numpy(y)) == pytest.approx(entropy, rel=1e-14)
    for _ in range(20):
        v = rng.normal(size=(n, q))
        v -= v.mean(axis=1, keepdims=True)
        for t in (1e-3, 0.1, 2.0):
            assert np_ce(star + t * v, y) > c_star
    # and C is constant along the direction 1 (Lemma 2.6)
    assert np_ce(star + 5.0, y) == pytest.approx(c_star, rel=1e-13)


@pytest.mark.parametrize("q", [2, 3, 5])
def test_asymptotic_rate_closed_forms(q: int):
    rng = np.random.default_rng(q)
    y = rng.dirichlet(np.ones(q), size=6)
    assert ce.asymptotic_rate(torch.from_numpy(y)) == pytest.approx(np_mu(y), rel=1e-12)
    assert ce.asymptotic_rate(torch.from_numpy(y)) <= 1.0 / q + 1e-15
    uniform = torch.full((2, q), 1.0 / q, dtype=torch.float64)
    assert ce.asymptotic_rate(uniform) == pytest.approx(1.0 / q, rel=1e-12)
    eps = 0.3
    smooth = ce.smooth_labels(one_hot(list(range(q)), q), eps)
    expected = 2 * (1 - eps / 2) * (eps / 2) if q == 2 else eps / q
    assert ce.asymptotic_rate(smooth) == pytest.approx(expected, rel=1e-12)


def test_smooth_labels():
    y = one_hot([0, 2, 1], 3)
    s = ce.smooth_labels(y, 0.3)
    np.testing.assert_allclose(s.numpy(), 0.7 * y.numpy() + 0.1, atol=1e-16)
    np.testing.assert_allclose(s.sum(dim=1).numpy(), 1.0, atol=1e-15)
    assert s.dtype == torch.float64
    assert ce.smooth_labels(y.float(), 0.3).dtype == torch.float32
    assert torch.equal(ce.smooth_labels(y, 0.0), y)
    assert ce.smooth_labels(np.eye(3), 0.5).shape == (3, 3)  # numpy input


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ce.smooth_labels(one_hot([0, 1], 2), 1.0), r"eps must lie in \[0, 1\)"),
        (lambda: ce.smooth_labels(one_hot([0, 1], 2), -0.1), r"eps must lie in \[0, 1\)"),
        (lambda: ce.smooth_labels(one_hot([0, 1], 2), float("nan")), r"eps must lie in"),
        (lambda: ce.smooth_labels(torch.tensor([[0.6, 0.6]]), 0.1), "simplex"),
        (lambda: ce.smooth_labels(torch.tensor([[1.2, -0.2]]), 0.1), "negative"),
        (lambda: ce.smooth_labels(torch.tensor([0.5, 0.5]), 0.1), r"shape \(N, Q\)"),
        (lambda: ce.predicted_limit(torch.zeros(2, 2), torch.tensor([[0.7, 0.7]])), "simplex"),
        (lambda: ce.predicted_limit(torch.zeros(3, 2), torch.tensor([[0.5, 0.5]])), "shape"),
        (
            lambda: ce.predicted_limit(torch.tensor([[0.0, math.inf]]), torch.tensor([[0.5, 0.5]])),
            "NaN or inf",
        ),
        (lambda: ce.asymptotic_rate(torch.tensor([[0.5, 0.4]])), "simplex"),
        (lambda: ce.minimum_cost(torch.tensor([[1.0]])), "at least 2 classes"),
        (lambda: load_digits_problem(10, 10, classes=(1, 1)), "distinct digits"),
        (lambda: load_digits_problem(2, 10, classes=(0, 1, 2)), "n_train"),
        (lambda: load_digits_problem(10, 10, eps=1.5), r"eps must lie in \[0, 1\)"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_trajectory_checks():
    model = make_mlp((2, 4, 1), "tanh", seed=0)
    space = sr.ParameterSpace(model, _inputs(3, 2, 0), _inputs(3, 1, 1))  # MSE
    traj = sr.gradient_flow(space, space.initial_point(), s_end=0.1)
    for fn in (ce.hyperplane_sums, ce.limit_error, ce.fitted_rate):
        with pytest.raises(ValueError, match="cross-entropy"):
            fn(traj)
    with pytest.raises(TypeError, match="Trajectory"):
        ce.hyperplane_sums("not a trajectory")  # type: ignore[arg-type]


# -- the softmax Fisher metric: natural gradient ------------------------------------------------
def _fisher_space() -> sr.ParameterSpace:
    model = make_mlp((3, 10, 3), "tanh", seed=6)
    y = ce.smooth_labels(one_hot([j % 3 for j in range(5)], 3), 0.5)
    space = sr.ParameterSpace(model, _inputs(5, 3, seed=8), y, loss="cross_entropy")
    space.equip_with_metric(SoftmaxFisherMetric)
    return space


def test_softmax_fisher_gradient_is_the_dense_pseudoinverse():
    space = _fisher_space()
    theta = space.initial_point() + 0.1 * _inputs(1, space.dim, seed=9)[0]
    n, q = space.num_samples, space.num_outputs
    d = reference_jacobian(space.module, space.inputs, theta).numpy()
    x = reference_outputs(space.module, space.inputs, theta).numpy().reshape(n, q)
    p = np_softmax(x)
    g = np.zeros((n * q, n * q))
    for j in range(n):
        g[j * q : (j + 1) * q, j * q : (j + 1) * q] = np.diag(p[j]) - np.outer(p[j], p[j])
    fisher = d.T @ g @ d
    grad_x = (p - space.targets.numpy()).reshape(-1)
    ref = np.linalg.pinv(fisher, rcond=1e-10, hermitian=True) @ (d.T @ grad_x)
    got = space.metric.gradient(theta).numpy()
    assert np.linalg.matrix_rank(fisher, rtol=1e-10, hermitian=True) == n * (q - 1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-8 * np.linalg.norm(ref))
    check = sr.check_gradient(space, theta)
    assert check.passed, str(check)
    assert check.distribution_dim == n * (q - 1)


def test_natural_gradient_flow_is_a_straight_line_in_probabilities():
    """With rank D = QN, D F^+ D^T g = G^+ g + (per-sample constants), so
    d sigma_j/ds = H_j d x_j/ds = -(sigma_j - y_j): sigma_j(s) = y_j + e^{-s}(sigma_j(0) - y_j).
    The logit sums are not kept (the min-norm step picks the constants)."""
    space = _fisher_space()
    traj = sr.gradient_flow(space, space.initial_point(), s_end=2.0, rtol=1e-10, atol=1e-12)
    assert traj.status.successful and int(traj.rank.min()) == space.output_dim
    n, q = space.num_samples, space.num_outputs
    y = space.targets.numpy()
    p = np_softmax(traj.outputs.numpy().reshape(len(traj), n, q))
    pred = y + np.exp(-traj.s.numpy())[:, None, None] * (p[0] - y)
    assert np.abs(p - pred).max() < 1e-9
    assert ce.hyperplane_sums(traj).max_drift > 1e-3


# -- the data set ---------------------------------------------------------------------------
def test_load_digits_problem():
    pytest.importorskip("sklearn")
    prob = load_digits_problem(30, 60, classes=(3, 5, 8), eps=0.2, seed=1)
    assert prob.num_classes == 3 and prob.classes == (3, 5, 8)
    assert prob.x_train.shape == (30, 64) and prob.x_test.shape == (60, 64)
    assert prob.x_train.dtype == torch.float64
    assert prob.y_train.shape == (30, 3) and prob.y_test.shape == (60, 3)
    assert torch.bincount(prob.labels_train, minlength=3).tolist() == [10, 10, 10]  # stratified
    np.testing.assert_allclose(prob.x_train.mean(dim=0).numpy(), 0.0, atol=1e-12)
    std = prob.x_train.std(dim=0, unbiased=False).numpy()
    assert np.all((np.abs(std - 1) < 1e-12) | (std < 1e-12))
    expected = ce.smooth_labels(one_hot(prob.labels_train.tolist(), 3), 0.2)
    assert torch.allclose(prob.y_train, expected, atol=1e-15)
    assert ce.predicted_limit(torch.zeros(30, 3), prob.y_train).finite
    again = load_digits_problem(30, 60, classes=(3, 5, 8), eps=0.2, seed=1)
    assert torch.equal(again.x_train, prob.x_train)  # deterministic


def test_load_digits_problem_without_scikit_learn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install subriemann\[data\]"):
        load_digits_problem(10, 10)
