r"""Rank strata visited by many flows, as a graph.

docs/theory.md §5: the rank strata :math:`S_r = \{\theta : \operatorname{rank}D[\theta] = r\}`
partition parameter space.  In the overparametrized case the rank-deficient
strata have high codimension, so a flow crosses into one only rarely, and a
rank change is an *event* (recorded by :func:`~subriemann.gradient_flow` as a
:class:`~subriemann.RankChange`).  Non-global equilibria need rank loss.
This module answers "from random initializations, how often does training
hit rank loss, and where does it end?":

* :func:`strata_graph` turns trajectories into a :class:`networkx.DiGraph`:
  one node per stratum visited (with the flow time spent in it), one edge per
  observed kind of rank change (with counts), and terminal nodes for how
  the flows ended (``"global minimum"``, ``"non-global critical set"``,
  ``"not converged"``), joined to the stratum where each flow ended;
* :func:`sample_strata` runs many flows, on a local process pool by default
  or on any :mod:`concurrent.futures`-style executor (Dask, Ray, ...);
* :func:`plot_strata_graph` draws the graph.

Pickling
--------
A work item is the top-level function :func:`run_flow_task` with the
arguments ``(space, theta0, s_end, options)``.  A
:class:`~subriemann.ParameterSpace` on the generic ``"func"`` engine
pickles, with its metric; on the structured engine it does not (the engine
holds closures).  :func:`sample_strata` therefore sends either the pickled
space (as bytes) or, when that fails, a :class:`SpaceRecipe`: the model, the
data, the loss, the engine and the metric's class and arguments, from which
the worker rebuilds the space.  Either way each work item gets its **own
copy** (a flow temporarily sets the metric's rank threshold, and
:func:`torch.func.functional_call` swaps the parameters of the module it runs).

Threads
-------
torch's forward-mode automatic differentiation (:func:`torch.func.jvp`, used
for :math:`Dv` and the Jacobian) keeps its dual levels in process-global
state, so two flows running in two threads of one process corrupt each other
("Trying to access a forward AD level with an invalid index").  A thread
executor is accepted, but the flows inside one process are serialized by a
lock: threads give no speed-up, processes (the default) do.
"""

from __future__ import annotations

import copy
import inspect
import math
import pickle
import threading
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from subriemann.flow.trajectory import Trajectory
    from subriemann.space import ParameterSpace

__all__ = [
    "GLOBAL_MINIMUM",
    "NON_GLOBAL",
    "NOT_CONVERGED",
    "SpaceRecipe",
    "classify_endpoint",
    "strata_graph",
    "sample_strata",
    "run_flow_task",
    "plot_strata_graph",
    "stratum_times",
]

GLOBAL_MINIMUM = "global minimum"
NON_GLOBAL = "non-global critical set"
NOT_CONVERGED = "not converged"
TERMINALS = (GLOBAL_MINIMUM, NON_GLOBAL, NOT_CONVERGED)

_FORWARD_AD_LOCK = threading.Lock()
"""Held by :func:`run_flow_task` around each flow (see the module docstring, "Threads")."""


def stratum_node(rank: int) -> str:
    """Node name of the stratum :math:`S_r`: ``"S_r"``."""
    return f"S_{int(rank)}"


# ---------------------------------------------------------------------------
# one trajectory
# ---------------------------------------------------------------------------
def stratum_times(traj: Trajectory) -> tuple[dict[int, float], list[tuple[int, int, float]], int]:
    r"""Flow time spent in each stratum, the rank changes, and the final stratum.

    When the flow recorded rank events, the rank is piecewise constant
    between them: it starts at ``traj.rank[0]`` and becomes
    ``event.rank_after`` at ``event.s``.  Without events (``monitor_rank``
    off) the saved ranks are used, each held until the next saved point.

    Returns
    -------
    times : dict
        rank → total flow time.
    changes : list of (rank_before, rank_after, s)
    final_rank : int
    """
    s = [float(v) for v in traj.s]
    ranks = [int(v) for v in traj.rank]
    if not s:
        raise ValueError("the trajectory holds no points")
    times: dict[int, float] = {}
    changes: list[tuple[int, int, float]] = []
    if traj.events:
        cur_r, cur_s = ranks[0], s[0]
        for ev in sorted(traj.events, key=lambda e: e.s):
            es = min(max(float(ev.s), cur_s), s[-1])
            times[cur_r] = times.get(cur_r, 0.0) + (es - cur_s)
            changes.append((int(ev.rank_before), int(ev.rank_after), float(ev.s)))
            cur_r, cur_s = int(ev.rank_after), es
        times[cur_r] = times.get(cur_r, 0.0) + (s[-1] - cur_s)
        return times, changes, cur_r
    for i in range(len(s)):
        dt = s[i + 1] - s[i] if i + 1 < len(s) else 0.0
        times[ranks[i]] = times.get(ranks[i], 0.0) + dt
        if i + 1 < len(s) and ranks[i + 1] != ranks[i]:
            changes.append((ranks[i], ranks[i + 1], s[i + 1]))
    return times, changes, ranks[-1]


