"""SGD and PAM-SGD trainers: configs, losses registry, what each block updates, History."""

import math

import pytest
import torch

import splinterp as sp
from splinterp import metrics
from splinterp.errors import ConfigError, DeviceError, DTypeError
from splinterp.train import (
    History,
    PAMConfig,
    SGDConfig,
    encoder_parameter_names,
    get_loss,
    register_loss,
    solve_decoder,
    train_pam_sgd,
    train_sgd,
)
from splinterp.train import losses as losses_mod

D_IN, D_SAE = 6, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed=0, n=256):
    """Non-negative mixtures of 4 fixed directions plus noise (the same distribution for every seed)."""
    basis = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    codes = torch.relu(torch.randn(n, 4, generator=g))
    return codes @ basis + 0.05 * torch.randn(n, D_IN, generator=g)


def _cfg(cls=SGDConfig, **kw):
    base = dict(epochs=2, batch_size=64, lr=1e-2, progress=False, eval_batch_size=100)
    base.update(kw)
    return cls(**base)


def test_config_validation():
    with pytest.raises(ConfigError):
        SGDConfig(lr=0)
    with pytest.raises(ConfigError):
        SGDConfig(optimizer="lbfgs")
    with pytest.raises(ConfigError):
        SGDConfig(batch_size=0)
    with pytest.raises(ConfigError):
        SGDConfig(resume=True)  # nowhere to look
    with pytest.raises(ConfigError):
        PAMConfig(order="sideways")
    with pytest.raises(ConfigError):
        PAMConfig(mu_dec=-1.0)
    with pytest.raises(ConfigError):
        SGDConfig.from_dict({"epochs": 1, "learning_rate": 1.0})
    c = PAMConfig(mu_enc=1e-3)
    assert PAMConfig.from_dict(c.to_dict()) == c


def test_pam_refuses_tied_and_b_dec_input():
    X = _data()
    with pytest.raises(ConfigError, match="untied"):
        train_pam_sgd(sp.make_sae(D_IN, D_SAE, "topk", k=3, tied=True), X, _cfg(PAMConfig))
    with pytest.raises(ConfigError, match="apply_b_dec_to_input"):
        train_pam_sgd(sp.make_sae(D_IN, D_SAE, "topk", k=3, apply_b_dec_to_input=True), X, _cfg(PAMConfig))


def test_loss_registry():
    assert get_loss("topk") is losses_mod.mse_loss
    with pytest.raises(ConfigError, match="register"):
        get_loss("no_such_architecture")
    with pytest.raises(ConfigError):
        register_loss("relu", lambda s, x, c: (x.sum(), {}))  # taken

    def custom(sae, x, cfg):
        assert cfg.loss_kwargs == {"scale": 2.0}
        z = sae._encode(x)
        m = ((z @ sae.W_dec + sae.b_dec - x) ** 2).mean()
        return cfg.loss_kwargs["scale"] * m, {"mse": m.detach(), "custom": 1.0}

    old = losses_mod._REGISTRY.get("jumprelu")
    register_loss("jumprelu", custom, overwrite=True)
    try:
        h = train_sgd(sp.make_sae(D_IN, D_SAE, "jumprelu"), _data(), _cfg(epochs=1, loss_kwargs={"scale": 2.0}))
        assert h.last["train_running_custom"] == pytest.approx(1.0)
        assert h.last["train_loss"] == pytest.approx(2 * h.last["train_running_mse"])
    finally:
        if old is None:
            losses_mod._REGISTRY.pop("jumprelu")
        else:
            losses_mod._REGISTRY["jumprelu"] = old


