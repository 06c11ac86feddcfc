"""One adapter from torch matrix-vector products to :class:`scipy.sparse.linalg.LinearOperator`.

SciPy's Krylov solvers (LSMR, ARPACK's ``eigsh``) work on numpy arrays; the
operators of subriemann (:math:`D`, :math:`D^\\top`, Hessian-vector products)
work on torch tensors on any device.  :func:`scipy_operator` converts at the
boundary, in float64 or float32 as the torch dtype says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

__all__ = ["scipy_operator", "to_numpy", "to_torch"]


def to_torch(a: Any, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A flat tensor from a numpy array (copied to ``device``)."""
    return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device).reshape(-1)


def to_numpy(t: Tensor) -> np.ndarray:
    """A numpy array from a tensor (detached, on the CPU)."""
    return t.detach().cpu().numpy()


def scipy_operator(
    shape: tuple[int, int],
    matvec: Callable[[Tensor], Tensor],
    rmatvec: Callable[[Tensor], Tensor] | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Any:
    """Wrap torch products as a SciPy ``LinearOperator``.

    Parameters
    ----------
    shape : (int, int)
        ``(m, n)`` of the operator :math:`A`.
    matvec : callable
        :math:`v \\mapsto Av`, torch ``[n] -> [m]``.
    rmatvec : callable, optional
        :math:`u \\mapsto A^\\top u`, torch ``[m] -> [n]``; ``matvec`` when
        omitted (a symmetric operator).
    dtype, device
        Of the torch side.

    Returns
    -------
    scipy.sparse.linalg.LinearOperator

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    >>> op = scipy_operator((2, 2), lambda v: a @ v)
    >>> op.matvec([1.0, 1.0]).tolist()
    [2.0, 3.0]
    """
    back = matvec if rmatvec is None else rmatvec
    return LinearOperator(
        shape,
        matvec=lambda v: to_numpy(matvec(to_torch(v, dtype, device))),
        rmatvec=lambda u: to_numpy(back(to_torch(u, dtype, device))),
        dtype=np.float64 if dtype == torch.float64 else np.float32,
    )
