"""Trajectory files, checkpoints and resumption (issue 4).

A save → load round trip must be bit-exact (``torch.equal`` on every array,
the events included, and equal metadata), and a flow resumed from a
checkpoint must be step for step the uninterrupted one: identical ``s``,
``theta``, ``cost`` (``torch.equal``), whatever interrupted it (a step
budget, a ``KeyboardInterrupt`` in the middle of a step or of an event's
localization).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import subriemann as sr
from subriemann.flow import engine as flow_module
from subriemann.flow import events as events_module
from subriemann.flow.trajectory import FORMAT, STATUS_CODES, FlowStatus, Trajectory
from subriemann.metrics import OutputPullbackMetric
from tests.cases import event_space, flow_problem, run_event_flow
from tests.helpers import (
    ARRAYS,
    REPO_ROOT,
    assert_same_arrays,
    assert_same_events,
    interrupt_after,
)


# -- the file format ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def event_traj() -> Trajectory:
    traj = sr.gradient_flow(event_space(), torch.tensor([0.0, 1.0], dtype=torch.float64), 4.0)
    assert len(traj.events) == 1
    return traj


def test_save_load_round_trip_is_bit_exact(event_traj, tmp_path):
    path = event_traj.save(tmp_path / "flow.npz")
    back = Trajectory.load(path)
    assert_same_arrays(event_traj, back)
    assert torch.equal(event_traj.t, back.t)
    assert_same_events(event_traj.events, back.events)
    assert back.meta() == event_traj.meta()
    assert back.status == event_traj.status
    for name in ("rank_rtol", "rank_tau", "metric", "num_samples", "num_outputs", "loss",
                 "counters", "settings"):
        assert getattr(back, name) == getattr(event_traj, name), name
    # and again: a loaded trajectory saves to the same content
    again = Trajectory.load(back.save(tmp_path / "again.npz"))
    assert_same_arrays(back, again)
    assert again.meta() == back.meta()


def test_round_trip_float32_and_suffix(tmp_path):
    space = flow_problem((2, 5, 1), 3, seed=11, dtype=torch.float32)[0]
    traj = sr.gradient_flow(space, space.initial_point(), 0.5, rtol=1e-5, atol=1e-7)
    path = traj.save(tmp_path / "f32")  # ".npz" is appended
    assert path == tmp_path / "f32.npz" and path.exists()
    back = Trajectory.load(path)
    assert back.theta.dtype == torch.float32 and back.s.dtype == torch.float64
    assert_same_arrays(traj, back)
    assert back.meta() == traj.meta()


def test_file_layout_is_as_documented(event_traj, tmp_path):
    path = event_traj.save(tmp_path / "flow.npz")
    with np.load(path, allow_pickle=False) as data:
        names = set(data.files)
        meta = json.loads(str(data["meta"]))
        assert data["theta"].shape == tuple(event_traj.theta.shape)
    assert names == set(ARRAYS) | {"meta", "event0_theta", "event0_sv_before", "event0_sv_after"}
    assert meta["format"] == FORMAT
    assert set(meta) >= {"status", "metric", "rank_rtol", "rank_tau", "num_samples",
                         "num_outputs", "loss", "counters", "settings", "events"}
    assert meta["events"][0]["rank_before"] == 2 and meta["settings"]["s_end"] == 4.0
    assert set(meta["counters"]) == {"nfev", "n_steps", "n_rejected", "wall_time", "rank_every",
                                     "monitor_time", "n_spectra"}


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Trajectory.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a subriemann trajectory"):
        Trajectory.load(tmp_path / "other.npz")
    np.savez(tmp_path / "future.npz", meta=np.array(json.dumps({"format": "x/9"})))
    with pytest.raises(ValueError, match="unknown trajectory format"):
        Trajectory.load(tmp_path / "future.npz")


def test_status_codes_are_complete_and_documented():
    source = Path(flow_module.__file__).read_text()
    used = set(re.findall(r'FlowStatus\(\s*"(\w+)"', source))
    assert used and used <= set(STATUS_CODES)
    assert used | {"interrupted", "running"} == set(STATUS_CODES)
    with pytest.raises(ValueError, match="unknown status code"):
        FlowStatus("done")
    assert FlowStatus("s_end_reached").successful
    assert not FlowStatus("nonfinite").successful
    assert FlowStatus("nonfinite").message == STATUS_CODES["nonfinite"]
    assert str(FlowStatus("rank_change", "x")) == "rank_change: x"


def test_every_status_code_is_documented():
    page = (REPO_ROOT / "docs" / "flows.md").read_text()
    for code in STATUS_CODES:
        assert f"`{code}`" in page, code


def test_trajectory_conveniences(event_traj):
    assert len(event_traj) == event_traj.s.shape[0]
    assert torch.equal(event_traj.final_theta, event_traj.theta[-1])
    assert event_traj.final_cost == float(event_traj.cost[-1])
    torch.testing.assert_close(event_traj.t, 1 - torch.exp(-event_traj.s), rtol=0, atol=1e-15)
    assert "events=1" in repr(event_traj) and "s_end_reached" in repr(event_traj)


# -- checkpoints and resumption -------------------------------------------------------------
@pytest.mark.parametrize("save_at", [None, [0.5, 1.0, 2.0, 3.5]], ids=["default", "save_at"])
def test_resume_after_a_step_budget(tmp_path, event_traj, save_at):
    ref = event_traj if save_at is None else run_event_flow(save_at=save_at)
    ckpt = tmp_path / "ckpt.npz"
    part = run_event_flow(checkpoint=ckpt, checkpoint_every=3, max_steps=12, save_at=save_at)
    assert part.status.code == "max_steps_reached"
    assert part.events == []  # the event (s = 3) comes later
    if save_at is not None:  # the last good state is kept, though not a requested time
        assert float(part.s[-1]) not in save_at
    full = run_event_flow(checkpoint=ckpt, resume=ckpt, save_at=save_at)
    assert full.status.code == "s_end_reached"
    assert_same_arrays(full, ref)
    assert_same_events(full.events, ref.events)
    # nothing is recomputed on resumption: even the counters agree
    for key in ("nfev", "n_steps", "n_rejected"):
        assert full.counters[key] == ref.counters[key], key
    assert Trajectory.load(ckpt).status.code == "s_end_reached"


@pytest.mark.parametrize("n", [40, 97])
def test_keyboard_interrupt_returns_and_resumes(tmp_path, monkeypatch, event_traj, n):
    space = event_space()
    ckpt = tmp_path / "ckpt.npz"
    interrupt_after(monkeypatch, space.metric, n)
    part = run_event_flow(space=space, checkpoint=ckpt, checkpoint_every=1000)
    assert part.status.code == "interrupted"
    assert "at s =" in part.status.message
    assert 1 < len(part) < len(event_traj) and bool(torch.isfinite(part.theta).all())
    # the trajectory so far is the uninterrupted one, point for point
    k = len(part)
    assert torch.equal(part.s, event_traj.s[:k]) and torch.equal(part.theta, event_traj.theta[:k])
    assert Trajectory.load(ckpt).status.code == "interrupted"
    monkeypatch.undo()
    full = run_event_flow(space=space, checkpoint=ckpt, resume=ckpt)
    assert_same_arrays(full, event_traj)
    assert_same_events(full.events, event_traj.events)
    assert full.counters["n_steps"] == event_traj.counters["n_steps"]
    # the aborted step's evaluations were spent too
    assert full.counters["nfev"] >= event_traj.counters["nfev"]


def test_interrupt_while_locating_an_event(tmp_path, monkeypatch, event_traj):
    ckpt = tmp_path / "ckpt.npz"
    original = events_module.locate

    def locate(fl, *args, **kwargs):
        original(fl, *args, **kwargs)  # the work is done, then the user presses Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(events_module, "locate", locate)
    part = run_event_flow(checkpoint=ckpt)
    assert part.status.code == "interrupted" and part.events == []
    assert float(part.s[-1]) < event_traj.events[0].s
    monkeypatch.undo()
    full = run_event_flow(resume=ckpt)
    assert_same_arrays(full, event_traj)
    assert_same_events(full.events, event_traj.events)


def test_interrupt_without_checkpoint(monkeypatch):
    space = flow_problem((2, 5, 1), 3, seed=11)[0]
    interrupt_after(monkeypatch, space.metric, 30)
    traj = sr.gradient_flow(space, space.initial_point(), 3.0)
    assert traj.status.code == "interrupted" and len(traj) > 1
    assert space.metric.rank_atol is None  # the threshold is restored


def test_resume_edge_cases(tmp_path, event_traj):
    # a missing checkpoint starts afresh
    fresh = run_event_flow(resume=tmp_path / "none.npz")
    assert_same_arrays(fresh, event_traj)
    # a finished run is returned as it is
    ckpt = tmp_path / "done.npz"
    run_event_flow(checkpoint=ckpt)
    again = run_event_flow(resume=ckpt)
    assert_same_arrays(again, event_traj)
    assert again.counters == Trajectory.load(ckpt).counters
    # a plain trajectory file is not a checkpoint
    with pytest.raises(ValueError, match="not a checkpoint"):
        run_event_flow(resume=event_traj.save(tmp_path / "plain.npz"))
    # other options than the checkpointed run's
    part = tmp_path / "part.npz"
    run_event_flow(checkpoint=part, max_steps=3)
    with pytest.raises(ValueError, match=r"options differ .*rtol"):
        sr.gradient_flow(event_space(), torch.tensor([0.0, 1.0], dtype=torch.float64), 4.0,
                         rtol=1e-6, resume=part)
    with pytest.raises(ValueError, match="metric"):
        run_event_flow(space=event_space(OutputPullbackMetric), resume=part)
