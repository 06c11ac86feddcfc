"""``examples/cross_entropy_digits.py --fast`` runs and shows what docs/theory.md §6 predicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO_ROOT as ROOT

EXAMPLE = ROOT / "examples" / "cross_entropy_digits.py"


@pytest.mark.slow
def test_cross_entropy_digits_example_fast(tmp_path: Path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--fast", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "lam=1, K<QN" in proc.stdout
    fig = tmp_path / "cross_entropy_digits.png"
    assert fig.exists() and fig.stat().st_size > 10_000
    summary = json.loads((tmp_path / "cross_entropy_digits.json").read_text())
    assert summary["mode"] == "fast"
    flows = summary["flows"]
    assert set(flows) == {"lam=1", "lam=0.5", "lam=0", "lam=1, K<QN"}
    adapted = flows["lam=1"]
    # overparametrized, full rank: the hyperplanes are kept (to the fast mode's rtol 1e-7)
    assert adapted["K"] >= adapted["QN"] and adapted["rank_min"] == adapted["QN"]
    assert adapted["status"] == "s_end_reached"
    assert adapted["max_drift"] < 1e-6
    assert adapted["dist_x*_end"] < 0.05 * adapted["dist_x*_0"]
    # lambda = 0.5 and the standard flow move them
    assert flows["lam=0.5"]["max_drift"] > 1e-3
    assert flows["lam=0"]["max_drift"] > 1e-2
    # K < QN: per-sample sums drift even at lambda = 1, the total is kept (last-layer bias)
    small = flows["lam=1, K<QN"]
    assert small["K"] < small["QN"] and small["rank_max"] < small["QN"]
    assert small["max_drift"] > 1e-2
    assert small["total_drift"] < 1e-6
    assert small["dist_x*_end"] > 1.0
    # the classifier learns: held-out accuracy well above chance (1/3)
    assert adapted["test_acc"] > 0.8
    for row in flows.values():
        assert 0.0 <= row["test_acc"] <= 1.0
