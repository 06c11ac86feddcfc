"""The ``ntk`` route's reuse of a nearby point's Cholesky factor (PCG), against the svd route.

For :math:`\\lambda < 1` and a Gram dimension in the reuse window (lowered here to 1 so
that the small problems take the path), a point without its own factor is solved by
PCG preconditioned with the factor of the last point that was factored, and the answer
is certified a posteriori (``SolverInfo.residual`` is a bound of its relative error);
otherwise the route factors afresh.  The reference is the ``svd`` route (a dense thin
SVD, independent of the Gram matrix and of PCG), in float64, at the same point.

Tolerances.  The PCG answer is within ``info.residual`` (its certified bound, at most
the target ``info.rtol``) of the exact solution of the system the route computed; that
system differs from the reference's by the rounding of a backward stable solve (or, in
float32, of the network's evaluation in float32), which moves the solution by at most
``C * eps * kappa(A)``, :math:`\\kappa(A) \\le 1 + \\lambda\\sigma_{\\max}^2/(1-\\lambda)`
(:math:`\\sigma_{\\max}` from the reference SVD), with ``C = 100`` for the dimension
dependence of the rounding bounds (:math:`n \\le 84`) and eps that of the route's dtype.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import subriemann as sr
from subriemann.linalg import PointState, SolverInfo, Threshold
from subriemann.linalg.routes import NTKRoute, SVDRoute
from tests.cases import case_named, perturbed_point, tanh_mlp

THR = Threshold()
STEPS = (1e-3, 3e-3, 1e-2)  # theta0 - h V: the nearby points of a flow step


def _mlp_space(widths: tuple[int, ...], n: int, dtype: torch.dtype) -> sr.ParameterSpace:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randn(n, widths[-1], generator=gen, dtype=torch.float64)
    return sr.ParameterSpace(tanh_mlp(widths, seed=4, gain=1.5), x, y, dtype=dtype)


def _dead_space(dtype: torch.dtype) -> sr.ParameterSpace:
    """K = 38 < QN = 60 with 2 dead hidden units (zero weights in and out): 12 zero columns."""
    net = tanh_mlp((3, 6, 2), seed=2, gain=1.0)
    with torch.no_grad():
        net[2].weight[:, :2] = 0.0
        net[0].weight[:2] = 0.0
        net[0].bias[:2] = 0.0
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(30, 2, generator=gen, dtype=torch.float64)
    return sr.ParameterSpace(net, x, y, dtype=dtype, backend="func")


SPACES = {
    # K = 52 < QN = 120: (1 - lam) 1 + lam D^T D
    "param": lambda dt: _mlp_space((3, 6, 4), 30, dt),
    # QN = 32 <= K = 84: (1 - lam) 1 + lam D D^T
    "output": lambda dt: _mlp_space((3, 10, 4), 8, dt),
    # K = 38 < QN = 60, rank D <= 26: D^T D singular
    "param-deficient": _dead_space,
    # QN = 12 <= K = 20, rank D <= 9: D D^T singular
    "output-deficient": lambda dt: case_named("rank-deficient").space(dtype=dt, backend="func"),
}


def _solve(route, space: sr.ParameterSpace, theta: torch.Tensor, lam: float):
    st = PointState(space, theta)  # a fresh state: nothing cached at this point
    return route.solve(st, st.output_grad, lam, THR)


def _reference(space64: sr.ParameterSpace, theta: torch.Tensor, lam: float):
    """The svd route's answer in float64 and the bound C eps kappa(A) (eps of ``dtype``)."""
    v, _ = _solve(SVDRoute(), space64, theta.to(torch.float64), lam)
    smax = float(torch.linalg.svdvals(space64.jacobian(theta.to(torch.float64)))[0])
    return v, 1.0 + lam * smax**2 / (1.0 - lam)


def _check(v, info: SolverInfo, space64, theta, lam) -> None:
    ref, kappa = _reference(space64, theta, lam)
    eps = float(torch.finfo(v.dtype).eps)
    err = float((v.to(torch.float64) - ref).norm() / ref.norm())
    bound = (info.residual if info.solver == "ntk+pcg" else 0.0) + 100.0 * eps * kappa
    assert err <= bound, (info, err, bound)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("lam", [0.3, 0.9])
