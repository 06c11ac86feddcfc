r"""The parameter space :math:`\mathbb{R}^K` of a network on its training set.

docs/theory.md §1: a network :math:`f(\cdot, \theta)` with :math:`K` parameters is
evaluated on :math:`N` inputs; stacking its :math:`Q` outputs per sample
gives :math:`x[\theta] \in \mathbb{R}^{QN}` (sample-major), with Jacobian
:math:`D = \partial x / \partial\theta` of shape ``[QN, K]`` and a cost
:math:`C(x)`.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from subriemann._geomstats import import_geomstats
from subriemann._warnings import one_line
from subriemann.engines import JacobianBackend, ParameterLayout, make_backend
from subriemann.linalg import PointState
from subriemann.losses import Loss, get_loss
from subriemann.metrics import EuclideanMetric
from subriemann.space.coupling import (
    check_rows,
    check_sample_independence,
    sample_rows,
)
from subriemann.validation import check_tensor
from subriemann.vectorization import map_points

import_geomstats()
from geomstats.geometry.base import VectorSpace  # noqa: E402

__all__ = ["ParameterSpace", "NonFiniteError"]
_RANDOM_IN_TRAINING = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
    torch.nn.RReLU,
)


def _train_mode_differs(m: torch.nn.Module) -> bool:
    """Whether ``m`` (in train mode) computes something else than in eval mode.

    Dropout and ``RReLU`` are random in train mode; a normalization layer
    with running statistics (``BatchNorm``, ``InstanceNorm`` with
    ``track_running_stats=True``, their lazy and sync variants) uses batch
    or instance statistics in train mode and the running ones in eval mode;
    ``MultiheadAttention`` and multi-layer RNNs apply their own dropout.
    """
    if not m.training:
        return False
    if isinstance(m, _RANDOM_IN_TRAINING):
        return True
    if isinstance(m, torch.nn.MultiheadAttention | torch.nn.RNNBase):
        return float(m.dropout) > 0
    # the normalization layers with running statistics (batch, instance; lazy, sync)
    return bool(getattr(m, "track_running_stats", False))



class NonFiniteError(ValueError):
    """Raised when the network's outputs or the cost are NaN or infinite."""


class _ModelOutputError(ValueError):
    """The model ran but did not return a ``[n, Q]`` tensor for ``n`` inputs."""


def output_matrix(out: Any, num_inputs: int) -> Tensor:
    """A model's output on a batch as the matrix of its rows, ``shape=[num_inputs, Q]``.

    A vector output (``shape=[num_inputs]``) is one output per sample (Q = 1).  Anything
    else, or a non-tensor, raises a ``ValueError`` that names the shape it got.
    """
    if not isinstance(out, Tensor):
        raise _ModelOutputError(f"model must return a Tensor, got {type(out).__name__}")
    if out.ndim == 1:
        out = out.unsqueeze(1)
    if out.ndim != 2 or out.shape[0] != num_inputs:
        raise _ModelOutputError(
            f"model output must have shape (n, Q) for inputs of shape (n, ...); got "
            f"{tuple(out.shape)} for {num_inputs} inputs"
        )
    return out


