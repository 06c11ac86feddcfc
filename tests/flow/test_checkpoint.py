"""Checkpoints and trajectory files that never lose or mix work (issue 12, point 3).

Each test reproduces one measured defect: a checkpoint named without its
suffix that resume did not find (and overwrote), an unwritable checkpoint path
found only after the integration, a resume from another problem, damaged
files raising assorted exceptions, and a write interrupted half-way.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import subriemann as sr
from subriemann.flow.trajectory import Trajectory
from subriemann.metrics import EuclideanMetric
from tests.cases import event_space, flow_problem, run_event_flow
from tests.helpers import ARRAYS, assert_same_arrays

THETA0 = torch.tensor([0.0, 1.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def reference() -> Trajectory:
    return run_event_flow()


def _count_gradient(space: sr.ParameterSpace) -> dict[str, int]:
    """Count the vector-field evaluations of ``space.metric`` (an instance attribute)."""
    calls = {"n": 0}
    original = space.metric.gradient

    def gradient(theta):
        calls["n"] += 1
        return original(theta)

    space.metric.gradient = gradient  # type: ignore[method-assign]
    return calls


# -- names with and without ".npz" ----------------------------------------------------------
@pytest.mark.parametrize(("ckpt_name", "resume_name"),
                         [("run", "run"), ("run", "run.npz"), ("run.npz", "run")])
def test_checkpoint_and_resume_ignore_the_suffix(tmp_path, reference, ckpt_name, resume_name):
    part = run_event_flow(checkpoint=tmp_path / ckpt_name, max_steps=6, checkpoint_every=2)
    assert part.status.code == "max_steps_reached"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.npz"]
    space = event_space()
    calls = _count_gradient(space)
    full = run_event_flow(space=space, checkpoint=tmp_path / resume_name,
                          resume=tmp_path / resume_name)
    assert 0 < calls["n"] < reference.counters["nfev"]  # continued, not restarted from s = 0
    # continued (not restarted from s = 0): the step count is the uninterrupted run's
    assert full.status.code == "s_end_reached"
    assert_same_arrays(full, reference)
    assert full.counters["n_steps"] == reference.counters["n_steps"]
    assert full.counters["nfev"] == reference.counters["nfev"]
    # the monitor's count carries over too (its time is a measurement, not compared)
    assert full.counters["n_spectra"] == reference.counters["n_spectra"]
    assert Trajectory.load(tmp_path / "run").status.code == "s_end_reached"


def test_save_and_load_ignore_the_suffix(tmp_path, reference):
    assert reference.save(tmp_path / "a") == tmp_path / "a.npz"
    assert_same_arrays(Trajectory.load(tmp_path / "a"), reference)
    assert_same_arrays(Trajectory.load(tmp_path / "a.npz"), reference)
    # a ".ckpt" name is a stem too: "x.ckpt" and "x.ckpt.npz" are the same file
    reference.save(tmp_path / "x.ckpt")
    assert_same_arrays(Trajectory.load(tmp_path / "x.ckpt.npz"), reference)


# -- an unwritable checkpoint path ------------------------------------------------------------
def test_unwritable_checkpoint_fails_before_integrating(tmp_path):
    (tmp_path / "afile").write_text("a regular file")
    space = event_space()
    calls = _count_gradient(space)
    with pytest.raises(ValueError, match=r"checkpoint .*afile"):
        run_event_flow(space=space, checkpoint=tmp_path / "afile" / "ckpt")
    assert calls["n"] == 0  # nothing was integrated, so nothing was lost
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(ValueError, match="directory"):
        run_event_flow(space=space, checkpoint=tmp_path / "d")
    assert calls["n"] == 0


# -- resume from another problem --------------------------------------------------------------
@pytest.fixture()
def partial(tmp_path) -> Path:
    ckpt = tmp_path / "part.npz"
    run_event_flow(checkpoint=ckpt, max_steps=4)
    return ckpt


def _shifted_space(shift: float) -> sr.ParameterSpace:
    space = event_space()
    return sr.ParameterSpace(space.module, space.inputs, space.targets + shift,
                             equip=False).equip_with_metric(EuclideanMetric, rank_atol=0.5)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_refuses_another_problem(partial):
    with pytest.raises(ValueError, match=r"initial point"):
        sr.gradient_flow(event_space(), torch.tensor([0.1, 1.0], dtype=torch.float64), 4.0,
                         rtol=1e-8, resume=partial)
    with pytest.raises(ValueError, match=r"targets") as info:
        run_event_flow(space=_shifted_space(3.0), resume=partial)
    assert "inputs" not in str(info.value) and str(partial) in str(info.value)
    space = event_space()
    other = sr.ParameterSpace(space.module, 2 * space.inputs, space.targets, equip=False)
    with pytest.raises(ValueError, match=r"inputs"):
        run_event_flow(space=other.equip_with_metric(EuclideanMetric, rank_atol=0.5),
                       resume=partial)
    with pytest.raises(ValueError, match=r"metric"):
        run_event_flow(space=event_space().equip_with_metric(EuclideanMetric, rank_atol=0.25),
                       resume=partial)
    # the same problem, rebuilt from scratch, resumes
    assert run_event_flow(space=event_space(), resume=partial).status.code == "s_end_reached"


def test_resume_refuses_another_model_and_loss(tmp_path):
    space = flow_problem((2, 5, 1), 3, seed=11)[0]
    ckpt = tmp_path / "c"
    theta0 = space.initial_point()
    sr.gradient_flow(space, theta0, 1.0, checkpoint=ckpt, max_steps=2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 5), torch.nn.Softplus(), torch.nn.Linear(5, 1))
    other = sr.ParameterSpace(model, space.inputs, space.targets, equip=False)
    with pytest.raises(ValueError, match=r"model"):
        sr.gradient_flow(other.equip_with_metric(sr.metrics.OutputPullbackMetric), theta0, 1.0,
                         resume=ckpt)
    with pytest.raises(ValueError, match=r"loss"):
        _resume_with_loss(space, ckpt)


class _HalfMSE(sr.losses.MSELoss):
    name = "mse/2"

    def value(self, x, y):
        return 0.25 * ((x - y) ** 2).sum()

    def grad(self, x, y):
        return 0.5 * (x - y)


def _resume_with_loss(space: sr.ParameterSpace, ckpt: Path) -> None:
    other = sr.ParameterSpace(space.module, space.inputs, space.targets, loss=_HalfMSE(),
                              equip=False)
    sr.gradient_flow(other.equip_with_metric(sr.metrics.OutputPullbackMetric),
                     space.initial_point(), 1.0, resume=ckpt)


# -- damaged files ----------------------------------------------------------------------------
def _rewrite(src: Path, dst: Path, **changes) -> Path:
    """Copy an .npz archive, replacing (or, with None, dropping) some entries."""
    with np.load(src, allow_pickle=False) as data:
        arrays = {k: np.array(data[k]) for k in data.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k, None)
        else:
            arrays[k] = v
    np.savez(dst, **arrays)
    return dst


def _with_meta(src: Path, dst: Path, edit) -> Path:
    with np.load(src, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
    edit(meta)
    return _rewrite(src, dst, meta=np.array(json.dumps(meta)))


def _damaged(tmp_path: Path, ckpt: Path) -> dict[str, tuple[Path, str]]:
    raw = ckpt.read_bytes()
    files: dict[str, tuple[Path, str]] = {}
    p = tmp_path / "truncated.npz"
    p.write_bytes(raw[: len(raw) // 2])
    files["truncated"] = (p, "not a readable .npz")
    p = tmp_path / "empty.npz"
    p.write_bytes(b"")
    files["empty"] = (p, "empty")
    p = tmp_path / "array.npy"
    np.save(p, np.zeros(3))
    files["renamed .npy"] = (p.rename(tmp_path / "renamed.npz"), "a single .npy array")
    files["missing key"] = (
        _with_meta(ckpt, tmp_path / "nokey.npz", lambda m: m.pop("status")), "'status'"
    )
    with np.load(ckpt) as data:
        s = np.array(data["s"])
    files["rows"] = (_rewrite(ckpt, tmp_path / "rows.npz", s=np.linspace(0, 1, len(s) + 59)),
                     "rows")
    files["missing array"] = (_rewrite(ckpt, tmp_path / "noarr.npz", cost=None), "'cost'")
    files["integrator key"] = (
        _with_meta(ckpt, tmp_path / "integ.npz", lambda m: m["integrator"].pop("h")), "'h'"
    )
    files["integrator rows"] = (
        _with_meta(ckpt, tmp_path / "nrec.npz", lambda m: m["integrator"].update(n_rec=99)),
        "n_rec",
    )
    files["integrator array"] = (_rewrite(ckpt, tmp_path / "ia.npz", integrator_f=None),
                                 "integrator_f")
    files["bad json"] = (_rewrite(ckpt, tmp_path / "json.npz", meta=np.array("{oops")), "meta")
    return files


def test_damaged_files_raise_one_value_error_naming_file_and_problem(tmp_path, partial):
    assert zipfile.is_zipfile(partial)
    for what, (path, needle) in _damaged(tmp_path, partial).items():
        loaders = [lambda p=path: run_event_flow(resume=p)]
        if what not in ("integrator key", "integrator rows", "integrator array"):
            loaders.append(lambda p=path: Trajectory.load(p))
        for load in loaders:
            with pytest.raises(ValueError) as info:
                load()
            msg = str(info.value)
            assert str(path) in msg, (what, msg)
            assert needle in msg, (what, msg)
            assert "\n" not in msg, (what, msg)


# -- atomic writes ----------------------------------------------------------------------------
def test_a_write_killed_half_way_leaves_the_previous_file(tmp_path, reference, monkeypatch):
    path = reference.save(tmp_path / "flow")
    before = path.read_bytes()
    import subriemann.flow.trajectory as trajectory_module

    def half_then_die(file, **arrays):
        if hasattr(file, "write"):
            file.write(b"PK\x03\x04 half an archive")
        else:
            Path(file).write_bytes(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt  # killed in the middle of the write

    monkeypatch.setattr(trajectory_module.np, "savez", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        reference.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.npz"]  # no debris
    assert_same_arrays(Trajectory.load(path), reference, ARRAYS)


# -- the user's metric is never written on ---------------------------------------------------
class _Watched(sr.metrics.OutputPullbackMetric):
    writes: list[tuple[int, str]] = []

    def __setattr__(self, name, value):
        type(self).writes.append((id(self), name))
        super().__setattr__(name, value)


def test_the_flow_writes_nothing_on_the_users_metric():
    space = event_space(_Watched)
    metric = space.metric
    _Watched.writes.clear()
    traj = run_event_flow(space=space)
    assert traj.events and traj.status.code == "s_end_reached"  # sub-steps with tau' ran
    assert [w for w in _Watched.writes if w[0] == id(metric)] == []
    assert metric.rank_atol == 0.5
