"""Geometry at data scale (issue 17): every solver route side by side, and full-digits flows.

    python benchmarks/scale.py            # S, M, L, digits-mlp, digits-cnn + 3 flows to s = 5
    python benchmarks/scale.py --quick    # S and a 60-sample digits run (smoke test)

One λ = 0.5 Riemannian gradient per route (``ntk`` dense push-through, ``svd``,
``cg`` = ``matrix_free`` unpreconditioned CG, ``nystrom`` = Nyström PCG), each in
its own process so that its peak RSS (``ru_maxrss``) is its own: the first
gradient at a point (for ``nystrom`` including the preconditioner build) and a
second one at a nearby point (the preconditioner reused), with CG iterations.
Then one ``subriemann run`` per default metric on full digits to ``s_end = 5``
(the flows of the CLI, run as the user would), with their status, steps and
time, and the share of the rank monitor in a flow step.  Results go into the
section *Scale* of ``benchmarks/RESULTS.md`` (replaced in place, atomically)
and ``benchmarks/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROUTES = ["ntk", "svd", "matrix_free", "nystrom"]
PROBLEMS = ["S", "M", "L", "digits-mlp", "digits-cnn"]
DENSE_BYTES = 3e9  # a dense route whose D and Gram exceed this is not run (memory budget)
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"


def _space(problem: str):
    import torch

    import subriemann as sr

    if problem.startswith("digits"):
        from subriemann.app.datasets import load_dataset
        from subriemann.app.models import mlp

        n = 200 if problem.endswith("-small") else 1797
        ds = load_dataset("digits", n, 0)
        torch.manual_seed(0)
        x = ds.inputs.reshape(n, -1)
        if "cnn" in problem:
            net = torch.nn.Sequential(
                torch.nn.Unflatten(1, (1, 8, 8)),
                torch.nn.Conv2d(1, 16, 3, padding=1),
                torch.nn.Tanh(),
                torch.nn.Conv2d(16, 16, 3, padding=1),
                torch.nn.Tanh(),
                torch.nn.Flatten(),
                torch.nn.Linear(1024, 10),
            )
        else:
            net = mlp("mlp:32,32", ds.input_dim, ds.num_outputs, "tanh")
        return sr.ParameterSpace(net, x, ds.targets, loss="cross_entropy")
    sys.path.insert(0, str(HERE))
    from run import _problem

    net, x, y = _problem(problem)
    return sr.ParameterSpace(net, x, y)


def worker(problem: str, route: str) -> dict:
    import torch

    from subriemann.metrics import InterpolatedMetric

    sp = _space(problem)
    qn, k = sp.output_dim, sp.dim
    row = {"problem": problem, "route": route, "K": k, "QN": qn}
    small = min(qn, k)
    dense = 8.0 * (qn * k + small * small)
    if route in ("ntk", "svd") and dense > DENSE_BYTES:
        return {**row, "skipped": f"dense D and Gram need {dense / 1e9:.1f} GB"}
    if route == "svd" and qn * k > 8e7:
        return {**row, "skipped": "SVD of D: minutes"}
    theta = sp.initial_point()
    m = sp.equip_with_metric(InterpolatedMetric, lam=0.5, solver=route).metric
    sp.cost_grad(theta + 1.0)  # warm-up (imports, engine set-up)
    t0 = time.perf_counter()
    sp.cost_grad(theta)
    row["plain_ms"] = 1e3 * (time.perf_counter() - t0)
    times, iters = [], []
    for i in range(2):
        point = theta + 1e-3 * i * torch.ones_like(theta)
        t0 = time.perf_counter()
        m.gradient(point)
        times.append(time.perf_counter() - t0)
        info = m.last_solve
        iters.append(None if info is None or route in ("ntk", "svd") else info.iterations)
    row.update(first_s=times[0], second_s=times[1], iterations=iters)
    nys = getattr(m, "_nystrom", None)
    if nys is not None and nys.precond is not None:
        row["precond_rank"] = nys.precond.rank
    row["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def run_worker(problem: str, route: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", problem, route]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, check=True, env=env
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"problem": problem, "route": route, "error": f"timeout after {timeout:.0f} s"}
    except subprocess.CalledProcessError as err:
        tail = (err.stderr or "").strip().splitlines()[-1:] or ["?"]
        return {"problem": problem, "route": route, "error": tail[0][:200]}


def flows(n_samples: int, s_end: float, budget: float) -> list[dict]:
    """The CLI's default three flows on digits, as a user runs them; summary per flow."""
    out = Path(tempfile.mkdtemp(prefix="scale-flows-"))
    cmd = [
        sys.executable,
        "-m",
        "subriemann",
        "run",
        "--data",
        "digits",
        "--n-samples",
        str(n_samples),
        "--loss",
        "cross_entropy",
        "--s-end",
        str(s_end),
        "--max-time",
        str(budget),
        "--no-progress",
        "--out",
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    t0 = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    total = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    rows = []
    for f in summary.get("flows", []):
        row = {k: f.get(k) for k in ("label", "s_final", "n_steps", "nfev", "n_rejected")}
        row["status"] = f.get("status", {}).get("code")
        row["wall_time"] = round(float(f.get("wall_time") or 0.0), 1)
        row["s_final"] = round(float(row["s_final"] or 0.0), 4)
        rows.append(row)
    return [{"total_s": total, "n_samples": n_samples, "s_end": s_end, "report": str(out)}] + rows


def render(res: dict) -> str:
    lines = [
        BEGIN,
        "## Scale (issue 17): routes at λ = 0.5 and full-digits flows",
        "",
        f"`python benchmarks/scale.py{' --quick' if res['quick'] else ''}` on "
        f"{res['cores']} cores ({res['platform']}, torch {res['torch']}), float64.  "
        "One process per row (peak RSS includes ~0.3 GB of interpreter and torch).  "
        "*first*: a gradient at a new point (Nyström: with its preconditioner build); "
        "*second*: at a nearby point (preconditioner reused).",
        "",
        "| problem | K | QN | route | plain gradient (ms) | first (s) | second (s) | "
        "CG iterations | Nyström rank | peak RSS (MB) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["gradients"]:
        note = r.get("skipped") or r.get("error") or ""
        its = r.get("iterations") or []
        lines.append(
            f"| {r['problem']} | {r.get('K', '')} | {r.get('QN', '')} | {r['route']} | "
            + (
                f"{r['plain_ms']:.1f} | {r['first_s']:.3f} | {r['second_s']:.3f} | "
                f"{' / '.join('' if i is None else str(i) for i in its)} | "
                f"{r.get('precond_rank', '')} | {r['peak_mb']:.0f} | {note} |"
                if "first_s" in r
                else f"— | — | — | — | — | — | {note} |"
            )
        )
    fl = res["flows"]
    if fl:
        head = fl[0]
        lines += [
            "",
            f"Flows: `subriemann run --data digits --n-samples {head['n_samples']} "
            f"--loss cross_entropy --s-end {head['s_end']:g}`: {head['total_s']:.0f} s "
            "in all (the three default metrics, report included).",
            "",
            "| flow | status | s reached | accepted steps | evaluations | rejected | wall (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for f in fl[1:]:
            lines.append(
                " | ".join(
                    [
                        "",
                        *(
                            str(f.get(k))
                            for k in (
                                "label",
                                "status",
                                "s_final",
                                "n_steps",
                                "nfev",
                                "n_rejected",
                                "wall_time",
                            )
                        ),
                        "",
                    ]
                ).strip()
            )
    lines += ["", END]
    return "\n".join(lines)


def write_results(res: dict, folder: Path = HERE) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "RESULTS.md"
    text = path.read_text() if path.exists() else "# subriemann benchmarks\n"
    block = render(res)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    for target, content in ((path, text), (folder / "scale.json", json.dumps(res, indent=1))):
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, target)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="S and a 60-sample run (smoke test)")
    p.add_argument("--problems", nargs="+", choices=PROBLEMS, default=PROBLEMS)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per gradient row")
    p.add_argument("--flow-budget", type=float, default=600.0, help="seconds per flow")
    p.add_argument("--no-flows", action="store_true")
    p.add_argument("--out", type=Path, default=HERE, help="folder of RESULTS.md and scale.json")
    p.add_argument("--worker", nargs=2, metavar=("PROBLEM", "ROUTE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker)))
        return 0
    import torch

    problems = ["S"] if a.quick else a.problems
    res: dict = {
        "quick": a.quick,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gradients": [],
        "flows": [],
    }
    for prob in problems:
        for route in ROUTES:
            row = run_worker(prob, route, a.timeout)
            print(json.dumps(row), flush=True)
            res["gradients"].append(row)
    if not a.no_flows:
        res["flows"] = flows(60, 0.2, 20.0) if a.quick else flows(1797, 5.0, a.flow_budget)
        print(json.dumps(res["flows"]), flush=True)
    write_results(res, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
