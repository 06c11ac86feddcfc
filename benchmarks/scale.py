"""Geometry at data scale (issue 17): every solver route side by side, and full-digits flows.

    python benchmarks/scale.py            # S, M, L, digits-mlp, digits-cnn + 3 flows to s = 5
    python benchmarks/scale.py --quick    # a small CNN (ntk, kspace) and a 60-sample digits run

One λ = 0.5 Riemannian gradient per route (``ntk`` dense push-through, ``svd``,
``cg`` = ``matrix_free`` unpreconditioned CG, ``nystrom`` = Nyström PCG (its
preconditioner from the Gram matrix where the engine forms that cheaply),
``nystrom_sketch`` = Nyström PCG from a randomized sketch of products only, and
``kspace``: the structured engine's exact shifted solve in parameter space,
``StructuredBackend.solve_param_gram``, for :math:`K < QN`), each in
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
ROUTES = ["ntk", "svd", "matrix_free", "nystrom", "nystrom_sketch", "kspace"]
PROBLEMS = ["S", "M", "L", "digits-mlp", "digits-cnn", "digits-cnn-small"]
DENSE_BYTES = 4e9  # a dense route whose D and Gram exceed this is not run (memory budget)
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"


def _space(problem: str):
    import torch

    import subriemann as sr

    if problem.startswith("digits"):
        from subriemann.app.datasets import load_dataset
        from subriemann.app.models import mlp

        small = problem.endswith("-small")  # the --quick run: 300 samples, 2 channels
        n, c = (300, 2) if small else (1797, 16)
        ds = load_dataset("digits", n, 0)
        torch.manual_seed(0)
        x = ds.inputs.reshape(n, -1)
        if "cnn" in problem:
            net = torch.nn.Sequential(
                torch.nn.Unflatten(1, (1, 8, 8)),
                torch.nn.Conv2d(1, c, 3, padding=1),
                torch.nn.Tanh(),
                torch.nn.Conv2d(c, c, 3, padding=1),
                torch.nn.Tanh(),
                torch.nn.Flatten(),
                torch.nn.Linear(64 * c, 10),
            )
        else:
            net = mlp("mlp:32,32", ds.input_dim, ds.num_outputs, "tanh")
        return sr.ParameterSpace(net, x, ds.targets, loss="cross_entropy")
    sys.path.insert(0, str(HERE))
    from run import _problem

    net, x, y = _problem(problem)
    return sr.ParameterSpace(net, x, y)


def kspace_gradient(sp, point, lam: float):
    r"""The λ-gradient :math:`\lambda^{-1}(D^\top D + \mu 1)^{-1}D^\top\nabla_x C`,
    :math:`\mu = (1-\lambda)/\lambda`, from the structured engine alone (``kspace``)."""
    be = sp.backend
    be.factors(point)  # one forward and one reverse pass per chunk; x, D^T u and the solve use them
    u = be.vjp(point, sp.output_grad(be.outputs(point)))
    return be.solve_param_gram(point, u, (1.0 - lam) / lam) / lam


def factored_engine(sp) -> bool:
    """Whether the space's engine forms Gram matrices from layer factors (never D)."""
    return bool(getattr(sp.backend, "gram_from_factors", False))


def _solver(route: str):
    """The metric's ``solver=`` for a row: ``kspace`` is the engine (its metric route is
    ``auto``), ``nystrom_sketch`` the Nyström route that never forms the Gram matrix."""
    if route == "kspace":
        return "auto"
    if route == "nystrom_sketch":
        from subriemann.linalg.routes import NystromRoute

        return NystromRoute(use_gram=False)
    return route