def classify_endpoint(
    traj: Trajectory,
    space: ParameterSpace | None = None,
    *,
    global_tol: float = 1e-4,
    critical_tol: float = 1e-3,
    stall_rtol: float = 1e-3,
) -> dict[str, Any]:
    r"""Cheap classification of where a flow ended (no Hessian).

    With ``space``, at the final point :math:`\theta_T`:

    * ``"global minimum"``: :math:`|\nabla_xC| \le` ``global_tol`` :math:`\max(1, |y|)`;
    * ``"non-global critical set"``: otherwise, when
      :math:`|D^\top\nabla_xC| \le` ``critical_tol`` :math:`\sigma_{\max}(D)\,|\nabla_xC|`;
    * ``"not converged"``: otherwise.

    Without ``space`` only the trajectory is used: :math:`\nabla_xC` is
    computed from the saved outputs and targets (the loss is known by name),
    and criticality is read from the output speed: the flow counts as
    stalled when :math:`|x_T - x_{T-1}|/(s_T - s_{T-1})` is at most
    ``stall_rtol`` times the initial output speed, or when its status is
    ``"equilibrium_reached"``.  A status ``"cost_tol_reached"`` counts as a
    global minimum.

    The tolerances are loose on purpose: flows stop at a finite time
    (for the adapted MSE flow :math:`|\nabla_xC|` decays like :math:`e^{-s}`).
    Use :func:`~subriemann.analysis.classify_equilibrium` for the Hessian,
    the dimension and the index.

    Returns
    -------
    dict
        ``label``, ``output_grad_norm``, ``relative_grad`` (NaN without
        ``space``), ``rank`` (final saved rank), ``cost``, ``status``.
    """
    from subriemann.losses import get_loss

    if len(traj) == 0:
        raise ValueError("the trajectory holds no points")
    x = traj.outputs[-1]
    y = traj.targets
    q = max(int(traj.num_outputs), 1)
    out: dict[str, Any] = {
        "rank": int(traj.rank[-1]),
        "cost": float(traj.cost[-1]),
        "status": traj.status.code,
        "relative_grad": math.nan,
    }
    if space is not None:
        theta = traj.theta[-1].to(dtype=space.dtype, device=space.device)
        st = space.point_state(theta)
        g = st.output_grad
        gn = float(g.norm())
        dc = float(space.cost_grad(theta).norm())
        smax = float(st.singular_values()[0]) if min(space.dim, space.output_dim) else 0.0
        rel = dc / (smax * gn) if smax * gn > 0 else (0.0 if dc == 0 else math.inf)
        out.update(output_grad_norm=gn, relative_grad=rel)
        if gn <= global_tol * max(1.0, float(space.y.norm())):
            out["label"] = GLOBAL_MINIMUM
        elif rel <= critical_tol:
            out["label"] = NON_GLOBAL
        else:
            out["label"] = NOT_CONVERGED
        return out
    try:
        loss = get_loss(traj.loss)
        n = x.numel() // q
        g = loss.grad(x.reshape(n, q), y.reshape(n, q)).reshape(-1)
        gn = float(g.norm())
    except Exception:  # a custom loss not known by name
        gn = math.nan
    out["output_grad_norm"] = gn
    if traj.status.code == "cost_tol_reached" or gn <= global_tol * max(1.0, float(y.norm())):
        out["label"] = GLOBAL_MINIMUM
        return out
    stalled = traj.status.code == "equilibrium_reached"
    if not stalled and len(traj) >= 3:
        ds_end = float(traj.s[-1] - traj.s[-2])
        ds0 = float(traj.s[1] - traj.s[0])
        if ds_end > 0 and ds0 > 0:
            v_end = float((traj.outputs[-1] - traj.outputs[-2]).norm()) / ds_end
            v0 = float((traj.outputs[1] - traj.outputs[0]).norm()) / ds0
            stalled = v_end <= stall_rtol * v0
    out["label"] = NON_GLOBAL if stalled else NOT_CONVERGED
    return out


