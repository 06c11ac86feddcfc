"""Sweeps of many flows on Dask: ``subriemann sweep CONFIG.toml --out DIR``.

One home per idea:

* :mod:`~subriemann.sweep.config`: the TOML grid, its validation and fingerprint;
* :mod:`~subriemann.sweep.cells`: one cell = one flow and its analysis → :class:`CellResult`;
* :mod:`~subriemann.sweep.runner`: Dask distributed (a LocalCluster, or ``--scheduler``);
* :mod:`~subriemann.sweep.store`: atomic per-cell results in the output folder, resume;
* :mod:`~subriemann.sweep.table`: the tidy table (Parquet and CSV);
* :mod:`~subriemann.sweep.report`: ``sweep_report.html`` and the strata graph (GraphML).

Dask and pyarrow are the ``sweep`` extra (``pip install 'subriemann[sweep]'``);
they are imported only when a sweep runs.  Guide: docs/sweep.md.
"""

from subriemann.sweep.cells import CellOutcome, CellResult, run_cell
from subriemann.sweep.config import CellSpec, SweepConfig, load_sweep_config, parse_sweep_config
from subriemann.sweep.runner import SweepSummary, connect, run_sweep

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
