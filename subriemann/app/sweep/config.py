r"""The TOML description of a sweep: a grid of cells, the flow settings, the run settings.

A sweep config has up to four tables; every key is optional unless said::

    [grid]                      # every combination of the lists is one cell
    data = ["teacher"]          # built-in dataset names or .npz paths
    n_samples = [6]             # seeded subset sizes
    width = [2, 8]              # hidden width of an MLP ...
    depth = [1, 2]              # ... and its number of hidden layers (default [1])
    # model = ["mlp:8,8"]       # or model specs, or model_file = ["net.py:build"]
    activation = ["tanh"]
    loss = ["mse"]
    metric = ["interp:0.5", "pullback"]   # the metrics of ``subriemann run --metrics``
    seed = [0, 1]

    [flow]                      # the same for every cell
    s_end = 5.0
    rtol = 1e-8
    atol = 1e-10                # default rtol / 100
    rank_rtol = 1e-6
    max_time = 60.0             # wall-time budget per cell, seconds (0: none)
    max_steps = 0               # step budget per cell (0: none)
    checkpoint_every = 20
    min_saves = 50              # at least this many saved points (gradient_flow's min_saves)

    [analysis]
    classify = true             # Hessian classification where a flow stalls

    [run]                       # how, not what: not part of the fingerprint
    scheduler = "tcp://host:8786"   # an existing Dask cluster (default: a LocalCluster)
    workers = 2                 # LocalCluster worker processes (default: the cores)
    retries = 2                 # Dask retries of a cell whose task raised
    connect_timeout = 10.0      # seconds to reach the scheduler
    threads = 1                 # torch threads per cell

A grid value may be a single value instead of a list.  Exactly one of
``model``, ``width`` (with ``depth``) and ``model_file`` gives the models;
``width`` × ``depth`` builds ``mlp:W,W,...`` (``depth`` copies of ``W``).
Relative paths (``model_file``, an ``.npz`` in ``data``) are taken relative to
the config file's folder.

The *fingerprint* of a sweep hashes ``grid``, ``flow`` and ``analysis``: the
cells and what is computed for them.  ``--resume`` refuses a config whose
fingerprint differs from the stored one and names the difference
(:func:`config_diff`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subriemann.app.config import UsageError, parse_metrics
from subriemann.app.datasets import BUILTIN
from subriemann.app.models import ACTIVATIONS, parse_spec
from subriemann.validation import check_bool, check_int, check_real

__all__ = [
    "SweepConfig",
    "CellSpec",
    "load_sweep_config",
    "parse_sweep_config",
    "config_diff",
    "GRID_KEYS",
    "FLOW_DEFAULTS",
    "RUN_DEFAULTS",
]

GRID_KEYS = ("data", "n_samples", "model", "width", "depth", "model_file", "activation",
             "loss", "metric", "seed")
"""The axes a ``[grid]`` table may list."""

GRID_DEFAULTS: dict[str, list[Any]] = {
    "data": ["teacher"], "n_samples": [None], "activation": ["tanh"], "loss": ["mse"],
    "metric": ["pullback"], "seed": [0],
}
FLOW_DEFAULTS: dict[str, Any] = {
    "s_end": 5.0, "rtol": 1e-8, "atol": None, "rank_rtol": 1e-6, "max_time": 60.0,
    "max_steps": 0, "checkpoint_every": 20, "min_saves": 50,
}
"""Defaults of the ``[flow]`` table (``atol`` defaults to ``rtol / 100``)."""

ANALYSIS_DEFAULTS: dict[str, Any] = {"classify": True}
RUN_DEFAULTS: dict[str, Any] = {
    "scheduler": None, "workers": None, "retries": 2, "connect_timeout": 10.0, "threads": 1,
}
"""Defaults of the ``[run]`` table (not fingerprinted)."""

_TABLES = {"grid": GRID_KEYS, "flow": tuple(FLOW_DEFAULTS),
           "analysis": tuple(ANALYSIS_DEFAULTS), "run": tuple(RUN_DEFAULTS)}


@dataclass
class CellSpec:
    """One cell of a sweep: a training problem, a metric, a seed and the flow settings.

    Attributes
    ----------
    index : int
        Position in the grid (row-major over :data:`GRID_KEYS`).
    data, model, activation, loss, metric : str
        As in ``subriemann run``; ``model`` is an MLP spec or ``"file:PATH:FACTORY"``.
    n_samples : int or None
    model_file : str or None
    seed : int
    flow : dict
        The resolved ``[flow]`` table.
    classify : bool
        Classify the end point with the Hessian when the flow stalls.
    """

    index: int
    data: str
    n_samples: int | None
    model: str
    model_file: str | None
    activation: str
    loss: str
    metric: str
    seed: int
    flow: dict[str, Any] = field(default_factory=dict)
    classify: bool = True

    @property
    def cell_id(self) -> str:
        """File-system name: ``cell-0007``."""
        return f"cell-{self.index:04d}"

    @property
    def label(self) -> str:
        """Human name used in messages: ``cell-0007 (teacher, mlp:8, pullback, seed 1)``."""
        model = self.model_file or self.model
        return f"{self.cell_id} ({self.data}, {model}, {self.metric}, seed {self.seed})"


@dataclass
class SweepConfig:
    """A validated sweep config (see the module docstring).

    Attributes
    ----------
    grid, flow, analysis, run : dict
        The resolved tables (grid values are lists).
    source : str
        Where it was read from.
    """

    grid: dict[str, list[Any]]
    flow: dict[str, Any]
    analysis: dict[str, Any]
    run: dict[str, Any]
    source: str = "<dict>"

    def identity(self) -> dict[str, Any]:
        """The fingerprinted part: ``grid``, ``flow`` and ``analysis``."""
        return {"grid": self.grid, "flow": self.flow, "analysis": self.analysis}

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of :meth:`identity` as canonical JSON."""
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def cells(self) -> list[CellSpec]:
        """Every cell of the grid, in a fixed order."""
        g = self.grid
        if "model_file" in g:
            models: list[tuple[str, str | None]] = [(f"file:{m}", m) for m in g["model_file"]]
        elif "model" in g:
            models = [(m, None) for m in g["model"]]
        else:
            models = [("mlp:" + ",".join([str(w)] * d) if d else "linear", None)
                      for w in g["width"] for d in g.get("depth", [1])]
        out = []
        axes = itertools.product(g["data"], g["n_samples"], models, g["activation"],
                                 g["loss"], g["metric"], g["seed"])
        for i, (data, n, (model, mfile), act, loss, metric, seed) in enumerate(axes):
            out.append(CellSpec(i, data, n, model, mfile, act, loss, metric, seed,
                                dict(self.flow), bool(self.analysis["classify"])))
        return out


