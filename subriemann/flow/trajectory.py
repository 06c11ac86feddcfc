r"""Results of a gradient flow: :class:`Trajectory`, :class:`RankChange`, :class:`FlowStatus`.

File format (``Trajectory.save``): one ``.npz`` archive holding

* the arrays ``s`` (float64), ``theta`` (``[T, K]``), ``outputs``
  (``[T, QN]``), ``cost``, ``grad_norm``, ``singular_values``
  (``[T, min(QN, K)]``), ``rank`` (int64), ``targets`` (``[QN]``), stored in
  their own dtype (so a save/load round trip is bit-exact);
* for each rank event ``i``: ``event{i}_theta``, ``event{i}_sv_before``,
  ``event{i}_sv_after``;
* ``meta``: a JSON string with ``format`` (``"subriemann.flow.trajectory/1"``),
  ``status`` (code and message), ``metric`` (the metric's description),
  ``rank_rtol``, ``rank_tau`` (the absolute threshold :math:`\tau` used),
  ``num_samples``, ``num_outputs``, ``loss``, ``counters`` (``nfev``,
  ``n_steps``, ``n_rejected``, ``wall_time``, ``rank_every``, ``monitor_time``,
  ``n_spectra``), ``settings`` (the solver
  options), ``problem`` (the fingerprint of the problem, see
  :func:`subriemann.flow.checkpoint.problem_fingerprint`) and the scalar
  fields of the events.

A name without ``.npz`` gets it appended (``"run"`` and ``"run.npz"`` are
the same file for :meth:`Trajectory.save`, :meth:`Trajectory.load` and the
``checkpoint``/``resume`` arguments of :func:`~subriemann.gradient_flow`).
Writes are atomic (temporary file, ``fsync``, ``os.replace``).  A damaged
file raises a one-line ``ValueError`` naming the file and the problem.

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
import os
import tempfile
import zipfile
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["Trajectory", "RankChange", "Segment", "FlowStatus", "STATUS_CODES", "npz_path"]

FORMAT = "subriemann.flow.trajectory/1"

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
    s_noise : float
        Width in :math:`s` of the band where :math:`|\sigma_k - \tau|` is within the
        rounding of the computed singular values (:math:`2\delta/|\sigma_k'|`, with
        :math:`\delta = \epsilon\sigma_{\max}^2/2\tau`): the crossing is known to
        about ``max(s_bracket, s_noise)``, and the search stops once the bracket is
        inside the band.
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
    s_noise: float = 0.0

    @property
    def t(self) -> float:
        """:math:`t = 1 - e^{-s}`."""
        return -math.expm1(-self.s)


@dataclass(frozen=True)
class Segment:
    r"""A stretch of a flow on which direction ``index`` is filtered or dropped.

    ``kind`` is ``"filtered"`` (:math:`\tau < \sigma_k < b`: the smooth
    spectral filter of :mod:`subriemann.flow.continuation` weighs its term
    by :math:`w < 1`) or ``"dropped"`` (:math:`\sigma_k \le \tau`: the
    term is left out, as by the pseudo-inverse).  ``s_start``/``s_end`` are
    the first and last accepted states of the stretch, ``max_deviation`` the
    largest relative deviation :math:`|F - F_\tau|/|F_\tau|` of the vector
    field from the exact thresholded one seen there, ``tau`` and ``band_top``
    the band :math:`[\tau, b]` at the start.
    """

    index: int
    kind: str
    s_start: float
    s_end: float
    max_deviation: float
    tau: float
    band_top: float

    def __str__(self) -> str:
        dev = f" (field deviation <= {self.max_deviation:.2g})" if self.kind == "filtered" else ""
        return (f"direction {self.index + 1} {self.kind} from s = {self.s_start:.6g} "
                f"to {self.s_end:.6g}{dev}")


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
        ``nfev``, ``n_steps``, ``n_rejected``, ``wall_time``, ``rank_every``
        (the monitor's cadence as resolved, see ``FlowOptions.rank_every``),
        ``monitor_time`` (seconds of ``wall_time`` in the rank monitor: every
        spectrum of :math:`D` and the sub-steps that locate rank events) and
        ``n_spectra`` (the spectra computed).  All add up across a resume.
    settings : dict
        The solver options.
    problem : dict
        The fingerprint of the problem the flow solved (see
        :func:`subriemann.flow.checkpoint.problem_fingerprint`): a short hash
        per ingredient (model, parameter layout, initial point, inputs,
        targets, loss, metric).  Empty for a trajectory built by hand.
    segments : list of Segment
        The continuation through rank loss: the stretches on which a
        direction was filtered or dropped (:mod:`subriemann.flow.continuation`).
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
    problem: dict[str, str] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)

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
            "problem": self.problem,
            "events": [
                {
                    "s": e.s,
                    "rank_before": e.rank_before,
                    "rank_after": e.rank_after,
                    "index": e.index,
                    "tau": e.tau,
                    "s_bracket": e.s_bracket,
                    "s_noise": e.s_noise,
                }
                for e in self.events
            ],
            "segments": [list(astuple(g)) for g in self.segments],
        }

    def save(self, path: str | Path, *, _extra: dict[str, Any] | None = None) -> Path:
        """Write the trajectory to ``path`` (``.npz``; see the module docstring).

        ``".npz"`` is appended to a name without it (:func:`npz_path`).  The
        file is written to a temporary file in the same folder, flushed to
        disk and renamed over ``path`` (``os.replace``), so a kill at any
        moment leaves either the previous file or the new one.  Returns the
        path written.
        """
        path = npz_path(path)
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
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        """Read a trajectory written by :meth:`save` (``".npz"`` may be left out).

        Raises
        ------
        FileNotFoundError
            When there is no such file.
        ValueError
            When the file is not a trajectory or is damaged (empty, truncated,
            a bare ``.npy``, a missing array or metadata key, arrays whose row
            counts disagree); the message names the file and the problem.
        """
        path = existing_npz(path)
        if not path.is_file():
            raise FileNotFoundError(f"no trajectory file at {path}")
        with open_npz(path) as data:
            meta = read_meta(data, path)
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path}: unknown trajectory format {meta.get('format')!r}")
            arrs = {k: read_array(data, k, path) for k in cls._ARRAYS}
            try:
                events = [
                    RankChange(
                        s=ev["s"],
                        theta=read_array(data, f"event{i}_theta", path),
                        rank_before=ev["rank_before"],
                        rank_after=ev["rank_after"],
                        singular_values_before=read_array(data, f"event{i}_sv_before", path),
                        singular_values_after=read_array(data, f"event{i}_sv_after", path),
                        index=ev["index"],
                        tau=ev["tau"],
                        s_bracket=ev.get("s_bracket", 0.0),
                        s_noise=ev.get("s_noise", 0.0),
                    )
                    for i, ev in enumerate(meta["events"])
                ]
                traj = cls(
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
                    problem=meta.get("problem", {}),
                    segments=[Segment(*g) for g in meta.get("segments", [])],
                )
            except KeyError as err:
                raise ValueError(f"{path}: metadata key {err} missing") from None
            except (TypeError, ValueError) as err:
                raise ValueError(f"{path}: bad metadata ({err})") from None
        _check_rows(traj, path)
        return traj


def npz_path(path: str | Path) -> Path:
    """``path`` with ``".npz"`` appended unless it ends so: ``"run"`` and ``"run.npz"`` agree.

    Examples
    --------
    >>> npz_path("run"), npz_path("run.npz"), npz_path("x.ckpt")
    (PosixPath('run.npz'), PosixPath('run.npz'), PosixPath('x.ckpt.npz'))
    """
    path = Path(path)
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def existing_npz(path: str | Path) -> Path:
    """:func:`npz_path`, or ``path`` itself when only it exists (a file saved by other means)."""
    norm = npz_path(path)
    raw = Path(path)
    return raw if not norm.exists() and raw.is_file() else norm


def open_npz(path: Path) -> Any:
    """``np.load`` of an ``.npz`` archive; a ValueError naming ``path`` when it is not one."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (not a readable .npz archive)")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        msg = " ".join(str(err).split())
        raise ValueError(f"{path}: not a readable .npz archive ({msg})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: holds a single .npy array, not a .npz archive")
    return data


