"""Training losses, looked up by architecture in a small open registry.

A loss is ``fn(sae, x, cfg) -> (loss, parts)``: `loss` a scalar tensor to back-propagate, `parts` a dict of
named pieces for logging (floats or 0-dim tensors; the trainers average them over an epoch). `cfg` is the
trainer config; architecture-specific settings travel in ``cfg.loss_kwargs`` (a free dict), so a new loss
(the Gated SAE auxiliary loss, a JumpReLU straight-through L0 loss, ...) needs no change to the trainers:

    from splinterp.train.losses import register_loss
    register_loss("gated", my_gated_loss)

Built-in conventions: mse is the mean over all elements of (x - x_hat)^2 (the paper's scripts, and
`splinterp.metrics.mse`); the ReLU sparsity term is l1_coefficient * mean_r sum_i |z_ri|, optionally with
each |z_i| weighted by |W_dec[i]| (``loss_kwargs={"l1_decoder_norm": True}``, SAELens's standard SAE), which
stops the trivial "shrink the code, grow the decoder" escape from the penalty.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from splinterp import kernels
from splinterp.errors import ConfigError

LossFn = Callable[[Any, torch.Tensor, Any], tuple[torch.Tensor, dict[str, Any]]]

_REGISTRY: dict[str, LossFn] = {}


def register_loss(architecture: str, fn: LossFn, *, overwrite: bool = False) -> None:
    """Make `fn` the training loss of SAEs with this architecture."""
    if not isinstance(architecture, str) or not architecture:
        raise ConfigError(f"architecture must be a non-empty string, got {architecture!r}")
    if not callable(fn):
        raise ConfigError(f"loss for {architecture!r} must be callable, got {type(fn).__name__}")
    if architecture in _REGISTRY and not overwrite and _REGISTRY[architecture] is not fn:
        raise ConfigError(f"a loss is already registered for {architecture!r}; pass overwrite=True to replace it")
    _REGISTRY[architecture] = fn


def get_loss(architecture: str) -> LossFn:
    """The registered loss of `architecture`; ConfigError naming the registered ones otherwise."""
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise ConfigError(
            f"no training loss registered for architecture {architecture!r} (registered: {sorted(_REGISTRY)}); "
            "register one with splinterp.train.losses.register_loss"
        ) from None


def registered_losses() -> list[str]:
    return sorted(_REGISTRY)


def loss_kwargs(cfg: Any) -> dict[str, Any]:
    kw = getattr(cfg, "loss_kwargs", None)
    return kw if isinstance(kw, dict) else {}


def reconstruction_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over all elements of (x - x_hat)^2 (one fused kernel each way, no [B, d] temporaries)."""
    return torch.nn.functional.mse_loss(x_hat, x)


def encode_decode(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x_hat, code values, code indices or None) through the SAE's sparse kernels when it has them
    (TopK: cost B*k*d_in instead of B*d_sae*d_in), else the dense code."""
    a, idx = sae._code(x)
    if idx is None:
        return a @ sae.W_dec + sae.b_dec, a, None
    return kernels.decode(a, idx, sae.W_dec, sae.b_dec), a, idx


def mse_loss(sae, x: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Plain reconstruction loss (TopK SAEs: sparsity comes from the activation)."""
    x_hat, _, _ = encode_decode(sae, x)
    m = reconstruction_mse(x, x_hat)
    return m, {"mse": m.detach()}


def auxk_loss(sae, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """AuxK (Gao et al. 2024): how badly the aux_k highest-scoring dead latents reconstruct the residual.

    e = x - x_hat (detached: only the dead latents learn from it), e_hat = their TopK code (the SAE's own
    selection rule, restricted to the dead latents) decoded without b_dec, and the loss is
    sum |e - e_hat|^2 / sum |x - mean(x)|^2. Zero (with no graph) when no latent is dead.
    """
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() == 0 or x.shape[0] == 0:
        return x.new_zeros(())
    W, b = sae.encoder_affine()
    k = min(aux_k, dead_idx.numel())
    vals, local = kernels.encode_topk(x, W[:, dead_idx], b[dead_idx], k, absolute=sae.architecture == "topk_abs")
    e_hat = kernels.decode(vals, dead_idx[local], sae.W_dec, None)
    e = (x - x_hat).detach()
    total = (x - x.mean(0)).pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)
    return (e - e_hat).pow(2).sum() / total


def relu_l1_loss(sae, x: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """mse + l1_coefficient * mean_r sum_i |z_ri| (optionally times |W_dec[i]|)."""
    x_hat, a, idx = encode_decode(sae, x)
    m = reconstruction_mse(x, x_hat)
    coef = float(getattr(cfg, "l1_coefficient", 0.0) or 0.0)
    mag = a.abs()
    if loss_kwargs(cfg).get("l1_decoder_norm", False):
        norms = sae.W_dec.norm(dim=1)
        mag = mag * (norms if idx is None else norms[idx])
    l1 = mag.sum(-1).mean()
    loss = m + coef * l1 if coef else m
    return loss, {"mse": m.detach(), "l1": l1.detach()}


register_loss("relu", relu_l1_loss)
register_loss("topk", mse_loss)
register_loss("topk_abs", mse_loss)
