"""events.locate stops at the noise band of the computed singular values.

A stub flow on a straight path theta(s) = 1 - s (Euler sub-steps) whose singular value
sigma_1 = theta crosses tau = 0.5 at s* = 0.5 with slope -1, computed with a
deterministic "rounding" of amplitude 0.4 delta (the scatter measured on full digits is
0.4 of the flow's delta): the search stops once the bracket is inside the band
2 delta / |slope| = 2 delta, reports it as ``s_noise``, and the true crossing lies within
max(s_bracket, s_noise) of the reported s.  Without rounding (delta = 0) it goes on to
event_tol, as before, and with the scatter but delta = 0 it spends more spectra on it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from subriemann.flow import events


class Stub:
    def __init__(self, delta: float, scatter: float) -> None:
        self.tau, self.s_end, self.events = 0.5, 1.0, []
        self.o = SimpleNamespace(method="euler", event_tol=1e-9)
        self.delta, self.scatter, self.n_sv = delta, scatter, 0

    def step(self, theta, f0, h, tau=None):  # pragma: no cover - Euler sub-steps only
        raise AssertionError

    def sv(self, theta):
        self.n_sv += 1
        x = float(theta[0])
        noise = self.scatter * math.sin(1e7 * x)  # deterministic, |noise| <= scatter
        return torch.tensor([10.0, x + noise], dtype=torch.float64)

    def rank_of(self, sv):
        return int((sv > self.tau).sum())

    def sv_rounding(self, sv):
        return self.delta


def _locate(fl: Stub):
    y0, f0 = torch.tensor([1.0], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64)
    y1 = y0 + 0.8 * f0
    return events.locate(fl, 0.0, y0, f0, 0.8, 1, fl.sv(y0), fl.sv(y1), y1)


@pytest.mark.parametrize("delta", [1e-6, 1e-4])
def test_the_search_stops_at_the_noise_band(delta):
    fl = Stub(delta, 0.4 * delta)
    ev, y_hi, _, _ = _locate(fl)
    assert ev.s_noise == pytest.approx(2 * delta, rel=0.05)  # 2 delta / |slope|, slope -1
    assert ev.s_bracket <= ev.s_noise
    assert abs(ev.s - 0.5) <= max(ev.s_bracket, ev.s_noise)
    assert float(y_hi[0]) == pytest.approx(1 - ev.s - 0.5 * ev.s_bracket, abs=1e-15)
    assert (ev.rank_before, ev.rank_after) == (2, 1)
    exact = Stub(0.0, 0.0)
    ev0 = _locate(exact)[0]
    assert ev0.s_noise == 0.0 and ev0.s_bracket <= 1e-9 and abs(ev0.s - 0.5) <= 1e-9
    blind = Stub(0.0, 0.4 * delta)  # the same scatter, not known: chases it to event_tol
    ev1 = _locate(blind)[0]
    assert ev1.s_bracket <= 1e-9 and fl.n_sv + 3 <= blind.n_sv


def test_a_band_wider_than_the_step_takes_no_probe():
    fl = Stub(1.0, 0.0)  # 2 delta = 2 > h = 0.8
    ev = _locate(fl)[0]
    assert fl.n_sv == 2 and ev.s_bracket == 0.8 and ev.s == pytest.approx(0.4)
