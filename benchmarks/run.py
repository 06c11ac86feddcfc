"""subriemann benchmarks: every route measured side by side in one run.

    python benchmarks/run.py                 # sizes S, M, L + time-to-tolerance
    python benchmarks/run.py --sizes S M     # a subset
    python benchmarks/run.py --quick         # S only, short budgets (smoke test)

Writes ``benchmarks/RESULTS.md`` (tables with ratios to one plain gradient)
and ``benchmarks/results.json``.  Each route runs in its own subprocess so
that its peak RSS (``ru_maxrss``) is its own; times are the best of a few
calls after a warm-up.  Sizes (tanh MLPs, float64, issue 8):

* S: layers [8, 64, 64, 1], N = 128
* M: layers [32, 256, 256, 4], N = 256  (K ~ 75k, QN = 1024)
* L: layers [64, 1024, 1024, 1], N = 512 (K ~ 1.1M, QN = 512)

Routes to one exact gradient of g_lam (lam = 1: D^+ r; lam = 0.5):

* ``plain``: one ordinary gradient (forward + backward of the summed MSE), the unit;
* ``jacrev+lstsq``: D by ``vmap(jacrev)``, then LAPACK gelsd least squares (lam = 1)
  or the stacked damped least squares (lam = 0.5);
* ``jacrev+pushthrough``: D by ``vmap(jacrev)``, then Cholesky/eigh of D D^T and D^T w;
* ``cg-matfree``: CG on (1-lam) 1 + lam D D^T with JVP/VJP products, to 1e-8;
* ``subriemann``: ``space.metric.gradient`` (automatic solver; structured NTK engine);
* ``subriemann-ntk``: the same with ``solver="ntk"`` (at S, where ``auto`` picks the SVD).

Further sections: one accepted ``dopri5`` step of the lam = 1 flow at L; a sweep
of B = 8 initial points integrated one after the other and together (lock-step
batch); time to C <= 1e-10 C(0) against Adam, SGD and scipy's LM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {
    "S": ([8, 64, 64, 1], 128),
    "M": ([32, 256, 256, 4], 256),
    "L": ([64, 1024, 1024, 1], 512),
}
ROUTES = ["plain", "jacrev+lstsq", "jacrev+pushthrough", "cg-matfree", "subriemann"]
# extra rows: our push-through route forced where "auto" picks the dense SVD (S)


# -- worker side -------------------------------------------------------------------
def _problem(size: str):
    import torch

    widths, n = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        lin = torch.nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=gen))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    net = torch.nn.Sequential(*layers).double()
    x = torch.randn(n, widths[0], generator=gen, dtype=torch.float64)
    y = torch.randn(n, widths[-1], generator=gen, dtype=torch.float64)
    return net, x, y


def _best(fn, repeat: int) -> float:
    if repeat > 1:  # warm-up (a single call of a slow dense route is its own warm-up)
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts)


def worker(route: str, size: str, lam: float, repeat: int) -> dict:
    import torch
    from torch.func import functional_call, jvp, vjp, vmap

    net, x, y = _problem(size)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    k = theta.numel()

    def unflat(t):
        out, i = {}, 0
        for nme, shp in zip(names, shapes):
            m = int(torch.Size(shp).numel())
            out[nme] = t[i : i + m].view(shp)
            i += m
        return out

    def f(t, xx):
        return functional_call(net, unflat(t), (xx,)).reshape(-1)

    r = (f(theta, x) - y.reshape(-1)).detach()
    extra: dict = {"K": k, "QN": r.numel()}

    if route == "plain":

        def run():
            net.zero_grad()
            loss = 0.5 * ((net(x) - y) ** 2).sum()
            loss.backward()
    elif route.startswith("jacrev"):

        def jac():
            def single(t, xi):
                return f(t, xi.unsqueeze(0))

            return vmap(torch.func.jacrev(single), in_dims=(None, 0))(theta, x).reshape(-1, k)

        if route == "jacrev+lstsq":

            def run():
                d = jac()
                if lam == 1.0:
                    return torch.linalg.lstsq(d, r.unsqueeze(1), driver="gelsd").solution
                eps = (1 - lam) / lam
                a = torch.cat([d, eps**0.5 * torch.eye(k, dtype=d.dtype)])
                b = torch.cat([r, torch.zeros(k, dtype=d.dtype)])
                return torch.linalg.lstsq(a, b.unsqueeze(1), driver="gelsd").solution / lam
        else:

            def run():
                d = jac()
                ntk = d @ d.T
                if lam == 1.0:
                    ev, u = torch.linalg.eigh(ntk)
                    keep = ev > 1e-12 * ev.max()
                    w = u[:, keep] @ ((u[:, keep].T @ r) / ev[keep])
                else:
                    a = lam * ntk + (1 - lam) * torch.eye(ntk.shape[0], dtype=ntk.dtype)
                    w = torch.cholesky_solve(r.unsqueeze(1), torch.linalg.cholesky(a)).squeeze(1)
                return d.T @ w
    elif route == "cg-matfree":
        import subriemann as sr  # noqa: F401  (same threads setup as ours)
        from subriemann.linalg import cg

        def run():
            def op(w):
                _, fn = vjp(lambda t: f(t, x), theta)
                dtw = fn(w)[0]
                return (1 - lam) * w + lam * jvp(lambda t: f(t, x), (theta,), (dtw,))[1]

            w, info = cg(op, r, rtol=1e-8)
            extra["cg_iterations"] = info.iterations
            _, fn = vjp(lambda t: f(t, x), theta)
            return fn(w)[0]
    elif route in ("subriemann", "subriemann-ntk"):
        import subriemann as sr

        solver = "ntk" if route == "subriemann-ntk" else "auto"
        space = sr.ParameterSpace(net, x, y).equip_with_metric(
            sr.metrics.InterpolatedMetric, lam=lam, solver=solver
        )
        extra["solver"] = space.metric.solver
        extra["backend"] = space.backend.name
        state = {"i": 0}

        def run():
            state["i"] += 1
            th = theta + 1e-12 * state["i"]  # a new point: nothing cached
            return space.metric.gradient(th)
    elif route == "flow-step":
        import subriemann as sr

        space = sr.ParameterSpace(net, x, y).equip_with_metric(sr.metrics.OutputPullbackMetric)
        sr.gradient_flow(space, theta, 1.0, max_steps=1)  # warm-up
        t0 = time.perf_counter()
        tr = sr.gradient_flow(space, theta, 1.0, rtol=1e-6, atol=1e-9, max_steps=4)
        wall = time.perf_counter() - t0
        steps = len(tr.s) - 1
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {
            "route": route, "size": size, "lam": 1.0, "ms": 1e3 * wall / max(steps, 1),
            "peak_rss_mb": rss, "steps": steps, "nfev": tr.counters["nfev"],
            "status": tr.status.code, **extra,
        }
    else:
        raise ValueError(route)
    t = _best(run, repeat)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"route": route, "size": size, "lam": lam, "ms": t, "peak_rss_mb": rss, **extra}


# -- time to tolerance ----------------------------------------------------------------
def time_to_tolerance(budget: float) -> list[dict]:
    """Time to reach C <= 1e-10 C(0) on the main job's default regression problem."""
    import numpy as np
    import torch

    import subriemann as sr
    from subriemann.app.config import DEFAULTS, resolve_options
    from subriemann.app.problem import build_problem

    # the problem `subriemann run` uses
    opts = resolve_options(dict(DEFAULTS, progress=False), set())
    space = build_problem(opts).space
    theta0 = space.initial_point()
    c0 = float(space.cost(theta0))
    target = 1e-10 * c0
    rows: list[dict] = []
    info = {"K": space.dim, "QN": space.output_dim, "C0": c0}

    space.equip_with_metric(sr.metrics.OutputPullbackMetric)
    t0 = time.perf_counter()
    tr = sr.gradient_flow(
        space,
        theta0,
        15.0,
        cost_tol=target,
        rtol=1e-6,
        atol=1e-9,
        monitor_rank=False,
        max_time=budget,
    )
    rows.append(
        {
            "method": "subriemann lam=1 flow (dopri5, rtol 1e-6)",
            "seconds": time.perf_counter() - t0,
            "reached": tr.status.code == "cost_tol_reached",
            "final_ratio": tr.final_cost / c0,
            "evals": tr.counters["nfev"],
        }
    )
    for eta in (0.5, 1.0):
        t0 = time.perf_counter()
        tr = sr.gradient_flow(
            space,
            theta0,
            200.0,
            method="euler",
            step_size=eta,
            cost_tol=target,
            monitor_rank=False,
            max_time=budget,
            min_saves=2,
        )
        rows.append(
            {
                "method": f"subriemann damped Gauss-Newton (Euler, eta={eta})",
                "seconds": time.perf_counter() - t0,
                "reached": tr.status.code == "cost_tol_reached",
                "final_ratio": tr.final_cost / c0,
                "evals": tr.counters["nfev"],
            }
        )

    net = space.to_model(theta0)
    x, y = space.inputs, space.targets

    def torch_opt(name, lr):
        m = space.to_model(theta0)
        opt = (torch.optim.Adam if name == "Adam" else torch.optim.SGD)(m.parameters(), lr=lr)
        t0 = time.perf_counter()
        it, best = 0, float("inf")
        while time.perf_counter() - t0 < budget:
            opt.zero_grad()
            loss = 0.5 * ((m(x) - y) ** 2).sum()
            c = float(loss)
            best = min(best, c)
            if c <= target or not np.isfinite(c):
                break
            loss.backward()
            opt.step()
            it += 1
        return {
            "method": f"torch.optim.{name} lr={lr:g}",
            "seconds": time.perf_counter() - t0,
            "reached": best <= target,
            "final_ratio": best / c0,
            "evals": it,
        }

    for lr in (1e-4, 1e-3, 1e-2):
        rows.append(torch_opt("Adam", lr))
    lmax = float(torch.linalg.eigvalsh(space.ntk(theta0)).max())
    for frac in (0.25, 0.5, 1.0):
        rows.append(torch_opt("SGD", frac / lmax))
    del net

    from scipy.optimize import least_squares

    # MINPACK's LM needs at least as many residuals as variables; the problem is
    # overparametrized (QN < K), so the residual is padded with K - QN zeros (zero rows
    # of the Jacobian): the same cost and the same minimizers.  "trf" takes it unpadded.
    k, qn = space.dim, space.output_dim
    pad = max(0, k - qn)

    def fun(t, padded):
        r = (space.outputs(torch.from_numpy(t)) - space.y).numpy()
        return np.concatenate([r, np.zeros(pad)]) if padded else r

    def jac(t, padded):
        d = space.jacobian(torch.from_numpy(t)).numpy()
        return np.vstack([d, np.zeros((pad, k))]) if padded else d

    for method, padded in (("lm", True), ("trf", False)):
        t0 = time.perf_counter()
        res = least_squares(
            fun, theta0.numpy(), jac=jac, method=method, args=(padded,), ftol=1e-15,
            xtol=1e-15, gtol=1e-15, max_nfev=2000,
        )
        c = 0.5 * float(np.sum(res.fun**2))
        label = "lm', residual padded with K - QN zeros" if padded else "trf'"
        rows.append(
            {
                "method": f"scipy least_squares(method='{label}) with our Jacobian",
                "seconds": time.perf_counter() - t0,
                "reached": c <= target,
                "final_ratio": c / c0,
                "evals": int(res.nfev),
            }
        )
    for r in rows:
        r.update(info)
    return rows