def worker(problem: str, route: str, check: bool = False) -> dict:
    import torch

    from subriemann.app.allocator import set_up_from_environment

    set_up_from_environment()  # as the command line does (app/allocator.py)

    from subriemann.metrics import InterpolatedMetric

    sp = _space(problem)
    qn, k = sp.output_dim, sp.dim
    row = {"problem": problem, "route": route, "K": k, "QN": qn}
    small = min(qn, k)
    # the ntk route of an engine with layer factors forms the small Gram only, never D
    factored = route == "ntk" and factored_engine(sp)
    dense = 8.0 * (small * small + (0 if factored else qn * k))
    if route in ("ntk", "svd") and dense > DENSE_BYTES:
        return {**row, "skipped": f"dense D and Gram need {dense / 1e9:.1f} GB"}
    gram_fits = 8.0 * small * small <= getattr(sp.backend, "memory_budget", 0)
    if route == "nystrom_sketch" and not (factored_engine(sp) and gram_fits):
        return {**row, "skipped": "the nystrom row sketches by products already"}
    if route == "svd" and qn * k > 8e7:
        return {**row, "skipped": "SVD of D: minutes"}
    if route == "kspace" and (qn <= k or not hasattr(sp.backend, "solve_param_gram")):
        return {**row, "skipped": "QN <= K (the solve is in output space)"}
    theta = sp.initial_point()
    solver = _solver(route)
    m = sp.equip_with_metric(InterpolatedMetric, lam=0.5, solver=solver).metric
    sp.cost_grad(theta + 1.0)  # warm-up (imports, engine set-up)
    t0 = time.perf_counter()
    sp.cost_grad(theta)
    row["plain_ms"] = 1e3 * (time.perf_counter() - t0)
    times, iters, grads = [], [], []
    for i in range(2):
        point = theta + 1e-3 * i * torch.ones_like(theta)
        t0 = time.perf_counter()
        grads.append(kspace_gradient(sp, point, 0.5) if route == "kspace" else m.gradient(point))
        times.append(time.perf_counter() - t0)
        info = None if route == "kspace" else m.last_solve
        iters.append(None if info is None or route in ("ntk", "svd") else info.iterations)
    row.update(first_s=times[0], second_s=times[1], iterations=iters)
    nys = getattr(m, "_nystrom", None)
    if nys is not None and nys.precond is not None:
        row.update(precond_rank=nys.precond.rank, sketch=nys.sketch_source, builds=nys.builds,
                   sketch_error=nys.last_error)  # fmt: skip
    row["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if check:  # against the metric's default route at the last point (after the peak)
        ref = sp.equip_with_metric(InterpolatedMetric, lam=0.5).metric.gradient(point)
        row["rel_diff_auto"] = float((grads[-1] - ref).norm() / ref.norm())
        _check_mixed(sp, point, grads[-1], row)
    return row


def _check_mixed(sp, point, grad, row: dict) -> None:
    """Where the last solve was refined from float32 (engines/mixed.py): its backward errors,
    and the gradient against the direct float64 elimination at the same point."""
    be = sp.backend
    info = getattr(be, "last_refinement", None)
    if info is None:
        return
    row["refinement"] = info.backward_errors
    mode, be.mixed_precision = be.mixed_precision, False
    try:
        direct = kspace_gradient(sp, point, 0.5)
    finally:
        be.mixed_precision = mode
    row["rel_diff_direct"] = float((grad - direct).norm() / direct.norm())


def run_worker(problem: str, route: str, timeout: float, check: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", problem, route] + (["--check"] if check else [])
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
        row.update(_monitor(out / (f.get("trajectory") or "")))
        row["wall_time"] = round(float(f.get("wall_time") or 0.0), 1)
        row["s_final"] = round(float(row["s_final"] or 0.0), 4)
        rows.append(row)
    return [{"total_s": total, "n_samples": n_samples, "s_end": s_end, "report": str(out)}] + rows


def _monitor(path: Path) -> dict:
    """The monitor's cadence as resolved and the saved points (one spectrum each) of a flow."""
    try:
        from subriemann import Trajectory

        traj = Trajectory.load(path)
    except (OSError, ValueError):
        return {}
    c = traj.counters
    out = {"rank_every": c.get("rank_every"), "saved": int(traj.s.numel())}
    if "monitor_time" in c:
        mon, wall = float(c["monitor_time"]), float(c.get("wall_time", 0.0))
        out |= {"monitor_s": round(mon, 1), "spectra": c.get("n_spectra"),
                "monitor_share": round(mon / (wall - mon), 3) if wall > mon else None}
    return out


def _flow_goal_lines(fl: list[dict]) -> list[str]:
    """The flow goals of issue 17: all three flows at s_end in <= 10 minutes, and the
    rank monitor adding <= 50% to the rest of each flow (monitor / (wall - monitor))."""
    head, rows = fl[0], fl[1:]
    done = all(r.get("status") == "s_end_reached" for r in rows)
    ok = done and head["total_s"] <= 600.0
    lines = [f"- **the three flows at s_end in ≤ 10 min**: {'met' if ok else 'missed'} "
             f"({head['total_s']:.0f} s; {sum(r.get('status') == 's_end_reached' for r in rows)}"
             f" of {len(rows)} at s_end)"]
    for r in rows:
        share = r.get("monitor_share")
        if share is None:
            continue
        verdict = "met" if share <= 0.5 else "missed"
        lines.append(f"- **{r.get('label')}, rank monitor ≤ 50% on top of the rest**: "
                     f"{verdict} ({100 * share:.0f}%: {r.get('monitor_s')} s of "
                     f"{r.get('wall_time')} s, {r.get('spectra')} spectra)")
    return lines


def _goal_lines(rows: list[dict]) -> list[str]:
    """The CNN goal of issue 17 (λ = 0.5 gradient <= 2 s, peak < 2.5 GB) per measured route."""
    out = []
    for r in rows:
        if r["problem"] != "digits-cnn" or "first_s" not in r:
            continue
        fast, lean = r["first_s"] <= 2.0, r["peak_mb"] < 2500.0
        out.append(
            f"- **digits-cnn, route {r['route']}**: λ = 0.5 gradient ≤ 2 s "
            f"**{'met' if fast else 'missed'}** ({r['first_s']:.1f} s first, "
            f"{r['second_s']:.1f} s second); peak < 2.5 GB **{'met' if lean else 'missed'}** "
            f"({r['peak_mb'] / 1e3:.2f} GB)"
        )
    return out + [""] if out else out


def _row(r: dict) -> str:
    """One table row of a gradient measurement."""
    notes = [r.get("skipped") or r.get("error") or ""]
    if "rel_diff_auto" in r:
        notes.append(f"rel. diff. to the default route {r['rel_diff_auto']:.1e}")
    if "refinement" in r:
        etas = ", ".join(f"{e:.0e}" for e in r["refinement"])
        notes.append(f"float32 factors refined (backward errors {etas}); "
                     f"rel. diff. to the float64 elimination {r['rel_diff_direct']:.1e}")
    if "sketch" in r:
        notes.append(f"preconditioner from {r['sketch']}, {r['builds']} build(s)")
    notes.append(r.get("note_prev", ""))
    note = "; ".join(n for n in notes if n)
    head = f"| {r['problem']} | {r.get('K', '')} | {r.get('QN', '')} | {r['route']} | "
    if "first_s" not in r:
        return head + f"— | — | — | — | — | — | {note} |"
    its = " / ".join("" if i is None else str(i) for i in r.get("iterations") or [])
    plain = f"{r['plain_ms']:.1f}" if "plain_ms" in r else ""
    return head + (
        f"{plain} | {r['first_s']:.3f} | {r['second_s']:.3f} | {its} | "
        f"{r.get('precond_rank', '')} | {r['peak_mb']:.0f} | {note} |"
    )


def _command(res: dict) -> str:
    """The command line of a run without its ``--note`` (the note follows as a sentence)."""
    args = res.get("args", "--quick" if res["quick"] else "")
    note = res.get("note")
    return args.replace(f"--note {note}", "").strip() if note else args


def render(res: dict) -> str:
    lines = [
        BEGIN,
        "## Scale (issue 17): routes at λ = 0.5 and full-digits flows",
        "",
        f"`python benchmarks/scale.py {_command(res)}` on "
        f"{res['cores']} cores ({res['platform']}, torch {res['torch']}), float64.  "
        "One process per row (peak RSS includes ~0.3 GB of interpreter and torch).  "
        "*first*: a gradient at a new point (Nyström: with its preconditioner build); "
        "*second*: at a nearby point (preconditioner reused).  "
        + ("glibc's malloc as set up (`SUBRIEMANN_MALLOC=default`)."
           if res.get("malloc") == "default" else
           "Freed memory kept for reuse, as the command line does "
           "(`subriemann.app.allocator.keep_freed_memory`).")
        + (f"  {res['note']}" if res.get("note") else ""),
        "",
        *_goal_lines(res["gradients"]),
        "| problem | K | QN | route | plain gradient (ms) | first (s) | second (s) | "
        "CG iterations | Nyström rank | peak RSS (MB) | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["gradients"]:
        lines.append(_row(r))
    fl = res["flows"]
    if fl:
        head = fl[0]
        lines += [
            "",
            f"Flows: `subriemann run --data digits --n-samples {head['n_samples']} "
            f"--loss cross_entropy --s-end {head['s_end']:g}`: {head['total_s']:.0f} s "
            "in all (the three default metrics, report included).  *monitor*: the rank "
            "monitor's seconds (`Trajectory.counters[\"monitor_time\"]`: spectra and event "
            "location); *share*: monitor / (wall − monitor).",
            "",
            *_flow_goal_lines(fl),
            "",
            "| flow | status | s reached | accepted steps | evaluations | rejected | wall (s) | "
            "rank_every | saved points | monitor (s) | spectra | share |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
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
                                "rank_every",
                                "saved",
                                "monitor_s",
                                "spectra",
                                "monitor_share",
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
    p.add_argument(
        "--quick", action="store_true", help="a small CNN, two routes, a 60-sample flow (smoke)"
    )
    p.add_argument("--problems", nargs="+", choices=PROBLEMS, default=PROBLEMS)
    p.add_argument("--routes", nargs="+", choices=ROUTES, default=ROUTES)
    p.add_argument(
        "--check", action="store_true", help="kspace rows: compare with the default route"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per gradient row")
    p.add_argument("--flow-budget", type=float, default=600.0, help="seconds per flow")
    p.add_argument("--no-flows", action="store_true")
    p.add_argument("--out", type=Path, default=HERE, help="folder of RESULTS.md and scale.json")
    p.add_argument("--note", default="", help="a sentence added to the section (e.g. the load)")
    p.add_argument(
        "--from-json", type=Path, help="render RESULTS.md from an earlier run's scale.json"
    )
    p.add_argument("--worker", nargs=2, metavar=("PROBLEM", "ROUTE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(*a.worker, check=a.check)))
        return 0
    import torch

    if a.from_json:
        res = json.loads(a.from_json.read_text())
        res["note"] = a.note or res.get("note", "")
        write_results(res, a.out)
        return 0
    problems = ["digits-cnn-small"] if a.quick else a.problems
    routes = ["ntk", "kspace"] if a.quick else a.routes
    res: dict = {
        "quick": a.quick,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gradients": [],
        "flows": [],
        "note": a.note,
        "malloc": os.environ.get("SUBRIEMANN_MALLOC", "keep"),
        "args": " ".join(sys.argv[1:] if argv is None else argv),
    }
    for prob in problems:
        for route in routes:
            row = run_worker(prob, route, a.timeout, (a.check or a.quick) and route == "kspace")
            print(json.dumps(row), flush=True)
            res["gradients"].append(row)
    if not a.no_flows:
        res["flows"] = flows(60, 0.05, 10.0) if a.quick else flows(1797, 5.0, a.flow_budget)
        print(json.dumps(res["flows"]), flush=True)
    write_results(res, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
