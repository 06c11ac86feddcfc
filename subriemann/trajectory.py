r"""Results of a gradient flow: :class:`Trajectory`, :class:`RankChange`, :class:`FlowStatus`.

File format (``Trajectory.save``): one ``.npz`` archive holding

* the arrays ``s`` (float64), ``theta`` (``[T, K]``), ``outputs``
  (``[T, QN]``), ``cost``, ``grad_norm``, ``singular_values``
  (``[T, min(QN, K)]``), ``rank`` (int64), ``targets`` (``[QN]``), stored in
  their own dtype (so a save/load round trip is bit-exact);
* for each rank event ``i``: ``event{i}_theta``, ``event{i}_sv_before``,
  ``event{i}_sv_after``;
* ``meta``: a JSON string with ``format`` (``"subriemann.trajectory/1"``),
  ``status`` (code and message), ``metric`` (the metric's description),
  ``rank_rtol``, ``rank_tau`` (the absolute threshold :math:`\tau` used),
  ``num_samples``, ``num_outputs``, ``loss``, ``counters`` (``nfev``,
  ``n_steps``, ``n_rejected``, ``wall_time``), ``settings`` (the solver
  options) and the scalar fields of the events.

A *checkpoint* (``gradient_flow(..., checkpoint=path)``) is the same file with
the integrator state added: ``meta["integrator"]`` (flow time, proposed step,
counters, the number of regular saved points and events) and the arrays
``integrator_theta``, ``integrator_f`` (the vector field there),
``integrator_sv`` and ``integrator_sv_prev``; :meth:`Trajectory.load` reads it
as a trajectory and ignores them.

JSON floats are written with ``repr`` precision (``Infinity`` for an infinite
``max_step``), so nothing is lost: a save → load round trip is bit-exact.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Trajectory", "RankChange", "FlowStatus", "STATUS_CODES"]

FORMAT = "subriemann.trajectory/1"

STATUS_CODES = {
    "s_end_reached": "reached s_end",
    "cost_tol_reached": "cost fell below cost_tol",
    "equilibrium_reached": "equilibrium reached: |V| fell below stall_tol times its initial size",
    "rank_change": "stopped at a rank change (stop_on_rank_change=True)",
    "rank_chattering": "the flow slides along a rank-change boundary (the rank flips back and "
    "forth at the threshold tau, where the vector field is discontinuous); raise rank_rtol, "
    "use lam < 1, or treat the boundary as where the flow ends",
    "max_steps_reached": "step budget (max_steps) exhausted; resumable from a checkpoint",
    "max_time_reached": "wall-time budget (max_time) exhausted; resumable from a checkpoint",
    "nonfinite": "the vector field became NaN/inf; trajectory kept up to the last good state",
    "step_size_collapsed": "step size collapsed (near-singular vector field); trajectory kept up "
    "to the last good state",
    "interrupted": "interrupted (KeyboardInterrupt); trajectory kept up to the last good state, "
    "resumable from a checkpoint",
    "running": "still running (a checkpoint written during the flow)",
}
"""Every status code a flow can end with, and what it means."""


@dataclass
class FlowStatus:
    """Why a flow stopped: a ``code`` from :data:`STATUS_CODES` and a human ``message``."""

    code: str
    message: str = ""

    def __post_init__(self) -> None:
        if self.code not in STATUS_CODES:
            raise ValueError(f"unknown status code {self.code!r}")
        if not self.message:
            self.message = STATUS_CODES[self.code]

    @property
    def successful(self) -> bool:
        """True for the normal ends: ``s_end``, ``cost_tol``, equilibrium, requested rank stop."""
        return self.code in (
            "s_end_reached",
            "cost_tol_reached",
            "equilibrium_reached",
            "rank_change",
        )

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass
class RankChange:
    r"""A change of the numerical rank of :math:`D` along a flow.

    Attributes
    ----------
    s : float
        Flow time of the crossing (the midpoint of the final bracket), localized
        by a bracketing search (regula falsi / bisection) on :math:`\sigma_k(s) - \tau`.
    theta : Tensor, shape=[K]
        The point just after the crossing: the far end of the final bracket,
        at ``s + s_bracket / 2``.
    rank_before, rank_after : int
    singular_values_before, singular_values_after : Tensor
        Singular values of :math:`D` at the ends of the final bisection bracket.
    index : int
        :math:`k` (0-based): the singular value that crossed :math:`\tau`.
    tau : float
        The absolute rank threshold.
    s_bracket : float
        Width of the final bisection bracket in :math:`s`.
    """

    s: float
    theta: Tensor
    rank_before: int
    rank_after: int
    singular_values_before: Tensor
    singular_values_after: Tensor
    index: int
    tau: float
    s_bracket: float = 0.0

    @property
    def t(self) -> float:
        """:math:`t = 1 - e^{-s}`."""
        return -math.expm1(-self.s)


@dataclass
class Trajectory:
    r"""A gradient flow sampled at saved times.

    Attributes
    ----------
    s : Tensor, shape=[T]
        Flow time.
    theta : Tensor, shape=[T, K]
    outputs : Tensor, shape=[T, QN]
        :math:`x(s)`, sample-major.
    cost : Tensor, shape=[T]
    grad_norm : Tensor, shape=[T]
        Euclidean norm :math:`|V|` of the vector field.
    singular_values : Tensor, shape=[T, min(QN, K)]
        Of :math:`D` at each saved point, descending.
    rank : Tensor, shape=[T]
        Numerical rank: number of :math:`\sigma_i > \tau`.
    targets : Tensor, shape=[QN]
        :math:`y`.
    rank_rtol : float
    rank_tau : float
        The absolute threshold :math:`\tau` used (fixed along the flow).
    events : list of RankChange
    status : FlowStatus
    metric : dict
        The metric's description.
    num_samples, num_outputs : int
    loss : str
    counters : dict
        ``nfev``, ``n_steps``, ``n_rejected``, ``wall_time``.
    settings : dict
        The solver options.
    """

    s: Tensor
    theta: Tensor
    outputs: Tensor
    cost: Tensor
    grad_norm: Tensor
    singular_values: Tensor
    rank: Tensor
    targets: Tensor
    rank_rtol: float
    rank_tau: float
    events: list[RankChange] = field(default_factory=list)
    status: FlowStatus = field(default_factory=lambda: FlowStatus("running"))
    metric: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 0
    num_outputs: int = 0
    loss: str = ""
    counters: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    # -- derived -------------------------------------------------------------------
    @property
    def t(self) -> Tensor:
        r"""Time change :math:`t = 1 - e^{-s}` (Prop 2.4)."""
        return -torch.expm1(-self.s)

    def __len__(self) -> int:
        return int(self.s.shape[0])

    @property
    def final_theta(self) -> Tensor:
        return self.theta[-1]

    @property
    def final_cost(self) -> float:
        return float(self.cost[-1])

    def __repr__(self) -> str:
        span = (
            f"s=[{float(self.s[0]):.4g}, {float(self.s[-1]):.4g}], cost "
            f"{float(self.cost[0]):.3e} -> {float(self.cost[-1]):.3e}, "
            if len(self)
            else ""
        )
        return (
            f"Trajectory(points={len(self)}, {span}events={len(self.events)}, "
            f"status={self.status.code!r}, metric={self.metric.get('class')})"
        )

    # -- I/O -----------------------------------------------------------------------
    _ARRAYS = ("s", "theta", "outputs", "cost", "grad_norm", "singular_values", "rank", "targets")

    def meta(self) -> dict[str, Any]:
        """The JSON metadata written by :meth:`save`."""
        return {
            "format": FORMAT,
            "status": {"code": self.status.code, "message": self.status.message},
            "metric": self.metric,
            "rank_rtol": self.rank_rtol,
            "rank_tau": self.rank_tau,
            "num_samples": self.num_samples,
            "num_outputs": self.num_outputs,
            "loss": self.loss,
            "counters": self.counters,
            "settings": self.settings,
            "events": [
                {
                    "s": e.s,
                    "rank_before": e.rank_before,
                    "rank_after": e.rank_after,
                    "index": e.index,
                    "tau": e.tau,
                    "s_bracket": e.s_bracket,
                }
                for e in self.events
            ],
        }

    def save(self, path: str | Path, *, _extra: dict[str, Any] | None = None) -> Path:
        """Write the trajectory to ``path`` (``.npz``; see the module docstring).

        The file is written to a temporary name and renamed, so an
        interruption never leaves a truncated file behind.
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays: dict[str, Any] = {
            k: getattr(self, k).detach().cpu().numpy() for k in self._ARRAYS
        }
        for i, e in enumerate(self.events):
            arrays[f"event{i}_theta"] = e.theta.detach().cpu().numpy()
            arrays[f"event{i}_sv_before"] = e.singular_values_before.detach().cpu().numpy()
            arrays[f"event{i}_sv_after"] = e.singular_values_after.detach().cpu().numpy()
        meta = self.meta()
        if _extra is not None:  # checkpoint: integrator state
            meta["integrator"] = _extra.get("meta", {})
            for k, v in _extra.get("arrays", {}).items():
                arrays[f"integrator_{k}"] = v.detach().cpu().numpy()
        arrays["meta"] = np.array(json.dumps(meta, default=_json_default))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        """Read a trajectory written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no trajectory file at {path}")
        with np.load(path, allow_pickle=False) as data:
            try:
                meta = json.loads(str(data["meta"]))
            except KeyError:
                raise ValueError(f"{path} is not a subriemann trajectory (no 'meta')") from None
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: unknown trajectory format {meta.get('format')!r}")
            arrs = {k: torch.from_numpy(np.array(data[k])) for k in cls._ARRAYS}
            events = [
                RankChange(
                    s=ev["s"],
                    theta=torch.from_numpy(np.array(data[f"event{i}_theta"])),
                    rank_before=ev["rank_before"],
                    rank_after=ev["rank_after"],
                    singular_values_before=torch.from_numpy(np.array(data[f"event{i}_sv_before"])),
                    singular_values_after=torch.from_numpy(np.array(data[f"event{i}_sv_after"])),
                    index=ev["index"],
                    tau=ev["tau"],
                    s_bracket=ev.get("s_bracket", 0.0),
                )
                for i, ev in enumerate(meta["events"])
            ]
        return cls(
            **arrs,
            rank_rtol=meta["rank_rtol"],
            rank_tau=meta["rank_tau"],
            events=events,
            status=FlowStatus(meta["status"]["code"], meta["status"]["message"]),
            metric=meta["metric"],
            num_samples=meta["num_samples"],
            num_outputs=meta["num_outputs"],
            loss=meta["loss"],
            counters=meta["counters"],
            settings=meta["settings"],
        )


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} in trajectory metadata")
