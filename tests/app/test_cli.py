"""End-to-end tests of ``subriemann run`` on tiny problems (issue 7).

Every run here uses the teacher–student data (no scikit-learn needed), a
6-unit MLP, N = 5 and s_end = 0.5, so a whole run takes about a second in
process.  The checks: the files of the report folder, summary.json against
its schema, PNGs that matplotlib can read, trajectories that load, bad input
(exit code 2, one line on stderr, no traceback) and Ctrl-C (exit code 130,
the completed flow and the checkpoint kept, then ``--resume``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import subriemann as sr
from subriemann.app.cli import main
from subriemann.app.report import SchemaError, validate_summary
from tests.cases import TINY
from tests.helpers import check_report, check_schema, interrupt_after

TINY_TOML = """
data = "data.npz"
model_file = "net.py:build"
s-end = 0.5
metrics = ["interp:0.5", "bundle"]
rtol = 1e-7
max_time = 60
progress = false
out = "report"
"""
NET_PY = """
import torch

def build(in_dim, out_dim):
    return torch.nn.Sequential(torch.nn.Linear(in_dim, 7), torch.nn.Softplus(),
                               torch.nn.Linear(7, out_dim))
"""
DROPOUT_NET = """
import torch

def build(in_dim, out_dim):
    return torch.nn.Sequential(torch.nn.Linear(in_dim, 6), torch.nn.Dropout(0.1),
                               torch.nn.Tanh(), torch.nn.Linear(6, out_dim))
"""


@pytest.fixture(scope="module")
def flags_run(tmp_path_factory) -> tuple[Path, str]:
    """One tiny run with command-line flags (shared by the tests that only read it)."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("flags") / "report"
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["run", *TINY, "--out", str(out)]) == 0
    return out, buf.getvalue()


def test_run_with_flags(flags_run):
    out, printed = flags_run
    assert "pullback" in printed and "report.html" in printed
    assert "s_end_reached" in printed  # the summary table
    summary = check_report(out)
    pull = summary["flows"][1]
    assert pull["lam"] == 1.0 and pull["status"]["code"] == "s_end_reached"
    # docs/theory.md §3: the adapted flow is a straight line in output space and decays at rate 2
    assert pull["interpolation_residual"] < 1e-6
    assert pull["decay_rate"]["rate"] == pytest.approx(2.0, rel=1e-5)
    assert pull["rank"]["min"] == pull["rank"]["full"] == 5
    assert summary["flows"][0]["interpolation_residual"] > 1e-3  # the standard flow bends
    assert summary["problem"]["num_samples"] == 5 and summary["problem"]["overparametrized"]
    # a verdict per prediction, expectations only where the theory makes them
    verdicts = {(f["name"], v["check"]): v for f in summary["flows"] for v in f["verdicts"]}
    assert {k: v["outcome"] for k, v in verdicts.items()} == {
        ("euclidean", "descent"): "held", ("euclidean", "decay_rate"): "no prediction",
        ("pullback", "descent"): "held", ("pullback", "decay_rate"): "held",
        ("pullback", "straight_line"): "held"}
    assert summary["flows"][0]["decay_rate"]["expected"] is None
    assert verdicts[("pullback", "decay_rate")]["expected"] == 2.0
    assert "decay rate of C = 2 (docs/theory.md §3): measured 2" in printed


def test_run_with_config_npz_and_model_file(tmp_path):
    """A TOML config naming an .npz dataset and a model file, relative to the config's folder."""
    cfg_dir = tmp_path / "exp"
    cfg_dir.mkdir()
    rng = np.random.default_rng(0)
    np.savez(cfg_dir / "data.npz", inputs=rng.normal(size=(4, 3)), targets=rng.normal(size=(4, 2)))
    (cfg_dir / "net.py").write_text(NET_PY)
    cfg = cfg_dir / "run.toml"
    cfg.write_text(TINY_TOML)
    # the command line wins over the config
    assert main(["run", "--config", str(cfg), "--seed", "3", "--s-end", "0.3"]) == 0
    summary = check_report(cfg_dir / "report", ("interp-0.5", "bundle-1"))
    st = summary["settings"]
    assert st["seed"] == 3 and st["s_end"] == 0.3 and st["metrics"] == ["interp:0.5", "bundle"]
    assert st["model_file"].endswith("net.py:build") and st["progress"] is False
    assert summary["problem"]["output_dim"] == 8
    assert summary["problem"]["num_parameters"] == 3 * 7 + 7 + 7 * 2 + 2
    assert [f["lam"] for f in summary["flows"]] == [0.5, 1.0]


