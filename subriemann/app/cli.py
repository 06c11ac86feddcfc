r"""The ``subriemann`` command-line program.

``subriemann run`` runs the standard geometric analysis of a training problem
and writes a report folder (see :mod:`subriemann.app.report`)::

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

**Output**: progress bars (tqdm, on stderr) only when stderr is a terminal;
otherwise, in logs and pipes, one line per flow when it finishes.  Warnings
from the library reach the user as one line each, ``subriemann: warning:
...``, without the source line (:func:`one_line_warnings`).  After the table,
one line per prediction checked (the verdicts of :mod:`subriemann.app.verdicts`).

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

**Memory**: the program keeps memory it frees for reuse
(:func:`~subriemann.app.allocator.keep_freed_memory`: large temporaries then
cost no page faults; a quarter of a gradient on the digits CNN), so it holds
its peak memory until it exits.  ``SUBRIEMANN_MALLOC=default`` in the
environment leaves glibc's setting alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch

from subriemann import __version__
from subriemann.app import plots, report
from subriemann.app.allocator import set_up_from_environment
from subriemann.app.config import (
    DEFAULT_N_SAMPLES,
    DEFAULTS,
    METRIC_HELP,
    NOT_FINGERPRINTED,
    MetricSpec,
    Options,
    UsageError,
    load_config,
    parse_metrics,
    resolve_options,
)
from subriemann.app.plots import PlotFlow
from subriemann.app.problem import Problem, build_problem, say
from subriemann.app.sweep import command as sweep_command
from subriemann.flow import gradient_flow
from subriemann.flow.checkpoint import problem_fingerprint
from subriemann.flow.options import SMALL_PROBLEM
from subriemann.flow.trajectory import Trajectory

__all__ = ["main", "UsageError", "one_line_warnings"]

_BUDGET = ("max_time_reached", "max_steps_reached")
_PER_RUN = ("resume", "overwrite")  # how a run treats --out: never taken from the stored run


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line :class:`UsageError`s."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
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
    _problem_options(run.add_argument_group("problem"))
    _flow_options(run.add_argument_group("flows"))
    _output_options(run.add_argument_group("output"))
    sweep_command.add_parser(sub)
    return top


def _problem_options(g: Any) -> None:
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


def _flow_options(g: Any) -> None:
    g.add_argument("--metrics", metavar="LIST",
                   help=f"comma-separated metrics, one flow each: {METRIC_HELP} "
                   "(default: euclidean,interp:0.5,pullback)")
    g.add_argument("--s-end", dest="s_end", metavar="S", help="final flow time (default: 5)")
    g.add_argument("--rtol", metavar="RTOL", help="integrator relative tolerance (default: 1e-8)")
    g.add_argument("--atol", metavar="ATOL",
                   help="integrator absolute tolerance (default: rtol/100)")
    g.add_argument("--rank-rtol", dest="rank_rtol", metavar="RTOL",
                   help="rank threshold tau = RTOL * sigma_max(D(theta0)) (default: 1e-6)")
    g.add_argument("--rank-band", dest="rank_band", metavar="BETA",
                   help="band filter of the flows: singular values between tau and "
                   "BETA * sigma_max are weighed down smoothly instead of cut at tau "
                   "(docs/flows.md); 0 = the exact thresholded flow (default: 1e-3)")
    g.add_argument("--rank-every", dest="rank_every", metavar="N|auto",
                   help="singular values at every N-th accepted step of the flows whose field "
                   "cannot jump at a rank change (lambda < 1, euclidean); rank events are "
                   "still located between them (docs/scale.md); auto = 1 on small problems, "
                   "else so that the cadence costs at most about a third of the integration "
                   "(default: auto)")
    g.add_argument("--max-time", dest="max_time", metavar="SECONDS",
                   help="wall-time budget per flow; 0 = none (default: 60)")
    g.add_argument("--seed", metavar="SEED",
                   help="seed of the initialization and the data subset (default: 0)")
    g.add_argument("--device", metavar="DEVICE", help="cpu, cuda[:i] or mps (default: cpu)")
    g.add_argument("--threads", metavar="N",
                   help="torch CPU threads (default: 1 when QN*K <= 4e6, where more threads only "
                   "add overhead, else torch's default)")


def _output_options(g: Any) -> None:
    g.add_argument("--out", metavar="DIR", help="report folder (default: subriemann-report)")
    g.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (drawn only when stderr is a terminal; without "
                   "them each flow gets one line when it finishes)")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in DIR: completed flows are kept, the "
                   "interrupted one and those stopped by the wall-time budget continue from "
                   "their checkpoints (give a larger --max-time to extend them); "
                   "without other options it continues with the settings stored in DIR")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the previous run in a non-empty DIR (its summary, report, "
                   "figures and flow files); without it such a DIR is refused")


# -- the run ------------------------------------------------------------------------------
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
    merged.update({k: v for k, v in stored.items() if k in DEFAULTS and k not in _PER_RUN})
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
        f"{k}: {stored.get(k, DEFAULTS.get(k))!r} there, {now[k]!r} now"
        for k in now
        if k not in NOT_FINGERPRINTED and stored.get(k, DEFAULTS.get(k)) != now[k]
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
    for name in ("summary.json", "report.html"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "figures", ignore_errors=True)
    for f in (out / "flows").glob("*.npz") if (out / "flows").is_dir() else []:
        f.unlink()


def _run(opts: Options, command: str) -> int:
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


@dataclass
class _Run:
    """What a run has produced so far: the ``summary.json`` entries and the figures' flows."""

    out: Path
    settings: dict[str, Any]
    info: dict[str, Any]
    command: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    plot_flows: list[PlotFlow] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # flows whose trajectory file is on disk

    def summary(self, complete: bool,
                figures: dict[str, plots.ReportFigure] | None = None) -> dict[str, Any]:
        figs = figures or {}
        return report.build_summary(
            settings=self.settings, problem=self.info, flows=self.entries,
            figures={k: _rel(f.path, self.out) for k, f in figs.items()},
            captions={k: {"title": f.title, "caption": f.caption, "wide": f.wide}
                      for k, f in figs.items()},
            complete=complete, html_file="report.html" if figures else None,
            command=self.command)

    def write(self, complete: bool) -> None:
        report.write_summary(self.out, self.summary(complete))


