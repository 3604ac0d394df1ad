"""JumpReLU SAE training loss (Rajamanoharan et al. 2024, "Jumping Ahead"; the Gemma Scope recipe).

    f = JumpReLU_theta(u) = u * H(u - theta),  u = x @ W_enc + b_enc (b_dec folded in if applied to input)
    loss = mse(x, f @ W_dec + b_dec) + l0_coefficient * mean_rows sum_i H(u_i - theta_i)

H has zero derivative almost everywhere, so theta learns through straight-through estimators with a
rectangle kernel K(t) = 1[|t| < 1/2] of bandwidth epsilon (the forward pass is exact):
    d JumpReLU / d theta = -(theta / eps) * K((u - theta) / eps),   d JumpReLU / d u = H(u - theta)
    d H(u - theta) / d theta = -(1 / eps) * K((u - theta) / eps),    d H / d u = 0
Only pre-activations within eps/2 of their threshold send gradient to theta.

Choices (documented because they decide whether JumpReLU trains at all):
- theta is the SAE's raw `threshold` parameter, not log theta: raw theta is what the SAE and every
  inference format store, and Adam on log theta moves small thresholds by relative steps that
  dictionary_learning found to train worse. Thresholds are projected onto theta >= 0 (clamped in place)
  at each loss call, i.e. projected gradient descent; a negative threshold would let latents output
  negative values and break the Gated equivalence.
- theta stays in float32 (the SAE keeps it so even in a half-precision SAE), and the comparisons and the
  kernel are evaluated in float32: a bf16 threshold stops learning (SAELens #728).
- bandwidth eps (`cfg.loss_kwargs["bandwidth"]`, default 0.001) is on the scale of the pre-activations,
  hence of the inputs: 0.001 is the Gemma Scope value for inputs normalised to E|x|^2 = d_in (unit scale
  per coordinate, e.g. after `splinterp.data.cache.Standardizer`). For inputs of per-coordinate RMS s,
  scale it to about 0.001 * s.
- l0_coefficient: `cfg.loss_kwargs["l0_coefficient"]` if given, else `cfg.l1_coefficient` (the trainers'
  one sparsity knob). As mse is the mean over elements, the paper's lambda equals d_in * l0_coefficient.
The loss of architecture "jumprelu" (`splinterp.train.loss_registry.BUILTIN_LOSSES`).
"""

from __future__ import annotations

from typing import Any

import torch

from splinterp.errors import ConfigError
from splinterp.train.losses import loss_kwargs, reconstruction_mse

DEFAULT_BANDWIDTH = 1e-3


def _kernel(u: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """Rectangle kernel K((u - theta) / eps) in float32."""
    return ((u.float() - theta.float()).abs() < eps / 2).float()


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(u, theta)
        ctx.eps = eps
        return u * (u.float() > theta.float()).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_u = grad * (u.float() > theta.float()).to(grad.dtype)
        g_theta = -(theta.float() / eps) * _kernel(u, theta, eps) * grad.float()
        g_theta = g_theta.reshape(-1, theta.shape[-1]).sum(0).to(theta.dtype)
        return grad_u, g_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(u, theta)
        ctx.eps = eps
        return (u.float() > theta.float()).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, theta = ctx.saved_tensors
        eps = ctx.eps
        g_theta = -(1.0 / eps) * _kernel(u, theta, eps) * grad.float()
        g_theta = g_theta.reshape(-1, theta.shape[-1]).sum(0).to(theta.dtype)
        return torch.zeros_like(u), g_theta, None


def jumprelu(u: torch.Tensor, theta: torch.Tensor, bandwidth: float = DEFAULT_BANDWIDTH) -> torch.Tensor:
    """u * H(u - theta), with the straight-through threshold gradient of bandwidth `bandwidth`."""
    return _JumpReLU.apply(u, theta, float(bandwidth))


def step(u: torch.Tensor, theta: torch.Tensor, bandwidth: float = DEFAULT_BANDWIDTH) -> torch.Tensor:
    """H(u - theta) (0/1), with the straight-through threshold gradient; no gradient to u."""
    return _Step.apply(u, theta, float(bandwidth))


def jumprelu_loss(sae: Any, x: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """JumpReLU loss: mse + l0_coefficient * (straight-through) L0."""
    kw = loss_kwargs(cfg)
    eps = float(kw.get("bandwidth", DEFAULT_BANDWIDTH))
    if not eps > 0:
        raise ConfigError(f"loss_kwargs['bandwidth'] must be > 0, got {eps!r}")
    coef = float(kw.get("l0_coefficient", getattr(cfg, "l1_coefficient", 0.0) or 0.0))
    theta = sae.threshold
    with torch.no_grad():
        theta.clamp_(min=0)  # projection onto theta >= 0
    W, b = sae.encoder_affine()
    u = x @ W + b
    f = jumprelu(u, theta, eps)
    mse = reconstruction_mse(x, f @ sae.W_dec + sae.b_dec)
    l0 = step(u, theta, eps).sum(-1).mean()
    loss = mse + coef * l0 if coef else mse
    return loss, {"mse": mse.detach(), "l0": l0.detach()}

