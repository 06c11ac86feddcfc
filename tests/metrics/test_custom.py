"""Custom metrics (:mod:`subriemann.metrics.custom`, :class:`~subriemann.metrics.base.SumMetric`).

The three recipes of docs/metrics.md against dense references built with numpy
(:class:`tests.references.DenseMetricReference`): (a) a subclass that gives its
metric matrix, (b) an :class:`~subriemann.metrics.OutputMetric` from an output-space
metric, (c) sums and damping; and ``check`` finding broken custom metrics.
Tolerances as in ``tests/metrics/test_builtin.py`` (module docstring there).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import subriemann as sr
from subriemann.metrics import (
    BundleMetric,
    DampedMetric,
    EuclideanMetric,
    InterpolatedMetric,
    OutputMetric,
    OutputPullbackMetric,
    ParameterMetric,
    SumMetric,
)
from tests.cases import HYP, DiagonalPlusPullback, metric_cases
from tests.helpers import grad_np
from tests.references import EPS, RANK_RTOL, C, rel


@HYP
@given(case=metric_cases())
def test_recipe_a_subclass_with_metric_matrix(case):
    ref, th = case.ref, case.theta
    space = case.fresh().equip_with_metric(DiagonalPlusPullback)
    m = ref.D.T @ ref.D + np.diag(1.0 + th.numpy() ** 2)
    v = grad_np(space.metric, th)
    assert rel(v, np.linalg.solve(m, ref.D.T @ ref.g)) <= C * EPS * np.linalg.cond(m)
    a, b = torch.randn(2, ref.K, dtype=torch.float64)
    assert abs(
        float(space.metric.inner_product(a, b, th)) - a.numpy() @ m @ b.numpy()
    ) <= C * EPS * np.linalg.norm(m, 2) * float(a.norm() * b.norm())
    assert sr.check_gradient(space, th, rtol=1e-9).passed
    space.metric.check(th)


@HYP
@given(case=metric_cases())
def test_recipe_b_output_metric(case):
    """(b) D^T G D with a user G(x) (per-sample weights): gradient = pinv(D^T G D) D^T g."""
    ref, th = case.ref, case.theta
    q = case.space.num_outputs
    weights = torch.linspace(
        0.5, 2.0, case.space.num_samples, dtype=torch.float64
    ).repeat_interleave(q)
    space = case.fresh().equip_with_metric(
        OutputMetric, output_metric=lambda x: torch.diag(weights)
    )
    gm = ref.D.T @ np.diag(weights.numpy()) @ ref.D
    expected = np.linalg.pinv(gm, rcond=RANK_RTOL**2, hermitian=True) @ ref.D.T @ ref.g
    v = grad_np(space.metric, th)
    # cond(D^T G D) on its range <= 4 kappa^2; pinv of a Gram squares the conditioning
    tol = C * EPS * 4 * ref.kappa**2 * (2 + ref.kappa * ref.tan_theta())
    assert rel(v, expected) <= tol
    assert sr.check_gradient(space, th, rtol=ref.characterization_tol() * 4).passed
    # the identity G reproduces the output pullback (through the reduced Gram: kappa^2 again)
    plain = case.fresh().equip_with_metric(OutputMetric).metric
    assert rel(plain.gradient(th), ref.pullback()) <= tol


@HYP
@given(case=metric_cases(), mu=st.sampled_from([0.1, 1.0, 3.0]), c=st.sampled_from([0.5, 2.0]))
def test_recipe_c_sums_and_damping(case, mu, c):
    ref, th = case.ref, case.theta
    space = case.fresh()
    a = InterpolatedMetric(space, lam=0.3)
    b = OutputPullbackMetric(space)
    s = a + b
    assert isinstance(s, SumMetric)
    gm = ref.g_lam(0.3) + ref.D.T @ ref.D
    assert rel(s.metric_matrix(th), gm) <= C * EPS
    space.metric = s
    assert rel(s.gradient(th), np.linalg.solve(gm, ref.D.T @ ref.g)) <= C * EPS * np.linalg.cond(gm)
    assert sr.check_gradient(space, th, rtol=1e-9).passed
    # c * a: gradient scales by 1/c
    sc = c * a
    assert rel(sc.gradient(th), ref.interpolated(0.3) / c) <= ref.tol(0.3) + C * EPS
    ws = SumMetric(space, [a, b], weights=[c, 1.0])
    assert rel(ws.metric_matrix(th), c * ref.g_lam(0.3) + ref.D.T @ ref.D) <= C * EPS
    # damping: D^T D + mu 1 = (1 + mu) g_lam with lam = 1/(1 + mu)
    d = DampedMetric(space, OutputPullbackMetric(space), damping=mu)
    lam = 1.0 / (1.0 + mu)
    assert rel(d.metric_matrix(th), (1 + mu) * ref.g_lam(lam)) <= C * EPS
    assert rel(d.gradient(th), ref.interpolated(lam) / (1 + mu)) <= ref.tol(lam)
    generic = SumMetric(space, [OutputPullbackMetric(space), EuclideanMetric(space)], [1.0, mu])
    assert rel(d.gradient(th), generic.gradient(th)) <= 2 * ref.tol(lam)
    space.metric = d
    assert sr.check_gradient(space, th, rtol=1e-9).passed
    # the family identity for an interpolated base: g_0.3 + mu 1 = (1 + mu) g_{0.3/(1+mu)}
    d3 = DampedMetric(space, InterpolatedMetric(space, lam=0.3), damping=mu)
    assert rel(d3.metric_matrix(th), (1 + mu) * ref.g_lam(0.3 / (1 + mu))) <= C * EPS
    assert rel(d3.gradient(th), ref.interpolated(0.3 / (1 + mu)) / (1 + mu)) <= ref.tol(0.3)


class NotSymmetric(ParameterMetric):
    def metric_matrix(self, base_point):
        k = base_point.shape[-1]
        return torch.eye(k, dtype=base_point.dtype) + torch.triu(
            torch.ones(k, k, dtype=base_point.dtype), 1
        )


class Indefinite(ParameterMetric):
    def metric_matrix(self, base_point):
        k = base_point.shape[-1]
        return torch.diag(torch.linspace(-1.0, 1.0, k, dtype=base_point.dtype))


class ClaimsTooMuch(ParameterMetric):
    """PSD with a null direction, but claims all of R^K as its distribution."""

    def metric_matrix(self, base_point):
        k = base_point.shape[-1]
        return torch.diag(torch.linspace(0.0, 1.0, k, dtype=base_point.dtype))

    def distribution(self, base_point):
        return torch.eye(base_point.shape[-1], dtype=base_point.dtype)


class Inconsistent(ParameterMetric):
    def metric_matrix(self, base_point):
        return torch.eye(base_point.shape[-1], dtype=base_point.dtype)

    def inner_product(self, tangent_vec_a, tangent_vec_b, base_point):
        return 2.0 * (tangent_vec_a * tangent_vec_b).sum(-1)


def test_custom_metric_check_detects_problems(small_case):
    th = small_case.theta
    with pytest.raises(ValueError, match="not symmetric"):
        small_case.metric(NotSymmetric).check(th)
    with pytest.raises(ValueError, match="not positive semidefinite"):
        small_case.metric(Indefinite).check(th)
    with pytest.raises(ValueError, match="not positive definite on its distribution"):
        small_case.metric(ClaimsTooMuch).check(th)
    with pytest.raises(ValueError, match="inner_product disagrees with metric_matrix"):
        small_case.metric(Inconsistent).check(th)
    small_case.metric(DiagonalPlusPullback).check(th)  # a good one passes
    small_case.metric(BundleMetric, lam=0.5).check(th)
