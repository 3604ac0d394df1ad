"""Gated and JumpReLU training losses (registry, STE gradients, a few steps reduce the loss) and the
exact Gated <-> JumpReLU conversion."""

from __future__ import annotations

import pytest
import torch

import splinterp.train.gated  # noqa: F401  (registers the loss)
import splinterp.train.jumprelu  # noqa: F401
from splinterp import SAE, SAEConfig
from splinterp.convert import gated_to_jumprelu, jumprelu_to_gated
from splinterp.errors import ConfigError
from splinterp.train import SGDConfig, get_loss, train_sgd
from splinterp.train.gated import gated_loss
from splinterp.train.jumprelu import jumprelu, jumprelu_loss, step

D_IN, D_SAE = 6, 16


pytestmark = pytest.mark.usefixtures("one_thread")


def random_sae(arch: str, seed: int = 0, **kw) -> SAE:
    sae = SAE(SAEConfig(D_IN, D_SAE, arch, seed=seed, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.3 if name.startswith(("b", "r")) else 1))
    return sae


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(4, D_IN, generator=g)
    codes = torch.relu(torch.randn(256, 4, generator=g))
    return codes @ basis + 0.05 * torch.randn(256, D_IN, generator=g)


def gate_by_hand(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The Gated SAE code written from the paper: 1[gate > 0] * relu(magnitude)."""
    x_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    gate = x_in @ sae.W_enc + sae.b_gate
    mag = x_in @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    return (gate > 0).float() * torch.relu(mag)


def test_registered():
    assert get_loss("gated") is gated_loss and get_loss("jumprelu") is jumprelu_loss


# --------------------------------------------------------------------------------------- gated
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_gated_loss_pieces(data, apply_b_dec):
    sae = random_sae("gated", apply_b_dec_to_input=apply_b_dec)
    x = data[:32]
    cfg = SGDConfig(l1_coefficient=0.1)
    loss, parts = gated_loss(sae, x, cfg)
    f = gate_by_hand(sae, x)
    torch.testing.assert_close(f, sae.encode(x).detach())  # the loss trains the model that encode runs
    with torch.no_grad():
        mse = ((f @ sae.W_dec + sae.b_dec - x) ** 2).mean()
        gate_pre, _ = sae.gated_paths(x)
        l1 = (torch.relu(gate_pre) * sae.W_dec.norm(dim=1)).sum(1).mean()
        aux = ((torch.relu(gate_pre) @ sae.W_dec + sae.b_dec - x) ** 2).mean()
    torch.testing.assert_close(loss.detach(), mse + 0.1 * l1 + aux)
    assert parts["mse"] == pytest.approx(float(mse)) and parts["aux"] == pytest.approx(float(aux))


def test_gated_aux_trains_gate_not_decoder(data):
    x = data[:64]

    def grads(l1, aux):
        sae = random_sae("gated", seed=2)
        loss, _ = gated_loss(sae, x, SGDConfig(l1_coefficient=l1, loss_kwargs={"gated_aux_coefficient": aux}))
        loss.backward()
        return {n: p.grad.clone() for n, p in sae.named_parameters()}

    plain, with_aux = grads(0.0, 0.0), grads(0.0, 1.0)
    assert torch.count_nonzero(plain["b_gate"]) == 0  # the Heaviside passes no gradient to the gate
    assert torch.count_nonzero(with_aux["b_gate"]) > 0  # the aux term does
    torch.testing.assert_close(with_aux["W_dec"], plain["W_dec"])  # through a frozen decoder only
    torch.testing.assert_close(with_aux["b_dec"], plain["b_dec"])
    sparse = grads(1.0, 0.0)
    assert torch.count_nonzero(sparse["b_gate"]) > 0 and (sparse["b_gate"] >= 0).all()  # L1 pushes gates down


# ------------------------------------------------------------------------------------- jumprelu
def test_ste_gradients_by_hand():
    u = torch.tensor([[0.1005, 0.3], [0.5, 0.2995], [0.0996, 0.0]], requires_grad=True)
    theta = torch.tensor([0.1, 0.3], requires_grad=True)
    eps = 0.002
    out = jumprelu(u, theta, eps)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.1005, 0.0], [0.5, 0.0], [0.0, 0.0]]))
    out.sum().backward()
    # rows within eps/2 of theta: (0, 0), (2, 0) for latent 0; (0, 1), (1, 1) for latent 1
    torch.testing.assert_close(theta.grad, torch.tensor([-(0.1 / eps) * 2, -(0.3 / eps) * 2]))
    torch.testing.assert_close(u.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    theta.grad = None
    u.grad = None
    h = step(u, theta, eps)
    torch.testing.assert_close(h.detach(), torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    h.sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-2 / eps, -2 / eps]))
    assert torch.count_nonzero(u.grad) == 0


def test_jumprelu_loss_matches_model_and_threshold_gets_gradient(data):
    sae = random_sae("jumprelu", seed=3)
    x = data[:128]
    u = x @ sae.W_enc + sae.b_enc
    with torch.no_grad():  # put thresholds right at some pre-activations so the kernel sees them
        sae.threshold.copy_(u[0].detach().abs() + 1e-4)
    cfg = SGDConfig(l1_coefficient=0.01, loss_kwargs={"bandwidth": 0.01})
    loss, parts = jumprelu_loss(sae, x, cfg)
    z = sae.encode(x).detach()
    mse = ((z @ sae.W_dec + sae.b_dec - x) ** 2).mean()
    torch.testing.assert_close(loss.detach(), mse + 0.01 * (z != 0).sum(1).float().mean())
    loss.backward()
    assert sae.threshold.grad is not None and torch.count_nonzero(sae.threshold.grad) > 0
    assert sae.threshold.grad.dtype == torch.float32


def test_threshold_stays_float32_and_learns_in_bf16_sae(data):
    sae = random_sae("jumprelu", seed=4, dtype="bfloat16")
    assert sae.threshold.dtype == torch.float32 and sae.W_enc.dtype == torch.bfloat16
    x = data[:128].to(torch.bfloat16)
    with torch.no_grad():
        sae.threshold.copy_((x @ sae.W_enc + sae.b_enc)[0].float().abs())
    loss, _ = jumprelu_loss(sae, x, SGDConfig(l1_coefficient=0.1, loss_kwargs={"bandwidth": 0.05}))
    loss.backward()
    assert sae.threshold.grad.dtype == torch.float32 and torch.count_nonzero(sae.threshold.grad) > 0


def test_bad_bandwidth(data):
    with pytest.raises(ConfigError, match="bandwidth"):
        jumprelu_loss(random_sae("jumprelu"), data[:4], SGDConfig(loss_kwargs={"bandwidth": 0}))


# ------------------------------------------------------------------------- a few training steps
def _manual_steps(sae, x, loss_fn, cfg, steps=60, lr=5e-3):
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = loss_fn(sae, x, cfg)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_gated_steps_reduce_loss(data):
    sae = random_sae("gated", seed=5)
    losses = _manual_steps(sae, data, gated_loss, SGDConfig(l1_coefficient=1e-3))
    assert losses[-1] < 0.7 * losses[0]


def test_jumprelu_steps_reduce_loss_and_l0_penalty_raises_thresholds(data):
    sae = random_sae("jumprelu", seed=6)
    with torch.no_grad():
        sae.threshold.fill_(0.05)
    losses = _manual_steps(sae, data, jumprelu_loss, SGDConfig(l1_coefficient=1e-3, loss_kwargs={"bandwidth": 0.1}))
    assert losses[-1] < 0.7 * losses[0]
    # a strong L0 penalty moves thresholds up and sparsifies the code
    sparse = random_sae("jumprelu", seed=6)
    with torch.no_grad():
        sparse.threshold.fill_(0.05)
    l0_before = float((sparse.encode(data) != 0).sum(1).float().mean())
    theta0 = sparse.threshold.detach().clone()
    _manual_steps(sparse, data, jumprelu_loss, SGDConfig(l1_coefficient=0.5, loss_kwargs={"bandwidth": 0.5}),
                  steps=40, lr=1e-2)
    assert float((sparse.encode(data) != 0).sum(1).float().mean()) < l0_before
    assert (sparse.threshold.detach() >= 0).all() and sparse.threshold.detach().mean() > theta0.mean()


@pytest.mark.parametrize("arch", ["gated", "jumprelu"])
def test_train_sgd_uses_registered_loss(data, arch):
    sae = random_sae(arch, seed=7)
    with torch.no_grad():
        if arch == "jumprelu":
            sae.threshold.fill_(0.05)
    before = float(((sae(data) - data) ** 2).mean().detach())
    cfg = SGDConfig(epochs=3, batch_size=64, lr=5e-3, l1_coefficient=1e-3, progress=False,
                    loss_kwargs={"bandwidth": 0.1} if arch == "jumprelu" else {})
    train_sgd(sae, data, cfg)
    assert float(((sae(data) - data) ** 2).mean().detach()) < before


# --------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("apply_b_dec", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_gated_to_jumprelu_is_exact(data, apply_b_dec, tied):
    gated = random_sae("gated", seed=8, apply_b_dec_to_input=apply_b_dec, tied=tied)
    x = data * 1.5
    jr = gated_to_jumprelu(gated)
    assert jr.cfg.architecture == "jumprelu" and not jr.cfg.tied and jr.cfg.metadata["converted_from"] == "gated"
    z_gated = gate_by_hand(gated, x)
    assert 0 < int((z_gated != 0).sum()) < z_gated.numel()  # some latents fire, some do not
    torch.testing.assert_close(jr.encode(x), z_gated, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(jr(x), gated(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(jr.threshold, torch.clamp(gated.b_mag - gated.r_mag.exp() * gated.b_gate, min=0))
    # round trip back to gated computes the same function too
    back = jumprelu_to_gated(jr)
    torch.testing.assert_close(back(x), gated(x), atol=1e-5, rtol=1e-5)


def test_conversion_errors():
    with pytest.raises(ConfigError, match="gated"):
        gated_to_jumprelu(random_sae("jumprelu"))
    jr = random_sae("jumprelu")
    with torch.no_grad():
        jr.threshold[3] = -0.1
    with pytest.raises(ConfigError, match="negative"):
        jumprelu_to_gated(jr)
