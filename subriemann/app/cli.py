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
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

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
from subriemann.app.problem import Problem, build_problem, say

__all__ = ["main", "UsageError"]

_BUDGET = ("max_time_reached", "max_steps_reached")
SMALL_PROBLEM = 4_000_000
"""QN·K up to which ``subriemann run`` uses one torch thread unless ``--threads`` says otherwise."""


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
    from subriemann.app.sweep import command as sweep_command

    sweep_command.add_parser(sub)
    return top


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
        if k not in NOT_FINGERPRINTED and stored.get(k) != now[k]
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


def _run_flows(opts: Options, command: str, specs: list[MetricSpec], problem: Problem,
               t_start: float) -> int:
    import torch

    from subriemann.app.plots import PlotFlow, all_figures
    from subriemann.app.report import (
        analyse_flow,
        build_summary,
        format_table,
        write_html,
        write_summary,
    )
    from subriemann.flow import gradient_flow
    from subriemann.flow.trajectory import Trajectory

    space, theta0, info = problem.space, problem.theta0, problem.info
    out = Path(opts.out)
    flows_dir = out / "flows"
    if opts.resume:
        _previous(out, opts)
    flows_dir.mkdir(parents=True, exist_ok=True)
    say(f"subriemann run: {info['description']}")
    say(f"  model {info['model']}; QN = {info['output_dim']}, rank D(θ0) = "
         f"{info['initial_rank']}, σ_max = {info['sigma_max']:.3g}, "
         f"σ_min = {info['sigma_min']:.3g}")
    say(f"  flows: {', '.join(m.label for m in specs)}; s_end = {opts.s_end:g}, wall-time budget "
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
                say(f"[{i + 1}/{len(specs)}] {ms.label}: kept from the previous run "
                     f"({traj.status.code})")
            else:
                say(f"[{i + 1}/{len(specs)}] {ms.label}")
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
            say(f"      {traj.status.code} at s = {float(traj.s[-1]):.4g}, C = "
                 f"{float(traj.cost[-1]):.3e}, {traj.counters.get('n_steps', 0)} steps, "
                 f"{traj.counters.get('wall_time', 0.0):.1f} s")
        if not interrupted:
            say("writing figures and report.html ...")
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
    say("")
    say(format_table(done))
    say(f"\nreport: {out / 'report.html'}  ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


def _kept_flow(final: Path, ckpt: Path, space: Any, theta0: Any, opts: Options) -> Any:
    """``--resume``: the finished flow in ``final`` when it belongs to this run, else None.

    A flow stopped by its budget with a checkpoint is continued instead; a
    damaged file, or one computed for another problem or other settings, is
    recomputed.
    """
    from subriemann.flow.checkpoint import problem_fingerprint
    from subriemann.flow.trajectory import Trajectory

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
                from subriemann.app.sweep import command as sweep_command

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
            opts = resolve_options(values, explicit)
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
