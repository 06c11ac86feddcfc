"""Routes at data scale: Nyström-PCG, the memory-budgeted Jacobian, the Gram rank monitor."""

from __future__ import annotations

import warnings

import pytest
import torch

import subriemann as sr
from subriemann.engines.func import FuncBackend
from subriemann.linalg import ConvergenceWarning
from subriemann.linalg.nystrom import NystromSolver, nystrom_sketch, pcg
from subriemann.metrics import InterpolatedMetric


def _space(n: int, width: int, *, dead: int = 0, seed: int = 0) -> sr.ParameterSpace:
    """A tanh MLP; ``dead`` hidden units with zero outgoing weights make D rank-deficient."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, width), torch.nn.Tanh(), torch.nn.Linear(width, 2)
    ).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / 2)
        if dead:
            net[2].weight[:, :dead] = 0.0
            net[0].weight[:dead] = 0.0
            net[0].bias[:dead] = 0.0
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return sr.ParameterSpace(net, x, y, backend="func")


def _full_batch_jacrev(sp: sr.ParameterSpace, net: torch.nn.Module, th: torch.Tensor):
    """The independent reference: :func:`torch.func.jacrev` of the whole batch at ``th``."""

    def f(t: torch.Tensor) -> torch.Tensor:
        params = sp.backend.layout.unflatten(t)
        return torch.func.functional_call(net, params, (sp.inputs,)).reshape(-1)

    return torch.func.jacrev(f)(th)


def test_sketch_is_exact_for_low_rank() -> None:
    # Nystrom with a sketch of rank >= rank(G) reproduces G (range(G Omega) = range(G));
    # the only error is the stabilising shift nu ~ sqrt(n) eps |G|, so 1e-10 relative.
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    g = a @ a.T
    omega = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    u, lam = nystrom_sketch(omega, g @ omega)
    approx = (u * lam) @ u.T
    assert torch.allclose(approx, g, atol=1e-10 * float(g.norm()))
    ref = torch.linalg.eigvalsh(g).flip(0)[:8]
    assert torch.allclose(lam, ref.clamp_min(0.0), atol=1e-10 * float(ref[0]))


def test_pcg_matches_direct_solve_and_preconditioning_helps() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(60, 60, generator=gen, dtype=torch.float64)
    s = torch.logspace(3, -2, 60, dtype=torch.float64)
    q = torch.linalg.qr(a)[0]
    g = (q * s) @ q.T
    mu = 0.1
    b = torch.randn(60, generator=gen, dtype=torch.float64)
    ref = torch.linalg.solve(g + mu * torch.eye(60, dtype=torch.float64), b)
    solver = NystromSolver(rank0=4, max_rank=60)
    z, info = solver.solve(lambda w: w @ g, b, mu, rtol=1e-12)
    # |z - ref| <= cond(G + mu) * rtol * |b| / |G + mu| ~ 1e4 * 1e-12: 1e-7 relative is safe
    assert info.converged and torch.allclose(z, ref, rtol=0, atol=1e-7 * float(ref.norm()))
    plain, info0 = pcg(lambda v: g @ v + mu * v, b, rtol=1e-12)
    assert info0.converged and info.iterations < info0.iterations
    # the adaptive rank stops once lam_hat_l <= mu, so cond(P^-1 A) stays small
    assert solver.precond is not None and float(solver.precond.lam_hat[-1]) <= mu
    assert info.iterations <= 30


@pytest.mark.parametrize("n, width, dead", [(30, 12, 0), (30, 12, 4), (4, 24, 0), (4, 24, 6)])
@pytest.mark.parametrize("lam", [0.3, 0.9])
def test_nystrom_route_matches_svd(n: int, width: int, dead: int, lam: float) -> None:
    # K < QN (n = 30) and QN < K (n = 4), full-rank and rank-deficient D.  Both routes give
    # g_lam^{-1} D^T r exactly up to the CG tolerance 1e-12 times cond(g_lam) <= 1 + lam
    # sigma_max^2 / (1 - lam) ~ 1e3: 1e-8 relative is safe.
    sp = _space(n, width, dead=dead)
    th = sp.initial_point()
    ref = sp.equip_with_metric(InterpolatedMetric, lam=lam, solver="svd").metric.gradient(th)
    m = sp.equip_with_metric(InterpolatedMetric, lam=lam, solver="nystrom").metric
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        got = m.gradient(th)
    assert torch.allclose(got, ref, rtol=0, atol=1e-8 * float(ref.norm()))
    assert m.last_solve.solver == "pcg" and m.last_solve.converged
    # the preconditioner is reused at a nearby point and the answer is still exact
    th2 = th + 1e-3
    ref2 = sp.equip_with_metric(InterpolatedMetric, lam=lam, solver="svd").metric.gradient(th2)
    builds = m._nystrom.builds
    got2 = m.gradient(th2)
    assert torch.allclose(got2, ref2, rtol=0, atol=1e-8 * float(ref2.norm()))
    assert m._nystrom.builds == builds


def test_jacobian_chunks_within_a_tiny_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small CNN; a budget of a few kB forces one sample per chunk.  Reference: jacrev of
    # the full batch (same arithmetic per entry, so agreement to round-off, 1e-12).
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 4, 4)),
        torch.nn.Conv2d(1, 3, 3, padding=1),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(48, 3),
    ).double()
    sp = sr.ParameterSpace(net, torch.randn(7, 16), torch.randn(7, 3), backend="func")
    th = sp.initial_point()
    ref = _full_batch_jacrev(sp, net, th)
    be = sp.backend
    assert isinstance(be, FuncBackend)
    monkeypatch.setattr(FuncBackend, "memory_budget", 4096)
    assert len(be._chunks(3 * 8 * 3 * (sp.dim + be.activation_entries(th)))) == 7
    assert torch.allclose(be.jacobian(th), ref, rtol=0, atol=1e-12)
    assert torch.allclose(be._jacobian_forward(th), ref, rtol=0, atol=1e-12)
    assert be.rows_per_pass(th) == 1


@pytest.mark.parametrize("n, width", [(30, 12), (4, 24)])
def test_gram_singular_values_match_svd(n: int, width: int) -> None:
    # eigenvalues of the Gram matrix carry an absolute error ~ eps sigma_max^2, so sigma_i
    # agree with the SVD to eps sigma_max^2 / sigma_i; compare where sigma_i > 1e-4 sigma_max.
    sp = _space(n, width, dead=3)
    th = sp.initial_point()
    st = sp.point_state(th)
    ref = torch.linalg.svdvals(sp.jacobian(th))
    got = st.gram_singular_values[: ref.numel()]
    big = ref > 1e-4 * ref[0]
    assert torch.allclose(got[big], ref[big], rtol=1e-8, atol=0)
    assert bool((got[~big] < 1e-4 * ref[0]).all())


@pytest.mark.parametrize("lam, at_rejections", [(0.5, False), (1.0, True)])
def test_rank_monitor_skips_rejected_steps_where_the_field_is_continuous(
    monkeypatch: pytest.MonkeyPatch, lam: float, at_rejections: bool
) -> None:
    # A first step far too long forces rejections.  For lam < 1 the field is continuous
    # across rank changes: singular values only at s = 0, at accepted steps and saved rows.
    from subriemann.flow import engine as flow_mod

    sp = _space(6, 8)
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


@pytest.mark.parametrize("n", [6, 20])  # QN = 18 <= K = 44 (reverse), QN = 60 > K (forward)
def test_jacobian_without_per_sample_vmap_within_a_tiny_budget(
    monkeypatch: pytest.MonkeyPatch, n: int
) -> None:
    # PReLU cannot be vmapped per sample: the rows come from reverse passes over the whole
    # chunk (engine fallback), now in chunks and row blocks below the memory budget.
    # Reference: jacrev of the full batch; same arithmetic per entry, so 1e-12.
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.PReLU(), torch.nn.Linear(5, 3)
    ).double()
    sp = sr.ParameterSpace(net, torch.randn(n, 4), torch.randn(n, 3), backend="func")
    th = sp.initial_point()
    ref = _full_batch_jacrev(sp, net, th)
    be = sp.backend
    assert isinstance(be, FuncBackend)
    monkeypatch.setattr(FuncBackend, "memory_budget", 4096)
    batches: list[int] = []
    real_map = FuncBackend._map

    def recording(self, fn, batch):
        batches.append(int(batch.shape[0]))
        return real_map(self, fn, batch)

    monkeypatch.setattr(FuncBackend, "_map", recording)
    rev = be._jacobian_reverse(th)
    assert "per_sample" in be.unavailable
    assert torch.allclose(rev, ref, rtol=0, atol=1e-12)
    # one row (or tangent) per vectorised pass: a row block costs more than 4 kB
    assert batches and max(batches) == 1
    # without per-sample vmap reverse mode costs QN passes: forward mode once QN > K
    assert torch.allclose(be.jacobian(th), ref, rtol=0, atol=1e-12)
    picked = be._jacobian_reverse(th) if sp.output_dim <= sp.dim else be._jacobian_forward(th)
    assert torch.equal(be.jacobian(th), picked)


def test_field_may_jump_by_metric() -> None:
    # the flow's rank monitor skips rejected steps only where the gradient is continuous
    # across rank changes: Euclidean and g_lam (lam < 1); bundle metrics drop sigma <= tau
    sp = _space(6, 8)
    m = sr.metrics
    assert sp.equip_with_metric(m.EuclideanMetric).metric.field_may_jump is False
    assert sp.equip_with_metric(InterpolatedMetric, lam=0.0).metric.field_may_jump is False
    assert sp.equip_with_metric(InterpolatedMetric, lam=1.0).metric.field_may_jump is True
    assert sp.equip_with_metric(m.OutputPullbackMetric).metric.field_may_jump is True
    assert sp.equip_with_metric(m.BundleMetric, lam=0.5).metric.field_may_jump is True


def test_nystrom_route_warns_when_it_misses_its_tolerance() -> None:
    # the accuracy contract: meet solver_rtol or warn, and say so in last_solve
    sp = _space(30, 12)
    m = sp.equip_with_metric(InterpolatedMetric, lam=0.5, solver="nystrom", maxiter=1).metric
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        m.gradient(sp.initial_point())
    assert m.last_solve is not None and not m.last_solve.converged
    assert m.last_solve.residual > m.solver_rtol


def test_scale_benchmark_quick(tmp_path) -> None:
    """``benchmarks/scale.py --quick --no-flows``: a small CNN on 300 digits (K = 1348 < QN =
    3000), the default route and the engine's parameter-space solve (``kspace``) side by side,
    each in its own process, written into RESULTS.md and scale.json.  Both are direct
    Cholesky solves of the same SPD system of condition <= 1 + 2 sigma_max^2 (about 1e3
    here), so they agree to ~K kappa eps ~ 1e-10 at most (observed ~1e-13)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--no-flows", "--out", str(tmp_path)]) == 0
    rows = {r["route"]: r for r in json.loads((tmp_path / "scale.json").read_text())["gradients"]}
    assert set(rows) == {"ntk", "kspace"} and "error" not in rows["ntk"]
    assert rows["kspace"]["rel_diff_auto"] < 1e-10
    assert "| digits-cnn-small | 1348 | 3000 | kspace |" in (tmp_path / "RESULTS.md").read_text()


