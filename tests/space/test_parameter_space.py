"""ParameterSpace: every quantity against an independent computation (issue 2).

References (see :mod:`tests.references`) call the torch model directly, flatten
its parameters themselves, and differentiate with ``torch.func.jacrev`` /
``torch.autograd`` on the whole batch, or with central finite differences.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import subriemann as sr
from tests.cases import (
    MLPSpec,
    case_named,
    make_mlp,
    make_problem,
    mlp_problems,
    mlp_specs,
    perturbed_point,
)
from tests.references import (
    ce_by_hand,
    flat_params,
    mse_by_hand,
    reference_jacobian,
    reference_outputs,
    unflat_params,
)

F64 = torch.float64
# Engines: the generic torch.func one, and whatever "auto" picks for the model.
BACKENDS = ["func", "auto"]


# -- sizes and the geomstats side ---------------------------------------------------
def test_sizes_and_vector_space(mlp_problem):
    space = mlp_problem.space()
    spec = mlp_problem.spec
    assert space.dim == spec.num_params == 3 * 8 + 8 + 8 * 2 + 2
    assert space.num_samples == 5 and space.num_outputs == 2
    assert space.output_dim == 10 and space.overparametrized
    assert space.point_ndim == 1 and space.shape == (space.dim,)
    theta = space.initial_point()
    assert theta.dtype == F64 and theta.shape == (space.dim,)
    assert bool(space.belongs(theta))
    pts = space.random_point(3)
    assert pts.shape == (3, space.dim) and pts.dtype == F64
    assert "K=50" in repr(space)


def test_initial_point_is_named_parameter_order_and_a_copy(mlp_problem):
    space = mlp_problem.space()
    theta = space.initial_point()
    torch.testing.assert_close(theta, flat_params(mlp_problem.model), rtol=0, atol=0)
    theta[0] += 1.0
    assert not torch.equal(theta, space.initial_point())
    parts = space.unflatten(space.initial_point())
    assert list(parts) == [n for n, _ in mlp_problem.model.named_parameters()]
    for name, p in mlp_problem.model.named_parameters():
        torch.testing.assert_close(parts[name], p.detach().to(F64), rtol=0, atol=0)


def test_frozen_parameters_and_buffers_are_held_fixed():
    p = case_named("frozen-and-buffers")  # LayerNorm, a frozen bias, a buffer
    model, X = p.model, p.inputs
    space = p.space()
    names = list(space.unflatten(space.initial_point()))
    assert "0.bias" not in names
    assert space.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)
    theta = perturbed_point(space)
    torch.testing.assert_close(
        space.jacobian(theta), reference_jacobian(model, X, theta), rtol=1e-10, atol=1e-12
    )


# -- outputs -------------------------------------------------------------------------
@given(mlp_problems())
def test_outputs_match_model_called_directly(p):
    space = p.space()
    x = space.outputs(space.initial_point())
    ref = reference_outputs(p.model, p.inputs)
    assert x.shape == (space.output_dim,) and x.dtype == F64
    torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)
    theta = perturbed_point(space)
    torch.testing.assert_close(
        space.outputs(theta), reference_outputs(p.model, p.inputs, theta), rtol=1e-12, atol=1e-12
    )


def test_outputs_are_sample_major(mlp_problem):
    p = mlp_problem
    space = p.space()
    x = space.outputs(space.initial_point())
    m64 = copy.deepcopy(p.model).to(F64)
    q = space.num_outputs
    for j in range(space.num_samples):
        with torch.no_grad():
            fj = m64(p.inputs[j : j + 1].to(F64))[0]  # the model on sample j alone
        for i in range(q):
            assert math.isclose(float(x[j * q + i]), float(fj[i]), rel_tol=1e-12, abs_tol=1e-12)
    torch.testing.assert_close(space.output_cost(x), mse_by_hand(x, p.targets.to(F64).reshape(-1)))


def test_float32_space():
    p = make_problem(MLPSpec((3, 5, 2), "tanh", 4, seed=7))
    space = p.space(dtype=torch.float32)
    theta = space.initial_point()
    assert theta.dtype == torch.float32
    x = space.outputs(theta)
    assert x.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(x, p.model(p.inputs).reshape(-1))
    assert space.jacobian(theta).dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        space.outputs(theta.double())


# -- cost ----------------------------------------------------------------------------
def _autograd_cost_grad(model, inputs, targets, theta, by_hand):
    """∇_θ C with torch.autograd on the model itself, the loss written out by hand."""
    m = copy.deepcopy(model).to(F64)
    m.eval()
    with torch.no_grad():
        for p, t in zip(
            [p for p in m.parameters() if p.requires_grad], unflat_params(m, theta).values()
        ):
            p.copy_(t)
    c = by_hand(m(inputs.to(F64)), targets.to(F64))
    grads = torch.autograd.grad(c, [p for p in m.parameters() if p.requires_grad])
    return c.detach(), torch.cat([g.reshape(-1) for g in grads])


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@given(data=st.data())
def test_cost_and_cost_grad_against_autograd(chunk_size, loss, data):
    p = data.draw(mlp_problems(loss))
    by_hand = mse_by_hand if loss == "mse" else ce_by_hand
    space = p.space(loss, chunk_size=chunk_size)
    theta = perturbed_point(space, seed=p.spec.seed)
    y = p.targets.to(F64)
    if loss != "mse":  # float32 softmax rows, made exact in float64 (as documented)
        y = y / y.sum(1, keepdim=True)
    torch.testing.assert_close(space.targets, y, rtol=1e-15, atol=0)
    c_ref, g_ref = _autograd_cost_grad(p.model, p.inputs, y, theta, by_hand)
    torch.testing.assert_close(space.cost(theta), c_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(space.cost_grad(theta), g_ref, rtol=1e-10, atol=1e-12)
    x = space.outputs(theta)
    xr = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(by_hand(xr.view(p.spec.num_samples, -1), y), xr)
    torch.testing.assert_close(space.output_cost_grad(theta), gx, rtol=1e-12, atol=1e-12)


def test_cost_hessian_through_cost_grad(mlp_problem):
    """cost_grad stays differentiable: jacfwd/jacrev of it is the autograd Hessian of C."""
    p = mlp_problem
    space = p.space()
    theta = perturbed_point(space)
    m = copy.deepcopy(p.model).to(F64)

    def cost(t):
        out = torch.func.functional_call(m, unflat_params(m, t), (p.inputs.to(F64),))
        return mse_by_hand(out, p.targets.to(F64))

    h_ref = torch.autograd.functional.hessian(cost, theta)
    torch.testing.assert_close(torch.func.jacfwd(space.cost_grad)(theta), h_ref)
    torch.testing.assert_close(torch.func.jacrev(space.cost_grad)(theta), h_ref)


def test_output_space_cost_helpers(ce_problem):
    space = ce_problem.space("cross_entropy")
    x = space.outputs(space.initial_point())
    y = ce_problem.targets.to(F64)
    y = y / y.sum(1, keepdim=True)
    xs = x.view(space.num_samples, -1)
    torch.testing.assert_close(space.output_cost(x), ce_by_hand(xs, y))
    torch.testing.assert_close(space.output_grad(x), (torch.softmax(xs, 1) - y).reshape(-1))
    v = torch.randn(space.output_dim, dtype=F64)
    h = torch.autograd.functional.hessian(lambda z: ce_by_hand(z.view_as(xs), y), x)
    torch.testing.assert_close(space.output_hvp(x, v), h @ v)


# -- back to torch -------------------------------------------------------------------
def test_to_model_and_load_into_round_trip(mlp_problem):
    p = mlp_problem
    space = p.space()
    theta = perturbed_point(space)
    model = space.to_model(theta)  # in the user's float32
    assert isinstance(model, nn.Module) and not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(p.inputs).reshape(-1), space.outputs(theta).float())
    torch.testing.assert_close(flat_params(model, torch.float32), theta.float(), rtol=0, atol=0)
    # load into a float64 copy of the user's model: exact round trip
    m64 = copy.deepcopy(p.model).to(F64)
    assert space.load_into(m64, theta) is m64
    torch.testing.assert_close(flat_params(m64), theta, rtol=0, atol=0)
    again = replace(p, model=m64).space()
    torch.testing.assert_close(again.initial_point(), theta, rtol=0, atol=0)
    # into a float32 model: cast, dtype kept
    m32 = copy.deepcopy(p.model)
    space.load_into(m32, theta)
    assert next(m32.parameters()).dtype == torch.float32
    torch.testing.assert_close(flat_params(m32, torch.float32), theta.float())
    with pytest.raises(ValueError, match="no parameters named"):
        space.load_into(nn.Linear(2, 2), theta)


def test_user_model_is_not_mutated(mlp_problem):
    p = mlp_problem
    p.model.train()
    before = {n: t.detach().clone() for n, t in p.model.state_dict().items()}
    space = p.space()
    theta = perturbed_point(space)
    space.jacobian(theta), space.cost_grad(theta), space.ntk(theta), space.to_model(theta)
    assert p.model.training
    for n, t in p.model.state_dict().items():
        assert t.dtype == torch.float32
        assert torch.equal(t, before[n]), n
    assert all(p.requires_grad for p in p.model.parameters())


@pytest.mark.parametrize(
    "layer",
    [nn.Dropout(0.5), nn.BatchNorm1d(6)],
    ids=["dropout", "batchnorm"],
)
def test_train_mode_layers_warn_and_give_deterministic_jacobian(layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), layer, nn.Tanh(), nn.Linear(6, 2))
    model.train()
    X, Y = torch.randn(5, 3), torch.randn(5, 2)
    with pytest.warns(UserWarning, match="train mode"):
        space = sr.ParameterSpace(model, X, Y)
    assert model.training and model[1].training  # the user's module is untouched
    theta = perturbed_point(space)
    d1, d2 = space.jacobian(theta), space.jacobian(theta)
    assert torch.equal(d1, d2)
    # D is that of the eval-mode network
    torch.testing.assert_close(d1, reference_jacobian(model, X, theta), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(space.outputs(theta), reference_outputs(model, X, theta))


def test_eval_mode_layers_do_not_warn(recwarn):
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 2)).eval()
    sr.ParameterSpace(model, torch.randn(4, 3), torch.randn(4, 2))
    assert not [w for w in recwarn if "train mode" in str(w.message)]


def test_one_output_model_returning_a_vector_and_1d_targets():
    class Squeeze(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1)  # shape [n]

    torch.manual_seed(0)
    model, X, Y = Squeeze(), torch.randn(4, 3), torch.randn(4)
    space = sr.ParameterSpace(model, X, Y)
    assert space.num_outputs == 1 and space.output_dim == 4
    theta = space.initial_point()
    torch.testing.assert_close(space.outputs(theta), reference_outputs(model, X))
    torch.testing.assert_close(space.jacobian(theta), reference_jacobian(model, X, theta))


# -- bad input -----------------------------------------------------------------------
def test_bad_sizes(small_problem):
    model = small_problem.model
    with pytest.raises(ValueError, match="disagree on N"):
        sr.ParameterSpace(model, torch.randn(5, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="model has 2 outputs per sample but targets have 3"):
        sr.ParameterSpace(model, torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="model has 2 outputs per sample but targets have 1"):
        sr.ParameterSpace(model, torch.randn(5, 3), torch.randn(5))
    with pytest.raises(ValueError, match=r"targets must have shape \(N, Q\)"):
        sr.ParameterSpace(model, torch.randn(5, 3), torch.randn(5, 2, 1))
    with pytest.raises(ValueError, match="N >= 1"):
        sr.ParameterSpace(model, torch.randn(0, 3), torch.randn(0, 2))
    with pytest.raises(ValueError, match="cannot be evaluated on inputs"):
        sr.ParameterSpace(model, torch.randn(5, 4), torch.randn(5, 2))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_inputs_and_targets(bad, small_problem):
    model, X, Y = small_problem.model, small_problem.inputs, small_problem.targets
    Xb, Yb = X.clone(), Y.clone()
    Xb[2, 1] = bad
    Yb[4, 0] = bad
    with pytest.raises(ValueError, match="inputs contain NaN or inf"):
        sr.ParameterSpace(model, Xb, Y)
    with pytest.raises(ValueError, match="targets contain NaN or inf"):
        sr.ParameterSpace(model, X, Yb)


def test_non_finite_outputs(small_problem):
    model, X, Y = small_problem.model, small_problem.inputs, small_problem.targets
    space = small_problem.space()
    theta = space.initial_point()
    theta[0] = math.nan
    for method in ("outputs", "cost", "cost_grad", "output_cost_grad"):
        with pytest.raises(ValueError, match="outputs contain NaN or inf"):
            getattr(space, method)(theta)
    assert issubclass(sr.NonFiniteError, ValueError)
    # outputs that overflow to inf at a large theta
    exp_model = nn.Sequential(nn.Linear(3, 2))
    space = sr.ParameterSpace(lambda_module(exp_model), X, Y)
    big = space.initial_point() + 1e3
    with pytest.raises(sr.NonFiniteError, match="NaN or inf"):
        space.outputs(big)
    # a model whose outputs are already NaN at its own parameters
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="model outputs contain NaN or inf"):
        sr.ParameterSpace(model, X, Y)


class lambda_module(nn.Module):  # noqa: N801
    """exp of a linear map: finite at small θ, inf at large θ."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.exp(self.inner(x))


