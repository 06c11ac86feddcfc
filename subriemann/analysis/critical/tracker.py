r"""Continuation along a critical set: :class:`CriticalSetTracker` and :func:`track_critical_set`.

The tracker walks the critical set :math:`\{D^\top\nabla_xC = 0\}` by
predictor–corrector continuation (the steps are listed in
:func:`track_critical_set`).  Its state is explicit: the graph of sampled
critical points (nodes) and continuation steps (edges), the Hessian kernel
and the singular frames of :math:`D` at each node, the frontier of nodes
still to expand and the record of every branch that ended.  :meth:`~CriticalSetTracker.step`
expands one node; :meth:`~CriticalSetTracker.result` joins explorations that
met and summarizes the components as a :class:`CriticalSet`.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import Tensor

from subriemann.analysis.critical.classify import (
    EquilibriumReport,
    equilibrium_report,
    report_options,
    singular_state,
)
from subriemann.analysis.critical.refine import Correction, correct, grad_scale
from subriemann.analysis.critical.spectrum import (
    DENSE_HESSIAN_LIMIT,
    check_space,
    hessian_method,
)
from subriemann.linalg import rank_threshold
from subriemann.space import ParameterSpace
from subriemann.validation import check_int, check_optional, check_real

__all__ = [
    "ComponentInfo",
    "CriticalSet",
    "TrackingOptions",
    "CriticalSetTracker",
    "track_critical_set",
]

Frames = tuple[Tensor, Tensor, Tensor]
"""``(sigma [r], U [QN, r], V [K, r])``: the leading singular triplets of :math:`D` at a node."""


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------
@dataclass
class ComponentInfo:
    r"""One connected component of the sampled critical set.

    Attributes
    ----------
    nodes : set of int
    n_nodes : int
    dimension : int
        The most frequent node dimension.
    dimensions : list of int
        All node dimensions seen (sorted, unique).
    dimension_consistent : bool
        Every node has the same dimension.
    cost_mean, cost_min, cost_max, cost_spread : float
        :math:`C` is constant on a connected critical set, so ``cost_spread``
        (max - min) measures the accuracy of the sampling.
    cost_constant : bool
        ``cost_spread <= cost_tol``.
    rank_profile : dict
        rank of :math:`D` → number of nodes.
    index_values : list of int
    max_grad_norm : float
        Largest :math:`|\nabla_\theta C|` at the nodes.
    seeds : list of int
        Indices of the start points that lie in this component.
    diameter : float
        Largest Euclidean distance between two nodes.
    """

    nodes: set[int]
    n_nodes: int
    dimension: int
    dimensions: list[int]
    dimension_consistent: bool
    cost_mean: float
    cost_min: float
    cost_max: float
    cost_spread: float
    cost_constant: bool
    rank_profile: dict[int, int]
    index_values: list[int]
    max_grad_norm: float
    seeds: list[int]
    diameter: float


@dataclass
class CriticalSet:
    r"""Sampled critical set: the continuation graph and what it says.

    Attributes
    ----------
    graph : networkx.Graph
        Nodes are sampled critical points (integer ids) with attributes
        ``theta`` (Tensor ``[K]``), ``cost``, ``rank``, ``dimension``,
        ``grad_norm``, ``dimension_gap``, ``index``, ``seed`` (index of the
        start point whose exploration found it) and ``depth``; edges are
        continuation steps with attributes ``length`` and ``step`` (the
        string ``"link"`` for the joins of :func:`track_critical_set`'s step 6).
    components : list of set of int
        Connected components (node sets), the start point's first.
    component_info : list of ComponentInfo
        Aligned with ``components``.
    dimension : int or None
        The dimension estimate on the start point's component.
    status : str
        Why the continuation stopped: ``"n_points reached"``, or, when every
        branch ended, the reasons (e.g. ``"corrector failed at node 3"``,
        ``"rank changed at node 7"``).
    terminations : list of dict
        Every branch end: ``node``, ``code`` (``"corrector_failed"``,
        ``"rank_change"``, ``"dimension_change"``, ``"no_tangent"``,
        ``"seed_failed"``), ``reason``.
    seed_nodes : list of int or None
        Node of each start point (None where its corrector failed).
    start_report : EquilibriumReport
        The classification at the (corrected) start point.
    tolerances : dict
    """

    graph: nx.Graph
    components: list[set[int]]
    component_info: list[ComponentInfo]
    dimension: int | None
    status: str
    terminations: list[dict[str, Any]]
    seed_nodes: list[int | None]
    start_report: EquilibriumReport
    tolerances: dict[str, Any]

    @property
    def n_components(self) -> int:
        return len(self.components)

    @property
    def thetas(self) -> Tensor:
        """Node parameters stacked in node order, shape ``[n, K]``."""
        return torch.stack([self.graph.nodes[n]["theta"] for n in sorted(self.graph.nodes)])

    def component_table(self) -> list[dict[str, Any]]:
        """One row (a dict) per component: nodes, dimension, cost and its spread, ranks, index."""
        return [
            {
                "component": i,
                "nodes": c.n_nodes,
                "dimension": c.dimension,
                "dimensions": c.dimensions,
                "cost": c.cost_mean,
                "cost_spread": c.cost_spread,
                "ranks": dict(sorted(c.rank_profile.items())),
                "index": c.index_values,
                "max_grad_norm": c.max_grad_norm,
                "diameter": c.diameter,
                "seeds": c.seeds,
            }
            for i, c in enumerate(self.component_info)
        ]

    def summary(self) -> str:
        """The component table as text, and the status."""
        head = (
            f"{'comp':>4} {'nodes':>5} {'dim':>4} {'cost':>12} {'spread':>9} "
            f"{'rank(s)':>10} {'index':>6} {'max|gradC|':>10} {'diameter':>9} seeds"
        )
        lines = [head]
        for r in self.component_table():
            dims = str(r["dimension"]) + ("" if len(r["dimensions"]) == 1 else "*")
            ranks = ",".join(str(k) for k in r["ranks"])
            idx = ",".join(str(k) for k in r["index"])
            lines.append(
                f"{r['component']:>4} {r['nodes']:>5} {dims:>4} {r['cost']:>12.6g} "
                f"{r['cost_spread']:>9.2e} {ranks:>10} {idx:>6} {r['max_grad_norm']:>10.2e} "
                f"{r['diameter']:>9.3g} {r['seeds']}"
            )
        lines.append(f"status: {self.status}")
        if any(len(r["dimensions"]) > 1 for r in self.component_table()):
            lines.append("* the node dimension varies on this component")
        return "\n".join(lines)


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------
@dataclass
class TrackingOptions:
    r"""The knobs of :func:`track_critical_set`, validated on creation.

    Every attribute is the argument of the same name of :func:`track_critical_set`
    (where it is documented).  The rank threshold is not one of them: the tracker
    fixes :math:`\tau = \mathrm{rank\_rtol}\,\sigma_{\max}` at the first start point.
    """

    n_points: int = 50
    step: float = 0.1
    max_directions: int = 8
    max_halvings: int = 4
    grad_tol: float | None = None
    tol: float = 1e-6
    rank_rtol: float = 1e-6
    kernel_rtol: float = 1e-6
    min_gap: float = 1e3
    sigma_drop: float = 0.5
    max_correction: float = 0.5
    merge_rtol: float = 0.5
    corrector_iters: int = 20
    cost_tol: float | None = None
    hessian: str = "auto"
    dense_limit: int = DENSE_HESSIAN_LIMIT
    n_eigs: int = 20
    max_rounds: int = 8

    def __post_init__(self) -> None:
        self.n_points = check_int(self.n_points, "n_points", low=1)
        self.step = check_real(self.step, "step", low=0.0, low_open=True)
        self.max_directions = max(2, check_int(self.max_directions, "max_directions", low=1))
        self.max_halvings = check_int(self.max_halvings, "max_halvings", low=0)
        report = report_options(self.tol, self.rank_rtol, None, self.kernel_rtol, self.min_gap,
                                self.n_eigs, self.max_rounds)
        for name, value in report.items():
            if name != "rank_atol":
                setattr(self, name, value)
        unit: dict[str, Any] = dict(low=0.0, high=1.0, low_open=True, high_open=True)
        self.sigma_drop = check_real(self.sigma_drop, "sigma_drop", **unit)
        self.max_correction = check_real(self.max_correction, "max_correction", low=0.0,
                                         low_open=True)
        self.merge_rtol = check_real(self.merge_rtol, "merge_rtol", **unit)
        self.corrector_iters = check_int(self.corrector_iters, "corrector_iters", low=1)
        self.dense_limit = check_int(self.dense_limit, "dense_limit", low=1)
        self.grad_tol = check_optional(check_real, self.grad_tol, "grad_tol", low=0.0,
                                       low_open=True)
        self.cost_tol = check_optional(check_real, self.cost_tol, "cost_tol", low=0.0)

    def report_kwargs(self, rank_atol: float) -> dict[str, Any]:
        """Keyword arguments of ``equilibrium_report`` (the rank threshold ``rank_atol``)."""
        return dict(tol=self.tol, rank_rtol=self.rank_rtol, rank_atol=rank_atol,
                    kernel_rtol=self.kernel_rtol, min_gap=self.min_gap, n_eigs=self.n_eigs,
                    max_rounds=self.max_rounds)


# ---------------------------------------------------------------------------
# the tracker
# ---------------------------------------------------------------------------
class CriticalSetTracker:
    r"""Predictor–corrector continuation along a critical set, one node expansion per step.

    Parameters
    ----------
    space : ParameterSpace
    theta_star : Tensor, shape=[K] or [B, K], or list of Tensor
        Start point(s), near critical points.
    options : TrackingOptions, optional

    Attributes
    ----------
    graph : networkx.Graph
        The nodes and edges so far (see :class:`CriticalSet`).
    frontier : collections.deque of int
        Nodes not expanded yet, breadth first.
    terminations : list of dict
        Every branch end so far.
    seed_nodes : list of int or None
        After :meth:`start`: the node of each start point.
    start_report : EquilibriumReport or None
        After :meth:`start`: the classification at the first corrected start point.
    tau, grad_tol : float
        The rank threshold and the corrector tolerance, fixed at the first start point.

    Examples
    --------
    >>> import torch, subriemann as sr
    >>> class Line(torch.nn.Module):            # x = a * b * X: C is constant on a b = c
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a = torch.nn.Parameter(torch.tensor(1.0))
    ...         self.b = torch.nn.Parameter(torch.tensor(1.0))
    ...     def forward(self, X):
    ...         return self.a * self.b * X
    >>> X = torch.tensor([[1.0], [2.0]]); Y = torch.tensor([[1.0], [1.0]])
    >>> space = sr.ParameterSpace(Line(), X, Y, backend="func")
    >>> start = torch.tensor([1.0, 0.6], dtype=torch.float64)   # a b = 3/5, the least squares
    >>> tracker = CriticalSetTracker(space, start, TrackingOptions(n_points=5, step=0.1))
    >>> while tracker.step():
    ...     pass
    >>> cs = tracker.result()
    >>> cs.graph.number_of_nodes(), cs.dimension, cs.status
    (5, 1, 'n_points reached')
    """

    def __init__(
        self, space: ParameterSpace, theta_star: Tensor | list[Tensor],
        options: TrackingOptions | None = None,
    ) -> None:
        self.space = check_space(space)
        self.seeds = _as_seeds(self.space, theta_star)
        self.options = TrackingOptions() if options is None else options
        if not isinstance(self.options, TrackingOptions):
            raise TypeError(f"options must be TrackingOptions, got {type(options).__name__}")
        self.method = hessian_method(self.space, self.options.hessian, self.options.dense_limit)
        _, s0 = singular_state(self.space, self.seeds[0])
        self.tau = rank_threshold(float(s0[0]) if s0.numel() else 0.0, self.options.rank_rtol)
        given = self.options.grad_tol
        self.grad_tol = 1e-10 * grad_scale(self.space, self.seeds[0]) if given is None else given
        self.graph = nx.Graph()
        self.kernels: dict[int, Tensor] = {}
        self.frames: dict[int, Frames] = {}
        self.terminations: list[dict[str, Any]] = []
        self.seed_nodes: list[int | None] = []
        self.start_report: EquilibriumReport | None = None
        self.frontier: deque[int] = deque()
        self.ref_dirs: Tensor | None = None
        self.cost_tol: float | None = None
        self._points: list[Tensor] = []  # node thetas in node order (ids are 0, 1, 2, ...)
        self._stacked: Tensor | None = None  # torch.stack(self._points), built on demand

    # -- one point ---------------------------------------------------------------------
    def correct(self, theta: Tensor, max_move: float, dimension: int | None = None) -> Correction:
        """The corrector (:func:`~subriemann.analysis.critical.refine.correct`) from ``theta``."""
        return correct(
            self.space, theta, grad_tol=self.grad_tol, max_iter=self.options.corrector_iters,
            max_move=max_move, method=self.method, dimension=dimension,
            kernel_rtol=self.options.kernel_rtol,
        )

    def analyze(self, theta: Tensor) -> EquilibriumReport:
        """The classification at ``theta``, with the fixed rank threshold."""
        return equilibrium_report(self.space, theta, method=self.method,
                                  **self.options.report_kwargs(self.tau))

    def add_node(self, theta: Tensor, rep: EquilibriumReport, seed: int, depth: int) -> int:
        """A new node at ``theta`` (its report ``rep``); returns its id."""
        nid = self.graph.number_of_nodes()
        self.graph.add_node(
            nid, theta=theta.detach().clone(), cost=rep.cost, rank=rep.rank,
            dimension=rep.dimension, grad_norm=rep.grad_norm, dimension_gap=rep.dimension_gap,
            index=rep.index, seed=seed, depth=depth,
        )
        self.kernels[nid] = rep.kernel_basis
        self.frames[nid] = _frames(self.space, theta, rep.rank)
        self._points.append(theta.detach().clone())
        self._stacked = None
        return nid

    def nearest(self, theta: Tensor, exclude: int | None = None) -> tuple[int | None, float]:
        """The node nearest to ``theta`` (other than ``exclude``) and its distance."""
        if not self._points:
            return None, math.inf
        if self._stacked is None:
            self._stacked = torch.stack(self._points)
        d = (self._stacked - theta).norm(dim=1)
        if exclude is not None:
            d[exclude] = math.inf
        best = int(torch.argmin(d))
        dist = float(d[best])
        return (best, dist) if math.isfinite(dist) else (None, math.inf)

    # -- the walk ------------------------------------------------------------------------
    def start(self) -> None:
        """Correct every start point onto the set and make it a node (merging duplicates).

        Raises
        ------
        ValueError
            If no start point could be corrected onto the critical set.
        """
        merge = self.options.merge_rtol * self.options.step
        for si, seed in enumerate(self.seeds):
            res = self.correct(seed, math.inf)
            if not res.converged:
                self.terminations.append(
                    {"node": None, "seed": si, "code": "seed_failed",
                     "reason": f"corrector failed at start point {si}: {res.reason}"}
                )
                self.seed_nodes.append(None)
                continue
            rep = self.analyze(res.theta)
            if self.start_report is None:
                self.start_report = rep
            near, dist = self.nearest(res.theta)
            if near is not None and dist <= merge:
                self.seed_nodes.append(near)
                continue
            nid = self.add_node(res.theta, rep, si, 0)
            self.seed_nodes.append(nid)
            if self.ref_dirs is None and rep.dimension > 0:
                self.ref_dirs = _reference_frame(rep.kernel_basis, self.options.max_directions // 2)
            self.frontier.append(nid)
        if self.start_report is None:
            reasons = "; ".join(t["reason"] for t in self.terminations)
            raise ValueError(f"no start point could be corrected onto the critical set: {reasons}")

    @property
    def done(self) -> bool:
        """No node left to expand, or ``n_points`` nodes reached."""
        return not self.frontier or self.graph.number_of_nodes() >= self.options.n_points

    def step(self) -> bool:
        """Expand the next node of the frontier (the first call runs :meth:`start`).

        Returns
        -------
        bool
            Whether there is more to do.
        """
        if self.start_report is None:
            self.start()
            return not self.done
        if self.done:
            return False
        nid = self.frontier.popleft()
        dirs = self.directions(nid)
        if not dirs and self.graph.nodes[nid]["dimension"] == 0:
            self.terminations.append(
                {"node": nid, "code": "no_tangent",
                 "reason": f"isolated critical point at node {nid} (dimension 0)"}
            )
        for u in dirs:
            if self.graph.number_of_nodes() >= self.options.n_points:
                break
            self._walk(nid, u)
        return not self.done

    def directions(self, nid: int) -> list[Tensor]:
        r"""Unit predictor directions :math:`\pm u` in the kernel at node ``nid``.

        The reference directions of the start point projected onto the node's
        kernel (those that keep at least 0.3 of their length), or, when none does,
        a reference frame of the node's own kernel.
        """
        kb = self.kernels[nid]
        if kb.shape[1] == 0:
            return []
        half = self.options.max_directions // 2
        refs = self.ref_dirs if self.ref_dirs is not None else _reference_frame(kb, half)
        dirs: list[Tensor] = []
        for j in range(refs.shape[1]):
            p = kb @ (kb.T @ refs[:, j])
            if float(p.norm()) < 0.3:  # the kernel turned away from this reference direction
                continue
            p = p / p.norm()
            dirs += [p, -p]
        if not dirs:
            own = _reference_frame(kb, half)
            for j in range(own.shape[1]):
                dirs += [own[:, j], -own[:, j]]
        return dirs

    def _walk(self, nid: int, u: Tensor) -> None:
        """Step from node ``nid`` along ``u``, halving the step on failure; record a branch end."""
        h = self.options.step
        reason: tuple[str, str] | None = None
        for _ in range(self.options.max_halvings + 1):
            reason = self._attempt(nid, u, h)
            if reason is None:
                return
            h *= 0.5
        if reason is not None:
            self.terminations.append({"node": nid, "code": reason[0], "reason": reason[1]})

    def _attempt(self, nid: int, u: Tensor, h: float) -> tuple[str, str] | None:
        """One predictor–corrector step of length ``h``: None when done, else why it failed."""
        node = self.graph.nodes[nid]
        pred = node["theta"] + h * u
        # already explored: a node of this component lies where the predictor points
        near, dist = self.nearest(pred, exclude=nid)
        if (near is not None and dist <= self.options.merge_rtol * h
                and near in nx.node_connected_component(self.graph, nid)):
            return None
        allowed = self.options.max_correction * h
        res = self.correct(pred, allowed * 4.0, node["dimension"])
        if not res.converged:
            return "corrector_failed", f"corrector failed at node {nid}: {res.reason}"
        moved = float((res.theta - pred).norm())
        if moved > allowed:
            return (
                "corrector_failed",
                f"corrector failed at node {nid}: correction {moved:.3g} > "
                f"{self.options.max_correction} x step {h:.3g}",
            )
        rep = self.analyze(res.theta)
        defect = self._defect(nid, rep, res.theta, h)
        if defect is not None:
            return defect
        self._join(nid, res.theta, rep, h)
        return None

    def _defect(self, nid: int, rep: EquilibriumReport, theta: Tensor, h: float
                ) -> tuple[str, str] | None:
        return _step_defect(self.space, nid, self.graph.nodes[nid], self.frames[nid], rep, theta,
                            h, self.options.sigma_drop)

    def _join(self, nid: int, theta: Tensor, rep: EquilibriumReport, h: float) -> None:
        """Accept ``theta``: merge it into a node within ``merge_rtol * h``, or add a new node."""
        node = self.graph.nodes[nid]
        length = float((theta - node["theta"]).norm())
        near, dist = self.nearest(theta, exclude=nid)
        if near is not None and dist <= self.options.merge_rtol * h:
            if not self.graph.has_edge(nid, near):
                self.graph.add_edge(nid, near, length=length, step=h)
            return
        new = self.add_node(theta, rep, node["seed"], node["depth"] + 1)
        self.graph.add_edge(nid, new, length=length, step=h)
        self.frontier.append(new)

    # -- the summary ---------------------------------------------------------------------
    def verify_link(self, a: int, b: int) -> bool:
        """Whether the chord between nodes ``a`` and ``b`` lies on the set (step 6).

        The chord's midpoint, corrected onto the set, must stay within a quarter of the
        step allowance: a chord of length l is off a set of curvature radius R by
        l^2 / (8 R), a quarter of what a tangent predictor of length l is (l^2 / (2 R)).
        Two separate sets l apart need a correction of l / 2 and are refused.
        """
        na, nb = self.graph.nodes[a], self.graph.nodes[b]
        if abs(na["cost"] - nb["cost"]) > self._cost_tolerance():
            return False
        length = float((nb["theta"] - na["theta"]).norm())
        mid = 0.5 * (na["theta"] + nb["theta"])
        allowed = 0.25 * self.options.max_correction * length
        res = self.correct(mid, allowed, na["dimension"])
        if not res.converged or float((res.theta - mid).norm()) > allowed:
            return False
        rep = self.analyze(res.theta)
        return all(self._defect(n, rep, res.theta, 0.5 * length) is None for n in (a, b))

    def _cost_tolerance(self) -> float:
        if self.cost_tol is None:
            self.cost_tol = self.options.cost_tol
        if self.cost_tol is None:
            costs = [d["cost"] for _, d in self.graph.nodes(data=True)]
            self.cost_tol = 1e-8 * max(1.0, max(abs(c) for c in costs))
        return self.cost_tol

    def _status(self) -> str:
        if self.graph.number_of_nodes() >= self.options.n_points:
            return "n_points reached"
        if self.terminations:
            ends = [t["reason"].split(":")[0] for t in self.terminations]
            return "; ".join(dict.fromkeys(ends))
        return "exhausted: every direction leads back to explored nodes"

    def result(self) -> CriticalSet:
        """Join explorations that met (step 6) and summarize the components."""
        if self.start_report is None:
            self.start()
        assert self.start_report is not None
        status = self._status()
        cost_tol = self._cost_tolerance()
        # explorations that came within one step of each other (one may stop before the
        # other's nodes are within merge_rtol * h of a predictor): join them if the chord
        # between the two nodes lies on the set.  Every decision compares a distance with
        # a fraction of the step, never a round-off-level quantity.
        _link_explorations(self.graph, self.options.step, self.verify_link)
        seed_of = {n: i for i, n in enumerate(self.seed_nodes) if n is not None}

        def comp_key(c: set[int]) -> tuple[int, int]:
            sd = [seed_of[n] for n in c if n in seed_of]
            return (min(sd) if sd else len(self.seeds), -len(c))

        comps = sorted((set(c) for c in nx.connected_components(self.graph)), key=comp_key)
        infos = [_component_info(self.graph, c, self.seed_nodes, cost_tol) for c in comps]
        start = self.seed_nodes[0] if self.seed_nodes else None
        dimension = next((i.dimension for c, i in zip(comps, infos) if start in c), None)
        o = self.options
        tolerances = dict(self.start_report.tolerances)
        tolerances.update(
            grad_tol=self.grad_tol, rank_atol=self.tau, step=o.step, sigma_drop=o.sigma_drop,
            max_correction=o.max_correction, merge_rtol=o.merge_rtol,
            max_halvings=o.max_halvings, cost_tol=cost_tol, corrector_iters=o.corrector_iters,
            link_radius=o.step,
        )
        self.graph.graph.update(status=status, tolerances=tolerances)
        return CriticalSet(
            graph=self.graph, components=comps, component_info=infos, dimension=dimension,
            status=status, terminations=self.terminations, seed_nodes=self.seed_nodes,
            start_report=self.start_report, tolerances=tolerances,
        )

    def run(self) -> CriticalSet:
        """:meth:`step` until done, then :meth:`result`."""
        while self.step():
            pass
        return self.result()


def track_critical_set(
    space: ParameterSpace,
    theta_star: Tensor | list[Tensor],
    n_points: int = 50,
    step: float = 0.1,
    *,
    max_directions: int = 8,
    max_halvings: int = 4,
    grad_tol: float | None = None,
    tol: float = 1e-6,
    rank_rtol: float = 1e-6,
    kernel_rtol: float = 1e-6,
    min_gap: float = 1e3,
    sigma_drop: float = 0.5,
    max_correction: float = 0.5,
    merge_rtol: float = 0.5,
    corrector_iters: int = 20,
    cost_tol: float | None = None,
    hessian: str = "auto",
    dense_limit: int = DENSE_HESSIAN_LIMIT,
    n_eigs: int = 20,
    max_rounds: int = 8,
) -> CriticalSet:
    r"""Walk along the critical set :math:`\{D^\top\nabla_xC = 0\}` through ``theta_star``.

    Predictor–corrector continuation (a :class:`CriticalSetTracker` run to the end):

    1. **Node.** At a critical point :math:`\theta_i` the Hessian
       :math:`H_i = \nabla^2_\theta C(\theta_i)` is decomposed; its kernel
       :math:`T_i` (see :func:`~subriemann.analysis.critical.classify_equilibrium`)
       approximates the tangent space of the critical set.
    2. **Predictor.** :math:`\theta' = \theta_i + h\,u`, :math:`u \in T_i`
       a unit vector: the projections onto :math:`T_i` of a fixed set of
       reference directions (:math:`\pm` ``max_directions // 2`` orthonormal
       directions of the kernel at the start point, so that the exploration
       keeps consistent directions, like a grid in a chart of the set).  They
       are a fixed Gaussian matrix projected onto the kernel and
       orthonormalized, so they depend on the kernel only, not on the basis
       the eigensolver returns for it (which changes with rounding).
    3. **Corrector.** Newton on :math:`F(\theta) = D^\top\nabla_xC` with
       Jacobian :math:`H`: pseudo-inverse steps that leave out the
       :math:`\dim T_i` smallest eigen-directions of :math:`H` (minimum-norm,
       normal to the set), safeguarded by Levenberg–Marquardt damping, until
       :math:`|F| \le` ``grad_tol``.
    4. **Acceptance.** The corrected point is accepted when the corrector
       converged, moved at most ``max_correction`` :math:`h`, the rank of
       :math:`D` is unchanged and no counted singular value fell below
       ``sigma_drop`` times its value at :math:`\theta_i` (a rank change
       ahead), and the Hessian kernel has the same dimension.  Otherwise the
       step is halved, at most ``max_halvings`` times; then the branch ends
       (``"corrector failed at node i"``, ``"rank changed at node i"``,
       ``"dimension changed at node i"``).
    5. **Graph.** The accepted point becomes a node joined to
       :math:`\theta_i`, unless it lies within ``merge_rtol`` :math:`h` of an
       existing node, which is then joined instead (so branches that meet
       close loops and seeds on one component end up connected).
    6. **Links.** After the walk, two nodes of different components that lie
       within :math:`h` of each other are joined (edge ``step="link"``) when
       the chord between them lies on the set: their costs agree within
       ``cost_tol``, and the chord's midpoint, corrected onto the set, moved
       at most ``max_correction / 4`` times the chord (a chord of length
       :math:`l` is off a set of curvature radius :math:`R` by
       :math:`l^2/8R`, a quarter of a tangent predictor's :math:`l^2/2R`)
       and passes the acceptance tests of step 4 against both nodes.  Two
       separate sets :math:`l` apart would need a correction of :math:`l/2`.
       So whether two explorations are one component is decided by
       distances compared with fractions of :math:`h`, not by whether two
       walks happen to land on each other.

    Nodes are expanded breadth-first until ``n_points`` nodes exist or every
    branch ended.  Components are the connected components of the graph.

    Parameters
    ----------
    space : ParameterSpace
    theta_star : Tensor, shape=[K] or [B, K], or list of Tensor
        Start point(s), near critical points (each is first corrected onto
        the set).  Several start points may give several components.
    n_points : int
        Maximal number of nodes.
    step : float
        Predictor step :math:`h` (Euclidean, in parameter space).
    max_directions : int
        Predictor directions per node (:math:`\pm` up to ``max_directions // 2``
        reference directions; at least 2).
    max_halvings : int
        Step halvings before a branch ends.
    grad_tol : float, optional
        Corrector tolerance on :math:`|\nabla_\theta C|`; default
        :math:`10^{-10}\,\sigma_{\max}(D)\max(1, |\nabla_xC|)` at the first start point.
    tol, rank_rtol, kernel_rtol, min_gap
        As in :func:`~subriemann.analysis.critical.classify_equilibrium`.  The rank
        threshold :math:`\tau = \mathrm{rank\_rtol}\;\sigma_{\max}` is taken at the
        first start point and then **fixed**.
    sigma_drop : float
        A step is refused when a singular value counted in the rank falls
        below ``sigma_drop`` times its value at the parent (approach of a
        rank change).
    max_correction : float
        Largest corrector displacement, relative to :math:`h`.
    merge_rtol : float
        Merge distance relative to :math:`h`.
    corrector_iters : int
    cost_tol : float, optional
        Allowed cost spread on a component; default :math:`10^{-8}\max(1, |C|)`.
    hessian, dense_limit, n_eigs, max_rounds
        As in :func:`~subriemann.analysis.critical.classify_equilibrium` (``"lanczos"``:
        kernels from the deflated Lanczos runs, corrector steps by LSMR on the
        Hessian operator).

    Returns
    -------
    CriticalSet

    Raises
    ------
    ValueError
        If no start point could be corrected onto the critical set.
    """
    space = check_space(space)
    seeds = _as_seeds(space, theta_star)
    options = TrackingOptions(
        n_points=n_points, step=step, max_directions=max_directions, max_halvings=max_halvings,
        grad_tol=grad_tol, tol=tol, rank_rtol=rank_rtol, kernel_rtol=kernel_rtol,
        min_gap=min_gap, sigma_drop=sigma_drop, max_correction=max_correction,
        merge_rtol=merge_rtol, corrector_iters=corrector_iters, cost_tol=cost_tol,
        hessian=hessian, dense_limit=dense_limit, n_eigs=n_eigs, max_rounds=max_rounds,
    )
    return CriticalSetTracker(space, seeds, options).run()


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _as_seeds(space: ParameterSpace, theta_star: Any) -> list[Tensor]:
    if isinstance(theta_star, Tensor):
        if theta_star.ndim == 1:
            return [space.check_point(theta_star).detach().clone()]
        if theta_star.ndim == 2:
            if theta_star.shape[0] == 0:
                raise ValueError("theta_star holds no points")
            return [space.check_point(t).detach().clone() for t in theta_star]
        raise ValueError(
            f"theta_star must have shape ({space.dim},) or (B, {space.dim}), "
            f"got {tuple(theta_star.shape)}"
        )
    if isinstance(theta_star, (list, tuple)):
        if not theta_star:
            raise ValueError("theta_star holds no points")
        return [space.check_point(t).detach().clone() for t in theta_star]
    raise TypeError(
        f"theta_star must be a Tensor [K] or [B, K] or a list of Tensors, "
        f"got {type(theta_star).__name__}"
    )


def _frames(space: ParameterSpace, theta: Tensor, rank: int) -> Frames:
    r"""``(sigma, U, V)``: the ``rank`` leading singular triplets, :math:`V = D^\top U/\sigma`."""
    u, s = singular_state(space, theta)
    s, u = s[:rank], u[:, :rank]
    v = space.vjp(theta, u.T).T / s if rank else torch.zeros(space.dim, 0, dtype=space.dtype)
    return s.detach(), u.detach(), v.detach()


def _step_defect(
    space: ParameterSpace,
    nid: int,
    node: dict[str, Any],
    frames: Frames,
    rep: EquilibriumReport,
    theta: Tensor,
    h: float,
    sigma_drop: float,
) -> tuple[str, str] | None:
    """Why a corrected point ``theta`` (report ``rep``) may not join node ``nid``, or None.

    The rank of D and the dimension of the Hessian kernel must be those of the node, and
    no singular value counted in the rank may fall below ``sigma_drop`` times its value at
    the node.  Returns ``(code, reason)`` for the termination record.
    """
    if rep.rank != node["rank"]:
        return (
            "rank_change",
            f"rank changed at node {nid}: rank {node['rank']} -> {rep.rank} within {h:.3g}",
        )
    s_par, u_par, v_par = frames
    if s_par.numel():
        # signed singular values u_k^T D(new) v_k (frames of the parent): a
        # singular value that shrinks or passes through 0 within the step
        # (its vectors flip sign) shows as a small or negative value
        dv = space.jvp(theta, v_par.T)  # [r, QN]
        signed = (dv * u_par.T).sum(-1)
        ratio = signed / s_par
        if bool((ratio < sigma_drop).any()):
            kmin = int(torch.argmin(ratio))
            return (
                "rank_change",
                f"rank changed at node {nid}: sigma_{kmin + 1} = {float(s_par[kmin]):.3g} "
                f"goes to {float(signed[kmin]):.3g} (signed) within {h:.3g}: a rank change ahead",
            )
    if rep.dimension != node["dimension"]:
        return (
            "dimension_change",
            f"dimension changed at node {nid}: {node['dimension']} -> {rep.dimension} "
            f"within {h:.3g}",
        )
    return None


def _reference_frame(kernel_basis: Tensor, m: int) -> Tensor:
    r"""``m`` orthonormal directions spanning ``kernel_basis``, independent of that basis.

    An eigensolver returns an arbitrary orthonormal basis of a repeated eigenvalue's
    eigenspace (the Hessian kernel of a critical set of dimension > 1), and which one
    depends on rounding (the BLAS path).  Only the span, i.e. the projector
    :math:`P = BB^\top`, is geometry.  The frame is :math:`PG` for a fixed Gaussian
    :math:`G \in \mathbb{R}^{K\times m}` (seed 0), orthonormalized by the QR
    factorization with a positive diagonal, a continuous function of :math:`P`.
    """
    kdim, d = kernel_basis.shape
    m = min(m, d)
    gen = torch.Generator(device="cpu").manual_seed(0)
    g = torch.randn(kdim, m, generator=gen, dtype=kernel_basis.dtype).to(kernel_basis.device)
    q, r = torch.linalg.qr(kernel_basis @ (kernel_basis.T @ g))
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * sign


def _link_explorations(graph: nx.Graph, radius: float, verify: Callable[[int, int], bool]
                       ) -> None:
    r"""Join the components of ``graph`` that have nodes within ``radius`` of each other.

    Candidate pairs :math:`(p, q)` in different components with
    :math:`|p - q| \le` ``radius`` are tried nearest first; ``verify(p, q)`` (the ids)
    decides whether the chord between them lies on the set.  A verified pair gets an
    edge with ``step="link"``.  Pairs already in one component are skipped.
    """
    nodes = sorted(graph.nodes)
    if len(nodes) < 2:
        return
    th = torch.stack([graph.nodes[n]["theta"] for n in nodes])
    dist = torch.cdist(th, th)
    pairs = [
        (float(dist[i, j]), nodes[i], nodes[j])
        for i in range(len(nodes))
        for j in range(i + 1, len(nodes))
        if float(dist[i, j]) <= radius
    ]
    comp = {n: i for i, c in enumerate(nx.connected_components(graph)) for n in c}
    for length, a, b in sorted(pairs):
        if comp[a] == comp[b] or not verify(a, b):
            continue
        graph.add_edge(a, b, length=length, step="link")
        old, new = comp[b], comp[a]
        comp = {n: (new if c == old else c) for n, c in comp.items()}


def _component_info(
    graph: nx.Graph, comp: set[int], seed_nodes: list[int | None], cost_tol: float
) -> ComponentInfo:
    data = [graph.nodes[n] for n in sorted(comp)]
    dims = Counter(d["dimension"] for d in data)
    costs = np.array([d["cost"] for d in data])
    thetas = torch.stack([d["theta"] for d in data])
    diam = float(torch.cdist(thetas, thetas).max()) if len(data) > 1 else 0.0
    spread = float(costs.max() - costs.min())
    return ComponentInfo(
        nodes=set(comp),
        n_nodes=len(comp),
        dimension=dims.most_common(1)[0][0],
        dimensions=sorted(dims),
        dimension_consistent=len(dims) == 1,
        cost_mean=float(costs.mean()),
        cost_min=float(costs.min()),
        cost_max=float(costs.max()),
        cost_spread=spread,
        cost_constant=spread <= cost_tol,
        rank_profile=dict(Counter(d["rank"] for d in data)),
        index_values=sorted({d["index"] for d in data}),
        max_grad_norm=float(max(d["grad_norm"] for d in data)),
        seeds=[i for i, n in enumerate(seed_nodes) if n is not None and n in comp],
        diameter=diam,
    )