def test_relu_loss_is_mse_plus_l1():
    sae = sp.make_sae(D_IN, D_SAE, "relu", seed=1)
    x = _data()[:20]
    cfg = SGDConfig(l1_coefficient=0.1)
    loss, parts = get_loss("relu")(sae, x, cfg)
    with torch.no_grad():
        z = sae.encode(x)
        mse = float(((sae.decode(z) - x) ** 2).mean())
    l1 = float(z.abs().sum(1).mean())
    assert float(parts["mse"]) == pytest.approx(mse, rel=1e-6)
    assert float(parts["l1"]) == pytest.approx(l1, rel=1e-6)
    assert float(loss.detach()) == pytest.approx(mse + 0.1 * l1, rel=1e-6)
    _, parts_n = get_loss("relu")(sae, x, SGDConfig(l1_coefficient=0.1, loss_kwargs={"l1_decoder_norm": True}))
    weighted = float((z.abs() * sae.W_dec.detach().norm(dim=1)).sum(1).mean())
    assert float(parts_n["l1"]) == pytest.approx(weighted, rel=1e-6)


def test_sgd_learns_and_history_columns():
    X, Xt = _data(0), _data(1, n=100)
    sae = sp.make_sae(D_IN, D_SAE, "topk", k=3, seed=0)
    before = metrics.evaluate(sae, Xt)["mse"]
    h = train_sgd(sae, X, _cfg(epochs=5, lr=3e-2, batch_size=50), eval_data=Xt)
    assert isinstance(h, History) and len(h) == 5 and h.method == "sgd"
    assert h["epoch"] == [1, 2, 3, 4, 5]
    assert h["step"] == [6, 12, 18, 24, 30]  # ceil(256 / 50) batches per epoch
    assert h.last["test_mse"] < 0.3 * before
    assert h.last["test_mse"] == pytest.approx(metrics.evaluate(sae, Xt)["mse"], rel=1e-9)
    assert h.last["train_mse"] == pytest.approx(metrics.evaluate(sae, X)["mse"], rel=1e-9)
    assert h.last["test_l0"] <= 3
    for key in ("test_dead_features", "test_explained_variance", "train_explained_variance", "wall_time",
                "epoch_time", "train_loss"):
        assert key in h.last
    assert h["wall_time"] == sorted(h["wall_time"])


def test_sgd_updates_per_batch_and_optimizers():
    X = _data()
    h = train_sgd(sp.make_sae(D_IN, D_SAE, "topk", k=3), X, _cfg(epochs=1, sgd_updates_per_batch=3))
    assert h.last["step"] == 12
    for opt in ("adamw", "sgd"):
        h = train_sgd(sp.make_sae(D_IN, D_SAE, "topk", k=3), X, _cfg(epochs=1, optimizer=opt, weight_decay=1e-3))
        assert math.isfinite(h.last["train_loss"])


def test_pam_decoder_is_exact_block_minimiser():
    """encoder_first: after an epoch the decoder is the closed-form solve on the final codes."""
    X = _data()
    sae = sp.make_sae(D_IN, D_SAE, "topk", k=3, seed=3)
    cfg = _cfg(PAMConfig, epochs=2, alpha=1e-2, beta=0.5, decoder_batch_size=25)
    train_pam_sgd(sae, X, cfg)
    with torch.no_grad():
        Z = sae.encode(X)
    W, b = solve_decoder(Z.double(), X.double(), alpha=1e-2, beta=0.5)
    torch.testing.assert_close(sae.W_dec.detach(), W.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sae.b_dec.detach(), b.float(), rtol=1e-4, atol=1e-5)
    assert sae.W_dec.requires_grad and sae.b_dec.requires_grad  # unfrozen afterwards


