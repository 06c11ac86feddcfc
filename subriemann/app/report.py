r"""The report folder of ``subriemann run``: ``summary.json``, trajectories, figures, HTML page.

Layout of a report folder ``DIR/``::

    DIR/summary.json              the numbers (schema: SUMMARY_SCHEMA, docs/report.md)
    DIR/report.html               one self-contained page: tables, verdicts, figures (base64 PNG)
    DIR/figures/*.png             four figures (subriemann.app.plots): for MSE cost.png,
                                  output_path.png, singular_values.png,
                                  interpolation_deviation.png; for cross-entropy cost.png,
                                  limit_distance.png, singular_values.png, hyperplane_sums.png
    DIR/flows/<name>.npz          each trajectory (Trajectory.save format)
    DIR/flows/<name>.ckpt.npz     checkpoint of a flow that was interrupted (resumable)

:func:`analyse_flow` computes the per-flow numbers and verdicts
(:mod:`subriemann.app.verdicts`), :func:`build_summary` assembles
``summary.json``, :func:`validate_summary` checks it against
:data:`SUMMARY_SCHEMA` (a JSON-schema dict; the validator handles the subset
the schema uses, so no extra dependency is needed), :func:`write_html` writes
the page and :func:`format_table` / :func:`format_verdicts` the console text.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import html
import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from subriemann.analysis.cross_entropy import (
    HyperplaneSums,
    LimitError,
    asymptotic_rate,
    hyperplane_sums,
    limit_error,
    minimum_cost,
)
from subriemann.analysis.interpolation import (
    InterpolationDeviation,
    decay_rate,
    interpolation_deviation,
    linear_interpolation_residual,
)
from subriemann.app.plots import metric_color
from subriemann.app.verdicts import (
    OUTCOMES,
    deviation,
    flow_verdicts,
    is_adapted,
    verdict_line,
)
from subriemann.flow.trajectory import STATUS_CODES, Trajectory

__all__ = [
    "FORMAT",
    "SUMMARY_SCHEMA",
    "REFERENCES",
    "SchemaError",
    "validate_summary",
    "versions",
    "analyse_flow",
    "build_summary",
    "write_summary",
    "format_table",
    "format_verdicts",
    "write_html",
    "subsample",
]

FORMAT = "subriemann.app.report/2"
"""Value of ``summary.json["format"]`` (2: verdicts, cross-entropy numbers, captions)."""

REFERENCES = (
    ("CM24", "T. Chen and P. Muñoz Ewald", "Gradient flow in parameter space is equivalent to "
     "linear interpolation in output space", "2408.01517"),
    ("Che23", "T. Chen", "Global L² minimization at uniform exponential rate via geometrically "
     "adapted gradient descent in Deep Learning", "2311.15487"),
    ("Jak25", "Y. Jakhmola", "Gradient Flow Convergence Guarantee for General Neural Network "
     "Architectures", "2509.23887"),
)
"""(key, authors, title, arXiv number) of the papers the report cites."""

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}
_BOOL = {"type": "boolean"}


def _obj(props: dict[str, Any], *, extra: bool = False, nullable: bool = False) -> dict[str, Any]:
    return {
        "type": ["object", "null"] if nullable else "object",
        "required": list(props),
        "properties": props,
        "additionalProperties": extra,
    }


_EVENT = _obj({
    "s": _NUM,
    "t": _NUM,
    "rank_before": _INT,
    "rank_after": _INT,
    "index": _INT,
    "tau": _NUM,
    "sigma_before": {"type": "array", "items": _NUM},
    "sigma_after": {"type": "array", "items": _NUM},
})

_VERDICT = _obj({
    "check": _STR,
    "prediction": _STR,
    "section": _STR,
    "measured": _NUM_OR_NULL,
    "expected": _NUM_OR_NULL,
    "tolerance": _NUM_OR_NULL,
    "outcome": {"type": "string", "enum": list(OUTCOMES)},
    "note": _STR,
    "relation": {"type": "string", "enum": ["=", "<="]},
})

_FLOW_CE = _obj({
    "minimum_cost": _NUM,
    "mu": _NUM,
    "finite_limit": _BOOL,
    "hyperplane_drift": _NUM,
    "total_drift": _NUM,
    "limit_distance_initial": _NUM_OR_NULL,
    "limit_distance_final": _NUM_OR_NULL,
    "minimizer_distance_final": _NUM_OR_NULL,
    "divergence_coordinate_final": _NUM_OR_NULL,
}, nullable=True)

_FLOW = _obj({
    "name": _STR,
    "spec": _STR,
    "label": _STR,
    "lam": _NUM_OR_NULL,
    "metric": {"type": "object"},
    "status": _obj({"code": {"type": "string", "enum": sorted(STATUS_CODES)}, "message": _STR}),
    "completed": _BOOL,
    "s_end": _NUM,
    "s_final": _NUM,
    "points": _INT,
    "initial_cost": _NUM,
    "final_cost": _NUM,
    "cost_ratio": _NUM_OR_NULL,
    "decay_rate": _obj({
        "rate": _NUM,
        "expected": _NUM_OR_NULL,
        "relative_error": _NUM_OR_NULL,
        "s_min": _NUM,
        "s_max": _NUM,
        "points": _INT,
        "minimum_cost": _NUM,
    }, nullable=True),
    "interpolation_residual": _NUM_OR_NULL,
    "deviation": _obj({
        "max_z": _NUM,
        "max_z_range": _NUM,
        "max_z_perp": _NUM,
        "propagator_error": _NUM_OR_NULL,
        "rank_loss_fraction": _NUM_OR_NULL,
        "applies": _BOOL,
        "points": _INT,
    }, nullable=True),
    "cross_entropy": _FLOW_CE,
    "rank": _obj({
        "initial": _INT,
        "final": _INT,
        "min": _INT,
        "max": _INT,
        "full": _INT,
        "tau": _NUM,
        "rtol": _NUM,
    }),
    "rank_events": {"type": "array", "items": _EVENT},
    "verdicts": {"type": "array", "items": _VERDICT},
    "wall_time": _NUM,
    "nfev": _INT,
    "n_steps": _INT,
    "n_rejected": _INT,
    "monitor_time": _NUM,
    "n_spectra": _INT,
    "trajectory": _STR_OR_NULL,
    "checkpoint": _STR_OR_NULL,
})

SUMMARY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "subriemann run: summary.json",
    **_obj({
        "format": {"type": "string", "enum": [FORMAT]},
        "created": _STR,
        "complete": _BOOL,
        "command": _STR,
        "settings": {
            "type": "object",
            "required": [
                "model", "activation", "model_file", "data", "n_samples", "loss",
                "label_smoothing", "metrics", "s_end", "rtol", "atol", "rank_rtol", "max_time",
                "seed", "device",
            ],
            "properties": {
                "seed": {"type": "integer"},
                "metrics": {"type": "array", "items": _STR},
                "s_end": _NUM,
                "rtol": _NUM,
                "atol": _NUM,
                "rank_rtol": _NUM,
                "max_time": _NUM_OR_NULL,
            },
        },
        "versions": {
            "type": "object",
            "required": ["subriemann", "torch", "geomstats", "numpy", "python"],
            "additionalProperties": _STR_OR_NULL,
        },
        "problem": _obj({
            "data": _STR,
            "description": _STR,
            "task": {"type": "string", "enum": ["regression", "classification"]},
            "model": _STR,
            "loss": _STR,
            "num_samples": _INT,
            "num_outputs": _INT,
            "num_parameters": _INT,
            "output_dim": _INT,
            "overparametrized": _BOOL,
            "initial_cost": _NUM,
            "sigma_max": _NUM,
            "sigma_min": _NUM,
            "initial_rank": _INT,
            "tau": _NUM,
            "cross_entropy": _obj({
                "minimum_cost": _NUM,
                "mu": _NUM,
                "finite_limit": _BOOL,
                "limit_distance": _NUM_OR_NULL,
            }, nullable=True),
        }),
        "flows": {"type": "array", "items": _FLOW},
        "figures": {"type": "object", "additionalProperties": _STR},
        "captions": {
            "type": "object",
            "additionalProperties": _obj({"title": _STR, "caption": _STR, "wide": _BOOL}),
        },
        "html": _STR_OR_NULL,
    }),
}
"""JSON schema (draft 2020-12) of ``summary.json``; see ``docs/report.md`` for the meaning."""


# -- validation ----------------------------------------------------------------------
class SchemaError(ValueError):
    """``summary.json`` does not follow :data:`SUMMARY_SCHEMA`."""


_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    and math.isfinite(v),
}


def _validate_scalar(value: Any, schema: Mapping[str, Any], where: str) -> None:
    """``type``, ``enum`` and ``minimum``."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[t](value) for t in types):
            raise SchemaError(f"{where}: expected {' or '.join(types)}, got {value!r:.80}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        raise SchemaError(f"{where}: {value} < {schema['minimum']}")


def _validate_object(value: dict[str, Any], schema: Mapping[str, Any], where: str) -> None:
    """``required``, ``properties`` and ``additionalProperties``."""
    for key in schema.get("required", ()):
        if key not in value:
            raise SchemaError(f"{where}: missing key {key!r}")
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, v in value.items():
        if key in props:
            _validate(v, props[key], f"{where}.{key}")
        elif extra is False:
            raise SchemaError(f"{where}: unexpected key {key!r}")
        elif isinstance(extra, dict):
            _validate(v, extra, f"{where}.{key}")


def _validate(value: Any, schema: Mapping[str, Any], where: str) -> None:
    _validate_scalar(value, schema, where)
    if isinstance(value, dict):
        _validate_object(value, schema, where)
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            _validate(v, schema["items"], f"{where}[{i}]")


def validate_summary(summary: Mapping[str, Any]) -> None:
    """Check ``summary`` against :data:`SUMMARY_SCHEMA`.

    Implements the keywords the schema uses (``type``, ``enum``, ``minimum``,
    ``required``, ``properties``, ``additionalProperties``, ``items``); numbers
    must be finite (JSON has no NaN).

    Raises
    ------
    SchemaError
        Naming the first offending key path, e.g. ``summary.flows[1].rank.final``.
    """
    _validate(summary, SUMMARY_SCHEMA, "summary")


# -- numbers -----------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    """Versions of subriemann, torch, geomstats, numpy, python, matplotlib, scikit-learn."""
    import geomstats
    import matplotlib

    import subriemann

    try:
        import sklearn

        skl: str | None = sklearn.__version__
    except ImportError:
        skl = None
    return {
        "subriemann": subriemann.__version__,
        "torch": torch.__version__,
        "geomstats": geomstats.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "matplotlib": matplotlib.__version__,
        "scikit-learn": skl,
        "platform": platform.platform(),
    }


def _finite(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _take(traj: Trajectory, idx: torch.Tensor) -> Trajectory:
    """The saved points ``idx`` of ``traj`` (events and segments kept as they are)."""
    return dataclasses.replace(
        traj,
        s=traj.s[idx], theta=traj.theta[idx], outputs=traj.outputs[idx], cost=traj.cost[idx],
        grad_norm=traj.grad_norm[idx], singular_values=traj.singular_values[idx],
        rank=traj.rank[idx],
    )


def subsample(traj: Trajectory, max_points: int) -> Trajectory:
    """At most ``max_points`` saved points of ``traj``, evenly spread, first and last kept."""
    n = len(traj)
    if n <= max_points:
        return traj
    idx = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))
    return _take(traj, torch.from_numpy(idx))


