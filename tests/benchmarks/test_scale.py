"""``benchmarks/scale.py --quick``: the scale benchmark runs and its two routes agree."""

from __future__ import annotations

import importlib.util
import json

from tests.cases import run_event_flow
from tests.helpers import REPO_ROOT


def _load_scale():
    path = REPO_ROOT / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flow_rows_and_goals(tmp_path) -> None:
    """A flow's monitor columns come from its trajectory's counters, and the goals read
    them: share = monitor / (wall - monitor) <= 1/2, all flows at s_end within 600 s."""
    mod = _load_scale()
    traj = run_event_flow()
    row = mod._monitor(traj.save(tmp_path / "flow.npz"))
    c = traj.counters
    assert row["spectra"] == c["n_spectra"] and row["monitor_s"] == round(c["monitor_time"], 1)
    head = {"total_s": 599.0}
    fast = {"label": "a", "status": "s_end_reached", "wall_time": 30.0, "monitor_s": 10.0,
            "spectra": 7, "monitor_share": 0.5}
    slow = dict(fast, label="b", monitor_s=20.0, monitor_share=2.0)
    lines = mod._flow_goal_lines([head, fast, slow])
    assert lines[0].startswith("- **the three flows at s_end in ≤ 10 min**: met")
    assert "**a, rank monitor ≤ 50% on top of the rest**: met (50%" in lines[1]
    assert "**b, rank monitor ≤ 50% on top of the rest**: missed (200%" in lines[2]
    late = dict(fast, status="max_time_reached")
    assert "missed (599 s; 1 of 2 at s_end)" in mod._flow_goal_lines([head, fast, late])[0]
    assert "missed (601 s" in mod._flow_goal_lines([{"total_s": 601.0}, fast])[0]


def test_scale_benchmark_quick(tmp_path) -> None:
    """``benchmarks/scale.py --quick --no-flows``: a small CNN on 300 digits (K = 1348 < QN =
    3000), the default route and the engine's parameter-space solve (``kspace``) side by side,
    each in its own process, written into RESULTS.md and scale.json.  Both are direct
    Cholesky solves of the same SPD system of condition <= 1 + 2 sigma_max^2 (about 1e3
    here), so they agree to ~K kappa eps ~ 1e-10 at most (observed ~1e-13)."""
    mod = _load_scale()
    assert mod.main(["--quick", "--no-flows", "--out", str(tmp_path)]) == 0
    rows = {r["route"]: r for r in json.loads((tmp_path / "scale.json").read_text())["gradients"]}
    assert set(rows) == {"ntk", "kspace"} and "error" not in rows["ntk"]
    assert rows["kspace"]["rel_diff_auto"] < 1e-10
    assert "| digits-cnn-small | 1348 | 3000 | kspace |" in (tmp_path / "RESULTS.md").read_text()
