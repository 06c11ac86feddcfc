"""The optimizer benchmark's --quick smoke run: every task and method, tiny budgets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT as ROOT


@pytest.mark.slow
def test_optim_benchmark_quick(tmp_path):
    pytest.importorskip("sklearn")
    old = "# other\n\nkept\n<!-- optim:begin -->\nold section\n<!-- optim:end -->\ntail\n"
    (tmp_path / "RESULTS.md").write_text(old)
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
    # only our own section is replaced, in place; the rest of the file is kept
    assert md.startswith("# other\n\nkept\n") and md.endswith("tail\n")
    assert md.count("<!-- optim:begin -->") == 1 and "old section" not in md
    assert "### Goals" in md
    assert (tmp_path / "optim.png").stat().st_size > 0
