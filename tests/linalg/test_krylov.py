"""Linear algebra at one point (:mod:`subriemann.linalg.dense`) against numpy.

* :func:`~subriemann.linalg.cg` on small SPD systems with a prescribed spectrum
  against ``numpy.linalg.solve``; :func:`~subriemann.linalg.lsmr` on
  least-squares problems (rank-deficient, damped) against ``numpy.linalg.pinv`` and
  the damped normal equations solved densely; :func:`~subriemann.linalg.check_converged`;
* :func:`~subriemann.linalg.r_svd` (QR first for long matrices) against numpy's SVD;
* :func:`~subriemann.linalg.prefill_states` against single points.

Tolerances come from the perturbation bounds of the problems, whose condition
numbers are prescribed: a solution with relative residual ``r`` of a system of
condition ``κ`` has relative forward error at most ``κ·r`` (SPD), and a
least-squares solution with backward error ``r`` at most ``κ·r + κ²·tanθ·r``
(Wedin; ``tanθ = |b - Ax*|/|Ax*|``), each times a safety factor 10 and plus
numpy's own error ``κ·eps``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import subriemann as sr
from subriemann.linalg import (
    ConvergenceWarning,
    RankThresholdWarning,
    SolverInfo,
    cg,
    check_converged,
    lsmr,
    prefill_states,
    r_svd,
)
from tests.cases import dead_units_space
from tests.references import EPS

F64 = torch.float64


def _orthogonal(n: int, m: int, rng: np.random.Generator) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, m)))[0]


def _spd(n: int, kappa: float, seed: int = 0) -> np.ndarray:
    """An SPD matrix with eigenvalues log-spaced in [1/kappa, 1] (condition exactly kappa)."""
    rng = np.random.default_rng(seed)
    q = _orthogonal(n, n, rng)
    return (q * np.logspace(-math.log10(kappa), 0.0, n)) @ q.T


def _matrix(m: int, n: int, sigmas, seed: int = 0) -> np.ndarray:
    """An m x n matrix with the given nonzero singular values (the rest exactly 0)."""
    rng = np.random.default_rng(seed)
    r = len(sigmas)
    return (_orthogonal(m, r, rng) * np.asarray(sigmas)) @ _orthogonal(n, r, rng).T


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


# -- conjugate gradients -----------------------------------------------------------------
@pytest.mark.parametrize("kappa", [1.0, 1e2, 1e4])
def test_cg_solves_spd_systems_like_numpy(kappa):
    a = _spd(30, kappa)
    b = np.random.default_rng(1).standard_normal(30)
    at = torch.as_tensor(a)
    z, info = cg(lambda v: at @ v, torch.as_tensor(b), rtol=1e-12)
    assert isinstance(info, SolverInfo) and info.solver == "cg"
    assert info.converged and info.reason == "converged"
    # both the reported and an independently computed residual meet the tolerance
    true_res = np.linalg.norm(b - a @ z.numpy()) / np.linalg.norm(b)
    assert info.residual <= 10 * 1e-12 and true_res <= 10 * 1e-12
    # forward error <= kappa * residual (plus numpy's own kappa * eps)
    assert _rel(z.numpy(), np.linalg.solve(a, b)) <= 10 * kappa * (1e-12 + EPS)
    # Ritz values lie inside the spectrum, so the estimate never exceeds kappa; after
    # convergence the extreme ones have converged to within a factor 2
    assert kappa / 2 <= info.cond <= kappa * (1 + 1e-8)
    # CG is exact in n steps in exact arithmetic; the budget scales with sqrt(kappa)
    assert info.iterations <= info.maxiter


def test_cg_with_a_known_lower_eigenvalue_bound():
    a = _spd(20, 1e3, seed=2)
    b = np.random.default_rng(3).standard_normal(20)
    at = torch.as_tensor(a)
    z, info = cg(lambda v: at @ v, torch.as_tensor(b), rtol=1e-12, eig_lower=1e-3)
    assert info.converged
    assert _rel(z.numpy(), np.linalg.solve(a, b)) <= 10 * 1e3 * (1e-12 + EPS)
    # the estimate divides the largest Ritz value (<= 1) by the given bound
    assert 0.5e3 <= info.cond <= 1e3 * (1 + 1e-8)


def test_preconditioned_cg():
    """With P = A (applied by numpy's solve) PCG converges in one step to A^{-1} b."""
    a = _spd(25, 1e5, seed=4)
    b = np.random.default_rng(5).standard_normal(25)
    at = torch.as_tensor(a)
    z, info = cg(
        lambda v: at @ v,
        torch.as_tensor(b),
        rtol=1e-10,
        precond=lambda r: torch.as_tensor(np.linalg.solve(a, r.numpy())),
    )
    assert info.solver == "pcg" and info.converged and info.iterations <= 2
    assert _rel(z.numpy(), np.linalg.solve(a, b)) <= 10 * 1e5 * (1e-10 + EPS)
    with pytest.raises(ValueError, match="eig_lower"):
        cg(lambda v: at @ v, torch.as_tensor(b), precond=lambda r: r, eig_lower=1.0)


def test_cg_zero_rhs_indefinite_operator_and_iteration_limit():
    a = torch.as_tensor(_spd(10, 10.0))
    z, info = cg(lambda v: a @ v, torch.zeros(10, dtype=F64))
    assert torch.equal(z, torch.zeros(10, dtype=F64)) and info.converged and info.iterations == 0
    # an indefinite operator is detected, not iterated on
    minus = -a
    _, info = cg(lambda v: minus @ v, torch.ones(10, dtype=F64))
    assert not info.converged and "not positive definite" in info.reason
    # a fixed limit of 2 iterations on a system that needs more
    _, info = cg(lambda v: a @ v, torch.ones(10, dtype=F64), rtol=1e-14, maxiter=2)
    assert info.iterations == 2 and not info.converged and info.reason == "iteration limit"
    with pytest.warns(ConvergenceWarning, match="cg did not converge in 2 iterations"):
        check_converged(info)
    with pytest.raises(RuntimeError, match="did not converge"):
        check_converged(info, on_fail="raise")


# -- LSMR ----------------------------------------------------------------------------------
def test_lsmr_is_the_minimum_norm_least_squares_solution():
    """A 20 x 12 matrix of rank 8 (singular values in [0.1, 1]): LSMR from 0 gives A^+ b."""
    sig = np.logspace(-1, 0, 8)
    a = _matrix(20, 12, sig, seed=6)
    b = np.random.default_rng(7).standard_normal(20)  # not in ran A: a residual
    at = torch.as_tensor(a)
    v, info = lsmr(lambda x: at @ x, lambda u: at.T @ u, (20, 12), torch.as_tensor(b))
    assert info.solver == "lsmr" and info.converged
    expected = np.linalg.pinv(a, rcond=1e-8) @ b
    kappa = sig.max() / sig.min()  # = 10
    pb = a @ expected
    tan_theta = np.linalg.norm(b - pb) / np.linalg.norm(pb)
    bound = 10 * (kappa + kappa**2 * tan_theta) * (1e-12 + EPS)
    assert _rel(v.numpy(), expected) <= bound
    # minimum norm: no component in the null space of A (the last 4 right singular vectors)
    _, _, vt = np.linalg.svd(a)
    assert np.linalg.norm(vt[8:] @ v.numpy()) <= bound * np.linalg.norm(expected)


def test_lsmr_with_damping_solves_the_regularized_normal_equations():
    a = _matrix(15, 25, np.logspace(-2, 0, 15), seed=8)  # wide, full row rank
    b = np.random.default_rng(9).standard_normal(15)
    at = torch.as_tensor(a)
    damp = 0.1
    v, info = lsmr(lambda x: at @ x, lambda u: at.T @ u, (15, 25), torch.as_tensor(b), damp=damp)
    assert info.converged
    expected = np.linalg.solve(a.T @ a + damp**2 * np.eye(25), a.T @ b)
    # condition of the damped problem: sqrt(1 + 1/damp^2) ~ 10
    kappa = math.sqrt(1 + 1 / damp**2)
    assert _rel(v.numpy(), expected) <= 10 * kappa**2 * (1e-12 + EPS)


def test_lsmr_zero_rhs_and_condition_limit():
    at = torch.as_tensor(_matrix(8, 6, [1.0, 0.5, 1e-9], seed=10))
    v, info = lsmr(lambda x: at @ x, lambda u: at.T @ u, (8, 6), torch.zeros(8, dtype=F64))
    assert torch.equal(v, torch.zeros(6, dtype=F64)) and info.converged
    # a singular value of 1e-9 against conlim 1e4: stopped at the condition limit, and
    # check_converged says why (the rank threshold), with the residual
    b = torch.as_tensor(np.random.default_rng(11).standard_normal(8))
    _, info = lsmr(lambda x: at @ x, lambda u: at.T @ u, (8, 6), b, conlim=1e4)
    assert info.reason == "condition limit" and info.cond > 1e4
    with pytest.warns(RankThresholdWarning, match="exceeded sigma_max/tau"):
        check_converged(info)


# -- the SVD scheme --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 30), (30, 4), (6, 7), (3, 5, 12)])
def test_r_svd_matches_numpy(shape):
    d = torch.randn(*shape, dtype=F64)
    u, s, v = r_svd(d)
    s_ref = np.linalg.svd(d.numpy(), compute_uv=False)
    # singular values are perfectly conditioned: |ds| <= |dD|_2 ~ n eps |D|
    scale = s_ref[..., :1]
    assert np.all(np.abs(s.numpy() - s_ref) <= 100 * EPS * scale)
    # U diag(s) V^T reassembles D; U and V have orthonormal columns
    torch.testing.assert_close((u * s.unsqueeze(-2)) @ v.mT, d, rtol=0, atol=1e-13)
    eye = torch.eye(s.shape[-1], dtype=F64).expand(*shape[:-2], -1, -1)
    torch.testing.assert_close(u.mT @ u, eye, rtol=0, atol=1e-13)
    torch.testing.assert_close(v.mT @ v, eye, rtol=0, atol=1e-13)


# -- point states of several points together --------------------------------------------
def test_prefill_states_matches_single_points():
    """The vectorised states (vmap over points, batched QR/SVD) equal the single-point ones.

    References: ``space.cost_grad``/``space.outputs`` per point and numpy's SVD
    of the per-point dense ``jacrev`` Jacobian; agreement to rounding
    (1e-12 relative; kappa(D) is below 1e2 here).
    """
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()
    space = sr.ParameterSpace(net, torch.randn(4, 3), torch.randn(4, 2))
    thetas = space.initial_point() + 0.3 * torch.randn(5, space.dim, dtype=torch.float64)
    space._state_cache_size = 10
    states = prefill_states(space, thetas, "svd")
    for th, state in zip(thetas, states):
        assert space.point_state(th) is state  # served from the cache afterwards
        ref_d = space.backend.jacobian(th).numpy()
        s_ref = np.linalg.svd(ref_d, compute_uv=False)
        u, s, v = state._cache["svd"]
        assert np.allclose(s.numpy(), s_ref, rtol=1e-12, atol=1e-14 * s_ref[0])
        # U diag(s) V^T reassembles D
        assert np.allclose((u * s) @ v.T, ref_d, atol=1e-12 * s_ref[0])
        assert torch.allclose(state._cache["x"], space.outputs(th), rtol=1e-13, atol=1e-14)
        # served from the prefilled D (no network pass)
        assert torch.allclose(state.cost_grad, space.cost_grad(th), rtol=1e-12, atol=1e-14)
    fresh = sr.ParameterSpace(net, space.inputs, space.targets)
    fresh._state_cache_size = 10
    for th, state in zip(thetas, prefill_states(fresh, thetas, "cost_grad")):
        assert "D" not in state._cache  # the fused pass only
        assert torch.allclose(state._cache["dC"], space.cost_grad(th), rtol=1e-12, atol=1e-14)
        assert torch.allclose(state._cache["x"], space.outputs(th), rtol=1e-13, atol=1e-14)
    with pytest.raises(ValueError, match="need must be"):
        prefill_states(space, thetas, "eigh")


@pytest.mark.parametrize("n, width", [(30, 12), (4, 24)])
def test_gram_singular_values_match_svd(n: int, width: int) -> None:
    # eigenvalues of the Gram matrix carry an absolute error ~ eps sigma_max^2, so sigma_i
    # agree with the SVD to eps sigma_max^2 / sigma_i; compare where sigma_i > 1e-4 sigma_max.
    sp = dead_units_space(n, width, dead=3)
    th = sp.initial_point()
    st = sp.point_state(th)
    ref = torch.linalg.svdvals(sp.jacobian(th))
    got = st.gram_singular_values[: ref.numel()]
    big = ref > 1e-4 * ref[0]
    assert torch.allclose(got[big], ref[big], rtol=1e-8, atol=0)
    assert bool((got[~big] < 1e-4 * ref[0]).all())
