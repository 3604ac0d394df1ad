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
    """Gated (Rajamanoharan et al. 2024) from its definition, in float64 from the raw parameters:
    z = 1[x W_enc + b_gate > 0] * relu(x (W_enc exp(r_mag)) + b_mag). Both `encode` and the folded
    JumpReLU form u * (u > theta) that the geometry uses must equal it."""
    sae = random_sae("gated")
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(4))
    P = {n: p.detach().double() for n, p in sae.named_parameters()}
    xd = x.double()
    gate = (xd @ P["W_enc"] + P["b_gate"]) > 0
    z_ref = gate * torch.relu(xd @ (P["W_enc"] * torch.exp(P["r_mag"])) + P["b_mag"])
    assert 0.2 < float((z_ref != 0).double().mean()) < 0.8  # both cases occur
    torch.testing.assert_close(sae.encode(x).double(), z_ref, rtol=1e-5, atol=1e-5)
    W, b = sae.encoder_affine()
    u = (x @ W + b).double()
    torch.testing.assert_close(u * (u > sae.thresholds().double()), z_ref, rtol=1e-5, atol=1e-5)


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
@pytest.mark.parametrize("order", ["matmul", "linear"])
def test_w_enc_layout_follows_the_score_order_and_never_aliases_w_dec(dtype, order):
    """W_enc is held as the library holds it: row-major for SAELens's x @ W_enc, its transpose row-major for
    nn.Linear (float16 matmuls on CPU round differently for a transposed operand)."""
    sae = sp.make_sae(5, 12, "topk", 3, dtype=dtype, score_order=order)
    assert (sae.W_enc.is_contiguous(), sae.W_enc.T.is_contiguous()) == (order == "matmul", order == "linear")
    assert sae.W_enc.untyped_storage().data_ptr() != sae.W_dec.untyped_storage().data_ptr()
    with torch.no_grad():
        sae.W_enc.zero_()
    assert sae.W_dec.abs().sum() > 0