# ---------------------------------------------------------------------------
# the graph
# ---------------------------------------------------------------------------
def strata_graph(
    trajectories: Sequence[Trajectory],
    classify: Any = None,
    *,
    global_tol: float = 1e-4,
    critical_tol: float = 1e-3,
    stall_rtol: float = 1e-3,
) -> nx.DiGraph:
    r"""The directed graph of rank strata visited by ``trajectories`` and where they ended.

    Parameters
    ----------
    trajectories : sequence of Trajectory
    classify : None, ParameterSpace, callable or sequence of str
        How each flow's end is classified into a terminal node:

        * ``None``: from the trajectory alone (see :func:`classify_endpoint`);
        * a :class:`~subriemann.ParameterSpace`: with the gradient and the
          rank at the final point (:func:`classify_endpoint` with ``space``);
        * a callable ``traj -> str``: any labels (e.g. built on
          :func:`~subriemann.analysis.classify_equilibrium`);
        * a sequence of labels, one per trajectory.
    global_tol, critical_tol, stall_rtol : float
        Tolerances of :func:`classify_endpoint`.

    Returns
    -------
    networkx.DiGraph
        Stratum nodes ``"S_r"`` (``kind="stratum"``) with ``rank``, ``time``
        (total flow time spent in :math:`S_r` over all flows), ``n_flows``
        (flows that visited it), ``n_start``, ``n_end``.  Terminal nodes
        named by their label (``kind="terminal"``) with ``count``.  Edges
        :math:`S_r \to S_{r'}` (``kind="rank_change"``) with ``count`` (events),
        ``n_flows`` and ``s`` (event times); edges :math:`S_r \to`
        terminal (``kind="end"``) with ``count`` and ``statuses`` (flow
        status codes → count).  ``graph.graph`` holds ``n_runs``,
        ``classification`` and the tolerances.
    """
    from subriemann.flow.trajectory import Trajectory
    from subriemann.space import ParameterSpace

    if isinstance(trajectories, Trajectory):
        trajectories = [trajectories]
    trajs = list(trajectories)
    for i, t in enumerate(trajs):
        if not isinstance(t, Trajectory):
            raise TypeError(f"trajectories[{i}] is a {type(t).__name__}, not a Trajectory")
    labels: list[str]
    if classify is None or isinstance(classify, ParameterSpace):
        space = classify
        labels = [
            classify_endpoint(
                t, space, global_tol=global_tol, critical_tol=critical_tol, stall_rtol=stall_rtol
            )["label"]
            for t in trajs
        ]
        how = "space" if space is not None else "trajectory"
    elif callable(classify):
        labels = [str(classify(t)) for t in trajs]
        how = "callable"
    elif isinstance(classify, Sequence) and not isinstance(classify, (str, bytes)):
        labels = [str(v) for v in classify]
        if len(labels) != len(trajs):
            raise ValueError(
                f"classify has {len(labels)} labels for {len(trajs)} trajectories"
            )
        how = "labels"
    else:
        raise TypeError(
            "classify must be None, a ParameterSpace, a callable traj -> str or a sequence of "
            f"labels, got {type(classify).__name__}"
        )

    g = nx.DiGraph()
    g.graph.update(
        n_runs=len(trajs),
        classification=how,
        tolerances={
            "global_tol": global_tol, "critical_tol": critical_tol, "stall_rtol": stall_rtol
        },
    )

    def stratum(r: int) -> str:
        name = stratum_node(r)
        if name not in g:
            g.add_node(name, kind="stratum", rank=int(r), time=0.0, n_flows=0, n_start=0, n_end=0)
        return name

    for t, label in zip(trajs, labels):
        times, changes, final = stratum_times(t)
        for r, dt in times.items():
            node = stratum(r)
            g.nodes[node]["time"] += dt
            g.nodes[node]["n_flows"] += 1
        g.nodes[stratum(int(t.rank[0]))]["n_start"] += 1
        seen: set[tuple[int, int]] = set()
        for r0, r1, s in changes:
            a, b = stratum(r0), stratum(r1)
            if not g.has_edge(a, b):
                g.add_edge(a, b, kind="rank_change", count=0, n_flows=0, s=[])
            e = g.edges[a, b]
            e["count"] += 1
            e["s"].append(s)
            if (r0, r1) not in seen:
                e["n_flows"] += 1
                seen.add((r0, r1))
        end = stratum(final)
        g.nodes[end]["n_end"] += 1
        if label not in g:
            g.add_node(label, kind="terminal", count=0)
        g.nodes[label]["count"] += 1
        if not g.has_edge(end, label):
            g.add_edge(end, label, kind="end", count=0, statuses={})
        e = g.edges[end, label]
        e["count"] += 1
        e["statuses"][t.status.code] = e["statuses"].get(t.status.code, 0) + 1
    return g


