"""Dense references, in one place, written independently of :mod:`subriemann`.

Every test compares the library with something computed here (or with a closed
form of docs/theory.md, scipy or geomstats), never with the library's own output:

* the parameter flattening (:func:`flat_params`, :func:`unflat_params`), the outputs
  (:func:`reference_outputs`) and the Jacobian (:func:`reference_jacobian`:
  :func:`torch.func.jacrev` of the *whole batch*, as curvlinops' functorch
  references) are taken from the torch model directly, not from
  :class:`~subriemann.engines.base.ParameterLayout`;
* :func:`central_fd_jacobian`, a second, derivative-free Jacobian;
* the losses written out by hand (:func:`mse_by_hand`, :func:`ce_by_hand`);
* :class:`DenseMetricReference`: ``D`` by ``jacrev`` at one point, its numpy SVD, and
  the closed forms of the Riemannian gradients and sharps of docs/theory.md §2
  (Euclidean, output pullback, interpolated :math:`g_\\lambda`, bundle) with numpy;
* :func:`svd_gradient`: the interpolated gradient from an SVD with a rank threshold;
* :func:`rel`: the relative error the float64 tolerances of the tests are stated in.

Import them from any test file::

    from tests.references import DenseMetricReference, reference_jacobian
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

__all__ = [
    "EPS",
    "C",
    "RANK_RTOL",
    "flat_params",
    "unflat_params",
    "reference_outputs",
    "reference_jacobian",
    "central_fd_jacobian",
    "mse_by_hand",
    "ce_by_hand",
    "rel",
    "svd_gradient",
    "DenseMetricReference",
]

#: float64 unit round-off.
EPS = float(np.finfo(np.float64).eps)
#: Constant in front of the floating-point error bounds ``C * eps * kappa`` (these sizes).
C = 100.0
#: The metrics' default relative rank threshold ``rank_rtol``.
RANK_RTOL = 1e-6


# -- parameters, outputs, Jacobian ----------------------------------------------------------
def flat_params(model: nn.Module, dtype: torch.dtype = torch.float64) -> Tensor:
    """Trainable parameters in ``named_parameters()`` order, each flattened row-major."""
    return torch.cat(
        [p.detach().reshape(-1).to(dtype) for _, p in model.named_parameters() if p.requires_grad]
    )


def unflat_params(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    """Inverse of :func:`flat_params` (views of ``theta``)."""
    out, i = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = theta[i : i + p.numel()].view(p.shape)
            i += p.numel()
    assert i == theta.numel(), "theta does not match the model"
    return out


def _eval_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    m = copy.deepcopy(model).to(dtype)
    m.eval()
    return m


def _cast_inputs(inputs: Tensor, dtype: torch.dtype) -> Tensor:
    return inputs.to(dtype) if inputs.is_floating_point() else inputs


def reference_outputs(model: nn.Module, inputs: Tensor, theta: Tensor | None = None) -> Tensor:
    """The model called directly on the whole batch (float64, eval), flattened sample-major."""
    m = _eval_copy(model, torch.float64)
    x = _cast_inputs(inputs, torch.float64)
    with torch.no_grad():
        if theta is None:
            out = m(x)
        else:
            out = functional_call(m, unflat_params(m, theta), (x,))
    return out.reshape(inputs.shape[0], -1).reshape(-1)


def reference_jacobian(
    model: nn.Module, inputs: Tensor, theta: Tensor, names: list[str] | None = None
) -> Tensor:
    """:func:`torch.func.jacrev` of the *batched* model call, shape ``[QN, K]``.

    Computed in ``theta``'s dtype, on an eval-mode copy of ``model``; the columns are
    those of the parameters ``names`` (default: the trainable ones) in
    ``named_parameters()`` order, the other parameters and the buffers held at the
    model's values.
    """
    m = _eval_copy(model, theta.dtype)
    x = _cast_inputs(inputs, theta.dtype)
    params = dict(m.named_parameters())
    if names is None:
        names = [n for n, p in params.items() if p.requires_grad]

    def f(t: Tensor) -> Tensor:
        split, i = {}, 0
        for n in names:
            split[n] = t[i : i + params[n].numel()].view(params[n].shape)
            i += params[n].numel()
        assert i == t.numel(), "theta does not match the parameters"
        return functional_call(m, split, (x,)).reshape(-1)

    return jacrev(f)(theta)


def central_fd_jacobian(f: Callable[[Tensor], Tensor], theta: Tensor, h: float = 1e-6) -> Tensor:
    """Central finite differences ``(f(θ + h e_k) - f(θ - h e_k)) / 2h``, shape ``[QN, K]``."""
    cols = []
    for k in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[k] = h
        cols.append((f(theta + e) - f(theta - e)) / (2 * h))
    return torch.stack(cols, dim=1)


# -- losses by hand ----------------------------------------------------------------------
def mse_by_hand(x: Tensor, y: Tensor) -> Tensor:
    """½ Σ (x − y)², written out."""
    d = x - y
    return 0.5 * (d * d).sum()


def ce_by_hand(x: Tensor, y: Tensor) -> Tensor:
    """Σ_j −⟨y_j, log softmax(x_j)⟩ with the softmax written out (fine for moderate logits)."""
    e = torch.exp(x)
    p = e / e.sum(dim=-1, keepdim=True)
    return -(y * torch.log(p)).sum()


# -- errors ------------------------------------------------------------------------------
def rel(a, b) -> float:
    """``|a - b| / |b|`` in the 2-norm (``|a - b|`` when ``b = 0``), tensors or arrays."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / (nb if nb > 0 else 1.0)