def test_run_subprocess(tmp_path):
    """``python -m subriemann run`` in a fresh interpreter (one flow, to keep it short).

    Nobody is watching (stdout and stderr are pipes): no progress bars although
    they are not switched off, one line per flow when it finishes, and the
    library's warning (a Dropout layer) as one line without its source line.
    """
    out = tmp_path / "r"
    (tmp_path / "net.py").write_text(DROPOUT_NET)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tiny = [a for a in TINY if a != "--no-progress"]
    tiny[tiny.index("--model"):tiny.index("--model") + 2] = [
        "--model-file", f"{tmp_path / 'net.py'}:build"]
    argv = [*tiny, "--metrics", "pullback", "--s-end", "0.3", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "subriemann", "run", *argv],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    check_report(out, ("pullback",))
    assert "\r" not in proc.stderr and "\r" not in proc.stdout and "%|" not in proc.stderr
    flows = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    assert len(flows) == 1 and flows[0].startswith("[1/1] λ=1 (output pullback): s_end_reached")
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert err and all(ln.startswith("subriemann: warning: ") for ln in err), proc.stderr
    assert any("eval mode" in ln for ln in err)
    assert "warnings.warn" not in proc.stderr and "UserWarning" not in proc.stderr
    assert ".py:" not in proc.stderr  # no file:line


def test_warnings_as_one_line_only_inside_the_cli(capsys):
    from subriemann.app.cli import one_line_warnings

    before = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with one_line_warnings():
            warnings.warn("first line\n    and its continuation", UserWarning, stacklevel=1)
            warnings.warn("a runtime matter", RuntimeWarning, stacklevel=1)
        assert warnings.showwarning is before
    assert capsys.readouterr().err.splitlines() == [
        "subriemann: warning: first line and its continuation",
        "subriemann: warning: a runtime matter (RuntimeWarning)",
    ]


def test_progress_bars_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    import subriemann.app.cli as cli

    seen: list[bool] = []
    flow = cli.gradient_flow

    def spy(*args, **kwargs):
        seen.append(kwargs["progress"])
        kwargs["progress"] = False  # nothing drawn into the captured stderr
        return flow(*args, **kwargs)

    monkeypatch.setattr(cli, "gradient_flow", spy)
    monkeypatch.setattr(cli, "_finish", lambda run: run.summary(complete=True))  # no figures
    argv = ["run", *[a for a in TINY if a != "--no-progress"], "--metrics", "pullback",
            "--s-end", "0.2"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0  # captured: not a terminal
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith("[")] == [
        ln for ln in out.splitlines() if ln.startswith("[1/1] λ=1 (output pullback): ")]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert main([*argv, "--out", str(tmp_path / "c"), "--no-progress"]) == 0
    assert seen == [False, True, False]
    # on a terminal the flow is announced before its bar, and reported when it ends
    out = capsys.readouterr().out
    assert "[1/1] λ=1 (output pullback)\n" in out


def test_help_and_version(capsys):
    assert main([]) == 0
    assert "run" in capsys.readouterr().out
    assert main(["run", "--help"]) == 0
    assert "--model-file" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert sr.__version__ in capsys.readouterr().out


