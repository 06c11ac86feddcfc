"""The problem of a run: dataset, model and :class:`~subriemann.ParameterSpace`, seeded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from subriemann.analysis.cross_entropy import asymptotic_rate, minimum_cost, predicted_limit
from subriemann.app.config import Options, UsageError, parse_metrics
from subriemann.app.datasets import Dataset, labels_to_one_hot, load_dataset, smooth_labels
from subriemann.app.models import count_parameters, load_model_file, mlp
from subriemann.linalg import dense_svd_fits, rank_threshold
from subriemann.space import ParameterSpace

__all__ = ["Problem", "build_problem", "say"]

"""QN·K up to which the initial singular values come from a full SVD of D (else the NTK)."""


@dataclass
class Problem:
    """A run's parameter space, initial point and the ``problem`` entry of ``summary.json``."""

    space: Any
    theta0: Any
    info: dict[str, Any]


def say(msg: str) -> None:
    """Print a progress line of ``subriemann run`` (stdout, flushed)."""
    print(msg, flush=True)


def _targets(opts: Options, ds: Dataset) -> tuple[Dataset, torch.Tensor]:
    """The dataset (integer labels one-hot for cross-entropy) and the targets of the loss."""
    if opts.loss == "cross_entropy" and ds.task != "classification" and ds.labels is not None:
        ds = labels_to_one_hot(ds)  # integer class indices 0..C-1
    targets = ds.targets
    if opts.loss == "cross_entropy":
        if ds.task != "classification":
            raise UsageError(
                f"--loss cross_entropy needs class targets: one-hot (probability) rows with "
                f"Q >= 2, or integer labels 0..C-1 in an .npz, but data {opts.data!r} has "
                "real-valued targets: use --loss mse, a classification dataset (digits, iris), "
                "or one-hot encode the labels (np.eye(C)[labels])"
            )
        if opts.label_smoothing > 0:
            targets = smooth_labels(targets, opts.label_smoothing)
    elif opts.label_smoothing > 0:
        raise UsageError("--label-smoothing applies to --loss cross_entropy only")
    if "fisher" in [m.name for m in parse_metrics(opts.metrics)] and opts.loss != "cross_entropy":
        raise UsageError("metric 'fisher' (softmax Fisher) needs --loss cross_entropy")
    return ds, targets


def _cross_entropy_info(space: Any, theta0: Any) -> dict[str, Any]:
    r""":math:`C^*`, :math:`\mu` and :math:`|x(0) - x^*|` of a cross-entropy problem (§6)."""
    y = space.targets.reshape(space.num_samples, space.num_outputs)
    lim = predicted_limit(space.outputs(theta0).reshape(y.shape), y)
    dist = None
    if lim.finite and lim.limit is not None:
        dist = float((space.outputs(theta0).reshape(y.shape) - lim.limit).norm())
    return {"minimum_cost": minimum_cost(y) + 0.0, "mu": asymptotic_rate(y),
            "finite_limit": bool(lim.finite), "limit_distance": dist}


def build_problem(opts: Options) -> Problem:
    """Dataset, model and :class:`~subriemann.ParameterSpace` of a run (seeded)."""
    ds, targets = _targets(opts, load_dataset(opts.data, opts.n_samples, opts.seed))
    description = ds.description
    if opts.label_smoothing > 0:
        description += f", labels smoothed (1 − ε)y + ε/Q with ε = {opts.label_smoothing:g}"
    torch.manual_seed(opts.seed)
    if opts.model_file is not None:
        model = load_model_file(opts.model_file, ds.input_dim, ds.num_outputs)
        model_desc = f"model file {opts.model_file}"
    else:
        if ds.inputs.ndim != 2:
            ds.inputs = ds.inputs.reshape(ds.inputs.shape[0], -1)
        model = mlp(opts.model, ds.input_dim, ds.num_outputs, opts.activation)
        model_desc = f"{opts.model} {opts.activation}"
    model_desc += f", K = {count_parameters(model)}"
    space = ParameterSpace(model, ds.inputs, targets, loss=opts.loss, device=opts.device)
    theta0 = space.initial_point()
    method = "svd" if dense_svd_fits(space.output_dim, space.dim) else "ntk"
    sv = space.point_state(theta0).singular_values(method)
    tau = rank_threshold(float(sv[0]) if sv.numel() else 0.0, opts.rank_rtol)
    info = {
        "data": ds.name,
        "description": description,
        "task": ds.task,
        "model": model_desc,
        "loss": opts.loss,
        "num_samples": space.num_samples,
        "num_outputs": space.num_outputs,
        "num_parameters": space.dim,
        "output_dim": space.output_dim,
        "overparametrized": bool(space.dim >= space.output_dim),
        "initial_cost": float(space.cost(theta0)),
        "sigma_max": float(sv[0]),
        "sigma_min": float(sv[-1]),
        "initial_rank": int((sv > tau).sum()),
        "tau": tau,
        "cross_entropy": _cross_entropy_info(space, theta0)
        if opts.loss == "cross_entropy" else None,
    }
    return Problem(space, theta0, info)
