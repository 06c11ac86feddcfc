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
* :func:`classify_endpoint` says where one flow ended, as an :class:`Endpoint`;
* :func:`sample_strata` runs many flows, on a local process pool by default
  or on any :mod:`concurrent.futures`-style executor (Dask, Ray, ...).  It has
  no integrator loop of its own: each work item is one call of
  :func:`~subriemann.gradient_flow` on a batch of initial points ``[B, K]``.

The graph is drawn by :func:`subriemann.app.plots_analysis.plot_strata_graph`.

Pickling
--------
A work item is the top-level function :func:`run_flow_task` with the
arguments ``(space, theta0, s_end, options)``, ``theta0`` a batch ``[B, K]``.  A
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
import multiprocessing
import pickle
import threading
import traceback
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, CancelledError, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import Tensor

from subriemann.analysis.critical import classify_equilibrium, refine_critical_point
from subriemann.analysis.moved import moved_getattr
from subriemann.flow import FlowOptions, gradient_flow
from subriemann.flow.trajectory import Trajectory
from subriemann.losses import get_loss
from subriemann.space import ParameterSpace
from subriemann.validation import check_choice, check_int, check_optional, check_real

__all__ = [
    "GLOBAL_MINIMUM",
    "NON_GLOBAL",
    "NOT_CONVERGED",
    "TERMINALS",
    "Endpoint",
    "SpaceRecipe",
    "classify_endpoint",
    "strata_graph",
    "sample_strata",
    "run_flow_task",
    "default_init",
    "work_items",
    "stratum_times",
    "stratum_node",
]

GLOBAL_MINIMUM = "global minimum"
NON_GLOBAL = "non-global critical set"
NOT_CONVERGED = "not converged"
TERMINALS = (GLOBAL_MINIMUM, NON_GLOBAL, NOT_CONVERGED)
"""The labels of :func:`classify_endpoint`, in the order plots list them."""

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


@dataclass
class Endpoint:
    r"""Where a flow ended: the class of :func:`classify_endpoint`, and the Hessian's verdict.

    Attributes
    ----------
    label : str
        :data:`GLOBAL_MINIMUM`, :data:`NON_GLOBAL` or :data:`NOT_CONVERGED`.
    output_grad_norm : float
        :math:`|\nabla_xC|` at the final point (NaN for a custom loss not known
        by name, classified without a space).
    relative_grad : float
        :math:`|D^\top\nabla_xC|/(\sigma_{\max}(D)\,|\nabla_xC|)` (NaN without a space).
    rank : int
        The final saved rank.
    cost : float
        The final cost.
    status : str
        The flow's status code.
    kind, dimension, index, dimension_gap, rank_deficit
        With ``sample_strata(classify="full")``: those of
        :class:`~subriemann.analysis.critical.EquilibriumReport` at the
        refined end point; None otherwise.
    refined_distance : float or None
        ``"full"``: how far :func:`~subriemann.analysis.critical.refine_critical_point`
        moved the end point.
    refine_error : str or None
        ``"full"``: why the refinement failed (the Hessian is then taken at the end point).

    ``endpoint["label"]`` reads the attribute ``label`` (mapping access, as for the
    dictionaries that earlier versions returned).
    """

    label: str
    output_grad_norm: float
    relative_grad: float
    rank: int
    cost: float
    status: str
    kind: str | None = None
    dimension: int | None = None
    index: int | None = None
    dimension_gap: float | None = None
    rank_deficit: int | None = None
    refined_distance: float | None = None
    refine_error: str | None = None

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)


def _relative_grad(grad_norm: float, smax: float, output_grad_norm: float) -> float:
    denom = smax * output_grad_norm
    return grad_norm / denom if denom > 0 else (0.0 if grad_norm == 0 else math.inf)


def _endpoint_with_space(
    traj: Trajectory, space: ParameterSpace, global_tol: float, critical_tol: float
) -> Endpoint:
    theta = traj.theta[-1].to(dtype=space.dtype, device=space.device)
    st = space.point_state(theta)
    gn = float(st.output_grad.norm())
    smax = float(st.singular_values()[0]) if min(space.dim, space.output_dim) else 0.0
    rel = _relative_grad(float(space.cost_grad(theta).norm()), smax, gn)
    if gn <= global_tol * max(1.0, float(space.y.norm())):
        label = GLOBAL_MINIMUM
    else:
        label = NON_GLOBAL if rel <= critical_tol else NOT_CONVERGED
    return Endpoint(label, gn, rel, int(traj.rank[-1]), float(traj.cost[-1]), traj.status.code)


