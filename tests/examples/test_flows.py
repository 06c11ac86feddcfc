"""``examples/three_flows.py --fast`` and ``examples/rank_loss.py --fast`` run and show
what docs/theory.md §3–§5 predict."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT as ROOT


def run_example(name: str, out: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--fast", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_three_flows_fast(tmp_path: Path):
    pytest.importorskip("matplotlib")
    stdout = run_example("three_flows.py", tmp_path)
    assert "line res." in stdout and "nfev" in stdout
    fig = tmp_path / "three_flows.png"
    assert fig.exists() and fig.stat().st_size > 10_000
    res = json.loads((tmp_path / "three_flows.json").read_text())
    assert res["mode"] == "fast" and res["K"] == 4801
    flows = res["flows"]
    assert set(flows) == {"0", "0.5", "1"}
    for row in flows.values():
        assert row["status"] == "s_end_reached"
        assert row["cost_final"] < row["cost_0"]
        assert row["rank_min"] == row["rank_max"] == res["QN"] and row["events"] == 0
        assert row["nfev"] > 0
    adapted = flows["1"]
    # docs/theory.md §3 at the fast mode's rtol 1e-6: the uniform rate 2 and the straight line
    assert abs(adapted["decay_rate"] - 2.0) < 1e-5
    assert adapted["line_residual"] < 1e-5
    assert adapted["cost_final"] == pytest.approx(adapted["cost_0"] * math.exp(-4.0), rel=1e-5)
    # the other flows bend away from the line
    assert flows["0"]["line_residual"] > 0.1 and flows["0.5"]["line_residual"] > 0.01
    # the Euclidean flow is stiff: many more evaluations
    assert flows["0"]["nfev"] > 2 * adapted["nfev"]


@pytest.mark.slow
def test_rank_loss_fast(tmp_path: Path):
    stdout = run_example("rank_loss.py", tmp_path)
    assert "propagator" in stdout and "events" in stdout
    res = json.loads((tmp_path / "rank_loss.json").read_text())
    assert res["mode"] == "fast"
    a = res["rank_deficient"]
    assert a["rank_min"] == a["rank_max"] == 3 < a["QN"]
    assert a["cost_end"] > 0.01 * a["cost_0"]  # C > 0 at the end
    assert a["P_residual_end"] < 1e-3  # on the way to P(x - y) = 0
    assert a["ker_B_drift"] < 1e-12
    assert a["z_max"] > 0.05  # a real bend, nearly all of it off ran D early on
    assert a["propagator_error"] < 1e-3
    assert 3.5 < a["propagator_error_2h"] / a["propagator_error"] < 4.5  # second order
    assert a["rank_loss_fraction"] == pytest.approx(1.0, abs=1e-2)
    b = res["constant_projector"]
    assert b["z_error"] < 1e-9 and b["z_propagator_error"] < 1e-12
    lam0, lam1 = res["rank_drop"]
    assert lam0["events"] == lam1["events"] == [[2, 1]]
    assert abs(lam0["s_error"]) < 1e-7 and abs(lam1["s_error"]) < 1e-7
    # after the event b = 1/2 is frozen and a = 1 - e^{-s}: C = (e^{-2s} + 1/64) / 2 > 0
    c_end = 0.5 * (math.exp(-2 * lam1["s_end"]) + 1 / 64)
    assert lam1["cost_end"] == pytest.approx(c_end, rel=1e-8)
    assert lam1["propagator_error"] < 1e-8
    d = res["dip"]
    assert d["events"] == [[2, 1], [1, 2]]
    assert d["dip_width"] < d["mean_step"]
    for s, expected in zip(d["s_events"], d["s_expected"]):
        assert abs(s - expected) < 1e-7