def _deviation(
    traj: Trajectory, space: Any, max_points: int, rank_loss: bool
) -> tuple[InterpolationDeviation, dict[str, Any], float | None]:
    """The interpolation deviation on at most ``max_points`` points, its entry, and the
    estimated quadrature error of the propagator prediction (adapted flows with rank loss).

    The propagator :math:`U` is integrated by a second-order rule along the saved
    points, so its error on every second point is about 4 times larger:
    Richardson's estimate of the error on all of them is ``|e(2h) - e(h)|/3``,
    doubled for safety.
    """
    sub = subsample(traj, max_points)
    dev = interpolation_deviation(sub, space)
    scale = float((sub.outputs[0] - sub.targets).norm()) or 1.0
    norms = dev.norms
    entry = {
        "max_z": float(norms["z"].max()) / scale,
        "max_z_range": float(norms["z_range"].max()) / scale,
        "max_z_perp": float(norms["z_perp"].max()) / scale,
        "propagator_error": _finite(dev.propagator_error),
        "rank_loss_fraction": _finite(dev.rank_loss_fraction),
        "applies": bool(dev.applies),
        "points": len(sub),
    }
    quadrature = None
    if rank_loss and dev.applies and len(sub) >= 5:
        half = torch.arange(0, len(sub), 2)
        if int(half[-1]) != len(sub) - 1:
            half = torch.cat([half, torch.tensor([len(sub) - 1])])
        coarse = interpolation_deviation(_take(sub, half), space).propagator_error
        quadrature = _finite(2.0 * abs(coarse - dev.propagator_error) / 3.0)
    return dev, entry, quadrature


