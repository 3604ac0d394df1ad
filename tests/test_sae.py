import pytest
import torch
from conftest import random_sae

import splinterp as sp
from splinterp.errors import ConfigError, DeviceError, DTypeError, NonFiniteError, ShapeError
from splinterp.sae import topk_indices

ARCHS = sp.ARCHITECTURES


def dense_reference(sae, x):
    """The activation rules written out longhand, independently of SAE.select."""
    W, b = sae.W_enc, getattr(sae, "b_enc", None)
    xin = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    arch = sae.cfg.architecture
    if arch == "gated":
        gate = (xin @ W + sae.b_gate) > 0
        mag = xin @ (W * sae.r_mag.exp()) + sae.b_mag
        return gate * torch.relu(mag)
    u = xin @ W + b
    if arch == "relu":
        return torch.relu(u)
    if arch == "jumprelu":
        return u * (u > sae.threshold)
    if arch == "topk":
        v, i = u.topk(sae.cfg.k, dim=-1)
        return torch.zeros_like(u).scatter(-1, i, torch.relu(v))
    v, i = u.abs().topk(sae.cfg.k, dim=-1)
    return torch.zeros_like(u).scatter(-1, i, u.gather(-1, i))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("b_dec_in", [False, True])
def test_encode_matches_longhand_rules(arch, b_dec_in):
    sae = random_sae(arch, apply_b_dec_to_input=b_dec_in)
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(3))
    z = sae.encode(x)
    torch.testing.assert_close(z, dense_reference(sae, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), z @ sae.W_dec + sae.b_dec)
    if arch in ("topk", "topk_abs"):
        assert int((z != 0).sum(1).max()) <= sae.cfg.k


def test_gated_equals_its_jumprelu_form():
    sae = random_sae("gated")
    W, b = sae.encoder_affine()
    theta = sae.thresholds()
    x = torch.randn(500, 6)
    u = x @ W + b
    torch.testing.assert_close(sae.encode(x), u * (u > theta))


def test_parameter_names_and_shapes_follow_saelens():
    sae = sp.make_sae(7, 11, "jumprelu")
    shapes = {n: tuple(p.shape) for n, p in sae.named_parameters()}
    assert shapes == {"W_enc": (7, 11), "W_dec": (11, 7), "b_dec": (7,), "b_enc": (11,), "threshold": (11,)}
    gated = {n for n, _ in sp.make_sae(7, 11, "gated").named_parameters()}
    assert gated == {"W_enc", "W_dec", "b_dec", "b_gate", "b_mag", "r_mag"}


def test_tied_decoder_is_encoder_transpose():
    sae = sp.make_sae(5, 9, "relu", tied=True)
    assert "W_dec" not in dict(sae.named_parameters())
    assert torch.equal(sae.W_dec, sae.W_enc.T)


def test_init_is_seeded_and_decoder_rows_unit_norm():
    a, b, c = sp.make_sae(5, 9, seed=1, k=2), sp.make_sae(5, 9, seed=1, k=2), sp.make_sae(5, 9, seed=2, k=2)
    assert torch.equal(a.W_enc, b.W_enc) and not torch.equal(a.W_enc, c.W_enc)
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(9))


def test_topk_ties_go_to_lower_index():
    s = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert topk_indices(s, 2).tolist() == [[1, 2], [0, 1]]
    assert topk_indices(s, 4).tolist() == [[1, 2, 3, 0], [0, 1, 2, 3]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_in=4, d_sae=8, architecture="topk", k=9), "k must be"),
        (dict(d_in=4, d_sae=8, architecture="topk", k=0), "k must be"),
        (dict(d_in=4, d_sae=8, architecture="topk"), "needs k"),
        (dict(d_in=4, d_sae=8, architecture="relu", k=2), "does not use k"),
        (dict(d_in=4, d_sae=8, architecture="softmax"), "architecture must be"),
        (dict(d_in=0, d_sae=8, architecture="relu"), "d_in"),
        (dict(d_in=4, d_sae=8, architecture="relu", dtype="int8"), "dtype"),
    ],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        sp.SAEConfig(**kwargs)


def test_bad_input_is_named():
    sae = sp.make_sae(4, 8, "topk", k=2)
    with pytest.raises(ShapeError, match="d_in=4"):
        sae.encode(torch.zeros(3, 5))
    with pytest.raises(DTypeError, match="float64"):
        sae.encode(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(DTypeError, match="floating"):
        sae(torch.zeros(3, 4, dtype=torch.int64))
    x = torch.zeros(3, 4)
    x[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="row 2"):
        sae(x)
    with pytest.raises(ShapeError, match="d_sae=8"):
        sae.decode(torch.zeros(3, 4))
    if torch.cuda.is_available():
        with pytest.raises(DeviceError):
            sae(torch.zeros(3, 4, device="cuda"))


def test_leading_batch_dims_are_kept():
    sae = sp.make_sae(4, 8, "topk", k=2)
    assert sae(torch.randn(2, 3, 4)).shape == (2, 3, 4)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated"])
def test_a_batch_where_no_latent_fires_decodes_to_b_dec(arch):
    sae = random_sae(arch)
    with torch.no_grad():
        (sae.b_gate if arch == "gated" else sae.b_enc).fill_(-1e3)
    x = torch.randn(4, 6)
    y = sae(x)
    torch.testing.assert_close(y, sae.b_dec.expand(4, 6))
    torch.testing.assert_close(y, sae(x, dense=True))
    y.sum().backward()
    torch.testing.assert_close(sae.b_dec.grad, torch.full((6,), 4.0))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_untied_weights_own_their_storage_and_w_enc_is_column_major(dtype):
    """W_enc is stored column-major (the sparse backward's gradient layout) and never aliases W_dec."""
    sae = sp.make_sae(5, 12, "topk", 3, dtype=dtype)
    assert sae.W_enc.T.is_contiguous()
    assert sae.W_enc.untyped_storage().data_ptr() != sae.W_dec.untyped_storage().data_ptr()
    with torch.no_grad():
        sae.W_enc.zero_()
    assert sae.W_dec.abs().sum() > 0
