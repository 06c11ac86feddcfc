"""Leading batch dimensions: one helper that maps a per-point function over ``[..., K]``.

geomstats writes points as ``[..., dim]``.  Most of subriemann's geometry is
defined at one point (one :math:`D[\\theta]`, one factorization); this module
lifts such a function to stacked points and vectors with broadcasting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["map_points"]


def map_points(fn: Callable[..., Tensor], base_point: Tensor, *vecs: Tensor) -> Tensor:
    """Apply ``fn(point, *vecs)`` over the leading dimensions of ``[..., K]`` arguments.

    Parameters
    ----------
    fn : callable
        ``fn(base_point [K], *vecs [K]) -> Tensor [...out]``.
    base_point : Tensor, shape=[..., K]
    *vecs : Tensor, shape=[..., K]
        Broadcast against ``base_point``'s leading dimensions.

    Returns
    -------
    Tensor, shape=[..., ...out]
        ``fn`` at each point; a single point (all arguments 1-d) is passed
        through without stacking.

    Examples
    --------
    >>> import torch
    >>> x = torch.arange(6.0).reshape(2, 3)
    >>> map_points(lambda p, v: p @ v, x, torch.ones(3))
    tensor([ 3., 12.])
    """
    if base_point.ndim == 1 and all(v.ndim <= 1 for v in vecs):
        return fn(base_point, *vecs)
    shape = torch.broadcast_shapes(base_point.shape[:-1], *[v.shape[:-1] for v in vecs])
    bp = base_point.expand(*shape, base_point.shape[-1]).reshape(-1, base_point.shape[-1])
    vs = [v.expand(*shape, v.shape[-1]).reshape(-1, v.shape[-1]) for v in vecs]
    outs = [fn(bp[i], *[v[i] for v in vs]) for i in range(bp.shape[0])]
    out = torch.stack(outs)
    return out.reshape(*shape, *out.shape[1:])