def _announce(info: dict[str, Any], specs: list[MetricSpec], opts: Options) -> None:
    say(f"subriemann run: {info['description']}")
    say(f"  model {info['model']}; QN = {info['output_dim']}, rank D(θ0) = "
        f"{info['initial_rank']}, σ_max = {info['sigma_max']:.3g}, "
        f"σ_min = {info['sigma_min']:.3g}")
    budget = "none" if opts.max_time is None else f"{opts.max_time:g} s"
    say(f"  flows: {', '.join(m.label for m in specs)}; s_end = {opts.s_end:g}, wall-time budget "
        f"{budget} per flow; report in {opts.out}")


LARGE_PROBLEM_SAVES = 20
"""Evenly spaced saves of a flow when QN·K > SMALL_PROBLEM (50 below): each saved point costs
one spectrum of D, 5–10 s on the full digits set (docs/scale.md)."""


def _saves(space: Any) -> int:
    return 50 if space.output_dim * space.dim <= SMALL_PROBLEM else LARGE_PROBLEM_SAVES


def _one_flow(run: _Run, problem: Problem, opts: Options, ms: MetricSpec, tag: str,
              progress: bool) -> bool:
    """Run (or keep, with ``--resume``) one flow and record it; False if it was interrupted.

    Its trajectory is saved before the analysis, so that ``--resume`` reuses it
    even when Ctrl-C comes during the analysis.  Without a progress bar the
    flow gets one line, when it finishes.
    """
    space, flows_dir = problem.space, run.out / "flows"
    ckpt, final = flows_dir / f"{ms.name}.ckpt.npz", flows_dir / f"{ms.name}.npz"
    space.equip_with_metric(ms.factory, rank_rtol=opts.rank_rtol, **ms.kwargs)
    traj = _kept_flow(final, ckpt, space, problem.theta0, opts) if opts.resume else None
    kept = traj is not None
    if traj is None:
        if progress:
            say(f"{tag} {ms.label}")
        if not opts.resume:
            ckpt.unlink(missing_ok=True)
        traj = gradient_flow(
            space, problem.theta0, opts.s_end, rtol=opts.rtol, atol=opts.atol,
            max_time=opts.max_time, checkpoint=ckpt, resume=ckpt if opts.resume else None,
            progress=progress, rank_band=opts.rank_band, rank_every=opts.rank_every,
            min_saves=_saves(space),
        )
    assert isinstance(traj, Trajectory)
    names: dict[str, Any] = {"name": ms.name, "spec": ms.spec, "label": ms.label, "lam": ms.lam}
    if traj.status.code == "interrupted":
        entry, _ = report.analyse_flow(traj, None, checkpoint_file=_rel(ckpt, run.out),
                                       deviation=False, **names)
        run.entries.append(entry)
        return False
    if not kept:
        traj.save(final)  # on disk before the post-processing: --resume reuses it
    run.saved.append(ms.name)
    kept_ckpt = traj.status.code in _BUDGET and ckpt.is_file()
    if not kept_ckpt:  # a flow stopped by its budget can be extended with --resume
        ckpt.unlink(missing_ok=True)
    entry, dev = report.analyse_flow(
        traj, space, trajectory_file=_rel(final, run.out),
        checkpoint_file=_rel(ckpt, run.out) if kept_ckpt else None, **names)
    run.entries.append(entry)
    run.plot_flows.append(PlotFlow(ms.name, ms.label, traj, dev))
    run.write(complete=False)
    say(f"{tag} {ms.label}: {'kept from the previous run, ' if kept else ''}"
        f"{traj.status.code} at s = {float(traj.s[-1]):.4g}, C = {float(traj.cost[-1]):.3e}, "
        f"{traj.counters.get('n_steps', 0)} steps, {traj.counters.get('wall_time', 0.0):.1f} s")
    return True


