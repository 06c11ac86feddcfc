"""AdaptedGD (subriemann.optim) against independent references and torch's optimizer conventions.

References: the dense Jacobian from torch.func.jacrev and numpy's pinv / solve in
parameter space (K x K), never the push-through route the optimizer uses.
Tolerances: the optimizer solves with a Cholesky factor of the batch Gram matrix,
whose relative error is at most c * kappa(D)^2 * eps; each test computes kappa from
numpy's SVD and allows 100 * kappa^2 * eps (plus the reference's own kappa * eps).
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

import subriemann as sr
from subriemann.optim import AdaptedGD
from tests.references import reference_jacobian

EPS64 = float(np.finfo(np.float64).eps)


def _mlp(m=3, h=16, q=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(m, h), torch.nn.Tanh(), torch.nn.Linear(h, q)).to(
        dtype
    )


def _flat(model, only=None):
    ps = [p for p in model.parameters() if (only is None or any(p is o for o in only))]
    return torch.cat([p.detach().reshape(-1) for p in ps]).clone()


def _dense_d(model, x, only=None):
    """D = dx/dtheta [QN, K] (columns of the parameters ``only``): the jacrev reference."""
    names = [n for n, p in model.named_parameters() if only is None or any(p is o for o in only)]
    return reference_jacobian(model, x, _flat(model, only), names).detach().numpy()


def _kappa(a):
    s = np.linalg.svd(a, compute_uv=False)
    s = s[s > 1e-10 * s[0]]
    return float(s[0] / s[-1])


def _data(n=10, m=3, q=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, m, generator=g, dtype=torch.float64),
        torch.randn(n, q, generator=g, dtype=torch.float64),
    )


# -- the step against dense references ------------------------------------------------
def test_lam1_mse_step_is_minus_lr_pinv():
    net = _mlp()
    x, y = _data()
    d = _dense_d(net, x)
    r = (net(x) - y).detach().numpy().reshape(-1)
    expected = -0.7 * np.linalg.pinv(d) @ r
    th0 = _flat(net)
    opt = AdaptedGD(net, lam=1.0, lr=0.7)
    cost = opt.step(x, y)
    assert cost == pytest.approx(0.5 * float(r @ r), rel=1e-14)
    tol = 100 * _kappa(d) ** 2 * EPS64
    np.testing.assert_allclose(
        (_flat(net) - th0).numpy(), expected, rtol=0, atol=tol * np.abs(expected).max()
    )
    info = opt.last_step.groups[0]
    assert info["route"] == "certified_cholesky" and info["rank"] == 20


def test_lam1_rank_deficient_batch_thresholded_pinv():
    # 4 distinct samples repeated: rank D = 4 Q = 8 < QN = 16, the eigh route drops the rest
    net = _mlp()
    x, y = _data(n=4)
    x, y = torch.cat([x, x]), torch.cat([y, y + 0.5])
    d = _dense_d(net, x)
    s = np.linalg.svd(d, compute_uv=False)
    assert s[7] > 1e-4 * s[0] and s[8] < 1e-12 * s[0]  # a clear gap around any tau in between
    r = (net(x) - y).detach().numpy().reshape(-1)
    expected = -np.linalg.pinv(d, rcond=1e-6) @ r
    th0 = _flat(net)
    opt = AdaptedGD(net, lam=1.0, lr=1.0)
    opt.step(x, y)
    info = opt.last_step.groups[0]
    assert info["route"] == "eigh" and info["rank"] == 8
    assert 1e-12 * s[0] < info["tau"] < 1e-4 * s[0]  # the recorded threshold sits in the gap
    # eigenvalues of D D^T carry an absolute error eps * s0^2: relative error kappa^2 eps
    tol = 100 * (s[0] / s[7]) ** 2 * EPS64
    np.testing.assert_allclose(
        (_flat(net) - th0).numpy(), expected, rtol=0, atol=tol * np.abs(expected).max()
    )


def test_lam_half_mse_step_is_parameter_space_solve():
    net = _mlp()
    x, y = _data()
    d = _dense_d(net, x)
    r = (net(x) - y).detach().numpy().reshape(-1)
    lam = 0.5
    g = (1 - lam) * np.eye(d.shape[1]) + lam * d.T @ d
    expected = -0.3 * np.linalg.solve(g, d.T @ r)
    th0 = _flat(net)
    AdaptedGD(net, lam=lam, lr=0.3).step(x, y)
    tol = 100 * np.linalg.cond(g) * EPS64
    np.testing.assert_allclose(
        (_flat(net) - th0).numpy(), expected, rtol=0, atol=tol * np.abs(expected).max()
    )


def _fisher(logits):
    p = torch.softmax(logits, -1).detach().numpy()
    blocks = [np.diag(row) - np.outer(row, row) for row in p]
    from scipy.linalg import block_diag

    return block_diag(*blocks), p


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_cross_entropy_step_is_fisher_natural_gradient(lam):
    net = _mlp(q=3)
    x, _ = _data(n=6)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    d = _dense_d(net, x)
    g_out, p = _fisher(net(x))
    grad = (p - onehot.numpy()).reshape(-1)
    fisher = d.T @ g_out @ d
    if lam == 1.0:
        # F has rank N = 12; its zero eigenvalues are round-off, the others > 1e-8 * max
        ev = np.linalg.eigvalsh(fisher)[::-1]
        assert ev[11] > 1e-8 * ev[0] and abs(ev[12]) < 1e-13 * ev[0]
        expected = -np.linalg.pinv(fisher, rcond=1e-11, hermitian=True) @ d.T @ grad
        tol = 100 * ev[0] / ev[11] * EPS64
    else:
        g = (1 - lam) * np.eye(d.shape[1]) + lam * fisher
        expected = -np.linalg.solve(g, d.T @ grad)
        tol = 100 * np.linalg.cond(g) * EPS64
    th0 = _flat(net)
    net2 = copy.deepcopy(net)
    opt = AdaptedGD(net, lam=lam, lr=1.0, loss="cross_entropy")
    cost = opt.step(x, labels)  # class indices
    ref_cost = float(torch.nn.functional.cross_entropy(net2(x), labels, reduction="sum").detach())
    assert cost == pytest.approx(ref_cost, rel=1e-13)
    np.testing.assert_allclose(
        (_flat(net) - th0).numpy(), expected, rtol=0, atol=tol * np.abs(expected).max()
    )
    # probability rows give the same step, bit for bit up to the one-hot conversion
    AdaptedGD(net2, lam=lam, lr=1.0, loss="cross_entropy").step(x, onehot)
    torch.testing.assert_close(_flat(net2), _flat(net), rtol=0, atol=1e-13)


def test_lam0_is_sgd_on_the_summed_cost():
    net = _mlp()
    ref = copy.deepcopy(net)
    x, y = _data()
    opt = AdaptedGD(net, lam=0.0, lr=0.01)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.01)
    for _ in range(3):
        opt.step(x, y)
        sgd.zero_grad()
        (0.5 * ((ref(x) - y) ** 2).sum()).backward()
        sgd.step()
    # the same autograd graph: equal up to the summation order of the cost (a few ulps)
    torch.testing.assert_close(_flat(net), _flat(ref), rtol=1e-13, atol=1e-15)


# -- param groups, frozen parameters ----------------------------------------------------
def test_param_groups_with_different_lam_are_block_diagonal():
    net = _mlp(h=24)
    x, y = _data(n=6)
    first = list(net[0].parameters())
    last = list(net[2].parameters())
    d1, d2 = _dense_d(net, x, first), _dense_d(net, x, last)
    r = (net(x) - y).detach().numpy().reshape(-1)
    e1 = -0.5 * np.linalg.pinv(d1) @ r
    g2 = 0.7 * np.eye(d2.shape[1]) + 0.3 * d2.T @ d2
    e2 = -0.2 * np.linalg.solve(g2, d2.T @ r)
    a1, a2 = _flat(net, first), _flat(net, last)
    opt = AdaptedGD(
        net,
        params=[{"params": first, "lam": 1.0, "lr": 0.5}, {"params": last, "lam": 0.3}],
        lr=0.2,
    )
    opt.step(x, y)
    assert [g["route"] for g in opt.last_step.groups] == ["certified_cholesky", "cholesky"]
    for got, exp, dd in ((_flat(net, first) - a1, e1, d1), (_flat(net, last) - a2, e2, d2)):
        tol = 100 * _kappa(dd) ** 2 * EPS64
        np.testing.assert_allclose(got.numpy(), exp, rtol=0, atol=tol * np.abs(exp).max())


def test_frozen_and_excluded_parameters_stay_fixed():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 8),
        torch.nn.Tanh(),
        torch.nn.Linear(8, 2),
    ).double()
    net[0].weight.requires_grad_(False)  # frozen
    x, y = _data(n=3)
    last = list(net[4].parameters())
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    d = _dense_d(net, x, last)
    r = (net(x) - y).detach().numpy().reshape(-1)
    opt = AdaptedGD(net, params=last, lam=1.0, lr=1.0)  # only the last layer is optimized
    opt.step(x, y)
    for n, p in net.named_parameters():
        if not n.startswith("4."):
            assert torch.equal(p, before[n]), n
    assert not net[0].weight.requires_grad and net[2].weight.requires_grad  # flags restored
    got = _flat(net, last) - torch.cat([before["4.weight"].reshape(-1), before["4.bias"]])
    exp = -np.linalg.pinv(d) @ r
    tol = 100 * _kappa(d) ** 2 * EPS64
    np.testing.assert_allclose(got.numpy(), exp, rtol=0, atol=tol * np.abs(exp).max())
    # a group whose parameters are all frozen is skipped, as torch optimizers skip grad=None
    for p in last:
        p.requires_grad_(False)
    snap = _flat(net)
    assert opt.step(x, y) > 0 and torch.equal(_flat(net), snap)


# -- torch conventions -------------------------------------------------------------------
def test_state_dict_round_trip_resumes_bit_exactly_with_a_scheduler():
    x, y = _data(n=8)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])] * 3

    def make(net):
        opt = AdaptedGD(net, lam=0.7, lr=0.8)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    net = _mlp()
    opt, sched = make(net)
    for xb, yb in batches[:3]:
        opt.step(xb, yb)
        sched.step()
    # deep copies, as for any torch optimizer (state_dict() shares the live state)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict(), sched.state_dict()))
    for xb, yb in batches[3:]:
        opt.step(xb, yb)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8 * 0.5**6)

    net2 = _mlp(seed=5)
    net2.load_state_dict(saved[0])
    opt2, sched2 = make(net2)
    opt2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.8 * 0.5**3)
    for xb, yb in batches[3:]:
        opt2.step(xb, yb)
        sched2.step()
    for p, p2 in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, p2)
    assert opt2.state_dict()["state"][0]["step"] == 6


def test_scheduler_lr_is_the_step_length():
    x, y = _data(n=6)
    a, b = _mlp(), _mlp()
    opt_a = AdaptedGD(a, lam=1.0, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda k: 0.25)
    assert opt_a.param_groups[0]["lr"] == 0.25
    th0 = _flat(a)
    opt_a.step(x, y)
    AdaptedGD(b, lam=1.0, lr=1.0).step(x, y)
    # the same direction, a quarter of the length (exact: the same solve, scaled)
    torch.testing.assert_close(_flat(a) - th0, 0.25 * (_flat(b) - th0), rtol=1e-12, atol=1e-15)
    del sched


def test_closure_form_equals_direct_call():
    x, y = _data()
    a, b = _mlp(), _mlp()
    ca = AdaptedGD(a, lam=1.0, lr=0.5).step(lambda: (x, y))
    cb = AdaptedGD(b, lam=1.0, lr=0.5).step(x, y)
    assert ca == cb
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_float32_model_stays_float32_and_matches_float64():
    net64 = _mlp()
    net32 = copy.deepcopy(net64).float()
    x, y = _data()
    th0 = _flat(net64)
    AdaptedGD(net64, lam=1.0, lr=1.0).step(x, y)
    opt = AdaptedGD(net32, lam=1.0, lr=1.0)
    opt.step(x.float(), y.float())
    assert all(p.dtype == torch.float32 for p in net32.parameters())
    d = _dense_d(_mlp(), x)
    # float32: relative error <= c kappa^2 eps32 (the Gram matrix squares the conditioning)
    tol = 100 * _kappa(d) ** 2 * float(np.finfo(np.float32).eps)
    step64, step32 = _flat(net64) - th0, _flat(net32).double() - th0
    assert float((step32 - step64).norm() / step64.norm()) < tol


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_matches_cpu():
    x, y = _data()
    cpu, gpu = _mlp(), _mlp().cuda()
    th0 = _flat(cpu)
    AdaptedGD(cpu, lam=1.0, lr=1.0).step(x, y)
    AdaptedGD(gpu, lam=1.0, lr=1.0).step(x.cuda(), y.cuda())
    d = _dense_d(_mlp(), x)
    tol = 100 * _kappa(d) ** 2 * EPS64
    diff = (_flat(gpu).cpu() - _flat(cpu)).norm() / (_flat(cpu) - th0).norm()
    assert float(diff) < tol


def test_train_mode_dropout_is_evaluated_in_eval_mode():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2)
    ).double()
    ref = copy.deepcopy(net).eval()
    x, y = _data()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        AdaptedGD(net, lam=1.0, lr=1.0).step(x, y)
    AdaptedGD(ref, lam=1.0, lr=1.0).step(x, y)
    assert net.training and net[2].training  # restored
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_research_metric_path_agrees():
    x, y = _data()
    a, b = _mlp(), _mlp()
    AdaptedGD(a, lam=1.0, lr=1.0).step(x, y)
    AdaptedGD(b, lr=1.0, metric=sr.metrics.InterpolatedMetric, metric_kwargs={"lam": 1.0}).step(
        x, y
    )
    d = _dense_d(_mlp(), x)
    tol = 100 * _kappa(d) ** 2 * EPS64
    torch.testing.assert_close(_flat(a), _flat(b), rtol=0, atol=tol)


# -- errors ---------------------------------------------------------------------------------
def test_bad_input_errors():
    net = _mlp()
    x, y = _data()
    for lam in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            AdaptedGD(net, lam=lam)
    with pytest.raises(ValueError, match="lam"):
        AdaptedGD(net, params=[{"params": net.parameters(), "lam": 2.0}])
    with pytest.raises(ValueError, match="lr"):
        AdaptedGD(net, lr=-1.0)
    with pytest.raises(ValueError, match="loss"):
        AdaptedGD(net, loss=sr.losses.Loss())
    with pytest.raises(ValueError, match="do not belong"):
        AdaptedGD(net, params=[torch.nn.Parameter(torch.zeros(2))])
    opt = AdaptedGD(net)
    with pytest.raises(TypeError, match="closure"):
        opt.step(lambda: 0.5 * ((net(x) - y) ** 2).sum())  # an LBFGS-style loss closure
    with pytest.raises(TypeError, match="batch"):
        opt.step()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.step(bad, y)
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.step(x, y * float("inf"))
    with pytest.raises(ValueError, match="batch size"):
        opt.step(x, y[:3])
    ce = AdaptedGD(net, loss="cross_entropy")
    with pytest.raises(ValueError, match="class indices"):
        ce.step(x, torch.full((10,), 7))
    with pytest.raises(ValueError, match="probability"):
        ce.step(x, torch.rand(10, 2, dtype=torch.float64) + 1.0)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_train_mode_batchnorm_running_stats_untouched():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()
    x, y = _data()
    mean = net[1].running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cost = AdaptedGD(net, lam=1.0, lr=0.5).step(x, y)
    assert math.isfinite(cost) and net[1].training
    assert torch.equal(net[1].running_mean, mean)  # eval mode during the step, as documented


def test_saturated_softmax_gives_a_finite_step():
    # logits of size ~1e3: float32 softmax rows are one-hot, the Fisher blocks vanish to
    # round-off; those directions are flat and dropped, the step stays finite
    net = _mlp(q=3).float()
    with torch.no_grad():
        net[2].weight.mul_(1e3)
    x, _ = _data(n=6)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    opt = AdaptedGD(net, lam=1.0, lr=0.1, loss="cross_entropy")
    for _ in range(2):
        assert math.isfinite(opt.step(x.float(), labels))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_engine_is_reused_across_batches_of_one_shape():
    """The structured engine of a step serves the next batch of the same shape (set_inputs):
    the steps are bit-identical to steps with a fresh engine each time; a batch of another
    shape gets its own engine."""
    net = _mlp(q=3)
    twin = copy.deepcopy(net)
    opt = AdaptedGD(net, lam=0.5, lr=0.5, loss="cross_entropy")
    ref = AdaptedGD(twin, lam=0.5, lr=0.5, loss="cross_entropy")
    g = torch.Generator().manual_seed(3)
    for n in (6, 6, 6, 4):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (n,), generator=g)
        ref._engines.clear()
        assert opt.step(x, labels) == ref.step(x, labels)
        assert torch.equal(_flat(net), _flat(twin))
    assert sorted(key[1][0] for key in opt._engines) == [4, 6]
    engine = next(iter(opt._engines.values()))
    with pytest.raises(ValueError, match="set_inputs needs a batch like"):
        engine.set_inputs(torch.randn(5, 3, dtype=torch.float64))


def test_lam1_eigh_survives_lapack_failures(monkeypatch):
    """lam = 1 on a batch with repeated samples (M singular: no certificate, the thresholded
    eigh).  MKL's float32 eigh has returned NaN without an error on such a matrix and its
    float64 eigh has failed to converge (one thread): with both failures simulated, the step
    comes from SciPy's MRRR eigh, stays finite and float32, and matches the float64 model's
    step to the float32 bound of the module doc (100 kappa^2 eps32, 5e-4 here)."""
    net64 = _mlp(q=3)
    net32 = copy.deepcopy(net64).float()
    x, _ = _data(n=4)
    x = torch.cat([x, x[:2]])  # repeated samples: rank(D~) < R
    labels = torch.tensor([0, 1, 2, 1, 0, 1])
    eigh = torch.linalg.eigh

    def broken_float32(a, *args, **kw):
        if a.shape[-1] == 3:  # the 3 x 3 softmax Fisher blocks
            return eigh(a, *args, **kw)
        if a.dtype == torch.float64:
            raise torch.linalg.LinAlgError("simulated: dsyevd failed to converge")
        vals, vecs = eigh(a, *args, **kw)
        return vals * float("nan"), vecs

    th0 = _flat(net64)
    AdaptedGD(net64, lam=1.0, lr=1.0, loss="cross_entropy").step(x, labels)
    monkeypatch.setattr(torch.linalg, "eigh", broken_float32)
    opt = AdaptedGD(net32, lam=1.0, lr=1.0, loss="cross_entropy")
    opt.step(x.float(), labels)
    assert opt.last_step.groups[0]["route"] == "eigh"
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net32.parameters())
    step64, step32 = _flat(net64) - th0, _flat(net32).double() - th0
    d = _dense_d(_mlp(q=3), x)
    tol = 100 * _kappa(d) ** 2 * float(np.finfo(np.float32).eps)
    assert float((step32 - step64).norm() / step64.norm()) < tol
