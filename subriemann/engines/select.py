"""Choosing the Jacobian engine for a network: structured when it can, generic otherwise."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from subriemann._warnings import warn_once
from subriemann.engines.base import JacobianBackend, ParameterLayout
from subriemann.engines.func import FuncBackend
from subriemann.engines.structured import StructuredBackend, UnsupportedModuleError
from subriemann.validation import check_choice

__all__ = ["make_backend", "BACKENDS"]

BACKENDS = ("auto", "func", "structured")
"""The engines :func:`make_backend` chooses from (``backend=`` of a parameter space)."""


def make_backend(
    kind: str,
    module: torch.nn.Module,
    apply: Callable[[dict[str, Tensor], Tensor], Tensor],
    layout: ParameterLayout,
    inputs: Tensor,
    num_outputs: int,
    chunk_size: int | None = None,
) -> JacobianBackend:
    """Choose the Jacobian engine.

    Parameters
    ----------
    kind : {"auto", "func", "structured"}
        ``"auto"`` uses the structured engine when every module is supported
        and falls back to :class:`FuncBackend` otherwise (with a one-time
        warning naming the unsupported module).
    """
    func = FuncBackend(apply, layout, inputs, num_outputs, chunk_size)
    if kind == "func":
        return func
    check_choice(kind, "backend", BACKENDS)
    try:
        return StructuredBackend(module, layout, inputs, num_outputs, chunk_size, fallback=func)
    except UnsupportedModuleError as err:
        if kind == "structured":
            raise ValueError(str(err)) from None
        warn_once(
            f"structured NTK engine does not support {err.module_name}; "
            "falling back to the generic torch.func engine (slower)."
        )
        return func
