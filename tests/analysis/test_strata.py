"""Rank strata graphs: bookkeeping on hand-made trajectories, and real sweeps on executors.

The real flows use an odd tanh network (no hidden bias) plus an output bias on
symmetric inputs with even targets.  Its odd part cannot fit the targets, so
the adapted flow drives the output weights to 0 (``a(s) = e^{-s} a(0)``, the
hidden weights stay put): the Jacobian loses the two hidden-weight columns,
rank 5 -> 4 -> 3, and every flow ends on the non-global critical set
``{a = 0, c = mean(y)}``.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import matplotlib
import networkx as nx
import pytest
import torch

import subriemann as sr
from subriemann.analysis import SpaceRecipe, sample_strata, strata_graph
from subriemann.analysis.strata import (
    GLOBAL_MINIMUM,
    NON_GLOBAL,
    NOT_CONVERGED,
    Endpoint,
    classify_endpoint,
    default_init,
    run_flow_task,
    stratum_times,
)
from subriemann.app.plots_analysis import plot_strata_graph
from subriemann.flow.trajectory import FlowStatus, RankChange, Trajectory

matplotlib.use("Agg")
F64 = torch.float64

FLOW = dict(method="rk4", step_size=0.25)
S_END = 8.0


def _odd_space() -> sr.ParameterSpace:
    xs = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=F64)
    x = torch.cat([xs, -xs]).unsqueeze(1)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 2, bias=False), torch.nn.Tanh(), torch.nn.Linear(2, 1)
    )
    space = sr.ParameterSpace(net, x, x**2)
    return space.equip_with_metric(sr.metrics.OutputPullbackMetric, rank_rtol=1e-3)


def _starts(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g, dtype=F64)


# -- bookkeeping on hand-made trajectories -------------------------------------------
def _traj(s, ranks, outputs, targets, events=(), status="s_end_reached") -> Trajectory:
    t = len(s)
    q = len(targets)
    return Trajectory(
        s=torch.tensor(s, dtype=F64),
        theta=torch.zeros(t, 2, dtype=F64),
        outputs=torch.tensor(outputs, dtype=F64),
        cost=torch.tensor(
            [0.5 * sum((a - b) ** 2 for a, b in zip(o, targets)) for o in outputs], dtype=F64
        ),
        grad_norm=torch.ones(t, dtype=F64),
        singular_values=torch.ones(t, 2, dtype=F64),
        rank=torch.tensor(ranks),
        targets=torch.tensor(targets, dtype=F64),
        rank_rtol=1e-6,
        rank_tau=1e-6,
        events=list(events),
        status=FlowStatus(status),
        num_samples=q,
        num_outputs=1,
        loss="mse",
    )


def _event(s: float, r0: int, r1: int) -> RankChange:
    sv = torch.ones(2, dtype=F64)
    return RankChange(s, torch.zeros(2, dtype=F64), r0, r1, sv, sv, min(r0, r1), 1e-6)


def test_stratum_times_from_events():
    t = _traj(
        [0.0, 1.0, 2.0, 3.0], [5, 5, 4, 3], [[3.0, 0.0]] * 4, [1.0, 1.0],
        events=[_event(1.5, 5, 4), _event(2.5, 4, 3)],
    )
    times, changes, final = stratum_times(t)
    assert times == pytest.approx({5: 1.5, 4: 1.0, 3: 0.5})
    assert [(a, b) for a, b, _ in changes] == [(5, 4), (4, 3)]
    assert final == 3
    # without events the saved ranks are used
    t2 = _traj([0.0, 1.0, 2.0], [2, 1, 1], [[0.0, 0.0]] * 3, [1.0, 1.0])
    times, changes, final = stratum_times(t2)
    assert times == pytest.approx({2: 1.0, 1: 1.0}) and changes == [(2, 1, 1.0)] and final == 1


def test_strata_graph_by_hand():
    y = [1.0, 1.0]
    stalled = _traj(  # rank 5 -> 4 -> 3, x stops at (3, 0) != y: non-global
        [0.0, 1.0, 2.0, 3.0], [5, 5, 4, 3], [[5.0, 2.0], [3.5, 0.5], [3.0, 0.0], [3.0, 0.0]], y,
        events=[_event(1.5, 5, 4), _event(2.5, 4, 3)],
    )
    bounced = _traj(  # 5 -> 4 -> 5, then ends at x = y
        [0.0, 1.0, 2.0, 3.0], [5, 4, 5, 5], [[2.0, 2.0], [1.5, 1.5], [1.1, 1.1], [1.0, 1.0]], y,
        events=[_event(0.5, 5, 4), _event(1.5, 4, 5)],
    )
    moving = _traj([0.0, 1.0, 2.0], [3, 3, 3], [[5.0, 5.0], [4.0, 4.0], [3.0, 3.0]], y)
    g = strata_graph([stalled, bounced, moving])
    assert isinstance(g, nx.DiGraph)
    assert g.graph["n_runs"] == 3 and g.graph["classification"] == "trajectory"
    strata = {n: d for n, d in g.nodes(data=True) if d["kind"] == "stratum"}
    assert set(strata) == {"S_5", "S_4", "S_3"}
    assert strata["S_5"]["time"] == pytest.approx(1.5 + 0.5 + 1.5)
    assert strata["S_4"]["time"] == pytest.approx(1.0 + 1.0)
    assert strata["S_3"]["time"] == pytest.approx(0.5 + 2.0)
    assert strata["S_5"]["n_flows"] == 2 and strata["S_5"]["n_start"] == 2
    assert strata["S_3"]["n_end"] == 2
    assert g.edges["S_5", "S_4"]["count"] == 2 and g.edges["S_5", "S_4"]["n_flows"] == 2
    assert g.edges["S_4", "S_3"]["count"] == 1 and g.edges["S_4", "S_5"]["count"] == 1
    assert g.edges["S_4", "S_5"]["s"] == [1.5]
    assert g.edges["S_3", NON_GLOBAL]["count"] == 1
    assert g.edges["S_5", GLOBAL_MINIMUM]["count"] == 1
    assert g.edges["S_3", NOT_CONVERGED]["count"] == 1
    assert g.nodes[NON_GLOBAL]["count"] == 1 and g.nodes[NON_GLOBAL]["kind"] == "terminal"
    assert g.edges["S_3", NON_GLOBAL]["statuses"] == {"s_end_reached": 1}
    # labels given directly or by a callable
    g2 = strata_graph([stalled, moving], classify=["a", "b"])
    assert g2.nodes["a"]["count"] == 1 and g2.has_edge("S_3", "b")
    g3 = strata_graph([stalled], classify=lambda t: f"C={t.final_cost:.1f}")
    assert "C=2.5" in g3


def test_strata_graph_bad_input():
    with pytest.raises(TypeError, match="Trajectory"):
        strata_graph(["x"])
    t = _traj([0.0, 1.0], [1, 1], [[0.0], [0.0]], [1.0])
    with pytest.raises(ValueError, match="labels"):
        strata_graph([t], classify=["a", "b"])
    with pytest.raises(TypeError, match="classify"):
        strata_graph([t], classify=3)


# -- real sweeps -------------------------------------------------------------------
def _check_odd_sweep(g: nx.DiGraph, trajs: list[Trajectory], n: int) -> None:
    assert g.graph["n_failed"] == 0, g.graph["failures"]
    assert len(trajs) == n and g.graph["run_indices"] == list(range(n))
    assert g.graph["n_runs"] == n
    # every flow ends in S_3 on the non-global critical set {a = 0, c = mean(y)}
    assert g.nodes[NON_GLOBAL]["count"] == n
    assert g.edges["S_3", NON_GLOBAL]["count"] == n
    assert g.has_edge("S_4", "S_3")
    total = sum(d["time"] for _, d in g.nodes(data=True) if d["kind"] == "stratum")
    assert total == pytest.approx(n * S_END)
    for t, d in zip(trajs, g.graph["details"]):
        assert t.final_cost == pytest.approx(8.0625, abs=1e-5)  # 1/2 |y - mean(y)|^2
        assert d["rank"] == 3 and d["label"] == NON_GLOBAL


def test_sample_strata_thread_pool():
    space = _odd_space()
    with ThreadPoolExecutor(max_workers=2) as pool:
        g, trajs = sample_strata(space, _starts(3), S_END, executor=pool, **FLOW)
    _check_odd_sweep(g, trajs, 3)
    assert g.graph["classification"] == "worker (cheap)"
    # the trajectory-only classification agrees with the workers'
    g2 = strata_graph(trajs)
    assert g2.nodes[NON_GLOBAL]["count"] == 3


def test_sample_strata_default_process_pool():
    space = _odd_space()
    # a space on the structured engine does not pickle (today): the workers get a recipe
    assert isinstance(sr.analysis.strata._payload(space), (bytes, SpaceRecipe))
    g, trajs = sample_strata(space, _starts(2), S_END, **FLOW)
    _check_odd_sweep(g, trajs, 2)


def test_sample_strata_n_init_and_full_classification():
    space = _odd_space()
    with ThreadPoolExecutor(max_workers=1) as pool:
        g, trajs = sample_strata(
            space, None, S_END, n_init=2, seed=3, executor=pool, classify="full", **FLOW
        )
    assert g.graph["n_failed"] == 0 and len(trajs) == 2
    assert torch.equal(trajs[0].theta[0], default_init(space, 0, 3))
    for d in g.graph["details"]:
        assert d["dimension"] == 2 and d["index"] == 0  # w in R^2 free
        assert d["kind"] == "non-global minimum"


class _FlakyExecutor(ThreadPoolExecutor):
    """Loses the second work item (as a dying worker would)."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.calls = 0

    def submit(self, fn, /, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            fut: Future = Future()
            fut.set_exception(RuntimeError("worker lost"))
            return fut
        return super().submit(fn, *args, **kwargs)


def test_failures_do_not_stop_the_sweep():
    space = _odd_space()
    with _FlakyExecutor() as pool:
        g, trajs = sample_strata(space, _starts(3), 2.0, executor=pool, **FLOW)
    assert len(trajs) == 2 and g.graph["n_failed"] == 1
    assert g.graph["failures"][0]["index"] == 1
    assert "worker lost" in g.graph["failures"][0]["error"]
    assert g.graph["run_indices"] == [0, 2]
    # an error inside the work item comes back as a traceback, not an exception
    res = run_flow_task(pickle.dumps(1), _starts(1)[0], 1.0, {})
    assert "error" in res and "ParameterSpace" in res["error"]


def test_space_recipe_round_trip():
    space = _odd_space()
    recipe = SpaceRecipe.from_space(space)
    rebuilt = pickle.loads(pickle.dumps(recipe)).build()
    assert rebuilt.metric.description() == space.metric.description()
    theta = _starts(1)[0]
    assert torch.allclose(rebuilt.metric.gradient(theta), space.metric.gradient(theta))
    lam = sr.ParameterSpace(space.module, space.inputs, space.targets).equip_with_metric(
        sr.metrics.InterpolatedMetric, lam=0.3
    )
    assert SpaceRecipe.from_space(lam).build().metric.lam == 0.3


def test_classify_endpoint_with_and_without_space():
    space = _odd_space()
    traj = sr.gradient_flow(space, _starts(1)[0], S_END, **FLOW)
    with_space = classify_endpoint(traj, space)
    alone = classify_endpoint(traj)
    assert with_space["label"] == alone["label"] == NON_GLOBAL
    assert with_space["output_grad_norm"] == pytest.approx(alone["output_grad_norm"])
    early = sr.gradient_flow(space, _starts(1)[0], 0.5, **FLOW)
    assert classify_endpoint(early, space)["label"] == NOT_CONVERGED
    assert classify_endpoint(early)["label"] == NOT_CONVERGED


def test_plot_strata_graph(tmp_path):
    import matplotlib.pyplot as plt

    y = [1.0, 1.0]
    t = _traj(
        [0.0, 1.0, 2.0, 3.0], [5, 5, 4, 3], [[5.0, 2.0], [3.5, 0.5], [3.0, 0.0], [3.0, 0.0]], y,
        events=[_event(1.5, 5, 4), _event(2.5, 4, 3)],
    )
    ax = plot_strata_graph(strata_graph([t, t]))
    ax.figure.savefig(tmp_path / "strata.png")
    plt.close(ax.figure)
    assert (tmp_path / "strata.png").stat().st_size > 1000
    with pytest.raises(TypeError, match="DiGraph"):
        plot_strata_graph(nx.Graph())


def test_sample_strata_bad_input():
    space = _odd_space()
    with pytest.raises(ValueError, match="s_end"):
        sample_strata(space, _starts(1), -1.0)
    with pytest.raises(ValueError, match="not both"):
        sample_strata(space, _starts(1), 1.0, n_init=2)
    with pytest.raises(ValueError, match="n_init"):
        sample_strata(space, None, 1.0)
    with pytest.raises(ValueError, match="equip"):
        sample_strata(space, _starts(1), 1.0, metric=space.metric)
    with pytest.raises(TypeError, match="unknown flow option"):
        sample_strata(space, _starts(1), 1.0, bogus=1)
    with pytest.raises(ValueError, match="classify"):
        sample_strata(space, _starts(1), 1.0, classify="exact")
    with pytest.raises(TypeError, match="submit"):
        sample_strata(space, _starts(1), 1.0, executor=object())
    with pytest.raises(ValueError, match="shape"):
        sample_strata(space, torch.zeros(1, 3, dtype=F64), 1.0)
    with pytest.raises(TypeError, match="ParameterSpace"):
        sample_strata("space", _starts(1), 1.0)


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        out[int(stat.parent.name)] = int(text.rpartition(")")[2].split()[1])
    return out


def _kill_a_worker_after(delay: float, killed: list[int], stop: threading.Event) -> None:
    """Kill one pool worker (a grandchild: the pool forks its workers from a forkserver)."""
    me = os.getpid()
    while not stop.is_set():
        parents = _parents()
        children = {p for p, pp in parents.items() if pp == me}
        workers = sorted(p for p, pp in parents.items() if pp in children)
        if workers:
            time.sleep(delay)  # let the sweep get going
            try:
                os.kill(workers[0], signal.SIGKILL)
                killed.append(workers[0])
            except ProcessLookupError:
                continue
            return
        time.sleep(0.02)


def test_a_killed_worker_loses_no_run():
    """SIGKILL of one worker mid-sweep: its run and those the broken pool lost are resubmitted."""
    space = _odd_space()
    n = 4
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_a_worker_after, args=(0.3, killed, stop), daemon=True)
    killer.start()
    try:
        g, trajs = sample_strata(space, _starts(n), S_END, **FLOW)
    finally:
        stop.set()
        killer.join()
    assert killed, "no worker was killed: the test did not test anything"
    assert g.graph["resubmitted"] >= 1  # the kill came mid-sweep and lost runs
    # every run is there, and ends where the closed form says (as in the other sweeps)
    _check_odd_sweep(g, trajs, n)


