"""``benchmarks/scale.py --quick``: the scale benchmark runs and its two routes agree."""

from __future__ import annotations

import importlib.util
import json

from tests.helpers import REPO_ROOT


def test_scale_benchmark_quick(tmp_path) -> None:
    """``benchmarks/scale.py --quick --no-flows``: a small CNN on 300 digits (K = 1348 < QN =
    3000), the default route and the engine's parameter-space solve (``kspace``) side by side,
    each in its own process, written into RESULTS.md and scale.json.  Both are direct
    Cholesky solves of the same SPD system of condition <= 1 + 2 sigma_max^2 (about 1e3
    here), so they agree to ~K kappa eps ~ 1e-10 at most (observed ~1e-13)."""
    path = REPO_ROOT / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--no-flows", "--out", str(tmp_path)]) == 0
    rows = {r["route"]: r for r in json.loads((tmp_path / "scale.json").read_text())["gradients"]}
    assert set(rows) == {"ntk", "kspace"} and "error" not in rows["ntk"]
    assert rows["kspace"]["rel_diff_auto"] < 1e-10
    assert "| digits-cnn-small | 1348 | 3000 | kspace |" in (tmp_path / "RESULTS.md").read_text()
