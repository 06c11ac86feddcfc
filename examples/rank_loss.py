"""Rank loss along gradient flows: a rank-deficient model and constructed rank drops.

docs/theory.md §4–§5 / [CM24] Prop 2.5.  Four small experiments, each against a
closed form:

1. A model rank-deficient by construction, x = tanh(A B theta + c) with
   B theta in R^3 and QN = 8, so rank D <= 3 < QN everywhere.  The adapted flow
   (lambda = 1) ends at a critical point: P(x - y) = 0 with C > 0, and theta never
   moves in ker B.  Its outputs bend away from the straight line
   t y + (1 - t) x(0) (t = 1 - e^{-s}) by z(t) = (1 - t)(U(t, 0) - 1)(x(0) - y),
   with the propagator dU/ds = P^perp(s) U (2.58-2.59): the script prints how
   much of z lies in ran D and off it, and how well the propagator built from the
   stored path predicts z (second order in the spacing).
2. A constant projector (a linear model with a rank-deficient data matrix):
   z(t) = t P^perp (x(0) - y) exactly.
3. A constructed rank drop, x = (a, b^2/2), y = (1, 0), threshold tau = 1/2:
   sigma = |b| crosses tau at s = 3 (lambda = 0: b^2 = 1/(1+s)) and at
   s = 2 ln 2 (lambda = 1: b = e^{-s/2}, after which b is frozen and the flow
   ends at C = 1/128 > 0).  The events are found by regula falsi on
   sigma_k - tau on the old branch.
4. A dip: x = (a, ((a - 1/2)^2 + m) b) with a = e^{-s}: sigma_2 dips 0.1 % below tau
   for a stretch of s shorter than the natural step and comes back (rank
   2 -> 1 -> 2); steps are capped near tau so both crossings are found.

The numbers go to rank_loss.json in --out (default: a temporary folder).

Run:  python examples/rank_loss.py [--fast] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import subriemann as sr
from subriemann.analysis import interpolation_deviation
from subriemann.metrics import EuclideanMetric, InterpolatedMetric, OutputPullbackMetric

F64 = torch.float64


class Composite(nn.Module):
    """x = tanh(A B theta + c), one output per sample (input e_j selects sample j)."""

    def __init__(self, k: int = 20, r: int = 3, n: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randn(r, k, generator=g, dtype=F64) / k**0.5)
        self.register_buffer("A", torch.randn(n, r, generator=g, dtype=F64) / r**0.5)
        self.register_buffer("c", 0.1 * torch.randn(n, generator=g, dtype=F64))
        self.theta = nn.Parameter(torch.randn(k, generator=g, dtype=F64))
        # a reachable output plus noise that no output of the model fits: C* > 0
        w_star = torch.randn(r, generator=g, dtype=F64)
        reach = torch.tanh(self.A @ w_star + self.c)
        self.targets = (reach + 0.3 * torch.randn(n, generator=g, dtype=F64))[:, None]

    def forward(self, e):
        return e @ torch.tanh(self.A @ (self.B @ self.theta) + self.c)[:, None]


class SquareAndLine(nn.Module):
    """x = (a, b^2/2): D = diag(1, b)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1, dtype=F64))
        self.b = nn.Parameter(torch.ones(1, dtype=F64))

    def forward(self, x):
        return torch.stack([self.a, 0.5 * self.b**2], dim=1) * x


class Dip(nn.Module):
    """x = (a, c(a) b), c(a) = (a - 1/2)^2 + m: sigma_2 = c(a) at b = 0."""

    def __init__(self, m: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.ones(1, dtype=F64))
        self.b = nn.Parameter(torch.zeros(1, dtype=F64))
        self.m = m

    def forward(self, x):
        return torch.stack([self.a, ((self.a - 0.5) ** 2 + self.m) * self.b], dim=1) * x


def custom_space(model: nn.Module, inputs, targets) -> sr.ParameterSpace:
    with warnings.catch_warnings():  # custom modules run on the generic torch.func engine
        warnings.simplefilter("ignore", UserWarning)
        return sr.ParameterSpace(model, inputs, targets)


def thin(traj: sr.Trajectory, step: int) -> sr.Trajectory:
    keys = ("s", "theta", "outputs", "cost", "grad_norm", "singular_values", "rank")
    return dataclasses.replace(traj, **{k: getattr(traj, k)[::step] for k in keys})


