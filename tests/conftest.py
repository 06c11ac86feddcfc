"""Shared fixtures and hypothesis settings for the subriemann tests.

Model builders and strategies live in :mod:`tests.helpers` (importable from
any test file); the fixtures below wrap the most common ones.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests.helpers import MLPSpec, Problem, make_problem

# Fast, deterministic hypothesis runs: at most 25 examples, no deadline (the
# first call of torch.func transforms is slow), derandomized in CI.
settings.register_profile(
    "subriemann",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=bool(os.environ.get("CI")),
)
settings.load_profile("subriemann")

# Under pytest-xdist every worker is its own process: with torch's default of one
# thread per core, 2 workers on 2 cores oversubscribe the CPU and OpenMP's spinning
# makes small matrix products ~100x slower.  One thread per worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state and restores it after."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


@pytest.fixture
def mlp_problem() -> Problem:
    """An overparametrized tanh MLP regression: K = 50 > QN = 10."""
    return make_problem(MLPSpec((3, 8, 2), "tanh", num_samples=5, seed=1))


@pytest.fixture
def tall_problem() -> Problem:
    """An underparametrized problem: K = 9 < QN = 40 (forward-mode Jacobian)."""
    return make_problem(MLPSpec((2, 2, 1), "tanh", num_samples=40, seed=2))


@pytest.fixture
def ce_problem() -> Problem:
    """A softplus MLP with Q = 3 classes and probability-vector targets."""
    return make_problem(MLPSpec((2, 6, 3), "softplus", num_samples=6, seed=3), loss="cross_entropy")


@pytest.fixture
def space(mlp_problem):
    """The :class:`~subriemann.ParameterSpace` of :func:`mlp_problem` (MSE, float64)."""
    import subriemann as sr

    p = mlp_problem
    return sr.ParameterSpace(p.model, p.inputs, p.targets)
