"""The softmax Fisher metric (:mod:`subriemann.metrics.fisher`) against numpy.

Reference: ``numpy.linalg.pinv`` of the dense :math:`D^\\top G D` with the softmax
Fisher blocks :math:`G_j = \\mathrm{diag}(p_j) - p_jp_j^\\top` written out, ``D`` from
``jacrev`` (:class:`tests.references.DenseMetricReference`); tolerances as in
``tests/metrics/test_builtin.py``.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import assume, given

import subriemann as sr
from subriemann.metrics import SoftmaxFisherMetric
from tests.cases import HYP, metric_cases
from tests.helpers import grad_np
from tests.references import EPS, RANK_RTOL, C, rel


@HYP
@given(case=metric_cases(loss="cross_entropy", kappa_max=1e3))
def test_softmax_fisher(case):
    """Singular along 1 per sample; gradient = dense pinv(D^T G D) D^T g."""
    ref, th = case.ref, case.theta
    q, n = case.space.num_outputs, case.space.num_samples
    space = case.fresh().equip_with_metric(SoftmaxFisherMetric)
    x = torch.as_tensor(ref.x).reshape(n, q)
    p = torch.softmax(x, -1)
    blocks = [torch.diag(pj) - torch.outer(pj, pj) for pj in p]
    gmat = torch.block_diag(*blocks).numpy()
    for j in range(n):  # G annihilates the all-ones vector of each sample
        one = np.zeros(q * n)
        one[j * q : (j + 1) * q] = 1
        assert np.linalg.norm(gmat @ one) <= C * EPS
    fisher = ref.D.T @ gmat @ ref.D
    evals = np.linalg.eigvalsh(fisher)
    top = evals.max()
    # the metric's cut on eigenvalues of D^T G D (they scale like sigma^2)
    cut = RANK_RTOL**2 * top
    kept = evals[evals > cut]
    # require a clear gap at the cut, so that the reference and the metric cut at the same place
    assume(kept.min() > 100 * cut and (evals[evals <= cut] < 1e-2 * cut).all())
    expected = np.linalg.pinv(fisher, rcond=RANK_RTOL**2, hermitian=True) @ ref.D.T @ ref.g
    v = grad_np(space.metric, th)
    kf = top / kept.min()
    # two eigendecompositions (of the reduced metric here, of D^T G D in the reference):
    # backward errors O(K eps), amplified by the condition kf of the Fisher matrix on its
    # range, and the Gram structure squares kappa(D)
    tol = C * EPS * ref.K * kf * ref.kappa**2
    assert rel(v, expected) <= tol
    assert sr.check_gradient(space, th, rtol=max(1e-9, tol)).passed
    if ref.r == ref.QN:
        # D onto: w_j = D^+ 1_j shifts sample j's logits by a constant; it is a null direction
        # of the metric (g(w_j, w_j) = 1_j^T G 1_j = 0), orthogonal to its distribution
        frame = space.metric.distribution(th).numpy()
        assert frame.shape[1] == ref.QN - n
        for j in range(n):
            one = np.zeros(q * n)
            one[j * q : (j + 1) * q] = 1
            wj = torch.as_tensor(np.linalg.pinv(ref.D, rcond=RANK_RTOL) @ one)
            scale = ref.s[0] ** 2 * float(wj @ wj)
            assert abs(float(space.metric.inner_product(wj, wj, th))) <= C * EPS * scale
            # eigenvectors of the reduced metric: error O(K eps) / relative gap (1 / kf)
            frame_tol = C * EPS * ref.K * kf * ref.kappa
            assert np.linalg.norm(frame.T @ wj.numpy()) <= frame_tol * float(wj.norm())
