"""Models that couple samples or are random are refused (:mod:`subriemann.space.coupling`).

The reference is the definition: a model couples samples when a sample's output
in a batch differs from its output alone; the checks are run directly on an
``apply`` function and through :class:`~subriemann.ParameterSpace`, whose
Jacobian is then compared with ``jacrev`` of the model on one sample.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import subriemann as sr
from subriemann.space.coupling import check_sample_independence, sample_rows
from tests.references import reference_jacobian


def _apply_of(module: nn.Module):
    return lambda params, x: functional_call(module, params, (x,))


def test_check_sample_independence_on_explicit_models():
    lin = nn.Linear(3, 2).double()
    params = dict(lin.named_parameters())
    x = torch.randn(7, 3, dtype=torch.float64)
    singles = check_sample_independence(lin, _apply_of(lin), params, x)
    # the outputs of the checked samples, one at a time
    rows = sample_rows(7)
    with torch.no_grad():
        alone = torch.cat([lin(x[i : i + 1]) for i in rows])
    assert singles is not None and torch.equal(singles, alone)
    assert check_sample_independence(lin, _apply_of(lin), params, x[:1]) is None  # N = 1

    class Centered(nn.Module):  # x - mean over the batch: couples every sample
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, z):
            y = self.lin(z)
            return y - y.mean(0)

    model = Centered()
    with pytest.raises(ValueError, match="couples samples: Centered") as info:
        check_sample_independence(model, _apply_of(model), dict(model.named_parameters()), x)
    assert "\n" not in str(info.value)


def test_coupling_seen_only_in_the_whole_batch_is_refused():
    """Per-sample and small-batch evaluations agree, the engine's whole batch does not."""

    class CoupledWhenLarge(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            y = self.lin(x)
            return y + (x.shape[0] > 3) * y.mean(0)

    X, Y = torch.randn(10, 3), torch.randn(10, 2)
    with pytest.raises(ValueError, match="couples samples: CoupledWhenLarge .* whole batch"):
        sr.ParameterSpace(CoupledWhenLarge(), X, Y, backend="func")
    # chunks of 3 never see the coupling: the engine's function is the per-sample one
    space = sr.ParameterSpace(CoupledWhenLarge(), X, Y, backend="func", chunk_size=3)
    theta = space.initial_point()
    ref = reference_jacobian(space.module, X[:1], theta)
    torch.testing.assert_close(space.jacobian(theta)[:2], ref)


def test_a_random_model_is_refused():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return torch.nn.functional.dropout(self.lin(x), 0.5, training=True)

    with pytest.raises(ValueError, match="not deterministic"):
        sr.ParameterSpace(Noisy(), torch.randn(5, 3), torch.randn(5, 2))
