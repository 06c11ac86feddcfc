"""Choosing the Jacobian engine for a network: structured when it can, generic otherwise."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from subriemann._warnings import warn_once
from subriemann.engines.base import JacobianBackend, ParameterLayout
from subriemann.engines.func import FuncBackend
from subriemann.engines.structured import StructuredBackend, UnsupportedModuleError

__all__ = ["make_backend"]


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
    if kind not in ("auto", "structured"):
        raise ValueError(f"backend must be 'auto', 'func' or 'structured', got {kind!r}")
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
