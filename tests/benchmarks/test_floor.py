"""The benchmarks' --quick smoke modes (timings themselves are not asserted)."""

from __future__ import annotations

import importlib.util

import pytest

from tests.helpers import REPO_ROOT as ROOT


def _load(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.filterwarnings("ignore:structured NTK engine:UserWarning")
def test_floor_quick(capsys):
    """``benchmarks/floor.py --quick``: the hand-written floor (its own per-layer NTK,
    Cholesky and VJP) and ``auto`` give the same lam = 1 direction at size S (the script
    exits if they differ by more than 1e-6; both are within ~1e-10 of D^+ r here, where
    kappa(D) is moderate), and the table is printed."""
    floor = _load("floor")
    assert floor.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "auto ÷ floor" in out and "| S | 4801 | 128 | ntk |" in out