class ParameterSpace(VectorSpace):
    r"""Parameter space :math:`\mathbb{R}^K` of ``model`` on a training set.

    A geomstats vector space (``point_ndim == 1``, ``shape == (K,)``),
    equipped by default with the Euclidean metric.  Equip another metric
    the geomstats way::

        space.equip_with_metric(sr.metrics.InterpolatedMetric, lam=0.5)

    Parameters
    ----------
    model : torch.nn.Module
        Any module mapping inputs of shape ``[n, ...]`` to outputs
        ``[n, Q]`` (or ``[n]`` when ``Q = 1``).  It is copied, converted to
        ``dtype`` and put in eval mode; the user's module is never mutated.
    inputs : Tensor, shape=[N, ...]
        Training inputs :math:`x^{(0)}_j`.
    targets : Tensor, shape=[N, Q]
        Labels :math:`y_j`: real values for MSE, probability vectors for
        cross-entropy.  A 1-D tensor is read as ``[N, 1]``.  They are
        validated in their own precision by ``loss.check_targets``, then
        converted to ``dtype`` and passed through ``loss.prepare_targets``
        (for cross-entropy: rows renormalized to sum to 1 exactly).
    loss : str or Loss
        ``"mse"`` (:math:`\tfrac12|x-y|^2`, summed), ``"cross_entropy"`` or
        a :class:`~subriemann.losses.Loss`.
    dtype : torch.dtype
        float64 (default) or float32.
    device : str or torch.device, optional
    chunk_size : int, optional
        Samples per chunk when evaluating the network and its derivatives
        (a positive integer); bounds memory for large N.
    backend : {"auto", "func", "structured"}
        Engine for :math:`D` and the NTK (see :mod:`subriemann.engines.func`).

    Raises
    ------
    TypeError
        A wrong type: a model that is not a module, non-tensor, complex
        inputs or targets, a dtype other than float32/float64.
    ValueError
        Inconsistent shapes, NaN or inf in the data or the outputs, a
        ``chunk_size`` that is not a positive integer, or a model that couples
        samples (below).

    Notes
    -----
    **Parameter order.** :math:`\theta` concatenates the trainable tensors of
    ``model.named_parameters()`` (those with ``requires_grad=True``) in that
    order, each flattened row-major.  Buffers and frozen parameters are held
    fixed.

    **Samples must be independent.** :math:`x[\theta]` stacks per-sample
    outputs :math:`f(x^{(0)}_j, \theta)` (docs/theory.md §1), and the engines
    use it: :math:`D` is formed per sample, the data is cut into chunks.  A
    model whose output for one sample depends on the others
    (``x - x.mean(0)``, a softmax over dimension 0,
    ``MultiheadAttention(batch_first=False)`` on ``[N, ...]`` inputs,
    ``BatchNorm`` without running statistics) has no such :math:`f`, and its
    outputs change with the chunking.  It is **refused**: at construction three
    samples (first, middle, last) are evaluated together and one at a time,
    and their rows of the engine's whole-batch outputs are compared with the
    latter; a difference above :math:`\sqrt{\varepsilon}\,(1+\max|x|)`
    (:math:`\varepsilon = 2^{-10}` for float32 on a GPU that may use TF32)
    raises a one-line :class:`ValueError` that names the first module whose
    outputs differ (or that fails on a single sample).  Round-off between a
    batched and a per-sample evaluation is :math:`\lesssim 10^{-13}` relative
    in float64 (:math:`10^{-5}` in float32), far below the tolerance, while
    a coupling changes outputs by O(1).  The check costs a few forward passes
    on at most three samples, once; the same samples are also evaluated twice,
    and a model whose outputs are random is refused as well.

    **What the generic engine differentiates.** Anything
    :func:`torch.func.vjp` can: when per-sample ``vmap`` fails (the fused
    ``LSTM``/``GRU``/``RNN`` kernels, ``PReLU``) :math:`D` comes from
    reverse mode on whole chunks; when an operation has no forward-mode
    derivative (``MultiheadAttention``, ``weight_norm``) :math:`Dv` is a
    double VJP (see :class:`~subriemann.engines.func.FuncBackend`).

    **Train-mode layers.** Dropout, ``RReLU``, layers with running statistics
    (``BatchNorm``, ``InstanceNorm`` with ``track_running_stats=True``) and the
    dropout of ``MultiheadAttention`` and multi-layer RNNs behave differently
    in train mode (random, or batch statistics).  The internal copy is always
    put in eval mode; if the user's module had such a layer in train mode a
    :class:`UserWarning` names it.

    Examples
    --------
    >>> import torch, subriemann as sr
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> X, Y = torch.randn(5, 2), torch.randn(5, 1)
    >>> space = sr.ParameterSpace(model, X, Y)
    >>> space.dim, space.output_dim, space.num_samples, space.num_outputs
    (33, 5, 5, 1)
    >>> theta = space.initial_point()
    >>> space.jacobian(theta).shape
    torch.Size([5, 33])
    """

    #: how many :class:`~subriemann.linalg.PointState` objects :meth:`point_state`
    #: keeps (:meth:`state_cache` raises it for a while, e.g. for a batch of flows)
    _state_cache_size: int = 3

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: Tensor,
        targets: Tensor,
        loss: str | Loss = "mse",
        *,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = None,
        chunk_size: int | None = None,
        backend: str = "auto",
        equip: bool = True,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if dtype not in (torch.float64, torch.float32):
            raise TypeError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
        check_tensor(inputs, "inputs")
        check_tensor(targets, "targets")
        check_tensor(inputs, "inputs", real=True)
        check_tensor(targets, "targets", real=True)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.loss = get_loss(loss)
        self.inputs, self.targets = _prepare_data(inputs, targets, self.loss, dtype, self.device)
        _warn_train_mode(model)
        # the user's floating dtypes, restored by to_model
        self._user_dtypes = {
            n: t.dtype
            for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_floating_point()
        }
        self.module = _eval_copy(model, dtype, self.device)
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters (requires_grad=True)")
        self.layout = ParameterLayout([n for n, _ in named], [p.shape for _, p in named])
        self._fixed: dict[str, Tensor] = {
            n: p.detach() for n, p in self.module.named_parameters() if not p.requires_grad
        }
        self._fixed.update(dict(self.module.named_buffers()))
        self._theta0 = self.layout.flatten({n: p.detach() for n, p in named})  # a copy
        self._num_samples = int(self.inputs.shape[0])
        self._num_outputs = self._probe_num_outputs()
        self.y = self.targets.reshape(-1)
        self.backend_kind = backend
        self.chunk_size = chunk_size
        self.backend: JacobianBackend = self._checked_backend(backend, chunk_size)
        super().__init__(shape=(self.layout.dim,), dim=self.layout.dim, equip=equip)

    def _probe_num_outputs(self) -> int:
        """Q, from the model's outputs on (at most) two samples.

        With two samples a model that reduces over the batch dimension is
        caught here; the targets must have as many columns.
        """
        with torch.no_grad():
            try:
                probe = self._apply(self.layout.unflatten(self._theta0), self.inputs[:2])
            except _ModelOutputError as err:
                raise ValueError(str(err)) from None
            except Exception as err:  # the model cannot run on these inputs
                raise ValueError(
                    "model cannot be evaluated on inputs of shape "
                    f"{tuple(self.inputs.shape)}: {err}"
                ) from err
        if not torch.isfinite(probe).all():
            raise NonFiniteError(
                "model outputs contain NaN or inf at the model's current parameters"
            )
        q = int(probe.shape[1])
        if q != self.targets.shape[1]:
            raise ValueError(
                f"model has {q} outputs per sample but targets have {self.targets.shape[1]} "
                "columns"
            )
        return q

    def _checked_backend(self, kind: str, chunk_size: int | None) -> JacobianBackend:
        """The engine, once the model is known to treat its samples independently.

        The samples of :func:`~subriemann.space.coupling.sample_rows` are
        evaluated one at a time and compared with their rows of the engine's
        (chunked) whole-batch outputs (see the class notes).
        """
        params0 = self.layout.unflatten(self._theta0)
        singles = check_sample_independence(self.module, self._apply, params0, self.inputs)
        backend = make_backend(kind, self.module, self._apply, self.layout, self.inputs,
                               self._num_outputs, chunk_size)
        with torch.no_grad():
            x0 = backend.outputs(self._theta0)
        if not torch.isfinite(x0).all():
            raise NonFiniteError(
                "model outputs contain NaN or inf at the model's current parameters "
                f"({int((~torch.isfinite(x0)).sum())} of {x0.numel()} entries)"
            )
        if singles is not None:
            rows = sample_rows(self._num_samples)
            batch = x0.view(self._num_samples, self._num_outputs)[rows]
            check_rows(self.module, self._apply, params0, self.inputs[rows], batch, singles,
                       "in the whole batch")
        return backend

    # -- geomstats --------------------------------------------------------------
    @staticmethod
    def default_metric():
        """Euclidean metric: ordinary gradient flow."""
        return EuclideanMetric

    def _create_basis(self) -> Tensor:
        return torch.eye(self.dim, dtype=self.dtype, device=self.device)

    def random_point(self, n_samples: int = 1, bound: float = 1.0) -> Tensor:
        """Uniform points in :math:`[-b, b]^K`, shape ``[n_samples, K]`` (or ``[K]``)."""
        u = torch.rand(n_samples, self.dim, dtype=self.dtype, device=self.device)
        pts = bound * (2 * u - 1)
        return pts[0] if n_samples == 1 else pts

    # -- sizes ------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """N, the number of training inputs."""
        return self._num_samples

    @property
    def num_outputs(self) -> int:
        """Q, the number of outputs per sample."""
        return self._num_outputs

    @property
    def output_dim(self) -> int:
        """QN, the dimension of output space."""
        return self._num_samples * self._num_outputs

    @property
    def overparametrized(self) -> bool:
        r""":math:`K \ge QN`."""
        return self.dim >= self.output_dim

    # -- evaluation -------------------------------------------------------------
    def _apply(self, params: dict[str, Tensor], inputs: Tensor) -> Tensor:
        out = functional_call(self.module, {**self._fixed, **params}, (inputs,))
        return output_matrix(out, inputs.shape[0])

    def check_point(self, theta: Any) -> Tensor:
        r"""Validate a point :math:`\theta` (shape ``[K]``, the space's dtype) and return it.

        Raises
        ------
        TypeError
            Not a tensor, or not of the space's dtype.
        ValueError
            Not of shape ``[K]``.
        """
        theta = check_tensor(theta, "theta", dtype=self.dtype, shape=(self.dim,))
        if theta.device != self.device:
            theta = theta.to(self.device)
        return theta

    def _check_vec(self, vec: Any, size: int, what: str) -> Tensor:
        vec = check_tensor(vec, what, shape=(..., size))
        return vec.to(dtype=self.dtype, device=self.device)

    def check_tangent(self, tangent_vec: Any, what: str = "tangent_vec") -> Tensor:
        r"""Validate a (co)tangent vector, shape ``[..., K]``, and return it in the space's dtype.

        Raises
        ------
        TypeError
            Not a tensor.
        ValueError
            Its last dimension is not :math:`K`; the message names ``what``.
        """
        return self._check_vec(tangent_vec, self.dim, what)

    def check_output_vec(self, output_vec: Any, what: str = "output_covec") -> Tensor:
        r"""Validate an output-space (co)vector, shape ``[..., QN]``, in the space's dtype.

        Raises
        ------
        TypeError
            Not a tensor.
        ValueError
            Its last dimension is not :math:`QN`; the message names ``what``.
        """
        return self._check_vec(output_vec, self.output_dim, what)

    def initial_point(self) -> Tensor:
        r"""The model's parameters as :math:`\theta`, shape ``[K]`` (a copy)."""
        return self._theta0.clone()

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Name → tensor views of ``theta`` (see the parameter order above)."""
        return self.layout.unflatten(self.check_point(theta))

    def outputs(self, theta: Tensor) -> Tensor:
        r""":math:`x[\theta]`, shape ``[QN]``, sample-major.

        Raises
        ------
        NonFiniteError
            If the outputs contain NaN or inf.
        """
        return self.check_finite(self.backend.outputs(self.check_point(theta)))

    @staticmethod
    def check_finite(x: Tensor, what: str = "model outputs") -> Tensor:
        """``x``, or :class:`NonFiniteError` when it holds NaN or inf (``what`` names it)."""
        if not torch.isfinite(x).all():
            raise NonFiniteError(f"{what} contain NaN or inf at this theta")
        return x

    @staticmethod
    def finite_outputs(x: Tensor) -> Tensor:
        """``x`` (model outputs), or :class:`NonFiniteError` when it holds NaN or inf."""
        return ParameterSpace.check_finite(x)

    def jacobian(self, theta: Tensor) -> Tensor:
        r""":math:`D[\theta] = \partial x / \partial\theta`, shape ``[QN, K]`` (dense).

        Raises
        ------
        NonFiniteError
            If :math:`D` contains NaN or inf (e.g. at a NaN :math:`\theta`).
        """
        return self.check_finite(self.backend.jacobian(self.check_point(theta)), "Jacobian D")

    def jvp(self, theta: Tensor, tangent_vec: Tensor) -> Tensor:
        r""":math:`D v`, shape ``[..., QN]``, without forming :math:`D`.

        Parameters
        ----------
        theta : Tensor, shape=[K]
        tangent_vec : Tensor, shape=[..., K]
        """
        theta = self.check_point(theta)
        return self._product(self.backend.jvp, theta, self.check_tangent(tangent_vec),
                             self.output_dim)

    def vjp(self, theta: Tensor, output_covec: Tensor) -> Tensor:
        r""":math:`D^\top u`, shape ``[..., K]``, without forming :math:`D`.

        Parameters
        ----------
        theta : Tensor, shape=[K]
        output_covec : Tensor, shape=[..., QN]
        """
        theta = self.check_point(theta)
        return self._product(self.backend.vjp, theta, self.check_output_vec(output_covec),
                             self.dim)

    def _product(self, fn: Callable[[Tensor, Tensor], Tensor], theta: Tensor, vec: Tensor,
                 out_dim: int) -> Tensor:
        """``fn(theta, vec)`` for vectors ``[..., n]``: batched, or one vector at a time."""
        if vec.numel() == 0:
            return vec.new_zeros(*vec.shape[:-1], out_dim)
        if self.backend.batched:
            return fn(theta, vec)
        return map_points(fn, theta, vec)

    def ntk(self, theta: Tensor) -> Tensor:
        r"""Empirical NTK :math:`DD^\top`, shape ``[QN, QN]``.

        Raises
        ------
        NonFiniteError
            If it contains NaN or inf (e.g. at a NaN :math:`\theta`).
        """
        return self.check_finite(self.backend.ntk(self.check_point(theta)), "NTK")

    # -- cost -------------------------------------------------------------------
    def _as_samples(self, x: Tensor) -> Tensor:
        return x.reshape(self._num_samples, self._num_outputs)

    def output_cost(self, x: Tensor) -> Tensor:
        """:math:`C(x)` for outputs ``x`` of shape ``[QN]``."""
        return self.loss.value(self._as_samples(x), self.targets)

    def output_grad(self, x: Tensor) -> Tensor:
        r""":math:`\nabla_x C` for outputs ``x`` of shape ``[QN]``."""
        return self.loss.grad(self._as_samples(x), self.targets).reshape(-1)

    def output_hvp(self, x: Tensor, v: Tensor) -> Tensor:
        r""":math:`\nabla_x^2 C\, v` for outputs ``x`` and ``v`` of shape ``[QN]``."""
        return self.loss.hvp(self._as_samples(x), self.targets, self._as_samples(v)).reshape(-1)

    def cost(self, theta: Tensor) -> Tensor:
        r""":math:`C(x[\theta])`, a scalar tensor."""
        c = self.output_cost(self.outputs(theta))
        if not torch.isfinite(c):
            raise NonFiniteError("cost is NaN or inf at this theta")
        return c

    def output_cost_grad(self, theta: Tensor) -> Tensor:
        r""":math:`\nabla_x C` at :math:`x[\theta]`, shape ``[QN]``."""
        return self.output_grad(self.outputs(theta))

    def cost_grad(self, theta: Tensor) -> Tensor:
        r""":math:`\nabla_\theta C = D^\top \nabla_x C`, shape ``[K]`` (one VJP).

        The engine's ``pullback`` reuses the forward pass that gives
        :math:`x[\theta]` for the VJP when the data is one chunk.

        Raises
        ------
        NonFiniteError
            If the outputs contain NaN or inf.
        """
        theta = self.check_point(theta)
        return self.backend.pullback(theta, lambda x: self.output_grad(self.check_finite(x)))[1]

    # -- per-point cache -------------------------------------------------------------
    def point_state(self, theta: Tensor) -> PointState:
        r"""The :class:`~subriemann.linalg.PointState` at :math:`\theta` (the last 3 are cached).

        The metric, the rank monitor and the flow's events share it, so that
        :math:`D` (or the NTK) and its factorization are computed once per point.
        A state is found by the values of ``theta``; the tensor it was last
        found with is remembered, and serves again without a comparison while
        it is unchanged (same storage, same version counter: any in-place
        operation moves the counter).
        """
        theta = self.check_point(theta)
        if theta.requires_grad:
            return PointState(self, theta)
        cache = self.__dict__.setdefault("_states", [])
        seen = self.__dict__.setdefault("_state_seen", weakref.WeakKeyDictionary())
        tag = _tensor_tag(theta)
        for st in cache:
            old = seen.get(st)
            if tag is not None and old is not None and old[0]() is theta and old[1:] == tag[1:]:
                return st  # the very tensor this state was found with, not modified since
            if st.theta is theta or _same_values(st.theta, theta):
                break
        else:
            st = PointState(self, theta.detach().clone())
            cache.insert(0, st)
            del cache[self._state_cache_size :]
        if tag is not None:
            seen[st] = tag
        return st

    @contextlib.contextmanager
    def state_cache(self, size: int) -> Iterator[None]:
        """Keep at least ``size`` point states while inside (e.g. one per flow of a batch).

        On exit the cache is cut back to its size before.
        """
        saved = self._state_cache_size
        self._state_cache_size = max(saved, int(size))
        try:
            yield
        finally:
            self._state_cache_size = saved
            del self.__dict__.setdefault("_states", [])[saved:]

    @property
    def fixed_tensors(self) -> dict[str, Tensor]:
        """The tensors held fixed: buffers and frozen parameters, by name (a new dict)."""
        return dict(self._fixed)

    # -- back to torch ----------------------------------------------------------
    def load_into(self, model: torch.nn.Module, theta: Tensor) -> torch.nn.Module:
        r"""Copy :math:`\theta` into ``model``'s trainable parameters (in place) and return it."""
        params = self.unflatten(theta)
        named = dict(model.named_parameters())
        missing = [n for n in params if n not in named]
        if missing:
            raise ValueError(f"model has no parameters named {missing}")
        with torch.no_grad():
            for n, t in params.items():
                if named[n].shape != t.shape:
                    raise ValueError(
                        f"parameter {n!r} has shape {tuple(named[n].shape)}, "
                        f"theta gives {tuple(t.shape)}"
                    )
                named[n].copy_(t.to(dtype=named[n].dtype, device=named[n].device))
        return model

    def to_model(self, theta: Tensor) -> torch.nn.Module:
        r"""A new module holding :math:`\theta`, in the dtypes of the model passed in.

        A copy of the internal (eval-mode) module whose parameters and buffers
        are converted back to the user's dtypes, so that ``to_model(theta)(X)``
        works with the user's own inputs (float32 ones for a float32 model).
        Use :meth:`load_into` on a float64 module to keep :math:`\theta` exactly.
        """
        model = self.load_into(copy.deepcopy(self.module), theta)
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                dtype = self._user_dtypes.get(name)
                if dtype is not None and t.dtype != dtype:
                    t.data = t.data.to(dtype)
        return model

    def __repr__(self) -> str:
        return (
            f"ParameterSpace(K={self.dim}, N={self.num_samples}, Q={self.num_outputs}, "
            f"loss={self.loss!r}, backend={self.backend.name!r}, dtype={self.dtype})"
        )