def _cross_entropy(traj: Trajectory) -> tuple[dict[str, Any], HyperplaneSums, LimitError]:
    """The ``cross_entropy`` entry of a flow (docs/theory.md §6) and what it came from."""
    sums, dist = hyperplane_sums(traj), limit_error(traj)
    y = traj.targets.reshape(int(traj.num_samples), int(traj.num_outputs))
    entry = {
        "minimum_cost": minimum_cost(y) + 0.0,  # never -0.0
        "mu": asymptotic_rate(y),
        "finite_limit": bool(dist.finite),
        "hyperplane_drift": sums.max_drift,
        "total_drift": sums.total_drift,
        "limit_distance_initial": None if dist.distance is None else float(dist.distance[0]),
        "limit_distance_final": dist.final,
        "minimizer_distance_final": None if dist.minimizer_distance is None
        else float(dist.minimizer_distance[-1]),
        "divergence_coordinate_final": None if dist.divergence_coordinate is None
        else float(dist.divergence_coordinate[-1]),
    }
    return entry, sums, dist


def _decay(traj: Trajectory, predicted: bool) -> dict[str, Any] | None:
    r"""The ``decay_rate`` entry: slope of :math:`-\log(C - C^*)`, or None.

    :math:`C^* = 0` for MSE and :math:`\sum_j H(y_j)` for cross-entropy, so that
    the rate is the slope of what figure (a) draws.  ``expected`` is 2 only where
    the theory predicts it (``predicted``: MSE, :math:`\lambda = 1`, rank
    :math:`QN`); else None.  For cross-entropy points within round-off of
    :math:`C^*` (:math:`10^3\epsilon C^*`) are left out.
    """
    cmin, floor = 0.0, 1e-24
    if traj.loss == "cross_entropy":
        y = traj.targets.reshape(int(traj.num_samples), int(traj.num_outputs))
        cmin = minimum_cost(y) + 0.0  # never -0.0
        gap0 = float(traj.cost[0]) - cmin
        eps = float(torch.finfo(torch.float64).eps)
        floor = max(floor, 1e3 * eps * cmin / gap0) if gap0 > 0 else floor
    try:
        fit = decay_rate(dataclasses.replace(traj, cost=traj.cost - cmin), floor=floor)
    except ValueError:  # fewer than 2 points above the floor
        return None
    expected = 2.0 if predicted else None
    d = {
        "rate": fit.rate, "expected": expected,
        "relative_error": abs(fit.rate - 2.0) / 2.0 if predicted else None,
        "s_min": fit.s_min, "s_max": fit.s_max, "points": fit.points, "minimum_cost": cmin,
    }
    if not all(v is None or math.isfinite(v) for v in d.values()):
        return None
    return d


