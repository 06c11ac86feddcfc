"""Tests of ``subriemann sweep`` on a real Dask cluster (LocalCluster, 2 worker processes).

The cluster tests share one session-scoped cluster (one per pytest-xdist worker
that runs any of them).  They check: a grid runs end
to end while a worker is killed (every cell completes); the table agrees with
the same cells run serially in this process; an interrupted sweep resumes
without recomputing finished cells (their files keep their modification time
and the run counter says how many ran); bad cells are recorded as failed and
the sweep goes on; bad input gets one-line errors.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

pytest.importorskip("distributed", reason="the sweep extra (dask[distributed]) is not installed")
pytest.importorskip("pyarrow", reason="the sweep extra (pyarrow) is not installed")

from subriemann.app.cli import UsageError, main  # noqa: E402
from subriemann.app.sweep import parse_sweep_config, run_cell, run_sweep  # noqa: E402
from subriemann.app.sweep.cells import column_types  # noqa: E402
from subriemann.app.sweep.config import load_sweep_config  # noqa: E402
from subriemann.app.sweep.store import SweepStore  # noqa: E402
from subriemann.app.sweep.table import read_table  # noqa: E402
from tests.helpers import REPO_ROOT as REPO

# 16 small tanh nets on 6 teacher samples (QN = 6, K = 13 ... 121), ~15 steps each.
GRID16 = {
    "grid": {"data": "teacher", "n_samples": 6, "width": [2, 4, 8, 16],
             "metric": ["interp:0.5", "pullback"], "seed": [0, 1]},
    "flow": {"s_end": 1.0, "rtol": 1e-6, "max_time": 60.0, "checkpoint_every": 3,
             "min_saves": 10},
}


def _grid(seed=(0, 1), **flow):
    return {"grid": {**GRID16["grid"], "seed": list(seed)}, "flow": {**GRID16["flow"], **flow}}


@pytest.fixture(scope="session")  # session: kept when xdist interleaves other modules
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, env={"OMP_NUM_THREADS": "1"})
    cl = Client(cluster, set_as_default=False)
    cl.run(lambda: __import__("subriemann.app.sweep.cells"))  # import torch once per worker
    yield cl
    cl.close()
    cluster.close()


def _done(out: Path) -> list[Path]:
    return sorted((out / "cells").glob("cell-*.json")) if (out / "cells").is_dir() else []


def _when(out: Path, n: int, action, timeout: float = 120.0) -> threading.Thread:
    """Run ``action()`` in a thread once ``n`` cells of ``out`` are stored."""

    def watch():
        t0 = time.monotonic()
        while len(_done(out)) < n and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        action()

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    return th


# -- a grid end to end, a worker killed, the serial reference ----------------------------
def test_sweep_survives_a_killed_worker_and_matches_serial(client, tmp_path):
    cfg = parse_sweep_config(_grid())
    out = tmp_path / "sweep"
    killed: dict[str, object] = {}

    def kill_busy_worker():
        pids = client.run(os.getpid)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            busy = {w: list(keys) for w, keys in client.processing().items() if keys}
            if busy:
                addr = sorted(busy)[0]
                killed["worker"], killed["keys"] = addr, busy[addr]
                os.kill(pids[addr], signal.SIGKILL)
                return
            time.sleep(0.01)

    th = _when(out, 3, kill_busy_worker)
    summary = run_sweep(cfg, out, client=client, progress=False, quiet=True)
    th.join()
    assert killed, "no worker was busy when the test tried to kill one"
    assert summary.n_cells == summary.n_run == 16 and summary.n_failed == 0, summary.failed
    rows = read_table(out / "results.parquet")
    assert [r["cell"] for r in rows] == [f"cell-{i:04d}" for i in range(16)]
    assert all(not r["status"].startswith("failed") for r in rows)
    # the cells that were running on the killed worker ran again on another one
    lost = {str(k).rsplit("-", 1)[0] for k in killed["keys"]}  # type: ignore[attr-defined]
    assert lost and all(r["worker"] != killed["worker"] for r in rows if r["cell"] in lost)

    # The same cells serially, in this process: same seeds, one thread, the same code
    # path => the same floating-point operations.  Discrete results must agree exactly;
    # floats to 1e-9 relative (only a different SIMD dispatch could change round-off,
    # and a bit-exact resume from a checkpoint does not).
    skip = {"cell_wall_time", "flow_wall_time", "worker", "resumed"}
    types = column_types()
    for cell, row in zip(cfg.cells(), rows):
        ref = asdict(run_cell(cell).result)
        for key, t in types.items():
            if key in skip:
                continue
            a, b = row[key], ref[key]
            if t is float and a is not None and b is not None:
                assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300), (cell.label, key, a, b)
            else:
                assert a == b, (cell.label, key, a, b)

    # Independent check (docs/theory.md §3): the adapted flow (λ = 1) at full rank
    # has C(s) = exp(-2s) C(0); the integrator's rtol = 1e-6 bounds the error of the
    # fitted slope far below 1e-3.
    for r in rows:
        if r["metric"] == "pullback" and not r["lost_rank"]:
            assert abs(r["decay_rate"] - 2.0) < 1e-3, r
            assert math.isclose(r["cost_ratio"], math.exp(-2 * r["s_final"]), rel_tol=1e-3)
        # codimension of the rank-r stratum of QN x K matrices (K - QN + 1 at r = QN - 1)
        assert r["codim_reached"] == (r["output_dim"] - r["min_rank"]) * (
            r["num_parameters"] - r["min_rank"])

    # the table's types, the CSV, the graph and the report
    import networkx as nx
    import pyarrow.parquet as pq

    schema = pq.read_schema(out / "results.parquet")
    arrow = {int: "int64", float: "double", bool: "bool", str: "string"}
    assert {f.name: str(f.type) for f in schema} == {k: arrow[t] for k, t in types.items()}
    assert len((out / "results.csv").read_text().strip().splitlines()) == 17
    g = nx.read_graphml(out / "strata.graphml")
    assert sum(d.get("count", 0) for _, d in g.nodes(data=True)
               if d.get("kind") == "terminal") == 16
    page = (out / "sweep_report.html").read_text()
    assert page.count("data:image/png;base64,") == 4


# -- interrupt and resume ---------------------------------------------------------------
def test_interrupted_sweep_resumes_without_recomputing(client, tmp_path, monkeypatch):
    cfg = parse_sweep_config(_grid(seed=[0]))  # 8 cells
    out = tmp_path / "sweep"
    # Ctrl-C right after the 3rd cell is stored, raised where the signal lands: in the main
    # thread's loop over the finished cells (a watcher thread that polls for 3 stored cells
    # can be starved on a loaded machine until the sweep has finished)
    real, stored = SweepStore.write, []

    def write(self, outcome):
        real(self, outcome)
        stored.append(outcome)
        if len(stored) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(SweepStore, "write", write)
    first = run_sweep(cfg, out, client=client, progress=False, quiet=True)
    monkeypatch.undo()
    assert first.interrupted
    done = {p.name: p.stat().st_mtime_ns for p in _done(out)}
    assert len(done) == 3
    while any(client.processing().values()):  # the cancelled cells still drain
        time.sleep(0.05)

    with pytest.raises(UsageError, match="--resume"):  # no silent overwrite
        run_sweep(cfg, out, client=client, progress=False, quiet=True)
    second = run_sweep(cfg, out, resume=True, client=client, progress=False, quiet=True)
    assert not second.interrupted and second.n_failed == 0
    assert second.n_skipped == len(done) and second.n_run == 8 - len(done)
    assert {p.name: p.stat().st_mtime_ns for p in _done(out) if p.name in done} == done
    assert len(read_table(out / "results.parquet")) == 8
    third = run_sweep(cfg, out, resume=True, client=client, progress=False, quiet=True)
    assert third.n_run == 0 and third.n_skipped == 8


# -- bad cells, through the command line on the same cluster ----------------------------
def test_failing_cells_are_recorded_and_the_sweep_goes_on(client, tmp_path, capsys):
    (tmp_path / "good.py").write_text(
        "import torch\n"
        "def build(m, q):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(m, 4), torch.nn.Tanh(),"
        " torch.nn.Linear(4, q))\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('no such layer')\n")
    (tmp_path / "nan.py").write_text(
        "import torch\n"
        "class Nan(torch.nn.Module):\n"
        "    def __init__(self, m, q):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(m, q)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x) * float('nan')\n"
        "def build(m, q):\n"
        "    return Nan(m, q)\n")
    (tmp_path / "s.toml").write_text(
        '[grid]\ndata = "teacher"\nn_samples = 4\n'
        'model_file = ["good.py:build", "broken.py:build", "nan.py:build"]\n'
        "[flow]\ns_end = 0.5\nrtol = 1e-5\n")
    out = tmp_path / "out"
    addr = client.scheduler.address
    assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(out), "--scheduler", addr,
                 "--no-progress"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith("subriemann sweep: cell-0001 (teacher, ") and "broken.py" in err[0]
    assert "RuntimeError: no such layer" in err[0]
    assert err[1].startswith("subriemann sweep: cell-0002 ") and "nan.py" in err[1]
    rows = read_table(out / "results.parquet")
    assert rows[0]["status"] == "s_end_reached"
    assert rows[1]["status"].startswith("failed: ValueError: cannot import")
    assert rows[2]["status"].startswith("failed: ")
    assert rows[1]["final_cost"] is None


# -- bad input ----------------------------------------------------------------------------
def _cli_error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(("text", "match"), [
    ('[grid]\nwidth = [2]\nsede = [0]\n', "unknown key grid.sede"),
    ('[grid]\nwidth = [2]\n[flows]\ns_end = 1\n', r"unknown table \[flows\]"),
    ('[grid]\nwidth = []\n', "empty grid: grid.width is an empty list"),
    ('[flow]\ns_end = 1.0\n', "empty grid"),
    ('[grid]\nwidth = [2]\nmetric = ["interp:2"]\n', "bad λ"),
    ('[grid]\nwidth = [2]\n[flow]\nrtol = -1\n', "flow.rtol"),
    ('[grid]\nwidth = [2]\nmodel = ["mlp:2"]\n', "one of model, width"),
    ('[grid\n', "cannot parse"),
])
def test_bad_config_one_line(tmp_path, capsys, text, match):
    import re

    (tmp_path / "c.toml").write_text(text)
    line = _cli_error(capsys, ["sweep", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o")])
    assert re.search(match, line), line
    assert not (tmp_path / "o").exists()


def test_unreachable_scheduler_one_line(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('[grid]\nwidth = [2]\n[run]\nconnect_timeout = 1.0\n')
    t0 = time.monotonic()
    line = _cli_error(capsys, ["sweep", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o"),
                               "--scheduler", "tcp://127.0.0.1:9"])
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9 within 1 s" in line
    assert time.monotonic() - t0 < 30


def test_changed_config_is_refused_naming_the_difference(tmp_path):
    from subriemann.app.sweep.cells import failed_outcome

    a = parse_sweep_config(_grid())
    SweepStore(tmp_path, a).open(resume=False)
    b = parse_sweep_config(_grid(seed=[0, 1, 2], s_end=3.0))
    with pytest.raises(UsageError) as info:
        SweepStore(tmp_path, b).open(resume=True)
    msg = str(info.value)
    assert "flow.s_end: 1.0 -> 3.0" in msg and "grid.seed: [0, 1] -> [0, 1, 2]" in msg
    SweepStore(tmp_path, b).open(resume=False)  # no finished cell yet: taken over
    SweepStore(tmp_path, a).open(resume=False)
    store = SweepStore(tmp_path, a)
    store.write(failed_outcome(a.cells()[0], RuntimeError("x")))
    with pytest.raises(UsageError, match=r"already holds a sweep \(1 finished cells\)"):
        SweepStore(tmp_path, a).open(resume=False)
    SweepStore(tmp_path, a).open(resume=True)  # the same config resumes
    run_only = parse_sweep_config({**_grid(), "run": {"workers": 7}})  # [run] is not identity
    SweepStore(tmp_path, run_only).open(resume=True)


def test_missing_extra_names_it(monkeypatch):
    import sys

    from subriemann.app.sweep.runner import require_distributed
    from subriemann.app.sweep.table import require_pyarrow

    monkeypatch.setitem(sys.modules, "distributed", None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UsageError, match=r"pip install 'subriemann\[sweep\]'"):
        require_distributed()
    with pytest.raises(UsageError, match=r"pyarrow: pip install 'subriemann\[sweep\]'"):
        require_pyarrow()


def test_example_config_parses():
    cfg = load_sweep_config(REPO / "examples" / "sweep.toml")
    cells = cfg.cells()
    assert 8 <= len(cells) <= 16
    assert len({c.cell_id for c in cells}) == len(cells)
    assert {c.model for c in cells} >= {"mlp:1", "mlp:8"}


def test_example_grid_runs_and_answers_the_rank_loss_question(tmp_path, client, capsys):
    """``examples/sweep.toml`` itself, on the cluster: the answer docs/sweep.md states.

    Every flow reaches s_end (the continuation carries the two that lose rank); rank
    is lost only by lambda = 1 flows on the narrowest nets (K/QN < 2, where the first
    rank-deficient stratum has codimension K - QN + 1 <= 4), never with K/QN >= 8 or
    lambda = 0.5; the full-rank lambda = 1 flows on the wide nets decay at the closed-form
    rate 2 (C(s) = e^{-2s} C(0)), to 1e-3 (the fit over s in [0, 6] at rtol 1e-7).
    """
    out = tmp_path / "example"
    assert main(["sweep", str(REPO / "examples" / "sweep.toml"), "--out", str(out),
                 "--scheduler", client.scheduler.address, "--no-progress"]) == 0
    rows = read_table(out / "results.parquet")
    assert len(rows) == 16
    assert {r["status"] for r in rows} == {"s_end_reached"}
    lost = [r for r in rows if r["lost_rank"]]
    assert lost, "the narrow lambda = 1 flows of this grid lose rank"
    assert all(r["lam"] == 1.0 and r["k_over_qn"] < 2 for r in lost)
    wide = [r for r in rows if r["k_over_qn"] >= 8]
    assert not any(r["lost_rank"] for r in wide)
    assert not any(r["lost_rank"] for r in rows if r["lam"] == 0.5)
    for r in wide:
        if r["lam"] == 1.0:
            assert abs(r["decay_rate"] - 2.0) < 1e-3
    assert (out / "sweep_report.html").is_file() and (out / "strata.graphml").is_file()


def test_cell_continues_from_its_checkpoint(tmp_path):
    """A killed attempt leaves a checkpoint; the retry continues from it, bit for bit."""
    import torch

    from subriemann.app.config import parse_metrics
    from subriemann.app.problem import build_problem
    from subriemann.app.sweep.cells import _options
    from subriemann.flow import gradient_flow

    cell = parse_sweep_config(_grid(seed=[1])).cells()[3]  # mlp:4, pullback
    fresh = run_cell(cell).result
    problem = build_problem(_options(cell))
    ms = parse_metrics([cell.metric])[0]
    problem.space.equip_with_metric(ms.factory, rank_rtol=cell.flow["rank_rtol"], **ms.kwargs)
    ckpt = tmp_path / f"{cell.cell_id}.ckpt.npz"
    f = cell.flow
    part = gradient_flow(problem.space, problem.theta0, f["s_end"], rtol=f["rtol"],
                         atol=f["atol"], min_saves=f["min_saves"], max_steps=5, checkpoint=ckpt,
                         checkpoint_every=3)
    assert part.status.code == "max_steps_reached" and ckpt.is_file()
    torch.manual_seed(123)  # the cell must not depend on the global RNG state
    out = run_cell(cell, tmp_path)
    assert out.result.resumed and not ckpt.exists()
    again = asdict(out.result)
    for key, val in asdict(fresh).items():
        if key not in ("cell_wall_time", "flow_wall_time", "resumed"):
            assert again[key] == val, key


def test_benchmark_quick_smoke(tmp_path):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_sweep", REPO / "benchmarks" / "sweep.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "sweep_results.json").read_text())
    assert [r["route"] for r in res["routes"]] == ["serial", "dask-1", "dask-2"]
    assert all(r["cells"] == 4 and not r.get("failed") for r in res["routes"])
    assert res["speedup_2_over_1"] > 0 and res["estimate"]["waves"] == 157
    assert (tmp_path / "SWEEP_RESULTS.md").is_file()
