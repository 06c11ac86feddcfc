"""The problem of a run: dataset, model and :class:`~subriemann.ParameterSpace`, seeded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from subriemann.app.config import Options, UsageError, parse_metrics

__all__ = ["Problem", "build_problem", "say"]


@dataclass
class Problem:
    space: Any
    theta0: Any
    info: dict[str, Any]


def say(msg: str) -> None:
    print(msg, flush=True)


def build_problem(opts: Options) -> Problem:
    """Dataset, model and :class:`~subriemann.ParameterSpace` of a run (seeded)."""
    import torch

    import subriemann as sr
    from subriemann.app.datasets import labels_to_one_hot, load_dataset, smooth_labels
    from subriemann.app.models import count_parameters, load_model_file, mlp

    ds = load_dataset(opts.data, opts.n_samples, opts.seed)
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
    space = sr.ParameterSpace(model, ds.inputs, targets, loss=opts.loss, device=opts.device)
    theta0 = space.initial_point()
    method = "svd" if space.output_dim * space.dim <= 8_000_000 else "ntk"
    sv = space.point_state(theta0).singular_values(method)
    tau = opts.rank_rtol * float(sv[0]) if sv.numel() else 0.0
    info = {
        "data": ds.name,
        "description": ds.description,
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
    }
    return Problem(space, theta0, info)


