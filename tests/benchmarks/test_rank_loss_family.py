"""Smoke test of benchmarks/rank_loss_family.py (the acceptance harness of issue 12, point 1).

The harness itself is checked: its stationarity ratio and its rank at the
end come from a dense Jacobian and numpy's ``matrix_rank`` (independent of the
flow's monitor), and ``--quick`` writes its JSON and Markdown files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers import REPO_ROOT as ROOT


def test_quick_run_writes_its_table(tmp_path):
    out = tmp_path / "family"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rank_loss_family.py"), "--quick",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=300,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    data = json.loads(Path(str(out) + ".json").read_text())
    assert data["n"] == len(data["rows"]) == 2
    table = Path(str(out) + ".md").read_text()
    assert "| net | seed |" in table and len(table.splitlines()) == 4 + data["n"]
    for row in data["rows"]:
        assert np.isfinite(row["stationarity"]) and row["max_cost_rise"] <= 1e-12 * row["cost0"]
        # the monitor's rank of D at the end is numpy's at the same tau
        assert row["rank_end"] == row["rank_end_numpy"]
