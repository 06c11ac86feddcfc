"""``python -m subriemann``: a small end-to-end demo (placeholder).

The full command-line program (``subriemann run``, with its report folder)
replaces this module.  Until then, ``python -m subriemann [run] [--out DIR]``
builds a tanh MLP on random data, computes the adapted-flow gradient
(the output-pullback metric, :math:`\\lambda = 1`) and prints the sizes, the
rank of :math:`D` and the residual of :func:`subriemann.check_gradient`.
With ``--out`` it also writes these numbers to ``DIR/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m subriemann", description=__doc__)
    parser.add_argument("command", nargs="?", default="run", choices=["run"])
    parser.add_argument("--out", default=None, help="folder for demo.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    import subriemann as sr

    torch.manual_seed(args.seed)
    n, m, q = 12, 3, 2
    model = torch.nn.Sequential(
        torch.nn.Linear(m, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
        torch.nn.Linear(16, q),
    )
    inputs, targets = torch.randn(n, m), torch.randn(n, q)
    space = sr.ParameterSpace(model, inputs, targets, loss="mse")
    theta = space.initial_point()
    space.equip_with_metric(sr.metrics.OutputPullbackMetric)
    grad = space.metric.gradient(theta)
    check = sr.check_gradient(space, theta)
    rank = space.metric.rank(theta)
    # The adapted flow moves the outputs by -P grad_x C (MATH.md (2.27)); at full
    # rank QN that is -(x - y) for MSE.
    dx = space.jvp(theta, -grad)
    residual = float((dx + (space.outputs(theta) - space.y)).norm())
    summary = {
        "K": space.dim,
        "QN": space.output_dim,
        "rank_D": rank,
        "cost": float(space.cost(theta)),
        "gradient_norm": float(grad.norm()),
        "check_gradient_max_residual": check.max_residual,
        "check_gradient_passed": check.passed,
        "output_velocity_residual": residual,
    }
    print(f"subriemann demo: {space}")
    print(f"  K = {space.dim}, QN = {space.output_dim}, rank D = {rank}")
    print(f"  C(theta0) = {summary['cost']:.6g}, |grad C| = {summary['gradient_norm']:.6g}")
    print(
        f"  check_gradient: max residual {check.max_residual:.3e} "
        f"({'passed' if check.passed else 'FAILED'} at rtol {check.rtol:g})"
    )
    print(f"  |D V + (x - y)| = {residual:.3e}  (adapted flow: dx/ds = -(x - y))")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"  wrote {out / 'demo.json'}")
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