# ---------------------------------------------------------------------------
# running many flows
# ---------------------------------------------------------------------------
@dataclass
class SpaceRecipe:
    r"""A picklable recipe for a (metric-equipped) :class:`~subriemann.ParameterSpace`.

    Workers call :meth:`build`.  :meth:`from_space` derives one from a space;
    for a metric whose constructor arguments are not all in its
    ``description()`` (custom metrics), give ``metric`` and ``metric_kwargs``
    yourself.

    Attributes
    ----------
    model : torch.nn.Module
    inputs, targets : Tensor
    loss : str or Loss
    dtype : torch.dtype
    chunk_size : int or None
    backend : str
    metric : type or None
        A :class:`~subriemann.metrics.ParameterMetric` subclass, or None
        for the Euclidean default.
    metric_kwargs : dict
    """

    model: torch.nn.Module
    inputs: Tensor
    targets: Tensor
    loss: Any = "mse"
    dtype: torch.dtype = torch.float64
    chunk_size: int | None = None
    backend: str = "auto"
    metric: type | None = None
    metric_kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> ParameterSpace:
        """The space, equipped with the metric."""
        import warnings

        from subriemann.space import ParameterSpace

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fallback-engine notes, seen once already
            space = ParameterSpace(
                self.model, self.inputs, self.targets, self.loss, dtype=self.dtype,
                chunk_size=self.chunk_size, backend=self.backend,
            )
        if self.metric is not None:
            space.equip_with_metric(self.metric, **self.metric_kwargs)
        return space

    @classmethod
    def from_space(cls, space: ParameterSpace) -> SpaceRecipe:
        """Recipe of ``space``: its model copy, data, loss, engine, and the metric's arguments.

        The metric's arguments are those of its ``description()`` that its
        constructor accepts.  The rebuilt metric is checked to describe
        itself the same way; otherwise a :class:`ValueError` asks for an
        explicit recipe.
        """
        metric = getattr(space, "metric", None)
        mcls = type(metric) if metric is not None else None
        recipe = cls(
            model=space.module,
            inputs=space.inputs,
            targets=space.targets,
            loss=space.loss,
            dtype=space.dtype,
            chunk_size=space.chunk_size,
            backend=space.backend_kind,
            metric=mcls,
        )
        if metric is None or mcls is None:
            return recipe
        desc = metric.description()
        accepted = _init_params(mcls)
        kwargs = {k: v for k, v in desc.items() if k in accepted}
        if "solver" in kwargs:
            kwargs["solver"] = getattr(metric, "solver_name", kwargs["solver"])
        rebuilt: dict[str, Any] | None = None
        err: Exception | None = None
        for _ in range(len(kwargs) + 1):
            recipe.metric_kwargs = dict(kwargs)
            try:
                rebuilt = recipe.build().metric.description()
                break
            except TypeError as exc:  # an argument this class refuses (e.g. a fixed lam)
                err = exc
                bad = [k for k in kwargs if repr(k) in str(exc) or f" {k} " in f" {exc} "]
                if not bad:
                    break
                kwargs.pop(bad[0])
            except Exception as exc:
                err = exc
                break
        if rebuilt is None:
            raise ValueError(
                f"cannot rebuild the metric {mcls.__name__} from its description ({err}); "
                "pass a SpaceRecipe with metric and metric_kwargs"
            )
        if rebuilt != desc:
            raise ValueError(
                f"the metric rebuilt from its description differs ({rebuilt} != {desc}); "
                "pass a SpaceRecipe with metric and metric_kwargs"
            )
        return recipe


