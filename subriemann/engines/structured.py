r"""Structured empirical NTK: :math:`DD^\top` layer by layer, without forming :math:`D`.

docs/theory.md §1, §7 and issue 8.  For a network built from the layers below, the
Jacobian :math:`D = \partial x/\partial\theta` (shape ``[QN, K]``) has a
Kronecker structure per layer, and the empirical NTK is assembled from
small per-layer factors.

**Dense layers.**  A ``Linear`` layer :math:`z = W a + b` applied to a sample
:math:`j` has input :math:`a_j \in \mathbb{R}^{m}` and output cotangents
:math:`g_{jq} = \partial x_{jq}/\partial z_j \in \mathbb{R}^{c}` (one per
output :math:`q`).  The rows of :math:`D` for :math:`(W, b)` are
:math:`g_{jq} \otimes (a_j, 1)`, hence

.. math::

    (DD^\top)_{(jq),(j'q')} = \sum_l \big(a^l_j\cdot a^l_{j'} + 1\big)\,
    \big(g^l_{jq}\cdot g^l_{j'q'}\big),

i.e. :math:`DD^\top = \sum_l (A_lA_l^\top) \circ (G_lG_l^\top)` arranged over
(sample, output) pairs, with :math:`A_l` of shape ``[N, m+1]`` and
:math:`G_l` of shape ``[QN, c]``.  The cost is
:math:`O(N^2 m + (QN)^2 c)` per layer instead of :math:`O((QN)^2 mc)`, and
the memory :math:`O(N m + QN c)` instead of :math:`O(QN\,mc)`.

**Layers with positions** (``Conv1d``/``Conv2d`` through their patches, a
``Linear`` applied to inputs ``[N, ..., m]``).  With patches
:math:`a_{jp}` and cotangents :math:`g_{jqp}` at positions :math:`p`, the
weight rows of :math:`D` are :math:`\sum_p g_{jqp}\otimes a_{jp}`, so

.. math::

    (DD^\top)_{(jq),(j'q')} = \sum_{p,p'} \big(a_{jp}\cdot a_{j'p'} + 1\big)
    \big(g_{jqp}\cdot g_{j'q'p'}\big)

(a double sum over position pairs, not a sum over matching positions).
Two routes are implemented and the cheaper one (by a flop count) is chosen
per layer: ``"structured"`` evaluates the double sum above;
``"jacobian"`` forms the per-sample layer gradients
:math:`J_{jq} = \sum_p g_{jqp}\otimes a_{jp}` (shape ``[QN, |\theta_l|]``,
one layer, one sample chunk at a time) and takes :math:`J J^\top`.

**Normalization layers** with an elementwise affine map
(``LayerNorm``, ``RMSNorm``, ``GroupNorm``, eval-mode ``BatchNorm1d/2d``):
:math:`y = \hat x \circ \gamma + \beta` where :math:`\hat x` does not
depend on :math:`(\gamma,\beta)`; the rows of :math:`D` are
:math:`(\sum g\circ\hat x, \sum g)` (summed over the broadcast dimensions),
which are small and are formed explicitly.

**Cotangents for all Q outputs at once.**  One reverse pass from the
outputs to the layer outputs :math:`z_l` (:func:`torch.autograd.grad`,
vectorised over the :math:`Q` output basis vectors with
``is_grads_batched``) returns every :math:`G_l`: samples never interact in
the supported layers, so a cotangent equal to 1 in column :math:`q` of
every sample gives :math:`\partial x_{jq}/\partial z_j` for all :math:`j`
at once.  No parameter gradient is computed.

**Chunking.**  Samples are processed in chunks (``chunk_size``, or chosen
from a memory budget); block :math:`(a, b)` of :math:`DD^\top` is
assembled from the factors of chunks :math:`a` and :math:`b`.  The upper
triangle of a diagonal block is assembled in strips from the diagonal to
the right (up to four row tiles of at least 64 rows, which saves up to 3/8
of the products) and then mirrored onto the lower one, strip by strip
(cache-friendly), so that the result is exactly symmetric.  When the
factors of all chunks fit in the budget they are
kept (and reused by :meth:`StructuredBackend.vjp` /
:meth:`StructuredBackend.jvp` at the same :math:`\theta`); otherwise they
are recomputed per block.

Supported modules
-----------------
``nn.Sequential`` (nested), :class:`Residual`, ``nn.Linear``,
``nn.Conv1d``/``nn.Conv2d`` (any stride, dilation, groups, padding and
padding mode), ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
``nn.BatchNorm1d``/``nn.BatchNorm2d`` in eval mode with running
statistics, ``nn.PReLU``, and parameter-free per-sample modules:
elementwise activations (``Tanh``, ``ReLU``, ``ReLU6``, ``Sigmoid``,
``Softplus``, ``GELU``, ``SiLU``, ``ELU``, ``CELU``, ``SELU``,
``LeakyReLU``, ``Mish``, ``Hardtanh``, ``Hardswish``, ``Hardsigmoid``,
``Softsign``, ``Tanhshrink``, ``LogSigmoid``, ``Identity``), ``Flatten``,
``Unflatten``, eval-mode dropout, ``Softmax``/``LogSoftmax`` over a
non-batch dimension, max/average pooling (1-D, 2-D, adaptive).  Frozen
parameters (``requires_grad=False``) inside these layers are held fixed.

Anything else (custom modules, modules with hooks, shared weights, the
same module used twice, train-mode batch statistics, ...) makes the
constructor raise :class:`UnsupportedModuleError`, and
:func:`subriemann.engines.func.make_backend` falls back to the generic
:class:`~subriemann.engines.func.FuncBackend`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from subriemann.engines.base import ParameterLayout, items_within, plain_tensor
from subriemann.engines.func import FuncBackend
from subriemann.engines.kspace import (
    KronForm,
    RowsForm,
    diagonal_kron,
    mirror_upper,
    param_gram,
    solve_shifted,
    tiles,
)
from subriemann.engines.mixed import MIN_FLOPS, Refinement, mixed_solve
from subriemann.nn import Residual
from subriemann.validation import check_int

__all__ = [
    "StructuredBackend",
    "UnsupportedModuleError",
    "PARAMETER_FREE",
    "MemoryPlan",
    "chunk_plan",
]


class UnsupportedModuleError(TypeError):
    """The structured engine cannot handle a module of this network.

    Parameters
    ----------
    module_name : str
        The module's class name and, for a submodule, its path, e.g.
        ``"MyBlock at '2.body'"``.
    reason : str
        Why it is not supported.
    """

    def __init__(self, module_name: str, reason: str = "") -> None:
        self.module_name = module_name
        self.reason = reason
        msg = f"structured NTK engine does not support {module_name}"
        super().__init__(f"{msg}: {reason}" if reason else msg)


ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Tanh,
    nn.ReLU,
    nn.ReLU6,
    nn.Sigmoid,
    nn.Softplus,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.LeakyReLU,
    nn.Mish,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Identity,
)
"""Elementwise activations (no parameters)."""

_DROPOUT: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
_POOL: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
PARAMETER_FREE: tuple[type[nn.Module], ...] = (
    ELEMENTWISE + _DROPOUT + _POOL + (nn.Flatten, nn.Unflatten, nn.Softmax, nn.LogSoftmax)
)
"""Parameter-free per-sample modules the engine differentiates through."""


def _describe(module: nn.Module, path: str) -> str:
    name = type(module).__name__
    return f"{name} at {path!r}" if path else name


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---------------------------------------------------------------------------
# The interpreted forward pass
# ---------------------------------------------------------------------------
class _Pass:
    """State of one forward pass: parameters, recorded layer inputs and outputs."""

    def __init__(
        self,
        params: dict[str, Tensor],
        outputs: list[Any] | None,
        records: list[Any],
        dtype: torch.dtype,
        shapes: list[Any] | None = None,
    ) -> None:
        self.params = params
        self.outputs = outputs  # when a list: per-layer outputs (to differentiate against)
        self.records = records
        self.dtype = dtype
        self.shapes = shapes  # when a list: per-layer (input, output) shapes of one sample


class _ParamRef:
    """A parameter of a supported layer: trainable (a name in the layout) or frozen."""

    def __init__(self, name: str | None, fixed: Tensor | None, shape: torch.Size) -> None:
        self.name = name
        self.fixed = fixed
        self.shape = shape

    @property
    def trainable(self) -> bool:
        return self.name is not None

    def get(self, state: _Pass) -> Tensor:
        if self.name is not None:
            return state.params[self.name]
        assert self.fixed is not None
        return self.fixed.to(state.dtype)


class _Node:
    def forward(self, x: Tensor, state: _Pass) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class _SeqNode(_Node):
    def __init__(self, children: list[_Node]) -> None:
        self.children = children

    def forward(self, x: Tensor, state: _Pass) -> Tensor:
        for child in self.children:
            x = child.forward(x, state)
        return x


class _ResidualNode(_Node):
    def __init__(self, body: _Node, shortcut: _Node | None) -> None:
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: Tensor, state: _Pass) -> Tensor:
        skip = x if self.shortcut is None else self.shortcut.forward(x, state)
        return skip + self.body.forward(x, state)


class _FnNode(_Node):
    """A parameter-free per-sample module, called as is."""

    def __init__(self, module: nn.Module, desc: str, batch_dims: Callable[[Tensor], list[int]]):
        self.module = module
        self.desc = desc
        self.batch_dims = batch_dims  # dims of the input the module acts along

    def forward(self, x: Tensor, state: _Pass) -> Tensor:
        for d in self.batch_dims(x):
            if d % x.ndim == 0:
                raise UnsupportedModuleError(self.desc, "it acts along the sample dimension")
        if getattr(self.module, "inplace", False):
            x = x.clone()  # keep the recorded layer outputs intact
        y = self.module(x)
        if not isinstance(y, Tensor) or y.ndim == 0 or y.shape[0] != x.shape[0]:
            raise UnsupportedModuleError(self.desc, "it does not map samples to samples")
        return y


# ---------------------------------------------------------------------------
# Parametrized layers
# ---------------------------------------------------------------------------
class _Layer(_Node):
    r"""A layer with parameters; records its input and output during a pass.

    From the recorded input and the output cotangents ``g`` (shape
    ``[Q, n, *out]``) a layer builds its per-chunk factors (:meth:`features`)
    and from those: a Gram block of :math:`DD^\top` restricted to the layer
    (:meth:`gram_into`, written into a view of shape ``[na, Q, nb, Q]``),
    :math:`D_l^\top u` (:meth:`vjp_into`) and :math:`D_l v` (:meth:`jvp`).
    """

    index: int
    refs: list[_ParamRef]
    #: entries of the largest temporary of a Gram block (set from the memory plan)
    block_entries: int = 1 << 24

    def compute(self, x: Tensor, state: _Pass) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def forward(self, x: Tensor, state: _Pass) -> Tensor:
        y, record = self.compute(x, state)
        state.records[self.index] = record
        if state.outputs is not None:
            state.outputs[self.index] = y
        if state.shapes is not None:
            state.shapes[self.index] = (x.shape[1:], y.shape[1:])
        return y

    @property
    def trainable(self) -> list[_ParamRef]:
        return [r for r in self.refs if r.trainable]

    def setup(self, in_shape: torch.Size, out_shape: torch.Size, n: int, q: int, route: str):
        """Choose the route once the per-sample shapes are known."""

    def feature_numel(self, q: int) -> int:
        """Entries of the factors per sample."""
        raise NotImplementedError

    def row_numel(self, n: int, q: int) -> int:
        """Entries of the temporaries of one row of a batched product on ``n`` samples."""
        return n * q + sum(r.shape.numel() for r in self.trainable)

    def features(self, record: Tensor, g: Tensor) -> Any:
        raise NotImplementedError

    def take(self, f: Any, a: int, b: int) -> Any:
        """The factors of samples ``a:b`` of a chunk (views)."""
        raise NotImplementedError

    def gram_into(self, out: Tensor, fa: Any, fb: Any, first: bool) -> None:
        raise NotImplementedError

    def vjp_into(self, f: Any, u: Tensor, views: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def jvp(self, f: Any, v: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def gram_form(self, f: Any) -> RowsForm | KronForm:
        """The rows of :math:`D` of this layer on a chunk, for :mod:`~subriemann.engines.kspace`."""
        return RowsForm(f)

    def mix(self, f: Any, t: Tensor) -> Any:
        r"""The factors of the rows :math:`T_j^\top D_j` (``t``: ``[n, Q, R]``; ``R`` outputs)."""
        return torch.bmm(t.transpose(1, 2), f)  # [n, R, P_l]


def _write(out: Tensor, t: Tensor, first: bool) -> None:
    if first:
        out.copy_(t)
    else:
        out.add_(t)


class _JacobianLayer(_Layer):
    r"""Layers whose per-sample parameter gradients :math:`J` are formed explicitly.

    Factors: ``J`` of shape ``[n, Q, P_l]`` (the trainable parameters of the
    layer, flattened and concatenated in ``refs`` order); the Gram block is
    :math:`J_aJ_b^\top`.
    """

    def take(self, f: Tensor, a: int, b: int) -> Tensor:
        return f[a:b]

    def gram_into(self, out: Tensor, fa: Tensor, fb: Tensor, first: bool) -> None:
        na, q, _ = fa.shape
        nb = fb.shape[0]
        out2 = out.view(na * q, nb * q)
        if first:
            torch.mm(fa.reshape(na * q, -1), fb.reshape(nb * q, -1).T, out=out2)
        else:
            out2.addmm_(fa.reshape(na * q, -1), fb.reshape(nb * q, -1).T)

    def vjp_into(self, f: Tensor, u: Tensor, views: dict[str, Tensor]) -> None:
        n, q, k = f.shape
        flat = u.reshape(-1, n * q) @ f.reshape(n * q, k)  # [b, P_l]
        start = 0
        for r in self.trainable:
            size = r.shape.numel()
            assert r.name is not None
            views[r.name].add_(flat[:, start : start + size].view(-1, *r.shape))
            start += size

    def jvp(self, f: Tensor, v: dict[str, Tensor]) -> Tensor:
        vec = torch.cat([v[r.name].flatten(1) for r in self.trainable if r.name is not None], 1)
        n, q, k = f.shape
        return (vec @ f.reshape(n * q, k).T).view(-1, n, q)


class _AffineNormLayer(_JacobianLayer):
    r""":math:`y = s(x) + \hat x(x)\circ\gamma + \beta` with :math:`s, \hat x` parameter-free.

    Normalization layers (:math:`s = 0`) and ``PReLU``
    (:math:`s = \max(x, 0)`, :math:`\hat x = \min(x, 0)`).  The rows of
    :math:`D` for :math:`(\gamma, \beta)` are
    :math:`(\sum g\circ\hat x, \sum g)`, summed over the dimensions along
    which the parameters broadcast.
    """

    def __init__(
        self,
        normalize: Callable[[Tensor], Tensor],
        weight: _ParamRef | None,
        bias: _ParamRef | None,
        channel_dim: bool,
        base: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.base = base
        self.normalize = normalize
        self.weight = weight
        self.bias = bias
        self.refs = [r for r in (weight, bias) if r is not None]
        self.channel_dim = channel_dim  # params act along dim 1 (else: trailing dims)

    def _view(self, p: Tensor, ndim: int) -> Tensor:
        if self.channel_dim:
            return p.view(-1, *([1] * (ndim - 2)))
        return p

    def compute(self, x: Tensor, state: _Pass) -> tuple[Tensor, Any]:
        xhat = self.normalize(x)
        y = xhat
        if self.weight is not None:
            y = y * self._view(self.weight.get(state), x.ndim)
        if self.bias is not None:
            y = y + self._view(self.bias.get(state), x.ndim)
        if self.base is not None:
            y = y + self.base(x)
        return y, xhat

    def setup(self, in_shape: torch.Size, out_shape: torch.Size, n: int, q: int, route: str):
        self.sample_ndim = len(in_shape)

    def feature_numel(self, q: int) -> int:
        return q * sum(r.shape.numel() for r in self.trainable)

    def _reduce(self, t: Tensor, pshape: torch.Size) -> Tensor:
        # t: [Q, n, *in]; sum over the dims a parameter broadcasts along.
        nd = self.sample_ndim
        if pshape.numel() == 1:
            dims = list(range(2, 2 + nd))
        elif self.channel_dim:
            dims = [2 + i for i in range(1, nd)]
        else:
            dims = [2 + i for i in range(nd - len(pshape))]
        return t.sum(dim=dims) if dims else t

    def features(self, record: Tensor, g: Tensor) -> Tensor:
        q, n = g.shape[:2]
        parts = []
        if self.weight is not None and self.weight.trainable:
            parts.append(self._reduce(g * record, self.weight.shape).reshape(q, n, -1))
        if self.bias is not None and self.bias.trainable:
            parts.append(self._reduce(g, self.bias.shape).reshape(q, n, -1))
        j = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return j.transpose(0, 1).contiguous()


class _PatchLayer(_Layer):
    r"""A weight applied at ``P`` positions of each sample, in ``groups`` groups.

    Patches :math:`a_{jp}` (``fan_in`` features per group) and output
    cotangents :math:`g_{jqp}` (``fan_out`` channels per group); weight of
    shape ``[groups*fan_out, fan_in]`` after flattening (a conv weight
    ``[C_out, C_in/groups, *k]`` flattens to it row-major), bias
    ``[groups*fan_out]``.

    * ``Linear`` on ``[n, m]`` (``dense``): factors :math:`A`
      (``[n, m]``) and :math:`G` (``[n, Q, c]``); block
      :math:`(A_aA_b^\top + 1)\circ(G_aG_b^\top)`.
    * Route ``"jacobian"``: factors
      :math:`J_{jq} = \sum_p g_{jqp}\otimes a_{jp}` (``[n, Q, |\theta_l|]``);
      block :math:`J_aJ_b^\top`.  Cost per block
      :math:`\approx 2nQP|W| + 2(nQ)^2|\theta_l|`.
    * Route ``"structured"``: factors :math:`A` (``[groups, n, P, fan_in]``)
      and :math:`G` (``[groups, n, Q, P, fan_out]``); block
      :math:`\sum_{g,p,p'} (a_{jgp}\cdot a_{j'gp'} + 1)(g_{jqgp}\cdot g_{j'q'gp'})`.
      Cost per block :math:`\approx 2\,\mathrm{groups}\,P^2(n^2\,\mathrm{fan\_in}
      + (nQ)^2(\mathrm{fan\_out}+1))`.
    """

    dense = False

    def __init__(self, weight: _ParamRef, bias: _ParamRef | None, groups: int) -> None:
        self.weight = weight
        self.bias = bias
        self.refs = [r for r in (weight, bias) if r is not None]
        self.groups = groups
        self.has_w = weight.trainable
        self.has_b = bias is not None and bias.trainable
        self.route = "jacobian"
        self.positions = self.fan_in = self.fan_out = 0

    # subclasses: record [n, ...] -> patches [n, groups, P, fan_in]; g -> [Q, n, groups, P, fan_out]
    def unfold(self, record: Tensor) -> Tensor:
        raise NotImplementedError

    def fold_g(self, g: Tensor) -> Tensor:
        raise NotImplementedError

    def setup(self, in_shape: torch.Size, out_shape: torch.Size, n: int, q: int, route: str):
        gr, p, fi, fo = self.groups, self.positions, self.fan_in, self.fan_out
        nparam = gr * fo * ((fi if self.has_w else 0) + (1 if self.has_b else 0))
        cost_j = 2 * n * q * p * gr * fo * fi + 2 * (n * q) ** 2 * nparam
        cost_s = 2 * gr * p * p * (n * n * fi + (n * q) ** 2 * (fo + 1))
        if route == "auto":
            self.route = "structured" if cost_s < cost_j else "jacobian"
        else:
            self.route = route

    def row_numel(self, n: int, q: int) -> int:
        if self.route == "jacobian" and not self.dense:
            return super().row_numel(n, q)
        gr, p, fo = self.groups, self.positions, self.fan_out
        return n * q + (n * fo if self.dense else gr * n * p * fo) + super().row_numel(0, q)

    def feature_numel(self, q: int) -> int:
        gr, p, fi, fo = self.groups, self.positions, self.fan_in, self.fan_out
        if self.route == "jacobian" and not self.dense:
            return q * gr * fo * ((fi if self.has_w else 0) + (1 if self.has_b else 0))
        return gr * p * (fi if self.has_w else 0) + q * gr * p * fo

    def features(self, record: Tensor, g: Tensor) -> Any:
        if self.dense:
            # [n, m] and [n, Q, c]
            return (record if self.has_w else None), g.transpose(0, 1).contiguous()
        gg = self.fold_g(g)  # [Q, n, groups, P, fan_out]
        a = self.unfold(record) if self.has_w else None  # [n, groups, P, fan_in]
        if self.route == "jacobian":
            q, n = gg.shape[:2]
            parts = []
            if a is not None:
                jw = torch.einsum("qngpc,ngpf->nqgcf", gg, a)
                parts.append(jw.reshape(n, q, -1))
            if self.has_b:
                parts.append(gg.sum(dim=3).transpose(0, 1).reshape(n, q, -1))
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        a_s = None if a is None else a.transpose(0, 1).contiguous()  # [groups, n, P, fan_in]
        g_s = gg.permute(2, 1, 0, 3, 4).contiguous()  # [groups, n, Q, P, fan_out]
        return a_s, g_s

    def mix(self, f: Any, t: Tensor) -> Any:
        if self.route == "jacobian" and not self.dense:
            return super().mix(f, t)
        a, g = f
        if self.dense:
            return a, torch.bmm(t.transpose(1, 2), g)
        return a, torch.einsum("gnqpc,nqr->gnrpc", g, t)

    def gram_form(self, f: Any) -> RowsForm | KronForm:
        if self.route == "jacobian" and not self.dense:
            return RowsForm(f)
        a, g = f
        if self.dense:  # [n, m] and [n, Q, c]: Kronecker rows g_jq (x) (a_j, 1)
            cols = [a] if self.has_w else []
            if self.has_b:
                cols.append(g.new_ones(g.shape[0], 1))
            at = cols[0] if len(cols) == 1 else torch.cat(cols, dim=1)
            return KronForm(at, g, a.shape[1] if self.has_w else 0, self.has_b)
        n, q = g.shape[1:3]  # a: [groups, n, P, fan_in], g: [groups, n, Q, P, fan_out]
        parts = []
        if self.has_w:
            parts.append(torch.einsum("gnqpc,gnpf->nqgcf", g, a).reshape(n, q, -1))
        if self.has_b:
            parts.append(g.sum(dim=3).permute(1, 2, 0, 3).reshape(n, q, -1))
        return RowsForm(parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1))

    def take(self, f: Any, a: int, b: int) -> Any:
        if self.dense:
            return (None if f[0] is None else f[0][a:b]), f[1][a:b]
        if self.route == "jacobian":
            return f[a:b]
        return (None if f[0] is None else f[0][:, a:b]), f[1][:, a:b]

    def gram_into(self, out: Tensor, fa: Any, fb: Any, first: bool) -> None:
        if self.dense:
            self._gram_dense(out, fa, fb, first)
        elif self.route == "jacobian":
            _JacobianLayer.gram_into(self, out, fa, fb, first)  # type: ignore[arg-type]
        else:
            self._gram_structured(out, fa, fb, first)

    def _gram_dense(self, out: Tensor, fa: Any, fb: Any, first: bool) -> None:
        aa, ga = fa
        ab, gb = fb
        na, q, c = ga.shape
        nb = gb.shape[0]
        gg = (ga.view(na * q, c) @ gb.view(nb * q, c).T).view(na, q, nb, q)
        if not self.has_w:  # bias only: A A^T + 1 is the all-ones matrix
            _write(out, gg, first)
            return
        if self.has_b:
            kern = torch.addmm(aa.new_ones(()), aa, ab.T)
        else:
            kern = aa @ ab.T
        kern4 = kern[:, None, :, None]
        if first:
            torch.mul(gg, kern4, out=out)
        else:
            out.addcmul_(gg, kern4)

    def _gram_structured(self, out: Tensor, fa: Any, fb: Any, first: bool) -> None:
        aa, ga = fa
        ab, gb = fb
        gr, na, q, p, fo = ga.shape
        nb = gb.shape[1]
        # Sub-blocks keep the [groups, sa, Q, P, sb, Q, P] temporary bounded.
        per_pair = gr * q * q * p * p
        sb = items_within(self.block_entries, per_pair, nb)
        sa = items_within(self.block_entries, per_pair * sb, na)
        for i in range(0, na, sa):
            i1 = min(na, i + sa)
            for j in range(0, nb, sb):
                j1 = min(nb, j + sb)
                ni, nj = i1 - i, j1 - j
                gg = torch.bmm(
                    ga[:, i:i1].reshape(gr, ni * q * p, fo),
                    gb[:, j:j1].reshape(gr, nj * q * p, fo).transpose(1, 2),
                ).view(gr, ni, q, p, nj, q, p)
                if self.has_w:
                    fi = aa.shape[-1]
                    kern = torch.bmm(
                        aa[:, i:i1].reshape(gr, ni * p, fi),
                        ab[:, j:j1].reshape(gr, nj * p, fi).transpose(1, 2),
                    ).view(gr, ni, p, nj, p)
                    if self.has_b:
                        kern += 1.0
                    blk = torch.einsum("gaqpbrs,gapbs->aqbr", gg, kern)
                else:
                    blk = gg.sum(dim=(0, 3, 6))
                _write(out[i:i1, :, j:j1, :], blk, first)

    def vjp_into(self, f: Any, u: Tensor, views: dict[str, Tensor]) -> None:
        # u: [b, n, Q]; views: [b, *shape]
        if self.route == "jacobian" and not self.dense:
            _JacobianLayer.vjp_into(self, f, u, views)  # type: ignore[arg-type]
            return
        a, g = f
        if self.dense:
            # g: [n, Q, c];  D_W^T u = sum_j (sum_q u_jq g_jq) a_j^T
            gu = torch.einsum("nqc,bnq->bnc", g, u)
            if self.has_w:
                assert self.weight.name is not None
                views[self.weight.name].add_(gu.transpose(1, 2) @ a)
            if self.has_b:
                assert self.bias is not None and self.bias.name is not None
                views[self.bias.name].add_(gu.sum(1))
            return
        gu = torch.einsum("gnqpc,bnq->bgnpc", g, u)
        if self.has_w:
            assert self.weight.name is not None
            dw = torch.einsum("bgnpc,gnpf->bgcf", gu, a)
            views[self.weight.name].add_(dw.reshape(-1, *self.weight.shape))
        if self.has_b:
            assert self.bias is not None and self.bias.name is not None
            views[self.bias.name].add_(gu.sum(dim=(2, 3)).flatten(1))

    def jvp(self, f: Any, v: dict[str, Tensor]) -> Tensor:
        # v: [b, *shape]; returns [b, n, Q]
        if self.route == "jacobian" and not self.dense:
            return _JacobianLayer.jvp(self, f, v)  # type: ignore[arg-type]
        a, g = f
        if self.dense:
            n, _, c = g.shape
            z = g.new_zeros(1, n, c)
            if self.has_w:
                assert self.weight.name is not None
                z = a @ v[self.weight.name].transpose(1, 2)  # [b, n, c]
            if self.has_b:
                assert self.bias is not None and self.bias.name is not None
                z = z + v[self.bias.name].unsqueeze(1)
            return torch.einsum("nqc,bnc->bnq", g, z)
        gr, n, q, p, fo = g.shape
        z = g.new_zeros(1, gr, n, p, fo)
        if self.has_w:
            assert self.weight.name is not None
            w = v[self.weight.name].reshape(-1, gr, fo, a.shape[-1])
            z = torch.einsum("gnpf,bgcf->bgnpc", a, w)
        if self.has_b:
            assert self.bias is not None and self.bias.name is not None
            z = z + v[self.bias.name].reshape(-1, gr, 1, 1, fo)
        return torch.einsum("gnqpc,bgnpc->bnq", g, z)


class _LinearLayer(_PatchLayer):
    r"""``nn.Linear``, :math:`z = Wa + b`, on inputs ``[n, m]`` or ``[n, ..., m]``.

    On inputs with extra dimensions the ``P = prod(...)`` positions are
    handled as in a convolution.
    """

    def __init__(self, weight: _ParamRef, bias: _ParamRef | None) -> None:
        super().__init__(weight, bias, groups=1)

    def compute(self, x: Tensor, state: _Pass) -> tuple[Tensor, Any]:
        b = None if self.bias is None else self.bias.get(state)
        return F.linear(x, self.weight.get(state), b), x

    def setup(self, in_shape: torch.Size, out_shape: torch.Size, n: int, q: int, route: str):
        self.positions = int(in_shape[:-1].numel())
        self.fan_in, self.fan_out = int(in_shape[-1]), int(out_shape[-1])
        self.dense = len(in_shape) == 1
        super().setup(in_shape, out_shape, n, q, route)

    def unfold(self, record: Tensor) -> Tensor:
        return record.reshape(record.shape[0], 1, -1, self.fan_in)

    def fold_g(self, g: Tensor) -> Tensor:
        return g.reshape(g.shape[0], g.shape[1], 1, -1, self.fan_out)


class _ConvLayer(_PatchLayer):
    """``nn.Conv1d`` / ``nn.Conv2d`` (patches from :func:`torch.nn.functional.unfold`)."""

    def __init__(self, module: nn.Module, weight: _ParamRef, bias: _ParamRef | None) -> None:
        conv: Any = module
        super().__init__(weight, bias, groups=int(conv.groups))
        self.spatial = len(conv.kernel_size)
        self.kernel = tuple(conv.kernel_size)
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        pads: list[tuple[int, int]] = []  # (left, right) per spatial dim
        for d in range(self.spatial):
            if conv.padding == "same":
                total = self.dilation[d] * (self.kernel[d] - 1)
                pads.append((total // 2, total - total // 2))
            elif conv.padding == "valid":
                pads.append((0, 0))
            else:
                pads.append((conv.padding[d], conv.padding[d]))
        self.mode = conv.padding_mode
        if self.mode == "zeros" and all(a == b for a, b in pads):
            self.prepad: list[int] | None = None
            self.pad = tuple(a for a, _ in pads)
        else:  # pad explicitly (F.pad order: last dim first), then convolve unpadded
            self.prepad = [x for a, b in reversed(pads) for x in (a, b)]
            self.pad = (0,) * self.spatial
        self.fan_in = int(conv.in_channels // self.groups * math.prod(self.kernel))
        self.fan_out = int(conv.out_channels // self.groups)

    def compute(self, x: Tensor, state: _Pass) -> tuple[Tensor, Any]:
        if self.prepad is not None:
            mode = "constant" if self.mode == "zeros" else self.mode
            x = F.pad(x, self.prepad, mode=mode)
        b = None if self.bias is None else self.bias.get(state)
        conv = F.conv1d if self.spatial == 1 else F.conv2d
        y = conv(x, self.weight.get(state), b, self.stride, self.pad, self.dilation, self.groups)
        return y, x

    def setup(self, in_shape: torch.Size, out_shape: torch.Size, n: int, q: int, route: str):
        self.positions = int(out_shape[1:].numel())
        super().setup(in_shape, out_shape, n, q, route)

    def unfold(self, record: Tensor) -> Tensor:
        if self.spatial == 1:
            cols = F.unfold(
                record.unsqueeze(2), (1, self.kernel[0]), dilation=(1, self.dilation[0]),
                padding=(0, self.pad[0]), stride=(1, self.stride[0]),
            )  # fmt: skip
        else:
            cols = F.unfold(record, self.kernel, self.dilation, self.pad, self.stride)
        n = record.shape[0]
        return cols.view(n, self.groups, self.fan_in, -1).transpose(2, 3)

    def fold_g(self, g: Tensor) -> Tensor:
        q, n = g.shape[:2]
        return g.reshape(q, n, self.groups, self.fan_out, -1).transpose(-1, -2)


# ---------------------------------------------------------------------------
# Compilation of a module tree
# ---------------------------------------------------------------------------
def _has_hooks(m: nn.Module) -> bool:
    """Whether ``m`` has module hooks (which could change what its forward computes)."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(getattr(m, attr, None) for attr in names)


