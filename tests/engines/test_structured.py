"""The structured NTK engine (:mod:`subriemann.engines.structured`) against dense references.

Every route (dense ``Linear``, the ``"jacobian"`` and ``"structured"`` routes of
layers with positions, normalization layers, residual blocks, chunked and
tiled assembly, the cached ``vjp``/``jvp``) is compared in float64 with
:math:`DD^\\top`, :math:`D^\\top u` and :math:`Dv` where :math:`D` is computed
by ``torch.func.jacrev`` of the whole batch, flattening the parameters
directly from ``model.named_parameters()`` (independently of
:class:`~subriemann.engines.func.ParameterLayout`).

Tolerance: ``1e-12`` relative to ``max |reference|``.  Both sides are
float64 sums of at most a few thousand products of O(1) numbers computed by
different contraction orders; their rounding errors are
:math:`O(\\sqrt{K}\\,\\varepsilon)\\approx 10^{-14}` relative (observed:
below ``2e-15``).  A missing or doubled term (a position pair, a bias, a
layer, a sample block) changes entries by O(1) relative amounts, so
``1e-12`` separates the two by many orders of magnitude.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import subriemann as sr
from subriemann import _warnings
from subriemann.engines import FuncBackend, make_backend
from subriemann.engines.structured import (
    ELEMENTWISE,
    StructuredBackend,
    UnsupportedModuleError,
)
from subriemann.nn import Residual
from tests.cases import perturbed_point
from tests.helpers import close_to_max
from tests.references import reference_jacobian

RTOL = 1e-12
DT = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


# -- helpers --------------------------------------------------------
def _trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def structured_space(model: nn.Module, inputs: Tensor, q: int, **kw) -> sr.ParameterSpace:
    targets = torch.zeros(inputs.shape[0], q, dtype=DT)
    space = sr.ParameterSpace(model, inputs, targets, backend="structured", **kw)
    assert isinstance(space.backend, StructuredBackend)
    return space


def check_all(space: sr.ParameterSpace, theta: Tensor, rtol: float = RTOL) -> Tensor:
    """ntk, outputs, cached and uncached vjp/jvp (single and batched) against D."""
    be = space.backend
    d = reference_jacobian(space.module, space.inputs, theta)
    k, qn = space.dim, space.output_dim
    u = torch.randn(3, qn, dtype=theta.dtype)
    v = torch.randn(3, k, dtype=theta.dtype)
    # uncached products (the fallback engine)
    be._cache = None
    close_to_max(be.vjp(theta, u[0]), d.T @ u[0], rtol)
    close_to_max(be.jvp(theta, v[0]), d @ v[0], rtol)
    gram = be.ntk(theta)
    close_to_max(gram, d @ d.T, rtol)
    assert torch.equal(gram, gram.T)
    # products from the factors cached by ntk
    assert be._cached(theta) is not None
    close_to_max(be.outputs(theta), space.backend.fallback.outputs(theta), rtol)
    close_to_max(be.vjp(theta, u[0]), d.T @ u[0], rtol)
    close_to_max(be.jvp(theta, v[0]), d @ v[0], rtol)
    close_to_max(be.vjp(theta, u), u @ d, rtol)
    close_to_max(be.jvp(theta, v), v @ d.T, rtol)
    x, g = be.pullback(theta, lambda x: 2.0 * x)
    close_to_max(g, d.T @ (2.0 * x), rtol)
    return gram


# -- the table of cases --------------------------------------------------------
def _mlp(widths, act=nn.Tanh, bias=True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _conv2d_net(q: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="circular"),
        nn.GroupNorm(2, 4),
        nn.SiLU(),
        nn.Conv2d(4, 4, 2, groups=2, dilation=1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4, q),
    )


def _conv1d_net(q: int) -> nn.Module:
    first = nn.Conv1d(3, 4, 3, padding="same", dilation=2)
    first.weight.requires_grad_(False)  # frozen weight, trainable bias
    return nn.Sequential(
        first,
        nn.Tanh(),
        nn.Conv1d(4, 4, 2, groups=2, padding="same", bias=False),
        nn.ELU(),
        nn.Conv1d(4, 2, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.AdaptiveAvgPool1d(2),
        nn.Flatten(),
        nn.Linear(4, q),
    )


def _residual_net(q: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.LayerNorm(6),
        Residual(nn.Sequential(nn.Linear(6, 6), nn.ReLU(inplace=True), nn.Linear(6, 6))),
        nn.Tanh(),
        Residual(nn.Sequential(nn.Linear(6, 5), nn.GELU()), shortcut=nn.Linear(6, 5, bias=False)),
        nn.Linear(5, q),
    )


def _sequence_net(q: int) -> nn.Module:
    # Linear layers on [N, T, d] inputs: P = T positions
    return nn.Sequential(
        nn.Linear(3, 5),
        nn.RMSNorm(5),
        nn.Softplus(),
        nn.Linear(5, 2),
        nn.Flatten(),
        nn.Linear(8, q),
    )


def _norm_net(q: int) -> nn.Module:
    bn = nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(
        nn.Linear(4, 6),
        bn,
        nn.PReLU(6),
        nn.Sigmoid(),
        nn.LayerNorm(6, elementwise_affine=False),
        nn.Linear(6, 6),
        nn.LayerNorm(6, bias=False),
        nn.Dropout(0.5),
        nn.PReLU(),
        nn.Linear(6, q),
        nn.LogSoftmax(dim=-1),
    ).eval()


CASES = {
    # name: (model builder, input shape (N, ...), Q, chunk_size)
    "mlp-tanh-q1": (lambda q: _mlp([3, 8, 8, q]), (6, 3), 1, None),
    "mlp-relu-q3": (lambda q: _mlp([4, 10, q], nn.ReLU), (5, 4), 3, None),
    "mlp-deep-mixed": (
        lambda q: nn.Sequential(
            nn.Linear(3, 7),
            nn.GELU(),
            nn.Linear(7, 7),
            nn.SiLU(),
            nn.Linear(7, 5),
            nn.Softplus(),
            nn.Linear(5, 5),
            nn.LeakyReLU(0.1),
            nn.Linear(5, q),
        ),
        (6, 3),
        2,
        None,
    ),
    "mlp-no-bias-sigmoid-out": (
        lambda q: nn.Sequential(_mlp([3, 6, q], nn.ELU, bias=False), nn.Sigmoid()),
        (5, 3),
        2,
        None,
    ),
    "one-sample-q4": (lambda q: _mlp([3, 6, 6, q]), (1, 3), 4, None),
    "chunked-q2": (lambda q: _mlp([3, 6, 5, q]), (7, 3), 2, 3),
    "chunk-of-one": (lambda q: _mlp([2, 4, q]), (4, 2), 3, 1),
    "tiled-diagonal": (lambda q: _mlp([3, 5, q]), (70, 3), 2, None),
    "conv2d": (_conv2d_net, (5, 2, 7, 7), 3, None),
    "conv1d": (_conv1d_net, (4, 3, 9), 2, None),
    "residual": (_residual_net, (6, 4), 2, 4),
    "sequence-linear": (_sequence_net, (5, 4, 3), 3, None),
    "norms-dropout-logsoftmax": (_norm_net, (6, 4), 3, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_against_dense_reference(name):
    build, shape, q, chunk = CASES[name]
    model = build(q).to(DT)
    inputs = torch.randn(*shape, dtype=DT)
    space = structured_space(model, inputs, q, chunk_size=chunk)
    check_all(space, perturbed_point(space, seed=None))


@pytest.mark.parametrize("route", ["jacobian", "structured"])
@pytest.mark.parametrize("name", ["conv2d", "conv2d-chunked", "conv1d", "sequence-linear"])
def test_both_position_routes(name, route):
    build, shape, q, chunk = {**CASES, "conv2d-chunked": (_conv2d_net, (5, 2, 7, 7), 2, 2)}[name]
    model = build(q).to(DT)
    inputs = torch.randn(*shape, dtype=DT)
    space = structured_space(model, inputs, q, chunk_size=chunk)
    be = StructuredBackend(
        space.module,
        space.layout,
        space.inputs,
        q,
        chunk,
        fallback=space.backend.fallback,
        route=route,
    )
    positional = [layer for layer in be.layers if getattr(layer, "positions", 1) > 1]
    assert positional and all(layer.route == route for layer in positional)
    space.backend = be
    check_all(space, perturbed_point(space, seed=None))


def test_structured_sub_blocks():
    """The ``"structured"`` route split into sub-blocks of a bounded temporary (64 entries)."""
    build, shape, q, _ = CASES["conv1d"]
    model = build(q).to(DT)
    inputs = torch.randn(*shape, dtype=DT)
    space = structured_space(model, inputs, q)
    space.backend = StructuredBackend(
        space.module,
        space.layout,
        space.inputs,
        q,
        None,
        fallback=space.backend.fallback,
        route="structured",
    )
    for layer in space.backend.layers:
        layer.block_entries = 64
    check_all(space, perturbed_point(space, seed=None))


@pytest.mark.parametrize("chunk", [None, 70])
def test_diagonal_block_in_strips(chunk):
    """QN = 600: the diagonal block in four strips and mirrored over several 128-row strips;
    one chunk or several (off-diagonal blocks)."""
    torch.manual_seed(3)
    model = _mlp([3, 5, 4, 2]).to(DT)
    space = structured_space(model, torch.randn(300, 3, dtype=DT), 2, chunk_size=chunk)
    check_all(space, perturbed_point(space, seed=None))


def test_mirror_upper():
    """Lower triangle := upper triangle transposed, strip by strip, against ``triu``."""
    from subriemann.engines.kspace import mirror_upper as _mirror_upper

    m = torch.randn(11, 11, dtype=DT)
    expected = torch.triu(m) + torch.triu(m, 1).T
    _mirror_upper(m, tile=4)
    assert torch.equal(m, expected)


@pytest.mark.parametrize("act", ELEMENTWISE, ids=lambda c: c.__name__)
def test_every_elementwise_activation(act):
    model = nn.Sequential(nn.Linear(3, 5), act(), nn.Linear(5, 2)).to(DT)
    space = structured_space(model, torch.randn(4, 3, dtype=DT), 2)
    check_all(space, perturbed_point(space, seed=None))


def test_frozen_parameters_are_held_fixed():
    model = _mlp([3, 6, 6, 2]).to(DT)
    model[0].requires_grad_(False)  # a frozen first layer
    model[2].bias.requires_grad_(False)  # a frozen bias
    model[4].weight.requires_grad_(False)  # only the last bias trains in the last layer
    space = structured_space(model, torch.randn(5, 3, dtype=DT), 2)
    assert space.dim == 6 * 6 + 2
    check_all(space, perturbed_point(space, seed=None))


def test_rank_deficient_point_dead_relu():
    """A dead ReLU layer: D and the NTK lose rank, and still match the reference."""
    model = _mlp([3, 8, 8, 2], nn.ReLU).to(DT)
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.fill_(-1.0)  # second hidden layer dead for every input
    inputs = torch.randn(6, 3, dtype=DT)
    space = structured_space(model, inputs, 2)
    theta = space.initial_point()
    gram = check_all(space, theta)
    # only the last layer's bias-free part and its bias see a signal: rank <= 2 < QN = 12
    assert int(torch.linalg.matrix_rank(gram)) <= 2 < space.output_dim


def test_rank_deficient_point_zero_weights():
    model = _mlp([2, 5, 5, 3]).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    space = structured_space(model, torch.randn(4, 2, dtype=DT), 3)
    gram = check_all(space, space.initial_point())
    assert int(torch.linalg.matrix_rank(gram)) < space.output_dim


def test_float32():
    model = _mlp([3, 16, 16, 2])
    inputs = torch.randn(8, 3)
    space = sr.ParameterSpace(
        model, inputs, torch.zeros(8, 2), backend="structured", dtype=torch.float32
    )
    theta = space.initial_point()
    gram = space.ntk(theta)
    assert gram.dtype == torch.float32
    d = reference_jacobian(space.module, space.inputs, theta)
    close_to_max(gram, d @ d.T, rtol=1e-5)


def test_cache_is_keyed_on_theta():
    model = _mlp([3, 6, 2]).to(DT)
    space = structured_space(model, torch.randn(5, 3, dtype=DT), 2)
    be = space.backend
    theta = perturbed_point(space, seed=None)
    be.ntk(theta)
    u = torch.randn(space.output_dim, dtype=DT)
    other = theta + 0.1
    def ref_vjp(t):
        return reference_jacobian(space.module, space.inputs, t).T @ u

    close_to_max(be.vjp(other, u), ref_vjp(other))
    close_to_max(be.vjp(theta.clone(), u), ref_vjp(theta))
    theta.add_(0.1)  # modified in place after ntk: the cache must not be used
    close_to_max(be.vjp(theta, u), ref_vjp(theta))
    assert be._cache is None


def test_differentiable_through_the_fallback():
    """Under torch.func transforms jvp/ntk go through the differentiable generic engine."""
    model = _mlp([2, 5, 2]).to(DT)
    space = structured_space(model, torch.randn(3, 2, dtype=DT), 2)
    func = FuncBackend(space._apply, space.layout, space.inputs, 2)
    theta, v = perturbed_point(space, seed=None), torch.randn(space.dim, dtype=DT)
    space.backend.ntk(theta)  # factors cached at theta must not leak into the derivative
    second = torch.func.jvp(lambda t: space.backend.jvp(t, v), (theta,), (v,))[1]
    close_to_max(second, torch.func.jvp(lambda t: func.jvp(t, v), (theta,), (v,))[1])
    dntk = torch.func.jvp(space.backend.ntk, (theta,), (v,))[1]
    close_to_max(dntk, torch.func.jvp(func.ntk, (theta,), (v,))[1])


def test_ntk_memory_stays_with_the_factors():
    """At K >> QN the engine never allocates anything of the size of D."""
    model = _mlp([16, 256, 256, 1]).to(DT)  # K = 70k, QN = 8: D would be 560k entries
    space = structured_space(model, torch.randn(8, 16, dtype=DT), 1)
    be = space.backend
    per_sample = sum(layer.feature_numel(1) for layer in be.layers)
    assert per_sample * 8 < space.dim * space.output_dim / 50
    theta = space.initial_point()
    gram = be.ntk(theta)
    d = reference_jacobian(space.module, space.inputs, theta)
    close_to_max(gram, d @ d.T)


# -- hypothesis: random small MLPs -----------------------------------------------
_ACTS = [nn.Tanh, nn.ReLU, nn.GELU, nn.Softplus, nn.Sigmoid, nn.SiLU, nn.Identity]


@settings(max_examples=10, deadline=None)
@given(
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    act=st.sampled_from(_ACTS),
    n=st.integers(1, 6),
    q=st.integers(1, 3),
    chunk=st.one_of(st.none(), st.integers(1, 6)),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_mlps(widths, act, n, q, chunk, bias, seed):
    torch.manual_seed(seed)
    model = _mlp([3, *widths, q], act, bias=bias).to(DT)
    space = structured_space(model, torch.randn(n, 3, dtype=DT), q, chunk_size=chunk)
    check_all(space, perturbed_point(space, 0.5, seed=None))


# -- unsupported modules fall back -------------------------------------------------
class MyOddBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * 2.0


class MySequential(nn.Sequential):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + 1.0


def _shared() -> nn.Module:
    lin = nn.Linear(3, 3)
    return nn.Sequential(lin, nn.Tanh(), lin)


def _tied() -> nn.Module:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), b)


def _hooked() -> nn.Module:
    m = _mlp([3, 4, 2])
    m[0].register_forward_hook(lambda mod, inp, out: out * 2)
    return m


UNSUPPORTED = {
    "custom-module": (lambda: nn.Sequential(MyOddBlock(), nn.Tanh()), "MyOddBlock"),
    "custom-root": (lambda: MyOddBlock(), "MyOddBlock"),
    "sequential-subclass": (lambda: MySequential(nn.Linear(3, 2)), "MySequential"),
    "tied-weights": (_tied, "Linear at '2'"),
    "hooks": (_hooked, "Linear at '0'"),
    "conv-transpose": (
        lambda: nn.Sequential(
            nn.Unflatten(1, (1, 3)), nn.ConvTranspose1d(1, 1, 2), nn.Flatten(), nn.Linear(4, 2)
        ),
        "ConvTranspose1d at '1'",
    ),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_module_falls_back_with_warning(name, monkeypatch):
    build, module_name = UNSUPPORTED[name]
    monkeypatch.setattr(_warnings, "_SEEN", set())
    model = build().to(DT)
    inputs = torch.randn(4, 3, dtype=DT)
    targets = torch.zeros(4, 3 if name == "tied-weights" else 2, dtype=DT)
    with pytest.warns(UserWarning, match=module_name.split(" ")[0]) as record:
        space = sr.ParameterSpace(model, inputs, targets)
    assert any(module_name in str(w.message) for w in record)
    assert isinstance(space.backend, FuncBackend)
    theta = space.initial_point()
    d = reference_jacobian(space.module, space.inputs, theta)
    close_to_max(space.ntk(theta), d @ d.T)
    with pytest.raises(ValueError, match="does not support"):
        sr.ParameterSpace(model, inputs, targets, backend="structured")


def test_warning_is_issued_once(monkeypatch):
    monkeypatch.setattr(_warnings, "_SEEN", set())
    model = nn.Sequential(MyOddBlock()).to(DT)
    inputs, targets = torch.randn(3, 3, dtype=DT), torch.zeros(3, 2, dtype=DT)
    with pytest.warns(UserWarning, match="MyOddBlock"):
        sr.ParameterSpace(model, inputs, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sr.ParameterSpace(model, inputs, targets)


@pytest.mark.parametrize(
    "model, module_name",
    [
        (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2)).train(), "Dropout"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train(), "BatchNorm1d"),
        (nn.Sequential(nn.Linear(3, 2), nn.Softmax(dim=0)), "Softmax"),
        (nn.Sequential(nn.Linear(3, 2), nn.Softmax(dim=-2)), "Softmax"),
        (nn.Sequential(nn.Linear(3, 2), nn.Softmax()), "Softmax"),
        (nn.Sequential(nn.Linear(3, 2), nn.Flatten(0)), "Flatten"),
        # (ParameterSpace cannot be used here: torch.func.functional_call leaves plain
        # tensors in place of the parameters of a module listed twice)
        (_shared(), "Linear at '2'"),
    ],
    ids=[
        "dropout-train",
        "batchnorm-train",
        "softmax-dim0",
        "softmax-dim-2",
        "softmax-implicit",
        "flatten-dim0",
        "same-module-twice",
    ],
)
def test_sample_mixing_layers_are_refused_by_the_engine(model, module_name):
    """Direct construction: modules that are not per-sample maps are refused."""
    from subriemann.engines import ParameterLayout

    model = model.to(DT)
    named = _trainable(model)
    layout = ParameterLayout([n for n, _ in named], [p.shape for _, p in named])
    with pytest.raises(UnsupportedModuleError) as err:
        StructuredBackend(model, layout, torch.randn(4, 3, dtype=DT), 2)
    assert err.value.module_name.startswith(module_name)


def test_make_backend_auto_and_bad_route():
    model = _mlp([3, 4, 2]).to(DT)
    space = sr.ParameterSpace(model, torch.randn(4, 3, dtype=DT), torch.zeros(4, 2, dtype=DT))
    assert space.backend.name == "structured"  # "auto" picks the structured engine
    be = make_backend("func", space.module, space._apply, space.layout, space.inputs, 2)
    assert be.name == "func"
    with pytest.raises(ValueError, match="route"):
        StructuredBackend(space.module, space.layout, space.inputs, 2, route="fast")


def test_fallback_ntk_in_bounded_blocks(monkeypatch):
    """The generic engine accumulates DD^T over parameter groups of bounded size."""
    model = MySequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    inputs = torch.randn(5, 3, dtype=DT)
    with pytest.warns(UserWarning):
        space = sr.ParameterSpace(model, inputs, torch.zeros(5, 2, dtype=DT), chunk_size=2)
    be = space.backend
    assert isinstance(be, FuncBackend)
    monkeypatch.setattr(be, "ntk_block_entries", 10 * space.output_dim, raising=False)
    theta = perturbed_point(space, seed=None)
    d = reference_jacobian(space.module, space.inputs, theta)
    close_to_max(be.ntk(theta), d @ d.T)


def test_residual_module_is_a_plain_module():
    block = Residual(nn.Linear(3, 3), shortcut=nn.Identity()).to(DT)
    x = torch.randn(2, 3, dtype=DT)
    assert torch.allclose(block(x), x + block.body(x))
    clone = copy.deepcopy(block)
    assert [n for n, _ in clone.named_parameters()] == ["body.weight", "body.bias"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda():
    model = _conv2d_net(2).to(DT)
    inputs = torch.randn(5, 2, 7, 7, dtype=DT)
    space = sr.ParameterSpace(model, inputs, torch.zeros(5, 2), backend="structured", device="cuda")
    theta = perturbed_point(space, seed=None)
    assert theta.is_cuda
    check_all(space, theta)


# -- parameter space: D^T D and shifted solves (engines.kspace) ---------------------------
def _shifted_reference(d: Tensor, shift: float, rhs: Tensor) -> tuple[Tensor, float]:
    """(D^T D + shift 1)^{-1} rhs by an eigendecomposition (independent of Cholesky), and the
    tolerance of a backward-stable solve: 10 K cond eps relative (Cholesky's forward error
    is at most c K cond eps; observed below 1e-14 here)."""
    gram = d.T @ d
    evals, evecs = torch.linalg.eigh(gram + shift * torch.eye(gram.shape[0], dtype=d.dtype))
    x = evecs @ ((evecs.T @ rhs) / evals[:, None] if rhs.ndim == 2 else (evecs.T @ rhs) / evals)
    cond = float(evals.max() / evals.min())
    return x, 10.0 * gram.shape[0] * cond * torch.finfo(d.dtype).eps


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("route", ["auto", "structured", "jacobian"])
def test_param_gram_and_shifted_solve(name, route):
    """D^T D from the factors (Kronecker blocks of dense layers, rows of the others) and the
    exact shifted solve (output layer eliminated where its block is block diagonal), against
    jacrev's D; several chunks, several routes, rank-deficient D (K > QN in most cases)."""
    torch.manual_seed(1)
    build, shape, q, chunk = CASES[name]
    model = build(q).to(DT)
    space = structured_space(model, torch.randn(*shape, dtype=DT), q, chunk_size=chunk)
    be = StructuredBackend(
        space.module, space.layout, space.inputs, q, chunk, fallback=space.backend.fallback,
        route=route,
    )  # fmt: skip
    theta = perturbed_point(space, seed=None)
    d = reference_jacobian(space.module, space.inputs, theta)
    gram = be.param_gram(theta)
    close_to_max(gram, d.T @ d)
    assert torch.equal(gram, gram.T)
    rhs = torch.randn(space.dim, 2, dtype=DT)
    ref, tol = _shifted_reference(d, 0.3, rhs)
    close_to_max(be.solve_param_gram(theta, rhs, 0.3), ref, tol)
    close_to_max(be.solve_param_gram(theta, rhs[:, 0], 0.3), ref[:, 0], tol)