def _init_params(cls: type) -> set[str]:
    """Keyword names a class's constructor accepts, following ``**kwargs`` up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names |= {
            n for n, p in params.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in ("self", "space")
        }
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def _payload(space: Any) -> bytes | SpaceRecipe:
    """Bytes of the pickled space, or a recipe when the space does not pickle."""
    if isinstance(space, SpaceRecipe):
        return space
    try:
        return pickle.dumps(space)
    except Exception:
        recipe = SpaceRecipe.from_space(space)
        try:
            pickle.dumps(recipe)
        except Exception as err:
            raise TypeError(
                f"the space does not pickle, nor does its recipe ({err}); give sample_strata a "
                "picklable SpaceRecipe (a model defined at module level, a metric class with "
                "picklable arguments)"
            ) from err
        return recipe


def _materialize(space: Any) -> ParameterSpace:
    from subriemann.space import ParameterSpace

    if isinstance(space, (bytes, bytearray)):
        space = pickle.loads(space)
    if isinstance(space, SpaceRecipe):
        space = space.build()
    if not isinstance(space, ParameterSpace):
        raise TypeError(
            "space must be a ParameterSpace, its pickle or a SpaceRecipe, got "
            f"{type(space).__name__}"
        )
    return space


def run_flow_task(
    space: Any,
    theta0: Tensor,
    s_end: float,
    options: dict[str, Any],
) -> dict[str, Any]:
    r"""One work item of :func:`sample_strata`: a flow and the class of its end.

    A top-level function, so that executors can pickle it.

    Parameters
    ----------
    space : bytes, SpaceRecipe or ParameterSpace
        The pickled space (bytes, unpickled here: every call gets its own
        copy), a recipe (built here), or a space (used as is: only safe when
        nothing else uses it at the same time).
    theta0 : Tensor, shape=[K]
    s_end : float
    options : dict
        ``flow``: keyword arguments of :func:`~subriemann.gradient_flow`;
        ``classify``: ``"cheap"``, ``"full"`` or ``None``; ``tolerances``:
        those of :func:`classify_endpoint`; ``threads``: torch threads in a
        worker *process* (left alone in the parent process).

    Returns
    -------
    dict
        ``trajectory``, ``label``, ``details`` (the classification), or
        ``error`` (a traceback string) when anything failed.
    """
    import multiprocessing

    try:
        threads = options.get("threads")
        if threads is not None and multiprocessing.parent_process() is not None:
            torch.set_num_threads(int(threads))
        from subriemann.flow import gradient_flow
        from subriemann.flow.trajectory import Trajectory

        sp = _materialize(space)
        # torch's forward-mode AD (torch.func.jvp) keeps its dual levels in process-global
        # state: two flows in threads of one process corrupt each other. Serialize them.
        with _FORWARD_AD_LOCK:
            out = gradient_flow(sp, theta0.to(dtype=sp.dtype, device=sp.device), s_end,
                                **options.get("flow", {}))
            if not isinstance(out, Trajectory):  # a single start point gives one trajectory
                raise TypeError("gradient_flow returned a list for a single start point")
            traj = out
            mode = options.get("classify", "cheap")
            tols = options.get("tolerances", {})
            details: dict[str, Any] = {}
            label = None
            if mode == "cheap":
                details = classify_endpoint(traj, sp, **tols)
                label = details["label"]
            elif mode == "full":
                from subriemann.analysis.critical import (
                    classify_equilibrium,
                    refine_critical_point,
                )

                cheap = classify_endpoint(traj, sp, **tols)
                details = dict(cheap)
                theta = traj.theta[-1].to(sp.dtype)
                # a flow stops near, not on, the critical set: refine first (the Hessian
                # kernel is the tangent space only on the set)
                try:
                    move = 0.1 * max(1.0, float(theta.norm()))
                    refined, _ = refine_critical_point(sp, theta, max_move=move)
                    details["refined_distance"] = float((refined - theta).norm())
                    theta = refined
                except RuntimeError as err:
                    details["refine_error"] = str(err)
                rep = classify_equilibrium(sp, theta)
                details.update(
                    kind=rep.kind, dimension=rep.dimension, index=rep.index,
                    dimension_gap=rep.dimension_gap, rank_deficit=rep.rank_deficit,
                )
                label = cheap["label"]
        return {"trajectory": traj, "label": label, "details": details}
    except Exception:
        return {"error": traceback.format_exc()}


def _default_executor(max_workers: int) -> Any:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        # imported once in the server and inherited by every worker: subriemann, and
        # torch._dynamo, which torch.func.grad imports on its first call (seconds)
        ctx.set_forkserver_preload(["subriemann", "torch._dynamo"])
    return ProcessPoolExecutor(max_workers=max_workers, mp_context=ctx)


MAX_ATTEMPTS = 3
"""Times :func:`sample_strata` submits a run whose worker was lost before it gives up."""


def _lost(err: BaseException) -> bool:
    """The executor lost the run (a killed worker, a broken pool), not the run's own error."""
    from concurrent.futures import BrokenExecutor, CancelledError

    return isinstance(err, (BrokenExecutor, CancelledError)) or type(err).__name__ == "KilledWorker"


