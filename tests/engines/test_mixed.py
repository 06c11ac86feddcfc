"""Mixed precision (engines/mixed.py): a float32 sample-side factorization refined to float64.

Every solve is checked against the dense shifted solve of the ``jacrev`` Jacobian (an
eigendecomposition, independent of Cholesky) at the tolerance of a backward-stable
float64 solve, 10 K cond eps: tighter by orders of magnitude than the float32
factorization alone (relative error ~1e-7), so a refinement that did not work fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from subriemann.engines import ParameterLayout, StructuredBackend
from subriemann.engines.mixed import refine
from tests.cases import perturbed_point
from tests.engines.test_structured import DT, _shifted_reference, structured_space
from tests.helpers import close_to_max
from tests.references import reference_jacobian


def _cnn_space(n: int = 6, chunk: int | None = None, **kw):
    """Conv rows (|C| = 20) and an output Linear with G_j = 1 (m' = 9): the sample side
    applies for N <= 13 (kspace._sample_side_cheaper)."""
    torch.manual_seed(5)
    inputs = torch.randn(n, 1, 4, 4, dtype=DT)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).to(DT)
    space = structured_space(model, inputs, 3, chunk_size=chunk)
    space.backend.mixed_precision = kw.get("mixed", True)
    return space


@pytest.mark.parametrize(("chunk", "cols"), [(None, 1), (4, 2)])
def test_refined_solve_matches_the_dense_solve(chunk, cols):
    """One chunk or two, one right-hand side or two: float64 accuracy, with at least one
    refinement (the float32 solve alone is at a backward error ~1e-8) and the target met."""
    space = _cnn_space(7, chunk)
    be, theta = space.backend, perturbed_point(space, seed=None)
    d = reference_jacobian(space.module, space.inputs, theta)
    rhs = torch.randn(space.dim, cols, dtype=DT).squeeze(1)
    ref, tol = _shifted_reference(d, 0.3, rhs)
    close_to_max(be.solve_param_gram(theta, rhs, 0.3), ref, tol)
    info = be.last_refinement
    assert info is not None and info.converged
    assert len(info.backward_errors) >= 2 and info.backward_errors[0] > 1e3 * info.target
    assert info.target == pytest.approx(space.dim**0.5 * torch.finfo(DT).eps)


def test_declined_where_float32_cannot_serve():
    """A tiny shift (eps32 |A| / mu > 0.1), a float32 point, "auto" on a small problem and
    mixed_precision=False: solved directly (no refinement), with the same accuracy."""
    space = _cnn_space()
    be, theta = space.backend, perturbed_point(space, seed=None)
    d = reference_jacobian(space.module, space.inputs, theta)
    rhs = torch.randn(space.dim, dtype=DT)
    for shift, mode in [(1e-7, True), (0.3, "auto"), (0.3, False)]:
        be.mixed_precision = mode
        ref, tol = _shifted_reference(d, shift, rhs)
        close_to_max(be.solve_param_gram(theta, rhs, shift), ref, tol)
        assert be.last_refinement is None
    be.mixed_precision = True
    assert be.solve_param_gram(theta.float(), rhs, 0.3).dtype == torch.float32
    assert be.last_refinement is None


def test_bad_mode_is_one_line():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).to(DT)
    named = dict(net.named_parameters())
    layout = ParameterLayout(list(named), [p.shape for p in named.values()])
    with pytest.raises(ValueError, match="mixed_precision must be True, False or 'auto'"):
        StructuredBackend(net, layout, torch.randn(4, 1, 4, 4, dtype=DT), 3, mixed_precision="y")


def test_refine_stops_on_stagnation_and_reports_it():
    """An approximate inverse too poor to halve the backward error: not converged, and the
    history says so; a zero right-hand side converges at once."""
    torch.manual_seed(0)
    b = torch.randn(20, 20, dtype=DT)
    a = b @ b.T + torch.eye(20, dtype=DT)
    norm_a = float(torch.linalg.matrix_norm(a, 2))
    rhs = torch.randn(20, 1, dtype=DT)
    x, info = refine(lambda v: a @ v, lambda u: u / norm_a, rhs, norm_a, 1e-15)
    assert not info.converged and len(info.backward_errors) < 10
    assert info.backward_errors[-1] > 0.5 * info.backward_errors[-2]
    x, info = refine(lambda v: a @ v, lambda u: u, torch.zeros(20, 1, dtype=DT), norm_a, 1e-15)
    assert info.converged and info.backward_errors == [0.0] and not x.any()