def rank_deficient(fast: bool) -> dict[str, Any]:
    model = Composite()
    n = model.A.shape[0]
    space = custom_space(model, torch.eye(n, dtype=F64), model.targets)
    space.equip_with_metric(OutputPullbackMetric)
    s_end = 8.0 if fast else 16.0
    pts = 161 if fast else 641
    save = [s_end * i / (pts - 1) for i in range(pts)]
    tol = dict(rtol=1e-8, atol=1e-10) if fast else dict(rtol=1e-10, atol=1e-12)
    traj = sr.gradient_flow(space, space.initial_point(), s_end, save_at=save, **tol)
    th = traj.theta[-1]
    u, sig, _ = torch.linalg.svd(space.jacobian(th))
    rank = int((sig > traj.rank_tau).sum())
    r = space.outputs(th) - space.y
    pr = u[:, :rank] @ (u[:, :rank].T @ r)
    r0 = float((traj.outputs[0] - space.y).norm())
    b = model.B
    ker = torch.eye(b.shape[1], dtype=F64) - torch.linalg.pinv(b) @ b
    dev = interpolation_deviation(traj, space)
    coarse = interpolation_deviation(thin(traj, 2), space)
    norms = dev.norms
    return {
        "K": space.dim, "QN": space.output_dim, "status": traj.status.code,
        "nfev": traj.counters["nfev"],
        "rank_min": int(traj.rank.min()), "rank_max": int(traj.rank.max()),
        "sigma_r_min": float(traj.singular_values[:, 2].min()), "tau": traj.rank_tau,
        "cost_0": float(traj.cost[0]), "cost_end": traj.final_cost,
        "P_residual_end": float(pr.norm()) / r0,
        "ker_B_drift": float((ker @ (traj.theta - traj.theta[0]).T).abs().max()),
        "z_max": float(norms["z"].max()) / r0,
        "z_range_max": float(norms["z_range"].max()) / r0,
        "z_perp_max": float(norms["z_perp"].max()) / r0,
        "spacing": s_end / (pts - 1),
        "propagator_error": dev.propagator_error,
        "propagator_error_2h": coarse.propagator_error,
        "rank_loss_fraction": dev.rank_loss_fraction,
    }


def constant_projector() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(4)
    x_in = torch.randn(5, 2, generator=gen, dtype=F64)
    space = sr.ParameterSpace(nn.Linear(2, 1), x_in, torch.randn(5, 1, generator=gen))
    space.equip_with_metric(OutputPullbackMetric)
    traj = sr.gradient_flow(space, space.initial_point(), 10.0, rtol=1e-11, atol=1e-13)
    d = torch.cat([x_in, torch.ones(5, 1, dtype=F64)], dim=1)
    perp = torch.eye(5, dtype=F64) - d @ torch.linalg.pinv(d)
    r0 = traj.outputs[0] - space.y
    z_exact = traj.t[:, None] * (perp @ r0)[None, :]
    dev = interpolation_deviation(traj, space)
    scale = float(r0.norm())
    return {
        "rank": int(traj.rank[0]), "QN": space.output_dim,
        "z_error": float((dev.z - z_exact).norm(dim=1).max()) / scale,
        "z_propagator_error": float((dev.z_propagator - z_exact).norm(dim=1).max()) / scale,
    }


def rank_drop(lam: float, s_end: float) -> dict[str, Any]:
    space = custom_space(SquareAndLine(), torch.ones(1, 1, dtype=F64),
                         torch.tensor([[1.0, 0.0]], dtype=F64))
    space.equip_with_metric(EuclideanMetric if lam == 0 else OutputPullbackMetric, rank_atol=0.5)
    traj = sr.gradient_flow(space, space.initial_point(), s_end, rtol=1e-10, atol=1e-12,
                            save_at=[s_end * i / 100 for i in range(101)])
    expected = 3.0 if lam == 0 else 2 * math.log(2)
    ev = traj.events[0]
    out = {
        "lam": lam, "status": traj.status.code, "nfev": traj.counters["nfev"],
        "events": [(e.rank_before, e.rank_after) for e in traj.events],
        "s_event": ev.s, "s_expected": expected, "s_error": ev.s - expected,
        "sigma_before": float(ev.singular_values_before[ev.index]),
        "sigma_after": float(ev.singular_values_after[ev.index]),
        "bracket": ev.s_bracket, "cost_end": traj.final_cost, "s_end": float(traj.s[-1]),
    }
    if lam == 1.0:
        out["propagator_error"] = interpolation_deviation(traj, space).propagator_error
    return out


