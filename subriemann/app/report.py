r"""The report folder of ``subriemann run``: ``summary.json``, trajectories, figures, HTML page.

Layout of a report folder ``DIR/``::

    DIR/summary.json              the numbers (schema: SUMMARY_SCHEMA, docs/report.md)
    DIR/report.html               one self-contained page: table + figures (base64 PNG)
    DIR/figures/cost.png          (a) C(s), log scale, with C(0) e^{-2s}
    DIR/figures/output_path.png   (b) output-space paths, straight line for lambda = 1
    DIR/figures/singular_values.png        (c) singular values of D, rank events
    DIR/figures/interpolation_deviation.png (d) z(t) split on ran D and its complement
    DIR/flows/<name>.npz          each trajectory (Trajectory.save format)
    DIR/flows/<name>.ckpt.npz     checkpoint of a flow that was interrupted (resumable)

:func:`analyse_flow` computes the per-flow numbers, :func:`build_summary`
assembles ``summary.json``, :func:`validate_summary` checks it against
:data:`SUMMARY_SCHEMA` (a JSON-schema dict; the validator handles the subset
the schema uses, so no extra dependency is needed), :func:`write_html` writes
the page and :func:`format_table` the console table.
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

from subriemann.analysis.interpolation import (
    InterpolationDeviation,
    decay_rate,
    interpolation_deviation,
    linear_interpolation_residual,
)
from subriemann.flow.trajectory import STATUS_CODES, Trajectory

__all__ = [
    "FORMAT",
    "SUMMARY_SCHEMA",
    "SchemaError",
    "validate_summary",
    "versions",
    "analyse_flow",
    "build_summary",
    "write_summary",
    "format_table",
    "write_html",
    "subsample",
]

FORMAT = "subriemann.app.report/1"
"""Value of ``summary.json["format"]``."""

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INT = {"type": "integer", "minimum": 0}
_STR = {"type": "string"}
_STR_OR_NULL = {"type": ["string", "null"]}


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

_FLOW = _obj({
    "name": _STR,
    "spec": _STR,
    "label": _STR,
    "lam": _NUM_OR_NULL,
    "metric": {"type": "object"},
    "status": _obj({"code": {"type": "string", "enum": sorted(STATUS_CODES)}, "message": _STR}),
    "completed": {"type": "boolean"},
    "s_end": _NUM,
    "s_final": _NUM,
    "points": _INT,
    "initial_cost": _NUM,
    "final_cost": _NUM,
    "cost_ratio": _NUM_OR_NULL,
    "decay_rate": _obj({
        "rate": _NUM,
        "expected": _NUM,
        "relative_error": _NUM_OR_NULL,
        "s_min": _NUM,
        "s_max": _NUM,
        "points": _INT,
    }, nullable=True),
    "interpolation_residual": _NUM_OR_NULL,
    "deviation": _obj({
        "max_z": _NUM,
        "max_z_range": _NUM,
        "max_z_perp": _NUM,
        "propagator_error": _NUM_OR_NULL,
        "rank_loss_fraction": _NUM_OR_NULL,
        "applies": {"type": "boolean"},
        "points": _INT,
    }, nullable=True),
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
    "wall_time": _NUM,
    "nfev": _INT,
    "n_steps": _INT,
    "n_rejected": _INT,
    "trajectory": _STR_OR_NULL,
    "checkpoint": _STR_OR_NULL,
})

SUMMARY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "subriemann run: summary.json",
    **_obj({
        "format": {"type": "string", "enum": [FORMAT]},
        "created": _STR,
        "complete": {"type": "boolean"},
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
            "overparametrized": {"type": "boolean"},
            "initial_cost": _NUM,
            "sigma_max": _NUM,
            "sigma_min": _NUM,
            "initial_rank": _INT,
        }),
        "flows": {"type": "array", "items": _FLOW},
        "figures": {"type": "object", "additionalProperties": _STR},
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


def _validate(value: Any, schema: Mapping[str, Any], where: str) -> None:
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        if not any(_TYPES[t](value) for t in types):
            raise SchemaError(f"{where}: expected {' or '.join(types)}, got {value!r:.80}")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaError(f"{where}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        raise SchemaError(f"{where}: {value} < {schema['minimum']}")
    if isinstance(value, dict):
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
    import torch

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


def subsample(traj: Trajectory, max_points: int) -> Trajectory:
    """At most ``max_points`` saved points of ``traj``, evenly spread, first and last kept."""
    n = len(traj)
    if n <= max_points:
        return traj
    import torch

    idx = torch.from_numpy(np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64)))
    return dataclasses.replace(
        traj,
        s=traj.s[idx], theta=traj.theta[idx], outputs=traj.outputs[idx], cost=traj.cost[idx],
        grad_norm=traj.grad_norm[idx], singular_values=traj.singular_values[idx],
        rank=traj.rank[idx],
    )


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
        See ``SUMMARY_SCHEMA["properties"]["flows"]["items"]``.
    dev : InterpolationDeviation or None
    """
    mse = traj.loss == "mse"
    c0, c1 = float(traj.cost[0]), float(traj.cost[-1])
    fit_d = _decay(traj)
    residual = _finite(linear_interpolation_residual(traj)) if mse and len(traj) else None
    dev: InterpolationDeviation | None = None
    dev_d: dict[str, Any] | None = None
    if deviation and mse and space is not None and len(traj) >= 2:
        sub = subsample(traj, max_points)
        dev = interpolation_deviation(sub, space)
        scale = float((sub.outputs[0] - sub.targets).norm()) or 1.0
        norms = dev.norms
        dev_d = {
            "max_z": float(norms["z"].max()) / scale,
            "max_z_range": float(norms["z_range"].max()) / scale,
            "max_z_perp": float(norms["z_perp"].max()) / scale,
            "propagator_error": _finite(dev.propagator_error),
            "rank_loss_fraction": _finite(dev.rank_loss_fraction),
            "applies": bool(dev.applies),
            "points": len(sub),
        }
    ranks = [int(r) for r in traj.rank]
    full = int(traj.singular_values.shape[1]) if traj.singular_values.ndim == 2 else 0
    events = [
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
    cnt = traj.counters
    entry = {
        "name": name,
        "spec": spec,
        "label": label or name,
        "lam": lam,
        "metric": json.loads(json.dumps(traj.metric, default=str)),
        "status": {"code": traj.status.code, "message": traj.status.message},
        "completed": traj.status.code not in ("interrupted", "running"),
        "s_end": float(traj.settings.get("s_end", float(traj.s[-1]))),
        "s_final": float(traj.s[-1]),
        "points": len(traj),
        "initial_cost": c0,
        "final_cost": c1,
        "cost_ratio": c1 / c0 if c0 > 0 else None,
        "decay_rate": fit_d,
        "interpolation_residual": residual,
        "deviation": dev_d,
        "rank": {
            "initial": ranks[0] if ranks else 0,
            "final": ranks[-1] if ranks else 0,
            "min": min(ranks) if ranks else 0,
            "max": max(ranks) if ranks else 0,
            "full": full,
            "tau": float(traj.rank_tau),
            "rtol": float(traj.rank_rtol),
        },
        "rank_events": events,
        "wall_time": float(cnt.get("wall_time", 0.0)),
        "nfev": int(cnt.get("nfev", 0)),
        "n_steps": int(cnt.get("n_steps", 0)),
        "n_rejected": int(cnt.get("n_rejected", 0)),
        "trajectory": trajectory_file,
        "checkpoint": checkpoint_file,
    }
    return entry, dev


def _cross_entropy_reference(traj: Trajectory) -> tuple[float, float]:
    r"""Minimum :math:`C^* = \sum_j H(y_j)` and the late-time rate :math:`2\mu` of :math:`C - C^*`.

    docs/theory.md §6: near the limit :math:`x^*` the adapted flow contracts
    :math:`x - x^*` at the rates of :math:`H_j = \operatorname{diag}y_j - y_jy_j^\top`
    on :math:`1^\perp`, the slowest being :math:`\mu = \min_j\lambda_2(H_j)`, so
    :math:`C - C^* \approx \tfrac12\langle x - x^*, H(x - x^*)\rangle` decays at :math:`2\mu`.
    """
    import torch

    q = max(int(traj.num_outputs), 1)
    y = traj.targets.reshape(-1, q).to(torch.float64)
    logs = torch.where(y > 0, torch.log(y.clamp_min(1e-300)), torch.zeros_like(y))
    cmin = float(-(y * logs).sum())
    h = torch.diag_embed(y) - y[:, :, None] * y[:, None, :]
    lam2 = torch.linalg.eigvalsh(h)[:, 1] if q >= 2 else torch.zeros(1, dtype=torch.float64)
    return cmin, 2.0 * max(float(lam2.min()), 0.0)


def _decay(traj: Trajectory) -> dict[str, Any] | None:
    r"""The ``decay_rate`` entry: fit of log C (log(C - C*) for cross-entropy), or None."""
    expected: float | None = None
    fitted = traj
    if traj.loss == "cross_entropy":
        cmin, expected = _cross_entropy_reference(traj)
        fitted = dataclasses.replace(traj, cost=traj.cost - cmin)
    try:
        fit = decay_rate(fitted)
    except ValueError:  # fewer than 2 points above the floor
        return None
    rel: float | None
    if expected is None:
        expected, rel = fit.expected, fit.relative_error
    else:
        rel = abs(fit.rate - expected) / expected if expected > 0 else None
    d = {
        "rate": fit.rate, "expected": expected, "relative_error": rel,
        "s_min": fit.s_min, "s_max": fit.s_max, "points": fit.points,
    }
    if not all(v is None or math.isfinite(v) for v in d.values()):
        return None
    return d


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
) -> dict[str, Any]:
    """Assemble ``summary.json`` (see :data:`SUMMARY_SCHEMA`); paths relative to the folder."""
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