def read_array(data: Any, key: str, path: Path) -> Tensor:
    """One array of an open archive as a tensor; a ValueError naming the file when absent."""
    if key not in data.files:
        raise ValueError(f"{path}: array {key!r} missing")
    try:
        return torch.from_numpy(np.array(data[key]))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, TypeError) as err:
        msg = " ".join(str(err).split())
        raise ValueError(f"{path}: array {key!r} is damaged ({msg})") from None


def read_meta(data: Any, path: Path) -> dict[str, Any]:
    """The JSON ``meta`` entry of an open archive, validated as a dict."""
    if "meta" not in data.files:
        raise ValueError(f"{path} is not a subriemann trajectory (no 'meta')")
    try:
        text = str(data["meta"])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        msg = " ".join(str(err).split())
        raise ValueError(f"{path}: the 'meta' entry is damaged ({msg})") from None
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise ValueError(f"{path}: the 'meta' entry is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the 'meta' entry is not a JSON object")
    return meta


def _check_rows(traj: Trajectory, path: Path) -> None:
    """Every per-point array has one row per saved time; shapes agree with each other."""
    rows = {k: int(getattr(traj, k).shape[0]) if getattr(traj, k).ndim else -1
            for k in Trajectory._ARRAYS if k != "targets"}
    if len(set(rows.values())) != 1:
        counts = ", ".join(f"{k}: {n}" for k, n in rows.items())
        raise ValueError(f"{path}: inconsistent row counts ({counts})")
    dims = {"s": 1, "theta": 2, "outputs": 2, "cost": 1, "grad_norm": 1,
            "singular_values": 2, "rank": 1, "targets": 1}
    bad = [k for k, d in dims.items() if getattr(traj, k).ndim != d]
    if bad:
        raise ValueError(f"{path}: arrays with the wrong number of dimensions: {', '.join(bad)}")
    if traj.outputs.shape[1] != traj.targets.shape[0]:
        raise ValueError(f"{path}: outputs have {traj.outputs.shape[1]} columns but targets "
                         f"{traj.targets.shape[0]} entries")
    k = traj.theta.shape[1]
    for i, e in enumerate(traj.events):
        if e.theta.shape != (k,):
            raise ValueError(f"{path}: event{i}_theta has shape {tuple(e.theta.shape)}, not ({k},)")


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
