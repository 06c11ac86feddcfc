"""Shared fixtures and hypothesis settings for the subriemann tests.

The problems live in :mod:`tests.cases` and the dense references in
:mod:`tests.references` (both importable from any test file); the fixtures
below build them: ``case`` runs a test on every problem of
:data:`tests.cases.CASES`, the others are single named problems.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import subriemann as sr
from tests.cases import CASES, MetricCase, MLPSpec, Problem, case_named, make_problem, tanh_case

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


@pytest.fixture(scope="module", params=CASES, ids=[c.name for c in CASES])
def case(request) -> Problem:
    """Every problem of :data:`tests.cases.CASES`, built once per test module.

    Shared by the tests of a module: they must not change the model or the data
    (build a fresh one with ``tests.cases.case_named`` for that).
    """
    return request.param.build()


@pytest.fixture
def mlp_problem() -> Problem:
    """An overparametrized tanh MLP regression: K = 50 > QN = 10."""
    return case_named("mlp-wide")


@pytest.fixture
def tall_problem() -> Problem:
    """An underparametrized problem: K = 9 < QN = 40 (forward-mode Jacobian)."""
    return case_named("mlp-tall")


@pytest.fixture
def ce_problem() -> Problem:
    """A softplus MLP with Q = 3 classes and probability-vector targets."""
    return case_named("mlp-ce")


@pytest.fixture
def small_problem() -> Problem:
    """A 3-4-2 tanh MLP on N = 5 samples: the model and data of the bad-input tests."""
    return make_problem(MLPSpec((3, 4, 2), "tanh", num_samples=5, seed=0))


@pytest.fixture
def small_case() -> MetricCase:
    """A float64 2-2-1 tanh MLP (K = 9) on 4 samples at its point, with its dense reference."""
    return tanh_case((2, 2, 1), 4, seed=0)


@pytest.fixture
def space(mlp_problem) -> sr.ParameterSpace:
    """The :class:`~subriemann.ParameterSpace` of :func:`mlp_problem` (MSE, float64)."""
    return mlp_problem.space()