class _Compiler:
    def __init__(self, layout: ParameterLayout) -> None:
        self.trainable = set(layout.names)
        self.used: set[str] = set()
        self.seen_params: set[int] = set()
        self.seen_modules: set[int] = set()
        self.layers: list[_Layer] = []

    def param(self, m: nn.Module, attr: str, path: str) -> _ParamRef | None:
        p = getattr(m, attr, None)
        if p is None:
            return None
        if not isinstance(p, nn.Parameter):
            raise UnsupportedModuleError(_describe(m, path), f"{attr} is not an nn.Parameter")
        if id(p) in self.seen_params:
            raise UnsupportedModuleError(_describe(m, path), f"{attr} is shared with another layer")
        self.seen_params.add(id(p))
        full = _join(path, attr)
        if p.requires_grad:
            if full not in self.trainable:
                raise UnsupportedModuleError(_describe(m, path), f"{full} is not in the layout")
            self.used.add(full)
            return _ParamRef(full, None, p.shape)
        return _ParamRef(None, p.detach(), p.shape)

    def add(self, layer: _Layer) -> _Layer:
        layer.index = len(self.layers)
        self.layers.append(layer)
        return layer

    def compile(self, m: nn.Module, path: str) -> _Node:
        desc = _describe(m, path)
        if id(m) in self.seen_modules:
            raise UnsupportedModuleError(desc, "the same module is used twice")
        self.seen_modules.add(id(m))
        if _has_hooks(m):
            raise UnsupportedModuleError(desc, "it has hooks")
        t = type(m)
        if t is nn.Sequential or t is Residual:
            return self.container(m, path, desc)
        if t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.PReLU):
            return self.layer(m, path)
        if t in (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d):
            return self.norm(m, path, desc)
        if t in PARAMETER_FREE:
            return self.parameter_free(m, desc)
        raise UnsupportedModuleError(desc, "not a supported layer type")

    def container(self, m: nn.Module, path: str, desc: str) -> _Node:
        """``nn.Sequential`` or :class:`Residual`: their children, compiled."""
        if type(m) is nn.Sequential:
            # _modules, not named_children(): the latter skips a module listed twice
            children = list(m._modules.items())
            if any(c is None for _, c in children):
                raise UnsupportedModuleError(desc, "a child module is None")
            return _SeqNode([self.compile(c, _join(path, n)) for n, c in children if c is not None])
        res: Any = m
        body = self.compile(res.body, _join(path, "body"))
        short = None
        if res.shortcut is not None:
            short = self.compile(res.shortcut, _join(path, "shortcut"))
        if next(m.named_parameters(recurse=False), None) is not None:
            raise UnsupportedModuleError(desc, "Residual has parameters of its own")
        return _ResidualNode(body, short)

    def layer(self, m: nn.Module, path: str) -> _Node:
        """``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` and ``nn.PReLU``."""
        w = self.param(m, "weight", path)
        assert w is not None
        if type(m) is nn.PReLU:
            neg = lambda x: torch.clamp(x, max=0.0)  # noqa: E731
            return self.add(_AffineNormLayer(neg, w, None, channel_dim=True, base=torch.relu))
        if type(m) is nn.Linear:
            return self.add(_LinearLayer(w, self.param(m, "bias", path)))
        return self.add(_ConvLayer(m, w, self.param(m, "bias", path)))

    def parameter_free(self, m: nn.Module, desc: str) -> _Node:
        t = type(m)
        own = next(m.named_parameters(recurse=False), None)
        if own is not None or next(m.children(), None) is not None:
            raise UnsupportedModuleError(desc, "unexpected parameters or submodules")
        if t in _DROPOUT and m.training:
            raise UnsupportedModuleError(desc, "dropout in train mode is random")
        if t in _POOL and getattr(m, "return_indices", False):
            raise UnsupportedModuleError(desc, "return_indices=True")
        return _FnNode(m, desc, _acting_dims(m))

    def norm(self, m: nn.Module, path: str, desc: str) -> _Node:
        mm: Any = m
        t = type(m)
        if t in (nn.BatchNorm1d, nn.BatchNorm2d):
            if mm.training or mm.running_mean is None or mm.running_var is None:
                raise UnsupportedModuleError(desc, "batch statistics mix samples (use eval mode)")
        affine = any(p is not None for p in (getattr(m, "weight", None), getattr(m, "bias", None)))
        if not affine:
            return _FnNode(m, desc, lambda x: [])
        w = self.param(m, "weight", path)
        b = self.param(m, "bias", path)
        normalize: Callable[[Tensor], Tensor]
        if t is nn.LayerNorm:
            shape = tuple(mm.normalized_shape)
            normalize = lambda x: F.layer_norm(x, shape, None, None, mm.eps)  # noqa: E731
            return self.add(_AffineNormLayer(normalize, w, b, channel_dim=False))
        if t is nn.RMSNorm:
            shape = tuple(mm.normalized_shape)
            normalize = lambda x: F.rms_norm(x, list(shape), None, mm.eps)  # noqa: E731
            return self.add(_AffineNormLayer(normalize, w, b, channel_dim=False))
        if t is nn.GroupNorm:
            normalize = lambda x: F.group_norm(x, mm.num_groups, None, None, mm.eps)  # noqa: E731
            return self.add(_AffineNormLayer(normalize, w, b, channel_dim=True))

        def bn(x: Tensor) -> Tensor:
            mean = mm.running_mean.to(x.dtype)
            var = mm.running_var.to(x.dtype)
            return F.batch_norm(x, mean, var, None, None, False, 0.0, mm.eps)

        return self.add(_AffineNormLayer(bn, w, b, channel_dim=True))


