"""subriemann's metrics against geomstats' own machinery (issue 3).

* ``OutputPullbackMetric.metric_matrix`` against geomstats' ``PullbackMetric``
  on an ``ImmersedSet`` whose immersion is :math:`\\theta \\mapsto x[\\theta]`;
* ``BundleMetric.to_geomstats()`` running geomstats' sub-Riemannian
  Hamiltonian integration (``symp_euler`` + ``iterate``, ``exp``).

geomstats' pytorch backend builds its constants with torch's default dtype,
so every call into geomstats runs inside
``subriemann._geomstats.default_dtype(torch.float64)``.
"""

from __future__ import annotations

import numpy as np
import torch
from geomstats.geometry.base import ImmersedSet  # noqa: E402  (after subriemann)
from geomstats.geometry.euclidean import Euclidean  # noqa: E402
from geomstats.geometry.pullback_metric import PullbackMetric  # noqa: E402
from torch.func import jacrev

import subriemann as sr  # noqa: F401  (selects geomstats' pytorch backend)
from subriemann._geomstats import default_dtype
from subriemann.metrics import BundleMetric, OutputPullbackMetric
from tests.cases import rank_deficient_case, tanh_case
from tests.references import EPS, DenseMetricReference, rel


class NetworkImmersion(ImmersedSet):
    """Parameter space immersed in output space by theta -> x[theta] (independent outputs)."""

    def __init__(self, ref: DenseMetricReference) -> None:
        self._ref = ref
        super().__init__(dim=ref.K, equip=False)

    def _define_embedding_space(self):
        return Euclidean(self._ref.QN)

    def immersion(self, point):
        if point.ndim == 1:
            return self._ref.outputs(point)
        return torch.stack([self._ref.outputs(p) for p in point])


def test_output_pullback_matches_geomstats_pullback_metric():
    case = tanh_case((1, 2, 1), n=10, seed=0)  # K = 7 < QN = 10: D^T D is a Riemannian metric
    ref, th = case.ref, case.theta
    assert ref.K < ref.QN and ref.r == ref.K
    ours = case.metric(OutputPullbackMetric)
    with default_dtype(torch.float64):
        immersed = NetworkImmersion(ref)
        immersed.equip_with_metric(PullbackMetric)
        theirs = immersed.metric.metric_matrix(th)
        a, b = torch.randn(2, ref.K, dtype=torch.float64)
        ip_theirs = immersed.metric.inner_product(a, b, th)
        chris_theirs = immersed.metric.christoffels(th)
    # D^T D from two autodiff routes: rounding of a K x K product of entries O(|D|^2)
    scale = ref.s[0] ** 2
    assert float((ours.metric_matrix(th) - theirs).abs().max()) <= 100 * EPS * scale
    assert abs(float(ours.inner_product(a, b, th) - ip_theirs)) <= 100 * EPS * scale * float(
        a.norm() * b.norm()
    )
    # geomstats' Christoffels (autodiff of its metric matrix, Koszul formula) against ours
    # (Gamma^k_ij = (D^+)_{ka} d_i d_j x_a): error eps * kappa(D^T D) relative
    assert rel(ours.christoffels(th), chris_theirs) <= 100 * EPS * ref.kappa**2


def _bundle_setup(lam: float):
    case = tanh_case((2, 6, 1), n=3, seed=1)  # K = 25 > QN = 3: sub-Riemannian
    metric = case.metric(BundleMetric, lam=lam, exp_steps=10)
    th = case.theta
    gen = torch.Generator().manual_seed(2)
    xi = torch.randn(case.ref.K, generator=gen, dtype=torch.float64)
    v = metric.sharp(xi, th)
    v = 0.5 * v / metric.inner_product(v, v, th).sqrt()  # H(theta, p) = |v|_g^2 / 2 = 1/8
    p = metric.metric_vec(v, th)
    return case, metric, v, p


