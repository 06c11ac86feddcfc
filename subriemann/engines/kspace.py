r"""The parameter-space Gram matrix :math:`D^\top D` and its shifted solves, from layer factors.

When :math:`K < QN` the smaller Gram matrix of :math:`D` (``[QN, K]``) is
:math:`D^\top D` (``[K, K]``).  Forming it from a dense :math:`D` costs
:math:`QN\,K^2` and the memory of :math:`D`; the structured engine
(:class:`~subriemann.engines.structured.StructuredBackend`) has the rows of
:math:`D` in factored form per layer and sample chunk, which this module
contracts block by block, within the memory budget
(:class:`~subriemann.engines.structured.MemoryPlan`):

* a layer in **rows** form (:class:`RowsForm`: convolutions, normalization
  layers) gives its per-sample rows :math:`J_{jq}` explicitly (``[n, Q, P_l]``);
* a dense ``Linear`` layer is in **Kronecker** form (:class:`KronForm`): the
  row of :math:`(W, b)` for sample :math:`j` and output :math:`q` is
  :math:`g_{jq}\otimes\tilde a_j`, :math:`\tilde a_j = (a_j, 1)`, so the
  Gram block of two such layers is
  :math:`\sum_j (G_j^\top G'_j)\otimes(\tilde a_j\tilde a_j'^\top)`: a factor
  :math:`Q` cheaper than from the rows, and blocks where
  :math:`G_j^\top G'_j` vanishes for every sample are skipped.

**Shifted solves** :math:`(D^\top D + \mu 1)x = r` (:func:`solve_shifted`,
:math:`\mu > 0`).  The Cholesky factor of the whole :math:`K\times K`
matrix costs :math:`K^3/3`; but the output layer of most networks, a
``Linear`` whose outputs are the network's (:math:`G_j = 1`), has a
block-diagonal Gram block :math:`\bigoplus_c \tilde A^\top\mathrm{diag}(w_c)\tilde A`,
one block of size :math:`m+1` per output unit :math:`c`.  With that layer
:math:`L` and the others :math:`C`,

.. math::

    \begin{pmatrix} F & E\\ E^\top & B\end{pmatrix}
    \begin{pmatrix} x_C\\ x_L\end{pmatrix} = \begin{pmatrix} r_C\\ r_L\end{pmatrix},
    \qquad S = F - E B^{-1}E^\top,

:math:`F = D_C^\top D_C + \mu 1`, :math:`E = D_C^\top D_L`,
:math:`B = D_L^\top D_L + \mu 1`: the Schur complement :math:`S` has the size
:math:`|C|` of the other layers, and :math:`B` is factored block by block.
Both factorizations are Cholesky factorizations of symmetric positive
definite matrices (:math:`S` is the Schur complement of an SPD matrix), so
the solve is backward stable with the condition number of
:math:`D^\top D + \mu 1`, as the Cholesky factor of the whole matrix.

**The sample side** (:func:`sample_side_solve`).  When the other layers are
in rows form and :math:`G_j = 1` (the output layer's outputs are the
network's), :math:`E_c = J_c^\top\tilde A` with :math:`J_c` (``[N, |C|]``)
the rows of output :math:`c` and :math:`\tilde A` (``[N, m']``) the layer
inputs, so that, by :math:`1 - \tilde A(\tilde A^\top\tilde A + \mu)^{-1}
\tilde A^\top = \mu M^{-1}`, :math:`M = \tilde A\tilde A^\top + \mu 1_N`,

.. math::

    S = \mu\Bigl(1 + \sum_c Z_c^\top Z_c\Bigr),\qquad Z_c = L^{-1}J_c,
    \quad M = LL^\top .

This costs :math:`N^2 Q|C|` (one triangular solve) and :math:`NQ|C|^2` (one
Gram matrix) instead of :math:`NQ|C|^2` plus
:math:`(2Nm' + m'^2)Q|C| + m'Q|C|^2` for :math:`F`, :math:`E` and
:math:`EB^{-1}E^\top`; it is chosen where that is fewer flops and the rows
of all samples and :math:`M` fit in half the memory budget.
:math:`S` is then a sum of positive semidefinite terms and the identity: it
is formed without the cancellation of :math:`F - EB^{-1}E^\top`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from subriemann.engines.base import items_within
from subriemann.triangular import cholesky_solve

__all__ = [
    "RowsForm",
    "KronForm",
    "mirror_upper",
    "tiles",
    "param_gram",
    "solve_shifted",
    "diagonal_kron",
    "sample_side_solve",
    "SampleSide",
    "gather_rows",
]


@dataclass
class RowsForm:
    """Rows of :math:`D` for one layer and a sample chunk: ``j`` of shape ``[n, Q, P_l]``."""

    j: Tensor

    @property
    def size(self) -> int:
        return int(self.j.shape[-1])


@dataclass
class KronForm:
    r"""Rows :math:`g_{jq}\otimes\tilde a_j` of a dense layer's :math:`(W, b)`.

    Attributes
    ----------
    a : Tensor, shape=[n, m']
        :math:`\tilde a_j`: the layer inputs (``m_w`` columns, none when the
        weight is frozen) followed by a column of ones when the bias is trainable.
    g : Tensor, shape=[n, Q, c]
        Output cotangents.
    m_w : int
        Columns of ``a`` that belong to the weight (row-major ``[c, m_w]``
        in the layout, followed by the bias ``[c]``).
    has_b : bool
    """

    a: Tensor
    g: Tensor
    m_w: int
    has_b: bool

    @property
    def size(self) -> int:
        return int(self.g.shape[-1]) * (self.m_w + int(self.has_b))

    def to_layout(self, t: Tensor) -> Tensor:
        """``[..., c, m']`` (native order) to ``[..., c*m_w + c]`` (the layout's: W, then b)."""
        parts = [t[..., : self.m_w].flatten(-2)] if self.m_w else []
        if self.has_b:
            parts.append(t[..., self.m_w])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def from_layout(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`to_layout` on the last dimension: ``[..., P]`` to ``[..., c, m']``."""
        c = int(self.g.shape[-1])
        parts = [t[..., : c * self.m_w].unflatten(-1, (c, self.m_w))] if self.m_w else []
        if self.has_b:
            parts.append(t[..., c * self.m_w :].unsqueeze(-1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


Form = RowsForm | KronForm


def tiles(n: int, q: int) -> list[tuple[int, int]]:
    """Split ``n`` samples into up to 4 tiles of at least 64 rows (``Q`` rows per sample)."""
    count = max(1, min(4, (n * q) // 64))
    size = -(-n // count)
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def mirror_upper(m: Tensor, tile: int = 128) -> None:
    """Copy the upper triangle of the square ``m`` onto its lower triangle, in place.

    Strip by strip (``tile`` rows), so that the transposed reads stay in cache.
    """
    n = m.shape[0]
    for i in range(0, n, tile):
        i1 = min(n, i + tile)
        blk = m[i:i1, i:i1]
        blk.copy_(torch.triu(blk) + torch.triu(blk, 1).mT)
        if i1 < n:
            m[i1:, i:i1].copy_(m[i:i1, i1:].mT)


# ---------------------------------------------------------------------------
# Gram blocks of two layers on one sample chunk
# ---------------------------------------------------------------------------
def _rows_rows(fa: RowsForm, fb: RowsForm) -> Tensor:
    ja = fa.j.reshape(-1, fa.size)
    return ja.T @ fb.j.reshape(-1, fb.size)


def _rows_kron(fa: RowsForm, fb: KronForm) -> Tensor:
    r""":math:`D_a^\top D_b` with ``b``'s columns in its native order, ``[P_a, c, m']``."""
    n = fa.j.shape[0]
    y = torch.einsum("nqp,nqc->npc", fa.j, fb.g)  # [n, P_a, c]
    return (y.reshape(n, -1).T @ fb.a).reshape(fa.size, fb.g.shape[-1], -1)


def add_upper_gram(out: Tensor, x: Tensor, alpha: float = 1.0, tile: int = 512) -> None:
    r"""``out += alpha * x^T x`` on the upper triangle of tiles only (``x``: ``[r, p]``).

    Up to 8 column tiles of at least ``tile`` columns: the blocks below the
    diagonal (up to 7/16 of the products) are skipped; the caller mirrors the
    upper triangle (:func:`mirror_upper`).
    """
    p = x.shape[1]
    count = max(1, min(8, p // tile))
    size = -(-p // count)
    cuts = [(a, min(p, a + size)) for a in range(0, p, size)]
    for a0, a1 in cuts:
        out[a0:a1, a0:].addmm_(x[:, a0:a1].T, x[:, a0:], alpha=alpha)


def _outer_first(fa: KronForm, fb: KronForm) -> bool:
    r"""Whether :func:`_kron_kron` contracts the samples against the outer products
    :math:`\tilde a_j\tilde b_j^\top` (``[n, m_a m_b]``) rather than against
    :math:`w_{j,cd}\tilde b_j` per output :math:`c` (``[n, c_b m_b]`` each): the same
    flops, and the first streams fewer entries when :math:`m_a \le c_a c_b`."""
    return int(fa.a.shape[1]) <= int(fa.g.shape[-1]) * int(fb.g.shape[-1])


def _kron_kron(fa: KronForm, fb: KronForm, same: bool = False) -> Tensor:
    r""":math:`\sum_j (G_j^\top G'_j)\otimes(\tilde a_j\tilde b_j^\top)` in layout order.

    ``same``: ``fa`` and ``fb`` are one layer's, so the block is symmetric and
    only the output pairs :math:`c \le d` are contracted (outer-product form).
    Output pairs whose weight :math:`w_{j,cd} = (G_j^\top G'_j)_{cd}` vanishes on
    every sample are skipped.
    """
    w = torch.einsum("nqc,nqd->ncd", fa.g, fb.g)  # [n, c_a, c_b]
    n, ca, cb = w.shape
    ma, mb = fa.a.shape[1], fb.a.shape[1]
    nonzero = (w != 0).any(dim=0)  # [c_a, c_b]: pairs that vanish on every sample are skipped
    if _outer_first(fa, fb):
        if same:
            nonzero = torch.triu(nonzero)
        pairs = nonzero.flatten().nonzero().squeeze(1)
        outer = (fa.a[:, :, None] * fb.a[:, None, :]).reshape(n, ma * mb)
        flat = fa.a.new_zeros(ca * cb, ma * mb)
        flat[pairs] = w.reshape(n, ca * cb)[:, pairs].T @ outer
        upper = flat.view(ca, cb, ma, mb)
        if same:  # the pairs d < c from c < d; the pairs c = c once
            diag = torch.arange(ca, device=w.device)
            full = upper + upper.permute(1, 0, 3, 2)
            full[diag, diag] -= upper[diag, diag]
            upper = full
        blk = upper.permute(0, 2, 1, 3)  # [c_a, m_a, c_b, m_b]
    else:
        blk = fa.a.new_zeros(ca, ma, cb, mb)
        for c in range(ca):
            nz = nonzero[c].nonzero().squeeze(1)
            if nz.numel() == 0:
                continue
            z = (w[:, c, nz, None] * fb.a[:, None, :]).reshape(n, -1)
            blk[c][:, nz] = (fa.a.T @ z).view(ma, nz.numel(), mb)
    rows = fb.to_layout(blk)  # [c_a, m_a', P_b]
    return fa.to_layout(rows.permute(2, 0, 1)).T


def pair_block(fa: Form, fb: Form, same: bool = False) -> Tensor:
    """:math:`D_a^\\top D_b` on one sample chunk, ``[P_a, P_b]`` in layout order
    (``same``: one layer's forms)."""
    if isinstance(fa, RowsForm):
        if isinstance(fb, RowsForm):
            return _rows_rows(fa, fb)
        return fb.to_layout(_rows_kron(fa, fb))
    if isinstance(fb, RowsForm):
        return fa.to_layout(_rows_kron(fb, fa)).T
    return _kron_kron(fa, fb, same)


def add_pair(out: Tensor, fa: Form, fb: Form, same: bool) -> None:
    """``out += D_a^T D_b`` (``same``: one layer's; upper tiles only in rows form)."""
    if same and isinstance(fa, RowsForm):
        add_upper_gram(out, fa.j.reshape(-1, fa.size))
    else:
        out += pair_block(fa, fb, same)


def _temp_per_sample(forms: Sequence[Form], q: int) -> int:
    """Entries of the largest per-sample temporary of :func:`pair_block` over these forms."""
    out = 1
    for fa in forms:
        for fb in forms:
            if isinstance(fa, RowsForm) and isinstance(fb, KronForm):
                out = max(out, fa.size * int(fb.g.shape[-1]))
            elif isinstance(fa, KronForm) and isinstance(fb, KronForm):
                ma, mb = int(fa.a.shape[1]), int(fb.a.shape[1])
                ca, cb = int(fa.g.shape[-1]), int(fb.g.shape[-1])
                per = ma * mb + ca * cb if _outer_first(fa, fb) else cb * mb + q * ca
                out = max(out, per)
    return out


# ---------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------
def sub_chunks(forms: list[Form], q: int, temp_entries: int) -> list[list[Form]]:
    """Split one chunk's forms into sample sub-chunks whose temporaries fit ``temp_entries``."""
    n = int(forms[0].j.shape[0] if isinstance(forms[0], RowsForm) else forms[0].g.shape[0])
    size = items_within(temp_entries, _temp_per_sample(forms, q), n)
    if size >= n:
        return [forms]
    return [[_take(f, a, min(n, a + size)) for f in forms] for a in range(0, n, size)]


def _take(f: Form, a: int, b: int) -> Form:
    if isinstance(f, RowsForm):
        return RowsForm(f.j[a:b])
    return KronForm(f.a[a:b], f.g[a:b], f.m_w, f.has_b)


def param_gram(
    chunks: Any, ranges: list[tuple[int, int]], dim: int, like: Tensor, q: int, temp_entries: int
) -> Tensor:
    r""":math:`D^\top D`, ``[K, K]``, exactly symmetric, from the forms of every sample chunk.

    Parameters
    ----------
    chunks : iterable of list of RowsForm or KronForm
        Per sample chunk, one form per trainable layer.
    ranges : list of (int, int)
        The layout range of each trainable layer (contiguous, in layer order).
    dim : int
        :math:`K`.
    like : Tensor
        dtype and device.
    q : int
    temp_entries : int
        Largest temporary of a block (entries); chunks are split below it.
    """
    gram = like.new_zeros(dim, dim)
    for forms in chunks:
        for sub in sub_chunks(forms, q, temp_entries):
            for i, (fa, (a0, a1)) in enumerate(zip(sub, ranges)):
                for k, (fb, (b0, b1)) in enumerate(zip(sub[i:], ranges[i:])):
                    add_pair(gram[a0:a1, b0:b1], fa, fb, same=k == 0)
    mirror_upper(gram)
    return gram


def diagonal_kron(forms: Sequence[Form]) -> bool:
    r"""Whether a layer's Kronecker rows have :math:`G_j^\top G_j` diagonal on these samples."""
    f = forms[0]
    if not isinstance(f, KronForm):
        return False
    for g in forms:
        assert isinstance(g, KronForm)
        w = torch.einsum("nqc,nqd->ncd", g.g, g.g)
        if bool((w - torch.diag_embed(w.diagonal(dim1=1, dim2=2))).any()):
            return False
    return True


def _cholesky(a: Tensor, what: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(a)
    if bool(info.ne(0).any()):
        raise torch.linalg.LinAlgError(f"{what} is not positive definite (Cholesky failed)")
    return chol


@dataclass
class _Schur:
    """The pieces of the block elimination on a block-diagonal output layer ``L``."""

    f: Tensor  # [|C|, |C|], upper triangle
    e: Tensor  # [|C|, c, m']
    b: Tensor  # [c, m', m'], or [1, m', m'] when every block is the same
    form: KronForm  # the output layer's layout (m_w, has_b)


def _assemble_schur(
    chunks: Any, ranges: list[tuple[int, int]], last: int, like: Tensor, q: int, temp: int
) -> _Schur:
    r""":math:`F`, :math:`E` and the blocks of :math:`B` (unshifted), accumulated over chunks.

    :math:`B_c = \tilde A^\top\mathrm{diag}(w_c)\tilde A` with :math:`w_{jc} =
    (G_j^\top G_j)_{cc}`; when :math:`w_c` is the same for every :math:`c` (e.g.
    :math:`G_j = 1`), one block serves all.
    """
    c_ranges = [r for i, r in enumerate(ranges) if i != last]
    starts = [0]
    for lo, hi in c_ranges:
        starts.append(starts[-1] + hi - lo)
    f = like.new_zeros(starts[-1], starts[-1])
    e: Any = None
    blocks: dict[str, Tensor] = {}
    lf: Any = None
    for forms in chunks:
        for sub in sub_chunks(forms, q, temp):
            lf = sub[last]
            others = [x for i, x in enumerate(sub) if i != last]
            c, m = lf.g.shape[-1], lf.a.shape[1]
            if e is None:
                e = like.new_zeros(starts[-1], c, m)
            for i, fa in enumerate(others):
                rows = slice(starts[i], starts[i + 1])
                for k, fb in enumerate(others[i:], start=i):
                    add_pair(f[rows, starts[k] : starts[k + 1]], fa, fb, same=k == i)
                e[rows] += _native_pair(fa, lf)
            _add_blocks(blocks, lf)
    mirror_upper(f)
    b = blocks["same"].unsqueeze(0) if "same" in blocks else blocks["each"]
    return _Schur(f, e, b, lf)


def _native_pair(fa: Form, lf: KronForm) -> Tensor:
    r""":math:`D_a^\top D_L` with ``L``'s columns in native order, ``[P_a, c, m']``."""
    if isinstance(fa, RowsForm):
        return _rows_kron(fa, lf)
    return lf.from_layout(_kron_kron(fa, lf))


def _add_blocks(blocks: dict[str, Tensor], lf: KronForm) -> None:
    r"""Add :math:`\tilde A^\top\mathrm{diag}(w_c)\tilde A` (one block if the :math:`w_c` agree)."""
    w = (lf.g * lf.g).sum(dim=1)  # [n, c]: the diagonal of G_j^T G_j
    same = "each" not in blocks and bool((w == w[:, :1]).all())
    if same:
        blk = (lf.a * w[:, :1]).T @ lf.a
        blocks["same"] = blocks["same"] + blk if "same" in blocks else blk
        return
    if "same" in blocks:  # an earlier chunk had equal weights: expand
        blocks["each"] = blocks.pop("same").expand(w.shape[1], -1, -1).clone()
    blk = torch.einsum("nc,nf,ng->cfg", w, lf.a, lf.a)
    blocks["each"] = blocks["each"] + blk if "each" in blocks else blk


def _check_shift(shift: float) -> None:
    if not shift > 0.0:
        raise ValueError(f"shift must be positive, got {shift!r}")


def solve_shifted(
    chunks: Callable[[], Any],
    ranges: list[tuple[int, int]],
    dim: int,
    rhs: Tensor,
    shift: float,
    q: int,
    temp_entries: int,
    output_layer: int | None,
    n_samples: int | None = None,
) -> Tensor:
    r""":math:`(D^\top D + \mu 1)^{-1}r`, ``rhs`` of shape ``[K]`` or ``[K, b]``, :math:`\mu > 0`.

    With ``output_layer`` (the index of a layer in Kronecker form whose
    :math:`G_j^\top G_j` is diagonal, :func:`diagonal_kron`) by the block
    elimination of the module docstring, on the sample side
    (:func:`sample_side_solve`) where that applies and is cheaper; otherwise
    by the Cholesky factor of :func:`param_gram` plus :math:`\mu 1`.

    Parameters
    ----------
    chunks : callable
        Returns a fresh iterable of per-chunk form lists (iterated once, or
        twice when the sample side turns out not to apply).
    n_samples : int, optional
        :math:`N`; without it the sample side is not tried.
    """
    _check_shift(shift)
    vec = rhs.ndim == 1
    r = rhs.unsqueeze(1) if vec else rhs
    if output_layer is not None and n_samples is not None:
        x = sample_side_solve(chunks, ranges, output_layer, r, shift, temp_entries, n_samples)
        if x is not None:
            return x.squeeze(1) if vec else x
    if output_layer is None:
        gram = param_gram(chunks(), ranges, dim, r, q, temp_entries)
        gram.diagonal().add_(shift)
        x = cholesky_solve(_cholesky(gram, "D^T D + shift 1"), r)
        return x.squeeze(1) if vec else x
    parts = _assemble_schur(chunks(), ranges, output_layer, r, q, temp_entries)
    x = _schur_solve(parts, ranges, output_layer, r, shift)
    return x.squeeze(1) if vec else x


def _scatter_solution(
    r: Tensor, ranges: list[tuple[int, int]], last: int, x_c: Tensor, x_l: Tensor, form: KronForm
) -> Tensor:
    r"""``[K, b]`` in layout order from :math:`x_C` (``[|C|, b]``, the other layers in order)
    and :math:`x_L` (``[c, m', b]``, the output layer's native order)."""
    out = torch.empty_like(r)
    start = 0
    for i, (a, b) in enumerate(ranges):
        if i != last:
            out[a:b] = x_c[start : start + b - a]
            start += b - a
    l0, l1 = ranges[last]
    out[l0:l1] = form.to_layout(x_l.permute(2, 0, 1)).T
    return out


def _output_rows(r: Tensor, ranges: list[tuple[int, int]], last: int, form: KronForm) -> Tensor:
    """The rows of ``r`` (``[K, b]``) of the output layer, ``[c, m', b]`` (native order)."""
    l0, l1 = ranges[last]
    return form.from_layout(r[l0:l1].T).permute(1, 2, 0)


def _other_rows(r: Tensor, ranges: list[tuple[int, int]], last: int) -> Tensor:
    """The rows of ``r`` (``[K, b]``) of every layer but ``last``, in layer order."""
    parts = [r[a:b] for i, (a, b) in enumerate(ranges) if i != last]
    return torch.cat(parts) if parts else r[:0]


def _schur_solve(
    parts: _Schur, ranges: list[tuple[int, int]], last: int, r: Tensor, shift: float
) -> Tensor:
    r"""Block elimination: :math:`x_C = S^{-1}(r_C - EB^{-1}r_L)`,
    :math:`x_L = B^{-1}(r_L - E^\top x_C)`."""
    nc, c, m = parts.e.shape
    b = parts.b
    b.diagonal(dim1=1, dim2=2).add_(shift)
    chol = _cholesky(b, "a block of D_L^T D_L + shift 1")  # [c or 1, m', m']
    r_l = _output_rows(r, ranges, last, parts.form)  # [c, m', b]
    e_t = parts.e.permute(1, 2, 0)  # [c, m', |C|]
    if chol.shape[0] == 1:  # one block for all c: one triangular solve with c * |C| columns
        v = torch.linalg.solve_triangular(chol[0], e_t.permute(1, 0, 2).reshape(m, -1), upper=False)
        v = v.view(m, c, nc).permute(1, 0, 2)
    else:
        v = torch.linalg.solve_triangular(chol, e_t, upper=False)  # L_c^{-1} E_c^T
    y = torch.linalg.solve_triangular(chol, r_l, upper=False)  # L_c^{-1} r_L
    s = parts.f
    s.diagonal().add_(shift)
    add_upper_gram(s, v.reshape(c * m, nc), alpha=-1.0)  # S = F - E B^{-1} E^T
    mirror_upper(s)
    rhs_c = _other_rows(r, ranges, last) - torch.einsum("cmi,cmb->ib", v, y)
    x_c = cholesky_solve(_cholesky(s, "the Schur complement"), rhs_c)  # [|C|, b]
    x_l = torch.linalg.solve_triangular(chol.mT, y - v @ x_c, upper=True)  # [c, m', b]
    return _scatter_solution(r, ranges, last, x_c, x_l, parts.form)


# ---------------------------------------------------------------------------
# The sample side
# ---------------------------------------------------------------------------
def _sample_side_cheaper(n: int, m: int, nc: int) -> bool:
    r"""Whether :math:`N^2 Q|C|` (the triangular solve) undercuts
    :math:`(2Nm' + m'^2)Q|C| + m'Q|C|^2` (:math:`E`, :math:`B^{-1/2}E^\top`, the update of
    :math:`F`, at 5/8 of its products by :func:`add_upper_gram`)."""
    return n * n <= 2 * n * m + m * m + (5 * m * nc) // 8


def gather_rows(
    chunks: Callable[[], Any], last: int, temp_entries: int, n_samples: int,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, KronForm] | None:
    r"""The rows :math:`J` (``[N, Q, |C|]``, a fresh tensor) of the other layers and
    :math:`\tilde A` (``[N, m']``), or ``None`` where the sample side does not apply or
    is not cheaper (decided on the first chunk, before anything is gathered).

    ``dtype`` (default: that of the forms) is the dtype of the gathered copies.

    Examples
    --------
    Two chunks of 3 samples, one layer of explicit rows (5 parameters) and an
    output layer with :math:`G_j = 1` (:math:`Q = 2`, :math:`m' = 4`), gathered
    in ``float32``:

    >>> import torch
    >>> from subriemann.engines.kspace import KronForm, RowsForm, gather_rows
    >>> eye = torch.eye(2, dtype=torch.float64).expand(3, 2, 2)
    >>> chunk = [RowsForm(torch.ones(3, 2, 5, dtype=torch.float64)),
    ...          KronForm(torch.ones(3, 4, dtype=torch.float64), eye, 4, False)]
    >>> j, a, form = gather_rows(lambda: [chunk, chunk], 1, 10**6, 6, torch.float32)
    >>> tuple(j.shape), tuple(a.shape), j.dtype
    ((6, 2, 5), (6, 4), torch.float32)
    """
    j: Any = None
    a: Any = None
    lf: Any = None
    row = 0
    for forms in chunks():
        lf = forms[last]
        others = [f for i, f in enumerate(forms) if i != last]
        if j is None:
            if not others or not all(isinstance(f, RowsForm) for f in others):
                return None
            n_c, q, m = sum(f.size for f in others), int(lf.g.shape[1]), int(lf.a.shape[1])
            fits = n_samples * (q * n_c + n_samples) <= 4 * temp_entries  # J and M: budget / 2
            if lf.g.shape[-1] != q or not fits or not _sample_side_cheaper(n_samples, m, n_c):
                return None
            eye = torch.eye(q, dtype=lf.g.dtype, device=lf.g.device)
            j = lf.g.new_empty(n_samples, q, n_c, dtype=dtype or lf.g.dtype)
            a = lf.a.new_empty(n_samples, m, dtype=dtype or lf.a.dtype)
        if not torch.equal(lf.g, eye.expand_as(lf.g)):  # G_j = 1 on every sample
            return None
        n, col = int(lf.a.shape[0]), 0
        for f in others:
            j[row : row + n, :, col : col + f.size] = f.j
            col += f.size
        a[row : row + n] = lf.a
        row += n
    if j is None or row != n_samples:
        return None
    return j, a, lf


def sample_side_solve(
    chunks: Callable[[], Any],
    ranges: list[tuple[int, int]],
    last: int,
    r: Tensor,
    shift: float,
    temp_entries: int,
    n_samples: int,
) -> Tensor | None:
    r""":math:`(D^\top D + \mu 1)^{-1}r` (``r``: ``[K, b]``) by the elimination on the
    sample side (module docstring), or ``None`` where it does not apply.

    .. math::

        x_C = \mu^{-1}\Bigl(1 + \sum_c Z_c^\top Z_c\Bigr)^{-1}
              \Bigl(r_C - \sum_c Z_c^\top L^{-1}\tilde A r_{L,c}\Bigr),\qquad
        x_{L,c} = (\tilde A^\top\tilde A + \mu)^{-1}(r_{L,c} - \tilde A^\top J_c x_C),

    with :math:`J_c x_C = L Z_c x_C`, so that :math:`J` is overwritten by :math:`Z`.
    Three Cholesky factorizations of SPD matrices (:math:`M`, :math:`S/\mu`,
    :math:`\tilde A^\top\tilde A + \mu`): backward stable with the condition
    number of :math:`D^\top D + \mu 1`.

    Examples
    --------
    Explicit rows ``j`` (``[N, Q, P]``) for one layer and an output layer whose
    rows are :math:`e_q\otimes a_n` (:math:`G_j = 1`, weight only), against the
    dense solve:

    >>> import torch
    >>> from subriemann.engines.kspace import KronForm, RowsForm, sample_side_solve
    >>> _ = torch.manual_seed(0)
    >>> n, q, p, m = 6, 3, 5, 4
    >>> j, a = torch.randn(n, q, p, dtype=torch.float64), torch.randn(n, m, dtype=torch.float64)
    >>> g = torch.eye(q, dtype=torch.float64).expand(n, q, q)
    >>> forms = [RowsForm(j), KronForm(a, g, m, False)]
    >>> d = torch.cat([j.reshape(n * q, p),
    ...                torch.einsum("qc,ni->nqci", g[0], a).reshape(n * q, q * m)], dim=1)
    >>> r = torch.randn(p + q * m, 2, dtype=torch.float64)
    >>> x = sample_side_solve(lambda: [forms], [(0, p), (p, p + q * m)], 1, r, 0.5, 10**6, n)
    >>> ref = torch.linalg.solve(d.T @ d + 0.5 * torch.eye(p + q * m, dtype=torch.float64), r)
    >>> bool(torch.allclose(x, ref, rtol=1e-10, atol=1e-12))
    True
    """
    _check_shift(shift)
    got = gather_rows(chunks, last, temp_entries, n_samples)
    if got is None:
        return None
    j, a, form = got
    return SampleSide.factor(j, a, form, ranges, last, shift, r.dtype).solve(r)


@dataclass
class SampleSide:
    r"""The factors of the sample-side elimination, for solves with any right-hand side.

    :math:`Z` (``z``, ``[N Q, |C|]``) is in the dtype of the rows it was
    made from (``float32`` rows make the preconditioner of
    :mod:`~subriemann.engines.mixed`); everything else, and every solve, is
    in the working dtype.

    Examples
    --------
    The factors of :func:`sample_side_solve`'s example, kept for a second
    right-hand side:

    >>> import torch
    >>> from subriemann.engines.kspace import KronForm, SampleSide
    >>> _ = torch.manual_seed(0)
    >>> n, q, p, m = 6, 3, 5, 4
    >>> j, a = torch.randn(n, q, p, dtype=torch.float64), torch.randn(n, m, dtype=torch.float64)
    >>> d = torch.cat([j.reshape(n * q, p), torch.einsum("qc,ni->nqci", torch.eye(q,
    ...                dtype=torch.float64), a).reshape(n * q, q * m)], dim=1)
    >>> form = KronForm(a, torch.eye(q, dtype=torch.float64).expand(n, q, q), m, False)
    >>> fac = SampleSide.factor(j.clone(), a, form, [(0, p), (p, p + q * m)], 1, 0.5,
    ...                         torch.float64)
    >>> r = torch.randn(p + q * m, 1, dtype=torch.float64)
    >>> ref = torch.linalg.solve(d.T @ d + 0.5 * torch.eye(p + q * m, dtype=torch.float64), r)
    >>> bool(torch.allclose(fac.solve(r), ref, rtol=1e-10, atol=1e-12))
    True
    """

    chol_m: Tensor  # [N, N]: M = A A^T + mu 1 = L L^T
    z: Tensor  # [N Q, |C|]: Z = L^{-1} J, sample-major rows
    chol_s: Tensor  # [|C|, |C|]: S / mu = 1 + Z^T Z
    chol_a: Tensor  # [m', m']: A^T A + mu 1
    a: Tensor  # [N, m']
    form: KronForm
    ranges: list[tuple[int, int]]
    last: int
    shift: float

    @classmethod
    def factor(
        cls, j: Tensor, a: Tensor, form: KronForm, ranges: list[tuple[int, int]], last: int,
        shift: float, dtype: torch.dtype,
    ) -> SampleSide:
        r"""Factor from the rows ``j`` (``[N, Q, |C|]``, overwritten by :math:`Z`) and
        :math:`\tilde A` (``a``, ``[N, m']``); ``dtype`` is the working dtype."""
        n, q, n_c = j.shape
        a = a.to(dtype)
        m_mat = a @ a.T
        m_mat.diagonal().add_(shift)
        chol = _cholesky(m_mat, "A A^T + shift 1")  # [N, N]
        del m_mat
        z = j.view(n, q * n_c)
        torch.linalg.solve_triangular(chol.to(z.dtype), z, upper=False, out=z)  # J -> Z
        s = z.new_zeros(n_c, n_c)
        add_upper_gram(s, z.view(n * q, n_c))
        mirror_upper(s)
        s = s.to(dtype)
        s.diagonal().add_(1.0)
        gram_a = a.T @ a
        gram_a.diagonal().add_(shift)
        return cls(chol, z.view(n * q, n_c), _cholesky(s, "the Schur complement"),
                   _cholesky(gram_a, "A^T A + shift 1"), a, form, ranges, last, shift)

    def solve(self, r: Tensor) -> Tensor:
        r""":math:`(D^\top D + \mu 1)^{-1}r` for ``r`` of shape ``[K, b]`` (formulas of
        :func:`sample_side_solve`)."""
        n, nq, n_c = self.a.shape[0], self.z.shape[0], self.z.shape[1]
        q, b, z = nq // n, r.shape[1], self.z
        r_l = _output_rows(r, self.ranges, self.last, self.form)  # [c, m', b]
        y = torch.linalg.solve_triangular(
            self.chol_m, torch.einsum("nm,cmb->ncb", self.a, r_l).reshape(n, q * b), upper=False
        ).reshape(n * q, b)  # L^{-1} A r_{L,c}
        rhs_c = _other_rows(r, self.ranges, self.last) - (z.T @ y.to(z.dtype)).to(r.dtype)
        x_c = cholesky_solve(self.chol_s, rhs_c) / self.shift  # [|C|, b]
        zx = (z.view(n, q, n_c) @ x_c.to(z.dtype)).to(r.dtype)
        jx = (self.chol_m @ zx.view(n, q * b)).view(n, q, b)  # J_c x_C = L Z_c x_C
        w = r_l - torch.einsum("nm,ncb->cmb", self.a, jx)
        x_l = cholesky_solve(self.chol_a, w)  # [c, m', b]
        return _scatter_solution(r, self.ranges, self.last, x_c, x_l, self.form)