# -- one way to run many flows ---------------------------------------------------------------
def test_a_batched_work_item_equals_single_flows():
    """One work item integrates its flows with gradient_flow on [B, K] (the batch runner);
    each trajectory equals the single run from its point (rk4, same steps: up to rounding)."""
    space = _odd_space()
    starts = _starts(3)
    with ThreadPoolExecutor(max_workers=1) as pool:
        g, trajs = sample_strata(space, starts, 2.0, executor=pool, max_workers=1, **FLOW)
    assert g.graph["n_failed"] == 0 and g.graph["run_indices"] == [0, 1, 2]
    for p, t in zip(starts, trajs):
        single = sr.gradient_flow(space, p, 2.0, **FLOW)
        assert torch.allclose(t.theta, single.theta, rtol=0, atol=1e-12)
    # a batch whose flow raises is run again point by point: the error stays with its run
    bad = torch.cat([starts[:1], torch.full((1, 5), float("nan"), dtype=F64)])
    res = run_flow_task(SpaceRecipe.from_space(space), bad, 1.0, {"flow": FLOW})
    assert "trajectory" in res[0] and "error" in res[1] and "error" not in res[0]


def test_endpoint_is_a_dataclass():
    space = _odd_space()
    traj = sr.gradient_flow(space, _starts(1)[0], S_END, **FLOW)
    end = classify_endpoint(traj, space)
    assert isinstance(end, Endpoint) and end.label == end["label"] == NON_GLOBAL
    assert end.rank == 3 and end.kind is None  # no Hessian in the cheap classification
    with pytest.raises(KeyError):
        end["no such field"]
