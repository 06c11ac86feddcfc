"""Support for the tests that is neither a reference nor a case.

* :data:`REPO_ROOT`, for test files that run the examples, benchmarks or docs;
* :func:`assert_same_arrays` and :func:`assert_same_events`: two trajectories agree
  bit for bit;
* the names that lived here before ``tests/references.py`` and ``tests/cases.py``
  existed, re-exported so that ``from tests.helpers import make_problem`` keeps
  working (new code imports from :mod:`tests.references` and :mod:`tests.cases`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from subriemann.flow.trajectory import RankChange, Trajectory
from tests.cases import (
    ACTIVATIONS,
    MLPSpec,
    Problem,
    SquareAndLine,
    make_mlp,
    make_problem,
    mlp_problems,
    mlp_specs,
    random_simplex,
)
from tests.references import (
    ce_by_hand,
    central_fd_jacobian,
    flat_params,
    mse_by_hand,
    reference_jacobian,
    reference_outputs,
    unflat_params,
)

__all__ = [
    "REPO_ROOT",
    "ARRAYS",
    "assert_same_arrays",
    "assert_same_events",
    "ACTIVATIONS",
    "MLPSpec",
    "Problem",
    "SquareAndLine",
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

#: The per-step arrays of a :class:`~subriemann.flow.trajectory.Trajectory`.
ARRAYS = ("s", "theta", "outputs", "cost", "grad_norm", "singular_values", "rank", "targets")


def assert_same_arrays(a: Trajectory, b: Trajectory, names=ARRAYS) -> None:
    """The arrays ``names`` of ``a`` and ``b`` have the same dtype and are equal bit for bit."""
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name


def assert_same_events(a: list[RankChange], b: list[RankChange]) -> None:
    """Two lists of rank events are equal field by field (tensors bit for bit)."""
    assert len(a) == len(b)
    for e, f in zip(a, b):
        assert (e.s, e.rank_before, e.rank_after, e.index, e.tau, e.s_bracket) == (
            f.s, f.rank_before, f.rank_after, f.index, f.tau, f.s_bracket
        )
        assert torch.equal(e.theta, f.theta)
        assert torch.equal(e.singular_values_before, f.singular_values_before)
        assert torch.equal(e.singular_values_after, f.singular_values_after)
