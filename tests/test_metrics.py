"""Metrics against values worked out by hand, streaming == one batch, and evaluate() on models."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score

import splinterp as sp
from splinterp import metrics as M
from splinterp.errors import ConfigError, DTypeError, EmptyDataError, NotAModelError, ShapeError

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
XH = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
Z = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 3.0]])


pytestmark = pytest.mark.usefixtures("one_thread")


def test_reconstruction_metrics_by_hand():
    # residuals (0, 2) and (0, 1): sum of squares 5 over 4 elements and 2 rows
    assert M.mse(X, XH) == pytest.approx(1.25)
    assert M.mse(X, XH, reduction="sum_per_token") == pytest.approx(2.5)
    # mean(x) = (2, 3); sum |x - mean|^2 = 2 + 2 = 4  ->  EV = 1 - 5/4
    assert M.explained_variance(X, XH) == pytest.approx(-0.25)
    assert M.fvu(X, XH) == pytest.approx(1.25)
    # cos: (1,2).(1,0) / (sqrt5 * 1) and (3,4).(3,3) / (5 * 3 sqrt2)
    assert M.cossim(X, XH) == pytest.approx((1 / math.sqrt(5) + 21 / (15 * math.sqrt(2))) / 2)
    assert M.l2_ratio(X, XH) == pytest.approx((1 / math.sqrt(5) + 3 * math.sqrt(2) / 5) / 2)
    # E|x_hat|^2 / E<x, x_hat> = (1 + 18) / (1 + 21)
    assert M.relative_reconstruction_bias(X, XH) == pytest.approx(19 / 22)


def test_sparsity_metrics_by_hand():
    assert M.l0(Z) == pytest.approx(1.5)
    assert M.l1(Z) == pytest.approx(3.0)
    assert M.feature_density(Z).tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert M.dead_features(Z) == 1
    assert M.frac_alive(Z) == pytest.approx(2 / 3)


def test_perfect_and_mean_reconstruction():
    x = torch.randn(50, 6)
    assert M.explained_variance(x, x) == pytest.approx(1.0)
    assert M.relative_reconstruction_bias(x, 0.5 * x) == pytest.approx(0.5)
    mean = x.mean(0, keepdim=True).expand_as(x)
    assert M.explained_variance(x, mean) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(M.explained_variance(torch.ones(4, 3), torch.zeros(4, 3)))


def test_explained_variance_is_variance_weighted_r2():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 7, generator=g, dtype=torch.float64) * torch.arange(1, 8)
    xh = x + 0.3 * torch.randn(200, 7, generator=g, dtype=torch.float64)
    ref = r2_score(x.numpy(), xh.numpy(), multioutput="variance_weighted")
    assert M.explained_variance(x, xh) == pytest.approx(ref, rel=1e-10)


def test_streaming_equals_one_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(103, 5, generator=g) + 4.0  # offset: a naive sum-of-squares would lose digits
    xh = x + 0.1 * torch.randn(103, 5, generator=g)
    z = torch.relu(torch.randn(103, 9, generator=g))
    z[:, 3] = 0
    full = M.MetricAccumulator().update(x, xh, z).compute()
    acc = M.MetricAccumulator()
    for a, b in ((0, 10), (10, 11), (11, 50), (50, 103)):
        acc.update(x[a:b], xh[a:b], z[a:b])
    streamed = acc.compute()
    assert set(full) == set(streamed)
    for k in full:
        assert streamed[k] == pytest.approx(full[k], rel=1e-10, abs=1e-12), k
    assert full["dead_features"] == 1
    assert full["mse"] == pytest.approx(float(((x - xh) ** 2).mean()), rel=1e-6)


class _ScaleModel:
    """A stand-in for the reference autoencoders: encode/decode only, numpy codes."""

    def encode(self, x):
        return (2 * x).numpy()

    def decode(self, z):
        return torch.from_numpy(z) / 4


def test_evaluate_any_model_and_iterables():
    x = torch.randn(30, 4)
    out = M.evaluate(_ScaleModel(), x, batch_size=7)
    assert out["mse"] == pytest.approx(float(((x - x / 2) ** 2).mean()), rel=1e-6)
    assert out["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert out["l0"] == pytest.approx(4.0)
    assert out["n_tokens"] == 30
    out2 = M.evaluate(_ScaleModel(), [x[:13], x[13:]], batch_size=7)
    assert out2["mse"] == pytest.approx(out["mse"], rel=1e-12)
    assert M.evaluate(_ScaleModel(), x.numpy())["mse"] == pytest.approx(out["mse"], rel=1e-12)


def test_evaluate_sae_matches_manual():
    sae = sp.make_sae(6, 20, "topk", k=3, seed=2)
    x = torch.randn(40, 6)
    out = M.evaluate(sae, x, batch_size=16, return_density=True)
    with torch.no_grad():
        z = sae.encode(x)
        xh = sae.decode(z)
    assert out["mse"] == pytest.approx(M.mse(x, xh), rel=1e-6)
    assert out["l0"] == pytest.approx(M.l0(z))
    assert out["dead_features"] == M.dead_features(z)
    assert torch.equal(out["feature_density"], M.feature_density(z))
    assert out["explained_variance"] == pytest.approx(M.explained_variance(x, xh), rel=1e-6)


def test_errors():
    with pytest.raises(ShapeError):
        M.mse(X, XH[:1])
    with pytest.raises(EmptyDataError):
        M.l0(torch.zeros(0, 3))
    with pytest.raises(EmptyDataError):
        M.MetricAccumulator().compute()
    sae = sp.make_sae(6, 20, "topk", k=3)
    with pytest.raises(DTypeError):
        M.evaluate(sae, np.zeros((4, 6)))  # float64 data, float32 model: no silent cast
    with pytest.raises(ShapeError):
        M.evaluate(sae, torch.zeros(4, 5))


@pytest.mark.parametrize("arch", ["topk", "relu", "topk_abs"])
def test_evaluate_sae_sparse_path_equals_dense_codes(arch):
    sae = sp.make_sae(6, 20, arch, k=3 if arch.startswith("topk") else None, seed=3)
    with torch.no_grad():
        sae.b_enc -= 0.3  # some relu latents inactive on some rows
    x = torch.randn(64, 6)
    out = M.evaluate(sae, x, batch_size=20, return_density=True)
    with torch.no_grad():
        z = sae.encode(x, dense=True)
        xh = z @ sae.W_dec + sae.b_dec
    ref = M.MetricAccumulator().update(x, xh, z)
    for k, v in ref.compute().items():
        assert out[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert torch.equal(out["feature_density"], ref.feature_density())


@pytest.mark.parametrize("model", ["hello", b"bytes", 3.5, None, torch.zeros(3), {"encode": 1}, np.eye(3)])
def test_evaluate_refuses_what_is_not_a_model_naming_model(model):
    """`evaluate("hello", X)` used to end in str.encode's TypeError about an 'encoding' argument."""
    for f in (M.evaluate, M.accumulate):
        with pytest.raises(NotAModelError, match=f"model must have encode.* got {type(model).__name__}"):
            f(model, torch.randn(10, 4))


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "8"])
def test_evaluate_refuses_a_bad_batch_size(batch_size):
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        M.evaluate(sp.make_sae(4, 8, "relu"), torch.randn(10, 4), batch_size=batch_size)