# -- values ---------------------------------------------------------------------------------
def _list(v: Any, name: str) -> list[Any]:
    items = list(v) if isinstance(v, (list, tuple)) else [v]
    if not items:
        raise UsageError(f"empty grid: grid.{name} is an empty list")
    return items


def _usage(check: Callable[..., Any], value: Any, name: str, **bounds: Any) -> Any:
    """``check(value, name, **bounds)`` (:mod:`subriemann.validation`), failing as a UsageError."""
    try:
        return check(value, name, **bounds)
    except ValueError as err:  # ArgumentTypeError included
        raise UsageError(str(err)) from None


def _int(v: Any, name: str, minimum: int) -> int:
    return _usage(check_int, v, name, low=minimum)


def _num(v: Any, name: str, *, positive: bool = False, below_one: bool = False) -> float:
    return _usage(check_real, v, name, low=0.0, low_open=positive,
                  high=1.0 if below_one else None, high_open=below_one)


def _str(v: Any, name: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise UsageError(f"{name} must be a non-empty string, got {v!r}")
    return v.strip()


def _path(v: str, base: Path | None, *, model_file: bool = False) -> str:
    """Resolve a relative file path against the config's folder."""
    if base is None:
        return v
    if model_file:
        p, _, fac = v.rpartition(":")
        return f"{(base / p) if p and not Path(p).is_absolute() else p}:{fac}" if p else v
    if v.endswith(".npz") and not Path(v).is_absolute():
        return str(base / v)
    return v


def _data(v: Any, name: str, base: Path | None) -> str:
    s = _str(v, name)
    return s.lower() if s.lower() in BUILTIN else _path(s, base)


def _model(v: Any, name: str, base: Path | None) -> str:
    s = _str(v, name)
    try:
        parse_spec(s)
    except ValueError as err:
        raise UsageError(f"{name}: {err}") from None
    return s


def _activation(v: Any, name: str, base: Path | None) -> str:
    s = _str(v, name).lower()
    if s not in ACTIVATIONS:
        raise UsageError(f"{name}: unknown activation {s!r}: choose one of "
                         f"{', '.join(ACTIVATIONS)}")
    return s


def _loss(v: Any, name: str, base: Path | None) -> str:
    s = _str(v, name).lower().replace("-", "_")
    if s not in ("mse", "cross_entropy"):
        raise UsageError(f"{name}: unknown loss {s!r}: choose mse or cross_entropy")
    return s


#: how one value of each grid axis is checked and normalized: ``f(value, name, base)``
_GRID_VALUES: dict[str, Callable[[Any, str, Path | None], Any]] = {
    "data": _data,
    "n_samples": lambda v, name, base: None if v is None else _int(v, name, 1),
    "model": _model,
    "width": lambda v, name, base: _int(v, name, 1),
    "depth": lambda v, name, base: _int(v, name, 0),
    "model_file": lambda v, name, base: _path(_str(v, name), base, model_file=True),
    "activation": _activation,
    "loss": _loss,
    "metric": lambda v, name, base: _str(v, name),
    "seed": lambda v, name, base: _int(v, name, 0),
}


def _grid(raw: dict[str, Any], base: Path | None) -> dict[str, list[Any]]:
    given = [k for k in ("model", "width", "model_file") if k in raw]
    if len(given) > 1:
        raise UsageError(f"grid: give one of model, width (with depth) or model_file, "
                         f"not {' and '.join(given)}")
    if not given:
        raise UsageError("grid: give the models: model = [...], width = [...] "
                         "(with depth) or model_file = ['net.py:build']")
    if "depth" in raw and "width" not in raw:
        raise UsageError("grid.depth needs grid.width")
    g = {**GRID_DEFAULTS, **raw}
    out: dict[str, list[Any]] = {}
    for key in (k for k in GRID_KEYS if k in g):
        name = f"grid.{key}"
        items = [_GRID_VALUES[key](v, name, base) for v in _list(g[key], key)]
        if key == "metric":
            parse_metrics(items)  # unknown metric, bad λ or a metric listed twice
        if len(set(map(json.dumps, items))) != len(items):
            raise UsageError(f"{name} lists a value twice: {items}")
        out[key] = items
    return out


def _flow(raw: dict[str, Any]) -> dict[str, Any]:
    f = {**FLOW_DEFAULTS, **raw}
    rtol = _num(f["rtol"], "flow.rtol", positive=True, below_one=True)
    return {
        "s_end": _num(f["s_end"], "flow.s_end", positive=True),
        "rtol": rtol,
        "atol": rtol / 100 if f["atol"] is None else _num(f["atol"], "flow.atol"),
        "rank_rtol": _num(f["rank_rtol"], "flow.rank_rtol", below_one=True),
        "max_time": _num(f["max_time"], "flow.max_time"),
        "max_steps": _int(f["max_steps"], "flow.max_steps", 0),
        "checkpoint_every": _int(f["checkpoint_every"], "flow.checkpoint_every", 1),
        "min_saves": _int(f["min_saves"], "flow.min_saves", 2),
    }


def _run(raw: dict[str, Any]) -> dict[str, Any]:
    r = {**RUN_DEFAULTS, **raw}
    sched = None if r["scheduler"] in (None, "") else _str(r["scheduler"], "run.scheduler")
    return {
        "scheduler": sched,
        "workers": None if r["workers"] is None else _int(r["workers"], "run.workers", 1),
        "retries": _int(r["retries"], "run.retries", 0),
        "connect_timeout": _num(r["connect_timeout"], "run.connect_timeout", positive=True),
        "threads": _int(r["threads"], "run.threads", 1),
    }


def parse_sweep_config(raw: dict[str, Any], *, base: str | Path | None = None,
                       source: str = "<dict>") -> SweepConfig:
    """Validate a sweep config given as nested dicts (the parsed TOML).

    Parameters
    ----------
    raw : dict
        Tables ``grid``, ``flow``, ``analysis``, ``run`` (see the module docstring).
    base : path, optional
        Folder that relative paths are taken from.
    source : str
        Named in messages.

    Raises
    ------
    UsageError
        (a ``ValueError``) with one line naming the bad key or value: an
        unknown table or key, an empty grid, a bad value.

    Examples
    --------
    >>> cfg = parse_sweep_config({"grid": {"width": [2, 4], "seed": [0, 1, 2]}})
    >>> len(cfg.cells()), cfg.cells()[3].model
    (6, 'mlp:4')
    >>> parse_sweep_config({"grid": {"width": [2], "sede": [1]}})
    Traceback (most recent call last):
    ...
    subriemann.app.config.UsageError: unknown key grid.sede in <dict>: grid takes data, n_samples, model, width, depth, model_file, activation, loss, metric, seed
    """  # noqa: E501
    if not isinstance(raw, dict):
        raise UsageError(f"a sweep config is a table of tables, got {type(raw).__name__}")
    for table, val in raw.items():
        if table not in _TABLES:
            raise UsageError(f"unknown table [{table}] in {source}: use "
                             f"{', '.join(f'[{t}]' for t in _TABLES)}")
        if not isinstance(val, dict):
            raise UsageError(f"{table} in {source} must be a table [{table}], got {val!r}")
        for key in val:
            if key not in _TABLES[table]:
                raise UsageError(f"unknown key {table}.{key} in {source}: {table} takes "
                                 f"{', '.join(_TABLES[table])}")
    if "grid" not in raw:
        raise UsageError(f"empty grid: {source} has no [grid] table")
    b = None if base is None else Path(base).resolve()
    analysis = {**ANALYSIS_DEFAULTS, **raw.get("analysis", {})}
    _usage(check_bool, analysis["classify"], "analysis.classify")
    return SweepConfig(_grid(raw["grid"], b), _flow(raw.get("flow", {})), analysis,
                       _run(raw.get("run", {})), source)


def load_sweep_config(path: str | Path) -> SweepConfig:
    """Read and validate a sweep config file (TOML); see :func:`parse_sweep_config`.

    Raises
    ------
    FileNotFoundError
        No such file.
    UsageError
        Unparsable TOML, or a bad config (one line naming the key).
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise UsageError("a sweep config needs Python >= 3.11 (tomllib) or tomli") from None

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no sweep config at {p}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot parse sweep config {p}: {err}") from None
    return parse_sweep_config(raw, base=p.parent, source=str(p))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two :meth:`SweepConfig.identity` dicts.

    Examples
    --------
    >>> config_diff({"grid": {"seed": [0, 1]}}, {"grid": {"seed": [0, 1, 2]}})
    ['grid.seed: [0, 1] -> [0, 1, 2]']
    """
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "(absent)"), b.get(key, "(absent)")
        if json.dumps(va) != json.dumps(vb):
            out.append(f"{key}: {json.dumps(va)} -> {json.dumps(vb)}")
    return out