def _final_output_grad_norm(traj: Trajectory) -> float:
    """:math:`|\\nabla_xC|` from the saved outputs and targets (NaN for an unknown loss)."""
    q = max(int(traj.num_outputs), 1)
    x, y = traj.outputs[-1], traj.targets
    n = x.numel() // q
    try:
        loss = get_loss(traj.loss)
        return float(loss.grad(x.reshape(n, q), y.reshape(n, q)).reshape(-1).norm())
    except Exception:  # a custom loss not known by name
        return math.nan


def _stalled(traj: Trajectory, stall_rtol: float) -> bool:
    """Final output speed at most ``stall_rtol`` times the initial one (or the status says so)."""
    if traj.status.code == "equilibrium_reached":
        return True
    if len(traj) < 3:
        return False
    ds_end = float(traj.s[-1] - traj.s[-2])
    ds0 = float(traj.s[1] - traj.s[0])
    if not (ds_end > 0 and ds0 > 0):
        return False
    v_end = float((traj.outputs[-1] - traj.outputs[-2]).norm()) / ds_end
    v0 = float((traj.outputs[1] - traj.outputs[0]).norm()) / ds0
    return v_end <= stall_rtol * v0


def classify_endpoint(
    traj: Trajectory,
    space: ParameterSpace | None = None,
    *,
    global_tol: float = 1e-4,
    critical_tol: float = 1e-3,
    stall_rtol: float = 1e-3,
) -> Endpoint:
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
    Endpoint
    """
    if len(traj) == 0:
        raise ValueError("the trajectory holds no points")
    if space is not None:
        return _endpoint_with_space(traj, space, global_tol, critical_tol)
    gn = _final_output_grad_norm(traj)
    at_minimum = gn <= global_tol * max(1.0, float(traj.targets.norm()))
    if traj.status.code == "cost_tol_reached" or at_minimum:
        label = GLOBAL_MINIMUM
    else:
        label = NON_GLOBAL if _stalled(traj, stall_rtol) else NOT_CONVERGED
    return Endpoint(label, gn, math.nan, int(traj.rank[-1]), float(traj.cost[-1]),
                    traj.status.code)


# ---------------------------------------------------------------------------
# the graph
# ---------------------------------------------------------------------------
def _end_labels(
    trajs: list[Trajectory], classify: Any, tolerances: dict[str, float]
) -> tuple[list[str], str]:
    """The terminal label of each trajectory, and how they were obtained."""
    if classify is None or isinstance(classify, ParameterSpace):
        labels = [classify_endpoint(t, classify, **tolerances).label for t in trajs]
        return labels, "space" if classify is not None else "trajectory"
    if callable(classify):
        return [str(classify(t)) for t in trajs], "callable"
    if isinstance(classify, Sequence) and not isinstance(classify, (str, bytes)):
        labels = [str(v) for v in classify]
        if len(labels) != len(trajs):
            raise ValueError(f"classify has {len(labels)} labels for {len(trajs)} trajectories")
        return labels, "labels"
    raise TypeError(
        "classify must be None, a ParameterSpace, a callable traj -> str or a sequence of "
        f"labels, got {type(classify).__name__}"
    )


def _stratum(g: nx.DiGraph, r: int) -> str:
    """The node of the stratum :math:`S_r` (added on first use)."""
    name = stratum_node(r)
    if name not in g:
        g.add_node(name, kind="stratum", rank=int(r), time=0.0, n_flows=0, n_start=0, n_end=0)
    return name


def _add_flow(g: nx.DiGraph, traj: Trajectory, label: str) -> None:
    """Count one flow into the strata graph: time per stratum, rank changes, its end."""
    times, changes, final = stratum_times(traj)
    for r, dt in times.items():
        node = _stratum(g, r)
        g.nodes[node]["time"] += dt
        g.nodes[node]["n_flows"] += 1
    g.nodes[_stratum(g, int(traj.rank[0]))]["n_start"] += 1
    seen: set[tuple[int, int]] = set()
    for r0, r1, s in changes:
        a, b = _stratum(g, r0), _stratum(g, r1)
        if not g.has_edge(a, b):
            g.add_edge(a, b, kind="rank_change", count=0, n_flows=0, s=[])
        e = g.edges[a, b]
        e["count"] += 1
        e["s"].append(s)
        if (r0, r1) not in seen:
            e["n_flows"] += 1
            seen.add((r0, r1))
    end = _stratum(g, final)
    g.nodes[end]["n_end"] += 1
    if label not in g:
        g.add_node(label, kind="terminal", count=0)
    g.nodes[label]["count"] += 1
    if not g.has_edge(end, label):
        g.add_edge(end, label, kind="end", count=0, statuses={})
    e = g.edges[end, label]
    e["count"] += 1
    e["statuses"][traj.status.code] = e["statuses"].get(traj.status.code, 0) + 1


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
    trajs: list[Trajectory] = (
        [trajectories] if isinstance(trajectories, Trajectory) else list(trajectories)
    )
    for i, t in enumerate(trajs):
        if not isinstance(t, Trajectory):
            raise TypeError(f"trajectories[{i}] is a {type(t).__name__}, not a Trajectory")
    tolerances = {"global_tol": global_tol, "critical_tol": critical_tol, "stall_rtol": stall_rtol}
    labels, how = _end_labels(trajs, classify, tolerances)
    g = nx.DiGraph()
    g.graph.update(n_runs=len(trajs), classification=how, tolerances=tolerances)
    for t, label in zip(trajs, labels):
        _add_flow(g, t, label)
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


def _full_endpoint(traj: Trajectory, sp: ParameterSpace, tolerances: dict[str, Any]) -> Endpoint:
    """:func:`classify_endpoint`, then the Hessian at the refined end point."""
    end = classify_endpoint(traj, sp, **tolerances)
    theta = traj.theta[-1].to(sp.dtype)
    # a flow stops near, not on, the critical set: refine first (the Hessian
    # kernel is the tangent space only on the set)
    try:
        move = 0.1 * max(1.0, float(theta.norm()))
        refined, _ = refine_critical_point(sp, theta, max_move=move)
        end.refined_distance = float((refined - theta).norm())
        theta = refined
    except RuntimeError as err:
        end.refine_error = str(err)
    rep = classify_equilibrium(sp, theta)
    end.kind, end.dimension, end.index = rep.kind, rep.dimension, rep.index
    end.dimension_gap, end.rank_deficit = rep.dimension_gap, rep.rank_deficit
    return end


def _classified(traj: Trajectory, sp: ParameterSpace, options: dict[str, Any]) -> dict[str, Any]:
    """A run's result record: the trajectory and, as the options ask, the class of its end."""
    mode = options.get("classify", "cheap")
    tolerances = options.get("tolerances", {})
    details: Endpoint | None = None
    if mode == "cheap":
        details = classify_endpoint(traj, sp, **tolerances)
    elif mode == "full":
        details = _full_endpoint(traj, sp, tolerances)
    label = None if details is None else details.label
    return {"trajectory": traj, "label": label, "details": details}


