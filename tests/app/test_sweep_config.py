"""Sweep config checks ([grid], [flow], [analysis]): normalized values, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from subriemann.app.config import UsageError
from subriemann.app.sweep.config import parse_sweep_config


def test_grid_values_are_normalized(tmp_path):
    cfg = parse_sweep_config(
        {"grid": {"data": ["Teacher", "sub/d.npz"], "model_file": "net.py:build",
                  "activation": "TANH", "loss": ["MSE", "cross-entropy"], "n_samples": [None, 4],
                  "metric": ["pullback"], "seed": 0}},
        base=tmp_path,
    )
    base = tmp_path.resolve()
    assert cfg.grid["data"] == ["teacher", str(base / "sub" / "d.npz")]
    assert cfg.grid["model_file"] == [f"{base / 'net.py'}:build"]
    assert cfg.grid["activation"] == ["tanh"]
    assert cfg.grid["loss"] == ["mse", "cross_entropy"]
    assert cfg.grid["n_samples"] == [None, 4] and cfg.grid["seed"] == [0]
    assert len(cfg.cells()) == 2 * 2 * 2
    assert Path(cfg.cells()[0].model_file or "").name == "net.py:build"


def test_width_and_depth_build_mlp_specs():
    cfg = parse_sweep_config({"grid": {"width": [3], "depth": [0, 2]}})
    assert [c.model for c in cfg.cells()] == ["linear", "mlp:3,3"]


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"grid": {"width": [0]}}, "grid.width must be a positive integer, got 0"),
        ({"grid": {"width": [True]}}, "grid.width must be a positive integer, got True"),
        ({"grid": {"width": [2], "depth": [-1]}}, "grid.depth must be an integer >= 0"),
        ({"grid": {"width": [2], "seed": [1.5]}}, "grid.seed must be an integer >= 0, got 1.5"),
        ({"grid": {"width": [2], "n_samples": [0]}}, "grid.n_samples must be a positive integer"),
        ({"grid": {"width": [2], "activation": ["swish"]}}, "unknown activation 'swish'"),
        ({"grid": {"width": [2], "loss": ["hinge"]}}, "unknown loss 'hinge'"),
        ({"grid": {"model": ["mlp:a"]}}, r"grid.model: bad width 'a'"),
        ({"grid": {"width": [2], "data": [""]}}, "grid.data must be a non-empty string"),
        ({"grid": {"width": [2, 2]}}, r"grid.width lists a value twice: \[2, 2\]"),
        ({"grid": {"width": [2]}, "flow": {"rtol": 1.5}},
         r"flow.rtol must be a number > 0 and < 1, got 1.5"),
        ({"grid": {"width": [2]}, "flow": {"s_end": 0}}, "flow.s_end must be a positive number"),
        ({"grid": {"width": [2]}, "flow": {"max_time": float("inf")}},
         "flow.max_time must be a finite number"),
        ({"grid": {"width": [2]}, "flow": {"checkpoint_every": 0}},
         "flow.checkpoint_every must be a positive integer"),
        ({"grid": {"width": [2]}, "run": {"retries": -1}}, "run.retries must be an integer >= 0"),
        ({"grid": {"width": [2]}, "analysis": {"classify": 1}},
         "analysis.classify must be True or False, got 1"),
    ],
)
def test_bad_values_are_one_line_usage_errors(raw, match):
    with pytest.raises(UsageError, match=match) as info:
        parse_sweep_config(raw)
    assert "\n" not in str(info.value)