# -- batched sweep ----------------------------------------------------------------------
def batched_sweep(n_points: int = 8, s_end: float = 2.0) -> list[dict]:
    """B initial points on the main job's problem: one after the other vs together."""
    import torch

    import subriemann as sr
    from subriemann.app.config import DEFAULTS, resolve_options
    from subriemann.app.problem import build_problem

    opts = resolve_options(dict(DEFAULTS, progress=False), set())
    space = build_problem(opts).space
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(n_points, space.dim, generator=gen, dtype=space.dtype)
    points = space.initial_point() + 0.05 * noise
    rows = []
    for name, cls, kw in [
        ("euclidean (lam=0)", sr.metrics.EuclideanMetric, {}),
        ("interp (lam=0.5)", sr.metrics.InterpolatedMetric, {"lam": 0.5}),
        ("pullback (lam=1)", sr.metrics.OutputPullbackMetric, {}),
    ]:
        space.equip_with_metric(cls, **kw)
        sr.gradient_flow(space, points[:2], 0.1)  # warm-up of both paths
        t0 = time.perf_counter()
        seq = [sr.gradient_flow(space, p, s_end) for p in points]
        t1 = time.perf_counter()
        bat = sr.gradient_flow(space, points, s_end)
        t2 = time.perf_counter()
        diff = max(
            float((a.theta[-1] - b.theta[-1]).norm() / a.theta[-1].norm()) for a, b in zip(seq, bat)
        )
        rows.append({
            "metric": name, "B": n_points, "K": space.dim, "QN": space.output_dim,
            "solver": getattr(space.metric, "solver", "-"),
            "sequential_s": t1 - t0, "batched_s": t2 - t1, "max_rel_diff": diff,
            "steps": sum(len(t.s) - 1 for t in bat),
        })
    return rows


