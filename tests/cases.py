"""Problem cases shared by the tests: models, data, spaces (curvlinops' ``test/cases.py`` style).

* :class:`Problem`: a model with its data, a loss and a dtype; :meth:`Problem.space`
  builds its :class:`~subriemann.ParameterSpace` (the one place the tests build a space
  on a standard problem);
* :data:`CASES`: the named table of problems every engine test runs on (small MLPs
  in both regimes, cross-entropy, float32, a convolution, integer inputs, a model
  rank-deficient by construction); ``tests/conftest.py`` turns it into the ``case``
  fixture;
* builders of special models with known geometry (:class:`SquareAndLine`,
  :class:`Reparametrized`, :class:`Designed`) and :class:`MetricCase`, a drawn
  problem at its point with its :class:`~tests.references.DenseMetricReference`;
* hypothesis strategies (:func:`mlp_specs`, :func:`mlp_problems`, :func:`metric_cases`).

Models are seeded with their own generators, never torch's global RNG.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

import subriemann as sr
from subriemann.flow.trajectory import Trajectory
from subriemann.metrics import EuclideanMetric, OutputPullbackMetric, ParameterMetric
from tests.references import RANK_RTOL, DenseMetricReference

__all__ = [
    "ACTIVATIONS",
    "MLPSpec",
    "Problem",
    "make_mlp",
    "make_problem",
    "random_simplex",
    "perturbed_point",
    "dead_units_space",
    "tanh_mlp",
    "SquareAndLine",
    "Reparametrized",
    "Designed",
    "DiagonalPlusPullback",
    "ProblemCase",
    "CASES",
    "case_named",
    "flow_problem",
    "one_sample_space",
    "SQUARE_AND_LINE_START",
    "event_space",
    "run_event_flow",
    "TINY",
    "MetricCase",
    "tanh_case",
    "rank_deficient_case",
    "designed_case",
    "mlp_specs",
    "mlp_problems",
    "metric_cases",
    "HYP",
    "KAPPA_MAX",
]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


@dataclass(frozen=True)
class MLPSpec:
    """A small MLP: layer widths ``[M, h_1, ..., Q]``, activation, N and a seed."""

    widths: tuple[int, ...]
    activation: str = "tanh"
    num_samples: int = 5
    seed: int = 0

    @property
    def num_inputs(self) -> int:
        return self.widths[0]

    @property
    def num_outputs(self) -> int:
        return self.widths[-1]

    @property
    def num_params(self) -> int:
        return sum((a + 1) * b for a, b in zip(self.widths, self.widths[1:]))


@dataclass
class Problem:
    """A model with its training data (float32 by default, as a user would build it).

    ``loss`` and ``dtype`` are those of the space :meth:`space` builds.
    """

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    spec: MLPSpec | None = None
    loss: str = "mse"
    dtype: torch.dtype = torch.float64

    def space(self, loss: str | None = None, **kwargs) -> sr.ParameterSpace:
        """``ParameterSpace(model, inputs, targets, loss, dtype=..., **kwargs)``."""
        kwargs.setdefault("dtype", self.dtype)
        return sr.ParameterSpace(
            self.model, self.inputs, self.targets, loss or self.loss, **kwargs
        )


class SquareAndLine(nn.Module):
    r"""Two parameters, two outputs: :math:`x = (a, \tfrac12 b^2)`, :math:`D = \mathrm{diag}(1, b)`.

    The singular value :math:`\sigma_2 = |b|`.  With :math:`y = (y_1, 0)`, :math:`b(0) = 1`
    it falls through :math:`\tau = 1/2` at :math:`s = 3` (:math:`\lambda = 0`,
    :math:`b^2 = 1/(1+s)`) or :math:`s = 2\ln 2` (:math:`\lambda = 1`): rank 2 → 1.  At
    :math:`\lambda = 1` with a hard threshold the flow then freezes :math:`b = 1/2` and ends at
    :math:`P(x - y) = 0` with :math:`C = \tfrac12(1/8)^2 > 0`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.b = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x):
        return torch.stack([self.a, 0.5 * self.b**2], dim=1) * x