def dip(depth: float = 1e-3, m: float = 0.2) -> dict[str, Any]:
    tau = m / (1 - depth)
    space = custom_space(Dip(m), torch.ones(1, 1, dtype=F64), torch.zeros(1, 2, dtype=F64))
    space.equip_with_metric(InterpolatedMetric, lam=1.0, rank_atol=tau)
    traj = sr.gradient_flow(space, space.initial_point(), 3.0, rtol=1e-8, atol=1e-12,
                            min_saves=2)
    half = math.sqrt(tau - m)
    expected = [-math.log(0.5 + half), -math.log(0.5 - half)]
    return {
        "events": [(e.rank_before, e.rank_after) for e in traj.events],
        "s_events": [e.s for e in traj.events], "s_expected": expected,
        "dip_width": expected[1] - expected[0],
        "mean_step": 3.0 / traj.counters["n_steps"], "nfev": traj.counters["nfev"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true", help="shorter, coarser runs (< 30 s)")
    parser.add_argument("--out", default=None, help="output folder (default: a temp dir)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rank_loss_"))
    out.mkdir(parents=True, exist_ok=True)

    res: dict[str, Any] = {"mode": "fast" if args.fast else "full"}
    a = res["rank_deficient"] = rank_deficient(args.fast)
    print(f"1. x = tanh(A B theta + c): K = {a['K']}, QN = {a['QN']}, rank {a['rank_min']}-"
          f"{a['rank_max']} (sigma_3 >= {a['sigma_r_min']:.3f} >> tau = {a['tau']:.1e}), "
          f"lambda = 1")
    print(f"   {a['status']}: C {a['cost_0']:.4f} -> {a['cost_end']:.4f} > 0, "
          f"|P(x - y)| / |x(0) - y| = {a['P_residual_end']:.1e}, drift in ker B "
          f"{a['ker_B_drift']:.1e}, {a['nfev']} evaluations")
    print(f"   deviation from the line (relative to |x(0) - y|): max|z| = {a['z_max']:.3f}, "
          f"max|Pz| = {a['z_range_max']:.3f}, max|P^perp z| = {a['z_perp_max']:.3f}")
    print(f"   propagator (2.58) on the stored path, spacing h = {a['spacing']:.3g}: error "
          f"{a['propagator_error']:.2e} (2h: {a['propagator_error_2h']:.2e}, ratio "
          f"{a['propagator_error_2h'] / a['propagator_error']:.2f} ~ 4: second order); "
          f"share of the bend from rank loss {a['rank_loss_fraction']:.4f}")
    b = res["constant_projector"] = constant_projector()
    print(f"2. constant P (Linear(2, 1), N = 5, rank {b['rank']} < {b['QN']}): z(t) = t P^perp "
          f"(x(0) - y) to {b['z_error']:.1e}; propagator {b['z_propagator_error']:.1e}")
    res["rank_drop"] = []
    for lam in (0.0, 1.0):
        c = rank_drop(lam, 5.0 if args.fast else 8.0)
        res["rank_drop"].append(c)
        print(f"3. x = (a, b^2/2), tau = 1/2, lambda = {lam:g}: events {c['events']} at "
              f"s = {c['s_event']:.10f} (expected {c['s_expected']:.10f}, error "
              f"{c['s_error']:.1e}, bracket {c['bracket']:.0e}); sigma {c['sigma_before']:.10f}"
              f" -> {c['sigma_after']:.10f}; {c['status']}, C = {c['cost_end']:.6g}"
              + (f", propagator error {c['propagator_error']:.1e}" if lam == 1 else ""))
    d = res["dip"] = dip()
    print(f"4. dip 0.1% below tau for Delta s = {d['dip_width']:.3f} (mean step "
          f"{d['mean_step']:.3f}): events {d['events']} at s = "
          + ", ".join(f"{x:.9f}" for x in d["s_events"])
          + " (expected " + ", ".join(f"{x:.9f}" for x in d["s_expected"]) + ")")
    (out / "rank_loss.json").write_text(json.dumps(res, indent=2))
    print(f"numbers: {out / 'rank_loss.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
