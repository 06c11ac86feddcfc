"""Three ways to define your own metric on parameter space, each verified.

(a) subclass ``ParameterMetric`` and give only ``metric_matrix``;
(b) give an output-space metric G(x) and pull it back, g = D^T G(x) D
    (a per-sample weighting, and the softmax Fisher metric of classification);
(c) combine metrics: a weighted sum, and a metric plus damping.

Each metric is attached the geomstats way (``space.equip_with_metric``), its
Riemannian gradient is ``space.metric.gradient(theta)`` (the flow is its
negative), and ``sr.check_gradient`` verifies g(grad C, w) = dC(w) on random
directions w of the metric's distribution.

Run:  python examples/custom_metrics.py [--fast]
"""

from __future__ import annotations

import argparse
import time

import torch

import subriemann as sr
from subriemann.metrics import (
    DampedMetric,
    EuclideanMetric,
    InterpolatedMetric,
    OutputMetric,
    OutputPullbackMetric,
    ParameterMetric,
    SoftmaxFisherMetric,
)


# (a) ---------------------------------------------------------------------------------
class DiagonalPreconditioned(ParameterMetric):
    """g = D^T D + diag(d): the output pullback plus a per-parameter floor (Adagrad-like)."""

    def __init__(self, space, floor: torch.Tensor) -> None:
        super().__init__(space)
        self.floor = floor

    def metric_matrix(self, base_point):
        d = self.space.jacobian(base_point)
        return d.T @ d + torch.diag(self.floor)


def problem(n: int, classes: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, classes))
    x = torch.randn(n, 2)
    if classes == 1:
        return net, x, torch.sin(3 * x[:, :1])
    return net, x, torch.softmax(torch.randn(n, classes), -1)


def main(fast: bool = True) -> list[tuple[str, str, float, float, float]]:
    n = 8 if fast else 24
    rows = []

    def record(recipe: str, space, theta) -> None:
        t0 = time.perf_counter()
        grad = space.metric.gradient(theta)
        elapsed = time.perf_counter() - t0
        check = sr.check_gradient(space, theta, rtol=1e-8)
        assert check.passed, f"{recipe}: {check}"
        rows.append(
            (
                recipe,
                type(space.metric).__name__,
                float(grad.norm()),
                check.max_residual,
                1e3 * elapsed,
            )
        )

    net, x, y = problem(n)
    space = sr.ParameterSpace(net, x, y)
    theta = space.initial_point()

    # (a) a subclass with only metric_matrix: sharp, inner_product, distribution are generic
    floor = torch.full((space.dim,), 1e-2, dtype=space.dtype)
    space.equip_with_metric(DiagonalPreconditioned, floor=floor)
    space.metric.check(theta)  # symmetric, positive on its distribution, consistent
    record("(a) metric_matrix", space, theta)

    # (b) an output metric G(x), pulled back: weight sample j by w_j
    w = torch.linspace(0.5, 2.0, space.num_samples, dtype=space.dtype)
    space.equip_with_metric(OutputMetric, output_metric=lambda out: torch.diag(w))
    record("(b) G(x) = diag(w)", space, theta)

    # (b) the softmax Fisher metric for a classifier: natural gradient of cross-entropy
    cnet, cx, cy = problem(n, classes=3, seed=1)
    cspace = sr.ParameterSpace(cnet, cx, cy, loss="cross_entropy")
    cspace.equip_with_metric(SoftmaxFisherMetric)
    record("(b) softmax Fisher", cspace, cspace.initial_point())

    # (c) a weighted sum: 0.3 * Euclidean + 0.7 * output pullback is g_0.7 ...
    space.metric = 0.3 * EuclideanMetric(space) + 0.7 * OutputPullbackMetric(space)
    record("(c) 0.3 eucl + 0.7 pullback", space, theta)
    g07 = InterpolatedMetric(space, lam=0.7).gradient(theta)
    assert torch.allclose(space.metric.gradient(theta), g07, rtol=1e-8, atol=1e-12)

    # (c) ... and damping: D^T D + mu 1 = (1 + mu) g_lam with lam = 1 / (1 + mu)
    mu = 0.5
    space.metric = DampedMetric(space, OutputPullbackMetric(space), damping=mu)
    record(f"(c) pullback + {mu} * 1", space, theta)
    lm = InterpolatedMetric(space, lam=1 / (1 + mu)).gradient(theta) / (1 + mu)
    assert torch.allclose(space.metric.gradient(theta), lm, rtol=1e-10, atol=1e-13)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="smaller problems (the default size)")
    parser.add_argument("--full", action="store_true", help="a larger training set")
    args = parser.parse_args()
    rows = main(fast=not args.full)
    print(f"{'recipe':30s} {'class':24s} {'|grad|':>10s} {'check residual':>15s} {'ms':>8s}")
    for recipe, cls, norm, res, ms in rows:
        print(f"{recipe:30s} {cls:24s} {norm:10.4g} {res:15.2e} {ms:8.1f}")
    print("all gradient checks passed (rtol 1e-8)")