# -- bad input ----------------------------------------------------------------------------
def _files(tmp: Path) -> dict[str, str]:
    (tmp / "text.npz").write_text("not a zip archive")
    np.savez(tmp / "nokey.npz", inputs=np.zeros((3, 2)))
    np.savez(tmp / "mismatch.npz", inputs=np.zeros((3, 2)), targets=np.zeros((4, 1)))
    np.savez(tmp / "nan.npz", inputs=np.full((3, 2), np.nan), targets=np.zeros((3, 1)))
    (tmp / "syntax.py").write_text("def f(:\n")
    (tmp / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp / "notmodule.py").write_text("def f():\n    return 42\n")
    (tmp / "wrongq.py").write_text(
        "import torch\ndef f():\n    return torch.nn.Linear(4, 3)\n"
    )
    (tmp / "bad.toml").write_text("s_end = = 1\n")
    (tmp / "unknown.toml").write_text("s_end = 1.0\nlearning_rate = 0.1\n")
    (tmp / "badtype.toml").write_text('s_end = "long"\n')
    (tmp / "afile").write_text("x")
    np.savez(tmp / "objects.npz", inputs=np.array([[1.0], [2.0]], dtype=object),
             targets=np.zeros((2, 1)))
    np.savez(tmp / "ten.npz", inputs=np.zeros((10, 2)), targets=np.zeros((10, 1)))
    np.savez(tmp / "onelabel.npz", inputs=np.zeros((4, 2)), targets=np.zeros(4, dtype=np.int64))
    (tmp / "badvalue.toml").write_text('data = "teacher"\nrtol = "tight"\n')
    return {k.replace(".", "_"): str(tmp / k) for k in (
        "text.npz", "nokey.npz", "mismatch.npz", "nan.npz", "syntax.py", "raises.py",
        "notmodule.py", "wrongq.py", "bad.toml", "unknown.toml", "badtype.toml", "afile",
        "objects.npz", "ten.npz", "onelabel.npz", "badvalue.toml",
    )}


BAD = [
    (["frobnicate"], "invalid choice"),
    (["run", "--bogus"], "unrecognized"),
    (["run", "--model", "cnn:3"], "unknown model spec"),
    (["run", "--model", "mlp:0,4"], "width"),
    (["run", "--activation", "swish"], "unknown activation"),
    (["run", "--data", "mnist"], "unknown dataset"),
    (["run", "--data", "{tmp}/missing.npz"], "no data file"),
    (["run", "--data", "{text_npz}"], "cannot read"),
    (["run", "--data", "{nokey_npz}"], "'targets'"),
    (["run", "--data", "{mismatch_npz}"], "samples"),
    (["run", "--data", "{nan_npz}"], "NaN"),
    (["run", "--n-samples", "0"], "n_samples"),
    (["run", "--loss", "hinge"], "unknown loss"),
    (["run", "--data", "teacher", "--loss", "cross_entropy"], "cross_entropy"),
    (["run", "--data", "teacher", "--label-smoothing", "0.1"], "label-smoothing"),
    (["run", "--data", "teacher", "--label-smoothing", "1.5"], "label_smoothing"),
    (["run", "--data", "teacher", "--metrics", "fisher"], "fisher"),
    (["run", "--metrics", "riemann"], "unknown metric"),
    (["run", "--metrics", "interp:2"], "[0, 1]"),
    (["run", "--metrics", "interp:x"], "not a number"),
    (["run", "--metrics", "pullback,pullback"], "twice"),
    (["run", "--metrics", ","], "empty"),
    (["run", "--s-end", "-1"], "s_end"),
    (["run", "--s-end", "abc"], "s_end"),
    (["run", "--s-end", "inf"], "s_end"),
    (["run", "--rtol", "0"], "rtol"),
    (["run", "--rank-rtol", "2"], "rank_rtol"),
    (["run", "--max-time", "-5"], "max_time"),
    (["run", "--rank-every", "0"], "rank_every"),
    (["run", "--rank-every", "often"], "rank_every"),
    (["run", "--seed", "-3"], "seed"),
    (["run", "--seed", "1.5"], "seed"),
    (["run", "--threads", "0"], "threads"),
    (["run", "--device", "tpu"], "device"),
    (["run", "--device", "cuda:99"], "cuda"),
    (["run", "--model", "mlp:4", "--model-file", "{notmodule_py}:f"], "not both"),
    (["run", "--model-file", "{tmp}/missing.py:f"], "no model file"),
    (["run", "--model-file", "{syntax_py}:f"], "SyntaxError"),
    (["run", "--model-file", "{raises_py}:f"], "boom at import"),
    (["run", "--model-file", "{notmodule_py}:g"], "no callable"),
    (["run", "--model-file", "{notmodule_py}:f"], "torch.nn.Module"),
    (["run", "--model-file", "{notmodule_py}"], "path.py:factory"),
    (["run", "--data", "teacher", "--model-file", "{wrongq_py}:f"], "outputs"),
    (["run", "--config", "{tmp}/missing.toml"], "no config file"),
    (["run", "--config", "{bad_toml}"], "cannot parse"),
    (["run", "--config", "{unknown_toml}"], "learning_rate"),
    (["run", "--config", "{badtype_toml}"], "s_end"),
    # the errors name the file they come from
    (["run", "--config", "{badtype_toml}"], "badtype.toml: s_end"),
    (["run", "--config", "{badvalue_toml}", "--s-end", "1"], "badvalue.toml: rtol"),
    (["run", "--data", "{objects_npz}"], "objects.npz"),
    # more samples than the data has: an error, not a silent cap
    (["run", "--data", "{ten_npz}", "--n-samples", "50"], "larger than the 10 samples"),
    # integer labels with one class cannot be one-hot class targets
    (["run", "--data", "{onelabel_npz}", "--loss", "cross_entropy"], "one-hot"),
    (["run", *TINY, "--out", "{afile}/sub"], ""),
]