def make_mlp(
    widths: tuple[int, ...] | list[int],
    activation: str = "tanh",
    *,
    seed: int = 0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """``Linear → act → ... → Linear`` with seeded N(0, scale²/fan_in) weights.

    Uses its own generator, so it does not touch torch's global RNG.
    """
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        lin = nn.Linear(a, b, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen, dtype=dtype) * scale / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=gen, dtype=dtype))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def tanh_mlp(widths: tuple[int, ...], seed: int, gain: float = 2.0) -> nn.Module:
    """A float64 tanh MLP with weights N(0, gain^2/fan_in) and biases N(0, 1/4)."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b).double()
        with torch.no_grad():
            lin.weight.copy_(
                torch.randn(b, a, generator=gen, dtype=torch.float64) * gain / math.sqrt(a)
            )
            lin.bias.copy_(0.5 * torch.randn(b, generator=gen, dtype=torch.float64))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def random_simplex(n: int, q: int, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """``n`` random probability vectors of length ``q`` (rows of a softmax)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, q, generator=gen, dtype=torch.float64), dim=1).to(dtype)


def make_problem(spec: MLPSpec, loss: str = "mse") -> Problem:
    """The model of ``spec`` with random inputs and targets (simplex rows for cross-entropy)."""
    gen = torch.Generator().manual_seed(spec.seed + 12345)
    model = make_mlp(spec.widths, spec.activation, seed=spec.seed)
    inputs = torch.randn(spec.num_samples, spec.num_inputs, generator=gen)
    if loss == "mse":
        targets = torch.randn(spec.num_samples, spec.num_outputs, generator=gen)
    else:
        targets = random_simplex(spec.num_samples, spec.num_outputs, seed=spec.seed)
    return Problem(model, inputs, targets, spec, loss)


def perturbed_point(space: sr.ParameterSpace, scale: float = 0.3, seed: int | None = 0) -> Tensor:
    """The space's initial point plus ``scale`` times a standard normal vector.

    ``seed=None`` draws from torch's global RNG (seeded per test by ``tests/conftest.py``).
    """
    theta = space.initial_point()
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return theta + scale * torch.randn(space.dim, generator=gen, dtype=theta.dtype)


def dead_units_space(n: int, width: int, *, dead: int = 0, seed: int = 0) -> sr.ParameterSpace:
    """A float64 3-width-2 tanh MLP on ``n`` samples, the generic engine.

    ``dead`` hidden units with zero incoming and outgoing weights make D rank-deficient.
    """
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).double()
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


