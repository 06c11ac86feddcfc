"""Model building blocks that the engines understand beyond plain ``torch.nn``."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Residual"]


class Residual(nn.Module):
    r"""Residual block :math:`y = s(x) + \mathrm{body}(x)` that the structured engine understands.

    Parameters
    ----------
    body : nn.Module
    shortcut : nn.Module, optional
        :math:`s`; the identity when omitted (then ``body`` must preserve
        the shape of its input).

    Examples
    --------
    >>> import torch
    >>> block = Residual(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh()))
    >>> block(torch.zeros(2, 4)).shape
    torch.Size([2, 4])
    """

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut(x)
        return skip + self.body(x)