def _prepare_data(
    inputs: Tensor, targets: Tensor, loss: Loss, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Validated ``inputs`` ``[N, ...]`` and ``targets`` ``[N, Q]`` on ``device``.

    Floating inputs and the targets are converted to ``dtype``; the targets
    are checked by ``loss.check_targets`` in the user's precision (a float32
    softmax row sums to 1 only to float32 accuracy), then converted and made
    exact by ``loss.prepare_targets``.
    """
    if inputs.ndim == 0 or inputs.shape[0] == 0:
        raise ValueError(
            f"inputs must have shape (N, ...) with N >= 1, got {tuple(inputs.shape)}"
        )
    if inputs.is_floating_point():
        inputs = check_tensor(inputs.to(dtype=dtype, device=device), "inputs", finite=True)
    else:
        inputs = inputs.to(device=device)
    targets = targets.to(device=device)
    if not targets.is_floating_point():
        targets = targets.to(dtype=dtype)
    if targets.ndim == 1:
        targets = targets.unsqueeze(1)
    if targets.ndim != 2:
        raise ValueError(f"targets must have shape (N, Q), got {tuple(targets.shape)}")
    if targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"inputs and targets disagree on N: inputs have {inputs.shape[0]} samples, "
            f"targets {targets.shape[0]}"
        )
    check_tensor(targets, "targets", finite=True)
    loss.check_targets(targets)
    return inputs, loss.prepare_targets(targets.to(dtype=dtype))


def _warn_train_mode(model: torch.nn.Module) -> None:
    """Warn when ``model`` has layers that behave differently in train mode."""
    stochastic = [name for name, m in model.named_modules() if _train_mode_differs(m)]
    if stochastic:
        warnings.warn(
            "model has layers that are random or use batch statistics in train mode "
            f"({', '.join(stochastic)}); subriemann uses a copy in eval mode so that "
            "the Jacobian D is deterministic. The model passed in is not changed.",
            UserWarning,
            stacklevel=3,
        )


def _eval_copy(model: torch.nn.Module, dtype: torch.dtype, device: torch.device
               ) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` on ``device``, in eval mode."""
    try:
        module = copy.deepcopy(model)
    except Exception as err:  # e.g. torch.nn.utils.weight_norm's non-leaf weight
        raise ValueError(
            f"model cannot be copied ({one_line(err, first_line=True)}); subriemann works on "
            "a copy (for weight normalization use torch.nn.utils.parametrizations.weight_norm)"
        ) from None
    module = module.to(dtype=dtype, device=device)
    module.eval()
    return module


def _tensor_tag(t: Tensor) -> tuple[Any, int, int] | None:
    """``(weakref, data_ptr, version)`` of a tensor: the same while it is not modified in place."""
    try:
        return weakref.ref(t), t.data_ptr(), t._version
    except (RuntimeError, TypeError):  # inference tensors have no version counter
        return None


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``torch.equal`` of two points ``[K]``, after a cheap look at 64 spread entries."""
    step = max(1, a.numel() // 64)
    return bool(torch.equal(a[::step], b[::step])) and bool(torch.equal(a, b))
