r"""The seam between parameter space and the engines that differentiate the network.

:class:`ParameterLayout` flattens a module's trainable parameters into one
vector :math:`\theta`; :class:`JacobianBackend` is the protocol every engine
implements (:class:`~subriemann.engines.FuncBackend`,
:class:`~subriemann.engines.StructuredBackend`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["ParameterLayout", "JacobianBackend", "MEMORY_BUDGET", "items_within", "plain_tensor"]

MEMORY_BUDGET: int = 1 << 30
"""Default bytes that one engine pass may allocate for its temporaries (1 GiB).

The one memory budget of the engines: ``FuncBackend.memory_budget`` and
``StructuredBackend.memory_budget`` default to it, and every chunked pass of
either engine sizes its chunks with :func:`items_within`."""


def items_within(budget: int, per_item: int, total: int) -> int:
    """How many items of ``per_item`` bytes fit in ``budget`` bytes: in ``[1, total]``.

    At least one item (a single item larger than the budget is still processed,
    alone), at most ``total`` (``total >= 1``).

    Parameters
    ----------
    budget : int
        Bytes available.
    per_item : int
        Bytes one item needs (``<= 0``: no limit).
    total : int
        Number of items to split.

    Examples
    --------
    >>> items_within(1000, 300, 10), items_within(1000, 0, 10), items_within(10, 300, 10)
    (3, 10, 1)
    """
    total = max(1, int(total))
    if per_item <= 0:
        return total
    return max(1, min(total, int(budget) // int(per_item)))


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
        """Views of ``theta`` (shape ``[..., K]``) as name → tensor ``[..., *shape]``."""
        lead = theta.shape[:-1]
        return {
            name: theta[..., a:b].view(lead + shape)
            for name, shape, a, b in zip(self.names, self.shapes, self.offsets, self.offsets[1:])
        }

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """Inverse of :meth:`unflatten`."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def slices(self) -> list[slice]:
        """Slice of :math:`\\theta` held by each parameter tensor."""
        return [slice(a, b) for a, b in zip(self.offsets, self.offsets[1:])]


def plain_tensor(theta: Tensor) -> bool:
    """Whether ``theta`` is an ordinary tensor (not traced by autograd or :mod:`torch.func`).

    Examples
    --------
    >>> plain_tensor(torch.zeros(3)), plain_tensor(torch.zeros(3, requires_grad=True))
    (True, False)
    """
    if theta.requires_grad:
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(theta)


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
    #: whether :meth:`param_gram` and :meth:`solve_param_gram` work from layer factors,
    #: without forming :math:`D` (then they are the cheap route for :math:`K < QN`)
    gram_from_factors: bool

    @property
    def fallback(self) -> Any:
        """The generic :mod:`torch.func` engine this one delegates to (itself if generic)."""
        ...

    def rows_per_pass(self, theta: Tensor) -> int:
        """How many JVP/VJP rows one batched pass computes within the memory budget."""
        ...

    def param_gram(self, theta: Tensor) -> Tensor:
        r""":math:`D^\top D`, ``[K, K]``."""
        ...

    def solve_param_gram(self, theta: Tensor, rhs: Tensor, shift: float) -> Tensor:
        r""":math:`(D^\top D + \mu 1)^{-1}r` for ``rhs`` ``[K]`` or ``[K, b]``, :math:`\mu > 0`."""
        ...

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
