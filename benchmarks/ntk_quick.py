"""Quick timing of the structured NTK engine (not a test; run by hand).

    python benchmarks/ntk_quick.py [--sizes S M L] [--repeat 5]

For each size (tanh MLPs, float64, issue 8) prints the best-of-``repeat``
wall time (calls interleaved) of: one plain gradient (forward + backward of the summed MSE),
``StructuredBackend.ntk``, and the push-through step "NTK + Cholesky of
DD^T + one VJP" (the VJP reuses the layer factors cached by ``ntk``), plus
the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

SIZES = {
    "S": ([8, 64, 64, 1], 128),
    "M": ([32, 256, 256, 4], 256),
    "L": ([64, 1024, 1024, 1], 512),
}


def mlp(widths: list[int]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def best(fn, repeat: int) -> float:
    """Best of ``repeat`` wall times of ``fn()`` in ms (after one warm-up call)."""
    return best_interleaved([fn], repeat)[0]


def best_interleaved(fns: list, repeat: int) -> list[float]:
    """Best wall time (ms) of each function, the calls interleaved round by round.

    Interleaving makes the ratios robust to other processes on the machine.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1e3 * min(ts) for ts in times]


def measure(size: str, repeat: int) -> None:
    import subriemann as sr

    widths, n = SIZES[size]
    model = mlp(widths).double()
    x = torch.randn(n, widths[0], dtype=torch.float64)
    y = torch.randn(n, widths[-1], dtype=torch.float64)
    space = sr.ParameterSpace(model, x, y, backend="structured")
    be = space.backend
    theta = space.initial_point()
    qn = space.output_dim
    r = be.outputs(theta) - y.reshape(-1)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss = 0.5 * ((model(x) - y) ** 2).sum()
        loss.backward()

    def ntk_only() -> None:
        be._cache = None
        be.ntk(theta)

    def step() -> None:
        be._cache = None
        gram = be.ntk(theta)
        chol = torch.linalg.cholesky(0.5 * gram + 0.5 * torch.eye(qn, dtype=gram.dtype))
        w = torch.cholesky_solve(r.unsqueeze(1), chol).squeeze(1)
        be.vjp(theta, w)

    t_plain, t_ntk, t_step = best_interleaved([plain, ntk_only, step], repeat)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{size}: K={space.dim} QN={qn} chunks={len(be.bounds)} | plain grad {t_plain:.1f} ms"
        f" | ntk {t_ntk:.1f} ms ({t_ntk / t_plain:.2f}x) | ntk+chol+vjp"
        f" {t_step:.1f} ms ({t_step / t_plain:.2f}x) | peak RSS {rss:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["M", "L"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for size in args.sizes:
        measure(size, args.repeat)


if __name__ == "__main__":
    main()
