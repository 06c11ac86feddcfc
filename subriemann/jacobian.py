r"""How :math:`x[\theta]`, :math:`D = \partial x/\partial\theta` and its products are computed.

This module is the single *seam* behind :class:`~subriemann.ParameterSpace`:
every evaluation of the network, of :math:`D`, :math:`Dv`, :math:`D^\top u`
and of the empirical NTK :math:`DD^\top` goes through a
:class:`JacobianBackend`.  Two implementations exist:

* :class:`FuncBackend` (this module): generic, any ``torch.nn.Module``,
  built on :mod:`torch.func` (``functional_call``, ``vmap``, ``jacrev``,
  ``jvp``, ``vjp``), chunked over samples and parameter groups so memory
  stays bounded;
* :class:`~subriemann.structured.StructuredBackend`: per-layer structured
  NTK for the common layers (``Linear``, convolutions, elementwise
  activations, ...), never forming :math:`D`.

:func:`make_backend` chooses between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor
from torch.func import functional_call, jvp, vjp, vmap

__all__ = ["JacobianBackend", "FuncBackend", "ParameterLayout", "make_backend"]


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

    name: str

    def outputs(self, theta: Tensor) -> Tensor: ...

    def jacobian(self, theta: Tensor) -> Tensor: ...

    def jvp(self, theta: Tensor, tangent_vec: Tensor) -> Tensor: ...

    def vjp(self, theta: Tensor, output_covec: Tensor) -> Tensor: ...

    def ntk(self, theta: Tensor) -> Tensor: ...


class FuncBackend:
    r"""Generic :mod:`torch.func` engine for any module.

    Parameters
    ----------
    apply : callable
        ``apply(params: dict, inputs: Tensor) -> Tensor`` of shape ``[n, Q]``.
    layout : ParameterLayout
    inputs : Tensor, shape=[N, ...]
    num_outputs : int
        Q.
    chunk_size : int or None
        Samples per chunk (``None``: all at once).

    Notes
    -----
    ``jacobian`` picks reverse mode (one vector-Jacobian product per output
    row, vectorised over samples) when :math:`QN \le K` and forward mode
    (one Jacobian-vector product per parameter) otherwise.  ``ntk``
    accumulates :math:`DD^\top = \sum_p D_p D_p^\top` over parameter tensors
    :math:`p`, so the peak memory is that of the largest block
    :math:`D_p`, never of :math:`D`.
    """

    name = "func"

    def __init__(
        self,
        apply: Callable[[dict[str, Tensor], Tensor], Tensor],
        layout: ParameterLayout,
        inputs: Tensor,
        num_outputs: int,
        chunk_size: int | None = None,
    ) -> None:
        self.apply = apply
        self.layout = layout
        self.inputs = inputs
        self.num_outputs = num_outputs
        n = inputs.shape[0]
        self.chunk_size = n if chunk_size is None else max(1, min(int(chunk_size), n))

    # -- helpers ---------------------------------------------------------------
    def _chunks(self) -> list[Tensor]:
        return list(torch.split(self.inputs, self.chunk_size))

    def _flat_apply(self, theta: Tensor, inputs: Tensor) -> Tensor:
        return self.apply(self.layout.unflatten(theta), inputs).reshape(-1)

    # -- interface -------------------------------------------------------------
    def outputs(self, theta: Tensor) -> Tensor:
        return torch.cat([self._flat_apply(theta, c) for c in self._chunks()])

    def jvp(self, theta: Tensor, tangent_vec: Tensor) -> Tensor:
        out = []
        for c in self._chunks():
            out.append(jvp(lambda t, c=c: self._flat_apply(t, c), (theta,), (tangent_vec,))[1])
        return torch.cat(out)

    def vjp(self, theta: Tensor, output_covec: Tensor) -> Tensor:
        q = self.num_outputs
        res = torch.zeros_like(theta)
        start = 0
        for c in self._chunks():
            n = c.shape[0] * q
            _, fn = vjp(lambda t, c=c: self._flat_apply(t, c), theta)
            res = res + fn(output_covec[start : start + n])[0]
            start += n
        return res

    def _jacobian_reverse(self, theta: Tensor, cols: slice | None = None) -> Tensor:
        """Rows of D by reverse mode, vectorised over samples (and outputs)."""
        q = self.num_outputs

        def single(t: Tensor, x: Tensor) -> Tensor:
            return self._flat_apply(t, x.unsqueeze(0))

        def row_block(t: Tensor, x: Tensor) -> Tensor:
            _, fn = vjp(lambda tt: single(tt, x), t)
            eye = torch.eye(q, dtype=t.dtype, device=t.device)
            return vmap(fn)(eye)[0]  # [Q, K]

        blocks = []
        for c in self._chunks():
            j = vmap(row_block, in_dims=(None, 0))(theta, c)  # [n, Q, K]
            j = j.reshape(-1, theta.shape[0])
            blocks.append(j if cols is None else j[:, cols])
        return torch.cat(blocks)

    def _jacobian_forward(self, theta: Tensor) -> Tensor:
        k = theta.shape[0]
        eye_chunk = 256
        cols = []
        for a in range(0, k, eye_chunk):
            b = min(k, a + eye_chunk)
            basis = torch.zeros(b - a, k, dtype=theta.dtype, device=theta.device)
            basis[torch.arange(b - a), torch.arange(a, b)] = 1.0
            cols.append(vmap(lambda v: self.jvp(theta, v))(basis).T)
        return torch.cat(cols, dim=1)

    def jacobian(self, theta: Tensor) -> Tensor:
        qn = self.inputs.shape[0] * self.num_outputs
        if qn <= theta.shape[0]:
            return self._jacobian_reverse(theta)
        return self._jacobian_forward(theta)

    def ntk(self, theta: Tensor) -> Tensor:
        qn = self.inputs.shape[0] * self.num_outputs
        gram = torch.zeros(qn, qn, dtype=theta.dtype, device=theta.device)
        if qn > theta.shape[0]:
            d = self._jacobian_forward(theta)
            return d @ d.T
        # Group parameter tensors into blocks of bounded size.
        budget = max(1, (1 << 27) // max(qn, 1))  # ~1 GiB of float64 per block
        block: list[slice] = []
        size = 0
        groups: list[slice] = []
        for sl in self.layout.slices():
            n = sl.stop - sl.start
            if block and size + n > budget:
                groups.append(slice(block[0].start, block[-1].stop))
                block, size = [], 0
            block.append(sl)
            size += n
        if block:
            groups.append(slice(block[0].start, block[-1].stop))
        if len(groups) == 1:
            d = self._jacobian_reverse(theta)
            return d @ d.T
        for g in groups:
            dp = self._jacobian_reverse(theta, cols=g)
            gram += dp @ dp.T
        return gram


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
        from subriemann.structured import StructuredBackend, UnsupportedModuleError
    except ImportError:  # the structured engine is optional
        if kind == "structured":
            raise
        return func
    try:
        return StructuredBackend(module, layout, inputs, num_outputs, chunk_size, fallback=func)
    except UnsupportedModuleError as err:
        if kind == "structured":
            raise ValueError(str(err)) from None
        from subriemann._warnings import warn_once

        warn_once(
            f"structured NTK engine does not support {err.module_name}; "
            "falling back to the generic torch.func engine (slower)."
        )
        return func
