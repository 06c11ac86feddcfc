"""Options of ``subriemann run``: defaults, value checks, config files and metric specs.

Shared by the command line (:mod:`subriemann.app.cli`) and the sweep
(:mod:`subriemann.app.sweep`), which builds the same :class:`Options` per cell.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from subriemann.validation import check_int, check_real

__all__ = ["Options", "MetricSpec", "UsageError", "parse_metrics", "load_config", "DEFAULTS",
           "DEFAULT_N_SAMPLES", "resolve_options", "check_device"]

DEFAULT_N_SAMPLES = 24
"""Samples taken from a built-in dataset when ``--n-samples`` is not given."""

DEFAULTS: dict[str, Any] = {
    "model": "mlp:32,32",
    "activation": "tanh",
    "model_file": None,
    "data": None,  # diabetes, or teacher without scikit-learn
    "n_samples": None,  # DEFAULT_N_SAMPLES for built-in data, all of an .npz file
    "loss": "mse",
    "label_smoothing": 0.0,
    "metrics": ["euclidean", "interp:0.5", "pullback"],
    "s_end": 5.0,
    "rtol": 1e-8,
    "atol": None,  # rtol / 100
    "rank_rtol": 1e-6,
    "rank_band": 1e-3,  # gradient_flow's band filter above tau (docs/flows.md); 0: off
    "rank_every": "auto",  # gradient_flow's monitor cadence (docs/scale.md)
    "max_time": 60.0,
    "seed": 0,
    "out": "subriemann-report",
    "device": "cpu",
    "threads": None,  # 1 for small problems (QN * K <= 4e6), else torch's default
    "progress": True,
    "resume": False,
    "overwrite": False,
}
"""Default value of every option of ``subriemann run`` (the keys of a config file)."""

LOSSES = ("mse", "cross_entropy")
NOT_FINGERPRINTED = ("out", "threads", "progress", "resume", "max_time", "overwrite")


class UsageError(ValueError):
    """A bad command line or config file (exit code 2)."""


# -- option values ------------------------------------------------------------------------
def _parsed(v: Any, name: str, kind: type) -> Any:
    """A number given as text (command line, TOML string) converted to ``kind``, else ``v``."""
    if isinstance(v, str):
        try:
            return kind(v.strip())
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise UsageError(f"{name} must be {what}, got {v!r}") from None
    return v


def _checked(check: Callable[..., Any], v: Any, name: str, **bounds: Any) -> Any:
    """``check(v, name, **bounds)`` (:mod:`subriemann.validation`), its error a UsageError."""
    try:
        return check(v, name, **bounds)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def _as_int(v: Any, name: str, minimum: int | None = None) -> int:
    v = _parsed(v, name, int)
    if isinstance(v, float) and v.is_integer():
        v = int(v)  # TOML 3.0
    return int(_checked(check_int, v, name, low=minimum))


def _as_float(v: Any, name: str, low: float | None = None, *, low_open: bool = False,
              high: float | None = None, high_open: bool = False) -> float:
    return float(_checked(check_real, _parsed(v, name, float), name, low=low, low_open=low_open,
                          high=high, high_open=high_open))


def _as_str(v: Any, name: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise UsageError(f"{name} must be a non-empty string, got {v!r}")
    return v.strip()


def _as_bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return v.strip().lower() in ("true", "yes", "1")
    raise UsageError(f"{name} must be true or false, got {v!r}")


def _as_metrics(v: Any, name: str = "metrics") -> list[str]:
    if isinstance(v, str):
        items = [p.strip() for p in v.split(",")]
    elif isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v):
        items = [p.strip() for p in v]
    else:
        raise UsageError(f"{name} must be a comma-separated string or a list of strings, got {v!r}")
    items = [p for p in items if p]
    if not items:
        raise UsageError(f"{name} is empty: give at least one metric, e.g. 'pullback'")
    return items


# -- metrics ------------------------------------------------------------------------------
@dataclass
class MetricSpec:
    r"""One item of ``--metrics``, resolved.

    Attributes
    ----------
    spec : str
        As given (``"interp:0.5"``).
    name : str
        File-system name of the flow (``"interp-0.5"``).
    label : str
        Legend label (``"λ=0.5 (interpolated)"``).
    lam : float or None
        :math:`\lambda` when the metric belongs to the family :math:`g_\lambda`.
    factory : callable
        The metric class, passed to ``space.equip_with_metric``.
    kwargs : dict
        Its keyword arguments (besides ``rank_rtol``).
    """

    spec: str
    name: str
    label: str
    lam: float | None
    factory: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)


METRIC_HELP = (
    "euclidean (λ=0), interp:LAM (g_λ, 0≤LAM≤1), pullback (λ=1, D^T D), bundle[:LAM] "
    "(sub-Riemannian, default LAM=1), fisher (softmax Fisher, cross-entropy only)"
)


def _lam(text: str, item: str) -> float:
    try:
        lam = float(text)
    except ValueError:
        raise UsageError(f"bad λ in metric {item!r}: {text!r} is not a number") from None
    if not (0.0 <= lam <= 1.0):
        raise UsageError(f"bad λ in metric {item!r}: must lie in [0, 1], got {lam:g}")
    return lam


def parse_metrics(items: Sequence[str]) -> list[MetricSpec]:
    """Resolve ``--metrics`` items (see :data:`METRIC_HELP`) into :class:`MetricSpec` records.

    Raises
    ------
    UsageError
        For an unknown metric, a bad :math:`\\lambda` or a flow listed twice.

    Examples
    --------
    >>> [m.name for m in parse_metrics(["euclidean", "interp:0.5", "pullback"])]
    ['euclidean', 'interp-0.5', 'pullback']
    """
    from subriemann import metrics as M

    out: list[MetricSpec] = []
    for item in items:
        kind, sep, arg = item.strip().lower().partition(":")
        if kind in ("euclidean", "standard") and not sep:
            m = MetricSpec(item, "euclidean", "λ=0 (Euclidean)", 0.0, M.EuclideanMetric)
        elif kind in ("pullback", "adapted") and not sep:
            m = MetricSpec(item, "pullback", "λ=1 (output pullback)", 1.0, M.OutputPullbackMetric)
        elif kind == "interp" and sep:
            lam = _lam(arg, item)
            m = MetricSpec(item, f"interp-{lam:g}", f"λ={lam:g} (interpolated)", lam,
                           M.InterpolatedMetric, {"lam": lam})
        elif kind == "bundle":
            lam = _lam(arg, item) if sep else 1.0
            m = MetricSpec(item, f"bundle-{lam:g}", f"λ={lam:g} (sub-Riemannian bundle)", lam,
                           M.BundleMetric, {"lam": lam})
        elif kind == "fisher" and not sep:
            m = MetricSpec(item, "fisher", "softmax Fisher", None, M.SoftmaxFisherMetric)
        else:
            raise UsageError(f"unknown metric {item!r}: use {METRIC_HELP}")
        if any(o.name == m.name for o in out):
            raise UsageError(f"metric {item!r} is listed twice (flow {m.name!r})")
        out.append(m)
    return out


# -- options ------------------------------------------------------------------------------
@dataclass
class Options:
    """The resolved options of ``subriemann run`` (defaults: :data:`DEFAULTS`)."""

    model: str
    activation: str
    model_file: str | None
    data: str
    n_samples: int | None
    loss: str
    label_smoothing: float
    metrics: list[str]
    s_end: float
    rtol: float
    atol: float
    rank_rtol: float
    max_time: float | None
    seed: int
    out: str
    device: str
    threads: int | None
    progress: bool
    resume: bool
    overwrite: bool = False
    rank_band: float = 1e-3
    rank_every: int | str = "auto"

    def fingerprint(self) -> str:
        """Hash of the settings that define the flows (not ``out``, ``threads``, ...)."""
        d = {k: v for k, v in asdict(self).items() if k not in NOT_FINGERPRINTED}
        if d["rank_band"] == DEFAULTS["rank_band"]:  # option added later: at its default the
            del d["rank_band"]  # fingerprint is that of the runs written before it existed
        if d["rank_every"] == DEFAULTS["rank_every"]:
            del d["rank_every"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def settings(self) -> dict[str, Any]:
        """The settings recorded in ``summary.json``."""
        return {**asdict(self), "fingerprint": self.fingerprint()}


def _model_options(v: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    from subriemann.app.models import ACTIVATIONS, parse_spec

    if "model" in explicit and v.get("model_file") is not None:
        raise UsageError("give either --model or --model-file, not both")
    model = _as_str(v["model"], "model")
    parse_spec(model)  # raises ValueError for an unknown spec
    activation = _as_str(v["activation"], "activation").lower()
    if activation not in ACTIVATIONS:
        raise UsageError(
            f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}"
        )
    model_file = None if v["model_file"] is None else _as_str(v["model_file"], "model_file")
    return {"model": model, "activation": activation, "model_file": model_file}


def _data_options(v: dict[str, Any]) -> dict[str, Any]:
    from subriemann.app.datasets import BUILTIN, default_dataset

    data = default_dataset() if v["data"] is None else _as_str(v["data"], "data")
    if data.lower() in BUILTIN:
        data = data.lower()
    n_samples = None if v["n_samples"] is None else _as_int(v["n_samples"], "n_samples", 1)
    if n_samples is None and data in BUILTIN:
        n_samples = DEFAULT_N_SAMPLES
    loss = _as_str(v["loss"], "loss").lower().replace("-", "_")
    if loss not in LOSSES:
        raise UsageError(f"unknown loss {loss!r}: choose mse or cross_entropy")
    smoothing = _as_float(v["label_smoothing"], "label_smoothing", 0.0, high=1.0, high_open=True)
    return {"data": data, "n_samples": n_samples, "loss": loss, "label_smoothing": smoothing}


def _flow_options(v: dict[str, Any]) -> dict[str, Any]:
    rtol = _as_float(v["rtol"], "rtol", 0.0, low_open=True, high=1.0, high_open=True)
    atol = rtol * 1e-2 if v["atol"] is None else _as_float(v["atol"], "atol", 0.0)
    max_time = None if v["max_time"] is None else _as_float(v["max_time"], "max_time", 0.0)
    return {
        "metrics": _as_metrics(v["metrics"]),
        "s_end": _as_float(v["s_end"], "s_end", 0.0, low_open=True),
        "rtol": rtol,
        "atol": atol,
        "rank_rtol": _as_float(v["rank_rtol"], "rank_rtol", 0.0, high=1.0, high_open=True),
        "rank_band": _as_float(v.get("rank_band", DEFAULTS["rank_band"]), "rank_band", 0.0,
                               high=1.0, high_open=True),
        "max_time": max_time or None,  # 0: no budget
        "seed": _as_int(v["seed"], "seed", 0),
        "rank_every": _as_rank_every(v.get("rank_every", DEFAULTS["rank_every"])),
    }


def _as_rank_every(value: Any) -> int | str:
    """``"auto"`` or a positive integer (the monitor's cadence, ``FlowOptions.rank_every``)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return _as_int(value, "rank_every", 1)


def _run_options(v: dict[str, Any]) -> dict[str, Any]:
    device = _as_str(v["device"], "device")
    check_device(device)
    out = {
        "out": _as_str(v["out"], "out"),
        "device": device,
        "threads": None if v["threads"] is None else _as_int(v["threads"], "threads", 1),
        "progress": _as_bool(v["progress"], "progress"),
        "resume": _as_bool(v["resume"], "resume"),
        "overwrite": _as_bool(v.get("overwrite", False), "overwrite"),
    }
    if out["resume"] and out["overwrite"]:
        raise UsageError("give --resume (continue the run in --out) or --overwrite (replace "
                         "it), not both")
    return out


def resolve_options(values: dict[str, Any], explicit: set[str]) -> Options:
    """Validate merged option values (defaults < config < command line).

    Raises
    ------
    UsageError
        Naming the first bad option.
    """
    v = dict(values)
    opts = Options(**_model_options(v, explicit), **_data_options(v), **_flow_options(v),
                   **_run_options(v))
    parse_metrics(opts.metrics)
    return opts


def check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"unknown device {device!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"device {device!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device {device!r}: use cpu, cuda[:i] or mps")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file: flat keys named like the options (``s_end`` or ``s-end``).

    Relative paths in ``model_file``, ``data`` (an ``.npz``) and ``out`` are
    taken relative to the config file's folder.  ``no_progress = true`` is
    accepted for ``progress = false``.

    Raises
    ------
    FileNotFoundError, UsageError
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise UsageError(
                "--config needs Python >= 3.11 (tomllib) or the tomli package"
            ) from None

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no config file at {p}")
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"cannot parse config {p}: {err}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot parse config {p}: not a UTF-8 text file") from None
    out: dict[str, Any] = {}
    for key, val in raw.items():
        k, val = _config_item(p, key, val)
        out[k] = val
    try:  # every value of the file on its own (over the defaults): errors name the file
        resolve_options({**DEFAULTS, **out}, set(out))
    except (UsageError, ValueError) as err:
        raise UsageError(f"{p}: {err}") from None
    return out


def _config_item(p: Path, key: str, val: Any) -> tuple[str, Any]:
    """One ``key = val`` of the config file ``p``: the option's name and its value."""
    k = key.replace("-", "_")
    if k == "no_progress":
        return "progress", not _as_bool(val, f"{p}: no_progress")
    if k not in DEFAULTS:
        raise UsageError(f"{p}: unknown option {key!r} (known: {', '.join(sorted(DEFAULTS))})")
    if isinstance(val, dict):
        raise UsageError(f"{p}: option {key!r} must be a value, not a table")
    if isinstance(val, str) and (k in ("model_file", "out") or (k == "data" and
                                                                val.endswith(".npz"))):
        val = _relative_to(p.parent, val, k)
    return k, val


def _relative_to(base: Path, val: str, key: str) -> str:
    if key == "model_file":
        path_s, sep, name = val.rpartition(":")
        if sep and path_s and not Path(path_s).is_absolute():
            return f"{base / path_s}:{name}"
        return val
    return val if Path(val).is_absolute() else str(base / val)

