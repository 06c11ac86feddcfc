"""Cross-entropy geometry on real data: an MLP classifier on scikit-learn's digits.

docs/theory.md §6 / [CM24] §2.3.  Under the adapted flow (lambda = 1) with rank D = QN
every sample's logits stay on the hyperplane <1, x_j> = c_j and converge to

    x_j* = log y_j + (c_j - <1, log y_j>)/Q * 1        (sigma(x_j*) = y_j)

at the rate mu = min_j lambda_2(diag y_j - y_j y_j^T).  This script checks that
on a tanh MLP whose outputs are the logits, trained on a stratified subset of
the digits (standardized pixels, smoothed one-hot labels), and compares:

* the adapted flow (lambda = 1), lambda = 0.5 and the standard flow (lambda = 0),
  all from the same initialization, with K >= QN (overparametrized, full rank);
* a second, small run with too few hidden units (K < QN, rank loss): the
  per-sample sums drift even at lambda = 1 and the flow does not reach x*; only
  the total sum is kept (the last layer has a bias).

For each flow it reports the hyperplane drift, the distance to the predicted
limit, the distance to the set of all minimizers, the status and the held-out
accuracy, and it writes a figure (drift and distance to x* against s) and the
numbers (JSON) to --out.

The standard flow is stiff (its output velocity is -DD^T(sigma - y), and DD^T has
eigenvalues in the hundreds): it runs under a step budget (deterministic, unlike
a wall-time budget) and its status says whether it reached s_end.  So does the
rank-deficient flow, which slows down where sigma_min(D) gets small.

Needs scikit-learn (pip install subriemann[data]).

Run:  python examples/cross_entropy_digits.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import subriemann as sr
from subriemann.analysis import cross_entropy as ce
from subriemann.app.datasets import DigitsProblem, load_digits_problem
from subriemann.metrics import InterpolatedMetric


@dataclass
class Setup:
    classes: tuple[int, ...]
    n_train: int
    n_test: int
    hidden: int
    hidden_small: int
    eps: float
    s_end: float
    s_end_small: float
    steps_lam0: int  # step budget of the stiff lambda = 0 flow
    steps_small: int  # step budget of the rank-deficient flow
    rtol: float
    atol: float


FULL = Setup(
    classes=(0, 1, 2, 3), n_train=40, n_test=200, hidden=8, hidden_small=2, eps=0.5,
    s_end=60.0, s_end_small=30.0, steps_lam0=2000, steps_small=400, rtol=1e-9, atol=1e-11,
)
FAST = Setup(
    classes=(0, 1, 2), n_train=24, n_test=120, hidden=4, hidden_small=1, eps=0.5,
    s_end=15.0, s_end_small=5.0, steps_lam0=120, steps_small=40, rtol=1e-7, atol=1e-9,
)


def mlp(hidden: int, q: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, q)
    )


def accuracy(space: sr.ParameterSpace, theta: torch.Tensor, x: torch.Tensor, labels) -> float:
    with torch.no_grad():
        model = space.to_model(theta)  # in the dtype of the model passed to the space
        logits = model(x.to(next(model.parameters()).dtype))
    return float((logits.argmax(dim=1) == labels).to(torch.float64).mean())


def run_flow(space, lam: float, cfg: Setup, s_end: float, prob: DigitsProblem,
             max_steps: int | None = None, fit: bool = True) -> dict[str, Any]:
    space.equip_with_metric(InterpolatedMetric, lam=lam)
    opts: dict[str, Any] = dict(rtol=cfg.rtol, atol=cfg.atol, max_steps=max_steps)
    if lam == 0.0:
        # stiff: no rank monitoring at every (tiny) step, save on a grid, step budget
        opts.update(save_at=[s_end * i / 200 for i in range(201)], monitor_rank=False)
    t0 = time.perf_counter()
    traj = sr.gradient_flow(space, space.initial_point(), s_end=s_end, **opts)
    assert isinstance(traj, sr.Trajectory)  # one initial point, one trajectory
    wall = time.perf_counter() - t0
    hs = ce.hyperplane_sums(traj)
    le = ce.limit_error(traj)
    assert le.distance is not None and le.minimizer_distance is not None
    row: dict[str, Any] = {
        "lam": lam,
        "K": space.dim,
        "QN": space.output_dim,
        "status": traj.status.code,
        "s_reached": float(traj.s[-1]),
        "steps": int(traj.counters["n_steps"]),
        "wall_s": wall,
        "rank_min": int(traj.rank.min()),
        "rank_max": int(traj.rank.max()),
        "max_drift": hs.max_drift,
        "total_drift": hs.total_drift,
        "dist_x*_0": float(le.distance[0]),
        "dist_x*_end": le.final,
        "dist_minimizers_end": float(le.minimizer_distance[-1]),
        "cost_gap_end": traj.final_cost - le.limit.minimum_cost,
        "train_acc": accuracy(space, traj.theta[-1], prob.x_train, prob.labels_train),
        "test_acc": accuracy(space, traj.theta[-1], prob.x_test, prob.labels_test),
    }
    if lam == 1.0 and row["rank_min"] == space.output_dim and not fit:
        row["fitted_rate"] = "n/a (fast mode: s_end too short for the asymptotic regime)"
    elif lam == 1.0 and row["rank_min"] == space.output_dim:
        try:
            fit = ce.fitted_rate(traj)
            row.update(fitted_rate=fit.rate, mu=fit.mu, rate_rel_err=fit.relative_error,
                       fit_window=[fit.s_min, fit.s_max])
        except ValueError as err:  # flow too short for the linear regime
            row["fitted_rate"] = f"n/a ({err})"
    return {"row": row, "traj": traj, "sums": hs, "limit": le}


def figure(results: dict[str, dict[str, Any]], mu: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"lam=1": ("C0", "-"), "lam=0.5": ("C1", "-"), "lam=0": ("C3", "-"),
              "lam=1, K<QN": ("0.4", "--")}
    floor = 1e-17
    for name, res in results.items():
        color, ls = styles[name]
        s = res["traj"].s.numpy()
        hs, le = res["sums"], res["limit"]
        axes[0].semilogy(s[1:], hs.max_drift_over_time[1:].clamp_min(floor).numpy(),
                         color=color, ls=ls, label=name)
        axes[1].semilogy(s, le.distance.numpy(), color=color, ls=ls, label=name)
        axes[2].semilogy(s, le.minimizer_distance.clamp_min(floor).numpy(), color=color,
                         ls=ls, label=name)
    s_ref = results["lam=1"]["traj"].s.numpy()
    d0 = float(results["lam=1"]["limit"].distance[0])
    axes[1].semilogy(s_ref, d0 * torch.exp(-mu * torch.as_tensor(s_ref)).numpy(), "k:",
                     lw=1, label=rf"$e^{{-\mu s}}$, $\mu$={mu:.3g}")
    axes[0].set_title(r"hyperplane drift $\max_j|\langle 1,x_j(s)\rangle-\langle 1,x_j(0)\rangle|$")
    axes[1].set_title(r"distance to the predicted limit $|x(s)-x^*|$")
    axes[2].set_title(r"distance to the set of minimizers $\{\sigma(x_j)=y_j\}$")
    for ax in axes:
        ax.set_xlabel("flow time s")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(fast: bool = False, out: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    cfg = FAST if fast else FULL
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="ce_digits_"))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    prob = load_digits_problem(cfg.n_train, cfg.n_test, classes=cfg.classes, eps=cfg.eps,
                                  seed=0)
    q = prob.num_classes
    mu = ce.asymptotic_rate(prob.y_train)
    results: dict[str, dict[str, Any]] = {}

    # -- overparametrized, full rank: the three flows from one initialization -----------
    space = sr.ParameterSpace(mlp(cfg.hidden, q, seed=0), prob.x_train, prob.y_train,
                              loss="cross_entropy")
    assert space.dim >= space.output_dim, "choose N and the width so that K >= QN"
    acc0 = accuracy(space, space.initial_point(), prob.x_test, prob.labels_test)
    for lam in (1.0, 0.5, 0.0):
        name = f"lam={lam:g}"
        results[name] = run_flow(space, lam, cfg, cfg.s_end, prob,
                                 max_steps=cfg.steps_lam0 if lam == 0.0 else None, fit=not fast)

    # -- too few hidden units: K < QN, rank loss ------------------------------------------
    small = sr.ParameterSpace(mlp(cfg.hidden_small, q, seed=0), prob.x_train, prob.y_train,
                              loss="cross_entropy")
    assert small.dim < small.output_dim
    results["lam=1, K<QN"] = run_flow(small, 1.0, cfg, cfg.s_end_small, prob,
                                      max_steps=cfg.steps_small)

    rows = {k: v["row"] for k, v in results.items()}
    summary = {
        "mode": "fast" if fast else "full",
        "classes": list(prob.classes),
        "N": cfg.n_train,
        "Q": q,
        "n_test": cfg.n_test,
        "eps": cfg.eps,
        "mu": mu,
        "minimum_cost": ce.minimum_cost(prob.y_train),
        "test_acc_init": acc0,
        "flows": rows,
    }
    fig_path = out / "cross_entropy_digits.png"
    figure(results, mu, fig_path)
    summary["figure"] = str(fig_path)
    summary["wall_s"] = time.perf_counter() - t_start
    (out / "cross_entropy_digits.json").write_text(json.dumps(summary, indent=2, default=str))
    if verbose:
        print(f"digits {prob.classes}: N = {cfg.n_train} train, {cfg.n_test} held out, "
              f"Q = {q}, eps = {cfg.eps}; mu = {mu:.4g}, min C = {summary['minimum_cost']:.6g}; "
              f"held-out accuracy at init {acc0:.3f}")
        hdr = (f"{'flow':<13}{'K':>5}{'QN':>5}{'rank':>9}{'status':>20}{'s':>7}{'steps':>7}"
               f"{'wall':>7}{'drift':>10}{'total':>10}{'|x-x*|':>10}{'minim.':>10}"
               f"{'C-C*':>10}{'test acc':>9}")
        print(hdr)
        for name, r in rows.items():
            rank = f"{r['rank_min']}-{r['rank_max']}" if r["rank_min"] != r["rank_max"] \
                else str(r["rank_min"])
            print(f"{name:<13}{r['K']:>5}{r['QN']:>5}{rank:>9}{r['status']:>20}"
                  f"{r['s_reached']:>7.3g}{r['steps']:>7}{r['wall_s']:>6.1f}s"
                  f"{r['max_drift']:>10.2e}{r['total_drift']:>10.2e}{r['dist_x*_end']:>10.2e}"
                  f"{r['dist_minimizers_end']:>10.2e}{r['cost_gap_end']:>10.2e}"
                  f"{r['test_acc']:>9.3f}")
        r1 = rows["lam=1"]
        if isinstance(r1.get("fitted_rate"), float):
            print(f"adapted flow: fitted rate of |x - x*| = {r1['fitted_rate']:.5g} vs mu = "
                  f"{mu:.5g} (relative error {r1['rate_rel_err']:.2e}, s in "
                  f"[{r1['fit_window'][0]:.3g}, {r1['fit_window'][1]:.3g}])")
        elif "fitted_rate" in r1:
            print(f"adapted flow: {r1['fitted_rate']}")
        print(f"figure: {fig_path}\ntotal wall time {summary['wall_s']:.1f} s")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="small sizes, < 30 s")
    parser.add_argument("--out", default=None, help="output folder (default: a temp dir)")
    args = parser.parse_args()
    main(fast=args.fast, out=args.out)
