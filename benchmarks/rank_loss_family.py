"""The 20-network rank-loss family of issue 12: lambda = 1 flows through rank loss.

Small tanh networks that can lose rank (narrow hidden layers, no bias,
duplicated inputs, K close to QN, deep-narrow), each flowed with the output
pullback metric (lambda = 1), default options, up to s_end = 10 with a 30 s
wall-time budget.  For every flow the table gives the status, the final flow
time, the cost at the start and the end, the largest rise of the cost between
saved points, the number of rank events, and the stationarity ratio

    |D^T (x - y)| / (sigma_max |x(0) - y|)

at the end (the acceptance asks <= 1e-3 for a flow that stops, i.e. stationary
on its stratum), with the rank of D at the end checked against numpy's
independent ``matrix_rank`` at the flow's threshold tau.

One command measures the whole family and writes ``rank_loss_family.json`` and
a Markdown table ``rank_loss_family.md`` next to this file::

    python benchmarks/rank_loss_family.py            # the 20 flows (minutes)
    python benchmarks/rank_loss_family.py --quick    # 2 flows, s_end = 0.2, 3 s each (smoke)
    python benchmarks/rank_loss_family.py --rank-band 0   # the hard threshold (no continuation)

Events are checked against an independent SVD of the dense Jacobian at the
point just after each crossing; a flow that stops at an equilibrium gets the
kind of its ``EquilibriumReport`` (``classify_equilibrium``) in the JSON.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import subriemann as sr

KINDS = ("narrow", "no-bias", "duplicated", "K~QN", "deep-narrow")


def build(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """One network of the family and its data (seeded)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    torch.manual_seed(seed)
    if kind == "narrow":  # one hidden unit: rank at most 3 for any N
        net = nn.Sequential(nn.Linear(2, 1), nn.Tanh(), nn.Linear(1, 1))
        x, y = torch.randn(5, 2, generator=g, dtype=f64), torch.randn(5, 1, generator=g, dtype=f64)
    elif kind == "no-bias":
        net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Tanh(), nn.Linear(2, 1, bias=False))
        x, y = torch.randn(5, 2, generator=g, dtype=f64), torch.randn(5, 1, generator=g, dtype=f64)
    elif kind == "duplicated":  # two samples with the same input and different targets
        net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
        x = torch.randn(4, 2, generator=g, dtype=f64)
        x = torch.cat([x, x[:1]])
        y = torch.randn(5, 1, generator=g, dtype=f64)
    elif kind == "K~QN":  # K = 12 parameters for QN = 8 outputs
        net = nn.Sequential(nn.Linear(1, 2), nn.Tanh(), nn.Linear(2, 2), nn.Tanh(),
                            nn.Linear(2, 1, bias=False))
        x, y = torch.randn(8, 1, generator=g, dtype=f64), torch.randn(8, 1, generator=g, dtype=f64)
    else:  # deep-narrow
        net = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 2), nn.Tanh(),
                            nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1))
        x, y = torch.randn(6, 2, generator=g, dtype=f64), torch.randn(6, 1, generator=g, dtype=f64)
    return net, x, y


def check_events(space, traj) -> int:
    """How many events an independent SVD confirms: sigma_k of the dense Jacobian at the
    point just after the crossing is on the new side of tau (or within 1e-9 sigma_max)."""
    ok = 0
    for ev in traj.events:
        s = np.linalg.svd(space.jacobian(ev.theta).detach().numpy(), compute_uv=False)
        gap = float(s[ev.index]) - ev.tau
        after_above = ev.rank_after > ev.rank_before
        ok += (gap > 0) == after_above or abs(gap) <= 1e-9 * float(s[0])
    return ok


def equilibrium_kind(space, traj) -> str:
    """The EquilibriumReport's kind where a flow stopped at an equilibrium, else ''."""
    if traj.status.code != "equilibrium_reached":
        return ""
    from subriemann.analysis.critical import classify_equilibrium

    return classify_equilibrium(space, traj.theta[-1], rank_atol=traj.rank_tau).kind


def one_flow(kind: str, seed: int, s_end: float, max_time: float,
             rank_band: float | None = None) -> dict:
    net, x, y = build(kind, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        space = sr.ParameterSpace(net, x, y).equip_with_metric(sr.metrics.OutputPullbackMetric)
    theta0 = space.initial_point()
    t0 = time.perf_counter()
    opts = {} if rank_band is None else {"rank_band": rank_band}
    traj = sr.gradient_flow(space, theta0, s_end, max_time=max_time, **opts)
    wall = time.perf_counter() - t0
    assert isinstance(traj, sr.Trajectory)
    theta = traj.theta[-1]
    d = space.jacobian(theta).detach().numpy()  # dense reference [QN, K]
    r_end = traj.outputs[-1].numpy() - traj.targets.numpy()
    r0 = traj.outputs[0].numpy() - traj.targets.numpy()
    smax = float(np.linalg.svd(d, compute_uv=False)[0])
    stationarity = float(np.linalg.norm(d.T @ r_end) / (smax * np.linalg.norm(r0)))
    return {
        "kind": kind, "seed": seed, "K": space.dim, "QN": space.output_dim,
        "status": traj.status.code, "message": traj.status.message,
        "s_final": float(traj.s[-1]), "cost0": float(traj.cost[0]),
        "cost_end": float(traj.cost[-1]),
        "max_cost_rise": float(torch.clamp(traj.cost[1:] - traj.cost[:-1], min=0).max())
        if len(traj) > 1 else 0.0,
        "events": len(traj.events), "events_checked": check_events(space, traj),
        "segments": [str(g) for g in traj.segments],
        "max_deviation": max((g.max_deviation for g in traj.segments), default=0.0),
        "equilibrium": equilibrium_kind(space, traj), "stationarity": stationarity,
        "rank_end": int(traj.rank[-1]),
        "rank_end_numpy": int(np.linalg.matrix_rank(d, tol=traj.rank_tau)),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 flows to s = 0.2 (smoke test)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("rank_loss_family")))
    ap.add_argument("--rank-band", type=float, default=None,
                    help="rank_band of the flows (default: the option's default; 0: hard "
                         "threshold, the engine before the continuation)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cases = [(k, s) for k in KINDS for s in range(4)]
    s_end, max_time = 10.0, 30.0
    if args.quick:
        cases, s_end, max_time = cases[::10], 0.2, 3.0
    rows = [one_flow(k, s, s_end, max_time, args.rank_band) for k, s in cases]
    reached = sum(r["status"] == "s_end_reached" or bool(r["equilibrium"]) for r in rows)
    summary = {"s_end": s_end, "max_time": max_time, "rank_band": args.rank_band,
               "n": len(rows), "reached": reached,
               "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(summary, indent=1))
    lines = [f"{reached} of {len(rows)} flows reach s_end = {s_end:g} or an equilibrium.", "",
             "| net | seed | K | QN | status | s final | C(0) | C(end) | max rise | events "
             "(SVD-checked) | segments | max field deviation | stationarity | rank (numpy) "
             "| wall s |", "|" + "---|" * 15]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['seed']} | {r['K']} | {r['QN']} | `{r['status']}` | "
            f"{r['s_final']:.3g} | {r['cost0']:.3g} | {r['cost_end']:.3g} | "
            f"{r['max_cost_rise']:.1e} | {r['events']} ({r['events_checked']}) | "
            f"{len(r['segments'])} | {r['max_deviation']:.2g} | {r['stationarity']:.1e} | "
            f"{r['rank_end']} ({r['rank_end_numpy']}) | {r['wall_s']:.1f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