def _acting_dims(m: nn.Module) -> Callable[[Tensor], list[int]]:
    """Dimensions along which a parameter-free module mixes entries (checked != 0)."""
    mm: Any = m
    if isinstance(m, nn.Flatten):
        return lambda x: [mm.start_dim, mm.end_dim]
    if isinstance(m, nn.Unflatten):
        return lambda x: [mm.dim]
    if isinstance(m, nn.Softmax | nn.LogSoftmax):
        if mm.dim is None:
            return lambda x: [0]  # implicit dim choice: refuse
        return lambda x: [mm.dim]
    return lambda x: []


# ---------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------
def _default_apply(module: nn.Module) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    fixed = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    fixed.update(dict(module.named_buffers()))

    def apply(params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        out = functional_call(module, {**fixed, **params}, (inputs,))
        return out.unsqueeze(1) if out.ndim == 1 else out

    return apply


@dataclass(frozen=True)
class MemoryPlan:
    r"""How :class:`StructuredBackend` splits its work to stay within ``budget`` bytes.

    The budget is shared out as follows (the results that a caller asks for,
    :math:`DD^\top` of ``[QN, QN]``, :math:`D` of ``[QN, K]``, a batch of
    products, are not counted: their size is the caller's choice):

    * one sample chunk's factors and the activations of its backward pass:
      at most ``budget / 4`` (:attr:`chunk` samples);
    * the factors of all samples, kept for :meth:`StructuredBackend.jvp`,
      :meth:`~StructuredBackend.vjp` and :meth:`~StructuredBackend.ntk` at the
      same point, only when they take at most ``budget / 2`` (:attr:`store`);
    * the largest temporary of a Gram block or of a batch of products: at most
      ``budget / 8`` (:meth:`temp_entries`).

    Attributes
    ----------
    budget : int
        Bytes.
    itemsize : int
        Bytes per entry (4 for float32, 8 for float64).
    chunk : int
        Samples per chunk.
    factor_bytes : int
        Bytes of the layer factors of one sample (at the chosen chunk size).
    activation_bytes : int
        Bytes of the backward pass's activations per sample
        (about :math:`Q + 2` copies of the layer outputs).
    n_samples : int
    """

    budget: int
    itemsize: int
    chunk: int
    factor_bytes: int
    activation_bytes: int
    n_samples: int

    @property
    def store(self) -> bool:
        """Whether the factors of all samples are kept (at most ``budget / 2``)."""
        return self.n_samples * self.factor_bytes <= self.budget // 2

    def temp_entries(self) -> int:
        """Entries of the largest temporary: ``budget / 8`` bytes."""
        return max(1, self.budget // (8 * self.itemsize))

    def rows(self, per_row: int, total: int) -> int:
        """Rows of a batched product per pass, ``per_row`` entries of temporaries each."""
        return items_within(self.temp_entries(), per_row, total)


def chunk_plan(
    budget: int,
    itemsize: int,
    n_samples: int,
    per_sample: Callable[[int], tuple[int, int]],
    chunk_size: int | None = None,
) -> MemoryPlan:
    r"""The :class:`MemoryPlan` of a network: the largest chunk within ``budget / 4``.

    Parameters
    ----------
    budget, itemsize, n_samples : int
    per_sample : callable
        ``per_sample(chunk) -> (factor entries, activation entries)`` per sample
        when the samples are processed ``chunk`` at a time (the per-layer route,
        hence the factor size, may depend on the chunk).
    chunk_size : int, optional
        A fixed chunk (the caller's choice; the budget then only decides
        :attr:`MemoryPlan.store`).

    Examples
    --------
    >>> plan = chunk_plan(1 << 20, 8, 1000, lambda n: (100, 28))
    >>> plan.chunk, plan.chunk * 8 * (100 + 28) <= (1 << 20) // 4, plan.store
    (256, True, False)
    """
    n_total = max(1, int(n_samples))
    chunk = n_total if chunk_size is None else max(1, min(int(chunk_size), n_total))
    feat, act = per_sample(chunk)
    if chunk_size is None:
        fit = items_within(budget // 4, itemsize * (feat + act), n_total)
        if fit < chunk:
            chunk = fit
            feat, act = per_sample(chunk)
    return MemoryPlan(int(budget), itemsize, chunk, itemsize * feat, itemsize * act, n_total)


class StructuredBackend:
    r"""Per-layer structured engine for :math:`x[\theta]`, :math:`D` and :math:`DD^\top`.

    Same interface and semantics as :class:`~subriemann.engines.func.FuncBackend`:
    ``theta`` is flat ``[K]`` in ``layout`` order, outputs are flat ``[QN]``
    (sample-major), :math:`D` is ``[QN, K]``.  :meth:`ntk` never forms
    :math:`D` (see the module docstring for the formulas and the supported
    modules).

    Parameters
    ----------
    module : nn.Module
        The network (already in the dtype and device of the computation).
    layout : ParameterLayout
        Trainable parameters of ``module``, in ``named_parameters`` order.
    inputs : Tensor, shape=[N, ...]
    num_outputs : int
        Q.
    chunk_size : int or None
        Samples per chunk; ``None`` chooses it from the memory budget
        (:class:`MemoryPlan`).
    fallback : FuncBackend, optional
        Engine used for ``outputs``, ``jacobian`` and for ``jvp``/``vjp``
        at points where the layer factors are not kept.  Built from
        ``module`` when omitted.
    route : {"auto", "jacobian", "structured"}
        Route for layers with positions (convolutions, ``Linear`` on
        sequences); ``"auto"`` picks the cheaper per layer.
    memory_budget : int, optional
        Bytes of temporaries (:class:`MemoryPlan`); default: the fallback's
        ``memory_budget`` (:data:`~subriemann.engines.base.MEMORY_BUDGET`),
        which is then set to the same value, so that the two engines share one
        budget.
    mixed_precision : {"auto", True, False}
        Whether :meth:`solve_param_gram` at a ``float64`` point factors in
        ``float32`` and refines to ``float64`` accuracy
        (:mod:`~subriemann.engines.mixed`); ``"auto"`` where the sample-side
        elimination applies and costs at least
        :data:`~subriemann.engines.mixed.MIN_FLOPS`, ``True`` at any size.  The
        result meets the backward error of the direct ``float64`` solve, which
        is taken wherever the refinement does not reach it.

    Raises
    ------
    UnsupportedModuleError
        When some module of ``module`` is not supported (its
        ``module_name`` names it).

    Notes
    -----
    The layer factors at one :math:`\theta` are kept when they fit in half the
    budget (:attr:`MemoryPlan.store`): after :meth:`ntk`, and after the second
    product (:meth:`jvp`, :meth:`vjp`, or one batched call) at the same point,
    so that :meth:`outputs`, :meth:`vjp`
    (:math:`D^\top u = \sum_l G_l^\top\mathrm{diag}(u) A_l`), :meth:`jvp` and
    :meth:`pullback` there cost a few matrix products and no network
    evaluation (a Krylov solve makes many).  A single product at a new point
    goes through the fallback (one pass instead of :math:`Q` backward passes).
    The cache is keyed on the tensor ``theta`` (and dropped when it is
    modified in place).

    The structured computations are not differentiable in :math:`\theta`:
    when ``theta`` is traced by autograd or a :mod:`torch.func` transform,
    :meth:`ntk`, :meth:`jvp` and :meth:`vjp` go through the fallback engine.
    """

    name = "structured"
    #: ``jvp`` and ``vjp`` accept batches ``[..., K]`` / ``[..., QN]``.
    batched = True
    #: :meth:`param_gram` and :meth:`solve_param_gram` work from the layer factors.
    gram_from_factors = True
    #: How the memory budget is shared out (set at construction).
    plan: MemoryPlan

    def __init__(
        self,
        module: nn.Module,
        layout: ParameterLayout,
        inputs: Tensor,
        num_outputs: int,
        chunk_size: int | None = None,
        fallback: FuncBackend | None = None,
        *,
        route: str = "auto",
        memory_budget: int | None = None,
        mixed_precision: bool | str = "auto",
    ) -> None:
        if mixed_precision not in (True, False, "auto"):
            raise ValueError(
                f"mixed_precision must be True, False or 'auto', got {mixed_precision!r}"
            )
        self.mixed_precision = mixed_precision
        #: What the last :meth:`solve_param_gram` refined (``None``: solved directly).
        self.last_refinement: Refinement | None = None
        if route not in ("auto", "jacobian", "structured"):
            raise ValueError(f"route must be 'auto', 'jacobian' or 'structured', got {route!r}")
        compiler = _Compiler(layout)
        self.root = compiler.compile(module, "")
        missing = [n for n in layout.names if n not in compiler.used]
        if missing:
            raise UnsupportedModuleError(_describe(module, ""), f"parameters {missing} not reached")
        self.layers = compiler.layers
        if not self.layers:
            raise UnsupportedModuleError(_describe(module, ""), "no parametrized layer")
        self.module = module
        self.layout = layout
        self.inputs = inputs
        self.num_outputs = int(num_outputs)
        self.fallback = fallback or FuncBackend(
            _default_apply(module), layout, inputs, num_outputs, chunk_size
        )
        if memory_budget is not None:
            check_int(memory_budget, "memory_budget", low=1)
            self.fallback.memory_budget = int(memory_budget)
        self._cache: tuple[Tensor, int, list[list[Any]], list[Tensor]] | None = None
        self._miss: tuple[Tensor, int] | None = None  # the last point of an uncached product
        shapes = self._probe(module)
        self._plan_chunks(shapes, route, chunk_size)

    def set_inputs(self, inputs: Tensor) -> None:
        """Evaluate on a new batch of the same shape, dtype and device (e.g. the next
        mini-batch of a training loop): the compiled network, its routes and the memory
        plan are kept, the factors of the old batch are dropped.

        Raises
        ------
        ValueError
            A batch of another shape, dtype or device (build a new engine for it).
        """
        old = self.inputs
        if (inputs.shape, inputs.dtype, inputs.device) != (old.shape, old.dtype, old.device):
            raise ValueError(
                f"set_inputs needs a batch like the engine's ({tuple(old.shape)}, {old.dtype}, "
                f"{old.device}), got ({tuple(inputs.shape)}, {inputs.dtype}, {inputs.device})"
            )
        self.inputs = self.fallback.inputs = inputs
        self._cache = self._miss = None

    @property
    def memory_budget(self) -> int:
        """Bytes of temporaries, shared with the fallback engine (:class:`MemoryPlan`)."""
        return int(self.fallback.memory_budget)

    @memory_budget.setter
    def memory_budget(self, value: int) -> None:
        check_int(value, "memory_budget", low=1)
        self.fallback.memory_budget = int(value)
        self.plan = replace(self.plan, budget=int(value))
        for layer in self.layers:
            layer.block_entries = self.plan.temp_entries()
        self._cache = None

    # -- construction helpers ----------------------------------------------------
    def _probe(self, module: nn.Module) -> list[Any]:
        """Run the interpreter on two samples: per-layer shapes, and agreement with the module."""
        named = dict(module.named_parameters())
        theta0 = self.layout.flatten({n: named[n].detach() for n in self.layout.names})
        x = self.inputs[:2]
        n_layers = len(self.layers)
        shapes: list[Any] = [None] * n_layers
        with torch.no_grad():
            try:
                y = self._forward(theta0, x, None, [None] * n_layers, shapes)
                ref = self.fallback.apply(self.layout.unflatten(theta0), x)
            except UnsupportedModuleError:
                raise
            except Exception as err:  # the interpreter cannot run this network
                raise UnsupportedModuleError(_describe(module, ""), f"probe failed: {err}") from err
        if y.shape != ref.shape or y.shape != (x.shape[0], self.num_outputs):
            raise UnsupportedModuleError(
                _describe(module, ""), f"output shape {tuple(y.shape)} != {tuple(ref.shape)}"
            )
        scale = 1.0 + float(ref.abs().max()) if ref.numel() else 1.0
        tol = math.sqrt(torch.finfo(ref.dtype).eps) * scale
        if not torch.allclose(y, ref, rtol=0.0, atol=tol, equal_nan=True):
            raise UnsupportedModuleError(
                _describe(module, ""), "the interpreted forward pass disagrees with the module"
            )
        self.itemsize = torch.finfo(ref.dtype).bits // 8
        return shapes

    def _plan_chunks(self, shapes: list[Any], route: str, chunk_size: int | None) -> None:
        """Per-layer routes and the chunk of samples within the budget (:func:`chunk_plan`)."""
        q = self.num_outputs
        self.out_shapes = [s_out for _, s_out in shapes]
        # activations of the vectorised backward: about (Q + 2) copies of the layer outputs
        act = (q + 2) * sum(int(s.numel()) for s in self.out_shapes)

        def per_sample(n: int) -> tuple[int, int]:
            for layer, (s_in, s_out) in zip(self.layers, shapes):
                layer.setup(s_in, s_out, n, q, route)
            return self._feature_numel(), act

        n_total = int(self.inputs.shape[0])
        self.plan = chunk_plan(self.memory_budget, self.itemsize, n_total, per_sample, chunk_size)
        self.chunk_size = size = self.plan.chunk
        self.bounds = [(a, min(n_total, a + size)) for a in range(0, n_total, size)]
        for layer in self.layers:
            layer.block_entries = self.plan.temp_entries()

    @property
    def store_all(self) -> bool:
        """Whether the factors of all samples are kept at a point (:attr:`MemoryPlan.store`)."""
        return self.plan.store

    def _feature_numel(self) -> int:
        q = self.num_outputs
        return sum(layer.feature_numel(q) for layer in self.layers if layer.trainable)

    def _forward(
        self,
        theta: Tensor,
        x: Tensor,
        outputs: list[Any] | None,
        records: list[Any],
        shapes: list[Any] | None = None,
    ) -> Tensor:
        if x.is_floating_point() and x.dtype != theta.dtype:
            x = x.to(theta.dtype)
        state = _Pass(self.layout.unflatten(theta), outputs, records, theta.dtype, shapes)
        y = self.root.forward(x, state)
        return y.unsqueeze(1) if y.ndim == 1 else y

    # -- factors ----------------------------------------------------------------
    def _features(self, theta: Tensor, a: int, b: int) -> tuple[list[Any], Tensor]:
        """Layer factors and outputs ``[n, Q]`` for samples ``a:b``.

        One forward pass and one reverse pass, vectorised over the Q outputs:
        the cotangents :math:`G_l` are the gradients of :math:`\\sum_j x_{jq}`
        with respect to the layer outputs :math:`z_l` (samples do not
        interact), for each :math:`q`.  No parameter gradient is computed.
        """
        x = self.inputs[a:b]
        n, q = b - a, self.num_outputs
        n_layers = len(self.layers)
        records: list[Any] = [None] * n_layers
        outs: list[Any] = [None] * n_layers
        wanted = [i for i, layer in enumerate(self.layers) if layer.trainable]
        with torch.enable_grad():
            t = theta.detach().requires_grad_(True)  # so that every z_l is in the graph
            y = self._forward(t, x, outs, records)
            zs = [outs[i] for i in wanted]
            if q == 1:
                grads = torch.autograd.grad(y, zs, torch.ones_like(y), allow_unused=True)
            else:
                eye = torch.eye(q, dtype=y.dtype, device=y.device)
                basis = eye.unsqueeze(1).expand(q, n, q)
                grads = torch.autograd.grad(y, zs, basis, allow_unused=True, is_grads_batched=True)
        feats: list[Any] = [None] * n_layers
        for i, z, g in zip(wanted, zs, grads):
            if g is None:
                g = torch.zeros_like(z).expand(q, *z.shape)
            elif q == 1:
                g = g.unsqueeze(0)
            feats[i] = self.layers[i].features(records[i].detach(), g)
        return feats, y.detach()

    def _cached(self, theta: Tensor) -> tuple[list[list[Any]], list[Tensor]] | None:
        """The factors kept at this very ``theta`` (by :meth:`ntk` or :meth:`factors`)."""
        if self._cache is None or not plain_tensor(theta):
            return None
        key, version, feats, ys = self._cache
        if key._version != version:  # the tensor we keyed on was modified in place
            self._cache = None
            return None
        return (feats, ys) if _same_point(key, theta) else None

    def factors(self, theta: Tensor) -> tuple[list[list[Any]], list[Tensor]] | None:
        """The layer factors and outputs of all sample chunks at ``theta``, kept.

        Computed once per point (one forward and one reverse pass per chunk),
        when they fit in half the memory budget (:attr:`MemoryPlan.store`);
        ``None`` otherwise, and for a ``theta`` that autograd traces.
        """
        hit = self._cached(theta)
        if hit is not None or not self.store_all or not plain_tensor(theta):
            return hit
        computed = [self._features(theta, a, b) for a, b in self.bounds]
        self._cache = (theta, theta._version, [f for f, _ in computed], [y for _, y in computed])
        return self._cache[2], self._cache[3]

    def _product_factors(self, theta: Tensor, batched: bool):
        """Factors for a product at ``theta``: kept ones, or new ones for a batch of products or
        at the second product with the same (unmodified) tensor ``theta``."""
        hit = self._cached(theta)
        if hit is not None or not self.store_all or not plain_tensor(theta):
            return hit
        # the same tensor, unmodified, a second time: a solver is at work at this point
        miss = self._miss
        again = miss is not None and miss[0] is theta and miss[1] == theta._version
        if batched or again:
            self._miss = None
            return self.factors(theta)
        self._miss = (theta, theta._version)
        return None

    # -- interface ----------------------------------------------------------------
    def outputs(self, theta: Tensor) -> Tensor:
        r""":math:`x[\theta]`, shape ``[QN]``."""
        hit = self._cached(theta)
        if hit is not None:
            return torch.cat([y.reshape(-1) for y in hit[1]])
        return self.fallback.outputs(theta)

    def jacobian(self, theta: Tensor) -> Tensor:
        r"""Dense :math:`D`, shape ``[QN, K]`` (delegated to the fallback engine, same budget)."""
        return self.fallback.jacobian(theta)

    def _trainable_layers(self) -> list[_Layer]:
        return [layer for layer in self.layers if layer.trainable]

    def _product_rows(self, total: int) -> int:
        """Rows of a batched product per pass: temporaries within the budget."""
        q = self.num_outputs
        per_row = max(
            sum(layer.row_numel(b - a, q) for layer in self._trainable_layers())
            for a, b in self.bounds
        )
        return self.plan.rows(2 * per_row, total)

    def rows_per_pass(self, theta: Tensor) -> int:
        """How many rows of a batched :meth:`jvp` / :meth:`vjp` one pass takes within the budget:
        from the layer factors when they are kept (:attr:`MemoryPlan.store`), else the
        fallback's (:meth:`FuncBackend.rows_per_pass`)."""
        if self.store_all and plain_tensor(theta):
            return self._product_rows(1 << 30)
        return self.fallback.rows_per_pass(theta)

    def jvp(self, theta: Tensor, tangent_vec: Tensor) -> Tensor:
        r""":math:`Dv`, shape ``[..., QN]`` for ``tangent_vec`` of shape ``[..., K]``.

        From the layer factors when they are kept at this ``theta``
        (:meth:`factors`), :math:`(Dv)_{jq} = \sum_l g^l_{jq}\cdot(V_l a^l_j + v_{b,l})`,
        a batch in passes whose temporaries stay within the budget; otherwise
        (and under :mod:`torch.func` transforms) by the fallback.
        """
        hit = self._product_factors(theta, tangent_vec.ndim > 1)
        if hit is None:
            return self.fallback.jvp(theta, tangent_vec)
        flat = tangent_vec.reshape(-1, tangent_vec.shape[-1])
        rows = self._product_rows(flat.shape[0])
        out = torch.cat(
            [self._jvp_rows(hit[0], flat[i : i + rows]) for i in range(0, flat.shape[0], rows)]
        )
        return out.reshape(*tangent_vec.shape[:-1], out.shape[-1])

    def _jvp_rows(self, feats: list[list[Any]], v: Tensor) -> Tensor:
        views = self.layout.unflatten(v)
        parts = []
        for fs in feats:
            acc = None
            for layer, f in zip(self.layers, fs):
                if layer.trainable:
                    z = layer.jvp(f, views)
                    acc = z if acc is None else acc + z
            assert acc is not None
            parts.append(acc.reshape(v.shape[0], -1))
        return torch.cat(parts, dim=1)

    def vjp(self, theta: Tensor, output_covec: Tensor) -> Tensor:
        r""":math:`D^\top u`, shape ``[..., K]`` for ``output_covec`` of shape ``[..., QN]``.

        From the layer factors when they are kept at this ``theta``
        (:meth:`factors`), :math:`D^\top u = \sum_l \sum_{jq} u_{jq}\, g^l_{jq}\otimes
        (a^l_j, 1)` (a few matrix products, no network evaluation), a batch in
        passes within the budget; otherwise (and under :mod:`torch.func`
        transforms) by the fallback.
        """
        hit = self._product_factors(theta, output_covec.ndim > 1)
        if hit is None:
            return self.fallback.vjp(theta, output_covec)
        flat = output_covec.reshape(-1, output_covec.shape[-1])
        rows = self._product_rows(flat.shape[0])
        out = torch.cat(
            [self._vjp_rows(hit[0], flat[i : i + rows]) for i in range(0, flat.shape[0], rows)]
        )
        return out.reshape(*output_covec.shape[:-1], out.shape[-1])

    def _vjp_rows(self, feats: list[list[Any]], u: Tensor) -> Tensor:
        q = self.num_outputs
        res = u.new_zeros(u.shape[0], self.layout.dim)
        views = self.layout.unflatten(res)
        for (a, b), fs in zip(self.bounds, feats):
            ub = u[:, a * q : b * q].reshape(-1, b - a, q)
            for layer, f in zip(self.layers, fs):
                if layer.trainable:
                    layer.vjp_into(f, ub, views)
        return res

    def pullback(
        self, theta: Tensor, covec_fn: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        r"""``(x, D^T covec_fn(x))`` (see :meth:`FuncBackend.pullback`).

        Served from the kept factors when there are some at this ``theta``;
        otherwise by the fallback.
        """
        if self._cached(theta) is not None:
            x = self.outputs(theta)
            return x, self.vjp(theta, covec_fn(x))
        fb = getattr(self.fallback, "pullback", None)
        if fb is not None:
            return fb(theta, covec_fn)
        x = self.fallback.outputs(theta)
        return x, self.fallback.vjp(theta, covec_fn(x))

    # -- parameter space: D^T D and shifted solves ---------------------------------------
    def _kspace_layers(self) -> tuple[list[_Layer], list[tuple[int, int]]]:
        """Trainable layers in the order of their parameters in theta, with their ranges."""
        offsets = dict(zip(self.layout.names, self.layout.offsets))
        found = []
        for layer in self._trainable_layers():
            refs = [(r.name, r.shape.numel()) for r in layer.refs if r.name is not None]
            start = end = offsets[refs[0][0]]
            for name, size in refs:
                if offsets[name] != end:  # pragma: no cover - layouts follow named_parameters
                    raise ValueError("the trainable tensors of a layer are not adjacent in theta")
                end += size
            found.append((start, end, layer))
        found.sort(key=lambda t: t[0])
        return [t[2] for t in found], [(t[0], t[1]) for t in found]

    def _chunk_forms(self, theta: Tensor) -> Callable[[], Any]:
        """A callable giving, per sample chunk, the layers' rows of D (kept or recomputed)."""
        kept = self.factors(theta)
        layers = self._kspace_layers()[0]

        def forms():
            for i, (a, b) in enumerate(self.bounds):
                fs = kept[0][i] if kept is not None else self._features(theta, a, b)[0]
                yield [layer.gram_form(fs[layer.index]) for layer in layers]

        return forms

    def _output_layer(self, theta: Tensor) -> int | None:
        r"""The largest trainable layer whose Gram block is block diagonal (:math:`G_j^\top G_j`
        diagonal on every sample: a ``Linear`` whose outputs are the network's), by its
        position in :meth:`_kspace_layers`, if the factors are kept; ``None`` otherwise."""
        kept = self.factors(theta)
        layers = self._kspace_layers()[0]
        if kept is None or len(layers) < 2:
            return None
        best, size = None, 0
        for k, layer in enumerate(layers):
            forms = [layer.gram_form(fs[layer.index]) for fs in kept[0]]
            if forms[0].size > size and diagonal_kron(forms):
                best, size = k, forms[0].size
        return best

    def param_gram(self, theta: Tensor) -> Tensor:
        r""":math:`D^\top D`, ``[K, K]``, exactly symmetric, without forming :math:`D`.

        Layer block by layer block from the factors (:mod:`~subriemann.engines.kspace`):
        a dense layer's Kronecker rows make its blocks :math:`Q` times cheaper
        than from the rows of :math:`D`.  Temporaries stay within the memory
        budget; the result takes :math:`K^2` entries.
        """
        if not plain_tensor(theta):
            d = self.fallback.jacobian(theta)
            return d.T @ d
        q, temp = self.num_outputs, self.plan.temp_entries()
        forms = self._chunk_forms(theta)()
        return param_gram(forms, self._kspace_layers()[1], self.layout.dim, theta, q, temp)

    def solve_param_gram(self, theta: Tensor, rhs: Tensor, shift: float) -> Tensor:
        r""":math:`(D^\top D + \mu 1)^{-1}r` for ``rhs`` ``[K]`` or ``[K, b]`` and :math:`\mu > 0`.

        Exact (Cholesky factorizations of symmetric positive definite matrices;
        on large convolutional networks from ``float32`` factors refined to the
        same backward error, ``mixed_precision``).  When the network ends with a
        ``Linear`` layer whose outputs are the network's, its Gram block is
        block diagonal and is eliminated first
        (:func:`~subriemann.engines.kspace.solve_shifted`): the one dense
        factorization then has the size of the *other* parameters, and the
        largest matrices are :math:`|C|\times K` instead of :math:`K\times K`.

        Examples
        --------
        >>> import torch
        >>> from subriemann.engines import ParameterLayout, StructuredBackend
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                           torch.nn.Linear(4, 2)).double()
        >>> named = dict(net.named_parameters())
        >>> layout = ParameterLayout(list(named), [p.shape for p in named.values()])
        >>> be = StructuredBackend(net, layout, torch.randn(20, 3, dtype=torch.float64), 2)
        >>> theta = layout.flatten({n: p.detach() for n, p in named.items()})
        >>> d = be.jacobian(theta)  # [QN, K] = [40, 26]: K < QN
        >>> r = torch.randn(26, dtype=torch.float64)
        >>> x = be.solve_param_gram(theta, r, 0.5)
        >>> bool(torch.allclose(d.T @ (d @ x) + 0.5 * x, r))
        True
        """
        if not plain_tensor(theta):
            raise ValueError("solve_param_gram is not differentiable in theta")
        rhs = rhs.to(dtype=theta.dtype, device=theta.device)
        self.last_refinement = None
        if self.mixed_precision and theta.dtype == torch.float64 and shift > 0:
            x = self._mixed_solve(theta, rhs.unsqueeze(1) if rhs.ndim == 1 else rhs, float(shift))
            if x is not None:
                return x.squeeze(1) if rhs.ndim == 1 else x
        return solve_shifted(
            self._chunk_forms(theta), self._kspace_layers()[1], self.layout.dim, rhs,
            float(shift), self.num_outputs, self.plan.temp_entries(), self._output_layer(theta),
            self.plan.n_samples,
        )  # fmt: skip

    def _mixed_solve(self, theta: Tensor, rhs: Tensor, shift: float) -> Tensor | None:
        """:func:`~subriemann.engines.mixed.mixed_solve` with the kept layer factors (or None)."""
        kept = self.factors(theta)  # the rows, cast to float32, and the float64 products
        last = self._output_layer(theta)
        if kept is None or last is None:
            return None
        got = mixed_solve(
            self._chunk_forms(theta), self._kspace_layers()[1], last, rhs, shift,
            self.plan.temp_entries(), self.plan.n_samples,
            lambda v: self.jvp(theta, v), lambda u: self.vjp(theta, u),
            MIN_FLOPS if self.mixed_precision == "auto" else 0,
        )  # fmt: skip
        if got is None:
            return None
        self.last_refinement = got[1]
        return got[0]

    def ntk(self, theta: Tensor, output_basis: Tensor | None = None) -> Tensor:
        r"""Empirical NTK :math:`DD^\top = \sum_l (A_lA_l^\top)\circ(G_lG_l^\top)`, ``[QN, QN]``.

        The upper triangle of a block on the diagonal is assembled in strips
        from the diagonal to the right (which saves up to 3/8 of the matrix
        products); the lower part is then filled by transposition, so that
        the result is exactly symmetric.  The factors are kept
        (:meth:`factors`) when they fit in half the budget, and recomputed per
        block otherwise.

        Parameters
        ----------
        theta : Tensor, shape=[K]
        output_basis : Tensor, shape=[N, Q, R], optional
            Per-sample output bases :math:`T_j`: then the result is
            :math:`T^\top DD^\top T` (``[NR, NR]``, :math:`T` block diagonal),
            assembled from the layer factors mixed by :math:`T_j` (a whitened
            Gram matrix at the cost of one of size :math:`NR`; used by
            :class:`~subriemann.optim.AdaptedGD` for the Fisher metric of
            cross-entropy).
        """
        layers = self._trainable_layers()
        if not plain_tensor(theta) and layers:  # differentiated through: the generic engine is
            if output_basis is not None:  # differentiable
                raise ValueError("output_basis needs a plain theta (not traced by autograd)")
            return self.fallback.ntk(theta)
        q = self.num_outputs if output_basis is None else int(output_basis.shape[2])
        gram = torch.empty(int(self.inputs.shape[0]) * q, int(self.inputs.shape[0]) * q,
                           dtype=theta.dtype, device=theta.device)  # fmt: skip
        if not layers:
            return gram.zero_()
        kept = self.factors(theta)
        feats = None if kept is None else kept[0]

        def chunk(i: int) -> list[Any]:
            fs = feats[i] if feats is not None else self._features(theta, *self.bounds[i])[0]
            fs = [f for f, layer in zip(fs, self.layers) if layer.trainable]
            if output_basis is None:
                return fs
            t = output_basis[self.bounds[i][0] : self.bounds[i][1]]
            return [layer.mix(f, t) for layer, f in zip(layers, fs)]

        for i, (a0, a1) in enumerate(self.bounds):
            fa = chunk(i)
            # the diagonal block: its upper triangle in strips from the diagonal to the
            # right (one per row tile), then mirrored (exactly symmetric; A A^T need not be)
            for s0, s1 in tiles(a1 - a0, q):
                ft = [layer.take(f, s0, s1) for layer, f in zip(layers, fa)]
                fr = [layer.take(f, s0, a1 - a0) for layer, f in zip(layers, fa)]
                _gram_block(gram, layers, q, ft, fr, (a0 + s0, a0 + s1), (a0 + s0, a1))
            mirror_upper(gram[a0 * q : a1 * q, a0 * q : a1 * q])
            for j in range(i + 1, len(self.bounds)):
                _gram_block(gram, layers, q, fa, chunk(j), (a0, a1), self.bounds[j])
        return gram


def _gram_block(
    gram: Tensor,
    layers: list[_Layer],
    q: int,
    fa: list[Any],
    fb: list[Any],
    ra: tuple[int, int],
    rb: tuple[int, int],
) -> None:
    """Rows ``ra``, columns ``rb`` (samples) of :math:`DD^\\top` from the factors of those samples.

    ``rb[0] >= ra[0]``; an off-diagonal block is mirrored below the diagonal.
    """
    out = gram[ra[0] * q : ra[1] * q, rb[0] * q : rb[1] * q]
    out4 = out.view(ra[1] - ra[0], q, rb[1] - rb[0], q)
    for k, layer in enumerate(layers):
        layer.gram_into(out4, fa[k], fb[k], first=k == 0)
    if rb[0] != ra[0]:
        gram[rb[0] * q : rb[1] * q, ra[0] * q : ra[1] * q] = out.T


def _same_point(key: Tensor, theta: Tensor) -> bool:
    """Whether ``theta`` is the tensor ``key`` or equal to it (same shape, device and dtype)."""
    return theta is key or (
        key.shape == theta.shape
        and key.device == theta.device
        and key.dtype == theta.dtype
        and torch.equal(key, theta)
    )