def test_metric_settings_are_named():
    with pytest.raises(ConfigError, match="reduction must be 'mean' or 'sum_per_token'"):
        M.mse(X, XH, reduction="sum")
    for device in ("tpu", "cuda:99", 3):
        with pytest.raises(ConfigError, match="device"):
            M.evaluate(sp.make_sae(2, 4, "relu"), X, device=device)


@pytest.mark.parametrize("f", [M.mse, M.explained_variance, M.fvu, M.cossim, M.l2_ratio,
                               M.relative_reconstruction_bias])
def test_metrics_of_nan_or_integer_data_are_refused_naming_the_argument(f):
    """mse(x with a NaN, x_hat) used to return nan, and integer tensors were cast silently."""
    bad = X.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(sp.errors.NonFiniteError, match=r"^x contains a non-finite value \(nan\) at row 1"):
        f(bad, XH)
    with pytest.raises(sp.errors.NonFiniteError, match=r"^x_hat contains"):
        f(X, bad)
    with pytest.raises(DTypeError, match="^x has dtype torch.int64"):
        f(X.long(), XH.long())


@pytest.mark.parametrize("f", [M.l0, M.l1, M.feature_density, M.dead_features, M.frac_alive])
def test_sparsity_metrics_of_nan_codes_are_refused(f):
    z = Z.clone()
    z[0, 2] = float("inf")
    with pytest.raises(sp.errors.NonFiniteError, match=r"^z contains a non-finite value \(inf\) at row 0, column 2"):
        f(z)
    as_int, as_float = f(torch.tensor([[0, 3], [0, 0]])), f(torch.tensor([[0.0, 3.0], [0.0, 0.0]]))
    assert torch.equal(torch.as_tensor(as_int), torch.as_tensor(as_float))  # integer codes are fine


def test_an_array_as_reduction_is_named():
    with pytest.raises(ConfigError, match="reduction must be"):
        M.mse(X, XH, reduction=np.zeros(2))