def _finish(run: _Run) -> dict[str, Any]:
    """Figures, ``report.html`` and the complete ``summary.json``; the summary."""
    say("writing figures and report.html ...")
    figures = plots.all_figures(run.plot_flows, run.out / "figures")
    done = run.summary(complete=True, figures=figures)
    report.write_html(run.out, done)
    report.write_summary(run.out, done)
    return done


def _interrupted(run: _Run) -> int:
    run.write(complete=False)
    running = [e for e in run.entries if not e["completed"]]
    print(
        f"subriemann run: interrupted; {len(run.saved)} completed flow(s) and "
        + (f"the checkpoint {running[0]['checkpoint']} " if running else "")
        + f"are in {run.out} (summary.json); continue with --resume --out {run.out}",
        file=sys.stderr,
    )
    return 130


def _run_flows(opts: Options, command: str, specs: list[MetricSpec], problem: Problem,
               t_start: float) -> int:
    out = Path(opts.out)
    if opts.resume:
        _previous(out, opts)
    (out / "flows").mkdir(parents=True, exist_ok=True)
    _announce(problem.info, specs, opts)
    run = _Run(out, {**opts.settings(), "torch_threads": torch.get_num_threads()},
               problem.info, command)
    run.write(complete=False)  # the settings, for --resume --out DIR alone
    progress = opts.progress and sys.stderr.isatty()  # no bars in logs: one line per flow
    try:
        for i, ms in enumerate(specs):
            if not _one_flow(run, problem, opts, ms, f"[{i + 1}/{len(specs)}]", progress):
                return _interrupted(run)
        done = _finish(run)
    except KeyboardInterrupt:
        return _interrupted(run)
    say("")
    say(report.format_table(done))
    say("\npredictions of docs/theory.md:")
    say(report.format_verdicts(done))
    say(f"\nreport: {out / 'report.html'}  ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


def _kept_flow(final: Path, ckpt: Path, space: Any, theta0: Any, opts: Options) -> Any:
    """``--resume``: the finished flow in ``final`` when it belongs to this run, else None.

    A flow stopped by its budget with a checkpoint is continued instead; a
    damaged file, or one computed for another problem or other settings, is
    recomputed.
    """
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
    if not same or (st.get("s_end"), st.get("rtol"), st.get("atol"), st.get("rank_band")) != (
        opts.s_end, opts.rtol, opts.atol, opts.rank_band
    ):
        return None
    return traj


def _command_line(argv: Sequence[str]) -> str:
    return "subriemann " + " ".join(shlex.quote(a) for a in argv)


def _options(ns: argparse.Namespace) -> Options:
    """Defaults < config file < command line; with ``--resume`` the stored settings."""
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
    return resolve_options(values, explicit)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show warnings as one line each on stderr, ``subriemann: warning: ...``, for the block.

    No source file, line number or code line: the user of the command did not
    write the library.  The warning filters apply as usual (each warning once
    per place); ``warnings.showwarning`` is restored afterwards.
    """
    previous = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        text = " ".join(str(message).split())
        kind = "" if category is UserWarning else f" ({category.__name__})"
        print(f"subriemann: warning: {text}{kind}", file=sys.stderr, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``subriemann`` console script; returns the exit code.

    0: success; 2: bad input (one line on stderr, never a traceback); 130:
    interrupted (Ctrl-C), with the completed flows and the checkpoint kept.
    Warnings reach stderr as one line each (:func:`one_line_warnings`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    set_up_from_environment()  # large temporaries without page faults (app/allocator.py)
    try:
        with one_line_warnings():
            parser = _parser()
            ns = parser.parse_args(argv)
            if ns.command is None:
                parser.print_help()
                return 0
            if ns.command == "sweep":
                return sweep_command.main(ns)
            return _run(_options(ns), _command_line(argv))
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
