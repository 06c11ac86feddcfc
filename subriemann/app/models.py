r"""Model builders for ``subriemann run``: MLP specs and user model files.

* :func:`mlp` builds a fully connected network from a spec string such as
  ``"mlp:64,64"`` (two hidden layers of width 64) or ``"linear"`` (no
  hidden layer).
* :func:`load_model_file` imports ``path.py`` and calls a factory in it,
  ``"path.py:factory"``, which returns any :class:`torch.nn.Module`.

Examples
--------
>>> from subriemann.app.models import mlp, count_parameters
>>> net = mlp("mlp:8,8", in_dim=3, out_dim=2, activation="tanh")
>>> count_parameters(net)   # (3*8 + 8) + (8*8 + 8) + (8*2 + 2)
122
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from subriemann._warnings import one_line
from subriemann.validation import check_int

__all__ = ["ACTIVATIONS", "parse_spec", "mlp", "load_model_file", "count_parameters"]

ACTIVATIONS: dict[str, Callable[[], torch.nn.Module]] = {
    "tanh": torch.nn.Tanh,
    "relu": torch.nn.ReLU,
    "softplus": torch.nn.Softplus,
    "sigmoid": torch.nn.Sigmoid,
    "gelu": torch.nn.GELU,
}
"""Activation names accepted by :func:`mlp`."""


def parse_spec(spec: str) -> tuple[int, ...]:
    """Hidden widths of a model spec: ``"mlp:64,64"`` → ``(64, 64)``; ``"linear"`` → ``()``.

    Raises
    ------
    ValueError
        If the spec is not ``linear``, ``mlp`` or ``mlp:W1,W2,...`` with positive integer widths.

    Examples
    --------
    >>> parse_spec("mlp:64,32")
    (64, 32)
    >>> parse_spec("linear")
    ()
    """
    if not isinstance(spec, str):
        raise TypeError(f"model spec must be a string, got {type(spec).__name__}")
    s = spec.strip().lower()
    if s in ("linear", "mlp", "mlp:"):
        return ()
    kind, sep, rest = s.partition(":")
    if kind != "mlp" or not sep:
        raise ValueError(
            f"unknown model spec {spec!r}: use 'mlp:W1,W2,...' (hidden widths), e.g. "
            "'mlp:64,64', or 'linear'; for any other network use --model-file path.py:factory"
        )
    widths = []
    for part in rest.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise ValueError(
                f"bad width {part!r} in model spec {spec!r}: widths must be positive integers"
            )
        widths.append(int(part))
    return tuple(widths)


def mlp(spec: str, in_dim: int, out_dim: int, activation: str = "tanh") -> torch.nn.Sequential:
    r"""A fully connected network :math:`\mathbb{R}^M \to \mathbb{R}^Q` from a spec string.

    Parameters
    ----------
    spec : str
        ``"mlp:W1,W2,..."`` (hidden widths) or ``"linear"``.
    in_dim, out_dim : int
        :math:`M` and :math:`Q`.
    activation : {"tanh", "relu", "softplus", "sigmoid", "gelu"}
        Between the linear layers (none after the last one).

    Returns
    -------
    torch.nn.Sequential
        Initialized with torch's default (seed it with :func:`torch.manual_seed`);
        inputs with more than one non-batch dimension are flattened first.
    """
    widths = parse_spec(spec)
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}"
        )
    check_int(in_dim, "in_dim", low=1)
    check_int(out_dim, "out_dim", low=1)
    layers: list[torch.nn.Module] = [torch.nn.Flatten()]
    dims = (in_dim, *widths, out_dim)
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(ACTIVATIONS[activation]())
    return torch.nn.Sequential(*layers)


def count_parameters(model: torch.nn.Module) -> int:
    """K: the number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_model_file(
    ref: str, in_dim: int | None = None, out_dim: int | None = None
) -> torch.nn.Module:
    """Import ``path.py`` and return ``factory(...)`` for ``ref = "path.py:factory"``.

    The factory is called with no arguments, or, when it has parameters, as
    ``factory(in_dim, out_dim)`` (the data's :math:`M` and :math:`Q`).  It must
    return a :class:`torch.nn.Module`.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If ``ref`` is malformed, the file cannot be imported (any exception it
        raises is reported in one line), there is no such factory, or it does
        not return a module.
    """
    if not isinstance(ref, str) or ":" not in ref:
        raise ValueError(f"--model-file must be 'path.py:factory', got {ref!r}")
    path_s, _, name = ref.rpartition(":")
    if not path_s or not name.isidentifier():
        raise ValueError(f"--model-file must be 'path.py:factory', got {ref!r}")
    path = Path(path_s)
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    mod_name = f"_subriemann_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # user code: report whatever it raised in one line
        sys.modules.pop(mod_name, None)
        raise ValueError(f"cannot import {path}: {one_line(err)}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{path} has no callable named {name!r}")
    try:
        params = inspect.signature(factory).parameters
        wants_dims = any(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            for p in params.values()
        )
    except (TypeError, ValueError):
        wants_dims = False
    try:
        model = factory(in_dim, out_dim) if wants_dims else factory()
    except Exception as err:
        raise ValueError(f"{path}:{name}() failed: {one_line(err)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(
            f"{path}:{name}() must return a torch.nn.Module, got {type(model).__name__}"
        )
    return model