def test_bundle_hamiltonian_and_sharp_against_reference():
    for lam in (0.5, 1.0):
        case, metric, v, p = _bundle_setup(lam)
        ref, th = case.ref, case.theta
        exported = metric.to_geomstats()
        assert exported.rank == ref.r == ref.QN
        with default_dtype(torch.float64):
            h = float(exported.hamiltonian(torch.stack([th, p])))
            dq = exported.sr_sharp(th, p)
            frame = exported.frame(th)
        assert abs(h - ref.bundle_hamiltonian(th, p, lam, ref.r)) <= 1e3 * EPS
        assert abs(h - 0.125) <= 1e3 * EPS
        assert (
            rel(dq, v) <= 1e3 * EPS * ref.kappa**2
        )  # sharp(flat(v)) = v for v in the distribution
        # the frame is g_lam-orthonormal and spans ran D^T
        gram = frame.T @ torch.as_tensor(ref.g_lam(lam)) @ frame
        assert (
            float((gram - torch.eye(ref.r, dtype=torch.float64)).abs().max())
            <= 1e3 * EPS * ref.kappa**2
        )
        # dH/dtheta by autodiff (spectral-function backward) against central differences
        q = th.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(metric.hamiltonian(q, p, ref.r), q)
        step = 1e-5
        fd = np.array(
            [
                (
                    ref.bundle_hamiltonian(th + step * e, p, lam, ref.r)
                    - ref.bundle_hamiltonian(th - step * e, p, lam, ref.r)
                )
                / (2 * step)
                for e in torch.eye(ref.K, dtype=torch.float64)
            ]
        )
        # central differences: truncation O(step^2 |H'''|), rounding O(eps |H| / step)
        assert rel(grad, fd) <= 1e-6


def test_bundle_hamiltonian_gradient_under_rank_loss():
    """Rank-deficient D (repeated zero singular values): the Hamiltonian stays differentiable."""
    case = rank_deficient_case(5, critical=False)
    ref, th = case.ref, case.theta
    metric = case.metric(BundleMetric, lam=1.0)
    p = torch.as_tensor(np.random.default_rng(0).standard_normal(ref.K))
    q = th.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(metric.hamiltonian(q, p, ref.r), q)
    assert torch.isfinite(grad).all()
    step = 1e-5
    fd = np.array(
        [
            (
                ref.bundle_hamiltonian(th + step * e, p, 1.0, ref.r)
                - ref.bundle_hamiltonian(th - step * e, p, 1.0, ref.r)
            )
            / (2 * step)
            for e in torch.eye(ref.K, dtype=torch.float64)
        ]
    )
    assert rel(grad, fd) <= 1e-5


def test_bundle_to_geomstats_symplectic_euler():
    """geomstats' symp_euler + iterate: H conserved to first order, velocity in the distribution."""
    for lam in (0.5, 1.0):
        case, metric, v, p = _bundle_setup(lam)
        ref, th = case.ref, case.theta
        exported = metric.to_geomstats()
        drifts = []
        for n in (20, 40):
            with default_dtype(torch.float64):
                traj = exported.iterate(exported.symp_euler(exported.hamiltonian, 1.0 / n), n)(
                    torch.stack([th, p])
                )
                energies = torch.stack([exported.hamiltonian(s) for s in traj])
            drifts.append(float((energies - energies[0]).abs().max()))
            # each step moves along sr_sharp(q_k, p_k), which must lie in ran D(q_k)^T
            for k in (0, n // 2, n - 1):
                q0, q1 = traj[k, 0], traj[k + 1, 0]
                dq = (q1 - q0) * n
                d = jacrev(ref.outputs)(q0).detach().numpy()
                _, s, vt = np.linalg.svd(d, full_matrices=False)
                vr = vt[s > 1e-6 * s[0]].T
                off = dq.numpy() - vr @ (vr.T @ dq.numpy())
                assert np.linalg.norm(off) <= 1e3 * EPS * np.linalg.norm(dq.numpy())
        # symplectic Euler: the energy error is O(h) (bounded, first order): halving h halves it
        assert drifts[1] <= 0.03 * 0.125
        assert 1.4 <= drifts[0] / drifts[1] <= 2.8


def test_bundle_exp_against_geomstats_exp():
    """BundleMetric.exp (RK4 on Hamilton's equations) and geomstats' exp (symplectic Euler)."""
    case, metric, v, p = _bundle_setup(0.5)
    th = case.theta
    ours = metric.exp(v, th)
    exported = metric.to_geomstats()
    errs = []
    for n in (10, 20):
        with default_dtype(torch.float64):
            theirs = exported.exp(p, th, n_steps=n)
        errs.append(float((theirs - ours).norm()))
    # geomstats' integrator is first order: the distance to ours halves with the step
    assert errs[1] <= 0.05 * float(v.norm())
    assert 1.4 <= errs[0] / errs[1] <= 2.8
    # the end point is reached horizontally: a geodesic of length |v|_g = 1/2 moves theta
    assert 0.1 * float(v.norm()) <= float((ours - th).norm()) <= 2 * float(v.norm())