def _flows(sp: ParameterSpace, points: Tensor, s_end: float, options: dict[str, Any]
           ) -> list[dict[str, Any]]:
    """The flows from ``points`` ``[B, K]`` (one ``gradient_flow`` call) and their classes."""
    # torch's forward-mode AD (torch.func.jvp) keeps its dual levels in process-global
    # state: two flows in threads of one process corrupt each other. Serialize them.
    with _FORWARD_AD_LOCK:
        start = points[0] if points.shape[0] == 1 else points  # a batch runs in lock-step
        out = gradient_flow(sp, start, s_end, **options.get("flow", {}))
        trajs = out if isinstance(out, list) else [out]
        return [_classified(t, sp, options) for t in trajs]


def _error() -> dict[str, Any]:
    return {"error": traceback.format_exc()}


def run_flow_task(
    space: Any,
    theta0: Tensor,
    s_end: float,
    options: dict[str, Any],
) -> dict[str, Any] | list[dict[str, Any]]:
    r"""One work item of :func:`sample_strata`: flows and the class of each end.

    A top-level function, so that executors can pickle it.  The flows from a
    batch ``[B, K]`` run together in one :func:`~subriemann.gradient_flow` call
    (its batch runner, :mod:`subriemann.flow.batch`); when that call raises, the
    points are run one by one, so that one failing flow does not take the
    others with it.

    Parameters
    ----------
    space : bytes, SpaceRecipe or ParameterSpace
        The pickled space (bytes, unpickled here: every call gets its own
        copy), a recipe (built here), or a space (used as is: only safe when
        nothing else uses it at the same time).
    theta0 : Tensor, shape=[K] or [B, K]
    s_end : float
    options : dict
        ``flow``: keyword arguments of :func:`~subriemann.gradient_flow`;
        ``classify``: ``"cheap"``, ``"full"`` or ``None``; ``tolerances``:
        those of :func:`classify_endpoint`; ``threads``: torch threads in a
        worker *process* (left alone in the parent process).

    Returns
    -------
    dict, or list of dict for a batch
        ``trajectory``, ``label``, ``details`` (the :class:`Endpoint`, None
        with ``classify=None``), or ``error`` (a traceback string) when
        anything failed.
    """
    single = theta0.ndim == 1
    points = theta0.unsqueeze(0) if single else theta0
    try:
        threads = options.get("threads")
        if threads is not None and multiprocessing.parent_process() is not None:
            torch.set_num_threads(int(threads))
        sp = _materialize(space)
        points = points.to(dtype=sp.dtype, device=sp.device)
        try:
            results = _flows(sp, points, s_end, options)
        except Exception:
            if points.shape[0] == 1:
                raise
            results = []
            for p in points:  # one by one: the error stays with the flow that raised it
                try:
                    results += _flows(sp, p.unsqueeze(0), s_end, options)
                except Exception:
                    results.append(_error())
    except Exception:
        results = [_error()] * points.shape[0]
    return results[0] if single else results