def test_output_layer_is_eliminated_first():
    """A Linear whose outputs are the network's has G_j = 1: its block is block diagonal and
    the solve eliminates it (one block for all outputs); after a Tanh the blocks differ;
    after a LogSoftmax (G_j full) nothing is eliminated: the three paths of solve_shifted."""
    from subriemann.engines.kspace import _assemble_schur

    torch.manual_seed(2)
    inputs = torch.randn(9, 1, 4, 4, dtype=DT)
    head = [nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)]
    # (model, blocks of the eliminated layer: 1 shared, 3 = one per output, 0 = none)
    cases = [(nn.Sequential(*head), 1), (nn.Sequential(*head, nn.Tanh()), 3)]
    cases.append((nn.Sequential(*head, nn.LogSoftmax(dim=-1)), 0))
    for model, blocks in cases:
        space = structured_space(copy.deepcopy(model).to(DT), inputs, 3)
        theta = perturbed_point(space, seed=None)
        be = space.backend
        layers, ranges = be._kspace_layers()
        found = be._output_layer(theta)
        assert (found is not None) == (blocks > 0)
        if found is not None:
            assert layers[found] is be.layers[-1]
            forms = be._chunk_forms(theta)()
            parts = _assemble_schur(forms, ranges, found, theta, 3, be.plan.temp_entries())
            assert parts.b.shape[0] == blocks
        d = reference_jacobian(space.module, space.inputs, theta)
        rhs = torch.randn(space.dim, dtype=DT)
        ref, tol = _shifted_reference(d, 1e-2, rhs)
        close_to_max(be.solve_param_gram(theta, rhs, 1e-2), ref, tol)


