"""``examples/critical_sets.py --fast``: finds the dimension-2 critical set, saves both plots."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO_ROOT as ROOT


def test_critical_sets_example_fast(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "critical_sets.py"), "--fast", "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "non-global minimum" in out
    assert "critical set through the end points: dimension 2" in out
    assert "comp nodes  dim" in out and "status:" in out
    assert "S_3 -> non-global critical set" in out
    for name in ("critical_set.png", "strata_graph.png"):
        assert (tmp_path / name).stat().st_size > 1000