def _default_executor(max_workers: int) -> Any:
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
    return isinstance(err, (BrokenExecutor, CancelledError)) or type(err).__name__ == "KilledWorker"


@dataclass
class _Sweep:
    """The state of :func:`_run_all`: one result per run, work items of run indices."""

    executor: Any
    args: tuple[Any, float, dict[str, Any]]  # (payload, s_end, options)
    points: Tensor  # [B, K]
    own_workers: int | None
    results: list[dict[str, Any]]
    attempts: list[int]
    resubmitted: int = 0

    def submit(self, item: list[int]) -> Any:
        payload, s_end, options = self.args
        for i in item:
            self.attempts[i] += 1
        try:
            return self.executor.submit(run_flow_task, payload, self.points[item], s_end, options)
        except Exception as err:  # e.g. a broken pool  # noqa: BLE001
            return err

    def collect(self, item: list[int], fut: Any) -> bool:
        """Store the item's results; False when the executor lost it and it may be retried."""
        try:
            if isinstance(fut, Exception):
                raise fut
            out = fut.result()
        except Exception as err:  # noqa: BLE001  (recorded as the runs' failure)
            if _lost(err) and max(self.attempts[i] for i in item) < MAX_ATTEMPTS:
                return False
            where = "submit failed: " if isinstance(fut, Exception) else ""
            out = [{"error": f"{where}{type(err).__name__}: {err} (attempt "
                             f"{self.attempts[i]} of {MAX_ATTEMPTS})"} for i in item]
        for i, res in zip(item, out):
            self.results[i] = res
        return True

    def renew(self) -> None:
        """Replace our own executor after a loss (a user's executor is used as it is)."""
        if self.own_workers is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = _default_executor(self.own_workers)


def _run_all(ex: Any, args: tuple[Any, float, dict[str, Any]], points: Tensor,
             items: list[list[int]], own_workers: int | None) -> tuple[list[dict[str, Any]], int]:
    """Every run's result; work items lost with a worker are submitted again (``MAX_ATTEMPTS``).

    ``items``: the run indices of each work item (a batch of flows).  ``own_workers``:
    the executor is ours, with that many workers; a broken one is shut down and
    replaced by a fresh pool (a user's executor is used as it is, and shut down by
    nobody here).  Returns the results and the number of runs submitted again.
    """
    sweep = _Sweep(ex, args, points, own_workers, [{} for _ in range(points.shape[0])],
                   [0] * points.shape[0])
    todo = list(items)
    try:
        while todo:
            futures = [(item, sweep.submit(item)) for item in todo]
            todo = [item for item, fut in futures if not sweep.collect(item, fut)]
            sweep.resubmitted += sum(len(item) for item in todo)
            if todo:
                sweep.renew()
    finally:
        if own_workers is not None:
            sweep.executor.shutdown(wait=True)
    return sweep.results, sweep.resubmitted


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


FLOW_PARAMS = frozenset(
    (set(inspect.signature(gradient_flow).parameters) | FlowOptions.names())
    - {"space", "initial_point", "s_end", "options"}
)
"""The flow options :func:`sample_strata` passes on to :func:`~subriemann.gradient_flow`."""


def _check_flow_options(opts: dict[str, Any]) -> None:
    if "metric" in opts:
        raise ValueError(
            "sample_strata takes the metric from the space: equip it "
            "(space.equip_with_metric(...)) instead of passing metric="
        )
    for k in ("checkpoint", "resume", "progress"):
        if opts.get(k):
            raise ValueError(f"flow option {k!r} is not supported by sample_strata")
    unknown = sorted(set(opts) - FLOW_PARAMS)
    if unknown:
        raise TypeError(
            f"unknown flow option(s) {unknown}; gradient_flow takes {sorted(FLOW_PARAMS)}"
        )