@pytest.mark.parametrize(
    ("n", "chunk", "taken"), [(6, None, True), (7, 3, True), (40, None, False)]
)
def test_sample_side_elimination(n, chunk, taken):
    """The elimination on the sample side, S = mu (1 + sum_c Z_c^T Z_c), Z_c = L^{-1} J_c
    (kspace.sample_side_solve), against the dense shifted solve: taken on few samples (N^2
    below the other side's terms; m' = 9, |C| = 20: N <= 13), gathered over several chunks;
    declined on many samples, over the memory budget and after a Tanh (G_j != 1), where
    solve_param_gram eliminates on the parameter side with the same answer."""
    from subriemann.engines.kspace import sample_side_solve

    torch.manual_seed(5)
    inputs = torch.randn(n, 1, 4, 4, dtype=DT)
    head = [nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)]
    for model, g_is_one in [(nn.Sequential(*head), True), (nn.Sequential(*head, nn.Tanh()), False)]:
        space = structured_space(copy.deepcopy(model).to(DT), inputs, 3, chunk_size=chunk)
        theta = perturbed_point(space, seed=None)
        be = space.backend
        forms, ranges = be._chunk_forms(theta), be._kspace_layers()[1]
        last = be._output_layer(theta)
        d = reference_jacobian(space.module, space.inputs, theta)
        rhs = torch.randn(space.dim, 2, dtype=DT)
        ref, tol = _shifted_reference(d, 0.3, rhs)
        x = sample_side_solve(forms, ranges, last, rhs, 0.3, be.plan.temp_entries(), n)
        assert (x is not None) == (taken and g_is_one)
        if x is not None:
            close_to_max(x, ref, tol)
            assert sample_side_solve(forms, ranges, last, rhs, 0.3, n * 3 * 20 // 4 - 1, n) is None
            with pytest.raises(ValueError, match="shift must be positive"):
                sample_side_solve(forms, ranges, last, rhs, -0.3, be.plan.temp_entries(), n)
        close_to_max(be.solve_param_gram(theta, rhs, 0.3), ref, tol)


def test_shifted_solve_on_a_rank_deficient_cnn():
    """Zero first-layer weights under a ReLU: D^T D is singular (rank < K), the shifted
    matrix is SPD and the solve exact; with shift 0 the Cholesky factorization refuses."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 4),
    ).to(DT)  # fmt: skip
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.fill_(-1.0)  # every ReLU input < 0: conv 1 and conv 2's weight are dead
    space = structured_space(model, torch.randn(12, 16, dtype=DT), 4)
    theta = space.initial_point()
    d = reference_jacobian(space.module, space.inputs, theta)
    assert int(torch.linalg.matrix_rank(d)) < space.dim
    be = space.backend
    close_to_max(be.param_gram(theta), d.T @ d)
    rhs = torch.randn(space.dim, dtype=DT)
    ref, tol = _shifted_reference(d, 0.5, rhs)
    close_to_max(be.solve_param_gram(theta, rhs, 0.5), ref, tol)
    with pytest.raises(ValueError, match="shift must be positive"):
        be.solve_param_gram(theta, rhs, 0.0)


def test_param_gram_float32():
    """float32 factors: D^T D to the float32 rounding of a sum of ~QN products (1e-5)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, 2, 3), nn.Tanh(),
                          nn.Flatten(), nn.Linear(8, 3))  # fmt: skip
    space = sr.ParameterSpace(
        model, torch.randn(10, 16), torch.zeros(10, 3), backend="structured", dtype=torch.float32
    )
    theta = space.initial_point()
    gram = space.backend.param_gram(theta)
    assert gram.dtype == torch.float32
    d = reference_jacobian(copy.deepcopy(space.module).double(), space.inputs.double(),
                           theta.double())  # fmt: skip
    close_to_max(gram.double(), d.T @ d, rtol=1e-5)
    rhs = torch.randn(space.dim)
    ref, tol = _shifted_reference(d, 1.0, rhs.double())
    # the float64 bound scaled to float32's eps
    tol *= torch.finfo(torch.float32).eps / torch.finfo(DT).eps
    close_to_max(space.backend.solve_param_gram(theta, rhs, 1.0).double(), ref, tol)