@pytest.mark.parametrize("name", list(SPACES))
def test_reuse_path_against_svd_route(name: str, lam: float, dtype: torch.dtype) -> None:
    """Nearby points take PCG with the reference factor (certified); a far point refactors."""
    space, space64 = SPACES[name](dtype), SPACES[name](torch.float64)
    assert space.metric is not None
    route = NTKRoute(reuse_min_dim=1)
    theta0 = perturbed_point(space, 0.2, seed=1)
    v0, info = _solve(route, space, theta0, lam)
    assert info.solver == "ntk" and "new reference factor" in info.reason, info
    assert route.reference is not None and route.reference.output_side == (
        space.output_dim <= space.dim
    )
    _check(v0, info, space64, theta0, lam)
    for h in STEPS:
        theta = theta0 - h * v0
        v, info = _solve(route, space, theta, lam)
        assert info.solver == "ntk+pcg" and info.converged, info
        assert 1 <= info.iterations <= route.reuse_maxiter
        assert info.residual <= info.rtol
        _check(v, info, space64, theta, lam)
    # a far point: PCG with the old reference cannot certify within the cap (lowered to 3 here,
    # below n: conjugate gradients terminate in at most n steps, n = 12 on the smallest case)
    far = perturbed_point(space, 3.0, seed=5)
    route.reuse_maxiter, route.last_iterations = 3, 0  # (the refresh rule: test below)
    v, info = _solve(route, space, far, lam)
    route.reuse_maxiter = 20
    assert info.solver == "ntk" and "PCG with the previous reference" in info.reason, info
    _check(v, info, space64, far, lam)
    v, info = _solve(route, space, far - 1e-3 * v, lam)  # the far point is the reference now
    assert info.solver == "ntk+pcg" and info.converged, info


def test_second_solve_at_a_factored_point_and_outside_the_window() -> None:
    """A point with its factor is solved with it (no PCG, no new reference); below
    ``reuse_min_dim`` and for a traced theta the route factors as without reuse."""
    space = SPACES["param"](torch.float64)
    route = NTKRoute(reuse_min_dim=1)
    st = PointState(space, perturbed_point(space, 0.2, seed=1))
    _, first = route.solve(st, st.output_grad, 0.5, THR)
    ref = route.reference
    u = torch.randn(space.output_dim, dtype=torch.float64)
    _, second = route.solve(st, u, 0.5, THR)
    assert "new reference" in first.reason and second.reason == "Cholesky of (1 - lam) 1 + lam G"
    assert route.reference is ref
    traced = PointState(space, st.theta.clone().requires_grad_())
    assert route.reuses(st) and not route.reuses(traced)
    default = NTKRoute()  # n = 52 < REUSE_MIN_DIM: today's path, nothing kept
    _, info = default.solve(PointState(space, st.theta + 1e-3), st.output_grad, 0.5, THR)
    assert default.reference is None and "reference" not in info.reason
    with pytest.raises(ValueError, match="reuse_maxiter"):
        NTKRoute(reuse_maxiter=0)