def test_func_products_within_a_tiny_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """FuncBackend's outputs, batched JVPs and VJPs and the pullback in sample chunks and row
    blocks below a budget of a few kB (one sample, one row per pass), against jacrev of the
    full batch (same arithmetic per entry: agreement to round-off, 1e-12)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 4, 4)), torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(48, 3),
    ).double()  # fmt: skip
    sp = sr.ParameterSpace(net, torch.randn(7, 16), torch.randn(7, 3), backend="func")
    th = sp.initial_point()
    d = _full_batch_jacrev(sp, net, th)
    be = sp.backend
    x_ref = be.outputs(th)
    monkeypatch.setattr(FuncBackend, "memory_budget", 4096)
    assert len(be._pass_chunks(th)) == 7 and be._rows_within(th, 5, 1) == 1
    v, u = torch.randn(5, sp.dim, dtype=torch.float64), torch.randn(5, 21, dtype=torch.float64)
    assert torch.allclose(be.outputs(th), x_ref, rtol=0, atol=1e-12)
    assert torch.allclose(be.jvp(th, v), v @ d.T, rtol=0, atol=1e-12)
    assert torch.allclose(be.vjp(th, u), u @ d, rtol=0, atol=1e-12)
    x, g = be.pullback(th, lambda x: 2.0 * x)
    assert torch.allclose(g, d.T @ (2.0 * x_ref), rtol=0, atol=1e-12)
