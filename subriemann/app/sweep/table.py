r"""The sweep table: one row per cell, typed columns, as Parquet and CSV.

The columns are the fields of :class:`~subriemann.app.sweep.cells.CellResult`,
in that order, with Arrow types from their annotations (``int`` → int64,
``float`` → float64, ``bool`` → bool, ``str`` → string; every column is
nullable, a missing value is null in Parquet and empty in CSV).  ``status``
holds the flow's status code (:data:`subriemann.flow.trajectory.STATUS_CODES`) or
``"failed: <error>"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from subriemann.app.config import UsageError
from subriemann.app.sweep.cells import CellResult, column_types

__all__ = ["results_table", "write_table", "read_table", "require_pyarrow"]


def require_pyarrow() -> Any:
    """Import pyarrow, or raise a one-line error naming the extra to install."""
    try:
        import pyarrow
    except ImportError:
        raise UsageError(
            "subriemann sweep needs pyarrow: pip install 'subriemann[sweep]'"
        ) from None
    return pyarrow


def results_table(results: Sequence[CellResult]) -> Any:
    """The results as a typed :class:`pyarrow.Table` (rows in grid order)."""
    pa = require_pyarrow()
    arrow = {int: pa.int64(), float: pa.float64(), bool: pa.bool_(), str: pa.string()}
    types = column_types()
    schema = pa.schema([pa.field(name, arrow[t], nullable=True) for name, t in types.items()])
    rows = [asdict(r) for r in sorted(results, key=lambda r: r.index)]
    return pa.Table.from_pylist(rows, schema=schema)


def write_table(results: Sequence[CellResult], out: str | Path) -> tuple[Path, Path]:
    """Write ``out/results.parquet`` and ``out/results.csv`` (atomically); return their paths."""
    require_pyarrow()
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = results_table(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, writer in (("results.parquet", pq.write_table), ("results.csv", pcsv.write_csv)):
        path = out / name
        tmp = path.with_name(f".{name}.tmp")
        writer(table, str(tmp))
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``results.parquet`` as dicts (for tests and quick looks)."""
    require_pyarrow()
    import pyarrow.parquet as pq

    return pq.read_table(str(path)).to_pylist()