def test_cross_entropy_targets_off_the_simplex():
    model = make_mlp((3, 4, 3), seed=0)
    X = torch.randn(4, 3)
    y = torch.full((4, 3), 1 / 3)
    neg = y.clone()
    neg[1] = torch.tensor([1.2, -0.2, 0.0])
    with pytest.raises(ValueError, match="probability vectors.*negative"):
        sr.ParameterSpace(model, X, neg, "cross_entropy")
    off = y.clone()
    off[2] = torch.tensor([0.5, 0.25, 0.125])
    with pytest.raises(ValueError, match=r"row 2 sums to 0\.875, not 1"):
        sr.ParameterSpace(model, X, off, "cross_entropy")
    with pytest.raises(ValueError, match="at least 2 classes"):
        sr.ParameterSpace(make_mlp((3, 1)), X, torch.randint(0, 3, (4,)), "cross_entropy")
    # one-hot rows are fine, and so is MSE with the same targets
    sr.ParameterSpace(model, X, torch.eye(3)[[0, 1, 2, 0]], "cross_entropy")
    sr.ParameterSpace(model, X, off, "mse")


def test_no_trainable_parameters(small_problem):
    model = small_problem.model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        sr.ParameterSpace(model, torch.randn(5, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="no trainable parameters"):
        sr.ParameterSpace(nn.Tanh(), torch.randn(5, 3), torch.randn(5, 3))


def test_bad_theta(space):
    k = space.dim
    with pytest.raises(ValueError, match=rf"theta must have shape \({k},\)"):
        space.outputs(torch.zeros(k + 1, dtype=F64))
    with pytest.raises(ValueError, match="theta must have shape"):
        space.jacobian(torch.zeros(2, k, dtype=F64))
    with pytest.raises(TypeError, match="theta must have dtype torch.float64"):
        space.outputs(torch.zeros(k, dtype=torch.float32))
    with pytest.raises(TypeError, match="theta must have dtype"):
        space.cost_grad(torch.zeros(k, dtype=torch.int64))
    with pytest.raises(TypeError, match="theta must be a torch.Tensor"):
        space.outputs([0.0] * k)
    with pytest.raises(TypeError, match="theta must be a torch.Tensor"):
        space.outputs(space.initial_point().numpy())
    with pytest.raises(ValueError, match=r"tangent_vec must have shape \[\.\.\., "):
        space.jvp(space.initial_point(), torch.zeros(k - 1, dtype=F64))
    with pytest.raises(ValueError, match="output_covec must have shape"):
        space.vjp(space.initial_point(), torch.zeros(k, dtype=F64))


def test_unsupported_models():
    X, Y = torch.randn(5, 3), torch.randn(5, 2)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x), x

    class Cube(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x):
            return self.lin(x).view(-1, 2, 2)

    class BatchMean(nn.Module):  # reduces over the batch: no per-sample outputs
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x).mean(0)

    with pytest.raises(ValueError, match="model must return a Tensor, got tuple"):
        sr.ParameterSpace(Pair(), X, Y)
    with pytest.raises(ValueError, match=r"model output must have shape \(n, Q\)"):
        sr.ParameterSpace(Cube(), X, Y)
    with pytest.raises(ValueError, match=r"model output must have shape \(n, Q\)"):
        sr.ParameterSpace(BatchMean(), X, torch.randn(5, 1))