# -- the memory budget --------------------------------------------------------------------
def test_chunk_plan_arithmetic():
    """chunk * (factors + activations) <= budget / 4 (or one sample), store iff all factors
    fit in budget / 2, temporaries budget / 8: the shares of MemoryPlan."""
    from subriemann.engines.base import items_within
    from subriemann.engines.structured import chunk_plan

    for budget, feat, act, n in [(1 << 20, 100, 28, 1000), (1 << 30, 5, 5, 10), (64, 100, 0, 7)]:
        plan = chunk_plan(budget, 8, n, lambda c, f=feat, a=act: (f, a))
        assert plan.chunk == items_within(budget // 4, 8 * (feat + act), n)
        assert plan.chunk == 1 or plan.chunk * 8 * (feat + act) <= budget // 4
        assert plan.store == (n * 8 * feat <= budget // 2)
        assert plan.temp_entries() * 8 <= max(8, budget // 8)
        assert plan.rows(10, 100) == items_within(plan.temp_entries(), 10, 100)
    # a chunk-dependent factor size (the per-layer route) is re-evaluated at the chosen chunk
    seen = []
    plan = chunk_plan(1 << 14, 8, 100, lambda c: (seen.append(c) or 10 * (c > 50) + 5, 3))
    assert seen == [100, 28] and plan.chunk == 28 and plan.factor_bytes == 8 * 5
    assert chunk_plan(1 << 10, 8, 100, lambda c: (1000, 0), chunk_size=30).chunk == 30


def test_a_tiny_budget_is_respected_and_changes_nothing():
    """A small CNN with a budget of a few kB: chunks of one sample, products and Gram blocks in
    pieces below the budget's temporaries, and every result as with the default budget
    (against jacrev's D)."""
    from subriemann.engines.kspace import sub_chunks

    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 5, 5)), nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(),
        nn.Conv2d(3, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3),
    ).to(DT)  # fmt: skip
    space = structured_space(model, torch.randn(6, 25, dtype=DT), 3)
    fallback = space.backend.fallback

    def engine(budget: int) -> StructuredBackend:
        return StructuredBackend(
            space.module, space.layout, space.inputs, 3, fallback=fallback, memory_budget=budget
        )

    one = engine(64).plan  # one sample per chunk: its factor and activation bytes
    budget = 7 * (one.factor_bytes + one.activation_bytes)
    tiny = engine(budget)
    assert tiny.memory_budget == fallback.memory_budget == budget
    assert tiny.chunk_size == 1 and len(tiny.bounds) == 6  # 2 samples exceed budget / 4
    assert tiny.plan.store  # the factors of all 6 samples fit in budget / 2
    theta = perturbed_point(space, seed=None)
    forms = next(iter(tiny._chunk_forms(theta)()))
    assert len(sub_chunks(forms, 3, tiny.plan.temp_entries())) == 1  # one sample: indivisible
    assert tiny._product_rows(5) < 5  # batched products in several passes
    assert tiny.rows_per_pass(perturbed_point(space, seed=None)) == tiny._product_rows(1 << 30)
    d = reference_jacobian(space.module, space.inputs, theta)
    close_to_max(tiny.ntk(theta), d @ d.T)
    v, u = torch.randn(5, space.dim, dtype=DT), torch.randn(5, space.output_dim, dtype=DT)
    close_to_max(tiny.jvp(theta, v), v @ d.T)
    close_to_max(tiny.vjp(theta, u), u @ d)
    close_to_max(tiny.param_gram(theta), d.T @ d)
    rhs = torch.randn(space.dim, dtype=DT)
    ref, tol = _shifted_reference(d, 0.2, rhs)
    close_to_max(tiny.solve_param_gram(theta, rhs, 0.2), ref, tol)
    # a budget below one chunk's factors keeps nothing: every product recomputes or falls back
    tiny.memory_budget = 64
    assert not tiny.plan.store and tiny.factors(theta) is None
    close_to_max(tiny.param_gram(theta), d.T @ d)
    close_to_max(tiny.solve_param_gram(theta, rhs, 0.2), ref, tol)
    close_to_max(tiny.vjp(theta, u), u @ d)


