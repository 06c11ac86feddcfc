"""ParameterSpace's public checks and cache control (issue 14: no private access across modules).

References: the dense Jacobian of ``torch.func.jacrev`` on the whole batch for
the products, torch's own (private) module classes for the train-mode rule.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import subriemann as sr
from subriemann.space.parameter_space import _train_mode_differs

F64 = torch.float64


def _space(**kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    return sr.ParameterSpace(net, torch.randn(4, 3), torch.randn(4, 2), **kw)


def _dense_jacobian(space, theta):
    """D = dx/dtheta by jacrev of the module on the whole batch (shape [QN, K])."""

    def outputs(t):
        return functional_call(space.module, space.layout.unflatten(t), (space.inputs,)).reshape(-1)

    return jacrev(outputs)(theta)


def test_vector_checks_convert_and_name_the_argument():
    space = _space()
    v = space.check_tangent(torch.ones(2, space.dim, dtype=torch.float32))
    assert v.dtype == F64 and v.shape == (2, space.dim)
    u = space.check_output_vec(torch.ones(space.output_dim))
    assert u.dtype == F64 and u.shape == (space.output_dim,)
    with pytest.raises(ValueError, match=rf"tangent_vec_a must have shape \[\.\.\., {space.dim}\]"):
        space.check_tangent(torch.ones(space.dim + 1), "tangent_vec_a")
    with pytest.raises(ValueError, match=r"output_covec must have shape \[\.\.\., 8\]"):
        space.check_output_vec(torch.ones(3))
    with pytest.raises(TypeError, match="tangent_vec must be a torch.Tensor, got list"):
        space.check_tangent([1.0] * space.dim)


def test_finite_outputs_and_check_finite():
    space = _space()
    x = torch.ones(3, dtype=F64)
    assert space.finite_outputs(x) is x and space.check_finite(x, "Jacobian D") is x
    with pytest.raises(sr.NonFiniteError, match="model outputs contain NaN or inf"):
        space.finite_outputs(torch.tensor([1.0, float("nan")]))
    with pytest.raises(sr.NonFiniteError, match="Jacobian D contain NaN or inf"):
        space.check_finite(torch.tensor([float("inf")]), "Jacobian D")


@pytest.mark.parametrize("batched", [True, False])
def test_products_batched_or_one_vector_at_a_time(batched, monkeypatch):
    space = _space(backend="func")
    monkeypatch.setattr(space.backend, "batched", batched)
    gen = torch.Generator().manual_seed(1)
    theta = space.initial_point()
    v = torch.randn(2, 3, space.dim, generator=gen, dtype=F64)
    u = torch.randn(4, space.output_dim, generator=gen, dtype=F64)
    d = _dense_jacobian(space, theta)
    # the same products, up to the rounding of a few dot products of length K or QN
    torch.testing.assert_close(space.jvp(theta, v), v @ d.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(space.vjp(theta, u), u @ d, rtol=1e-12, atol=1e-12)
    assert space.jvp(theta, v[:0]).shape == (0, 3, space.output_dim)


def test_state_cache_keeps_more_states_while_inside():
    space = _space()
    gen = torch.Generator().manual_seed(2)
    points = [space.initial_point() + torch.randn(space.dim, generator=gen, dtype=F64)
              for _ in range(6)]
    with space.state_cache(8):
        states = [space.point_state(p) for p in points]
        assert all(space.point_state(p) is st for p, st in zip(points, states))
    # back to the default size: the 3 most recent states are kept, the oldest are not
    assert all(space.point_state(p) is st for p, st in zip(points[3:], states[3:]))
    assert space.point_state(points[0]) is not states[0]


def test_fixed_tensors_are_buffers_and_frozen_parameters():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    net[0].bias.requires_grad_(False)
    space = sr.ParameterSpace(net, torch.randn(5, 3), torch.randn(5, 2))
    fixed = space.fixed_tensors
    assert set(fixed) == {"0.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    fixed.clear()  # a new dict: the space keeps its own
    assert len(space.fixed_tensors) == 4
    assert "0.bias" not in space.layout.names


def _private_rule(m: nn.Module) -> bool:
    """The train-mode rule written with torch's private base classes (the reference)."""
    if not m.training:
        return False
    if isinstance(m, nn.modules.dropout._DropoutNd | nn.RReLU):
        return True
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return bool(m.track_running_stats)
    if isinstance(m, nn.MultiheadAttention | nn.RNNBase):
        return float(m.dropout) > 0
    return False


def test_train_mode_rule_without_torch_private_classes():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lazy modules warn that they are experimental
        modules = [
            nn.Dropout(), nn.Dropout1d(), nn.Dropout2d(), nn.Dropout3d(), nn.AlphaDropout(),
            nn.FeatureAlphaDropout(), nn.RReLU(), nn.BatchNorm1d(3), nn.BatchNorm2d(3),
            nn.BatchNorm3d(3), nn.BatchNorm1d(3, track_running_stats=False), nn.SyncBatchNorm(3),
            nn.LazyBatchNorm1d(), nn.InstanceNorm1d(3),
            nn.InstanceNorm2d(3, track_running_stats=True),
            nn.LazyInstanceNorm3d(track_running_stats=True), nn.GroupNorm(1, 3), nn.LayerNorm(3),
            nn.MultiheadAttention(4, 2, dropout=0.1), nn.MultiheadAttention(4, 2),
            nn.LSTM(3, 3, num_layers=2, dropout=0.2), nn.GRU(3, 3), nn.Linear(2, 2), nn.ReLU(),
        ]
    for m in modules:
        for training in (True, False):
            m.train(training)
            assert _train_mode_differs(m) == _private_rule(m), (type(m).__name__, training)
