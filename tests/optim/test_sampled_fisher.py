"""AdaptedGD(fisher="sampled"): the Monte-Carlo Fisher against dense references.

For a given draw, the step is checked against the dense parameter-space solve
((1 - lam) 1 + lam D^T H D) d = D^T (p - y) with H = blockdiag(g_j g_j^T) built from
the drawn g_j = e_{y_j} - p_j (D from torch.func.jacrev, numpy's solve / pinv), never the
optimizer's Woodbury route.  Unbiasedness, E[D^T H D] = D^T G D with the exact softmax
Fisher blocks G_j, is checked through the optimizer's own steps at small lam, against the
dense exact Fisher, with a tolerance from the sample spread (central limit theorem).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.linalg import block_diag

from subriemann.optim import AdaptedGD
from tests.references import reference_jacobian

EPS64 = float(np.finfo(np.float64).eps)


def _net(seed=0, q=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, q)
    ).double()


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, torch.arange(n) % 3


def _dense(net, x, labels):
    """(D [NQ, K], p [N, Q], the gradient D^T (p - y) [K]) from jacrev."""
    names = [n for n, _ in net.named_parameters()]
    d = reference_jacobian(net, x, _flat(net), names).detach().numpy()
    p = torch.softmax(net(x).detach(), -1).numpy()
    y = np.eye(p.shape[1])[labels.numpy()]
    return d, p, d.T @ (p - y).reshape(-1)


def _drawn(p, seed, device="cpu"):
    """The documented draw: y_j ~ Categorical(p_j) by torch.multinomial with the seeded
    generator on the model's device, g_j = e_{y_j} - p_j."""
    gen = torch.Generator(device=device).manual_seed(seed)
    probs = torch.from_numpy(p).to(device)
    cls = torch.multinomial(probs, 1, generator=gen)[:, 0].cpu().numpy()
    return np.eye(p.shape[1])[cls] - p


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_sampled_step_is_the_dense_solve_for_the_drawn_fisher(lam, device):
    net = _net()
    x, labels = _batch()
    d, p, grad = _dense(net, x, labels)
    g = _drawn(p, seed=11, device=device)
    f_hat = d.T @ block_diag(*[np.outer(r, r) for r in g]) @ d  # rank N = 6 < K = 115
    if lam < 1.0:
        metric = (1 - lam) * np.eye(d.shape[1]) + lam * f_hat
        expected = -0.4 * np.linalg.solve(metric, grad)
        # Cholesky of size N plus the Woodbury difference (v - lam A^T w) / (1 - lam): both
        # errors are at most c * cond(metric) * eps relative to the step
        tol = 100 * np.linalg.cond(metric) * EPS64
    else:
        ev = np.linalg.eigvalsh(f_hat)[::-1]
        assert ev[5] > 1e-6 * ev[0] and abs(ev[6]) < 1e-12 * ev[0]  # rank exactly N
        expected = -0.4 * np.linalg.pinv(f_hat, rcond=1e-10, hermitian=True) @ grad
        # eigendecomposition of M = A A^T: eigenvalue errors eps * sigma_max^2, so relative
        # error of M^{+2} about kappa(M) * eps; the reference pinv has the same bound
        tol = 1000 * ev[0] / ev[5] * EPS64
    th0 = _flat(net)
    net = net.to(device)
    opt = AdaptedGD(net, lam=lam, lr=0.4, loss="cross_entropy", fisher="sampled", seed=11)
    opt.step(x.to(device), labels.to(device))
    np.testing.assert_allclose(
        (_flat(net).cpu() - th0).numpy(), expected, rtol=0, atol=tol * np.abs(expected).max()
    )
    info = opt.last_step.groups[0]
    assert info["size"] == 6 and info["rank"] == 6  # a solve of size N, not (Q - 1) N = 12
    assert info["route"] == ("cholesky" if lam < 1 else "eigh")


