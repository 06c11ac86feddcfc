r"""One cell of a sweep: one gradient flow and its analysis, as a :class:`CellResult`.

A cell builds its training problem exactly as ``subriemann run`` does
(:func:`subriemann.app.cli.build_problem`: seeded data subset, seeded
initialization), equips the metric, integrates the flow with
:func:`~subriemann.flow.gradient_flow` (checkpointing, and resuming from the
checkpoint a killed attempt left), and analyses it:

* the flow's status, cost, decay rate of :math:`C` (least-squares slope of
  :math:`-\log C`) and interpolation residual
  :math:`\max_t|x(t) - (t y + (1-t)x(0))|/|x(0) - y|`
  (:func:`subriemann.app.report.analyse_flow`);
* the rank history: initial, minimal and final numerical rank of :math:`D`,
  the number of rank events, and the codimension of the lowest stratum
  reached, :math:`(QN - r)(K - r)` for rank :math:`r` (the codimension of the
  rank-:math:`r` matrices among :math:`QN \times K` matrices; for
  :math:`r = QN - 1 < K` it is :math:`K - QN + 1`, docs/theory.md §5);
* where it ended (:func:`~subriemann.analysis.strata.classify_endpoint`) and,
  when the flow stalled (status ``"equilibrium_reached"`` or a non-global
  critical end point), the Hessian classification
  (:func:`~subriemann.analysis.classify_equilibrium`): kind, index, dimension.

A cell never raises: any error (a model file that fails, a vector field that
is not finite at the start, ...) gives a result with ``status = "failed:
<error>"`` and the cell's parameters, so the sweep goes on.
"""

from __future__ import annotations

import math
import time
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from subriemann._warnings import one_line
from subriemann.analysis.critical import classify_equilibrium
from subriemann.analysis.strata import NON_GLOBAL, classify_endpoint
from subriemann.app.config import DEFAULT_N_SAMPLES, DEFAULTS, Options, parse_metrics
from subriemann.app.datasets import BUILTIN
from subriemann.app.models import parse_spec
from subriemann.app.problem import build_problem
from subriemann.app.report import analyse_flow
from subriemann.app.sweep.config import CellSpec
from subriemann.flow import gradient_flow
from subriemann.flow.trajectory import Trajectory

__all__ = ["CellResult", "CellOutcome", "run_cell", "failed_outcome", "column_types"]


@dataclass
class CellResult:
    """One row of the sweep table (see docs/sweep.md for every column).

    ``None`` marks a value that does not exist for the cell (e.g. the decay
    rate of a failed cell, the Hessian kind of a flow that did not stall).
    """

    cell: str
    index: int
    data: str
    n_samples: int | None
    model: str
    depth: int | None
    width: int | None
    activation: str
    loss: str
    metric: str
    lam: float | None
    seed: int
    status: str
    num_parameters: int | None = None
    output_dim: int | None = None
    k_over_qn: float | None = None
    s_end: float | None = None
    s_final: float | None = None
    initial_cost: float | None = None
    final_cost: float | None = None
    cost_ratio: float | None = None
    decay_rate: float | None = None
    decay_expected: float | None = None
    interpolation_residual: float | None = None
    initial_rank: int | None = None
    min_rank: int | None = None
    final_rank: int | None = None
    full_rank: int | None = None
    rank_tau: float | None = None
    n_events: int | None = None
    lost_rank: bool | None = None
    codim_reached: int | None = None
    endpoint: str | None = None
    equilibrium_kind: str | None = None
    equilibrium_index: int | None = None
    equilibrium_dimension: int | None = None
    n_steps: int | None = None
    nfev: int | None = None
    flow_wall_time: float | None = None
    cell_wall_time: float | None = None
    resumed: bool = False
    worker: str | None = None

    @property
    def failed(self) -> bool:
        """True when the cell raised (``status`` starts with ``"failed: "``)."""
        return self.status.startswith("failed: ")


@dataclass
class CellOutcome:
    """What a cell returns: its table row and its trajectory (None when it failed)."""

    result: CellResult
    trajectory: Trajectory | None


def column_types() -> dict[str, type]:
    """Column name → Python type (``int``, ``float``, ``str``, ``bool``) of :class:`CellResult`."""
    hints = typing.get_type_hints(CellResult)
    out: dict[str, type] = {}
    for f in fields(CellResult):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        out[f.name] = args[0] if args else hints[f.name]
    return out


def _shape(cell: CellSpec) -> tuple[int | None, int | None]:
    """(depth, width) of an MLP spec; width is the largest hidden width."""
    if cell.model_file is not None:
        return None, None
    widths = parse_spec(cell.model)
    return len(widths), (max(widths) if widths else None)


def _base(cell: CellSpec) -> CellResult:
    try:
        depth, width = _shape(cell)
        lam = parse_metrics([cell.metric])[0].lam
    except ValueError:
        depth = width = lam = None
    return CellResult(
        cell=cell.cell_id, index=cell.index, data=cell.data, n_samples=cell.n_samples,
        model=cell.model, depth=depth, width=width, activation=cell.activation, loss=cell.loss,
        metric=cell.metric, lam=lam, seed=cell.seed, status="running",
        s_end=float(cell.flow["s_end"]),
    )