# ------------------------------------------------------------------------------------ score order (issue: bf16)
def _rounding_sensitive_sae(arch: str, dtype: str, order: str, b_dec_in: bool = True) -> sp.SAE:
    sae = random_sae(arch, d_in=64, d_sae=256, k=16, apply_b_dec_to_input=b_dec_in, dtype=dtype, score_order=order)
    with torch.no_grad():  # a large b_dec: folding it into the bias then rounds very differently
        sae.b_dec.mul_(8)
    return sae


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("order", ["matmul", "linear"])
def test_scores_are_rounded_in_the_library_order_bit_for_bit(dtype, order):
    """pre_acts = (x - b_dec) @ W_enc + b_enc (SAELens) or F.linear(x - b_dec, W_enc.T, b_enc) (nn.Linear), bit for
    bit, written out longhand here; the folded form x @ W + (b - b_dec @ W) that splinterp used before rounds
    differently (so this comparison can fail)."""
    sae = _rounding_sensitive_sae("relu", dtype, order)
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(0)).to(sae.dtype) * 3
    with torch.no_grad():
        xin = x - sae.b_dec
        if order == "matmul":
            want = xin @ sae.W_enc.detach().contiguous() + sae.b_enc
        else:
            want = torch.nn.functional.linear(xin, sae.W_enc.detach().T.contiguous(), sae.b_enc)
        got = sae.pre_acts(x)
        folded = x @ sae.W_enc + (sae.b_enc - sae.b_dec @ sae.W_enc)
    assert torch.equal(got, want)
    if dtype != "float32":
        assert not torch.equal(folded, want)
    z = sae.encode(x)
    assert torch.equal(z, want * (want > 0))  # encode uses exactly these scores
    assert torch.equal(sae.active(x), want > 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("order", ["matmul", "linear"])
def test_gated_gate_path_is_computed_as_the_library_does(dtype, order):
    """SAELens: gate (x_in @ W_enc + b_gate) > 0, magnitude x_in @ (W_enc * exp(r_mag)) + b_mag; dictionary_learning
    ("linear"): one x_enc = x_in @ W_enc, gate x_enc + b_gate > 0, magnitude exp(r_mag) * x_enc + b_mag."""
    sae = _rounding_sensitive_sae("gated", dtype, order)
    x = torch.randn(500, 64, generator=torch.Generator().manual_seed(1)).to(sae.dtype) * 3
    with torch.no_grad():
        xin = x - sae.b_dec
        if order == "matmul":
            gate = (xin @ sae.W_enc + sae.b_gate) > 0
            mag = xin @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
        else:
            xe = xin @ sae.W_enc
            gate = (xe + sae.b_gate) > 0
            mag = sae.r_mag.exp() * xe + sae.b_mag
        want = gate * torch.relu(mag)
        assert torch.equal(sae.encode(x), want)
        assert torch.equal(sae.encode(x, dense=True), want)
        assert torch.equal(sp.geometry.active_mask(sae, x), want != 0)
        assert torch.equal(sae.select(sae.pre_acts(x), x), want != 0)


def test_topk_tie_rules_against_torch_topk():
    """lowest_index: the canonical rule; "torch": the set torch.topk picks (what SAELens gets on the same scores);
    "torch_relu": the set torch.topk picks from relu(scores) (sparsify, dictionary_learning)."""
    u = torch.zeros(1, 10)
    torch_pick = set(torch.topk(u, 3).indices[0].tolist())
    assert topk_indices(u, 3).tolist() == [[0, 1, 2]]
    assert set(topk_indices(u, 3, "torch")[0].tolist()) == torch_pick
    assert torch_pick != {0, 1, 2}  # torch.topk does not take the lowest indices, so the rules really differ
    v = torch.tensor([[-1.0, 2.0, -3.0, 2.0, 2.0, -0.5, 2.0]])
    relu_pick = set(torch.topk(torch.relu(v), 2).indices[0].tolist())
    assert set(topk_indices(v, 2, "torch_relu")[0].tolist()) == relu_pick
    idx = topk_indices(torch.tensor([[1.0, 5.0, 3.0, 5.0, 4.0]]), 4, "torch")
    assert idx.tolist() == [[1, 3, 4, 2]]  # the canonical order: decreasing score, then increasing index


@pytest.mark.parametrize("ties", ["lowest_index", "torch", "torch_relu"])
def test_encode_and_geometry_share_the_tie_rule_on_tied_bf16_rows(ties):
    sae = random_sae("topk", d_in=64, d_sae=512, k=16, dtype="bfloat16", topk_ties=ties, apply_b_dec_to_input=True)
    x = torch.randn(400, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16) * 2
    with torch.no_grad():
        u = sae.pre_acts(x)
        srt = u.float().sort(-1, descending=True).values
        assert int((srt[:, 15] == srt[:, 16]).sum()) > 10  # tied rows are common in bfloat16
        z = sae.encode(x)
        assert torch.equal(sae.encode(x, dense=True), z)
        assert torch.equal(sp.geometry.active_mask(sae, x), z != 0)
        assert torch.equal(z != 0, (sae.encode_sparse(x)[0] != 0).new_zeros(z.shape).scatter_(
            -1, sae.encode_sparse(x)[1], sae.encode_sparse(x)[0] != 0))


# ------------------------------------------------------------------------------------ hook_z
def test_hook_z_sae_takes_heads_input_as_saelens_does():
    sae = random_sae("relu", d_in=12, d_sae=20, reshape_activations="hook_z")
    x = torch.randn(5, 7, 3, 4, generator=torch.Generator().manual_seed(0))  # [batch, pos, n_heads, d_head]
    flat = x.reshape(5, 7, 12)
    assert torch.equal(sae.encode(x), sae.encode(flat))
    assert sae(x).shape == x.shape
    assert torch.equal(sae(x), sae(flat).reshape(x.shape))
    with pytest.raises(ShapeError, match="d_in=12"):
        sae.encode(torch.randn(5, 3, 5))  # 15 values per row: not n_heads * d_head = 12
    with pytest.raises(ShapeError, match="d_in=12"):
        random_sae("relu", d_in=12, d_sae=20).encode(x)  # only hook_z SAEs reshape


# ------------------------------------------------------------------------------------ from_weights
def test_from_weights_reads_either_orientation_and_refuses_a_square_guess():
    ref = random_sae("jumprelu", d_in=6, d_sae=20, apply_b_dec_to_input=True)
    W, b, Wd, bd, th = (ref.W_enc.detach(), ref.b_enc.detach(), ref.W_dec.detach(), ref.b_dec.detach(),
                        ref.threshold.detach())
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    a = sp.SAE.from_weights(W, b, Wd, bd, architecture="jumprelu", threshold=th, apply_b_dec_to_input=True)
    lin = sp.SAE.from_weights(W.T, b, Wd.T, bd, architecture="jumprelu", threshold=th.numpy(),
                              apply_b_dec_to_input=True)
    assert a.cfg.score_order == "matmul" and lin.cfg.score_order == "linear"
    with torch.no_grad():
        assert torch.equal(a.encode(x), ref.encode(x))
        torch.testing.assert_close(lin(x), ref(x))
    with pytest.raises(ConfigError, match="orientation"):  # square and no way to tell
        sp.SAE.from_weights(torch.randn(6, 6), torch.zeros(6), torch.randn(6, 6), torch.zeros(6))
    sq = sp.SAE.from_weights(torch.eye(6) * 2, torch.zeros(6), orientation="linear")
    assert sq.cfg.tied and sq.cfg.score_order == "linear"
    with pytest.raises(ConfigError, match="pass b_dec and b_enc"):  # not square, but no bias says which is which
        sp.SAE.from_weights(torch.randn(6, 20))
    with pytest.raises(ShapeError, match="fits neither"):
        sp.SAE.from_weights(W, torch.zeros(7), Wd, bd)
    with pytest.raises(ConfigError, match="threshold"):
        sp.SAE.from_weights(W, b, Wd, bd, architecture="jumprelu")
    g = sp.SAE.from_weights(W, None, Wd, bd, architecture="jumprelu", threshold=torch.tensor(0.3))
    assert torch.equal(g.threshold, torch.full((20,), 0.3))  # one global threshold (BatchTopK at inference)


@pytest.mark.parametrize("ties", ["lowest_index", "torch", "torch_relu"])
@pytest.mark.parametrize("order", ["matmul", "linear"])
@pytest.mark.parametrize("arch", ["topk", "topk_abs"])
def test_sparse_topk_path_uses_the_same_scores_and_rule_as_the_dense_one(arch, order, ties):
    """float32 on CPU takes the fused selection (numba, when installed) only for lowest_index; with score_order
    "linear" the bias is already inside the matmul there. Sparse and dense codes must be the same bits."""
    if arch == "topk_abs" and ties == "torch_relu":
        pytest.skip("relu-then-topk is a topk rule")
    sae = random_sae(arch, d_in=32, d_sae=300, k=7, apply_b_dec_to_input=True, score_order=order, topk_ties=ties)
    x = torch.randn(600, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        u = sae.pre_acts(x)
        z = sae.encode(x)
        assert torch.equal(z, sae.encode(x, dense=True))
        vals, idx = sae.encode_sparse(x)
        assert torch.equal(torch.zeros_like(z).scatter_(-1, idx, vals), z)
        assert torch.equal(sae.encode_sparse(x, dense=True)[1], idx)
        s = u.abs() if arch == "topk_abs" else u
        kth = s.sort(-1, descending=True).values[:, 6:7]
        assert torch.equal((z != 0), (s >= kth) & ((u > 0) if arch == "topk" else (u != 0)))  # the top 7, no ties