# -- models with a known geometry ------------------------------------------------------------
class Reparametrized(nn.Module):
    """x = F(B theta): an MLP F whose r parameters are B theta (rank D <= r everywhere)."""

    def __init__(self, inner: nn.Module, k: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self._inner = [inner]  # hidden from named_parameters: only theta is trainable
        self._names = [n for n, _ in inner.named_parameters()]
        self._shapes = [p.shape for _, p in inner.named_parameters()]
        r = sum(p.numel() for p in inner.parameters())
        self.register_buffer(
            "B", torch.randn(r, k, generator=gen, dtype=torch.float64) / math.sqrt(k)
        )
        self.theta = nn.Parameter(torch.randn(k, generator=gen, dtype=torch.float64))

    def forward(self, x):
        z, params, i = self.B @ self.theta, {}, 0
        for n, shp in zip(self._names, self._shapes):
            params[n] = z[i : i + shp.numel()].reshape(shp)
            i += shp.numel()
        return functional_call(self._inner[0], params, (x,))


class Designed(nn.Module):
    """x_j = tanh(<a_j, theta>) at small theta: D = diag(sech^2) A, A's spectrum prescribed."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.lin = nn.Linear(k, 1, bias=False).double()
        with torch.no_grad():
            self.lin.weight.mul_(1e-3)  # tanh' ~ 1: the spectrum of D is that of A

    def forward(self, x):
        return torch.tanh(self.lin(x))


class DiagonalPlusPullback(ParameterMetric):
    """Recipe (a): only metric_matrix, g = D^T D + diag(1 + theta^2)."""

    def metric_matrix(self, base_point):
        d = self.space.jacobian(base_point)
        return d.T @ d + torch.diag(1.0 + base_point**2)


# -- the table of problems every engine test runs on ----------------------------------------
def _conv_problem() -> Problem:
    """Conv2d → tanh → Linear on 4×4 one-channel images: K = 38 > QN = 8."""
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    inputs = torch.randn(4, 1, 4, 4, generator=gen)
    return Problem(model, inputs, torch.randn(4, 2, generator=gen))


def _embedding_problem() -> Problem:
    """Integer inputs: Embedding → tanh → Linear (the Jacobian has no input derivative)."""
    gen = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.Embedding(7, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    inputs = torch.randint(0, 7, (5, 2), generator=gen)
    return Problem(model, inputs, torch.randn(5, 2, generator=gen))


def _rank_deficient_problem() -> Problem:
    """x = F(B θ) with r = 9 inner parameters: rank D ≤ 9 < QN = 12 < K = 20 everywhere."""
    model = Reparametrized(tanh_mlp((2, 2, 1), seed=3), k=20, seed=3)
    gen = torch.Generator().manual_seed(10)
    inputs = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    return Problem(model, inputs, torch.randn(12, 1, generator=gen, dtype=torch.float64))


def _frozen_problem() -> Problem:
    """LayerNorm, a frozen bias and a buffer: only trainable parameters are coordinates."""
    gen = torch.Generator().manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    model[0].bias.requires_grad_(False)
    model.register_buffer("shift", torch.tensor(0.5))
    return Problem(model, torch.randn(6, 3, generator=gen), torch.randn(6, 2, generator=gen))


def _float32_problem() -> Problem:
    p = make_problem(MLPSpec((3, 5, 2), "tanh", 4, seed=7))
    p.dtype = torch.float32
    return p


@dataclass(frozen=True)
class ProblemCase:
    """A named problem of :data:`CASES`; ``build()`` makes a fresh one (models are mutable)."""

    name: str
    build: Callable[[], Problem] = field(repr=False)


CASES: list[ProblemCase] = [
    ProblemCase("mlp-wide", lambda: make_problem(MLPSpec((3, 8, 2), "tanh", 5, seed=1))),
    ProblemCase("mlp-tall", lambda: make_problem(MLPSpec((2, 2, 1), "tanh", 40, seed=2))),
    ProblemCase(
        "mlp-ce",
        lambda: make_problem(MLPSpec((2, 6, 3), "softplus", 6, seed=3), "cross_entropy"),
    ),
    ProblemCase("mlp-float32", _float32_problem),
    ProblemCase("conv", _conv_problem),
    ProblemCase("frozen-and-buffers", _frozen_problem),
    ProblemCase("embedding", _embedding_problem),
    ProblemCase("rank-deficient", _rank_deficient_problem),
]


def case_named(name: str) -> Problem:
    """A fresh :class:`Problem` of the case called ``name`` in :data:`CASES`."""
    (found,) = [c for c in CASES if c.name == name]
    return found.build()


# -- spaces equipped for flows ---------------------------------------------------------------
def flow_problem(
    widths: tuple[int, ...] | list[int],
    n: int,
    seed: int = 0,
    metric: type = OutputPullbackMetric,
    *,
    loss: str = "mse",
    dtype: torch.dtype = torch.float64,
    **metric_kw,
) -> tuple[sr.ParameterSpace, Problem]:
    """A tanh MLP of ``widths`` on ``n`` samples, its space equipped with ``metric``."""
    p = make_problem(MLPSpec(tuple(widths), "tanh", num_samples=n, seed=seed), loss=loss)
    space = p.space(dtype=dtype)
    space.equip_with_metric(metric, **metric_kw)
    return space, p


def one_sample_space(model: nn.Module, y, metric: type | None = None, **metric_kw):
    """One sample (input 1) with targets ``y`` (Q numbers), float64, the generic engine.

    For the constructed modules of the flow tests (``SquareAndLine`` and others),
    which the structured engine does not support: its warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        space = sr.ParameterSpace(
            model,
            torch.ones(1, 1, dtype=torch.float64),
            torch.tensor(y, dtype=torch.float64).reshape(1, -1),
        )
    if metric is not None:
        space.equip_with_metric(metric, **metric_kw)
    return space


#: the start (a, b) = (0, 1) of the :class:`SquareAndLine` flows
SQUARE_AND_LINE_START = (0.0, 1.0)


def event_space(metric: type = EuclideanMetric) -> sr.ParameterSpace:
    """:class:`SquareAndLine`, ``y = (1, 0)``, ``τ = 1/2``: one rank event (s = 3 at λ = 0)."""
    return one_sample_space(SquareAndLine(), [1.0, 0.0], metric, rank_atol=0.5)


def run_event_flow(**kw) -> Trajectory:
    """The flow of :func:`event_space` (or ``space=``) from (0, 1) to s = 4 at ``rtol=1e-8``."""
    space = kw.pop("space", None) or event_space()
    start = torch.tensor(SQUARE_AND_LINE_START, dtype=torch.float64)
    return sr.gradient_flow(space, start, 4.0, rtol=1e-8, **kw)  # type: ignore[return-value]


# -- `subriemann run` on a tiny problem -------------------------------------------------------
#: Flags of a tiny run: teacher–student data, a 6-unit MLP, N = 5, s_end = 0.5 (about 1 s).
TINY = [
    "--data", "teacher", "--model", "mlp:6", "--n-samples", "5", "--s-end", "0.5",
    "--metrics", "euclidean,pullback", "--rtol", "1e-7", "--max-time", "60", "--no-progress",
]


# -- drawn problems at a point, with their dense metric reference ------------------------
class MetricCase:
    """A drawn problem: model, data, space, point and its reference."""

    def __init__(
        self,
        model,
        inputs,
        targets,
        loss: str = "mse",
        rtol: float = RANK_RTOL,
        backend: str = "auto",
    ) -> None:
        self.model, self.inputs, self.targets, self.loss = model, inputs, targets, loss
        self.backend = backend
        self.space = self.fresh()
        self.theta = self.space.initial_point()
        self.ref = DenseMetricReference(model, inputs, targets, self.theta, loss=loss, rtol=rtol)

    def fresh(self) -> sr.ParameterSpace:
        """A new space on the same problem (metrics with different options side by side)."""
        return sr.ParameterSpace(
            self.model, self.inputs, self.targets, loss=self.loss, backend=self.backend
        )

    def metric(self, cls, **kw):
        return self.fresh().equip_with_metric(cls, **kw).metric


def tanh_case(widths: tuple[int, ...], n: int, seed: int) -> MetricCase:
    """:func:`tanh_mlp` on ``n`` standard normal inputs and targets (float64, MSE)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, widths[0], generator=gen, dtype=torch.float64)
    targets = torch.randn(n, widths[-1], generator=gen, dtype=torch.float64)
    return MetricCase(tanh_mlp(widths, seed), inputs, targets)


def rank_deficient_case(seed: int, critical: bool) -> MetricCase:
    """x = F(Bθ), K = 20 > QN = 12 > r = 9, with targets that make θ critical or not.

    The output gradient ``x - y`` is put in the left null space of ``D`` (critical)
    or given a component along its first left singular vector (not critical).
    """
    inner = tanh_mlp((2, 2, 1), seed)  # r = 9 parameters
    model = Reparametrized(inner, k=20, seed=seed)  # K = 20 > QN = 12 > r = 9
    gen = torch.Generator().manual_seed(seed + 7)
    inputs = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    probe = DenseMetricReference(
        model,
        inputs,
        torch.zeros(12, 1, dtype=torch.float64),
        torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
    )
    assert probe.r <= 9 < 12
    left_null = probe.U[:, probe.r :] if probe.U.shape[1] > probe.r else None
    if left_null is None:  # thin SVD: complete the left null space
        q, _ = np.linalg.qr(
            np.c_[probe.U[:, : probe.r], np.random.default_rng(seed).standard_normal((12, 12))]
        )
        left_null = q[:, probe.r :]
    gvec = left_null @ np.random.default_rng(seed).standard_normal(left_null.shape[1])
    if not critical:
        gvec = gvec + probe.U[:, 0]  # a component in ran D
    targets = torch.as_tensor(probe.x - gvec).reshape(12, 1)  # so that grad_x C = x - y = gvec
    return MetricCase(model, inputs, targets, backend="func")  # a custom module: generic engine


def designed_case(sigmas, k: int, seed: int = 0, rtol: float = RANK_RTOL) -> MetricCase:
    """A model whose Jacobian has (nearly) the singular values ``sigmas`` (QN = len(sigmas))."""
    rng = np.random.default_rng(seed)
    n = len(sigmas)
    u = np.linalg.qr(rng.standard_normal((n, n)))[0]
    v = np.linalg.qr(rng.standard_normal((k, n)))[0]
    a = torch.as_tensor(u @ np.diag(sigmas) @ v.T)
    targets = torch.as_tensor(rng.standard_normal((n, 1)))
    return MetricCase(Designed(k), a, targets, rtol=rtol, backend="func")


# -- hypothesis strategies ----------------------------------------------------------
@st.composite
def mlp_specs(
    draw: st.DrawFn,
    *,
    max_depth: int = 3,
    max_width: int = 6,
    max_inputs: int = 4,
    min_outputs: int = 1,
    max_outputs: int = 3,
    max_samples: int = 6,
) -> MLPSpec:
    """Random small MLPs: depth (hidden layers) 0..max_depth, widths, activation, Q ≥ 1, N ≥ 1."""
    depth = draw(st.integers(0, max_depth))
    m = draw(st.integers(1, max_inputs))
    hidden = tuple(draw(st.integers(1, max_width)) for _ in range(depth))
    q = draw(st.integers(min_outputs, max_outputs))
    act = draw(st.sampled_from(sorted(ACTIVATIONS)))
    n = draw(st.integers(1, max_samples))
    seed = draw(st.integers(0, 2**16))
    return MLPSpec((m, *hidden, q), act, n, seed)


def mlp_problems(loss: str = "mse", **kwargs: int) -> st.SearchStrategy[Problem]:
    """:class:`Problem` instances built from :func:`mlp_specs` (cross-entropy: Q ≥ 2)."""
    if loss != "mse":
        kwargs.setdefault("min_outputs", 2)
    return mlp_specs(**kwargs).map(lambda spec: make_problem(spec, loss))


#: hypothesis settings of the tests drawing :func:`metric_cases` (each draw runs solves)
HYP = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

#: drawn networks are kept when kappa(D) <= KAPPA_MAX (see tests/metrics/test_builtin.py)
KAPPA_MAX = 1e4


@st.composite
def metric_cases(draw, regime: str | None = None, loss: str = "mse", kappa_max: float = KAPPA_MAX):
    """Random small tanh MLPs, overparametrized (K > QN) or underparametrized (K < QN)."""
    regime = regime or draw(st.sampled_from(["over", "under"]))
    m = draw(st.integers(1, 3))
    q = draw(st.integers(2, 3)) if loss == "cross_entropy" else draw(st.integers(1, 2))
    if regime == "over":
        hidden = draw(st.lists(st.integers(2, 6), min_size=1, max_size=2))
    else:
        hidden = [draw(st.integers(2, 4))]
    widths = (m, *hidden, q)
    k = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
    if regime == "over":
        n = draw(st.integers(1, min(8, (k - 1) // q)))
    else:
        n = k // q + draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**20))
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = torch.randn(n, m, generator=gen, dtype=torch.float64)
    targets = torch.randn(n, q, generator=gen, dtype=torch.float64)
    if loss == "cross_entropy":
        targets = torch.softmax(2 * targets, -1)
    case = MetricCase(tanh_mlp(widths, seed), inputs, targets, loss=loss)
    assert (case.space.dim > case.space.output_dim) == (regime == "over")
    assume(case.ref.kappa <= kappa_max)
    return case