def _run_all(ex: Any, args: tuple[Any, float, dict[str, Any]], points: list[Tensor],
             own_workers: int | None) -> tuple[list[dict[str, Any]], int]:
    """Every run's result; runs lost with a worker are submitted again (``MAX_ATTEMPTS``).

    ``own_workers``: the executor is ours, with that many workers; a broken one is shut
    down and replaced by a fresh pool (a user's executor is used as it is, and shut down
    by nobody here).  Returns the results and the number of resubmissions.
    """
    payload, s_end, options = args
    results: list[dict[str, Any]] = [{} for _ in points]
    attempts = [0] * len(points)
    todo = list(range(len(points)))
    resubmitted = 0
    try:
        while todo:
            futures: dict[int, Any] = {}
            for i in todo:
                attempts[i] += 1
                try:
                    futures[i] = ex.submit(run_flow_task, payload, points[i], s_end, options)
                except Exception as err:  # e.g. a broken pool  # noqa: BLE001
                    futures[i] = err
            lost: list[int] = []
            for i, fut in futures.items():
                try:
                    if isinstance(fut, Exception):
                        raise fut
                    results[i] = fut.result()
                except Exception as err:  # noqa: BLE001  (recorded as the run's failure)
                    if _lost(err) and attempts[i] < MAX_ATTEMPTS:
                        lost.append(i)
                        continue
                    where = "submit failed: " if isinstance(fut, Exception) else ""
                    results[i] = {"error": f"{where}{type(err).__name__}: {err} (attempt "
                                           f"{attempts[i]} of {MAX_ATTEMPTS})"}
            todo = lost
            resubmitted += len(lost)
            if todo and own_workers is not None:
                ex.shutdown(wait=True, cancel_futures=True)
                ex = _default_executor(own_workers)
    finally:
        if own_workers is not None:
            ex.shutdown(wait=True)
    return results, resubmitted


