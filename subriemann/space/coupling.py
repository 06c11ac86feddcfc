r"""The check that a network treats its samples independently.

subriemann's output map stacks per-sample outputs,
:math:`x_j[\theta] = f(x^{(0)}_j, \theta)` (docs/theory.md §1), and its
engines rely on it: :math:`D` is formed one sample at a time (a ``vmap``
over samples), the data is cut into chunks, the structured engine assembles
the NTK block by block.  A module whose output for one sample depends on the
others (``x - x.mean(0)``, a softmax over dimension 0, ``MultiheadAttention``
with ``batch_first=False`` fed ``[N, ...]`` inputs, ``BatchNorm`` without
running statistics) has no such :math:`f`: its outputs change with the
chunking and the batch, and :math:`D` would be the Jacobian of a different
function.  :class:`~subriemann.ParameterSpace` therefore refuses it at
construction (:func:`check_sample_independence`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from subriemann._warnings import one_line

__all__ = ["check_sample_independence", "check_rows", "sample_rows"]

ApplyFn = Callable[[dict[str, Tensor], Tensor], Tensor]
"""``apply(params, inputs) -> outputs [n, Q]``: the network as a function of its parameters."""

_ADVICE = (
    "subriemann needs each sample's output to depend on that sample only "
    "(use running statistics in eval mode, batch_first=True, or act on a non-batch dimension)"
)


def sample_rows(num_samples: int) -> list[int]:
    """The (at most three) samples the check evaluates: first, middle and last."""
    return sorted({0, num_samples // 2, num_samples - 1})


def _tolerance(ref: Tensor) -> float:
    r""":math:`\sqrt{\varepsilon}\,(1 + \max|\mathrm{ref}|)`.

    A per-sample and a batched evaluation of the same network differ only by
    the order of the sums inside the BLAS kernels (other blockings for one row
    than for several): a few hundred roundings, :math:`\lesssim 10^{-13}`
    relative in float64 and :math:`10^{-5}` in float32 for ordinary networks.
    :math:`\sqrt{\varepsilon}` (1.5e-8, resp. 3.5e-4) leaves a margin of
    :math:`10^{1}`-:math:`10^{5}` above that, while a coupling changes outputs
    by O(1) relative amounts (17-220% in the examples above).

    On a GPU that may round float32 products to TF32 (10-bit mantissa:
    ``torch.backends.cuda.matmul.allow_tf32`` or ``cudnn.allow_tf32``, the
    latter on by default) :math:`\varepsilon = 2^{-10}` is used: measured on
    an H100 with TF32 on, float32 batch-versus-sample differences reach 0.35
    of the float32 tolerance, and stay below 0.01 of the TF32 one.
    """
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    eps = torch.finfo(ref.dtype).eps
    if ref.is_cuda and ref.dtype == torch.float32 and _tf32_allowed():
        eps = 2.0**-10
    return math.sqrt(eps) * (1.0 + scale)


def _tf32_allowed() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


def _describe(module: nn.Module, path: str) -> str:
    name = type(module).__name__
    return f"{name} at {path!r}" if path else name


def check_sample_independence(
    module: nn.Module,
    apply: ApplyFn,
    params: dict[str, Tensor],
    inputs: Tensor,
) -> Tensor | None:
    r"""Refuse a model whose outputs for one sample depend on the other samples.

    Evaluates the samples of :func:`sample_rows` together (twice: a random
    model is refused too) and one at a time (no gradients: a few forward
    passes) and compares them.

    Parameters
    ----------
    module : nn.Module
        The network ``apply`` calls (searched for the coupling module).
    apply : callable
        ``apply(params, inputs) -> Tensor`` of shape ``[n, Q]``.
    params : dict of str to Tensor
    inputs : Tensor, shape=[N, ...]

    Returns
    -------
    Tensor, shape=[m, Q], or None
        The per-sample outputs of the samples of :func:`sample_rows`
        (``None`` when ``N = 1``), for :func:`check_rows`.

    Raises
    ------
    ValueError
        One line naming the module that couples samples (the first whose
        outputs differ, or that fails on a single sample) and why.
    """
    n = int(inputs.shape[0])
    if n < 2:
        return None
    sub = inputs[sample_rows(n)]
    with torch.no_grad():
        batch = apply(params, sub)
        again = apply(params, sub)
        if batch.shape != again.shape or float((batch - again).abs().max()) > _tolerance(batch):
            raise ValueError(
                "model is not deterministic: two evaluations of the same samples differ "
                "(random layers in train mode, or randomness in forward); D would be random"
            )
        try:
            singles = torch.cat([apply(params, sub[i : i + 1]) for i in range(sub.shape[0])])
        except Exception as err:  # e.g. batch statistics of one sample
            where = _locate(module, apply, params, sub) or _describe(module, "")
            raise ValueError(
                f"model couples samples (or cannot run on one sample): {where} fails on a "
                f"single sample ({one_line(err, first_line=True)}); {_ADVICE}"
            ) from None
    check_rows(module, apply, params, sub, batch, singles)
    return singles


def check_rows(
    module: nn.Module,
    apply: ApplyFn,
    params: dict[str, Tensor],
    sub: Tensor,
    batch: Tensor,
    singles: Tensor,
    context: str = "in a batch",
) -> None:
    """Raise the coupling error when ``batch`` (rows of a batched call) differs from ``singles``."""
    rel = math.inf
    if batch.shape == singles.shape:
        err = float((batch - singles).abs().max()) if batch.numel() else 0.0
        if err <= _tolerance(singles):
            return
        rel = err / max(float(singles.abs().max()), torch.finfo(singles.dtype).tiny)
    where = _locate(module, apply, params, sub) or _describe(module, "")
    raise ValueError(
        f"model couples samples: {where} gives a sample a different output {context} than "
        f"alone (relative difference {rel:.2g}), so D would not be the Jacobian of the "
        f"per-sample outputs; {_ADVICE}"
    )


#: the outputs of every submodule call in one evaluation: ``(id(module), output)``
#: in the order the calls finish
_Calls = list[tuple[int, Tensor | None]]


def _locate(module: nn.Module, apply: ApplyFn, params: dict[str, Tensor], sub: Tensor
            ) -> str | None:
    """The first submodule (in the order calls finish) whose outputs couple samples."""
    names = {id(m): path for path, m in module.named_modules()}

    def describe(m_id: int) -> str:
        return _describe(next(m for m in module.modules() if id(m) == m_id), names[m_id])

    recorded = _record_calls(module, apply, params, sub)
    if isinstance(recorded, int):  # the innermost module that failed on one sample
        return describe(recorded)
    if recorded is None:
        return None
    batch_rec, singles = recorded
    for k, (m_id, out) in enumerate(batch_rec):
        if not isinstance(out, Tensor) or out.ndim == 0 or out.shape[0] != sub.shape[0]:
            continue
        rows = [s[k][1] if k < len(s) and s[k][0] == m_id else None for s in singles]
        tensors = [r for r in rows if isinstance(r, Tensor) and r.shape == (1, *out.shape[1:])]
        if len(tensors) != len(rows):  # no matching per-sample output
            return describe(m_id)
        if float((torch.cat(tensors) - out).abs().max()) > _tolerance(out):
            return describe(m_id)
    return None


def _record_calls(module: nn.Module, apply: ApplyFn, params: dict[str, Tensor], sub: Tensor
                  ) -> tuple[_Calls, list[_Calls]] | int | None:
    """The submodule outputs of the batch ``sub`` and of each of its samples alone.

    Returns ``(batch calls, [calls of sample i])``; when a sample fails alone,
    the ``id`` of the innermost module that did not finish (None: it failed
    outside every module).
    """
    rec: _Calls = []
    open_: list[int] = []

    def pre(m: nn.Module, args: Any) -> None:
        open_.append(id(m))

    def post(m: nn.Module, args: Any, out: Any) -> None:
        open_.pop()
        t = out[0] if isinstance(out, tuple) and out else out
        rec.append((id(m), t.detach() if isinstance(t, Tensor) else None))

    handles = []
    for m in module.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad():
            apply(params, sub)
            batch_rec = list(rec)
            singles = []
            for i in range(sub.shape[0]):
                rec.clear()
                open_.clear()
                try:
                    apply(params, sub[i : i + 1])
                except Exception:
                    return open_[-1] if open_ else None
                singles.append(list(rec))
    finally:
        for h in handles:
            h.remove()
    return batch_rec, singles