def test_sampled_fisher_is_unbiased():
    # at small lam the step is v + lam (v - F_hat v) + O(lam^2 |F_hat|^2 |v|) (v = D^T (p - y)),
    # so (v (1 + lam) - step) / lam estimates F_hat v: its mean over independent draws
    # must match F v with the exact Fisher F = D^T G D (G_j = diag p_j - p_j p_j^T)
    net = _net()
    x, labels = _batch(n=4)
    d, p, v = _dense(net, x, labels)
    fisher = d.T @ block_diag(*[np.diag(r) - np.outer(r, r) for r in p]) @ d
    lam, draws = 1e-7, 200
    th0 = _flat(net)
    opt = AdaptedGD(net, lam=lam, lr=1.0, loss="cross_entropy", fisher="sampled", seed=3)
    est = []
    for _ in range(draws):
        opt.step(x, labels)
        step = (th0 - _flat(net)).numpy()
        est.append((v * (1 + lam) - step) / lam)
        with torch.no_grad():  # back to theta_0 (a copy: th0 keeps its own storage)
            torch.nn.utils.vector_to_parameters(th0.clone(), net.parameters())
    est = np.array(est)
    mean, sem = est.mean(0), est.std(0, ddof=1) / np.sqrt(draws)
    exact = fisher @ v
    # 5 standard errors (CLT), plus the O(lam |F|^2 |v|) bias and the rounding of the
    # difference, eps |v| / lam
    bias = lam * np.linalg.norm(fisher, 2) ** 2 * np.linalg.norm(v)
    bias += 10 * EPS64 * np.abs(v).max() / lam
    assert np.all(np.abs(mean - exact) <= 5 * sem + bias)
    # and it is a random estimate: single draws differ by a sizeable fraction of F v
    assert np.abs(est[0] - est[1]).max() > 0.1 * np.abs(exact).max()


def test_sampled_state_dict_round_trip_resumes_bit_exactly():
    x, labels = _batch(n=8)
    batches = [(x[:4], labels[:4]), (x[4:], labels[4:])] * 3

    def make(net):
        return AdaptedGD(net, lam=0.5, lr=0.3, loss="cross_entropy", fisher="sampled", seed=5)

    net = _net()
    opt = make(net)
    for xb, yb in batches[:3]:
        opt.step(xb, yb)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict()))
    for xb, yb in batches[3:]:
        opt.step(xb, yb)
    net2 = _net(seed=9)
    net2.load_state_dict(saved[0])
    opt2 = AdaptedGD(net2, lam=0.5, lr=0.3, loss="cross_entropy", fisher="sampled", seed=1)
    opt2.load_state_dict(saved[1])  # the generator's state too: seed=1 is overridden
    for xb, yb in batches[3:]:
        opt2.step(xb, yb)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    # without the generator state the draws differ (the test above is not vacuous)
    net3 = _net(seed=9)
    net3.load_state_dict(saved[0])
    opt3 = AdaptedGD(net3, lam=0.5, lr=0.3, loss="cross_entropy", fisher="sampled", seed=1)
    for xb, yb in batches[3:]:
        opt3.step(xb, yb)
    assert not all(torch.equal(a, b) for a, b in zip(net.parameters(), net3.parameters()))


def test_sampled_fisher_errors():
    net = _net()
    with pytest.raises(ValueError, match="fisher"):
        AdaptedGD(net, loss="cross_entropy", fisher="mc")
    with pytest.raises(ValueError, match="cross_entropy"):
        AdaptedGD(net, loss="mse", fisher="sampled")
    with pytest.raises(ValueError, match="seed"):
        AdaptedGD(net, loss="cross_entropy", seed=3)
    with pytest.raises(ValueError, match="seed"):
        AdaptedGD(net, loss="cross_entropy", fisher="sampled", seed=-1)
    with pytest.raises(ValueError, match="record_spectrum"):
        AdaptedGD(net, loss="cross_entropy", fisher="sampled", record_spectrum=True)
    exact = AdaptedGD(net, loss="cross_entropy").state_dict()
    with pytest.raises(ValueError, match="fisher='sampled'"):
        AdaptedGD(net, loss="cross_entropy", fisher="sampled").load_state_dict(exact)