def test_sub_chunks_split_the_samples():
    from subriemann.engines.kspace import KronForm, RowsForm, sub_chunks

    rows = RowsForm(torch.randn(10, 2, 7, dtype=DT))
    kron = KronForm(torch.randn(10, 4, dtype=DT), torch.randn(10, 2, 3, dtype=DT), 3, True)
    # per sample: rows x kron 7 * 3 = 21 entries; kron x kron (outer-product form,
    # m' = 4 <= c * c = 9) 4 * 4 + 3 * 3 = 25: three samples within 75
    parts = sub_chunks([rows, kron], 2, 25 * 3)
    assert [p[0].j.shape[0] for p in parts] == [3, 3, 3, 1]
    assert torch.equal(torch.cat([p[1].a for p in parts]), kron.a)


@pytest.mark.parametrize("name", ["mlp-relu-q3", "conv2d", "conv1d", "residual", "chunked-q2"])
@pytest.mark.parametrize("route", ["auto", "structured", "jacobian"])
def test_ntk_with_an_output_basis(name, route):
    """ntk(theta, output_basis=T) = T^T D D^T T (T block diagonal, R = Q - 1 columns per
    sample, as AdaptedGD's Fisher whitening) from the mixed factors, against jacrev's D."""
    torch.manual_seed(6)
    build, shape, q, chunk = CASES[name]
    model = build(q).to(DT)
    space = structured_space(model, torch.randn(*shape, dtype=DT), q, chunk_size=chunk)
    be = StructuredBackend(
        space.module, space.layout, space.inputs, q, chunk, fallback=space.backend.fallback,
        route=route,
    )  # fmt: skip
    theta = perturbed_point(space, seed=None)
    n = space.inputs.shape[0]
    t = torch.randn(n, q, max(1, q - 1), dtype=DT)
    d = reference_jacobian(space.module, space.inputs, theta)
    dt = torch.einsum("nqr,nqk->nrk", t, d.view(n, q, -1)).reshape(-1, space.dim)
    gram = be.ntk(theta, output_basis=t)
    close_to_max(gram, dt @ dt.T)
    assert torch.equal(gram, gram.T)