def _rank(traj: Trajectory) -> dict[str, Any]:
    ranks = [int(r) for r in traj.rank]
    full = int(traj.singular_values.shape[1]) if traj.singular_values.ndim == 2 else 0
    return {
        "initial": ranks[0] if ranks else 0,
        "final": ranks[-1] if ranks else 0,
        "min": min(ranks) if ranks else 0,
        "max": max(ranks) if ranks else 0,
        "full": full,
        "tau": float(traj.rank_tau),
        "rtol": float(traj.rank_rtol),
    }


def _events(traj: Trajectory) -> list[dict[str, Any]]:
    return [
        {
            "s": float(e.s),
            "t": float(e.t),
            "rank_before": int(e.rank_before),
            "rank_after": int(e.rank_after),
            "index": int(e.index),
            "tau": float(e.tau),
            "sigma_before": [float(v) for v in e.singular_values_before],
            "sigma_after": [float(v) for v in e.singular_values_after],
        }
        for e in traj.events
    ]


def analyse_flow(
    traj: Trajectory,
    space: Any = None,
    *,
    name: str = "flow",
    spec: str = "",
    label: str = "",
    lam: float | None = None,
    trajectory_file: str | None = None,
    checkpoint_file: str | None = None,
    deviation: bool = True,
    max_points: int = 400,
) -> tuple[dict[str, Any], InterpolationDeviation | None]:
    r"""The ``summary.json`` entry of one flow, and its interpolation deviation.

    Parameters
    ----------
    traj : Trajectory
    space : ParameterSpace, optional
        Needed for the deviation split (it recomputes :math:`D` along the path).
    name, spec, label : str
        File name, the ``--metrics`` item, the legend label.
    lam : float, optional
        :math:`\lambda` of the flow when it has one.
    trajectory_file, checkpoint_file : str, optional
        Paths relative to the report folder.
    deviation : bool
        Compute :func:`~subriemann.analysis.interpolation_deviation` (MSE only;
        on at most ``max_points`` points of the path).

    Returns
    -------
    entry : dict
        See ``SUMMARY_SCHEMA["properties"]["flows"]["items"]``; its ``verdicts``
        are :func:`subriemann.app.verdicts.flow_verdicts`.
    dev : InterpolationDeviation or None
    """
    mse, ce = traj.loss == "mse", traj.loss == "cross_entropy" and len(traj) > 0
    rank = _rank(traj)
    full_rank = rank["min"] == traj.outputs.shape[1]
    c0, c1 = float(traj.cost[0]), float(traj.cost[-1])
    dev, dev_d, quadrature = None, None, None
    if deviation and mse and space is not None and len(traj) >= 2:
        dev, dev_d, quadrature = _deviation(traj, space, max_points, not full_rank)
    ce_d, sums, dist = _cross_entropy(traj) if ce else (None, None, None)
    cnt = traj.counters
    entry = {
        "name": name, "spec": spec, "label": label or name, "lam": lam,
        "metric": json.loads(json.dumps(traj.metric, default=str)),
        "status": {"code": traj.status.code, "message": traj.status.message},
        "completed": traj.status.code not in ("interrupted", "running"),
        "s_end": float(traj.settings.get("s_end", float(traj.s[-1]))),
        "s_final": float(traj.s[-1]),
        "points": len(traj),
        "initial_cost": c0,
        "final_cost": c1,
        "cost_ratio": c1 / c0 if c0 > 0 else None,
        "decay_rate": _decay(traj, mse and full_rank and is_adapted(traj, lam)),
        "interpolation_residual": _finite(linear_interpolation_residual(traj))
        if mse and len(traj) else None,
        "deviation": dev_d,
        "cross_entropy": ce_d,
        "rank": rank,
        "rank_events": _events(traj),
        "wall_time": float(cnt.get("wall_time", 0.0)),
        "nfev": int(cnt.get("nfev", 0)),
        "n_steps": int(cnt.get("n_steps", 0)),
        "n_rejected": int(cnt.get("n_rejected", 0)),
        "monitor_time": float(cnt.get("monitor_time", 0.0)),
        "n_spectra": int(cnt.get("n_spectra", 0)),
        "trajectory": trajectory_file,
        "checkpoint": checkpoint_file,
    }
    verdicts = flow_verdicts(traj, entry, sums=sums, dist=dist, quadrature=quadrature)
    entry["verdicts"] = [v.as_dict() for v in verdicts]
    return entry, dev


