"""Batches of initial points (:mod:`subriemann.flow.batch`): lock-step flows equal single runs.

``gradient_flow`` with points ``[B, K]`` runs the ``B`` flows in lock-step rounds
(:class:`~subriemann.flow.lockstep.LockStep`, unit-tested in ``test_lockstep.py``);
the reference is each flow run alone.  Also: Ctrl-C during a batch and an error in
one member.
"""

from __future__ import annotations

import pytest
import torch

import subriemann as sr
from subriemann.flow import batch as batch_module
from subriemann.metrics import EuclideanMetric, InterpolatedMetric, OutputPullbackMetric
from tests.cases import flow_problem


@pytest.mark.parametrize(
    "metric,kw",
    [(EuclideanMetric, {}), (InterpolatedMetric, {"lam": 0.5}), (OutputPullbackMetric, {})],
)
def test_batch_integrated_together_equals_individual_runs(monkeypatch, metric, kw):
    """A batch [B, K] runs in lock-step rounds and reproduces each single run.

    The rounds evaluate the B vector fields together (vmap, batched QR/SVD),
    so results differ from the single runs by rounding only: each evaluation
    agrees to ~1e-15 relative.  The step-size controller divides by the
    error estimate (~1e-6 here), so accepted step sizes may differ by up to
    ~1e-9 relative: the free step times are compared at 1e-6, and theta,
    outputs and cost at the save times both runs land on exactly (the grid),
    where a relative step change of 1e-9 moves the result by 1e-9 of the
    local error, far below the 1e-10 asserted.
    """
    space, _ = flow_problem((2, 4, 1), 3, seed=7, metric=metric, **kw)
    theta0 = space.initial_point()
    batch = torch.stack([theta0, 0.9 * theta0, 1.1 * theta0])
    widths: list[int] = []
    serve = batch_module.serve_round

    def counting(requests):
        widths.append(len(requests))
        return serve(requests)

    monkeypatch.setattr(batch_module, "serve_round", counting)
    trajs = sr.gradient_flow(space, batch, 0.5, rtol=1e-6, min_saves=5)
    assert isinstance(trajs, list) and len(trajs) == 3
    # together: far fewer rounds than evaluations, most rounds serve all three flows
    n_requests = sum(widths)
    assert len(widths) < 0.5 * n_requests and max(widths) == 3
    monkeypatch.setattr(batch_module, "serve_round", serve)
    for p, traj in zip(batch, trajs):
        single = sr.gradient_flow(space, p, 0.5, rtol=1e-6, min_saves=5)
        assert traj.status.code == single.status.code == "s_end_reached"
        assert traj.s.shape == single.s.shape and torch.equal(traj.rank, single.rank)
        assert torch.allclose(traj.s, single.s, rtol=1e-6, atol=0.0)
        grid = torch.linspace(0.0, 0.5, 5, dtype=torch.float64)
        ia = torch.isin(traj.s, grid).nonzero().flatten()
        ib = torch.isin(single.s, grid).nonzero().flatten()
        assert len(ia) == len(ib) == 5
        for name in ("theta", "outputs", "cost", "singular_values"):
            a, b = getattr(traj, name)[ia], getattr(single, name)[ib]
            assert float((a - b).norm()) <= 1e-10 * float(b.norm()), name
    assert space.metric.rank_atol is None  # the members' thresholds were their own copies


def test_batch_interrupt_keeps_every_trajectory(monkeypatch):
    """Ctrl-C during a batch: every flow stops at its last accepted step, nothing is lost."""
    space, _ = flow_problem((2, 4, 1), 3, seed=7)
    theta0 = space.initial_point()
    batch = torch.stack([theta0, 0.9 * theta0])
    serve = batch_module.serve_round
    calls = {"n": 0}

    def interrupting(requests):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return serve(requests)

    monkeypatch.setattr(batch_module, "serve_round", interrupting)
    trajs = sr.gradient_flow(space, batch, 5.0, rtol=1e-6)
    for traj in trajs:
        assert traj.status.code == "interrupted"
        assert 1 < len(traj.s) and float(traj.s[-1]) < 5.0
        assert torch.isfinite(traj.theta).all() and torch.isfinite(traj.cost).all()
        # the kept cost is the cost at the kept theta
        assert float(traj.cost[-1]) == pytest.approx(float(space.cost(traj.theta[-1])), rel=1e-12)


def test_batch_member_error_is_raised():
    space, _ = flow_problem((2, 4, 1), 3, seed=7)
    theta0 = space.initial_point()
    bad = theta0.clone()
    bad[0] = float("nan")
    with pytest.raises(ValueError, match="cannot start at initial_point"):
        sr.gradient_flow(space, torch.stack([theta0, bad]), 0.5)
    assert len(space.__dict__.get("_states", [])) <= 3  # the point cache is back to its size
