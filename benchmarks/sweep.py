"""Throughput and overhead of ``subriemann sweep`` on Dask, measured side by side.

    python benchmarks/sweep.py               # 16 cells of >= 2 s, 1 and 2 workers
    python benchmarks/sweep.py --quick       # 4 tiny cells (smoke test)

One run measures, on the same grid:

* ``serial``: every cell in this process, one after the other (``run_cell``);
* ``dask-1``, ``dask-2``: the sweep on a LocalCluster of 1 worker process, then
  of 2 (the same cluster scaled up), one torch thread each, workers warmed
  (torch imported) before the clock starts; the start-up is reported separately.

Figures (written to ``benchmarks/sweep_results.json`` and ``benchmarks/SWEEP_RESULTS.md``):

* throughput in cells per minute; speed-up ``dask-2 / dask-1`` (goal >= 1.8 on 2 cores);
* scheduler overhead per cell: ``(wall(dask-1) - sum of the cells' own times) / n``,
  as a fraction of the mean cell time (goal < 5 % for cells of >= 2 s);
* the client's time to store one result (json + npz, atomic);
* a paper estimate of a 10^4-cell sweep on 64 workers, with its assumptions.

The throughput needs an idle machine: on a loaded one the ratios are still
side by side, the absolute times are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from subriemann.app.sweep import connect, parse_sweep_config, run_cell, run_sweep  # noqa: E402
from subriemann.app.sweep.store import SweepStore  # noqa: E402

FULL = {  # 16 cells (QN = 48, K = 193 ... 4545), about 2-4 s each on one idle core
    "grid": {"data": "teacher", "n_samples": 48, "width": [32, 64], "depth": [1, 2],
             "metric": ["interp:0.5", "pullback"], "seed": [0, 1]},
    "flow": {"s_end": 6.0, "rtol": 1e-9, "max_time": 120.0},
}
QUICK = {
    "grid": {"data": "teacher", "n_samples": 4, "width": [2, 4], "metric": ["pullback"],
             "seed": [0, 1]},
    "flow": {"s_end": 0.3, "rtol": 1e-5},
}
ESTIMATE_CELLS, ESTIMATE_WORKERS = 10_000, 64
SCHEDULER_S_PER_TASK = 1e-3  # Dask's documented order of scheduler overhead per task


def serial(cfg) -> dict:
    cells = cfg.cells()
    run_cell(cells[0])  # warm-up (imports, first torch.func call)
    t0 = time.perf_counter()
    times = [run_cell(c).result.cell_wall_time for c in cells]
    wall = time.perf_counter() - t0
    return {"route": "serial", "workers": 0, "wall": wall, "cells": len(cells),
            "cells_per_min": 60 * len(cells) / wall, "mean_cell": sum(times) / len(times)}


def _measure(cfg, client, workers: int, startup: float) -> dict:
    from subriemann.app.sweep.cells import CellOutcome

    with tempfile.TemporaryDirectory() as tmp:
        s = run_sweep(cfg, tmp, client=client, progress=False, report=False, quiet=True)
        store = SweepStore(tmp, cfg)
        res = store.results()
        cell_sum = sum(r.cell_wall_time or 0.0 for r in res)
        t1 = time.perf_counter()
        for r in res[:4]:  # the client's time to store one result (json + npz)
            store.write(CellOutcome(r, store.trajectory(r.cell)))
        write = (time.perf_counter() - t1) / min(4, len(res))
    n, wall = len(res), s.wall_time
    return {"route": f"dask-{workers}", "workers": workers, "wall": wall, "cells": n,
            "failed": s.n_failed, "cells_per_min": 60 * n / wall, "startup": startup,
            "mean_cell": cell_sum / n, "overhead_per_cell": (wall * workers - cell_sum) / n,
            "store_write": write}


def on_dask(cfg) -> list[dict]:
    """The sweep on 1 worker, then on 2 (the same cluster scaled up; workers warmed)."""
    t0 = time.perf_counter()
    client, cluster = connect(None, 1, dashboard=False)
    rows = []
    try:
        for workers in (1, 2):
            if workers > 1:
                t0 = time.perf_counter()
                cluster.scale(workers)
                client.wait_for_workers(workers)
            client.run(lambda: __import__("subriemann.app.sweep.cells"))  # import torch
            rows.append(_measure(cfg, client, workers, time.perf_counter() - t0))
    finally:
        client.close()
        cluster.close()
    return rows


def estimate(mean_cell: float, overhead: float, write: float, startup: float) -> dict:
    """Paper estimate of ESTIMATE_CELLS cells on ESTIMATE_WORKERS workers."""
    waves = math.ceil(ESTIMATE_CELLS / ESTIMATE_WORKERS)
    per_cell = mean_cell + max(overhead, 0.0)
    compute = waves * per_cell
    client = ESTIMATE_CELLS * (write + SCHEDULER_S_PER_TASK)  # serial work on client+scheduler
    total = max(compute, client) + mean_cell + startup  # + one straggler wave, + start-up
    return {
        "cells": ESTIMATE_CELLS, "workers": ESTIMATE_WORKERS, "waves": waves,
        "seconds": total, "hours": total / 3600, "client_seconds": client,
        "client_bound": client > compute,
        "assumptions": [
            f"every cell takes the measured mean {mean_cell:.2f} s on one worker core "
            "(cells of one size; a grid of wider nets scales with their cell time)",
            f"per-cell overhead as measured here with 1 worker ({overhead:.3f} s)",
            f"the scheduler spends ~{SCHEDULER_S_PER_TASK * 1e3:g} ms per task (Dask's "
            f"documented order) and the client {write * 1e3:.1f} ms storing a result; both "
            "are serial and overlap with the workers' computing",
            "64 workers of one core each, one torch thread, data and model files on every "
            "worker; no worker lost (a lost worker reruns its cell from its checkpoint)",
            "one extra cell time for the last, partly filled wave, plus the measured start-up",
        ],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="4 tiny cells (smoke test)")
    p.add_argument("--out", default=str(HERE), help="folder for the results files")
    a = p.parse_args(argv)
    cfg = parse_sweep_config(QUICK if a.quick else FULL)
    rows = [serial(cfg), *on_dask(cfg)]
    d1, d2 = rows[1], rows[2]
    ratio = d2["cells_per_min"] / d1["cells_per_min"]
    overhead = d1["overhead_per_cell"] / d1["mean_cell"]
    res = {
        "quick": a.quick, "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                      "loadavg": os.getloadavg()},
        "config": cfg.identity(), "routes": rows,
        "speedup_2_over_1": ratio, "overhead_fraction": overhead,
        "goals": {"speedup >= 1.8": ratio >= 1.8,
                  "overhead < 5% (cells >= 2 s)":
                      overhead < 0.05 if d1["mean_cell"] >= 2 else None},
        "estimate": estimate(d1["mean_cell"], d1["overhead_per_cell"], d1["store_write"],
                             d1["startup"]),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_results.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = ["# subriemann sweep: throughput (benchmarks/sweep.py)", "",
             f"{'quick smoke run' if a.quick else 'full run'}; {os.cpu_count()} CPUs; load "
             f"average at the end {os.getloadavg()[0]:.1f}", "",
             "| route | workers | cells | wall (s) | cells/min | mean cell (s) "
             "| overhead/cell (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['route']} | {r['workers']} | {r['cells']} | {r['wall']:.1f} | "
                     f"{r['cells_per_min']:.1f} | {r['mean_cell']:.2f} | "
                     f"{r.get('overhead_per_cell', float('nan')):.3f} |")
    e = res["estimate"]
    lines += ["", f"speed-up 2 workers / 1 worker: **{ratio:.2f}x** (goal >= 1.8)",
              f"scheduler overhead per cell (1 worker): **{100 * overhead:.1f} %** of the mean "
              f"cell time {d1['mean_cell']:.2f} s (goal < 5 % for cells >= 2 s)",
              f"cluster start-up: {d1['startup']:.1f} s (1 worker); adding the second worker: "
              f"{d2['startup']:.1f} s", "",
              f"## Estimate: {e['cells']} cells on {e['workers']} workers: "
              f"{e['hours']:.2f} h ({e['waves']} waves)", ""]
    lines += [f"- {s}" for s in e["assumptions"]]
    (out / ("SWEEP_RESULTS.md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
