"""The generic torch.func engine (:class:`~subriemann.engines.func.FuncBackend`) against jacrev.

Every problem of :data:`tests.cases.CASES` (the ``case`` fixture: MLPs in both
regimes, cross-entropy, float32, a convolution, integer inputs, a model
rank-deficient by construction) is checked in the style of curvlinops' operator
tests: the engine's outputs, ``D``, ``Dv``, ``Dᵀu`` (single and batched), the
pull-back and ``DDᵀ`` against :func:`tests.references.reference_jacobian`, the
``jacrev`` of the *whole batch* with parameters flattened from
``model.named_parameters()``.  Then the engine's own routes: reverse and forward
mode, sample chunks, parameter blocks of the NTK; hypothesis draws random MLPs.

Tolerances.  float64: both sides are float64 sums of at most a few hundred
O(1) products in different orders, so they agree to ~sqrt(K)·eps ≈ 1e-14 relative;
``rtol=1e-10, atol=1e-12`` leaves four orders of margin while a wrong entry (a
transposed block, a sample out of order) is off by O(1).  float32: the engine
rounds every product to eps_32 ≈ 6e-8 through a few layers (≈ 1e-6 relative at
these sizes) and is compared with the float64 reference at the same point:
``rtol=1e-4, atol=1e-5``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given

import subriemann as sr
from subriemann.engines.func import FuncBackend
from tests.cases import (
    MLPSpec,
    Problem,
    case_named,
    make_problem,
    mlp_problems,
    perturbed_point,
)
from tests.helpers import close_to_max
from tests.references import central_fd_jacobian, reference_jacobian, reference_outputs

F64 = torch.float64
# Engines: the generic torch.func one, and whatever "auto" picks for the model.
BACKENDS = ["func", "auto"]
TOL = {F64: {"rtol": 1e-10, "atol": 1e-12}, torch.float32: {"rtol": 1e-4, "atol": 1e-5}}


@dataclass
class FuncCase:
    """A problem of :data:`tests.cases.CASES` on the generic engine, at a perturbed point."""

    problem: Problem
    space: sr.ParameterSpace
    theta: torch.Tensor
    d: torch.Tensor  # the reference D at theta, float64
    dtype: torch.dtype
    tol: dict


@pytest.fixture(scope="module")
def func_case(case: Problem) -> FuncCase:
    """Built once per case for the read-only tests below (none changes the space)."""
    problem = case
    space = problem.space(backend="func")
    assert isinstance(space.backend, FuncBackend)
    theta = perturbed_point(space)
    d = reference_jacobian(problem.model, problem.inputs, theta.double())
    return FuncCase(problem, space, theta, d, problem.dtype, TOL[problem.dtype])


# -- every case against the dense reference -----------------------------------------------
def test_outputs_match_the_model(func_case):
    c = func_case
    x = c.space.backend.outputs(c.theta)
    assert x.shape == (c.space.output_dim,) and x.dtype == c.dtype
    ref = reference_outputs(c.problem.model, c.problem.inputs, c.theta.double())
    torch.testing.assert_close(x.double(), ref, **c.tol)


def test_jacobian_matches_jacrev(func_case):
    c = func_case
    jac = c.space.backend.jacobian(c.theta)
    assert jac.shape == (c.space.output_dim, c.space.dim) and jac.dtype == c.dtype
    torch.testing.assert_close(jac.double(), c.d, **c.tol)


def test_jvp_and_vjp_match_the_dense_jacobian(func_case):
    space, theta, d, tol = func_case.space, func_case.theta, func_case.d, func_case.tol
    be = space.backend
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(3, space.dim, generator=gen, dtype=func_case.dtype)
    u = torch.randn(3, space.output_dim, generator=gen, dtype=func_case.dtype)
    torch.testing.assert_close(be.jvp(theta, v[0]).double(), d @ v[0].double(), **tol)
    torch.testing.assert_close(be.vjp(theta, u[0]).double(), d.T @ u[0].double(), **tol)
    # batched [..., K] and [..., QN]
    jv, vj = be.jvp(theta, v), be.vjp(theta, u)
    assert jv.shape == (3, space.output_dim) and vj.shape == (3, space.dim)
    torch.testing.assert_close(jv.double(), v.double() @ d.T, **tol)
    torch.testing.assert_close(vj.double(), u.double() @ d, **tol)


def test_pullback_returns_outputs_and_the_pulled_covector(func_case):
    c = func_case
    x, pulled = c.space.backend.pullback(c.theta, lambda x: 2.0 * x)
    ref_x = reference_outputs(c.problem.model, c.problem.inputs, c.theta.double())
    torch.testing.assert_close(x.double(), ref_x, **c.tol)
    torch.testing.assert_close(pulled.double(), c.d.T @ (2.0 * ref_x), **c.tol)


def test_ntk_matches_the_dense_gram(func_case):
    c = func_case
    gram = c.space.backend.ntk(c.theta)
    assert gram.shape == (c.space.output_dim, c.space.output_dim)
    torch.testing.assert_close(gram.double(), c.d @ c.d.T, **c.tol)


def test_chunks_of_one_sample_give_the_same_products(func_case):
    """chunk_size=1 (one sample per vmap) agrees with the whole batch: no sample mixing."""
    c = func_case
    one = c.problem.space(backend="func", chunk_size=1).backend
    assert one.chunk_size == 1
    u = torch.ones(c.space.output_dim, dtype=c.dtype)
    torch.testing.assert_close(one.jacobian(c.theta).double(), c.d, **c.tol)
    torch.testing.assert_close(one.vjp(c.theta, u).double(), c.d.T @ u.double(), **c.tol)


# -- the engine's routes (through ParameterSpace) ------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(p=mlp_problems())
def test_jacobian_matches_jacrev_on_whole_batch(backend, p):
    space = p.space(backend=backend)
    theta = perturbed_point(space, seed=p.spec.seed)
    d = space.jacobian(theta)
    assert d.shape == (space.output_dim, space.dim) and d.dtype == F64
    torch.testing.assert_close(
        d, reference_jacobian(p.model, p.inputs, theta), rtol=1e-10, atol=1e-12
    )


@given(p=mlp_problems(max_depth=2, max_width=4, max_samples=4))
def test_jacobian_matches_central_finite_differences(p):
    # Central differences in float64 with h = 1e-6: the truncation error is
    # h²/6·|∂³x| ≲ 1e-12 for these O(1) tanh/softplus/sigmoid/GELU nets (weights
    # ~ N(0, 1/fan_in), inputs ~ N(0, 1)), and the rounding error is
    # ≈ eps·|x|/h ≈ 2e-16·10/1e-6 = 2e-9.  An absolute tolerance of 1e-7 (plus
    # 1e-6 relative) leaves a margin of 50 over that bound, while a wrong
    # entry of D (a transposed block, a wrong sample order) is off by O(1).
    space = p.space()
    theta = perturbed_point(space, scale=0.2, seed=p.spec.seed)
    fd = central_fd_jacobian(space.outputs, theta, h=1e-6)
    torch.testing.assert_close(space.jacobian(theta), fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_func_backend_reverse_and_forward_modes(mlp_problem, tall_problem, chunk_size):
    for p in (mlp_problem, tall_problem):
        space = p.space(backend="func", chunk_size=chunk_size)
        be = space.backend
        assert isinstance(be, FuncBackend)
        theta = perturbed_point(space)
        ref = reference_jacobian(p.model, p.inputs, theta)
        rev = be._jacobian_reverse(theta)
        fwd = be._jacobian_forward(theta)
        torch.testing.assert_close(rev, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fwd, ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(space.jacobian(theta), ref, rtol=1e-10, atol=1e-12)
        # The dense Jacobian picks the cheaper mode per sample: Q backward passes (reverse)
        # against K tangents (forward), so reverse iff Q <= K.
        picked = rev if space.num_outputs <= space.dim else fwd
        torch.testing.assert_close(space.jacobian(theta), picked, rtol=0, atol=0)
    assert mlp_problem.spec.num_params > 10 and tall_problem.spec.num_params < 40


def test_chunked_equals_unchunked(mlp_problem):
    full = mlp_problem.space(backend="func")
    chunked = mlp_problem.space(backend="func", chunk_size=2)
    assert chunked.backend.chunk_size == 2
    theta = perturbed_point(full)
    for name in ("outputs", "jacobian", "ntk", "cost", "cost_grad", "output_cost_grad"):
        torch.testing.assert_close(
            getattr(chunked, name)(theta), getattr(full, name)(theta), rtol=1e-12, atol=1e-12
        )


def test_jacobian_of_a_model_with_integer_inputs():
    p = case_named("embedding")  # Embedding -> tanh -> Linear on integer inputs
    assert not p.inputs.is_floating_point()
    for backend in BACKENDS:
        space = p.space(backend=backend)
        theta = perturbed_point(space)
        torch.testing.assert_close(
            space.jacobian(theta), reference_jacobian(p.model, p.inputs, theta),
            rtol=1e-10, atol=1e-12,
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [None, 2])
@given(p=mlp_problems(max_samples=5))
def test_jvp_vjp_ntk_against_dense_jacobian(backend, chunk_size, p):
    space = p.space(backend=backend, chunk_size=chunk_size)
    theta = perturbed_point(space, seed=p.spec.seed)
    d = reference_jacobian(p.model, p.inputs, theta)
    gen = torch.Generator().manual_seed(p.spec.seed)
    v = torch.randn(space.dim, generator=gen, dtype=F64)
    u = torch.randn(space.output_dim, generator=gen, dtype=F64)
    tol = {"rtol": 1e-10, "atol": 1e-11}
    torch.testing.assert_close(space.jvp(theta, v), d @ v, **tol)
    torch.testing.assert_close(space.vjp(theta, u), d.T @ u, **tol)
    # batched [..., K] and [..., QN]
    vb = torch.randn(2, 3, space.dim, generator=gen, dtype=F64)
    ub = torch.randn(2, 3, space.output_dim, generator=gen, dtype=F64)
    jv, vj = space.jvp(theta, vb), space.vjp(theta, ub)
    assert jv.shape == (2, 3, space.output_dim) and vj.shape == (2, 3, space.dim)
    torch.testing.assert_close(jv, vb @ d.T, **tol)
    torch.testing.assert_close(vj, ub @ d, **tol)
    torch.testing.assert_close(space.ntk(theta), d @ d.T, **tol)


def test_empty_batches_of_vectors(space):
    theta = space.initial_point()
    assert space.jvp(theta, torch.zeros(0, space.dim, dtype=F64)).shape == (0, space.output_dim)
    assert space.vjp(theta, torch.zeros(0, space.output_dim, dtype=F64)).shape == (0, space.dim)


def test_ntk_in_parameter_blocks(mlp_problem):
    """The NTK accumulated over parameter groups (bounded memory) equals D Dᵀ."""
    space = mlp_problem.space(backend="func")
    theta = perturbed_point(space)
    d = reference_jacobian(mlp_problem.model, mlp_problem.inputs, theta)
    space.backend.ntk_block_entries = 30 * space.output_dim  # blocks of <= 30 parameters
    torch.testing.assert_close(space.ntk(theta), d @ d.T, rtol=1e-10, atol=1e-12)
    # underparametrized: through the forward-mode D
    tall = make_problem(MLPSpec((2, 2, 1), "gelu", num_samples=12, seed=4))
    ts = tall.space(backend="func")
    th = perturbed_point(ts)
    dt = reference_jacobian(tall.model, tall.inputs, th)
    torch.testing.assert_close(ts.ntk(th), dt @ dt.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("entries,samples_per_block", [(50, 1), (130, 3), (200, 4)])
def test_ntk_tensor_larger_than_budget(entries, samples_per_block):
    """A single tensor larger than the block budget: row blocks × forward mode, = D Dᵀ."""
    p = make_problem(MLPSpec((3, 7, 2), "tanh", num_samples=5, seed=2))
    space = p.space(backend="func")
    theta = perturbed_point(space)
    d = reference_jacobian(p.model, p.inputs, theta)
    be = space.backend
    be.ntk_block_entries = entries  # QN = 10: at most entries // 10 < 21 parameters per block
    big = [n for n, k in zip(space.layout.names, space.layout.numels) if k > entries // 10]
    assert "0.weight" in big  # the 7x3 first weight is split into row blocks
    assert entries // (21 * 2) == samples_per_block
    calls = []
    orig = be._ntk_one_tensor
    be._ntk_one_tensor = lambda t, n: calls.append(n) or orig(t, n)
    torch.testing.assert_close(space.ntk(theta), d @ d.T, rtol=1e-10, atol=1e-12)
    assert sorted(calls) == sorted(big)


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
    ref = reference_jacobian(net, sp.inputs, th)
    be = sp.backend
    assert isinstance(be, FuncBackend)
    monkeypatch.setattr(FuncBackend, "memory_budget", 4096)
    assert len(be._chunks(3 * 8 * 3 * (sp.dim + be.activation_entries(th)))) == 7
    assert torch.allclose(be.jacobian(th), ref, rtol=0, atol=1e-12)
    assert torch.allclose(be._jacobian_forward(th), ref, rtol=0, atol=1e-12)
    assert be.rows_per_pass(th) == 1


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
    ref = reference_jacobian(net, sp.inputs, th)
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
    d = reference_jacobian(net, sp.inputs, th)
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


def test_param_gram_and_its_shifted_solve_against_jacrev(mlp_problem):
    """FuncBackend's D^T D (from the dense D) and (D^T D + mu 1)^{-1} r (Cholesky) against the
    jacrev Jacobian and numpy's solve: an SPD system of condition <= 1 + sigma_max^2 / mu,
    solved backward stably, so agreement to 1e-10 relative."""
    space = mlp_problem.space(backend="func")
    be, theta = space.backend, space.initial_point()
    d = reference_jacobian(space.module, space.inputs, theta)
    close_to_max(be.param_gram(theta), d.T @ d)
    rhs = torch.randn(space.dim, 2, dtype=torch.float64)
    ref = torch.linalg.solve(d.T @ d + 0.5 * torch.eye(space.dim, dtype=torch.float64), rhs)
    close_to_max(be.solve_param_gram(theta, rhs, 0.5), ref, rtol=1e-10)
    close_to_max(be.solve_param_gram(theta, rhs[:, 0], 0.5), ref[:, 0], rtol=1e-10)
    assert be.fallback is be and not be.gram_from_factors