# -- Riemannian gradients by numpy -------------------------------------------------------
def svd_gradient(
    d: np.ndarray, r: np.ndarray, lam: float, tau: float
) -> tuple[np.ndarray, float]:
    """The interpolated gradient ``((1-λ)1 + λDᵀD)⁻¹ Dᵀ r`` from numpy's SVD of ``D``.

    At ``λ = 1`` the pseudo-inverse ``D⁺ r`` keeps the singular values above ``tau``.
    Also returns the condition number that bounds its error: ``κ(D)`` on the kept
    part at ``λ = 1``, ``sqrt(κ(g_λ))`` below.
    """
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    if lam == 1.0:
        keep = s > tau
        w = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
        return vt.T @ (w * (u.T @ r)), float(s[0] / s[keep][-1])
    w = s / ((1 - lam) + lam * s**2)
    return vt.T @ (w * (u.T @ r)), float(np.sqrt(1 + lam * s[0] ** 2 / (1 - lam)))


class DenseMetricReference:
    """Dense reference at one point, built without subriemann.

    ``D`` by ``jacrev`` of ``functional_call`` on a copy of the model, the
    output gradient by hand (MSE: x - y, summed cost; CE: softmax(x) - y), the
    numpy SVD ``D = U diag(s) Vᵀ``, the rank ``r`` at ``tau = rtol * s[0]``, and
    the closed forms of docs/theory.md §2.
    """

    def __init__(
        self, model: nn.Module, inputs, targets, theta, loss: str = "mse", rtol: float = RANK_RTOL
    ) -> None:
        self.model = copy.deepcopy(model).double()
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for n, p in self.model.named_parameters() if p.requires_grad]
        self.inputs = inputs.double()
        self.theta = theta.detach().clone()
        self.y = targets.double().reshape(-1)
        x = self.outputs(self.theta)
        d = jacrev(self.outputs)(self.theta)
        self.x = x.detach().numpy()
        self.D = d.detach().numpy()
        q = targets.shape[1] if targets.ndim == 2 else 1
        if loss == "mse":
            self.g = self.x - self.y.numpy()
        else:
            xs = torch.as_tensor(self.x).reshape(-1, q)
            self.g = (torch.softmax(xs, -1) - targets.double()).reshape(-1).numpy()
        self.U, self.s, vt = np.linalg.svd(self.D, full_matrices=False)
        self.V = vt.T
        self.tau = rtol * self.s[0]
        self.r = int((self.s > self.tau).sum())
        self.kappa = float(self.s[0] / self.s[-1]) if self.s[-1] > 0 else float("inf")
        ur = self.U[:, : self.r]
        self.P = ur @ ur.T
        self.Vr = self.V[:, : self.r]
        self.K = self.D.shape[1]
        self.QN = self.D.shape[0]
        self.rtol = rtol

    def outputs(self, theta):
        params, i = {}, 0
        for n, shp in zip(self.names, self.shapes):
            k = int(np.prod(shp))
            params[n] = theta[i : i + k].reshape(shp)
            i += k
        return functional_call(self.model, params, (self.inputs,)).reshape(-1)

    # closed forms of docs/theory.md §2 -----------------------------------------------------------
    def g_lam(self, lam: float) -> np.ndarray:
        return (1 - lam) * np.eye(self.K) + lam * self.D.T @ self.D

    def euclidean(self) -> np.ndarray:
        return self.D.T @ self.g

    def pullback(self) -> np.ndarray:
        return np.linalg.pinv(self.D, rcond=self.rtol) @ self.g

    def interpolated(self, lam: float) -> np.ndarray:
        if lam == 1.0:
            return self.pullback()
        return np.linalg.solve(self.g_lam(lam), self.D.T @ self.g)

    def bundle(self, lam: float) -> np.ndarray:
        """g_lam restricted to ran D^T (frame V_r): V_r (V_r^T g V_r)^{-1} V_r^T D^T g."""
        vr = self.Vr
        return vr @ np.linalg.solve(vr.T @ self.g_lam(lam) @ vr, vr.T @ self.D.T @ self.g)

    def sharp_interpolated(self, xi: np.ndarray, lam: float) -> np.ndarray:
        if lam == 1.0:
            return np.linalg.pinv(self.D.T @ self.D, rcond=self.rtol**2, hermitian=True) @ xi
        return np.linalg.solve(self.g_lam(lam), xi)

    def sharp_bundle(self, xi: np.ndarray, lam: float) -> np.ndarray:
        vr = self.Vr
        return vr @ np.linalg.solve(vr.T @ self.g_lam(lam) @ vr, vr.T @ xi)

    # away from the reference point ----------------------------------------------------------
    def g_lam_at(self, theta: Tensor, lam: float) -> Tensor:
        """The dense ``(1 - λ)1 + λ D[θ]ᵀD[θ]`` at another point (torch, differentiable)."""
        d = jacrev(self.outputs)(theta)
        return (1 - lam) * torch.eye(theta.shape[0], dtype=theta.dtype) + lam * d.T @ d

    def geodesic(self, lam: float, theta: Tensor, v: Tensor, steps: int):
        """RK4 on the geodesic equation with Christoffels from autodiff of a dense g(theta).

        Returns the end point at time 1 and the energies ``g(u, u)`` at the steps.
        """

        def accel(t, u):
            g = self.g_lam_at(t, lam)
            dg = torch.func.jacfwd(lambda z: self.g_lam_at(z, lam))(t)  # dg[i, j, l] = d_l g_ij
            # Gamma^k_ij u^i u^j = g^{kl} (d_i g_lj + d_j g_li - d_l g_ij) u^i u^j / 2
            first = torch.einsum("lji,i,j->l", dg, u, u) - 0.5 * torch.einsum(
                "ijl,i,j->l", dg, u, u
            )
            return -torch.linalg.solve(g, first)

        h = 1.0 / steps
        q, u = theta.clone(), v.clone()
        energies = []
        for _ in range(steps):
            energies.append(float(u @ self.g_lam_at(q, lam) @ u))
            k1 = (u, accel(q, u))
            k2 = (u + 0.5 * h * k1[1], accel(q + 0.5 * h * k1[0], u + 0.5 * h * k1[1]))
            k3 = (u + 0.5 * h * k2[1], accel(q + 0.5 * h * k2[0], u + 0.5 * h * k2[1]))
            k4 = (u + h * k3[1], accel(q + h * k3[0], u + h * k3[1]))
            q = q + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
            u = u + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        energies.append(float(u @ self.g_lam_at(q, lam) @ u))
        return q, np.array(energies)

    def bundle_hamiltonian(self, q: Tensor, p: Tensor, lam: float, rank: int) -> float:
        """``H(q, p) = ½ pᵣᵀ (Vᵣᵀ g_λ Vᵣ)⁻¹ pᵣ`` on the first ``rank`` right singular vectors."""
        d = jacrev(self.outputs)(q).detach().numpy()
        _, _, vt = np.linalg.svd(d, full_matrices=False)
        vr = vt[:rank].T
        g = (1 - lam) * np.eye(d.shape[1]) + lam * d.T @ d
        pr = vr.T @ p.numpy()
        return 0.5 * float(pr @ np.linalg.solve(vr.T @ g @ vr, pr))

    # error scales ---------------------------------------------------------------------------
    def tan_theta(self) -> float:
        pg = np.linalg.norm(self.P @ self.g)
        return float(np.linalg.norm(self.g - self.P @ self.g) / pg) if pg > 0 else 0.0

    def kappa_g(self, lam: float) -> float:
        """Condition number of g_lam on the subspace where the solve acts."""
        if lam == 1.0:
            return self.kappa**2
        smin = self.s[-1] if self.QN >= self.K else 0.0
        return float(((1 - lam) + lam * self.s[0] ** 2) / ((1 - lam) + lam * smin**2))

    def characterization_tol(self) -> float:
        """Bound of ``|g(V, w) - dC(w)| / (|dC||w|)`` (docs/theory.md §8 item 4).

        The error of ``D V`` (``eps kappa |g|``) against ``|Dᵀg| >= sigma_min |P g|``.
        """
        pg = np.linalg.norm(self.P @ self.g)
        return max(1e-9, C * EPS * self.kappa**2 * np.linalg.norm(self.g) / pg)

    def tol(self, lam: float) -> float:
        """Forward-error bound of the gradient V_lam (backward-stable solve; tests/metrics)."""
        if lam == 1.0:
            return C * EPS * self.kappa * (2 + self.kappa * self.tan_theta())
        return C * EPS * self.kappa_g(lam)
