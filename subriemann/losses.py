r"""Costs on output space, :math:`C(x)` with :math:`x \in \mathbb{R}^{QN}`.

Every loss works on outputs and targets of shape ``[N, Q]`` (the
:class:`~subriemann.ParameterSpace` reshapes its flat, sample-major
vector :math:`x \in \mathbb{R}^{QN}`).  A loss provides

* ``value(x, y)``: :math:`C(x)`, a scalar;
* ``grad(x, y)``: :math:`\nabla_x C`, shape ``[N, Q]``;
* ``hvp(x, y, v)``: :math:`\nabla_x^2 C \, v`, shape ``[N, Q]``;
* ``check_targets(y)``: raises :class:`ValueError` for invalid targets.

Subclass :class:`Loss` and give only ``value``: the gradient and the
Hessian-vector product then come from :mod:`torch.func`.

Examples
--------
>>> import torch
>>> from subriemann.losses import MSELoss, CrossEntropyLoss
>>> x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
>>> y = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
>>> float(MSELoss().value(x, y))  # 1/2 (1 + 4), a sum, not a mean
2.5
>>> ce, p = CrossEntropyLoss(), torch.tensor([[0.5, 0.5]], dtype=torch.float64)
>>> bool(torch.isclose(ce.value(x + 7.0, p), ce.value(x, p)))  # C(x + c1) = C(x)
True
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad as _grad
from torch.func import jvp as _jvp

from subriemann.validation import check_tensor

__all__ = ["Loss", "MSELoss", "CrossEntropyLoss", "get_loss"]


class Loss:
    """Base class for costs :math:`C(x, y)` on output space.

    Subclasses must implement :meth:`value`.  :meth:`grad` and :meth:`hvp`
    default to automatic differentiation with :mod:`torch.func`.

    Examples
    --------
    >>> import torch
    >>> class Quartic(Loss):
    ...     name = "quartic"
    ...     def value(self, x, y):
    ...         return 0.25 * ((x - y) ** 4).sum()
    >>> x = torch.tensor([[2.0]], dtype=torch.float64)
    >>> Quartic().grad(x, torch.zeros_like(x))
    tensor([[8.]], dtype=torch.float64)
    """

    name: str = "custom"

    def value(self, x: Tensor, y: Tensor) -> Tensor:
        """Cost :math:`C(x)`.

        Parameters
        ----------
        x : Tensor, shape=[N, Q]
            Outputs.
        y : Tensor, shape=[N, Q]
            Targets.

        Returns
        -------
        cost : Tensor, shape=[]
        """
        raise NotImplementedError

    def grad(self, x: Tensor, y: Tensor) -> Tensor:
        r"""Output gradient :math:`\nabla_x C`, shape ``[N, Q]``."""
        return _grad(lambda z: self.value(z, y))(x)

    def hvp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        r"""Hessian-vector product :math:`\nabla_x^2 C \, v`, shape ``[N, Q]``."""
        return _jvp(lambda z: self.grad(z, y), (x,), (v,))[1]

    def check_targets(self, y: Tensor) -> None:
        """Raise :class:`ValueError` if ``y`` is not a valid target array."""
        check_tensor(y, "targets", finite=True)

    def prepare_targets(self, y: Tensor) -> Tensor:
        """Targets as the loss uses them, after :meth:`check_targets` (default: unchanged)."""
        return y

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MSELoss(Loss):
    r"""Summed squared error, :math:`C = \tfrac12 |x - y|^2` ([CM24] (2.47)).

    This is a **sum, not a mean**: with a :math:`1/N` factor every flow time
    :math:`s` would become :math:`N s`.

    Closed forms: :math:`\nabla_x C = x - y`, :math:`\nabla_x^2 C = 1`.
    """

    name = "mse"

    def value(self, x: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((x - y) ** 2).sum()

    def grad(self, x: Tensor, y: Tensor) -> Tensor:
        return x - y

    def hvp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return v.clone()


class CrossEntropyLoss(Loss):
    r"""Cross-entropy on logits, :math:`C = \sum_j -\langle y_j, \log\sigma(x_j)\rangle`.

    [CM24] (2.66).  Each target row :math:`y_j` must lie in the probability
    simplex (non-negative, summing to one to within ``simplex_atol``).

    Closed forms (docs/theory.md §6): :math:`\nabla_{x_j} C = \sigma(x_j) - y_j`
    and the Hessian is block diagonal with blocks
    :math:`H_j = \operatorname{diag}\sigma_j - \sigma_j\sigma_j^\top`
    (this uses :math:`\sum_i y_{j,i} = 1`).  Everything is evaluated stably,
    with ``logsumexp`` and ``softmax``.

    Parameters
    ----------
    simplex_atol : float
        Tolerance of the simplex check on the targets, per class: a row may
        have entries down to ``-tol`` and a sum within ``Q·tol`` of one, with
        ``tol = max(simplex_atol, 4·eps)`` and ``eps`` the machine epsilon of
        the targets' dtype (so float32 probability rows pass).

    Notes
    -----
    :meth:`prepare_targets` clips the entries at zero and renormalizes the
    rows to sum to one in the working precision, so that the closed-form
    gradient :math:`\sigma(x_j) - y_j` is exactly that of :meth:`value`
    and :math:`\langle 1, \nabla_{x_j} C\rangle = 0` (docs/theory.md §6).
    """

    name = "cross_entropy"

    def __init__(self, simplex_atol: float = 1e-8) -> None:
        self.simplex_atol = simplex_atol

    def value(self, x: Tensor, y: Tensor) -> Tensor:
        logp = x - torch.logsumexp(x, dim=-1, keepdim=True)
        return -(y * logp).sum()

    def grad(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.softmax(x, dim=-1) - y

    def hvp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self.hessian_vec(x, v)

    @staticmethod
    def hessian_vec(x: Tensor, v: Tensor) -> Tensor:
        r""":math:`H_jv_j = \sigma_j\odot v_j - \sigma_j\langle\sigma_j, v_j\rangle` per row.

        The Hessian of the cross-entropy does not depend on the targets (rows on
        the simplex); it is also the softmax Fisher information in logit
        coordinates (:class:`~subriemann.metrics.SoftmaxFisherMetric`).

        Parameters
        ----------
        x, v : Tensor, shape=[N, Q]

        Returns
        -------
        Tensor, shape=[N, Q]
        """
        p = torch.softmax(x, dim=-1)
        return p * v - p * (p * v).sum(dim=-1, keepdim=True)

    @staticmethod
    def hessian_blocks(x: Tensor) -> Tensor:
        r"""The Hessian blocks :math:`H_j = \operatorname{diag}\sigma_j - \sigma_j\sigma_j^\top`.

        Parameters
        ----------
        x : Tensor, shape=[N, Q]

        Returns
        -------
        Tensor, shape=[N, Q, Q]
        """
        p = torch.softmax(x, dim=-1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]

    def check_targets(self, y: Tensor) -> None:
        super().check_targets(y)
        if y.ndim < 2 or y.shape[-1] < 2:
            q = y.shape[-1] if y.ndim else 0
            raise ValueError(
                "cross-entropy needs at least 2 classes (targets with Q >= 2 columns), "
                f"got Q = {q}; pass probability (e.g. one-hot) rows of shape (N, Q), "
                "not class indices"
            )
        tol = max(self.simplex_atol, 4 * torch.finfo(y.dtype).eps)
        if (y < -tol).any():
            raise ValueError(
                "cross-entropy targets must be probability vectors: found negative "
                f"entries (min {float(y.min()):.3g})"
            )
        sums = y.sum(dim=-1)
        bad = (sums - 1.0).abs() > tol * max(1, y.shape[-1])
        if bad.any():
            j = int(torch.nonzero(bad)[0])
            raise ValueError(
                "cross-entropy targets must be probability vectors (rows on the simplex): "
                f"row {j} sums to {float(sums[j]):.10g}, not 1"
            )

    def prepare_targets(self, y: Tensor) -> Tensor:
        """Rows clipped at 0 and renormalized to sum to 1 exactly (after the check)."""
        y = y.clamp_min(0.0)
        return y / y.sum(dim=-1, keepdim=True)

    def __repr__(self) -> str:
        return f"CrossEntropyLoss(simplex_atol={self.simplex_atol})"


_LOSSES: dict[str, type[Loss]] = {
    "mse": MSELoss,
    "cross_entropy": CrossEntropyLoss,
    "ce": CrossEntropyLoss,
}


def get_loss(loss: str | Loss) -> Loss:
    """Return a :class:`Loss` from a name (``"mse"``, ``"cross_entropy"``) or instance.

    Examples
    --------
    >>> get_loss("mse")
    MSELoss()
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        try:
            return _LOSSES[loss.lower()]()
        except KeyError:
            raise ValueError(
                f"unknown loss {loss!r}; choose one of {sorted(_LOSSES)} or pass a Loss instance"
            ) from None
    if isinstance(loss, type) and issubclass(loss, Loss):
        return loss()
    raise TypeError(f"loss must be a name or a subriemann.losses.Loss, got {type(loss).__name__}")
