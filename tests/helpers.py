"""Reusable model builders, independent reference computations and hypothesis strategies.

Import them from any test file::

    from tests.helpers import make_mlp, mlp_problems, reference_outputs

Everything here is written *independently* of :mod:`subriemann`: the
parameter flattening, the outputs, the Jacobian and the costs are computed
directly from the torch model, so that tests compare the library against
a second implementation rather than against itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "REPO_ROOT",
    "ACTIVATIONS",
    "MLPSpec",
    "Problem",
    "make_mlp",
    "make_problem",
    "random_simplex",
    "flat_params",
    "unflat_params",
    "reference_outputs",
    "reference_jacobian",
    "central_fd_jacobian",
    "mse_by_hand",
    "ce_by_hand",
    "mlp_specs",
    "mlp_problems",
]

#: The repository root (test files in sub-folders find examples/, benchmarks/, docs/ here).
REPO_ROOT = Path(__file__).resolve().parents[1]

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
    """A model with its training data (float32, as a user would build it)."""

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    spec: MLPSpec | None = None



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
    return Problem(model, inputs, targets, spec)


# -- independent references ---------------------------------------------------------
def flat_params(model: nn.Module, dtype: torch.dtype = torch.float64) -> Tensor:
    """Trainable parameters in ``named_parameters()`` order, each flattened row-major."""
    return torch.cat(
        [p.detach().reshape(-1).to(dtype) for _, p in model.named_parameters() if p.requires_grad]
    )


def unflat_params(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    """Inverse of :func:`flat_params` (views of ``theta``)."""
    out, i = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = theta[i : i + p.numel()].view(p.shape)
            i += p.numel()
    assert i == theta.numel(), "theta does not match the model"
    return out


def _as64(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).to(torch.float64)
    m.eval()
    return m


def reference_outputs(model: nn.Module, inputs: Tensor, theta: Tensor | None = None) -> Tensor:
    """The model called directly on the whole batch (float64, eval), flattened sample-major."""
    m = _as64(model)
    x = inputs.to(torch.float64) if inputs.is_floating_point() else inputs
    with torch.no_grad():
        if theta is None:
            out = m(x)
        else:
            out = functional_call(m, unflat_params(m, theta), (x,))
    return out.reshape(inputs.shape[0], -1).reshape(-1)


def reference_jacobian(model: nn.Module, inputs: Tensor, theta: Tensor) -> Tensor:
    """:func:`torch.func.jacrev` of the *batched* model call, shape ``[QN, K]``."""
    m = _as64(model)
    x = inputs.to(torch.float64) if inputs.is_floating_point() else inputs

    def f(t: Tensor) -> Tensor:
        return functional_call(m, unflat_params(m, t), (x,)).reshape(-1)

    return torch.func.jacrev(f)(theta)


def central_fd_jacobian(f: Callable[[Tensor], Tensor], theta: Tensor, h: float = 1e-6) -> Tensor:
    """Central finite differences ``(f(θ + h e_k) - f(θ - h e_k)) / 2h``, shape ``[QN, K]``."""
    cols = []
    for k in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[k] = h
        cols.append((f(theta + e) - f(theta - e)) / (2 * h))
    return torch.stack(cols, dim=1)


def mse_by_hand(x: Tensor, y: Tensor) -> Tensor:
    """½ Σ (x − y)², written out."""
    d = x - y
    return 0.5 * (d * d).sum()


def ce_by_hand(x: Tensor, y: Tensor) -> Tensor:
    """Σ_j −⟨y_j, log softmax(x_j)⟩ with the softmax written out (fine for moderate logits)."""
    e = torch.exp(x)
    p = e / e.sum(dim=-1, keepdim=True)
    return -(y * torch.log(p)).sum()


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
