r"""The output folder of a sweep: atomic per-cell results, resume, config fingerprint.

Layout of ``DIR``::

    sweep.json              the config's fingerprinted part and its fingerprint
    cells/cell-0007.json    the cell's table row (written last: it marks the cell done)
    cells/cell-0007.npz     its trajectory (subriemann.flow.trajectory format)
    checkpoints/            flow checkpoints of running cells (removed when a cell is done)
    results.parquet, results.csv, strata.graphml, sweep_report.html

Every file is written to a temporary name and renamed into place
(``os.replace``), so a kill at any moment leaves either the old file or the
new one, never half of one.  A cell counts as finished when its ``.json``
exists; ``--resume`` skips finished cells and runs the others again, the
failed ones included (their error may have been a lost worker).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from subriemann.app.config import UsageError
from subriemann.app.sweep.cells import CellOutcome, CellResult
from subriemann.app.sweep.config import SweepConfig, config_diff
from subriemann.flow.trajectory import Trajectory

__all__ = ["SweepStore", "FORMAT", "atomic_write_bytes"]

FORMAT = "subriemann.app.sweep/1"
"""The ``format`` field of ``sweep.json``."""


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _finite_json(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    return obj


class SweepStore:
    """The output folder of one sweep.

    Parameters
    ----------
    out : path
        The folder.
    config : SweepConfig
    """

    def __init__(self, out: str | Path, config: SweepConfig) -> None:
        self.out = Path(out)
        self.config = config
        self.cells_dir = self.out / "cells"
        self.checkpoint_dir = self.out / "checkpoints"

    def open(self, resume: bool) -> None:
        """Create the folder, or check that it holds this sweep when resuming.

        A folder whose sweep has no finished cell yet (e.g. the scheduler
        could not be reached) is taken over without ``resume``.

        Raises
        ------
        UsageError
            ``DIR`` holds finished cells and ``resume`` is false; or ``resume``
            and it holds a sweep of another config (the differing keys are named).
        """
        meta = self.out / "sweep.json"
        if meta.is_file():
            try:
                prev = json.loads(meta.read_text())
                old, fp = prev["config"], prev["fingerprint"]
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"{meta} is not a sweep record; use another --out") from None
            done = len(self._done_files())
            if not resume and done:
                raise UsageError(f"{self.out} already holds a sweep ({done} finished cells): "
                                 "continue it with --resume or use another --out")
            if resume and fp != self.config.fingerprint():
                diff = config_diff(old, self.config.identity())
                more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
                raise UsageError(f"--resume: the config differs from the sweep in {self.out}: "
                                 + "; ".join(diff[:3]) + more + "; use another --out")
            if resume:
                return
        record = {
            "format": FORMAT,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": self.config.fingerprint(),
            "source": self.config.source,
            "n_cells": len(self.config.cells()),
            "config": self.config.identity(),
        }
        atomic_write_bytes(meta, (json.dumps(record, indent=2) + "\n").encode())

    def _done_files(self) -> list[Path]:
        return sorted(self.cells_dir.glob("cell-*.json")) if self.cells_dir.is_dir() else []

    def result_path(self, cell_id: str) -> Path:
        """``cells/<cell>.json``."""
        return self.cells_dir / f"{cell_id}.json"

    def trajectory_path(self, cell_id: str) -> Path:
        """``cells/<cell>.npz``."""
        return self.cells_dir / f"{cell_id}.npz"

    def results(self) -> list[CellResult]:
        """Every stored cell result, in grid order."""
        out = []
        for p in self._done_files():
            try:
                out.append(CellResult(**json.loads(p.read_text())))
            except (ValueError, TypeError) as err:
                raise UsageError(f"cannot read the cell result {p}: {err}") from None
        return sorted(out, key=lambda r: r.index)

    def finished(self) -> set[str]:
        """Cells that need no rerun: stored and not failed."""
        return {r.cell for r in self.results() if not r.failed}

    def write(self, outcome: CellOutcome) -> None:
        """Store a cell atomically: its trajectory first, then its row (the done marker)."""
        res = outcome.result
        npz = self.trajectory_path(res.cell)
        if outcome.trajectory is not None:
            self.cells_dir.mkdir(parents=True, exist_ok=True)
            outcome.trajectory.save(npz)
        else:
            npz.unlink(missing_ok=True)
        row = {k: _finite_json(v) for k, v in asdict(res).items()}
        atomic_write_bytes(self.result_path(res.cell), (json.dumps(row, indent=1) + "\n").encode())

    def trajectory(self, cell_id: str) -> Trajectory | None:
        """The stored trajectory of a cell, or None."""
        p = self.trajectory_path(cell_id)
        return Trajectory.load(p) if p.is_file() else None
