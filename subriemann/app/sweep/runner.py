r"""Run a sweep on Dask distributed: a local cluster by default, or any cluster by address.

:func:`run_sweep` submits one task per unfinished cell
(:func:`~subriemann.app.sweep.cells.run_cell`) and stores each result as it
arrives (:class:`~subriemann.app.sweep.store.SweepStore`), then writes the
table, the strata graph and ``sweep_report.html``.

* **Where.**  Without a scheduler address, a :class:`distributed.LocalCluster`
  of worker *processes* with one thread each (torch's forward-mode AD state is
  process-global, and one torch thread per cell is fastest at these sizes);
  ``OMP_NUM_THREADS=MKL_NUM_THREADS=1`` in the workers, and each cell sets
  ``torch.set_num_threads(run.threads)``.  With ``scheduler="tcp://HOST:PORT"``
  the same tasks go to an existing cluster (docs/sweep.md says how to start
  one); its workers need subriemann installed and must see the model files,
  the ``.npz`` data and, for resuming a killed cell from its checkpoint, the
  output folder (on a shared file system; without one a retried cell starts
  afresh, which gives the same result).
* **Faults.**  A worker that dies is replaced (the nanny restarts it) and the
  scheduler reruns its cells elsewhere; a rerun continues from the flow's
  checkpoint.  A task that raises is retried ``run.retries`` times.  A cell
  whose error is in the cell itself (bad model, NaN at the start) is not
  retried: it is recorded as failed and the sweep goes on.  Ctrl-C cancels
  the running cells and keeps every finished one; ``resume=True`` continues.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from subriemann._warnings import one_line
from subriemann.app.config import UsageError
from subriemann.app.sweep.cells import CellOutcome, CellResult, failed_outcome, run_cell
from subriemann.app.sweep.config import CellSpec, SweepConfig
from subriemann.app.sweep.report import write_sweep_report
from subriemann.app.sweep.store import SweepStore
from subriemann.app.sweep.table import write_table

__all__ = ["run_sweep", "SweepSummary", "require_distributed", "connect"]

_WORKER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass
class SweepSummary:
    """What :func:`run_sweep` did.

    Attributes
    ----------
    out : Path
    n_cells, n_skipped, n_run, n_failed : int
        Cells in the grid; already finished (resume); run now; failed in all.
    interrupted : bool
        Ctrl-C stopped the sweep (finished cells are kept; resume to go on).
    failed : list of str
        ``"<cell label>: <error>"`` for every failed cell.
    files : dict
        ``table``, ``csv``, ``graphml``, ``report`` → path (when written).
    wall_time : float
        Seconds, connection and report included.
    dashboard : str or None
        Dask's dashboard address while the sweep ran.
    """

    out: Path
    n_cells: int
    n_skipped: int = 0
    n_run: int = 0
    n_failed: int = 0
    interrupted: bool = False
    failed: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    wall_time: float = 0.0
    dashboard: str | None = None


def require_distributed() -> Any:
    """Import :mod:`distributed`, or raise a one-line error naming the extra to install."""
    try:
        import distributed
    except ImportError:
        raise UsageError(
            "subriemann sweep needs dask[distributed]: pip install 'subriemann[sweep]'"
        ) from None
    return distributed


def connect(scheduler: str | None = None, workers: int | None = None, *,
            timeout: float = 10.0, dashboard: bool = True) -> tuple[Any, Any]:
    """A Dask client: to ``scheduler`` when given, else to a new LocalCluster.

    Parameters
    ----------
    scheduler : str, optional
        ``tcp://HOST:PORT`` of a running scheduler.
    workers : int, optional
        LocalCluster worker processes (default: the number of cores).
    timeout : float
        Seconds to reach the scheduler.
    dashboard : bool
        Serve Dask's dashboard (on a free port; needs bokeh).

    Returns
    -------
    client, cluster
        ``cluster`` is None for an existing cluster; close both when done.

    Raises
    ------
    UsageError
        When the scheduler cannot be reached within ``timeout`` (one line).
    """
    distributed = require_distributed()
    if scheduler is not None:
        try:
            return distributed.Client(scheduler, timeout=timeout, set_as_default=False), None
        except (OSError, TimeoutError, ValueError, TypeError) as err:
            raise UsageError(f"cannot reach the Dask scheduler at {scheduler} within "
                             f"{timeout:g} s ({one_line(err)})") from None
    if dashboard:
        try:
            import bokeh  # noqa: F401
        except ImportError:
            dashboard = False
    n = workers or os.cpu_count() or 1
    cluster = distributed.LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True,
        dashboard_address=":0" if dashboard else None, env=dict(_WORKER_ENV),
        silence_logs=logging.ERROR,
    )
    return distributed.Client(cluster, set_as_default=False), cluster


def _task(cell: CellSpec, checkpoint_dir: str | None, threads: int) -> CellOutcome:
    """The Dask task of one cell (top level, so that workers can import it)."""
    outcome = run_cell(cell, checkpoint_dir, threads)
    try:
        from distributed import get_worker

        outcome.result.worker = str(get_worker().address)
    except (ImportError, ValueError):
        pass
    return outcome


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def run_sweep(config: SweepConfig, out: str | Path, *, resume: bool = False,
              scheduler: str | None = None, workers: int | None = None, client: Any = None,
              progress: bool = True, report: bool = True, quiet: bool = False) -> SweepSummary:
    """Run (or continue) a sweep and write its results to ``out``.

    Parameters
    ----------
    config : SweepConfig
        From :func:`~subriemann.app.sweep.config.load_sweep_config`.
    out : path
        Output folder (see :mod:`subriemann.app.sweep.store`).
    resume : bool
        Continue the sweep in ``out``: finished cells are kept, the others run.
    scheduler : str, optional
        Address of an existing Dask scheduler (overrides ``config.run``).
    workers : int, optional
        LocalCluster workers (overrides ``config.run``).
    client : distributed.Client, optional
        Use this client (and its cluster) instead of connecting.
    progress, quiet : bool
        Progress bar; no messages at all.
    report : bool
        Write the strata graph and ``sweep_report.html`` at the end.

    Returns
    -------
    SweepSummary

    Raises
    ------
    UsageError
        A bad output folder, a changed config on resume, an unreachable scheduler.
    """
    t0 = time.perf_counter()
    cells = config.cells()
    store = SweepStore(out, config)
    store.open(resume)
    done = store.finished()
    pending = [c for c in cells if c.cell_id not in done]
    summary = SweepSummary(Path(out), len(cells), n_skipped=len(cells) - len(pending))
    run = config.run
    if pending:
        own = client is None
        cluster = None
        if own:
            client, cluster = connect(scheduler or run["scheduler"], workers or run["workers"],
                                      timeout=run["connect_timeout"], dashboard=not quiet)
        try:
            summary.dashboard = getattr(client, "dashboard_link", None) if own else None
            if summary.dashboard:
                _say(f"dashboard: {summary.dashboard}", quiet)
            _submit_all(client, pending, store, summary, progress and not quiet)
        finally:
            if own:
                client.close()
                if cluster is not None:
                    cluster.close()
    _finish(store, summary, report)
    summary.wall_time = time.perf_counter() - t0
    return summary


def _submit_all(client: Any, pending: list[CellSpec], store: SweepStore,
                summary: SweepSummary, progress: bool) -> None:
    from distributed import as_completed
    from tqdm.auto import tqdm

    run = store.config.run
    tag = uuid.uuid4().hex[:8]
    ckpt = str(store.checkpoint_dir.resolve())
    futures = {
        client.submit(_task, c, ckpt, run["threads"], key=f"{c.cell_id}-{tag}", pure=False,
                      retries=run["retries"]): c
        for c in pending
    }
    bar = tqdm(total=summary.n_cells, initial=summary.n_skipped, unit="cell", desc="sweep",
               disable=not progress, file=sys.stderr)
    try:
        for fut in as_completed(futures, loop=client.loop):
            cell = futures[fut]
            try:
                outcome = fut.result()
            except Exception as err:  # a lost task (KilledWorker after the retries, ...)
                outcome = failed_outcome(cell, err)
            store.write(outcome)
            summary.n_run += 1
            bar.update(1)
    except KeyboardInterrupt:
        summary.interrupted = True
        client.cancel(list(futures))
    finally:
        bar.close()


def _finish(store: SweepStore, summary: SweepSummary, report: bool) -> None:
    results = store.results()
    summary.failed = [f"{_label(store, r)}: {r.status[len('failed: '):]}"
                      for r in results if r.failed]
    summary.n_failed = len(summary.failed)
    summary.files["table"], summary.files["csv"] = write_table(results, store.out)
    if report and not summary.interrupted:
        summary.files.update(write_sweep_report(store, results))


def _label(store: SweepStore, r: CellResult) -> str:
    cells = store.config.cells()
    return cells[r.index].label if r.index < len(cells) else r.cell
