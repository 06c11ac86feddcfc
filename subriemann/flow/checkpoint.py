r"""Checkpoints of a flow: their path, the problem's fingerprint, and a validated read.

A checkpoint is a trajectory file (:meth:`~subriemann.Trajectory.save`) with
the integrator state added (see :mod:`subriemann.flow.trajectory`).  Three rules
keep the work it holds from being lost or mixed with another problem's:

* **one name**: ``"run"`` and ``"run.npz"`` are the same file for writing
  and resuming (:func:`~subriemann.flow.trajectory.npz_path`);
* **checked before integrating**: :func:`checkpoint_path` creates the folder
  and writes a probe file there before the first step, so an unwritable path
  fails at once, not after the whole integration;
* **the problem's fingerprint**: :func:`problem_fingerprint` hashes every
  ingredient of the flow (model structure and fixed buffers, parameter
  layout and dtype, :math:`\theta_0`, inputs, targets, loss, metric and its
  settings).  It is stored in every trajectory (``Trajectory.problem``), and
  resuming from a checkpoint of another problem raises a ``ValueError`` that
  names the ingredients that differ.

Damaged files (empty, truncated, a renamed ``.npy``, a missing array or
metadata key, row counts that disagree) raise a one-line ``ValueError`` naming
the file and the problem (:func:`read_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from subriemann.flow.trajectory import (
    Trajectory,
    existing_npz,
    npz_path,
    open_npz,
    read_array,
    read_meta,
)
from subriemann.validation import check_int, check_real

__all__ = ["checkpoint_path", "problem_fingerprint", "read_checkpoint", "check_same_problem",
           "INTEGRATOR_KEYS"]

INTEGRATOR_KEYS = ("s", "h", "rank", "n_steps", "grid_index", "s_prev", "n_rec", "n_events",
                   "v0norm", "nfev", "n_rejected")
"""The keys of ``meta["integrator"]`` a checkpoint must have."""

_INTEGRATOR_ARRAYS = ("theta", "f", "sv")


def checkpoint_path(path: str | Path) -> Path:
    """The checkpoint file for ``path`` (``".npz"`` appended), checked writable now.

    Creates the folder, then writes and removes a probe file in it.

    Raises
    ------
    ValueError
        When ``path`` is a directory, its folder cannot be created (e.g. a
        parent is a regular file) or nothing can be written there.
    """
    path = npz_path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory, not a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"checkpoint {path} cannot be written ({type(err).__name__}: {err.strerror or err})"
        ) from None
    return path


def _digest(*parts: Any) -> str:
    """A short SHA-256 of tensors (dtype, shape and bytes) and strings."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        else:
            h.update(str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def problem_fingerprint(space: Any, metric_description: dict[str, Any],
                        theta0: Tensor) -> dict[str, str]:
    r"""A short hash of each ingredient of a flow's problem.

    Parameters
    ----------
    space : ParameterSpace
    metric_description : dict
        ``metric.description()`` (class and settings).
    theta0 : Tensor, shape=[K]
        The initial point.

    Returns
    -------
    dict
        ``model`` (class, structure and fixed buffers), ``parameter layout``
        (names, shapes, dtype), ``initial point``, ``inputs``, ``targets``,
        ``loss`` and ``metric``, each a 16-hex-digit hash: two problems
        agree on an ingredient exactly when its hashes agree (up to SHA-256
        collisions).
    """
    fixed = sorted(space.fixed_tensors.items())
    loss = space.loss
    return {
        "model": _digest(type(space.module).__qualname__, repr(space.module),
                         *[x for kv in fixed for x in kv]),
        "parameter layout": _digest(space.layout.names, space.layout.shapes, space.dtype),
        "initial point": _digest(theta0),
        "inputs": _digest(space.inputs),
        "targets": _digest(space.targets),
        "loss": _digest(type(loss).__module__, type(loss).__qualname__, repr(loss),
                        getattr(loss, "name", "")),
        "metric": _digest(json.dumps(metric_description, sort_keys=True, default=str)),
    }


def check_same_problem(stored: dict[str, str], now: dict[str, str], path: Path) -> None:
    """Refuse a checkpoint of another problem, naming the ingredients that differ."""
    if not stored:
        raise ValueError(
            f"cannot resume from {path}: it has no problem fingerprint (written by an older "
            "version); start afresh"
        )
    diff = [k for k in now if stored.get(k) != now[k]]
    if diff:
        raise ValueError(
            f"cannot resume from {path}: it was computed for another problem (different "
            + ", ".join(diff) + ")"
        )


def read_checkpoint(path: str | Path) -> tuple[Trajectory, dict[str, Any], dict[str, Tensor]]:
    """Read and validate a checkpoint: ``(trajectory, integrator meta, integrator arrays)``.

    The integrator meta is ``{}`` for a trajectory that is not a checkpoint.

    Raises
    ------
    ValueError
        For a damaged or inconsistent file, naming ``path`` and the problem.
    """
    path = existing_npz(path)
    traj = Trajectory.load(path)  # validates the trajectory part
    with open_npz(path) as data:
        integ = read_meta(data, path).get("integrator")
        if integ is None:
            return traj, {}, {}
        if not isinstance(integ, dict):
            raise ValueError(f"{path}: the integrator state is not a JSON object")
        arrays = {
            k[len("integrator_"):]: read_array(data, k, path)
            for k in data.files
            if k.startswith("integrator_")
        }
    _check_integrator(traj, integ, arrays, path)
    return traj, integ, arrays


def _check_integrator(traj: Trajectory, integ: dict[str, Any], arrays: dict[str, Tensor],
                      path: Path) -> None:
    missing = [k for k in INTEGRATOR_KEYS if k not in integ]
    if missing:
        raise ValueError(f"{path}: checkpoint metadata key {missing[0]!r} missing")
    for k in _INTEGRATOR_ARRAYS:
        if k not in arrays:
            raise ValueError(f"{path}: checkpoint array 'integrator_{k}' missing")
    n_rec, n_events = integ["n_rec"], integ["n_events"]
    if not _valid(check_int, n_rec, low=1, high=len(traj)):
        raise ValueError(f"{path}: checkpoint n_rec = {n_rec!r} does not fit the "
                         f"{len(traj)} saved rows")
    if not _valid(check_int, n_events, low=0, high=len(traj.events)):
        raise ValueError(f"{path}: checkpoint n_events = {n_events!r} does not fit the "
                         f"{len(traj.events)} saved events")
    _check_shapes(traj, arrays, path)
    for key in ("s", "s_prev", "v0norm"):
        v = integ[key]
        if not _valid(check_real, v):
            raise ValueError(f"{path}: checkpoint metadata {key!r} = {v!r} is not a finite number")
    if not bool(torch.isfinite(arrays["theta"]).all()):
        raise ValueError(f"{path}: checkpoint array 'integrator_theta' is not finite")


def _valid(check: Callable[..., Any], value: Any, **bounds: Any) -> bool:
    """Whether ``check(value, ...)`` of :mod:`subriemann.validation` accepts ``value``."""
    try:
        check(value, "value", **bounds)
    except ValueError:  # ArgumentTypeError included
        return False
    return True


def _check_shapes(traj: Trajectory, arrays: dict[str, Tensor], path: Path) -> None:
    dim, m = traj.theta.shape[1], traj.singular_values.shape[1]
    want = {"theta": (dim,), "f": (dim,), "sv": (m,), "sv_prev": (m,)}
    for name, shape in want.items():
        if name in arrays and tuple(arrays[name].shape) != shape:
            raise ValueError(f"{path}: checkpoint array 'integrator_{name}' has shape "
                             f"{tuple(arrays[name].shape)}, not {shape}")