# -- HTML ---------------------------------------------------------------------------------
_CAPTIONS = {
    "cost": (
        "(a) Cost along the flows",
        "C(s) on a log scale. The dashed line is C(0)·e^(−2s), the uniform decay of the adapted "
        "flow (λ = 1) when rank D = QN (docs/theory.md §3, [Che23]): it holds for every "
        "architecture, dataset and initialization. A cross marks a flow that stopped before s_end.",
    ),
    "output_path": (
        "(b) Output-space paths",
        "x(s) projected on the plane spanned by x(0) − y (horizontal, origin at y) and the "
        "largest component of the paths orthogonal to it. Prop 2.4: after t = 1 − e^(−s), the "
        "adapted flow moves on the straight line t·y + (1 − t)·x(0) at constant speed (its dots "
        "at t = 0.2, 0.4, 0.6, 0.8 are equally spaced); the standard flow bends.",
    ),
    "singular_values": (
        "(c) Singular values of D",
        "σ_i(s) of the Jacobian D = ∂x/∂θ along each flow; the dashed line is the fixed rank "
        "threshold τ = rank_rtol·σ_max(θ(0)). Vertical dotted lines mark rank changes (events).",
    ),
    "deviation": (
        "(d) Deviation from linear interpolation",
        "z(t) = x(t) − (t·y + (1 − t)·x(0)), split into P z (inside ran D) and P^⊥ z (rank loss), "
        "relative to |x(0) − y|. For λ = 1, (2.58) says z is produced by P^⊥ alone (the "
        "propagator prediction is dotted): with rank D = QN it vanishes, and what remains is "
        "integration error.",
    ),
}

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
margin:0 auto;max-width:1180px;padding:24px 28px;color:#1d2330;line-height:1.45}
h1{font-size:1.6em;margin:0 0 .2em}h2{font-size:1.2em;margin:1.6em 0 .5em;
border-bottom:1px solid #dde2ea;padding-bottom:.2em}
.sub{color:#5a6475;margin:0 0 1em}
table{border-collapse:collapse;font-size:.88em;margin:.5em 0;width:100%}
th,td{border:1px solid #dde2ea;padding:4px 8px;text-align:left;white-space:nowrap}
th{background:#f2f5f9}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td.status{color:#b03a2e;font-weight:600}tr.ok td.status{color:#1e7d45}
.figs{display:grid;grid-template-columns:1fr 1fr;gap:18px}
figure{margin:0;border:1px solid #e3e7ee;border-radius:6px;padding:8px;background:#fff}
figure.wide{grid-column:1 / span 2}
figure img{width:100%;height:auto;display:block}
figcaption{font-size:.85em;color:#384152;margin-top:6px}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:.88em}
dt{color:#5a6475}dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace}
.warn{background:#fff4e5;border:1px solid #f0c27b;padding:8px 12px;border-radius:6px}
"""


def _dl(items: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<dt>{html.escape(str(k))}</dt>"
        f"<dd>{html.escape(v if isinstance(v, str) else json.dumps(v))}</dd>"
        for k, v in items.items()
    )
    return f"<dl>{rows}</dl>"


def write_html(
    folder: str | Path,
    summary: Mapping[str, Any],
    figures: Mapping[str, str | Path] | None = None,
) -> Path:
    """Write ``folder/report.html``: one page with the table and the figures as base64 PNG.

    Parameters
    ----------
    folder : path
        The report folder.
    summary : dict
        As built by :func:`build_summary`.
    figures : dict, optional
        Figure key → PNG path (absolute or relative to ``folder``); defaults to
        ``summary["figures"]``.
    """
    folder = Path(folder)
    figures = dict(summary.get("figures", {}) if figures is None else figures)
    pb = summary["problem"]
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for _, h in _COLUMNS)
    body = []
    for f in summary["flows"]:
        r = _row(f)
        ok = f["status"]["code"] in ("s_end_reached", "cost_tol_reached", "equilibrium_reached")
        cells = "".join(
            f'<td class="{"status" if k == "status" else ("num" if k not in ("flow",) else "")}"'
            f' title="{esc(f["status"]["message"]) if k == "status" else ""}">{esc(r[k])}</td>'
            for k, _ in _COLUMNS
        )
        body.append(f'<tr class="{"ok" if ok else "bad"}">{cells}</tr>')
    table = (f'<table id="flows"><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table>')
    figs = []
    for key, rel in figures.items():
        p = Path(rel)
        p = p if p.is_absolute() else folder / p
        if not p.is_file():
            continue
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        title, cap = _CAPTIONS.get(key, (key, ""))
        wide = ' class="wide"' if key in ("singular_values", "deviation") else ""
        figs.append(
            f'<figure{wide} id="fig-{esc(key)}"><img alt="{esc(title)}" '
            f'src="data:image/png;base64,{data}"><figcaption><b>{esc(title)}.</b> {esc(cap)}'
            "</figcaption></figure>"
        )
    notes = []
    if not summary.get("complete", True):
        notes.append('<p class="warn">This run was interrupted: the table lists the flows that '
                     "completed and the one that was running (its checkpoint is in flows/).</p>")
    for f in summary["flows"]:
        if f["status"]["code"] not in ("s_end_reached", "cost_tol_reached", "equilibrium_reached"):
            notes.append(f'<p class="warn"><b>{esc(f["name"])}</b>: {esc(f["status"]["code"])} — '
                         f'{esc(f["status"]["message"])}</p>')
    problem_items = {
        "data": pb["description"],
        "model": pb["model"],
        "loss": pb["loss"],
        "N, Q, QN": f"{pb['num_samples']}, {pb['num_outputs']}, {pb['output_dim']}",
        "K (parameters)": f"{pb['num_parameters']} "
        f"({'overparametrized, K ≥ QN' if pb['overparametrized'] else 'K < QN'})",
        "C(θ₀)": f"{pb['initial_cost']:.6g}",
        "σ_max, σ_min of D(θ₀)": f"{pb['sigma_max']:.4g}, {pb['sigma_min']:.4g}",
        "rank D(θ₀)": str(pb["initial_rank"]),
    }
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>subriemann report</title><style>{_CSS}</style></head>
<body>
<h1>subriemann report</h1>
<p class="sub">{esc(pb['description'])} · {esc(pb['model'])} · created {esc(summary['created'])}</p>
{''.join(notes)}
<h2>Flows</h2>
{table}
<p class="sub">decay rate: least-squares slope of −log C(s) (2 for the adapted flow with full rank;
for cross-entropy of −log(C(s) − C*), C* = Σ<sub>j</sub> H(y<sub>j</sub>));
interp. residual: max<sub>t</sub> |x(t) − (t·y + (1−t)·x(0))| / |x(0) − y|;
rank: min–max of rank D along the flow / min(QN, K).</p>
<h2>Figures</h2>
<div class="figs">{''.join(figs) or '<p>No figures (the run did not complete).</p>'}</div>
<h2>Problem</h2>
{_dl(problem_items)}
<h2>Settings</h2>
{_dl(summary['settings'])}
<h2>Versions</h2>
{_dl(summary['versions'])}
<script>/* marks how many figures decoded (read by tests in a headless browser) */
window.addEventListener("load", function () {{
  var ok = 0;
  for (var i = 0; i < document.images.length; i++) {{
    var im = document.images[i];
    if (im.complete && im.naturalWidth > 0) ok++;
  }}
  document.body.setAttribute("data-images-loaded", String(ok));
}});
</script>
</body></html>
"""
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
