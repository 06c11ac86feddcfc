"""``subriemann run``: resume and output folders never lose or mix work (issue 12, point 3).

* ``--resume --out DIR`` alone continues with the settings stored in DIR;
  options that differ from them are refused by name;
* a Ctrl-C while a finished flow is being analysed keeps its ``.npz``, and
  ``--resume`` reuses it instead of integrating again;
* a second run into a non-empty ``--out`` is refused unless ``--resume`` or
  ``--overwrite`` is given; ``--overwrite`` leaves no stale flow files.
"""

from __future__ import annotations

import json

import pytest

import subriemann as sr
from subriemann.app.cli import main
from tests.cases import TINY
from tests.helpers import check_report, interrupt_after


def test_resume_alone_continues_with_the_stored_settings(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    argv = ["run", *TINY, "--metrics", "pullback,euclidean", "--seed", "3", "--out", str(out)]
    with monkeypatch.context() as mp:
        interrupt_after(mp, sr.metrics.EuclideanMetric, 60)
        assert main(argv) == 130
    err = capsys.readouterr().err
    hint = f"--resume --out {out}"
    assert hint in err
    # exactly the command the message suggests
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 0
    summary = check_report(out, ("pullback", "euclidean"))
    settings = summary["settings"]
    assert (settings["seed"], settings["model"], settings["data"]) == (3, "mlp:6", "teacher")
    assert summary["flows"][1]["status"]["code"] == "s_end_reached"


def test_resume_names_the_options_that_differ(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    argv = ["run", *TINY, "--metrics", "pullback,euclidean", "--out", str(out)]
    with monkeypatch.context() as mp:
        interrupt_after(mp, sr.metrics.EuclideanMetric, 40)
        assert main(argv) == 130
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(out), "--seed", "1", "--s-end", "2"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed" in err and "s_end" in err
    assert "rtol" not in err  # only what differs is named
    assert len(err.strip().splitlines()) == 1
    # options equal to the stored ones, and budgets, are accepted
    assert main(["run", "--resume", "--out", str(out), "--seed", "0", "--max-time", "30",
                 "--no-progress"]) == 0


def test_ctrl_c_while_analysing_a_finished_flow_keeps_it(tmp_path, monkeypatch, capsys):
    import subriemann.app.report
    import subriemann.flow as flow_pkg

    out = tmp_path / "r"
    argv = ["run", *TINY, "--metrics", "pullback", "--out", str(out)]
    with monkeypatch.context() as mp:
        def boom(*args, **kwargs):
            raise KeyboardInterrupt  # Ctrl-C during the post-processing of the flow

        mp.setattr(subriemann.app.report, "analyse_flow", boom)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "0 completed" not in err and "1 completed flow" in err
    final = out / "flows" / "pullback.npz"
    assert final.is_file() and sr.Trajectory.load(final).status.code == "s_end_reached"
    with monkeypatch.context() as mp:
        def no_flow(*args, **kwargs):
            raise AssertionError("--resume integrated a flow whose .npz is on disk")

        mp.setattr(flow_pkg, "gradient_flow", no_flow)
        assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 0
    assert "kept from the previous run" in capsys.readouterr().out
    check_report(out, ("pullback",))


def test_a_second_run_into_a_non_empty_out_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["run", *TINY, "--s-end", "0.2", "--out", str(out)]
    assert main([*argv, "--metrics", "pullback,euclidean"]) == 0
    report = (out / "report.html").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--metrics", "pullback"]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err and "--resume" in err
    assert (out / "report.html").read_bytes() == report  # untouched
    assert main([*argv, "--metrics", "pullback", "--overwrite"]) == 0
    assert sorted(p.name for p in (out / "flows").iterdir()) == ["pullback.npz"]  # no stale file
    summary = json.loads((out / "summary.json").read_text())
    assert [f["name"] for f in summary["flows"]] == ["pullback"]
    assert main([*argv, "--resume", "--overwrite"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["empty", "missing"])
def test_an_empty_or_new_out_is_fine(tmp_path, name):
    out = tmp_path / "r"
    if name == "empty":
        out.mkdir()
    assert main(["run", *TINY, "--metrics", "pullback", "--s-end", "0.1", "--out", str(out)]) == 0


def test_resume_after_an_overwrite_run(tmp_path, monkeypatch, capsys):
    """The stored --overwrite of a run is not carried into its --resume (they exclude
    each other): the command the interrupt message suggests works."""
    out = tmp_path / "r"
    (out / "flows").mkdir(parents=True)
    (out / "flows" / "old.npz").write_text("stale")
    argv = ["run", *TINY, "--metrics", "pullback,euclidean", "--out", str(out), "--overwrite"]
    with monkeypatch.context() as mp:
        interrupt_after(mp, sr.metrics.EuclideanMetric, 40)
        assert main(argv) == 130
    capsys.readouterr()
    assert main(["run", "--resume", "--out", str(out), "--no-progress"]) == 0
    check_report(out, ("pullback", "euclidean"))
