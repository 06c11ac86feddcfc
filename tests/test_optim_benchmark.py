"""The optimizer benchmark's --quick smoke run: every task and method, tiny budgets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_optim_benchmark_quick(tmp_path):
    pytest.importorskip("sklearn")
    (tmp_path / "RESULTS.md").write_text("# other\n\nkept\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "optim.py"), "--quick", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "optim.json").read_text())
    assert {r["task"] for r in res["rows"]} == {
        "digits-mlp",
        "digits-cnn",
        "cli-regression",
        "teacher-student",
    }
    methods = {r["method"] for r in res["rows"]}
    assert {"Adam", "SGD+momentum 0.9", "LBFGS (strong Wolfe, full batch)"} <= methods
    assert any(m.startswith("AdaptedGD lam=0.5") for m in methods)
    assert {r["method"] for r in res["step_cost"]} >= {"Adam", "AdaptedGD lam=1.0"}
    md = (tmp_path / "RESULTS.md").read_text()
    assert md.startswith("# other") and "kept" in md  # only our own section is written
    assert md.count("<!-- optim:begin -->") == 1 and "### Goals" in md
    assert (tmp_path / "optim.png").stat().st_size > 0
    # a second run replaces the section instead of appending another one
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0
    assert (tmp_path / "RESULTS.md").read_text().count("<!-- optim:begin -->") == 1