@pytest.mark.parametrize(("argv", "needle"), BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, needle):
    files = _files(tmp_path)
    argv = [a.format(tmp=tmp_path, **files) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("subriemann: error: ")
    assert needle in lines[0]
    assert "Traceback" not in err


def test_bad_input_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "subriemann", "run", "--model", "transformer:12"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        ln for ln in proc.stderr.splitlines() if ln.startswith("subriemann: error: unknown model")
    ]


def test_schema_validator_rejects():
    good = {"format": "subriemann.app.report/1"}
    with pytest.raises(SchemaError, match="missing key"):
        validate_summary(good)
    with pytest.raises(SchemaError, match="expected"):
        validate_summary([])


# -- Ctrl-C -------------------------------------------------------------------------------
def test_ctrl_c_keeps_completed_flow_and_checkpoint_then_resume(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    argv = ["run", *TINY, "--metrics", "pullback,euclidean", "--out", str(out)]
    with monkeypatch.context() as mp:
        # the first flow (pullback) runs through; the second (Euclidean) is interrupted
        interrupt_after(mp, sr.metrics.EuclideanMetric, 60)
        assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    check_schema(summary)
    assert summary["complete"] is False
    done, running = summary["flows"]
    assert done["name"] == "pullback" and done["completed"]
    assert (out / done["trajectory"]).is_file()
    assert running["name"] == "euclidean" and running["status"]["code"] == "interrupted"
    assert not running["completed"] and running["trajectory"] is None
    ckpt = out / running["checkpoint"]
    assert ckpt.name == "euclidean.ckpt.npz" and ckpt.is_file()
    partial = sr.Trajectory.load(ckpt)
    assert partial.status.code in ("running", "interrupted") and 0 < float(partial.s[-1]) < 0.5
    assert not (out / "report.html").exists()

    # --resume keeps the completed flow and continues the interrupted one from its checkpoint
    assert main([*argv, "--resume"]) == 0
    assert "kept from the previous run" in capsys.readouterr().out
    summary = check_report(out, ("pullback", "euclidean"))
    assert summary["flows"][1]["status"]["code"] == "s_end_reached"
    assert summary["flows"][1]["n_steps"] > partial.counters["n_steps"]


def test_ctrl_c_while_plotting(tmp_path, monkeypatch):
    import subriemann.app.plots

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(subriemann.app.plots, "all_figures", boom)
    out = tmp_path / "r"
    assert main(["run", *TINY, "--metrics", "pullback", "--s-end", "0.2", "--out", str(out)]) == 130
    summary = json.loads((out / "summary.json").read_text())
    check_schema(summary)
    assert summary["complete"] is False and [f["completed"] for f in summary["flows"]] == [True]


def test_budget_then_resume_extends(tmp_path):
    """A flow stopped by its wall-time budget is reported as such and --resume extends it."""
    out = tmp_path / "r"
    argv = ["run", *TINY, "--metrics", "pullback", "--out", str(out)]
    assert main([*argv, "--max-time", "1e-9"]) == 0  # the budget is spent at once
    summary = json.loads((out / "summary.json").read_text())
    check_schema(summary)
    (flow,) = summary["flows"]
    assert flow["status"]["code"] == "max_time_reached" and flow["s_final"] < 0.5
    assert flow["checkpoint"] == "flows/pullback.ckpt.npz" and (out / flow["checkpoint"]).is_file()
    assert all((out / p).stat().st_size > 0 for p in summary["figures"].values())
    assert main([*argv, "--max-time", "60", "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    if summary["flows"][0]["status"]["code"] == "max_time_reached":
        pytest.skip("this version of gradient_flow does not resume a budget-stopped checkpoint")
    summary = check_report(out, ("pullback",))
    assert summary["flows"][0]["status"]["code"] == "s_end_reached"


def test_resume_refuses_other_settings(flags_run, capsys):
    out, _ = flags_run
    assert main(["run", *TINY, "--seed", "1", "--resume", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_integer_labels_with_cross_entropy_are_one_hot(tmp_path):
    """Integer class indices in an .npz are one-hot encoded for --loss cross_entropy (and
    kept as one real column for --loss mse)."""
    from subriemann.app.config import DEFAULTS, resolve_options
    from subriemann.app.problem import build_problem

    labels = np.array([0, 2, 1, 2, 0, 1])
    np.savez(tmp_path / "lab.npz", inputs=np.arange(12.0).reshape(6, 2), targets=labels)
    values = {**DEFAULTS, "data": str(tmp_path / "lab.npz"), "model": "mlp:3",
              "loss": "cross_entropy"}
    prob = build_problem(resolve_options(values, set(values)))
    y = prob.space.y.reshape(6, 3)  # the space keeps y flat, [QN]
    assert torch.equal(y, torch.eye(3, dtype=y.dtype)[torch.from_numpy(labels)])
    assert prob.info["task"] == "classification" and "one-hot" in prob.info["description"]
    values["loss"] = "mse"
    prob = build_problem(resolve_options(values, set(values)))
    assert prob.space.output_dim == 6  # Q = 1


def test_cross_entropy_with_one_hot_labels(tmp_path):
    """The new user's ``--loss cross_entropy`` (one-hot labels): the report says there is no
    finite limit, checks the hyperplane sums and draws the cross-entropy figures."""
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "c.npz", inputs=rng.normal(size=(6, 2)), targets=np.arange(6) % 3)
    out = tmp_path / "r"
    argv = ["run", *TINY, "--data", str(tmp_path / "c.npz"), "--loss", "cross_entropy",
            "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    check_schema(summary)
    assert set(summary["figures"]) == {"cost", "limit_distance", "singular_values",
                                       "hyperplane_sums"}
    assert "progress along" in summary["captions"]["limit_distance"]["title"]
    ce = summary["problem"]["cross_entropy"]
    assert ce == {"minimum_cost": 0.0, "mu": 0.0, "finite_limit": False, "limit_distance": None}
    verdicts = {(f["name"], v["check"]): v for f in summary["flows"] for v in f["verdicts"]}
    assert verdicts[("pullback", "hyperplane_sums")]["outcome"] == "held"
    late = verdicts[("pullback", "late_rate")]
    assert late["outcome"] == "not checked" and "--label-smoothing" in late["note"]
    # the decay rate is the slope of what figure (a) draws: C - C* (here C* = 0)
    pull = summary["flows"][1]
    assert pull["decay_rate"]["minimum_cost"] == 0.0 and pull["decay_rate"]["expected"] is None
    # x(s) - x(0) along the divergence direction grows (docs/theory.md §6)
    assert pull["cross_entropy"]["divergence_coordinate_final"] > 0


def test_digits_split_is_the_fixed_stratified_split_standardized_on_train():
    """Against sklearn's split written out here: same rows, same labels, train z-scores."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from subriemann.app.datasets import digits_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(
        d.data, d.target, test_size=0.2, random_state=0, stratify=d.target
    )
    x, y, xt, yt = digits_split()
    assert x.shape == (1437, 64) and xt.shape == (360, 64) and x.dtype == torch.float32
    assert np.array_equal(y.numpy(), ytr) and np.array_equal(yt.numpy(), yte)
    sd = np.where(xtr.std(0) > 0, xtr.std(0), 1.0)
    # float32 rounding of O(10) z-scores: 4 ulp at 16 is < 1e-5
    np.testing.assert_allclose(x.numpy(), (xtr - xtr.mean(0)) / sd, rtol=0, atol=1e-5)
    np.testing.assert_allclose(xt.numpy(), (xte - xtr.mean(0)) / sd, rtol=0, atol=1e-5)
    x8, y8, xt4, _ = digits_split(8, 4, dtype=torch.float64)
    assert x8.dtype == torch.float64 and np.array_equal(y8.numpy(), ytr[:8])
    np.testing.assert_allclose(x8.numpy().mean(0), 0.0, atol=1e-12)
    assert xt4.shape == (4, 64)