def test_bad_types_and_options(small_problem):
    model, X, Y = small_problem.model, small_problem.inputs, small_problem.targets
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sr.ParameterSpace(lambda x: x, X, Y)
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        sr.ParameterSpace(model, X.numpy(), Y)
    with pytest.raises(TypeError, match="targets must be a torch.Tensor"):
        sr.ParameterSpace(model, X, Y.tolist())
    with pytest.raises(TypeError, match="dtype must be"):
        sr.ParameterSpace(model, X, Y, dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown loss"):
        sr.ParameterSpace(model, X, Y, "hinge")
    with pytest.raises(ValueError, match="backend must be"):
        sr.ParameterSpace(model, X, Y, backend="magic")


@given(mlp_specs(max_depth=1))
def test_specs_strategy_draws_valid_models(spec):
    p = make_problem(spec)
    assert p.inputs.shape == (spec.num_samples, spec.num_inputs)
    assert p.targets.shape == (spec.num_samples, spec.num_outputs)
    assert sum(t.numel() for t in p.model.parameters()) == spec.num_params


@pytest.mark.parametrize(
    "layer, inputs",
    [
        (nn.InstanceNorm1d(2, affine=True, track_running_stats=True), (5, 1, 4)),
        (nn.RReLU(), (5, 1, 4)),
        (nn.LazyBatchNorm1d(), (5, 1, 4)),
    ],
    ids=["instancenorm_running_stats", "rrelu", "lazy_batchnorm"],
)
def test_train_mode_layers_with_other_eval_behaviour_warn(layer, inputs):
    """Every layer whose train-mode output differs from its eval-mode one is named."""
    torch.manual_seed(0)
    if isinstance(layer, nn.LazyBatchNorm1d):
        layer(torch.randn(3, 2, 3))  # materialize
        layer.reset_running_stats()
    model = nn.Sequential(nn.Conv1d(1, 2, 2), layer, nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():  # running statistics differ from the batch's
        for buf in ("running_mean", "running_var"):
            if getattr(layer, buf, None) is not None:
                getattr(layer, buf).fill_(0.5)
    model.train()
    X, Y = torch.randn(*inputs), torch.randn(5, 2)
    with pytest.warns(UserWarning, match=r"train mode \(1\)"):
        space = sr.ParameterSpace(model, X, Y)
    theta = space.initial_point()
    torch.testing.assert_close(space.outputs(theta), reference_outputs(model, X, theta))


class _SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.MultiheadAttention(4, 2, dropout=0.3, batch_first=True)
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(self.inner(x, x, x)[0].mean(1))


class _DeepLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.LSTM(4, 3, num_layers=2, dropout=0.3, batch_first=True)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(self.inner(x)[0].mean(1))


@pytest.mark.parametrize("model", [_SelfAttention, _DeepLSTM], ids=["attention", "rnn"])
def test_train_mode_dropout_inside_attention_and_rnns_warns(model):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"train mode \(inner\)"):
        sr.ParameterSpace(model().train(), torch.randn(4, 2, 4), torch.randn(4, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no dropout in eval mode: no warning
        warnings.filterwarnings("ignore", "structured NTK engine")
        sr.ParameterSpace(model().eval(), torch.randn(4, 2, 4), torch.randn(4, 2))


# -- point 7 of issue 13: bad-input leftovers ----------------------------------------
def test_jacobian_and_ntk_at_a_nan_theta_raise_like_outputs(small_problem):
    space = small_problem.space()
    theta = space.initial_point()
    theta[0] = math.nan
    for method in ("outputs", "jacobian", "ntk"):
        with pytest.raises(sr.NonFiniteError, match="NaN or inf"):
            getattr(space, method)(theta)


@pytest.mark.parametrize("which", ["targets", "inputs"])
def test_complex_data_is_refused(which, small_problem):
    X, Y = small_problem.inputs, small_problem.targets
    if which == "targets":
        Y = Y.to(torch.complex64)
    else:
        X = X.to(torch.complex64)
    with pytest.raises(TypeError, match=f"{which} must be real.*complex64"):
        sr.ParameterSpace(small_problem.model, X, Y)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size_is_refused(chunk_size, small_problem):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        small_problem.space(chunk_size=chunk_size)


def test_to_model_has_the_users_dtype(small_problem):
    model, X = small_problem.model, small_problem.inputs  # float32, as users build them
    space = small_problem.space()
    theta = perturbed_point(space)
    back = space.to_model(theta)
    assert all(p.dtype == torch.float32 for p in back.parameters())
    with torch.no_grad():
        out = back(X)  # the user's float32 inputs
    torch.testing.assert_close(out.reshape(-1), space.outputs(theta).float())
    torch.testing.assert_close(flat_params(back, torch.float32), theta.float(), rtol=0, atol=0)
    # a float64 model stays float64, bit-exact
    space64 = replace(small_problem, model=copy.deepcopy(model).double()).space()
    back64 = space64.to_model(theta)
    torch.testing.assert_close(flat_params(back64), theta, rtol=0, atol=0)


def test_a_model_that_cannot_be_copied_gets_a_one_line_error():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old weight_norm is deprecated
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="cannot be copied.*parametrizations.weight_norm") as info:
        sr.ParameterSpace(model, torch.randn(5, 3), torch.randn(5, 2))
    assert "\n" not in str(info.value)


def test_point_state_follows_values_and_in_place_changes():
    """The point cache is keyed on the values of theta: a copy finds the state, an in-place
    change (the tensor that found it before) gets a new state at the new values, and the
    cost gradient served from it matches a fresh space's (the reference)."""
    problem = make_problem(MLPSpec((3, 5, 2), "tanh", num_samples=6, seed=4))
    space = problem.space()
    th = space.initial_point()
    state = space.point_state(th)
    assert space.point_state(th) is state and space.point_state(th.clone()) is state
    th[0] += 0.25  # in place: the same tensor now names another point
    moved = space.point_state(th)
    assert moved is not state and torch.equal(moved.theta, th)
    ref = problem.space().cost_grad(th.clone())
    assert torch.equal(moved.cost_grad, ref)
    th[0] -= 0.25
    back = space.point_state(th)
    assert torch.equal(back.theta, th) and torch.equal(state.theta, space.initial_point())