def default_init(space: ParameterSpace, index: int, seed: int = 0) -> Tensor:
    r"""The model's own initialization, reproducibly: run ``index`` uses seed ``seed + index``.

    Every submodule's ``reset_parameters()`` is called on a copy of the
    model under :func:`torch.manual_seed` (the global RNG state is
    restored afterwards).  A model without any ``reset_parameters`` gets
    :math:`\theta_0 + \tfrac12 \mathcal N(0, 1)` around its current parameters.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) + int(index))
        module = copy.deepcopy(space.module)
        reset = False
        for m in module.modules():
            fn = getattr(m, "reset_parameters", None)
            if callable(fn):
                fn()
                reset = True
        if not reset:
            base = space.initial_point()
            return base + 0.5 * torch.randn(base.shape, dtype=base.dtype).to(base.device)
        named = dict(module.named_parameters())
        return space.layout.flatten({n: named[n].detach() for n in space.layout.names}).to(
            dtype=space.dtype, device=space.device
        )


_FLOW_PARAMS: set[str] | None = None


def _check_flow_options(opts: dict[str, Any]) -> None:
    global _FLOW_PARAMS
    if _FLOW_PARAMS is None:
        from subriemann.flow import FlowOptions, gradient_flow

        _FLOW_PARAMS = (set(inspect.signature(gradient_flow).parameters) | FlowOptions.names()) - {
            "space", "initial_point", "s_end", "options",
        }
    if "metric" in opts:
        raise ValueError(
            "sample_strata takes the metric from the space: equip it "
            "(space.equip_with_metric(...)) instead of passing metric="
        )
    for k in ("checkpoint", "resume", "progress"):
        if opts.get(k):
            raise ValueError(f"flow option {k!r} is not supported by sample_strata")
    unknown = sorted(set(opts) - _FLOW_PARAMS)
    if unknown:
        raise TypeError(
            f"unknown flow option(s) {unknown}; gradient_flow takes {sorted(_FLOW_PARAMS)}"
        )


def sample_strata(
    space: ParameterSpace | SpaceRecipe,
    initial_points: Tensor | Sequence[Tensor] | None,
    s_end: float,
    *,
    n_init: int | None = None,
    init: Callable[[int], Tensor] | None = None,
    seed: int = 0,
    executor: Any = None,
    max_workers: int = 2,
    classify: str | None = "cheap",
    threads_per_worker: int | None = 1,
    global_tol: float = 1e-4,
    critical_tol: float = 1e-3,
    **flow_options: Any,
) -> tuple[nx.DiGraph, list[Trajectory]]:
    r"""Run flows from many initializations and map the strata they visit.

    Parameters
    ----------
    space : ParameterSpace or SpaceRecipe
        Equipped with the metric of the flow (e.g.
        ``space.equip_with_metric(sr.metrics.OutputPullbackMetric)``).
    initial_points : Tensor [B, K], sequence of Tensor [K], or None
        Start points; or None with ``n_init``.
    s_end : float
        Final flow time of every run.
    n_init : int, optional
        Number of runs when ``initial_points`` is None.
    init : callable, optional
        ``init(i) -> theta0`` for run ``i`` (default :func:`default_init`
        with ``seed``: the model's own initialization).  Called here, in
        the calling process.
    seed : int
    executor : concurrent.futures.Executor-like, optional
        Anything with ``submit(fn, *args)`` returning an object with
        ``result()``: a :class:`~concurrent.futures.ThreadPoolExecutor`, a
        Dask ``distributed.Client`` (or its ``get_executor()``), Ray's
        executor, ...  It is used, not shut down.  Default: a local
        :class:`~concurrent.futures.ProcessPoolExecutor` with
        ``max_workers`` workers (started with "forkserver", else "spawn": a
        script using it needs an ``if __name__ == "__main__":`` guard),
        shut down at the end.
    max_workers : int
        Workers of the default pool.
    classify : {"cheap", "full"} or None
        How the workers classify each flow's end: ``"cheap"``
        (:func:`classify_endpoint` with the space: gradient and rank),
        ``"full"`` (also :func:`~subriemann.analysis.refine_critical_point`,
        moving at most 10% of :math:`\max(1, |\theta|)`, then
        :func:`~subriemann.analysis.classify_equilibrium` at the refined
        point: Hessian dimension and index, in ``details``), or None (from
        the trajectory alone, in :func:`strata_graph`).
    threads_per_worker : int or None
        torch threads in each worker process (None: leave torch's default).
    global_tol, critical_tol : float
        Tolerances of :func:`classify_endpoint`.
    **flow_options
        Keyword arguments of :func:`~subriemann.gradient_flow` (``method``,
        ``rtol``, ``stall_tol``, ``max_steps``, ``max_time``, ...).

    Returns
    -------
    graph : networkx.DiGraph
        See :func:`strata_graph`; ``graph.graph`` also has ``failures``
        (a list of ``{"index", "error"}``: runs that raised, with the
        traceback; they do not stop the sweep), ``n_failed``,
        ``resubmitted`` (how many runs were submitted again because the
        executor lost them: a killed worker or a broken pool, whose runs
        are all resubmitted, on a fresh pool when the pool is the default
        one, up to :data:`MAX_ATTEMPTS` times each),
        ``run_indices`` (the run index of each returned trajectory) and
        ``details`` (the classification of each).
    trajectories : list of Trajectory
        Of the runs that did not fail, in run order.

    Examples
    --------
    >>> import torch, subriemann as sr
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(1, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    >>> space = sr.ParameterSpace(net, torch.randn(4, 1), torch.randn(4, 1))
    >>> space = space.equip_with_metric(sr.metrics.OutputPullbackMetric)
    >>> with ThreadPoolExecutor(2) as pool:
    ...     g, trajs = sr.analysis.sample_strata(space, None, 2.0, n_init=2, executor=pool)
    >>> len(trajs), g.graph["n_failed"]
    (2, 0)
    """
    from subriemann.space import ParameterSpace

    if not isinstance(space, (ParameterSpace, SpaceRecipe)):
        raise TypeError(
            f"space must be a ParameterSpace or a SpaceRecipe, got {type(space).__name__}"
        )
    if isinstance(s_end, bool) or not isinstance(s_end, (int, float)) or not (
        math.isfinite(s_end) and s_end > 0
    ):
        raise ValueError(f"s_end must be a positive finite number, got {s_end!r}")
    if classify not in ("cheap", "full", None):
        raise ValueError(f"classify must be 'cheap', 'full' or None, got {classify!r}")
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be a positive integer, got {max_workers!r}")
    _check_flow_options(flow_options)
    local = space.build() if isinstance(space, SpaceRecipe) else space

    points: list[Tensor]
    if initial_points is not None:
        if n_init is not None:
            raise ValueError("give initial_points or n_init, not both")
        if isinstance(initial_points, Tensor):
            if initial_points.ndim == 1:
                initial_points = initial_points.unsqueeze(0)
            if initial_points.ndim != 2:
                raise ValueError(
                    f"initial_points must have shape (B, {local.dim}), got "
                    f"{tuple(initial_points.shape)}"
                )
            points = list(initial_points)
        elif isinstance(initial_points, Sequence):
            points = list(initial_points)
        else:
            raise TypeError(
                "initial_points must be a Tensor [B, K] or a sequence of Tensors, got "
                f"{type(initial_points).__name__}"
            )
    else:
        if n_init is None:
            raise ValueError("give initial_points, or n_init (and optionally init)")
        if isinstance(n_init, bool) or not isinstance(n_init, int) or n_init < 1:
            raise ValueError(f"n_init must be a positive integer, got {n_init!r}")
        if init is not None and not callable(init):
            raise TypeError(f"init must be callable (i -> theta0), got {type(init).__name__}")
        points = [
            init(i) if init is not None else default_init(local, i, seed) for i in range(n_init)
        ]
    if not points:
        raise ValueError("no initial points")
    points = [local.check_point(p).detach().clone().cpu() for p in points]

    payload = _payload(space)
    options = {
        "flow": dict(flow_options),
        "classify": classify,
        "tolerances": {"global_tol": global_tol, "critical_tol": critical_tol},
        "threads": threads_per_worker,
    }
    own = executor is None
    ex = _default_executor(max_workers) if own else executor
    if not callable(getattr(ex, "submit", None)):
        raise TypeError(f"executor must have a submit method, got {type(ex).__name__}")
    args = (payload, float(s_end), options)
    results, resubmitted = _run_all(ex, args, points, max_workers if own else None)

    trajs: list[Trajectory] = []
    labels: list[str] = []
    details: list[dict[str, Any]] = []
    indices: list[int] = []
    failures: list[dict[str, Any]] = []
    for i, res in enumerate(results):
        if "error" in res:
            failures.append({"index": i, "error": res["error"]})
            continue
        trajs.append(res["trajectory"])
        indices.append(i)
        details.append(res.get("details", {}))
        if res.get("label") is not None:
            labels.append(res["label"])
    tols = {"global_tol": global_tol, "critical_tol": critical_tol}
    if classify is None:
        graph = strata_graph(trajs, None, **tols)
        details = [classify_endpoint(t, None, **tols) for t in trajs]
    else:
        graph = strata_graph(trajs, labels, **tols)
        graph.graph["classification"] = f"worker ({classify})"
    graph.graph.update(
        n_runs=len(points),
        n_failed=len(failures),
        failures=failures,
        run_indices=indices,
        details=details,
        s_end=float(s_end),
        flow_options=dict(flow_options),
        resubmitted=resubmitted,
    )
    return graph, trajs
