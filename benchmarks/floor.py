"""The exact lam = 1 direction D^+ r: subriemann's ``auto`` against a hand-written floor.

    python benchmarks/floor.py                # sizes S, M, L; writes a section of RESULTS.md
    python benchmarks/floor.py --sizes S M    # a subset
    python benchmarks/floor.py --quick        # S only, 2 repeats, prints (writes nothing)

The floor is the least work an exact method can do for a tanh MLP with full-rank D:

1. one forward pass recording each layer's input ``a_l`` (with a 1 for the bias);
2. the per-output backward signals ``g_l`` (one batched backward through the layers);
3. the NTK ``sum_l (A_l A_l^T) o (G_l G_l^T)`` (per-layer structured, no D);
4. one Cholesky factorization and solve, ``w = NTK^{-1} r``;
5. one VJP from the same factors, ``dW_l = sum_n w_n g_ln a_ln^T``.

It checks nothing (no rank certificate, no accuracy control): it is a lower bound
on the time of a correct route.  ``auto`` is ``space.metric.gradient`` of
``OutputPullbackMetric`` with the default solver (a new point each call, so that
nothing is cached).  Both are timed interleaved in one process (best of
``--repeat`` after a warm-up), so their ratio is robust to other load on the
machine; the floor's answer is checked against ``auto``'s.  Sizes and models are
those of ``benchmarks/run.py``.  Goal (issue 13): auto / floor <= 2 at S,
<= 1.15 at M, <= 1.0 at L.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import SIZES, _problem  # noqa: E402  (the same sizes and models)

GOALS = {"S": 2.0, "M": 1.15, "L": 1.0}
SECTION = "## The λ = 1 direction: `auto` against a hand-written floor"
BEGIN, END = "<!-- floor:begin -->", "<!-- floor:end -->"


def floor_direction(net: torch.nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""D^+ r for a tanh MLP by per-layer NTK + Cholesky + one VJP (flat, parameter order)."""
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    acts, h = [], x
    for i, lin in enumerate(linears):  # forward, recording layer inputs
        acts.append(h)
        h = lin(h)
        if i < len(linears) - 1:
            h = torch.tanh(h)
    n, q = h.shape
    r = (h - y).reshape(-1)  # outputs in (sample, output) order
    # backward signals of every output (n, q): g has shape [n, q, width]
    g = torch.eye(q, dtype=x.dtype).expand(n, q, q)
    signals = [torch.empty(0)] * len(linears)
    for i in range(len(linears) - 1, -1, -1):
        signals[i] = g
        if i > 0:
            pre = linears[i - 1](acts[i - 1])
            g = (g @ linears[i].weight) * (1.0 - torch.tanh(pre) ** 2).unsqueeze(1)
    ntk = torch.zeros(n * q, n * q, dtype=x.dtype)
    for a, gl in zip(acts, signals):
        aa = a @ a.T + 1.0  # the bias is a weight on a constant 1
        gg = gl.reshape(n * q, -1) @ gl.reshape(n * q, -1).T
        ntk += gg * aa.repeat_interleave(q, 0).repeat_interleave(q, 1)
    chol = torch.linalg.cholesky(ntk)
    w = torch.cholesky_solve(r.unsqueeze(1), chol).reshape(n, q)
    out = []
    for a, gl in zip(acts, signals):
        wg = torch.einsum("nq,nqo->no", w, gl)  # sum_q w_nq g_nq
        out += [(wg.T @ a).reshape(-1), wg.sum(0)]  # weight [out, in], bias [out]
    return torch.cat(out)


def measure(size: str, repeat: int) -> dict:
    import subriemann as sr

    net, x, y = _problem(size)
    space = sr.ParameterSpace(net, x, y).equip_with_metric(sr.metrics.OutputPullbackMetric)
    theta = space.initial_point()
    state = {"i": 0}

    def auto() -> torch.Tensor:
        state["i"] += 1
        return space.metric.gradient(theta + 1e-12 * state["i"])  # a new point: no cache

    def floor() -> torch.Tensor:
        with torch.no_grad():
            return floor_direction(net, x, y)

    diff = float((floor() - auto()).norm() / auto().norm())
    times: dict[str, list[float]] = {"auto": [], "floor": []}
    for _ in range(repeat):
        for name, fn in (("auto", auto), ("floor", floor)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    best = {k: 1e3 * min(v) for k, v in times.items()}
    last = space.metric.last_solve
    return {
        "size": size, "K": space.dim, "QN": space.output_dim, "solver": space.metric.solver,
        "auto_ms": best["auto"], "floor_ms": best["floor"],
        "ratio": best["auto"] / best["floor"], "goal": GOALS[size], "rel_diff": diff,
        "how": last.reason if last is not None else "",
    }


def table(rows: list[dict], repeat: int, note: str = "") -> str:
    lines = [
        SECTION,
        "",
        f"Measured by `python benchmarks/floor.py` ({platform.platform()}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, float64; best of {repeat} "
        "interleaved calls after a warm-up, one process).  The floor (per-layer structured "
        "NTK + Cholesky + one VJP, no checks) is a lower bound for an exact route; `auto` "
        "certifies the rank and the accuracy (10⁻⁸ against the SVD) on top."
        + (f"  {note}" if note else ""),
        "",
        "| size | K | QN | auto solver | auto (ms) | floor (ms) | auto ÷ floor | goal | "
        "rel. diff. | how auto met the accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ok = "✓" if r["ratio"] <= r["goal"] else "✗"
        lines.append(
            f"| {r['size']} | {r['K']} | {r['QN']} | {r['solver']} | {r['auto_ms']:.1f} | "
            f"{r['floor_ms']:.1f} | {r['ratio']:.2f}× {ok} | ≤ {r['goal']}× | "
            f"{r['rel_diff']:.1e} | {r['how']} |"
        )
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md in place, atomically.

    The section is the text between ``BEGIN`` and ``END``; a file without them (or an
    older file where the section started at ``SECTION``) gets the section appended.
    """
    old = path.read_text() if path.exists() else "# subriemann benchmarks\n"
    block = f"{BEGIN}\n{text.rstrip()}\n{END}\n"
    start, end = old.find(BEGIN), old.find(END)
    if start >= 0 and end > start:
        new = old[:start] + block + old[end + len(END) + 1 :]
    else:
        legacy = old.find(SECTION)
        if legacy >= 0:  # an unmarked section: cut it up to the next heading or marker
            stops = [i for i in (old.find("\n## ", legacy + 1), old.find("\n<!--", legacy))
                     if i >= 0]
            old = old[:legacy] + (old[min(stops) + 1 :] if stops else "")
        new = old.rstrip("\n") + "\n\n" + block
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["S", "M", "L"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="S only, 2 repeats, no file")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--note", default="", help="a sentence added to the section (the load)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes, repeat = (["S"], 2) if args.quick else (args.sizes, args.repeat)
    rows = []
    for size in sizes:
        row = measure(size, repeat)
        print(f"{size}: auto {row['auto_ms']:.1f} ms, floor {row['floor_ms']:.1f} ms, "
              f"ratio {row['ratio']:.2f} (goal {row['goal']}), rel diff {row['rel_diff']:.1e}, "
              f"{row['solver']}: {row['how']}", flush=True)
        if row["rel_diff"] > 1e-6:
            raise SystemExit(f"the floor and auto disagree at {size}: {row['rel_diff']:.2e}")
        rows.append(row)
    text = table(rows, repeat, args.note)
    if args.quick:
        print(text)
    else:
        write_section(text, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
