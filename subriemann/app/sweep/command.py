"""``subriemann sweep CONFIG.toml --out DIR [--resume] [--scheduler ADDR] [--workers N]``.

Registered by :mod:`subriemann.app.cli`; runs :func:`~subriemann.app.sweep.runner.run_sweep`.
Exit codes: 0 all cells done (failed cells are listed on stderr, one line
each, and recorded in the table); 2 bad input (one line); 130 interrupted
(finished cells kept; continue with ``--resume``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from subriemann.app.config import UsageError
from subriemann.app.sweep.config import load_sweep_config
from subriemann.app.sweep.runner import require_distributed, run_sweep
from subriemann.app.sweep.table import require_pyarrow

__all__ = ["add_parser", "main"]


def add_parser(sub: Any) -> None:
    """Add the ``sweep`` subcommand to the ``subriemann`` subparsers ``sub``."""
    p = sub.add_parser(
        "sweep",
        help="run a grid of flows on a Dask cluster and write a table and a report",
        description="Run every cell of the grid in CONFIG.toml (one flow and its analysis "
        "each) on Dask: a local cluster of worker processes by default, or an existing "
        "cluster with --scheduler. Writes DIR/results.parquet, DIR/results.csv, "
        "DIR/strata.graphml and DIR/sweep_report.html; each cell's result is stored as it "
        "completes. See docs/sweep.md.",
    )
    p.add_argument("config", metavar="CONFIG.toml", help="the sweep config")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in DIR: finished cells are kept, the others run")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="an existing Dask scheduler (default: a local cluster)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="local worker processes (default: the number of cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")


def main(ns: argparse.Namespace) -> int:
    """Run ``subriemann sweep`` from parsed arguments; returns the exit code."""
    require_distributed()
    require_pyarrow()
    if ns.workers is not None and ns.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {ns.workers}")
    config = load_sweep_config(ns.config)
    n = len(config.cells())
    print(f"subriemann sweep: {n} cells from {ns.config} -> {ns.out}", flush=True)
    summary = run_sweep(config, ns.out, resume=ns.resume, scheduler=ns.scheduler,
                        workers=ns.workers, progress=ns.progress)
    for line in summary.failed:
        print(f"subriemann sweep: {line}", file=sys.stderr)
    if summary.interrupted:
        print(f"subriemann sweep: interrupted; {summary.n_skipped + summary.n_run} of {n} cells "
              f"are stored in {ns.out}; continue with --resume", file=sys.stderr)
        return 130
    print(f"subriemann sweep: {summary.n_run} cells run, {summary.n_skipped} kept, "
          f"{summary.n_failed} failed, {summary.wall_time:.0f} s; table "
          f"{summary.files['table']}, report {summary.files.get('report')}", flush=True)
    return 0
