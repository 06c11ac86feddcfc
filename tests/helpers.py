"""Support for the tests that is neither a reference nor a case.

* :data:`REPO_ROOT`, for test files that run the examples, benchmarks or docs;
* :func:`assert_same_arrays` and :func:`assert_same_events`: two trajectories agree
  bit for bit;
* :func:`grad_np`: a metric's gradient as a numpy array;
* :func:`close_to_max`: an error relative to the largest reference entry;
* :func:`interrupt_after`: a Ctrl-C at the n-th evaluation of a vector field;
* :func:`check_report`: the report folder of a completed ``subriemann run``.

Dense references are in :mod:`tests.references`, problem cases in :mod:`tests.cases`.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from subriemann.app.report import SUMMARY_SCHEMA, validate_summary
from subriemann.flow.trajectory import RankChange, Trajectory

__all__ = [
    "REPO_ROOT",
    "ARRAYS",
    "assert_same_arrays",
    "assert_same_events",
    "grad_np",
    "close_to_max",
    "interrupt_after",
    "FIGURES",
    "check_schema",
    "check_report",
]

#: The repository root (test files in sub-folders find examples/, benchmarks/, docs/ here).
REPO_ROOT = Path(__file__).resolve().parents[1]

#: The per-step arrays of a :class:`~subriemann.flow.trajectory.Trajectory`.
ARRAYS = ("s", "theta", "outputs", "cost", "grad_norm", "singular_values", "rank", "targets")


def assert_same_arrays(a: Trajectory, b: Trajectory, names=ARRAYS) -> None:
    """The arrays ``names`` of ``a`` and ``b`` have the same dtype and are equal bit for bit."""
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert torch.equal(x, y), name


def assert_same_events(a: list[RankChange], b: list[RankChange]) -> None:
    """Two lists of rank events are equal field by field (tensors bit for bit)."""
    assert len(a) == len(b)
    for e, f in zip(a, b):
        assert (e.s, e.rank_before, e.rank_after, e.index, e.tau, e.s_bracket, e.s_noise) == (
            f.s, f.rank_before, f.rank_after, f.index, f.tau, f.s_bracket, f.s_noise
        )
        assert torch.equal(e.theta, f.theta)
        assert torch.equal(e.singular_values_before, f.singular_values_before)
        assert torch.equal(e.singular_values_after, f.singular_values_after)


def grad_np(metric, theta) -> np.ndarray:
    """``metric.gradient(theta)`` as a numpy array."""
    return metric.gradient(theta).detach().numpy()


def close_to_max(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-12) -> float:
    """Assert ``max|actual - expected| <= rtol * max|expected|``; returns that relative error.

    The default ``1e-12`` suits float64 results that differ from the reference only
    by the order of their sums (errors ~ sqrt(K) eps ~ 1e-14 at the tests' sizes).
    """
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if not expected.numel():
        return 0.0
    scale = max(float(expected.abs().max()), 1e-300)
    err = float((actual - expected).abs().max()) / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.1g} (scale {scale:.3e})"
    return err


def interrupt_after(monkeypatch, owner, calls: int) -> dict[str, int]:
    """Make ``owner.gradient`` raise KeyboardInterrupt at its ``calls``-th call (a Ctrl-C).

    ``owner`` is a metric (that instance only) or a metric class (every instance).
    Returns the call counter ``{"n": ...}``.
    """
    original = owner.gradient
    count = {"n": 0}

    def gradient(*args):
        count["n"] += 1
        if count["n"] == calls:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(owner, "gradient", gradient)
    return count


# -- the report folder of `subriemann run` ---------------------------------------------------
FIGURES = ("cost", "output_path", "singular_values", "deviation")


def check_schema(summary: dict) -> None:
    """Validate with the built-in validator and, when installed, with jsonschema."""
    validate_summary(summary)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(summary, SUMMARY_SCHEMA)


def check_report(out: Path, flows: tuple[str, ...] = ("euclidean", "pullback")) -> dict:
    """The report folder of a completed run: every file there and sound."""
    summary = json.loads((out / "summary.json").read_text())
    check_schema(summary)
    assert summary["complete"] is True
    assert [f["name"] for f in summary["flows"]] == list(flows)
    for key in ("subriemann", "torch", "geomstats", "numpy", "python"):
        assert summary["versions"][key]
    assert isinstance(summary["settings"]["seed"], int)
    assert set(summary["figures"]) == set(FIGURES)
    for rel in summary["figures"].values():
        png = out / rel
        assert png.stat().st_size > 5_000
        img = matplotlib.image.imread(png)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200
        assert float(np.std(img)) > 0.01  # not a blank canvas
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert '<table id="flows">' in html
    for f in summary["flows"]:
        assert f["completed"] and f["checkpoint"] is None
        traj = Trajectory.load(out / f["trajectory"])
        assert len(traj) == f["points"] >= 2
        assert float(traj.cost[-1]) == pytest.approx(f["final_cost"])
        assert not (out / "flows" / f"{f['name']}.ckpt.npz").exists()
    return summary
