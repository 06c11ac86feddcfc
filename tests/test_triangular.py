"""subriemann.triangular.cholesky_solve against numpy's dense solve (an independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from subriemann.triangular import cholesky_solve


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-3)])
@pytest.mark.parametrize("rhs_shape", [(6,), (6, 3), (2, 6), (2, 6, 3)])
def test_matches_a_dense_solve(dtype, tol, rhs_shape):
    g = torch.Generator().manual_seed(0)
    batch = (2,) if rhs_shape[0] == 2 else ()  # a batch of two factors
    b = torch.randn(*batch, 6, 6, generator=g, dtype=torch.float64)
    a = b @ b.mT + 6 * torch.eye(6, dtype=torch.float64)  # kappa(a) < 10
    rhs = torch.randn(*rhs_shape, generator=g, dtype=torch.float64)
    x = cholesky_solve(torch.linalg.cholesky(a).to(dtype), rhs.to(dtype))
    assert x.shape == rhs.shape and x.dtype == dtype
    col = rhs.numpy()[..., None] if rhs.ndim == a.ndim - 1 else rhs.numpy()
    ref = np.linalg.solve(a.numpy(), col).reshape(rhs.shape)
    # backward stable: relative error <= c * n * eps * kappa, kappa < 10
    np.testing.assert_allclose(x.double().numpy(), ref, rtol=tol, atol=tol)
