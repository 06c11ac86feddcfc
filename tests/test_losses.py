"""Losses on output space against autodiff of independent formulas (docs/theory.md §1, §6)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from subriemann.losses import CrossEntropyLoss, Loss, MSELoss, get_loss
from tests.references import ce_by_hand, mse_by_hand

F64 = torch.float64


@st.composite
def outputs_and_targets(draw, simplex: bool = False, scale: float = 3.0):
    """``(x, y, v)`` of shape ``[N, Q]``: logits/outputs, targets, a direction."""
    n = draw(st.integers(1, 5))
    q = draw(st.integers(2 if simplex else 1, 5))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = scale * torch.randn(n, q, generator=gen, dtype=F64)
    if simplex:
        y = torch.softmax(2 * torch.randn(n, q, generator=gen, dtype=F64), dim=1)
        if draw(st.booleans()):  # one-hot rows
            y = torch.eye(q, dtype=F64)[torch.randint(0, q, (n,), generator=gen)]
    else:
        y = torch.randn(n, q, generator=gen, dtype=F64)
    v = torch.randn(n, q, generator=gen, dtype=F64)
    return x, y, v


def _autodiff(formula, x, y, v):
    """Value, gradient and Hessian-vector product of ``formula`` by torch.autograd."""
    xr = x.clone().requires_grad_()
    c = formula(xr, y)
    (g,) = torch.autograd.grad(c, xr, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), xr)
    return c.detach(), g.detach(), hv


def _check(loss, formula, x, y, v, tol=1e-12):
    c, g, hv = _autodiff(formula, x, y, v)
    torch.testing.assert_close(loss.value(x, y), c, rtol=tol, atol=tol)
    torch.testing.assert_close(loss.grad(x, y), g, rtol=tol, atol=tol)
    torch.testing.assert_close(loss.hvp(x, y, v), hv, rtol=tol, atol=tol)
    # and the full Hessian, once, by torch.autograd.functional
    h = torch.autograd.functional.hessian(lambda z: formula(z.view_as(x), y), x.reshape(-1))
    torch.testing.assert_close(loss.hvp(x, y, v).reshape(-1), h @ v.reshape(-1), rtol=tol, atol=tol)


@given(outputs_and_targets())
def test_mse_against_autodiff(xyv):
    x, y, v = xyv
    _check(MSELoss(), mse_by_hand, x, y, v)


def test_mse_is_a_sum_not_a_mean():
    x = torch.ones(4, 3, dtype=F64)
    assert float(MSELoss().value(x, torch.zeros_like(x))) == 6.0  # ½ · 12


@given(outputs_and_targets(simplex=True))
def test_cross_entropy_against_autodiff(xyv):
    x, y, v = xyv
    _check(CrossEntropyLoss(), ce_by_hand, x, y, v)


def test_cross_entropy_against_torch_functional():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=gen, dtype=F64)
    y = torch.softmax(torch.randn(6, 4, generator=gen, dtype=F64), 1)
    ref = torch.nn.functional.cross_entropy(x, y, reduction="sum")
    torch.testing.assert_close(CrossEntropyLoss().value(x, y), ref)


@given(outputs_and_targets(simplex=True, scale=20.0), st.data())
def test_cross_entropy_shift_invariance(xyv, data):
    """C(x_j + c_j 1) = C(x_j) (docs/theory.md §6), and so is the gradient; H 1 = 0."""
    x, y, _ = xyv
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    c = 50.0 * torch.randn(x.shape[0], 1, generator=gen, dtype=F64)
    ce = CrossEntropyLoss()
    torch.testing.assert_close(ce.value(x + c, y), ce.value(x, y), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ce.grad(x + c, y), ce.grad(x, y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce.grad(x, y).sum(1), torch.zeros(x.shape[0], dtype=F64))
    ones = torch.ones_like(x)
    torch.testing.assert_close(ce.hvp(x, y, ones), torch.zeros_like(x), rtol=0, atol=1e-15)


@given(outputs_and_targets(simplex=True))
def test_cross_entropy_hessian_is_psd(xyv):
    x, y, v = xyv
    assert float((v * CrossEntropyLoss().hvp(x, y, v)).sum()) >= -1e-14


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_entropy_huge_logits_are_stable(dtype):
    ce = CrossEntropyLoss()
    x = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 1e4, 5e3], [1e4, 1e4, 1e4]], dtype=dtype)
    y = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=dtype)
    c, g, hv = ce.value(x, y), ce.grad(x, y), ce.hvp(x, y, torch.ones_like(x))
    for t in (c, g, hv):
        assert torch.isfinite(t).all()
    # row 0: -log softmax(x)_1 = 1e4; row 1: ½·2e4 + ½·0; row 2: log 3
    torch.testing.assert_close(c, torch.tensor(1e4 + 1e4 + math.log(3), dtype=dtype))
    expected = torch.tensor(
        [[1.0, -1.0, 0.0], [-0.5, 0.5, 0.0], [1 / 3 - 0.2, 1 / 3 - 0.3, 1 / 3 - 0.5]], dtype=dtype
    )
    torch.testing.assert_close(g, expected)
    assert torch.isfinite(ce.value(-x, y)) and torch.isfinite(ce.grad(-x, y)).all()


class Quartic(Loss):
    """A custom loss with only ``value``: C = ¼ Σ (x − y)⁴ + Σ x_{j0} x_{j1}-style coupling."""

    name = "quartic"

    def value(self, x, y):
        d = x - y
        return 0.25 * (d**4).sum() + (x[:, :1] * x[:, -1:]).sum()


def _quartic_by_hand(x, y):
    return 0.25 * ((x - y) ** 4).sum() + (x[:, 0] * x[:, -1]).sum()


@given(outputs_and_targets())
def test_base_class_autodiff_defaults(xyv):
    x, y, v = xyv
    _check(Quartic(), _quartic_by_hand, x, y, v, tol=1e-10)
    # and the closed form of the separable part
    d = x - y
    coupling = torch.zeros_like(x)
    coupling[:, 0] += x[:, -1]
    coupling[:, -1] += x[:, 0]
    torch.testing.assert_close(Quartic().grad(x, y), d**3 + coupling, rtol=1e-12, atol=1e-12)


def test_custom_loss_in_a_parameter_space():
    import subriemann as sr

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    X, Y = torch.randn(4, 2), torch.randn(4, 2)
    space = sr.ParameterSpace(model, X, Y, Quartic())
    theta = space.initial_point()
    x = space.outputs(theta).view(4, 2)
    torch.testing.assert_close(space.cost(theta), _quartic_by_hand(x, Y.double()))
    d = space.jacobian(theta)
    torch.testing.assert_close(
        space.cost_grad(theta), d.T @ Quartic().grad(x, Y.double()).reshape(-1)
    )


def test_base_class_value_must_be_implemented():
    x = torch.zeros(1, 1, dtype=F64)
    with pytest.raises(NotImplementedError):
        Loss().value(x, x)
    assert repr(Loss()) == "Loss()"
    assert Loss().prepare_targets(x) is x


def test_target_checks_by_message():
    ce = CrossEntropyLoss()
    with pytest.raises(ValueError, match="NaN or inf"):
        MSELoss().check_targets(torch.tensor([[math.nan]]))
    with pytest.raises(ValueError, match="negative entries"):
        ce.check_targets(torch.tensor([[1.5, -0.5]], dtype=F64))
    with pytest.raises(ValueError, match="row 1 sums to 2, not 1"):
        ce.check_targets(torch.tensor([[0.5, 0.5], [1.0, 1.0]], dtype=F64))
    with pytest.raises(ValueError, match="at least 2 classes.*not class indices"):
        ce.check_targets(torch.ones(3, 1, dtype=F64))
    # float32 softmax rows pass (their sums are 1 only to float32 accuracy)
    rows = torch.softmax(torch.randn(50, 7), 1)
    ce.check_targets(rows)
    fixed = ce.prepare_targets(rows.double())
    torch.testing.assert_close(fixed.sum(1), torch.ones(50, dtype=F64), rtol=0, atol=1e-15)
    # float64 rows must be on the simplex to 1e-8 per class
    with pytest.raises(ValueError, match="sums to"):
        ce.check_targets(torch.tensor([[0.5, 0.5 + 1e-6]], dtype=F64))


def test_get_loss():
    assert isinstance(get_loss("mse"), MSELoss)
    assert isinstance(get_loss("cross_entropy"), CrossEntropyLoss)
    assert isinstance(get_loss("CE"), CrossEntropyLoss)
    q = Quartic()
    assert get_loss(q) is q
    assert isinstance(get_loss(Quartic), Quartic)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        get_loss("hinge")
    with pytest.raises(TypeError, match="loss must be a name"):
        get_loss(3)