def _clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples lists, numpy scalars Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (bool, str, type(None))):
        return obj
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return _finite(obj)
    return str(obj)


def build_summary(
    *,
    settings: Mapping[str, Any],
    problem: Mapping[str, Any],
    flows: Sequence[Mapping[str, Any]],
    figures: Mapping[str, str] | None = None,
    complete: bool = True,
    html_file: str | None = None,
    command: str = "subriemann run",
    captions: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble ``summary.json`` (see :data:`SUMMARY_SCHEMA`); paths relative to the folder.

    ``captions``: figure key → ``{"title", "caption", "wide"}``, as written with
    the figures (:class:`subriemann.app.plots.ReportFigure`).
    """
    summary = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "complete": bool(complete),
        "command": command,
        "settings": dict(settings),
        "versions": versions(),
        "problem": dict(problem),
        "flows": [dict(f) for f in flows],
        "figures": dict(figures or {}),
        "captions": {k: dict(v) for k, v in (captions or {}).items()},
        "html": html_file,
    }
    return _clean(summary)


def write_summary(folder: str | Path, summary: Mapping[str, Any]) -> Path:
    """Validate and write ``folder/summary.json`` (atomically: temporary file, then rename)."""
    validate_summary(summary)
    path = Path(folder) / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


# -- tables -----------------------------------------------------------------------------
_COLUMNS = (
    ("flow", "flow"),
    ("lam", "λ"),
    ("status", "status"),
    ("s", "s reached"),
    ("cost", "C(0) → C(s)"),
    ("rate", "decay rate"),
    ("residual", "interp. residual"),
    ("rank", "rank"),
    ("events", "events"),
    ("steps", "steps"),
    ("nfev", "nfev"),
    ("wall", "wall time"),
    ("monitor", "monitor (spectra)"),
)


def _row(f: Mapping[str, Any]) -> dict[str, str]:
    rk = f["rank"]
    rate = f["decay_rate"]
    res = f["interpolation_residual"]
    return {
        "flow": f["name"],
        "lam": "–" if f["lam"] is None else f"{f['lam']:g}",
        "status": f["status"]["code"],
        "s": f"{f['s_final']:.3g} / {f['s_end']:.3g}",
        "cost": f"{f['initial_cost']:.3g} → {f['final_cost']:.3g}",
        "rate": "–" if rate is None else f"{rate['rate']:.4g}",
        "residual": "–" if res is None else f"{res:.2e}",
        "rank": (f"{rk['min']}" if rk["min"] == rk["max"] else f"{rk['min']}–{rk['max']}")
        + f" / {rk['full']}",
        "events": str(len(f["rank_events"])),
        "steps": str(f["n_steps"]),
        "nfev": str(f["nfev"]),
        "wall": f"{f['wall_time']:.1f} s",
        "monitor": f"{f.get('monitor_time', 0.0):.1f} s ({f.get('n_spectra', 0)})",
    }


def format_table(summary: Mapping[str, Any]) -> str:
    """The flows of ``summary`` as a plain-text table (one line per flow)."""
    rows = [_row(f) for f in summary["flows"]]
    heads = [h for _, h in _COLUMNS]
    widths = [max([len(h)] + [len(r[k]) for r in rows]) for (k, _), h in zip(_COLUMNS, heads)]
    line = "  ".join(h.ljust(w) for h, w in zip(heads, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(r[k].ljust(w) for (k, _), w in zip(_COLUMNS, widths)))
    return "\n".join(out)


def format_verdicts(summary: Mapping[str, Any]) -> str:
    """One line per verdict of every flow: ``flow: prediction (§): values → outcome``."""
    width = max([len(f["name"]) for f in summary["flows"]], default=0)
    return "\n".join(
        f"{f['name'].ljust(width)}  {verdict_line(v)}"
        for f in summary["flows"] for v in f.get("verdicts", ())
    )


# -- HTML ---------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0 auto;max-width:1180px;padding:24px 28px;color:#1d2330;line-height:1.45}
h1{font-size:1.6em;margin:0 0 .2em}h2{font-size:1.2em;margin:1.6em 0 .5em;
border-bottom:1px solid #dde2ea;padding-bottom:.2em}
.sub{color:#5a6475;margin:0 0 1em}
table{border-collapse:collapse;font-size:.88em;margin:.5em 0;width:100%}
.scroll{overflow-x:auto}
th,td{border:1px solid #dde2ea;padding:4px 8px;text-align:left;white-space:nowrap}
th{background:#f2f5f9}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.wrap{white-space:normal;color:#4a5366;font-size:.95em;min-width:15em}
td.pred{white-space:normal;min-width:10em}
tr.bad td.status{color:#b03a2e;font-weight:600}tr.ok td.status{color:#1e7d45}
td.held{color:#1e7d45;font-weight:600}td.failed{color:#b03a2e;font-weight:700}
td.skip{color:#7a8396}td.none{color:#7a8396;font-style:italic}
.sw{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.4em;
vertical-align:-.05em}
.figs{display:grid;grid-template-columns:1fr 1fr;gap:18px}
figure{margin:0;border:1px solid #e3e7ee;border-radius:6px;padding:8px;background:#fff}
figure.wide{grid-column:1 / span 2}
figure img{width:100%;height:auto;display:block}
figcaption{font-size:.85em;color:#384152;margin-top:6px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:.88em}
dt{color:#5a6475}dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace}
.warn{background:#fff4e5;border:1px solid #f0c27b;padding:8px 12px;border-radius:6px}
ol.refs{font-size:.88em;padding-left:1.2em}ol.refs li{margin:.2em 0}
"""

_OK = ("s_end_reached", "cost_tol_reached", "equilibrium_reached")
_OUTCOME_CLASS = {"held": "held", "failed": "failed", "not checked": "skip",
                  "no prediction": "none"}


def _dl(items: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<dt>{html.escape(str(k))}</dt>"
        f"<dd>{html.escape(v if isinstance(v, str) else json.dumps(v))}</dd>"
        for k, v in items.items()
    )
    return f"<dl>{rows}</dl>"


def _swatch(f: Mapping[str, Any]) -> str:
    return f'<span class="sw" style="background:{metric_color(f["metric"], f["name"])}"></span>'


def _flows_table(summary: Mapping[str, Any]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h in _COLUMNS)
    body = []
    for f in summary["flows"]:
        r = _row(f)
        title = esc(f["status"]["message"])
        cells = [f"<td>{_swatch(f)}{esc(r['flow'])}</td>",
                 f'<td class="num">{esc(r["lam"])}</td>',
                 f'<td class="status" title="{title}">{esc(r["status"])}</td>']
        cells += [f'<td class="num">{esc(r[k])}</td>' for k, _ in _COLUMNS[3:]]
        body.append(f'<tr class="{"ok" if f["status"]["code"] in _OK else "bad"}">'
                    f'{"".join(cells)}</tr>')
    return (f'<div class="scroll"><table id="flows"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _verdict_row(f: Mapping[str, Any], v: Mapping[str, Any]) -> str:
    esc = html.escape
    cells = [
        ("", f"{_swatch(f)}{esc(f['name'])}"),
        ("pred", esc(v["prediction"])),
        ("", esc(v["section"].removeprefix("docs/theory.md "))),
        ("num", _num(v["measured"], ".4g")),
        ("num", ("≤ " if v["relation"] == "<=" else "") + _num(v["expected"], ".4g")),
        ("num", _num(deviation(v), ".2g")),
        ("num", _num(v["tolerance"], ".2g")),
        (_OUTCOME_CLASS[v["outcome"]], esc(v["outcome"])),
        ("wrap", esc(v["note"])),
    ]
    return "<tr>" + "".join(f'<td class="{c}">{t}</td>' for c, t in cells) + "</tr>"


def _verdicts_table(summary: Mapping[str, Any]) -> str:
    heads = ("flow", "prediction", "docs/theory.md", "measured", "expected", "deviation",
             "tolerance", "outcome", "how it was checked")
    body = [_verdict_row(f, v) for f in summary["flows"] for v in f.get("verdicts", ())]
    return (f'<table id="verdicts"><thead><tr>{"".join(f"<th>{h}</th>" for h in heads)}'
            f'</tr></thead><tbody>{"".join(body)}</tbody></table>')


def _figures_html(folder: Path, summary: Mapping[str, Any],
                  figures: Mapping[str, str | Path]) -> str:
    esc = html.escape
    captions = summary.get("captions", {})
    out = []
    for key, rel in figures.items():
        p = Path(rel)
        p = p if p.is_absolute() else folder / p
        if not p.is_file():
            continue
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        cap = captions.get(key, {"title": key, "caption": "", "wide": False})
        wide = ' class="wide"' if cap.get("wide") else ""
        out.append(
            f'<figure{wide} id="fig-{esc(key)}"><img alt="{esc(cap["title"])}" '
            f'src="data:image/png;base64,{data}"><figcaption><b>{esc(cap["title"])}.</b> '
            f'{esc(cap["caption"])}</figcaption></figure>'
        )
    return "".join(out) or "<p>No figures (the run did not complete).</p>"


def _notes(summary: Mapping[str, Any]) -> str:
    esc = html.escape
    notes = []
    if not summary.get("complete", True):
        notes.append('<p class="warn">This run was interrupted: the table lists the flows that '
                     "completed and the one that was running (its checkpoint is in flows/).</p>")
    for f in summary["flows"]:
        if f["status"]["code"] not in _OK:
            notes.append(f'<p class="warn"><b>{esc(f["name"])}</b>: {esc(f["status"]["code"])} — '
                         f'{esc(f["status"]["message"])}</p>')
    failed = [f["name"] for f in summary["flows"]
              for v in f.get("verdicts", ()) if v["outcome"] == "failed"]
    if failed:
        notes.append(f'<p class="warn">A prediction failed on {esc(", ".join(sorted(set(failed))))}'
                     ": see the verdicts.</p>")
    return "".join(notes)


def _problem_items(pb: Mapping[str, Any]) -> dict[str, str]:
    items = {
        "data": pb["description"],
        "model": pb["model"],
        "loss": pb["loss"],
        "N, Q, QN": f"{pb['num_samples']}, {pb['num_outputs']}, {pb['output_dim']}",
        "K (parameters)": f"{pb['num_parameters']} "
        f"({'overparametrized, K ≥ QN' if pb['overparametrized'] else 'K < QN'})",
        "C(θ₀)": f"{pb['initial_cost']:.6g}",
        "σ_max, σ_min of D(θ₀)": f"{pb['sigma_max']:.4g}, {pb['sigma_min']:.4g}",
        "τ (rank threshold)": f"{pb.get('tau', 0.0):.4g}",
        "rank D(θ₀)": str(pb["initial_rank"]),
    }
    ce = pb.get("cross_entropy")
    if ce:
        items["C* = Σ_j H(y_j)"] = f"{ce['minimum_cost']:.6g}"
        items["μ = min_j λ₂(diag y_j − y_j y_jᵀ)"] = f"{ce['mu']:.4g}"
        items["limit x*"] = (f"finite, |x(0) − x*| = {ce['limit_distance']:.4g}"
                             if ce["finite_limit"] and ce["limit_distance"] is not None
                             else "none: labels with zero entries (the logits diverge)")
    return items


def _table_legend(summary: Mapping[str, Any]) -> str:
    if summary["problem"]["loss"] == "cross_entropy":
        rate = ("decay rate: least-squares slope of −log(C(s) − C*), C* = Σ<sub>j</sub> "
                "H(y<sub>j</sub>), over the flow: the slope of figure (a); the theory predicts "
                "only its late-time value 2μ, for the adapted flow (docs/theory.md §6)")
    else:
        rate = ("decay rate: least-squares slope of −log C(s) over the flow: the slope of figure "
                "(a), predicted to be 2 for the adapted flow (λ = 1) at full rank "
                "(docs/theory.md §3); interp. residual: max<sub>t</sub> |x(t) − (t·y + "
                "(1−t)·x(0))| / |x(0) − y|")
    return (f'<p class="sub">{rate}; rank: min–max of rank D along the flow / min(QN, K); '
            "events: rank changes.</p>")


def _references() -> str:
    esc = html.escape
    items = [
        f'<li id="ref-{key}">[{key}] {esc(who)}, <i>{esc(title)}</i>, '
        f'<a href="https://arxiv.org/abs/{num}">arXiv:{num}</a>.</li>'
        for key, who, title, num in REFERENCES
    ]
    items.append("<li>docs/theory.md of the subriemann repository: the statements this report "
                 "checks, each with the function that computes it; “docs/theory.md §n” is its "
                 "section n, equation numbers (2.xx) and “Prop” are those of [CM24].</li>")
    return f'<ol class="refs">{"".join(items)}</ol>'


_VERDICTS_INTRO = (
    '<p class="sub">Each prediction of docs/theory.md that applies to a flow, with the measured '
    "value, the predicted one and the tolerance: an estimate ε of the error of the computed "
    "outputs x(s), from the integrator's error control and the band filter (docs/report.md), "
    "never from the measured value. <i>no prediction</i>: measured for comparison where the "
    "theory predicts nothing; <i>not checked</i>: the prediction applies but could not be "
    "tested on this run (the note says why).</p>"
)

_SCRIPT = """<script>/* marks how many figures decoded (read by tests in a headless browser) */
window.addEventListener("load", function () {
  var ok = 0;
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (im.complete && im.naturalWidth > 0) ok++;
  }
  document.body.setAttribute("data-images-loaded", String(ok));
});
</script>"""


def write_html(
    folder: str | Path,
    summary: Mapping[str, Any],
    figures: Mapping[str, str | Path] | None = None,
) -> Path:
    """Write ``folder/report.html``: one page with the tables, verdicts and figures (base64 PNG).

    Parameters
    ----------
    folder : path
        The report folder.
    summary : dict
        As built by :func:`build_summary`; the figure captions are its ``captions``.
    figures : dict, optional
        Figure key → PNG path (absolute or relative to ``folder``); defaults to
        ``summary["figures"]``.
    """
    folder = Path(folder)
    figures = dict(summary.get("figures", {}) if figures is None else figures)
    pb = summary["problem"]
    esc = html.escape
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>subriemann report</title><style>{_CSS}</style></head>
<body>
<h1>subriemann report</h1>
<p class="sub">{esc(pb['description'])} · {esc(pb['model'])} · created {esc(summary['created'])}</p>
{_notes(summary)}
<h2>Flows</h2>
{_flows_table(summary)}
{_table_legend(summary)}
<h2>Verdicts</h2>
{_VERDICTS_INTRO}
{_verdicts_table(summary)}
<h2>Figures</h2>
<div class="figs">{_figures_html(folder, summary, figures)}</div>
<h2>Problem</h2>
{_dl(_problem_items(pb))}
<h2>Settings</h2>
{_dl(summary['settings'])}
<h2>Versions</h2>
{_dl(summary['versions'])}
<h2>References</h2>
{_references()}
{_SCRIPT}
</body></html>
"""
    path = folder / "report.html"
    tmp = path.with_name("report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