def failed_outcome(cell: CellSpec, err: BaseException) -> CellOutcome:
    """The outcome of a cell that raised ``err``: its parameters and ``failed: <error>``."""
    res = _base(cell)
    res.status = f"failed: {one_line(err)}"
    return CellOutcome(res, None)


def _options(cell: CellSpec) -> Options:
    f = cell.flow
    n = cell.n_samples
    if n is None and cell.data in BUILTIN:
        n = DEFAULT_N_SAMPLES
    return Options(
        model=DEFAULTS["model"] if cell.model_file else cell.model, activation=cell.activation,
        model_file=cell.model_file, data=cell.data, n_samples=n, loss=cell.loss,
        label_smoothing=0.0, metrics=[cell.metric], s_end=f["s_end"], rtol=f["rtol"],
        atol=f["atol"], rank_rtol=f["rank_rtol"], max_time=f["max_time"] or None,
        seed=cell.seed, out="", device="cpu", threads=None, progress=False, resume=False,
    )


def run_cell(cell: CellSpec, checkpoint_dir: str | Path | None = None,
             threads: int | None = 1) -> CellOutcome:
    """Run one cell: build the problem, integrate the flow, analyse it.

    Parameters
    ----------
    cell : CellSpec
    checkpoint_dir : path, optional
        The flow checkpoints to ``checkpoint_dir/<cell>.ckpt.npz`` and, when
        that file exists (an attempt was killed), continues from it; the
        checkpoint is removed once the cell is done.
    threads : int, optional
        torch CPU threads for the cell (restored afterwards); None keeps torch's setting.

    Returns
    -------
    CellOutcome
        Never raises for a bad cell: the error is in ``result.status``.
    """
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    res = _base(cell)
    ckpt = None if checkpoint_dir is None else Path(checkpoint_dir) / f"{cell.cell_id}.ckpt.npz"
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        out = CellOutcome(res, _flow(cell, res, ckpt))
    except Exception as err:  # a bad cell is recorded, never fatal for the sweep
        out = failed_outcome(cell, err)
    finally:
        torch.set_num_threads(before)
    out.result.cell_wall_time = time.perf_counter() - t0
    return out


def _flow(cell: CellSpec, res: CellResult, ckpt: Path | None) -> Trajectory:
    problem = build_problem(_options(cell))
    space = problem.space
    res.num_parameters, res.output_dim = int(space.dim), int(space.output_dim)
    res.k_over_qn = space.dim / space.output_dim
    ms = parse_metrics([cell.metric])[0]
    space.equip_with_metric(ms.factory, rank_rtol=cell.flow["rank_rtol"], **ms.kwargs)
    f = cell.flow
    if ckpt is not None:
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        res.resumed = ckpt.is_file()
    traj = gradient_flow(
        space, problem.theta0, f["s_end"], rtol=f["rtol"], atol=f["atol"],
        max_time=f["max_time"] or None, max_steps=f["max_steps"] or None,
        min_saves=f["min_saves"], checkpoint=ckpt, checkpoint_every=f["checkpoint_every"],
        resume=ckpt,
    )
    assert not isinstance(traj, list)
    _analyse(cell, res, traj, space)
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return traj


def _analyse(cell: CellSpec, res: CellResult, traj: Trajectory, space: Any) -> None:
    entry, _ = analyse_flow(traj, None, name=cell.cell_id, lam=res.lam, deviation=False)
    rank = entry["rank"]
    decay = entry["decay_rate"] or {}
    k, qn = res.num_parameters or 0, res.output_dim or 0
    res.status = traj.status.code
    res.s_final = entry["s_final"]
    res.initial_cost, res.final_cost = entry["initial_cost"], entry["final_cost"]
    res.cost_ratio = entry["cost_ratio"]
    res.decay_rate, res.decay_expected = decay.get("rate"), decay.get("expected")
    res.interpolation_residual = entry["interpolation_residual"]
    res.initial_rank, res.min_rank = rank["initial"], rank["min"]
    res.final_rank, res.full_rank, res.rank_tau = rank["final"], rank["full"], rank["tau"]
    res.n_events = len(entry["rank_events"])
    res.lost_rank = rank["min"] < rank["initial"]
    res.codim_reached = (qn - rank["min"]) * (k - rank["min"])
    res.n_steps, res.nfev, res.flow_wall_time = entry["n_steps"], entry["nfev"], entry["wall_time"]
    end = classify_endpoint(traj, space)
    res.endpoint = end.label
    if cell.classify and (traj.status.code == "equilibrium_reached" or end.label == NON_GLOBAL):
        rep = classify_equilibrium(space, traj.final_theta.to(space.dtype),
                                   rank_atol=float(traj.rank_tau) or None)
        res.equilibrium_kind, res.equilibrium_index = rep.kind, int(rep.index)
        res.equilibrium_dimension = int(rep.dimension)
    for name in ("decay_rate", "decay_expected", "interpolation_residual", "cost_ratio"):
        v = getattr(res, name)
        if v is not None and not math.isfinite(v):
            setattr(res, name, None)