def test_flow_through_the_reuse_path_matches_the_svd_route() -> None:
    """A lam = 0.5 gradient flow on the reuse path ends where the svd route's does.

    Each field value is within its certified bound (<= 1e-8 relative) of the exact one
    (the svd route's is within ~eps kappa), so the two dopri5 runs take the same steps up
    to that perturbation, and their end points differ by about s_end e^{L s_end} 1e-8:
    well within the integrator tolerance rtol = 1e-6 that the test asserts."""
    ends = {}
    infos: list[SolverInfo] = []
    for solver in ("reuse", "svd"):
        space = _mlp_space((2, 4, 3), 20, torch.float64)  # K = 27 < QN = 60
        route = NTKRoute(reuse_min_dim=1) if solver == "reuse" else "svd"
        space.equip_with_metric(sr.metrics.InterpolatedMetric, lam=0.5, solver=route)
        if isinstance(route, NTKRoute):
            real = route.pcg_solve

            def spy(*args, _real=real):
                out = _real(*args)
                infos.append(out[1])
                return out

            route.pcg_solve = spy  # type: ignore[method-assign]
        theta0 = perturbed_point(space, 0.2, seed=1)
        traj = sr.gradient_flow(space, theta0, 0.1, rtol=1e-6, atol=1e-8, monitor_rank=False)
        assert traj.status.code == "s_end_reached"
        ends[solver] = traj.final_theta
    # every PCG solve met its target; most of them (the nearby stages) were accepted
    assert len(infos) >= 10 and np.mean([i.converged for i in infos]) >= 0.8
    assert all(i.residual <= i.rtol for i in infos if i.converged)
    err = float((ends["reuse"] - ends["svd"]).norm() / ends["svd"].norm())
    assert err <= 1e-6, err


def test_reference_factor_matches_only_its_own_system() -> None:
    """A reference is used only for the same lam, side, size and dtype."""
    space = SPACES["param"](torch.float64)
    route = NTKRoute(reuse_min_dim=1)
    st = PointState(space, space.initial_point())
    route.solve(st, st.output_grad, 0.3, THR)
    ref = route.reference
    assert ref is not None and ref.matches(st, 0.3) and not ref.matches(st, 0.4)
    assert not ref.matches(PointState(SPACES["param"](torch.float32), st.theta.float()), 0.3)
    other = SPACES["output"](torch.float64)
    assert not ref.matches(PointState(other, other.initial_point()), 0.3)
    lin = sr.ParameterSpace(nn.Linear(3, 1).double(), torch.randn(80, 3), torch.randn(80, 1))
    assert not ref.matches(PointState(lin, lin.initial_point()), 0.3)  # K = 4: another size


@pytest.mark.parametrize("name", ["param", "output"])
def test_defect_correction_when_the_first_stop_is_too_loose(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PCG's first stop comes from the answer's size at the reference; when that is far too
    loose (forced here: relative residual 1e-2) the route corrects the defect b - Az with a
    tighter tolerance instead of dropping the reference, and still certifies its answer."""
    space = SPACES[name](torch.float64)
    route = NTKRoute(reuse_min_dim=1, reuse_maxiter=200)
    theta0 = perturbed_point(space, 0.2, seed=1)
    v0, _ = _solve(route, space, theta0, 0.5)
    monkeypatch.setattr(NTKRoute, "pcg_rtol", staticmethod(lambda *a: 1e-2))
    theta = theta0 - 1e-2 * v0
    v, info = _solve(route, space, theta, 0.5)
    assert info.solver == "ntk+pcg" and info.converged and info.residual <= info.rtol, info
    _check(v, info, space, theta, 0.5)


def test_refresh_rules_keep_the_reference_near() -> None:
    """A point is factored without PCG after a solve that took most of the cap; and the last
    point solved by PCG becomes the reference once its Gram matrix is formed (the monitor)."""
    space = SPACES["param"](torch.float64)
    route = NTKRoute(reuse_min_dim=1)
    theta0 = perturbed_point(space, 0.2, seed=1)
    v0, _ = _solve(route, space, theta0, 0.5)
    st = PointState(space, theta0 - 1e-3 * v0)
    _, info = route.solve(st, st.output_grad, 0.5, THR)
    assert info.solver == "ntk+pcg" and route.last_pcg_state is st
    st.gram_singular_values  # noqa: B018  (what the rank monitor forms at an accepted point)
    v, info = _solve(route, space, theta0 - 2e-3 * v0, 0.5)
    assert info.solver == "ntk+pcg" and info.converged, info
    assert torch.equal(route.reference.chol, st.shifted_cholesky(0.5))
    route.last_iterations = route.reuse_maxiter  # as after a solve that took the whole cap
    theta = theta0 - 3e-3 * v0
    v, info = _solve(route, space, theta, 0.5)
    assert info.solver == "ntk" and "the last PCG took" in info.reason, info
    _check(v, info, space, theta, 0.5)