def test_pam_encoder_pass_leaves_decoder_alone_and_collects_no_decoder_grad():
    X = _data()
    sae = sp.make_sae(D_IN, D_SAE, "relu", seed=4)
    snaps = []

    def cb(ev):
        if ev.kind == "step":
            snaps.append((ev.epoch, sae.W_dec.detach().clone(), sae.b_dec.detach().clone(), sae.W_dec.grad,
                          sae.b_dec.grad, sae.W_enc.detach().clone()))

    cfg = _cfg(PAMConfig, epochs=2, order="decoder_first", l1_coefficient=1e-3, grad_clip=0.5)
    train_pam_sgd(sae, X, cfg, callback=cb)
    assert len(snaps) == 8
    for e in (0, 1):
        epoch_snaps = [s for s in snaps if s[0] == e]
        for s in epoch_snaps[1:]:
            assert torch.equal(s[1], epoch_snaps[0][1]) and torch.equal(s[2], epoch_snaps[0][2])
        assert all(s[3] is None and s[4] is None for s in epoch_snaps)
        assert not torch.equal(epoch_snaps[0][5], epoch_snaps[-1][5])  # the encoder did move
    assert not torch.equal(snaps[0][1], snaps[4][1])  # decoder re-solved between epochs


def test_pam_beats_init_and_proximal_terms_hold_encoder_back():
    X, Xt = _data(0), _data(1, n=100)
    init = metrics.evaluate(sp.make_sae(D_IN, D_SAE, "topk", k=3, seed=5), Xt)["mse"]
    free = sp.make_sae(D_IN, D_SAE, "topk", k=3, seed=5)
    w0 = free.W_enc.detach().clone()
    h = train_pam_sgd(free, X, _cfg(PAMConfig, epochs=2, lr=3e-2), eval_data=Xt)
    assert h.last["test_mse"] < init
    assert h.last["train_running_mse"] > 0 and "train_running_prox" not in h.last
    held = sp.make_sae(D_IN, D_SAE, "topk", k=3, seed=5)
    h2 = train_pam_sgd(held, X, _cfg(PAMConfig, epochs=2, lr=3e-2, mu_enc=100.0, nu_enc=100.0))
    assert "train_running_prox" in h2.last
    assert (held.W_enc.detach() - w0).norm() < 0.5 * (free.W_enc.detach() - w0).norm()


