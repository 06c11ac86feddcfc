r"""The seam between parameter space and the engines that differentiate the network.

:class:`ParameterLayout` flattens a module's trainable parameters into one
vector :math:`\theta`; :class:`JacobianBackend` is the protocol every engine
implements (:class:`~subriemann.engines.FuncBackend`,
:class:`~subriemann.engines.StructuredBackend`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["ParameterLayout", "JacobianBackend"]


class ParameterLayout:
    r"""Flattening of a module's trainable parameters into one vector :math:`\theta`.

    The order is that of ``module.named_parameters()`` restricted to
    parameters with ``requires_grad=True``; each tensor is flattened in
    row-major (C) order.  Frozen parameters and buffers are held fixed.

    Parameters
    ----------
    names : sequence of str
    shapes : sequence of torch.Size
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[torch.Size]) -> None:
        self.names = list(names)
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [int(torch.Size(s).numel()) for s in shapes]
        self.offsets = [0]
        for n in self.numels:
            self.offsets.append(self.offsets[-1] + n)
        self.dim = self.offsets[-1]

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Views of ``theta`` (shape ``[K]``) as a name → tensor dictionary."""
        return {
            name: theta[a:b].view(shape)
            for name, shape, a, b in zip(self.names, self.shapes, self.offsets, self.offsets[1:])
        }

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten`."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def slices(self) -> list[slice]:
        """Slice of :math:`\\theta` held by each parameter tensor."""
        return [slice(a, b) for a, b in zip(self.offsets, self.offsets[1:])]


class JacobianBackend(Protocol):
    """What :class:`~subriemann.ParameterSpace` needs from an engine.

    All vectors are flat: ``theta`` has shape ``[K]``, outputs ``[QN]``
    (sample-major), the Jacobian ``[QN, K]``.
    """

    #: the engine's name (``"func"``, ``"structured"``)
    name: str
    #: whether ``jvp`` and ``vjp`` accept batches ``[..., K]`` / ``[..., QN]``
    #: (otherwise the space calls them one vector at a time)
    batched: bool

    def outputs(self, theta: Tensor) -> Tensor: ...

    def jacobian(self, theta: Tensor) -> Tensor: ...

    def jvp(self, theta: Tensor, tangent_vec: Tensor) -> Tensor: ...

    def vjp(self, theta: Tensor, output_covec: Tensor) -> Tensor: ...

    def ntk(self, theta: Tensor) -> Tensor: ...

    def pullback(
        self, theta: Tensor, covec_fn: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        r"""``(x, D^T covec_fn(x))``: the outputs and the VJP of a covector computed from them."""
        ...
