"""The rank monitor's cadence ``rank_every`` (subriemann/flow/engine.py, events.locate_in_window).

Reference: the closed form of :func:`tests.cases.event_space` (the Euclidean
flow of ``SquareAndLine``: :math:`b^2 = 1/(1+s)`, :math:`D = \\mathrm{diag}(1, b)`,
so :math:`\\sigma = (1, |b|)` and the rank drops 2 -> 1 where :math:`b = \\tau = 1/2`,
at :math:`s = 3`), and the uninterrupted run for checkpoints.
"""

from __future__ import annotations

import math

import pytest
import torch

import subriemann as sr
from subriemann.flow import engine
from subriemann.metrics import OutputPullbackMetric
from tests.cases import SQUARE_AND_LINE_START, SquareAndLine, event_space, one_sample_space
from tests.helpers import interrupt_after

OPTS = dict(rtol=1e-8, atol=1e-10, min_saves=2)  # saves: every (monitored) step, s = 4


def _flow(space=None, **kw):
    space = space or event_space()
    start = torch.tensor(SQUARE_AND_LINE_START, dtype=torch.float64)
    return sr.gradient_flow(space, start, 4.0, **(OPTS | kw))


def _count_spectra(monkeypatch) -> dict[str, int]:
    count = {"n": 0}
    real = engine.Flow.sv

    def sv(self, theta):
        count["n"] += 1
        return real(self, theta)

    monkeypatch.setattr(engine.Flow, "sv", sv)
    return count


@pytest.mark.parametrize("every", [1, 7])
def test_event_located_as_the_closed_form(every, monkeypatch):
    count = _count_spectra(monkeypatch)
    traj = _flow(rank_every=every)
    assert traj.status.code == "s_end_reached" and traj.counters["rank_every"] == every
    # one event, at b = 1/2 <=> s = 3 (event_tol 1e-9; the integrator's own error at
    # rtol = 1e-8 moves the crossing by ~1e-8 in s)
    assert [(e.rank_before, e.rank_after, e.index) for e in traj.events] == [(2, 1, 1)]
    assert traj.events[0].s == pytest.approx(3.0, abs=1e-6)
    # every saved row carries the singular values of its own point: sigma = (1, |b|)
    b = traj.theta[:, 1].abs()
    ref = torch.stack([torch.maximum(b, torch.ones_like(b)), torch.minimum(b, torch.ones_like(b))],
                      dim=1)
    torch.testing.assert_close(traj.singular_values, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(traj.rank, (ref > 0.5).sum(1))
    n_steps = traj.counters["n_steps"]
    if every == 1:
        assert len(traj.s) == n_steps + 1  # a row per accepted step
    else:
        # rows at the monitored steps (every 7th, the landing at s_end, and the steps beyond
        # the anchor's horizon near tau), s = 0 included
        assert 1 + n_steps // every + (n_steps % every != 0) <= len(traj.s) <= n_steps + 1
        # the horizon: sigma_2 = |b| approaches tau = 1/2 and is monitored as it comes
        # near: a window ends one step past half the gap left at its anchor, so the gap
        # shrinks by less than a factor 10 from one monitored row to the next (the 7th
        # steps alone: 0.09 -> 0.0044, a factor 20, from s = 1.88 to 2.93)
        gaps = b[traj.s < traj.events[0].s] - 0.5
        assert bool((gaps[1:] > 0.1 * gaps[:-1]).all()), gaps
        # spectra: s = 0, the monitored steps, the bisection probes and the event's
        # location (its regula falsi evaluations), far fewer than one per step + location
        assert count["n"] < n_steps


def test_cadence_resumes_step_for_step(tmp_path):
    full = _flow(rank_every=4)
    n = full.counters["n_steps"]
    part = _flow(rank_every=4, checkpoint=tmp_path / "run", max_steps=n // 2 + 1)
    assert part.status.code == "max_steps_reached" and (n // 2 + 1) % 4 != 0
    done = _flow(rank_every=4, resume=tmp_path / "run")
    # the steps ignore the monitor, so the resumed run takes the same steps bit for bit
    assert torch.equal(done.theta[-1], full.theta[-1])
    assert [(e.s, e.rank_after) for e in done.events] == [(e.s, e.rank_after) for e in full.events]


def test_interrupt_inside_a_window_goes_back_to_the_monitored_state(tmp_path, monkeypatch):
    space = event_space()
    full = _flow(space=event_space(), rank_every=5)
    interrupt_after(monkeypatch, space.metric, 40)
    part = _flow(space=space, rank_every=5, checkpoint=tmp_path / "run")
    assert part.status.code == "interrupted"
    monkeypatch.undo()
    # the last row is a monitored state (its singular values are its own), and the run
    # resumes from it to the same end
    b = float(part.theta[-1, 1])
    assert float(part.singular_values[-1, 1]) == pytest.approx(abs(b), rel=1e-12)
    done = _flow(space=space, rank_every=5, resume=tmp_path / "run")
    assert torch.equal(done.theta[-1], full.theta[-1])


def test_rank_every_errors():
    space = one_sample_space(SquareAndLine(), [1.0, 0.0], OutputPullbackMetric, rank_atol=0.5)
    start = torch.tensor(SQUARE_AND_LINE_START, dtype=torch.float64)
    with pytest.raises(ValueError, match="rank_every = 3 needs a vector field that cannot jump"):
        sr.gradient_flow(space, start, 1.0, rank_every=3)
    for bad in (0, "often", 2.5):
        with pytest.raises((TypeError, ValueError), match="rank_every"):
            sr.gradient_flow(space, start, 1.0, rank_every=bad)
    # "auto" on a small problem (QN * K <= 4e6) monitors every step; a jumping metric too
    assert sr.gradient_flow(space, start, 1.0, rank_every="auto").counters["rank_every"] == 1
    assert _flow(rank_every="auto").counters["rank_every"] == 1
    assert math.isfinite(engine.SMALL_PROBLEM)


def test_auto_cadence_on_a_large_problem(monkeypatch):
    # pretend the problem is large: the cadence follows the measured costs, the steps do not
    monkeypatch.setattr(engine, "SMALL_PROBLEM", 0)
    auto = _flow(rank_every="auto")
    fixed = _flow(rank_every=3)
    assert auto.counters["rank_every"] >= 1 and auto.status.code == "s_end_reached"
    # the path does not depend on where the monitor looked
    assert torch.equal(auto.theta[-1], fixed.theta[-1])
    assert [(e.rank_before, e.rank_after) for e in auto.events] == [(2, 1)]
    assert auto.events[0].s == pytest.approx(3.0, abs=1e-6)
