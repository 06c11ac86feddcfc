"""Sweeps of many flows on Dask: ``subriemann sweep CONFIG.toml --out DIR``.

One home per idea:

* :mod:`~subriemann.app.sweep.config`: the TOML grid, its validation and fingerprint;
* :mod:`~subriemann.app.sweep.cells`: one cell = one flow and its analysis → :class:`CellResult`;
* :mod:`~subriemann.app.sweep.runner`: Dask distributed (a LocalCluster, or ``--scheduler``);
* :mod:`~subriemann.app.sweep.store`: atomic per-cell results in the output folder, resume;
* :mod:`~subriemann.app.sweep.table`: the tidy table (Parquet and CSV);
* :mod:`~subriemann.app.sweep.report`: ``sweep_report.html`` and the strata graph (GraphML).

Dask and pyarrow are the ``sweep`` extra (``pip install 'subriemann[sweep]'``);
they are imported only when a sweep runs.  Guide: docs/sweep.md.
"""

from subriemann.app.sweep.cells import CellOutcome, CellResult, run_cell
from subriemann.app.sweep.config import CellSpec, SweepConfig, load_sweep_config, parse_sweep_config
from subriemann.app.sweep.runner import SweepSummary, connect, run_sweep

__all__ = [
    "CellOutcome",
    "CellResult",
    "CellSpec",
    "SweepConfig",
    "SweepSummary",
    "connect",
    "load_sweep_config",
    "parse_sweep_config",
    "run_cell",
    "run_sweep",
]
