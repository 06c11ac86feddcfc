"""``examples/train_digits.py --fast``: AdaptedGD in an ordinary loop next to Adam."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.helpers import REPO_ROOT as ROOT


def test_train_digits_fast(tmp_path):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples/train_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    summary = mod.main(["--fast", "--out", str(tmp_path)])
    for key in ("adapted", "adam"):
        curve = summary[key]["curve"]
        assert len(curve) == 3 and all(math.isfinite(c[1]) for c in curve)
    # two epochs of AdaptedGD (lam = 0.5) lower the training loss from its initial value
    ours = summary["adapted"]["curve"]
    assert ours[-1][1] < ours[0][1]
    assert (tmp_path / "train_digits.png").stat().st_size > 0
    assert (tmp_path / "train_digits.json").exists()
