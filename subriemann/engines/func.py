r"""How :math:`x[\theta]`, :math:`D = \partial x/\partial\theta` and its products are computed.

This module is the single *seam* behind :class:`~subriemann.ParameterSpace`:
every evaluation of the network, of :math:`D`, :math:`Dv`, :math:`D^\top u`
and of the empirical NTK :math:`DD^\top` goes through a
:class:`JacobianBackend`.  Two implementations exist:

* :class:`FuncBackend` (this module): generic, any ``torch.nn.Module``,
  built on :mod:`torch.func` (``functional_call``, ``vmap``, ``jacrev``,
  ``jvp``, ``vjp``), chunked over samples and parameter groups so memory
  stays bounded;
* :class:`~subriemann.engines.structured.StructuredBackend`: per-layer structured
  NTK for the common layers (``Linear``, convolutions, elementwise
  activations, ...), never forming :math:`D`.

:func:`~subriemann.engines.make_backend` chooses between them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from subriemann.engines.base import MEMORY_BUDGET, ParameterLayout, items_within
from subriemann.triangular import cholesky_solve
from subriemann.validation import check_int, check_optional

__all__ = ["FuncBackend"]

#: Errors of a :func:`~torch.func.vmap` that has no batching rule for an
#: operation, or whose rule cannot run the operation per sample (e.g. the
#: fused RNN kernels, ``prelu`` with a per-channel weight).
_VMAP_ERRORS = (RuntimeError, ValueError)


def _forward_ad_missing(err: BaseException) -> bool:
    """Whether ``err`` says that an operation has no forward-mode derivative."""
    return isinstance(err, NotImplementedError) and "forward AD" in str(err)


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
        Samples per chunk, a positive integer (``None``: all at once).

    Notes
    -----
    ``jacobian`` picks reverse mode (one vector-Jacobian product per output
    row, vectorised over samples) when :math:`Q \le K` and forward mode
    (one Jacobian-vector product per parameter) otherwise.  Samples are
    processed in chunks, and batched rows or tangents in blocks, small enough
    that one vectorised pass stays within ``memory_budget`` bytes (estimated
    from the entries of one sample's forward pass, :meth:`activation_entries`).  ``ntk``
    accumulates :math:`DD^\top = \sum_p D_p D_p^\top` over groups of
    parameter tensors :math:`p`, so the peak memory is that of the largest
    block :math:`D_p`, never of :math:`D`; a single tensor whose block exceeds
    ``ntk_block_entries`` is split into row blocks, each multiplied by
    :math:`D_p` in forward mode (see ``_ntk_one_tensor``).

    **Models torch.func cannot batch.** The routes above need a ``vmap``
    over samples and forward-mode AD.  When one of them fails for a model,
    the engine switches, once and for this model (recorded in
    ``unavailable``), to a route that is exact for anything
    :func:`torch.func.vjp` differentiates:

    * per-sample ``vmap`` fails (the fused ``LSTM``/``GRU``/``RNN`` kernels,
      ``PReLU``): the rows of :math:`D` come from one reverse pass over the
      whole chunk, one VJP per row with the basis covectors, in blocks of 256
      rows;
    * no forward-mode derivative (``MultiheadAttention``'s fused kernel,
      ``weight_norm``): :math:`Dv` is a double VJP, the VJP with cotangent
      :math:`v` of the linear map :math:`u \mapsto D^\top u` at
      :math:`u = 0` (three passes instead of one);
    * ``vmap`` over a batch of vectors fails: a loop over the vectors.

    These models are compared with a full-batch ``jacrev`` in the test zoo
    (``tests/engines/test_zoo.py``).  Models that *couple* samples are refused earlier,
    by :class:`~subriemann.ParameterSpace`.

    Reverse-mode products differentiate with respect to the *dictionary* of
    parameter tensors (views of :math:`\theta`) and concatenate the
    results, rather than with respect to the flat :math:`\theta`: the
    gradient through a slice of :math:`\theta` would scatter every block
    into a zero tensor of length :math:`K` (for :math:`D`, a zero
    ``[QN, K]`` tensor per parameter tensor).  Everything stays
    differentiable in :math:`\theta` (e.g. under :func:`torch.func.jacfwd`).
    """

    name = "func"
    #: ``jvp`` and ``vjp`` accept batches ``[..., K]`` / ``[..., QN]``.
    batched = True
    #: :meth:`param_gram` forms :math:`D` (no layer factors to work from).
    gram_from_factors = False
    #: Largest block :math:`D_p` (in entries) that ``ntk`` forms at once (and at
    #: most ``memory_budget`` bytes): :math:`2^{27}` float64 entries are 1 GiB.
    ntk_block_entries: int = 1 << 27
    #: Bytes that one vectorised pass of ``jacobian``, ``jvp`` or ``vjp`` may
    #: allocate; samples (and batched rows) are processed in chunks below it
    #: (:data:`~subriemann.engines.base.MEMORY_BUDGET` unless set).
    memory_budget: int = MEMORY_BUDGET

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
        chunk_size = check_optional(check_int, chunk_size, "chunk_size", low=1)
        self.chunk_size = n if chunk_size is None else min(chunk_size, n)
        #: routes found not to work for this model (set on first failure):
        #: ``"per_sample"`` (vmap over samples), ``"forward"`` (forward-mode AD),
        #: ``"vmap"`` (vmap over vectors)
        self.unavailable: set[str] = set()
        self._act: int | None = None

    # -- helpers ---------------------------------------------------------------
    def _chunks(self, per_sample: int = 0) -> list[Tensor]:
        """Sample chunks of ``chunk_size``, smaller if ``per_sample`` bytes exceed the budget."""
        size = items_within(self.memory_budget, per_sample, self.chunk_size)
        return list(torch.split(self.inputs, size))

    def activation_entries(self, theta: Tensor) -> int:
        """Entries of all tensors one sample's forward pass creates (measured once).

        Counted by a dispatch mode over one forward pass of the first sample:
        an upper bound of the per-sample memory of a JVP or a VJP, in entries.
        """
        if self._act is None:
            from torch.utils._python_dispatch import TorchDispatchMode

            total = [0]

            class _Count(TorchDispatchMode):
                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    out = func(*args, **(kwargs or {}))
                    for t in out if isinstance(out, (tuple, list)) else [out]:
                        if isinstance(t, Tensor):
                            total[0] += t.numel()
                    return out

            # sizes do not depend on values: a plain zero point (theta may be traced)
            zero = torch.zeros(theta.shape, dtype=theta.dtype, device=theta.device)
            try:
                with torch.no_grad(), _Count():
                    self._flat_apply(zero, self.inputs[:1])
            except Exception:  # noqa: BLE001  (a model that needs real values: no estimate)
                total[0] = 0
            self._act = max(total[0], self.num_outputs)
        return self._act

    def rows_per_pass(self, theta: Tensor) -> int:
        """How many batched JVP/VJP rows over all samples fit in ``memory_budget``."""
        item = theta.element_size()
        per_row = 3 * item * self.activation_entries(theta) * int(self.inputs.shape[0])
        return items_within(self.memory_budget, per_row, 1 << 62)

    def _flat_apply(self, theta: Tensor, inputs: Tensor) -> Tensor:
        return self.apply(self.layout.unflatten(theta), inputs).reshape(-1)

    def _split(
        self, theta: Tensor, names: Sequence[str] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(wrt, rest)``: the parameter views to differentiate and the others."""
        params = self.layout.unflatten(theta)
        if names is None:
            return params, {}
        keep = set(names)
        wrt = {n: p for n, p in params.items() if n in keep}
        rest = {n: p for n, p in params.items() if n not in keep}
        return wrt, rest

    @staticmethod
    def _cat(grads: dict[str, Tensor], names: Sequence[str], lead: int) -> Tensor:
        """Concatenate per-parameter blocks ``[*lead_dims, *shape]`` into ``[*lead_dims, k]``."""
        parts = [grads[n] for n in names]
        lead_shape = parts[0].shape[:lead]
        return torch.cat([g.reshape(*lead_shape, -1) for g in parts], dim=lead)

    def _map(self, fn: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
        """``stack([fn(b) for b in batch])``: one :func:`~torch.func.vmap`, or a loop
        when the model has an operation that ``vmap`` cannot batch."""
        if "vmap" not in self.unavailable:
            try:
                return vmap(fn)(batch)
            except _VMAP_ERRORS as err:
                if _forward_ad_missing(err):  # not a vmap problem (see jvp)
                    raise
                self.unavailable.add("vmap")
        return torch.stack([fn(b) for b in batch])

    # -- interface -------------------------------------------------------------
    def _pass_chunks(self, theta: Tensor) -> list[Tensor]:
        """Sample chunks whose pass (activations, kept for a backward: 3 copies) fits the budget."""
        return self._chunks(3 * theta.element_size() * self.activation_entries(theta))

    def _rows_within(self, theta: Tensor, rows: int, chunk: int, extra: int = 0) -> int:
        """Rows of a vectorised product per pass: each row's activations on a sample chunk of
        ``chunk`` samples (plus ``extra`` entries) within the budget."""
        per_row = theta.element_size() * (3 * self.activation_entries(theta) * chunk + extra)
        return items_within(self.memory_budget, per_row, rows)

    def outputs(self, theta: Tensor) -> Tensor:
        return torch.cat([self._flat_apply(theta, c) for c in self._pass_chunks(theta)])

    def jvp(self, theta: Tensor, tangent_vec: Tensor) -> Tensor:
        r""":math:`Dv`; ``tangent_vec`` of shape ``[K]`` or ``[..., K]`` (vectorised).

        Forward mode; for a model with an operation that has no forward-mode
        derivative (``MultiheadAttention``'s fused kernel, ``weight_norm``) it
        is the reverse-mode *double VJP*: :math:`u \mapsto D^\top u` is linear,
        and its VJP with cotangent :math:`v` is :math:`Dv`.
        """
        flat = tangent_vec.reshape(-1, tangent_vec.shape[-1])
        chunk = int(self._pass_chunks(theta)[0].shape[0])
        step = self._rows_within(theta, flat.shape[0], chunk)
        blocks = [self._jvp_rows(theta, flat[i : i + step]) for i in range(0, len(flat), step)]
        res = torch.cat(blocks)
        return res.reshape(*tangent_vec.shape[:-1], res.shape[-1])

    def _jvp_rows(self, theta: Tensor, flat: Tensor) -> Tensor:
        """:math:`Dv` for the rows of ``flat`` ``[b, K]``: forward mode, else the double VJP."""
        if "forward" not in self.unavailable:
            try:
                return self._jvp_forward(theta, flat)
            except NotImplementedError as err:
                if not _forward_ad_missing(err):
                    raise
                self.unavailable.add("forward")
        return self._jvp_reverse(theta, flat)

    def _jvp_forward(self, theta: Tensor, flat: Tensor) -> Tensor:
        def one(v: Tensor) -> Tensor:
            out = [
                jvp(lambda t, c=c: self._flat_apply(t, c), (theta,), (v,))[1]
                for c in self._pass_chunks(theta)
            ]
            return torch.cat(out)

        return one(flat[0]).unsqueeze(0) if flat.shape[0] == 1 else self._map(one, flat)

    def _jvp_reverse(self, theta: Tensor, flat: Tensor) -> Tensor:
        """:math:`Dv` for the rows ``v`` of ``flat`` by two reverse passes (double VJP)."""
        names = self.layout.names
        wrt, _ = self._split(theta)
        out = []
        for c in self._pass_chunks(theta):
            pull = vjp(lambda w, c=c: self.apply(w, c).reshape(-1), wrt)[1]
            u0 = flat.new_zeros(c.shape[0] * self.num_outputs)
            push = vjp(lambda u, pull=pull: self._cat(pull(u)[0], names, 0), u0)[1]
            one = lambda v, push=push: push(v)[0]  # noqa: E731
            out.append(one(flat[0]).unsqueeze(0) if flat.shape[0] == 1 else self._map(one, flat))
        return torch.cat(out, dim=1)

    def vjp(self, theta: Tensor, output_covec: Tensor) -> Tensor:
        r""":math:`D^\top u`; ``output_covec`` of shape ``[QN]`` or ``[..., QN]`` (vectorised)."""
        return self.pullback(theta, lambda x: output_covec)[1]

    def pullback(
        self, theta: Tensor, covec_fn: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        r"""``(x, D^T covec_fn(x))`` with as few forward passes as possible.

        With one chunk the forward pass that gives :math:`x` is reused for the
        vector-Jacobian product (this is what ``cost_grad`` needs:
        ``covec_fn`` maps :math:`x` to :math:`\nabla_x C`).  With several
        chunks the outputs are computed first and each chunk is evaluated
        again for its VJP, so that memory stays bounded.

        Parameters
        ----------
        theta : Tensor, shape=[K]
        covec_fn : callable
            Maps the outputs ``x`` (shape ``[QN]``) to covectors ``[QN]`` or
            ``[..., QN]``.

        Returns
        -------
        x : Tensor, shape=[QN]
        pulled : Tensor, shape=[K] or [..., K]
        """
        names = self.layout.names
        chunks = self._pass_chunks(theta)
        wrt, _ = self._split(theta)
        # rows of a vectorised VJP per pass: a row's gradient (K) and backward activations
        step = self._rows_within(theta, 1 << 62, int(chunks[0].shape[0]), int(theta.shape[0]))

        def pull(fn: Callable, u: Tensor) -> Tensor:
            if u.ndim == 1:
                return self._cat(fn(u)[0], names, 0)
            flat = u.reshape(-1, u.shape[-1])
            one = lambda r: self._cat(fn(r)[0], names, 0)  # noqa: E731
            g = torch.cat([self._map(one, flat[i : i + step]) for i in range(0, len(flat), step)])
            return g.reshape(*u.shape[:-1], g.shape[-1])

        if len(chunks) == 1:
            x, fn = vjp(lambda w: self.apply(w, chunks[0]).reshape(-1), wrt)[:2]
            return x, pull(fn, covec_fn(x).to(x.dtype))
        x = self.outputs(theta)
        u = covec_fn(x).to(x.dtype)
        res: Tensor | None = None
        start = 0
        for c in chunks:
            n = c.shape[0] * self.num_outputs
            fn = vjp(lambda w, c=c: self.apply(w, c).reshape(-1), wrt)[1]
            g = pull(fn, u[..., start : start + n])
            res = g if res is None else res + g
            start += n
        assert res is not None
        return x, res

    def _jacobian_reverse(
        self, theta: Tensor, names: Sequence[str] | None = None, inputs: Tensor | None = None
    ) -> Tensor:
        """Rows of D (columns of the parameters ``names``) by reverse mode.

        Vectorised over samples (outer :func:`~torch.func.vmap`) and over the
        Q outputs of a sample (inner ``vmap`` over the identity).  When the
        model cannot be batched per sample (``vmap`` raises: the fused
        ``LSTM``/``GRU`` kernels, ``PReLU``), the rows come from the whole
        chunk instead (:meth:`_jacobian_rows_batch`).  ``inputs``: the rows of
        these samples only (default: all, in chunks of ``chunk_size`` samples,
        fewer where a chunk's rows would exceed ``memory_budget``).
        """
        chunks = self._reverse_chunks(theta, names, inputs)
        rows = self._rows_per_sample(theta, names, chunks)
        if rows is not None:
            return rows
        blocks = [self._jacobian_rows_batch(theta, names, c) for c in chunks]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def _reverse_chunks(
        self, theta: Tensor, names: Sequence[str] | None, inputs: Tensor | None
    ) -> list[Tensor]:
        """``[inputs]``, or all samples in chunks whose per-sample rows fit ``memory_budget``."""
        if inputs is not None:
            return [inputs]
        # per sample: its Q rows (and their gradients) and Q backward passes' activations
        keep = self.layout.names if names is None else set(names)
        k = sum(m for n, m in zip(self.layout.names, self.layout.numels) if n in keep)
        per = 3 * theta.element_size() * self.num_outputs * (k + self.activation_entries(theta))
        return self._chunks(per)

    def _rows_per_sample(
        self, theta: Tensor, names: Sequence[str] | None, chunks: list[Tensor]
    ) -> Tensor | None:
        """Rows of D by per-sample ``vmap`` over ``chunks``; None where ``vmap`` cannot batch."""
        if "per_sample" in self.unavailable:
            return None
        try:
            blocks = [self._jacobian_rows_per_sample(theta, names, c) for c in chunks]
        except _VMAP_ERRORS:
            self.unavailable.add("per_sample")
            return None
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    def _jacobian_rows_per_sample(
        self, theta: Tensor, names: Sequence[str] | None, inputs: Tensor
    ) -> Tensor:
        q = self.num_outputs
        wrt, rest = self._split(theta, names)
        order = list(wrt)

        def row_block(w: dict[str, Tensor], x: Tensor) -> Tensor:
            def single(ww: dict[str, Tensor]) -> Tensor:
                return self.apply({**rest, **ww}, x.unsqueeze(0)).reshape(-1)

            fn = vjp(single, w)[1]
            eye = torch.eye(q, dtype=theta.dtype, device=theta.device)
            return self._cat(vmap(fn)(eye)[0], order, 1)  # [Q, k]

        j = vmap(row_block, in_dims=(None, 0))(wrt, inputs)  # [n, Q, k]
        return j.reshape(-1, j.shape[-1])

    def _jacobian_rows_batch(
        self, theta: Tensor, names: Sequence[str] | None, inputs: Tensor
    ) -> Tensor:
        """Rows of D for ``inputs`` from one reverse pass over the whole batch.

        One forward pass, then one VJP per output row with the basis covectors
        (vectorised, in blocks of at most 256 rows, fewer where one block's
        gradients and backward activations would exceed ``memory_budget``).
        Exact for any model that :func:`torch.func.vjp` differentiates; the
        samples are never split.
        """
        wrt, rest = self._split(theta, names)
        order = list(wrt)
        fn = vjp(lambda w: self.apply({**rest, **w}, inputs).reshape(-1), wrt)[1]
        rows = inputs.shape[0] * self.num_outputs
        k = sum(p.numel() for p in wrt.values())
        per_row = 3 * theta.element_size() * (k + inputs.shape[0] * self.activation_entries(theta))
        block = items_within(self.memory_budget, per_row, 256)
        eye = torch.eye(rows, dtype=theta.dtype, device=theta.device)
        one = lambda e: self._cat(fn(e)[0], order, 0)  # noqa: E731
        return torch.cat([self._map(one, eye[a : a + block]) for a in range(0, rows, block)])

    def _jacobian_forward(self, theta: Tensor) -> Tensor:
        """Columns of D by forward mode (:meth:`jvp`), 256 basis vectors per pass."""
        k = theta.shape[0]
        qn = int(self.inputs.shape[0]) * self.num_outputs
        col_bytes = 3 * qn * theta.element_size()  # one tangent's outputs and their copies
        eye_chunk = min(items_within(self.memory_budget, col_bytes, 256), self.rows_per_pass(theta))
        cols = []
        for a in range(0, k, eye_chunk):
            b = min(k, a + eye_chunk)
            basis = torch.zeros(b - a, k, dtype=theta.dtype, device=theta.device)
            basis[torch.arange(b - a), torch.arange(a, b)] = 1.0
            cols.append(self.jvp(theta, basis).T)
        return torch.cat(cols, dim=1)

    def jacobian(self, theta: Tensor) -> Tensor:
        r"""Dense :math:`D`, ``[QN, K]``: reverse mode per sample when :math:`Q \le K`.

        Per sample, reverse mode costs :math:`Q` backward passes and forward
        mode :math:`K` tangents, whatever :math:`N`; samples are processed in
        chunks within ``memory_budget``.  For a model that cannot be batched
        per sample (``"per_sample"`` in ``unavailable``) reverse mode costs
        :math:`QN` passes over the batch, so it is chosen when :math:`QN \le K`.
        """
        k = theta.shape[0]
        if self.num_outputs <= k:
            rows = self._rows_per_sample(theta, None, self._reverse_chunks(theta, None, None))
            if rows is not None:
                return rows
        # no per-sample vmap: reverse rows cost QN passes over the batch, forward K
        qn = int(self.inputs.shape[0]) * self.num_outputs
        return self._jacobian_reverse(theta) if qn <= k else self._jacobian_forward(theta)

    def _block_entries(self, theta: Tensor) -> int:
        """Largest block of :math:`D` that ``ntk`` forms: ``ntk_block_entries``, within budget."""
        return min(self.ntk_block_entries, self.memory_budget // theta.element_size())

    @property
    def fallback(self) -> FuncBackend:
        """This engine is the generic one: itself."""
        return self

    def param_gram(self, theta: Tensor) -> Tensor:
        r""":math:`D^\top D`, ``[K, K]``, from the dense :math:`D` (formed within the budget)."""
        d = self.jacobian(theta)
        return d.T @ d

    def solve_param_gram(self, theta: Tensor, rhs: Tensor, shift: float) -> Tensor:
        r""":math:`(D^\top D + \mu 1)^{-1}r` by a Cholesky factorization (:math:`\mu > 0`)."""
        a = self.param_gram(theta)
        a.diagonal().add_(float(shift))
        chol = torch.linalg.cholesky(a)
        return cholesky_solve(chol, rhs.to(a.dtype))

    def ntk(self, theta: Tensor) -> Tensor:
        qn = self.inputs.shape[0] * self.num_outputs
        if qn > theta.shape[0]:
            d = self.jacobian(theta)
            return d @ d.T
        # Group parameter tensors into blocks of bounded size (entries and bytes).
        budget = max(1, self._block_entries(theta) // max(qn, 1))  # parameters per block
        groups: list[list[str]] = []
        size = 0
        for name, n in zip(self.layout.names, self.layout.numels):
            if groups and groups[-1] and size + n <= budget:
                groups[-1].append(name)
                size += n
            else:
                groups.append([name])
                size = n
        if len(groups) == 1:
            d = self._jacobian_reverse(theta)
            return d @ d.T
        gram = torch.zeros(qn, qn, dtype=theta.dtype, device=theta.device)
        for g in groups:
            numel = self.layout.numels[self.layout.names.index(g[0])]
            if len(g) == 1 and numel > budget:  # one tensor larger than the budget
                gram = gram + self._ntk_one_tensor(theta, g[0])
                continue
            dp = self._jacobian_reverse(theta, names=g)
            gram = gram + dp @ dp.T
        return gram

    def _ntk_one_tensor(self, theta: Tensor, name: str) -> Tensor:
        r""":math:`D_pD_p^\top` for one tensor :math:`p` whose block :math:`D_p` exceeds the budget.

        Rows of :math:`D_p` are formed by reverse mode for a few samples at a
        time (at most ``ntk_block_entries`` entries); each row block
        :math:`R` then gives the columns :math:`D_pR^\top` of the Gram matrix
        by forward mode (one JVP per row, vectorised; the tangent lives on
        :math:`p` only).  Peak memory: one row block plus the JVPs'
        activations; cost: one reverse pass per row plus one forward pass per
        row, instead of the :math:`QN\times|p|` block.
        """
        q = self.num_outputs
        n_total = int(self.inputs.shape[0])
        qn = n_total * q
        numel = self.layout.numels[self.layout.names.index(name)]
        per = items_within(self._block_entries(theta), numel * q, n_total)  # samples per block
        params = self.layout.unflatten(theta)
        w = params[name]
        rest = {n: p for n, p in params.items() if n != name}
        gram = torch.empty(qn, qn, dtype=theta.dtype, device=theta.device)

        def f_all(wp: Tensor) -> Tensor:
            outs = [self.apply({**rest, name: wp}, c).reshape(-1) for c in self._pass_chunks(theta)]
            return torch.cat(outs)

        sl = self.layout.slices()[self.layout.names.index(name)]
        for a in range(0, n_total, per):
            b = min(n_total, a + per)
            r = self._jacobian_reverse(theta, [name], self.inputs[a:b])  # [rows, numel]
            gram[:, a * q : b * q] = self._rows_times_d(theta, sl, r, w, f_all).T
        return gram

    def _rows_times_d(
        self, theta: Tensor, sl: slice, r: Tensor, w: Tensor, f_all: Callable[[Tensor], Tensor]
    ) -> Tensor:
        r""":math:`R D_p^\top`, shape ``[rows, QN]``: one JVP on :math:`p` per row of ``r``.

        Forward mode on the tensor :math:`p` alone; without forward-mode AD,
        :meth:`jvp` (double VJP) on tangents that vanish outside :math:`p`.
        """
        if "forward" not in self.unavailable:
            try:
                v = r.reshape(r.shape[0], *w.shape)
                return self._map(lambda t: jvp(f_all, (w,), (t,))[1], v)
            except NotImplementedError as err:
                if not _forward_ad_missing(err):
                    raise
                self.unavailable.add("forward")
        full = r.new_zeros(r.shape[0], theta.shape[0])
        full[:, sl] = r
        return self.jvp(theta, full)