def test_grad_clip_touches_encoder_params_only(monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        seen.append({id(p) for p in params})
        return real(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    sae = sp.make_sae(D_IN, D_SAE, "topk", k=3)
    enc = {id(getattr(sae, n)) for n in encoder_parameter_names(sae)}
    assert enc == {id(sae.W_enc), id(sae.b_enc)}
    train_sgd(sae, _data(), _cfg(epochs=1, grad_clip=1.0))
    assert seen and all(s == enc for s in seen)
    seen.clear()
    train_sgd(sae, _data(), _cfg(epochs=1, grad_clip=1.0, grad_clip_scope="all"))
    assert all(len(s) == 4 for s in seen)


def test_iterable_data_matches_tensor_without_shuffle():
    X = _data()
    batches = [X[i:i + 64] for i in range(0, 256, 64)]
    a = sp.make_sae(D_IN, D_SAE, "topk", k=3, seed=7)
    b = sp.make_sae(D_IN, D_SAE, "topk", k=3, seed=7)
    ha = train_pam_sgd(a, X, _cfg(PAMConfig, shuffle=False))
    hb = train_pam_sgd(b, batches, _cfg(PAMConfig, shuffle=False))
    for n, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[n]), n
    ra, rb = ha.without_times(), hb.without_times()
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    for x, y in zip(ra, rb):  # eval batches differ (100 rows vs the iterable's 64): sums agree to rounding
        assert x == pytest.approx(y, rel=1e-9)
    with pytest.raises(ConfigError, match="one-shot"):
        train_sgd(sp.make_sae(D_IN, D_SAE, "topk", k=3), iter(batches), _cfg())


def test_seed_fixes_shuffle():
    X = _data()

    def run(seed):
        sae = sp.make_sae(D_IN, D_SAE, "topk", k=3, seed=0)
        train_sgd(sae, X, _cfg(seed=seed))
        return sae.W_enc.detach().clone()

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_bad_inputs():
    sae = sp.make_sae(D_IN, D_SAE, "topk", k=3)
    with pytest.raises(DTypeError):
        train_sgd(sae, _data().double(), _cfg())
    with pytest.raises(DeviceError):
        train_sgd(sae, _data(), _cfg(device="cuda"))
    with pytest.raises(DTypeError):
        train_sgd(sae, _data(), _cfg(), eval_data=_data().double())
    with pytest.raises(TypeError):
        train_pam_sgd(sae, _data(), _cfg())  # an SGDConfig


def test_history_json_roundtrip(tmp_path):
    h = History(method="sgd", config={"a": 1})
    h.append({"epoch": 1, "test_mse": 0.5, "test_explained_variance": float("nan")})
    h.append({"epoch": 2, "test_mse": 0.25})
    p = h.to_json(tmp_path / "h.json")
    back = History.from_json(p)
    assert back.records == [{"epoch": 1, "test_mse": 0.5, "test_explained_variance": None},
                            {"epoch": 2, "test_mse": 0.25}]
    assert back["test_mse"] == [0.5, 0.25]
    assert back["test_explained_variance"] == [None, None]
    with pytest.raises(KeyError):
        back["nope"]


# ------------------------------------------------------------------------------------------------ AuxK
def test_auxk_loss_by_hand():
    """The aux_k best dead latents (the SAE's own rule, restricted to them) decoded without b_dec, against the
    detached residual, over the batch's total variance."""
    for arch in ("topk", "topk_abs"):
        sae = sp.make_sae(D_IN, D_SAE, arch, 3, dtype="float64", seed=2)
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(0.3 * torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))
        x = _data(3, n=40).double()
        x_hat = sae(x)
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        dead[[1, 4, 5, 9, 15]] = True
        got = losses_mod.auxk_loss(sae, x, x_hat, dead, aux_k=2)
        W, b = sae.encoder_affine()
        u = (x @ W + b)[:, dead]
        rank = u.abs() if arch == "topk_abs" else u
        sel = torch.sort(rank, dim=1, descending=True, stable=True).indices[:, :2]
        z = torch.zeros_like(u).scatter(1, sel, u.gather(1, sel))
        if arch == "topk":
            z = z.clamp_min(0)
        e_hat = z @ sae.W_dec[dead]
        want = ((x - x_hat).detach() - e_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        torch.testing.assert_close(got, want)
        got.backward()  # the dead latents' encoder columns get a gradient, the live ones none
        assert sae.W_enc.grad[:, dead].abs().sum() > 0 and not sae.W_enc.grad[:, ~dead].any()
        sae.zero_grad()
        assert float(losses_mod.auxk_loss(sae, x, x_hat, torch.zeros(D_SAE, dtype=torch.bool), 2)) == 0.0


def test_auxk_revives_dead_latents():
    """Real MNIST digits, where a TopK SAE leaves most latents dead: AuxK (default weight) revives dozens
    and lowers the reconstruction error (measured: 169 -> 124 dead of 256, mse 0.278 -> 0.261)."""
    from splinterp.data import load_mnist

    X = load_mnist("train")[0][:2000]
    out = {}
    for aux_k in (0, 64):
        sae = sp.make_sae(784, 256, "topk", 8, seed=0)
        cfg = SGDConfig(epochs=5, batch_size=128, lr=3e-3, progress=False, aux_k=aux_k, dead_after_samples=1000,
                        eval_batch_size=2000)
        h = train_sgd(sae, X, cfg)
        out[aux_k] = (h.last["train_dead_features"], h.last["train_mse"])
        assert ("train_running_auxk" in h.last) == bool(aux_k)
    assert out[64][0] <= out[0][0] - 20, out
    assert out[64][1] < out[0][1], out


def test_auxk_config_errors():
    with pytest.raises(ConfigError, match="aux_k"):
        _cfg(aux_k=-1)
    with pytest.raises(ConfigError, match="dead_after_samples"):
        _cfg(aux_k=4, dead_after_samples=0)
    with pytest.raises(ConfigError, match="TopK"):
        train_sgd(sp.make_sae(D_IN, D_SAE, "relu"), _data(), _cfg(aux_k=4))
