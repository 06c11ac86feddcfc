r"""The ``subriemann`` command-line program.

``subriemann run`` runs the standard geometric analysis of a training problem
and writes a report folder (see :mod:`subriemann.report`)::

    subriemann run                       # the built-in default problem
    subriemann run --data digits --loss cross_entropy --label-smoothing 0.1
    subriemann run --model mlp:64,64 --activation softplus --metrics euclidean,pullback
    subriemann run --model-file net.py:build --data mydata.npz --out report
    subriemann run --config experiment.toml

**The default problem**: an overparametrized tanh MLP (``mlp:32,32``,
:math:`K = 1441`) regressing scikit-learn's diabetes data (24 patients, 10
standardized features, :math:`QN = 24`), or a teacher–student problem when
scikit-learn is missing; the flows :math:`\lambda = 0` (Euclidean),
:math:`\lambda = 0.5` and :math:`\lambda = 1` (output pullback) from one seeded
initialization up to :math:`s = 5`.  The Euclidean flow is stiff (thousands of
steps); every flow gets a wall-time budget (``--max-time``, 60 s by default)
and the table reports honestly when a flow ran out of it.  Problems with
:math:`QN \cdot K \le 4\cdot 10^6` run on one torch thread (``--threads``): at
these sizes more threads only add overhead, and on a busy machine they make a
run several times slower.

**Errors**: every bad option, unreadable file, unknown model spec or
incompatible loss/target combination prints one line to stderr and exits with
code 2.  **Ctrl-C** keeps the completed flows, the checkpoint of the running
one (``DIR/flows/<name>.ckpt.npz``) and a ``summary.json`` of what completed,
and exits with code 130.  ``--resume --out DIR`` continues from there with the
settings stored in ``DIR/summary.json`` (options given with it must agree with
them; the error names those that differ): flows whose trajectory file is on
disk are kept (even when Ctrl-C came during their post-processing), the
interrupted one continues from its checkpoint, and so do flows that ran out of
their wall-time budget (give a larger ``--max-time``).  A second run into a
non-empty ``--out`` is refused unless ``--resume`` or ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main", "Options", "MetricSpec", "parse_metrics", "load_config", "DEFAULTS"]

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
_NOT_FINGERPRINTED = ("out", "threads", "progress", "resume", "max_time", "overwrite")
_BUDGET = ("max_time_reached", "max_steps_reached")
SMALL_PROBLEM = 4_000_000
"""QN·K up to which ``subriemann run`` uses one torch thread unless ``--threads`` says otherwise."""


class UsageError(ValueError):
    """A bad command line or config file (exit code 2)."""


# -- option values ------------------------------------------------------------------------
def _as_int(v: Any, name: str, minimum: int | None = None) -> int:
    if isinstance(v, bool):
        raise UsageError(f"{name} must be an integer, got {v!r}")
    if isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            raise UsageError(f"{name} must be an integer, got {v!r}") from None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int):
        raise UsageError(f"{name} must be an integer, got {v!r}")
    if minimum is not None and v < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {v}")
    return v


def _as_float(v: Any, name: str, low: float | None = None, *, low_open: bool = False,
              high: float | None = None, high_open: bool = False) -> float:
    if isinstance(v, bool):
        raise UsageError(f"{name} must be a number, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise UsageError(f"{name} must be a number, got {v!r}") from None
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise UsageError(f"{name} must be a finite number, got {v!r}")
    v = float(v)
    if low is not None and (v < low or (low_open and v == low)):
        raise UsageError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {v:g}")
    if high is not None and (v > high or (high_open and v == high)):
        raise UsageError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {v:g}")
    return v


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

    def fingerprint(self) -> str:
        """Hash of the settings that define the flows (not ``out``, ``threads``, ...)."""
        d = {k: v for k, v in asdict(self).items() if k not in _NOT_FINGERPRINTED}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def settings(self) -> dict[str, Any]:
        """The settings recorded in ``summary.json``."""
        return {**asdict(self), "fingerprint": self.fingerprint()}


def _resolve(values: dict[str, Any], explicit: set[str]) -> Options:
    """Validate merged option values (defaults < config < command line)."""
    from subriemann.datasets import BUILTIN, default_dataset
    from subriemann.models import ACTIVATIONS, parse_spec

    v = dict(values)
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
    data = default_dataset() if v["data"] is None else _as_str(v["data"], "data")
    if data.lower() in BUILTIN:
        data = data.lower()
    n_samples = None if v["n_samples"] is None else _as_int(v["n_samples"], "n_samples", 1)
    if n_samples is None and data in BUILTIN:
        n_samples = DEFAULT_N_SAMPLES
    loss = _as_str(v["loss"], "loss").lower().replace("-", "_")
    if loss not in LOSSES:
        raise UsageError(f"unknown loss {loss!r}: choose mse or cross_entropy")
    label_smoothing = _as_float(v["label_smoothing"], "label_smoothing", 0.0, high=1.0,
                                high_open=True)
    rtol = _as_float(v["rtol"], "rtol", 0.0, low_open=True, high=1.0, high_open=True)
    atol = rtol * 1e-2 if v["atol"] is None else _as_float(v["atol"], "atol", 0.0)
    max_time = None if v["max_time"] is None else _as_float(v["max_time"], "max_time", 0.0)
    device = _as_str(v["device"], "device")
    _check_device(device)
    opts = Options(
        model=model,
        activation=activation,
        model_file=model_file,
        data=data,
        n_samples=n_samples,
        loss=loss,
        label_smoothing=label_smoothing,
        metrics=_as_metrics(v["metrics"]),
        s_end=_as_float(v["s_end"], "s_end", 0.0, low_open=True),
        rtol=rtol,
        atol=atol,
        rank_rtol=_as_float(v["rank_rtol"], "rank_rtol", 0.0, high=1.0, high_open=True),
        max_time=None if not max_time else max_time,
        seed=_as_int(v["seed"], "seed", 0),
        out=_as_str(v["out"], "out"),
        device=device,
        threads=None if v["threads"] is None else _as_int(v["threads"], "threads", 1),
        progress=_as_bool(v["progress"], "progress"),
        resume=_as_bool(v["resume"], "resume"),
        overwrite=_as_bool(v.get("overwrite", False), "overwrite"),
    )
    if opts.resume and opts.overwrite:
        raise UsageError("give --resume (continue the run in --out) or --overwrite (replace "
                         "it), not both")
    parse_metrics(opts.metrics)
    return opts


def _check_device(device: str) -> None:
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
    base = p.parent
    for key, val in raw.items():
        k = key.replace("-", "_")
        if k == "no_progress":
            out["progress"] = not _as_bool(val, f"{p}: no_progress")
            continue
        if k not in DEFAULTS:
            raise UsageError(
                f"{p}: unknown option {key!r} (known: {', '.join(sorted(DEFAULTS))})"
            )
        if isinstance(val, dict):
            raise UsageError(f"{p}: option {key!r} must be a value, not a table")
        if k in ("model_file", "out") and isinstance(val, str):
            val = _relative_to(base, val, k)
        if k == "data" and isinstance(val, str) and val.endswith(".npz"):
            val = _relative_to(base, val, k)
        out[k] = val
    try:  # every value of the file on its own (over the defaults): errors name the file
        _resolve({**DEFAULTS, **out}, set(out))
    except (UsageError, ValueError) as err:
        raise UsageError(f"{p}: {err}") from None
    return out


def _relative_to(base: Path, val: str, key: str) -> str:
    if key == "model_file":
        path_s, sep, name = val.rpartition(":")
        if sep and path_s and not Path(path_s).is_absolute():
            return f"{base / path_s}:{name}"
        return val
    return val if Path(val).is_absolute() else str(base / val)


# -- argparse -----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line :class:`UsageError`s."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    from subriemann import __version__

    top = _Parser(
        prog="subriemann",
        description="Differential geometry of neural-network training: run the standard "
        "analysis of a training problem and write a report folder.",
    )
    top.add_argument("--version", action="version", version=f"subriemann {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser(
        "run",
        help="run the flows of a training problem and write a report",
        description="Run the gradient flows of several metrics from one initialization and "
        "write DIR/summary.json, DIR/report.html, figures and trajectories. Without options: "
        "the built-in default problem (tanh MLP on 24 diabetes patients; λ = 0, 0.5, 1). "
        "Every option can also be set in a TOML file given with --config (keys named like the "
        "options, e.g. s_end = 5.0); the command line wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    g = run.add_argument_group("problem")
    g.add_argument("--model", metavar="SPEC",
                   help="MLP hidden widths 'mlp:W1,W2,...' or 'linear' (default: mlp:32,32)")
    g.add_argument("--activation", metavar="NAME",
                   help="tanh, relu, softplus, sigmoid or gelu (default: tanh)")
    g.add_argument("--model-file", dest="model_file", metavar="PATH.py:FACTORY",
                   help="a Python file and a function in it that returns any torch.nn.Module "
                   "(called as factory() or factory(in_dim, out_dim))")
    g.add_argument("--data", metavar="NAME|FILE.npz",
                   help="diabetes, digits, iris, teacher, or an .npz with arrays 'inputs' and "
                   "'targets' (default: diabetes; teacher without scikit-learn)")
    g.add_argument("--n-samples", dest="n_samples", metavar="N",
                   help=f"seeded subset size (default: {DEFAULT_N_SAMPLES} for built-in data, "
                   "all samples of an .npz)")
    g.add_argument("--loss", metavar="LOSS", help="mse or cross_entropy (default: mse)")
    g.add_argument("--label-smoothing", dest="label_smoothing", metavar="EPS",
                   help="smooth one-hot targets to (1-EPS) y + EPS/Q (default: 0)")
    g = run.add_argument_group("flows")
    g.add_argument("--metrics", metavar="LIST",
                   help=f"comma-separated metrics, one flow each: {METRIC_HELP} "
                   "(default: euclidean,interp:0.5,pullback)")
    g.add_argument("--s-end", dest="s_end", metavar="S", help="final flow time (default: 5)")
    g.add_argument("--rtol", metavar="RTOL", help="integrator relative tolerance (default: 1e-8)")
    g.add_argument("--atol", metavar="ATOL",
                   help="integrator absolute tolerance (default: rtol/100)")
    g.add_argument("--rank-rtol", dest="rank_rtol", metavar="RTOL",
                   help="rank threshold tau = RTOL * sigma_max(D(theta0)) (default: 1e-6)")
    g.add_argument("--max-time", dest="max_time", metavar="SECONDS",
                   help="wall-time budget per flow; 0 = none (default: 60)")
    g.add_argument("--seed", metavar="SEED",
                   help="seed of the initialization and the data subset (default: 0)")
    g.add_argument("--device", metavar="DEVICE", help="cpu, cuda[:i] or mps (default: cpu)")
    g.add_argument("--threads", metavar="N",
                   help="torch CPU threads (default: 1 when QN*K <= 4e6, where more threads only "
                   "add overhead, else torch's default)")
    g = run.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="report folder (default: subriemann-report)")
    g.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in DIR: completed flows are kept, the "
                   "interrupted one and those stopped by the wall-time budget continue from "
                   "their checkpoints (give a larger --max-time to extend them); "
                   "without other options it continues with the settings stored in DIR")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the previous run in a non-empty DIR (its summary, report, "
                   "figures and flow files); without it such a DIR is refused")
    from subriemann.sweep import command as sweep_command

    sweep_command.add_parser(sub)
    return top


# -- the run ------------------------------------------------------------------------------
@dataclass
class _Problem:
    space: Any
    theta0: Any
    info: dict[str, Any]


def _say(msg: str) -> None:
    print(msg, flush=True)


def build_problem(opts: Options) -> _Problem:
    """Dataset, model and :class:`~subriemann.ParameterSpace` of a run (seeded)."""
    import torch

    import subriemann as sr
    from subriemann.datasets import labels_to_one_hot, load_dataset, smooth_labels
    from subriemann.models import count_parameters, load_model_file, mlp

    ds = load_dataset(opts.data, opts.n_samples, opts.seed)
    if opts.loss == "cross_entropy" and ds.task != "classification" and ds.labels is not None:
        ds = labels_to_one_hot(ds)  # integer class indices 0..C-1
    targets = ds.targets
    if opts.loss == "cross_entropy":
        if ds.task != "classification":
            raise UsageError(
                f"--loss cross_entropy needs class targets: one-hot (probability) rows with "
                f"Q >= 2, or integer labels 0..C-1 in an .npz, but data {opts.data!r} has "
                "real-valued targets: use --loss mse, a classification dataset (digits, iris), "
                "or one-hot encode the labels (np.eye(C)[labels])"
            )
        if opts.label_smoothing > 0:
            targets = smooth_labels(targets, opts.label_smoothing)
    elif opts.label_smoothing > 0:
        raise UsageError("--label-smoothing applies to --loss cross_entropy only")
    if "fisher" in [m.name for m in parse_metrics(opts.metrics)] and opts.loss != "cross_entropy":
        raise UsageError("metric 'fisher' (softmax Fisher) needs --loss cross_entropy")
    torch.manual_seed(opts.seed)
    if opts.model_file is not None:
        model = load_model_file(opts.model_file, ds.input_dim, ds.num_outputs)
        model_desc = f"model file {opts.model_file}"
    else:
        if ds.inputs.ndim != 2:
            ds.inputs = ds.inputs.reshape(ds.inputs.shape[0], -1)
        model = mlp(opts.model, ds.input_dim, ds.num_outputs, opts.activation)
        model_desc = f"{opts.model} {opts.activation}"
    model_desc += f", K = {count_parameters(model)}"
    space = sr.ParameterSpace(model, ds.inputs, targets, loss=opts.loss, device=opts.device)
    theta0 = space.initial_point()
    method = "svd" if space.output_dim * space.dim <= 8_000_000 else "ntk"
    sv = space.point_state(theta0).singular_values(method)
    tau = opts.rank_rtol * float(sv[0]) if sv.numel() else 0.0
    info = {
        "data": ds.name,
        "description": ds.description,
        "task": ds.task,
        "model": model_desc,
        "loss": opts.loss,
        "num_samples": space.num_samples,
        "num_outputs": space.num_outputs,
        "num_parameters": space.dim,
        "output_dim": space.output_dim,
        "overparametrized": bool(space.dim >= space.output_dim),
        "initial_cost": float(space.cost(theta0)),
        "sigma_max": float(sv[0]),
        "sigma_min": float(sv[-1]),
        "initial_rank": int((sv > tau).sum()),
    }
    return _Problem(space, theta0, info)


def _rel(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _stored_settings(out: Path) -> dict[str, Any] | None:
    """The settings of the run stored in ``out/summary.json`` (None when there is none)."""
    path = out / "summary.json"
    if not path.is_file():
        return None
    try:
        prev = json.loads(path.read_text())
        settings = prev["settings"]
        settings["fingerprint"]  # noqa: B018  (checked present)
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"--resume: cannot read {path}; start afresh without --resume") from None
    if not isinstance(settings, dict):
        raise UsageError(f"--resume: cannot read {path}; start afresh without --resume")
    return settings


def _with_stored(values: dict[str, Any], explicit: set[str]) -> dict[str, Any]:
    """``--resume``: the stored settings of ``--out`` under the options given explicitly."""
    stored = _stored_settings(Path(str(values["out"])))
    if stored is None:
        return values
    merged = dict(DEFAULTS)
    merged.update({k: v for k, v in stored.items() if k in DEFAULTS and k not in ("resume",)})
    merged.update({k: values[k] for k in explicit if k in values})
    merged["resume"] = True
    return merged


def _previous(out: Path, opts: Options) -> None:
    """``--resume``: refuse a folder holding a run with other settings, naming them."""
    stored = _stored_settings(out)
    if stored is None or stored["fingerprint"] == opts.fingerprint():
        return
    now = asdict(opts)
    diff = [
        f"{k}: {stored.get(k)!r} there, {now[k]!r} now"
        for k in now
        if k not in _NOT_FINGERPRINTED and stored.get(k) != now[k]
    ]
    raise UsageError(
        f"--resume: {out} holds a run with other settings ({'; '.join(diff) or 'fingerprint'}); "
        "drop those options to continue it with its own, or use another --out"
    )


def _check_out(out: Path, opts: Options) -> None:
    """Refuse a non-empty ``out`` unless resuming; with ``--overwrite`` clear the old run."""
    if not out.is_dir() or not any(out.iterdir()) or opts.resume:
        return
    if not opts.overwrite:
        raise UsageError(
            f"--out {out} is not empty (it holds a previous run or other files): give --resume "
            "to continue that run, --overwrite to replace it, or another --out"
        )
    import shutil

    for name in ("summary.json", "report.html"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "figures", ignore_errors=True)
    for f in (out / "flows").glob("*.npz") if (out / "flows").is_dir() else []:
        f.unlink()


def _run(opts: Options, command: str) -> int:
    import torch

    t_start = time.perf_counter()
    specs = parse_metrics(opts.metrics)
    threads_before = torch.get_num_threads()
    _check_out(Path(opts.out), opts)
    try:
        problem = build_problem(opts)
        threads = opts.threads
        if threads is None and problem.space.output_dim * problem.space.dim <= SMALL_PROBLEM:
            threads = 1
        if threads is not None:
            torch.set_num_threads(threads)
        return _run_flows(opts, command, specs, problem, t_start)
    finally:
        torch.set_num_threads(threads_before)


def _run_flows(opts: Options, command: str, specs: list[MetricSpec], problem: _Problem,
               t_start: float) -> int:
    import torch

    from subriemann.flow import gradient_flow
    from subriemann.plots import PlotFlow, all_figures
    from subriemann.report import (
        analyse_flow,
        build_summary,
        format_table,
        write_html,
        write_summary,
    )
    from subriemann.trajectory import Trajectory

    space, theta0, info = problem.space, problem.theta0, problem.info
    out = Path(opts.out)
    flows_dir = out / "flows"
    if opts.resume:
        _previous(out, opts)
    flows_dir.mkdir(parents=True, exist_ok=True)
    _say(f"subriemann run: {info['description']}")
    _say(f"  model {info['model']}; QN = {info['output_dim']}, rank D(θ0) = "
         f"{info['initial_rank']}, σ_max = {info['sigma_max']:.3g}, "
         f"σ_min = {info['sigma_min']:.3g}")
    _say(f"  flows: {', '.join(m.label for m in specs)}; s_end = {opts.s_end:g}, wall-time budget "
         f"{'none' if opts.max_time is None else f'{opts.max_time:g} s'} per flow; report in {out}")

    entries: list[dict[str, Any]] = []
    plot_flows: list[PlotFlow] = []
    settings = {**opts.settings(), "torch_threads": torch.get_num_threads()}

    def summary(complete: bool, figures: dict[str, str] | None = None,
                html_file: str | None = None) -> dict[str, Any]:
        return build_summary(settings=settings, problem=info, flows=entries, figures=figures,
                             complete=complete, html_file=html_file, command=command)

    interrupted = False
    saved: list[str] = []  # flows whose trajectory file is on disk
    write_summary(out, summary(complete=False))  # the settings, for --resume --out DIR alone
    try:
        for i, ms in enumerate(specs):
            ckpt = flows_dir / f"{ms.name}.ckpt.npz"
            final = flows_dir / f"{ms.name}.npz"
            space.equip_with_metric(ms.factory, rank_rtol=opts.rank_rtol, **ms.kwargs)
            traj = _kept_flow(final, ckpt, space, theta0, opts) if opts.resume else None
            kept = traj is not None
            if traj is not None:
                _say(f"[{i + 1}/{len(specs)}] {ms.label}: kept from the previous run "
                     f"({traj.status.code})")
            else:
                _say(f"[{i + 1}/{len(specs)}] {ms.label}")
                if not opts.resume:
                    ckpt.unlink(missing_ok=True)
                traj = gradient_flow(
                    space, theta0, opts.s_end, rtol=opts.rtol, atol=opts.atol,
                    max_time=opts.max_time, checkpoint=ckpt,
                    resume=ckpt if opts.resume else None, progress=opts.progress,
                )  # type: ignore[assignment]
            assert isinstance(traj, Trajectory)
            if traj.status.code == "interrupted":
                entry, _ = analyse_flow(traj, None, name=ms.name, spec=ms.spec, label=ms.label,
                                        lam=ms.lam, checkpoint_file=_rel(ckpt, out),
                                        deviation=False)
                entries.append(entry)
                interrupted = True
                break
            if not kept:
                traj.save(final)  # on disk before the post-processing: --resume reuses it
            saved.append(ms.name)
            kept_ckpt = traj.status.code in _BUDGET and ckpt.is_file()
            if not kept_ckpt:  # a flow stopped by its budget can be extended with --resume
                ckpt.unlink(missing_ok=True)
            entry, dev = analyse_flow(traj, space, name=ms.name, spec=ms.spec, label=ms.label,
                                      lam=ms.lam, trajectory_file=_rel(final, out),
                                      checkpoint_file=_rel(ckpt, out) if kept_ckpt else None)
            entries.append(entry)
            plot_flows.append(PlotFlow(ms.name, ms.label, traj, dev))
            write_summary(out, summary(complete=False))
            _say(f"      {traj.status.code} at s = {float(traj.s[-1]):.4g}, C = "
                 f"{float(traj.cost[-1]):.3e}, {traj.counters.get('n_steps', 0)} steps, "
                 f"{traj.counters.get('wall_time', 0.0):.1f} s")
        if not interrupted:
            _say("writing figures and report.html ...")
            paths = all_figures(plot_flows, out / "figures")
            figures = {k: _rel(p, out) for k, p in paths.items()}
            done = summary(complete=True, figures=figures, html_file="report.html")
            write_html(out, done)
            write_summary(out, done)
    except KeyboardInterrupt:
        interrupted = True
    if interrupted:
        write_summary(out, summary(complete=False))
        running = [e for e in entries if not e["completed"]]
        print(
            f"subriemann run: interrupted; {len(saved)} completed flow(s) and "
            + (f"the checkpoint {running[0]['checkpoint']} " if running else "")
            + f"are in {out} (summary.json); continue with --resume --out {out}",
            file=sys.stderr,
        )
        return 130
    _say("")
    _say(format_table(done))
    _say(f"\nreport: {out / 'report.html'}  ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


def _kept_flow(final: Path, ckpt: Path, space: Any, theta0: Any, opts: Options) -> Any:
    """``--resume``: the finished flow in ``final`` when it belongs to this run, else None.

    A flow stopped by its budget with a checkpoint is continued instead; a
    damaged file, or one computed for another problem or other settings, is
    recomputed.
    """
    from subriemann.flow.checkpoint import problem_fingerprint
    from subriemann.trajectory import Trajectory

    if not final.is_file():
        return None
    try:
        traj = Trajectory.load(final)
    except ValueError:
        return None
    if traj.status.code in _BUDGET and ckpt.is_file():
        return None
    same = traj.problem == problem_fingerprint(space, space.metric.description(), theta0)
    st = traj.settings
    if not same or (st.get("s_end"), st.get("rtol"), st.get("atol")) != (
        opts.s_end, opts.rtol, opts.atol
    ):
        return None
    return traj


def _command_line(argv: Sequence[str]) -> str:
    import shlex

    return "subriemann " + " ".join(shlex.quote(a) for a in argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``subriemann`` console script; returns the exit code.

    0: success; 2: bad input (one line on stderr, never a traceback); 130:
    interrupted (Ctrl-C), with the completed flows and the checkpoint kept.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            parser = _parser()
            ns = parser.parse_args(argv)
            if ns.command is None:
                parser.print_help()
                return 0
            if ns.command == "sweep":
                from subriemann.sweep import command as sweep_command

                return sweep_command.main(ns)
            given = vars(ns)
            given.pop("command")
            values = dict(DEFAULTS)
            config = given.pop("config", None)
            explicit = set(given)
            if config is not None:
                cfg = load_config(config)
                values.update(cfg)
                explicit |= set(cfg)
            values.update(given)
            if values.get("resume"):
                values = _with_stored(values, explicit)
            opts = _resolve(values, explicit)
            return _run(opts, _command_line(argv))
        except (UsageError, ValueError, TypeError, FileNotFoundError, OSError) as err:
            msg = " ".join(str(err).split()) or type(err).__name__
            if isinstance(err, (FileNotFoundError, OSError)) and not isinstance(err, UsageError):
                msg = msg if msg != type(err).__name__ else repr(err)
            print(f"subriemann: error: {msg}", file=sys.stderr)
            return 2
    except KeyboardInterrupt:
        print("subriemann: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