# -- driver ---------------------------------------------------------------------------
def run_worker(route: str, size: str, lam: float, repeat: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", route, size, str(lam), str(repeat)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"route": route, "size": size, "lam": lam, "error": f"timeout after {timeout:.0f} s"}
    except subprocess.CalledProcessError as err:
        tail = (err.stderr or "").strip().splitlines()[-1:] or ["?"]
        return {"route": route, "size": size, "lam": lam, "error": tail[0][:200]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", nargs="+", default=["S", "M", "L"], choices=list(SIZES))
    p.add_argument("--quick", action="store_true", help="S only, short budgets")
    p.add_argument("--budget", type=float, default=30.0, help="seconds per optimizer run")
    p.add_argument("--skip-tolerance", action="store_true")
    p.add_argument("--skip-batch", action="store_true")
    p.add_argument(
        "--worker", nargs=4, metavar=("ROUTE", "SIZE", "LAM", "REPEAT"), help=argparse.SUPPRESS
    )
    a = p.parse_args(argv)
    if a.worker:
        route, size, lam, repeat = a.worker
        print(json.dumps(worker(route, size, float(lam), int(repeat))))
        return 0
    sizes = ["S"] if a.quick else a.sizes
    budget = 10.0 if a.quick else a.budget
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "routes": [],
        "tolerance": [],
        "batch": [],
    }
    import torch

    results["machine"]["torch"] = torch.__version__
    results["machine"]["threads"] = torch.get_num_threads()
    for size in sizes:
        for lam in (1.0, 0.5):
            for route in ROUTES:
                if route == "plain" and lam == 0.5:
                    continue
                repeat = 1 if size == "L" and route.startswith("jacrev") else 3
                if route == "jacrev+lstsq" and lam == 0.5 and size != "S":
                    res = {
                        "route": route,
                        "size": size,
                        "lam": lam,
                        "error": "not run: the stacked system [D; sqrt(eps) 1] is (QN+K) x K "
                        "(K^2 memory); at S it already takes a minute",
                    }
                    results["routes"].append(res)
                    continue
                res = run_worker(route, size, lam, repeat, timeout=900)
                print(json.dumps(res), flush=True)
                results["routes"].append(res)
            if size == "S":
                res = run_worker("subriemann-ntk", size, lam, 3, timeout=900)
                print(json.dumps(res), flush=True)
                results["routes"].append(res)
        if size == "L":
            res = run_worker("flow-step", size, 1.0, 1, timeout=900)
            print(json.dumps(res), flush=True)
            results["flow_step"] = res
    if not a.skip_batch:
        results["batch"] = batched_sweep(4 if a.quick else 8, 1.0 if a.quick else 2.0)
        for r in results["batch"]:
            print(json.dumps(r), flush=True)
    if not a.skip_tolerance:
        results["tolerance"] = time_to_tolerance(budget)
        for r in results["tolerance"]:
            print(json.dumps(r), flush=True)
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    (HERE / "RESULTS.md").write_text(render(results))
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# subriemann benchmarks",
        "",
        f"Measured in one run of `python benchmarks/run.py` on {m['cpus']} CPU cores "
        f"({m['platform']}, Python {m['python']}, torch {m['torch']}, {m['threads']} threads), "
        "float64, tanh MLPs.  Each route ran in its own process; time = best of 3 calls "
        "after a warm-up (1 call for the dense routes at L); memory = the process's peak RSS "
        "(includes ~0.3 GB of interpreter and torch).",
        "",
        "## One exact Riemannian gradient",
        "",
        "| size | K | QN | λ | route | time (ms) | × plain gradient | peak RSS (MB) | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {
        r["size"]: r["ms"] for r in results["routes"] if r.get("route") == "plain" and "ms" in r
    }
    ours = {
        (r["size"], r["lam"]): r["ms"]
        for r in results["routes"]
        if r.get("route") == "subriemann" and "ms" in r
    }
    for r in results["routes"]:
        if "error" in r:
            lines.append(
                f"| {r['size']} | | | {r['lam']} | {r['route']} | — | — | — | {r['error']} |"
            )
            continue
        ratio = r["ms"] / plain[r["size"]] if r["size"] in plain else float("nan")
        notes = []
        if "cg_iterations" in r:
            notes.append(f"{r['cg_iterations']} CG iterations")
        if "solver" in r:
            notes.append(f"solver {r['solver']}, engine {r['backend']}")
        if r["route"] not in ("plain", "subriemann") and (r["size"], r["lam"]) in ours:
            notes.append(f"{r['ms'] / ours[(r['size'], r['lam'])]:.0f}× slower than subriemann")
        lines.append(
            f"| {r['size']} | {r['K']} | {r['QN']} | {r['lam']} | {r['route']} | {r['ms']:.1f} | "
            f"{ratio:.1f} | {r['peak_rss_mb']:.0f} | {'; '.join(notes)} |"
        )
    fs = results.get("flow_step")
    if fs and "ms" in fs:
        lines += [
            "",
            "## One accepted flow step at L",
            "",
            f"λ = 1 (`OutputPullbackMetric`, dopri5, rtol 1e-6, rank monitored), K = {fs['K']}, "
            f"QN = {fs['QN']}: **{fs['ms'] / 1e3:.2f} s per accepted step** "
            f"({fs['steps']} steps, {fs['nfev']} vector-field evaluations including the "
            f"starting step; peak RSS {fs['peak_rss_mb']:.0f} MB).",
        ]
    if results.get("batch"):
        b0 = results["batch"][0]
        lines += [
            "",
            f"## A sweep of B = {b0['B']} initial points: one after the other vs together",
            "",
            f"The main job's problem (K = {b0['K']}, QN = {b0['QN']}), s_end = 2, dopri5 at the "
            "default tolerances. *Together* is `gradient_flow(space, points[B, K], ...)` "
            "(lock-step rounds; vmap over the points and batched QR/SVD for the Euclidean "
            "metric and the svd solver).",
            "",
            "| metric | solver | one by one (s) | together (s) | speed-up | max rel. diff of "
            "θ(s_end) | accepted steps |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in results["batch"]:
            lines.append(
                f"| {r['metric']} | {r['solver']} | {r['sequential_s']:.2f} | "
                f"{r['batched_s']:.2f} | {r['sequential_s'] / r['batched_s']:.2f}× | "
                f"{r['max_rel_diff']:.1e} | {r['steps']} |"
            )
    if results["tolerance"]:
        t0 = results["tolerance"][0]
        lines += [
            "",
            "## Time to C ≤ 1e-10·C(0) on the main job's regression problem",
            "",
            f"K = {t0['K']}, QN = {t0['QN']}, C(0) = {t0['C0']:.4g}.",
            "",
            "| method | seconds | reached | best C/C(0) | evaluations / iterations |",
            "|---|---|---|---|---|",
        ]
        for r in results["tolerance"]:
            lines.append(
                f"| {r['method']} | {r['seconds']:.2f} | {'yes' if r['reached'] else 'no'} | "
                f"{r['final_ratio']:.2e} | {r['evals']} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