def _initial_points(
    local: ParameterSpace, initial_points: Any, n_init: Any, init: Any, seed: int
) -> Tensor:
    """The start points ``[B, K]`` of :func:`sample_strata` (on the CPU)."""
    points: list[Tensor]
    if initial_points is not None:
        if n_init is not None:
            raise ValueError("give initial_points or n_init, not both")
        if isinstance(initial_points, Tensor):
            batch = initial_points.unsqueeze(0) if initial_points.ndim == 1 else initial_points
            if batch.ndim != 2:
                raise ValueError(
                    f"initial_points must have shape (B, {local.dim}), got "
                    f"{tuple(initial_points.shape)}"
                )
            points = list(batch)
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
        n_init = check_int(n_init, "n_init", low=1)
        if init is not None and not callable(init):
            raise TypeError(f"init must be callable (i -> theta0), got {type(init).__name__}")
        points = [init(i) if init is not None else default_init(local, i, seed)
                  for i in range(n_init)]
    if not points:
        raise ValueError("no initial points")
    return torch.stack([local.check_point(p).detach().clone().cpu() for p in points])


def work_items(n_runs: int, n_items: int) -> list[list[int]]:
    """Run indices ``0..n_runs-1`` dealt into ``min(n_items, n_runs)`` strided work items.

    Item ``j`` holds the runs ``j, j + m, j + 2m, ...`` (``m`` items): the sizes differ
    by at most one.

    Examples
    --------
    >>> work_items(5, 2)
    [[0, 2, 4], [1, 3]]
    """
    m = max(1, min(n_items, n_runs))
    return [list(range(j, n_runs, m)) for j in range(m)]


def _strata_result(
    results: list[dict[str, Any]], classify: str | None, tols: dict[str, float]
) -> tuple[nx.DiGraph, list[Trajectory]]:
    """The strata graph of the runs that did not fail; ``graph.graph`` lists the failures."""
    trajs: list[Trajectory] = []
    labels: list[str] = []
    details: list[Endpoint] = []
    indices: list[int] = []
    failures: list[dict[str, Any]] = []
    for i, res in enumerate(results):
        if "error" in res:
            failures.append({"index": i, "error": res["error"]})
            continue
        trajs.append(res["trajectory"])
        indices.append(i)
        if res.get("details") is not None:
            details.append(res["details"])
            labels.append(res["label"])
    if classify is None:
        graph = strata_graph(trajs, None, **tols)
        details = [classify_endpoint(t, None, **tols) for t in trajs]
    else:
        graph = strata_graph(trajs, labels, **tols)
        graph.graph["classification"] = f"worker ({classify})"
    graph.graph.update(n_failed=len(failures), failures=failures, run_indices=indices,
                       details=details)
    return graph, trajs


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

    The runs are dealt into ``max_workers`` work items (:func:`work_items`); each
    work item integrates its flows together with one call of
    :func:`~subriemann.gradient_flow` on initial points ``[B, K]`` (the flow
    package's batch runner, :mod:`subriemann.flow.batch`) and classifies where
    each ended (:func:`run_flow_task`).  The executor runs the work items.

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
        Workers of the default pool, and the number of work items.
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
        ``details`` (the :class:`Endpoint` of each).
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
    if not isinstance(space, (ParameterSpace, SpaceRecipe)):
        raise TypeError(
            f"space must be a ParameterSpace or a SpaceRecipe, got {type(space).__name__}"
        )
    s_end = check_real(s_end, "s_end", low=0.0, low_open=True)
    check_optional(check_choice, classify, "classify", choices=("cheap", "full"))
    max_workers = check_int(max_workers, "max_workers", low=1)
    _check_flow_options(flow_options)
    local = space.build() if isinstance(space, SpaceRecipe) else space
    points = _initial_points(local, initial_points, n_init, init, seed)
    tols = {"global_tol": global_tol, "critical_tol": critical_tol}
    options = {"flow": dict(flow_options), "classify": classify, "tolerances": tols,
               "threads": threads_per_worker}
    payload = _payload(space)
    own = executor is None
    ex = _default_executor(max_workers) if own else executor
    if not callable(getattr(ex, "submit", None)):
        raise TypeError(f"executor must have a submit method, got {type(ex).__name__}")
    results, resubmitted = _run_all(ex, (payload, s_end, options), points,
                                    work_items(points.shape[0], max_workers),
                                    max_workers if own else None)
    graph, trajs = _strata_result(results, classify, tols)
    graph.graph.update(n_runs=points.shape[0], s_end=s_end, flow_options=dict(flow_options),
                       resubmitted=resubmitted)
    return graph, trajs


__getattr__ = moved_getattr(__name__, ["plot_strata_graph"])
