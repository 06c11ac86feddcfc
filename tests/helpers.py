"""Support for the tests that is neither a reference nor a case.

* :data:`REPO_ROOT`, for test files that run the examples, benchmarks or docs;
* the names that lived here before ``tests/references.py`` and ``tests/cases.py``
  existed, re-exported so that ``from tests.helpers import make_problem`` keeps
  working (new code imports from :mod:`tests.references` and :mod:`tests.cases`).
"""

from __future__ import annotations

from pathlib import Path

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
