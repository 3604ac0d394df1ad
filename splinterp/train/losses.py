"""The built-in training losses and the pieces custom losses share.

A loss is ``fn(sae, x, cfg) -> (loss, parts)``: `loss` a scalar tensor to back-propagate, `parts` a dict of
named pieces for logging (floats or 0-dim tensors; the trainers average them over an epoch). `cfg` is the
trainer config; architecture-specific settings travel in ``cfg.loss_kwargs`` (a free dict), so a new loss
needs no change to the trainers. Which loss trains which architecture is decided in one place,
`splinterp.train.loss_registry` (the built-in table, and `register_loss` for your own).

Built-in conventions: mse is the mean over all elements of (x - x_hat)^2 (the paper's scripts, and
`splinterp.metrics.mse`); the ReLU sparsity term is l1_coefficient * mean_r sum_i |z_ri|, optionally with
each |z_i| weighted by |W_dec[i]| (``loss_kwargs={"l1_decoder_norm": True}``, SAELens's standard SAE), which
stops the trivial "shrink the code, grow the decoder" escape from the penalty. x_hat and the code come from
the model's own pass (`SAE.reconstruct`), never re-assembled here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from splinterp import kernels

LossFn = Callable[[Any, torch.Tensor, Any], tuple[torch.Tensor, dict[str, Any]]]


def loss_kwargs(cfg: Any) -> dict[str, Any]:
    kw = getattr(cfg, "loss_kwargs", None)
    return kw if isinstance(kw, dict) else {}


def reconstruction_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over all elements of (x - x_hat)^2 (one fused kernel each way, no [B, d] temporaries)."""
    return torch.nn.functional.mse_loss(x_hat, x)


def reconstruction_loss(sae, x: torch.Tensor):
    """(mse, the `Reconstruction` it was computed from): the one piece every reconstruction loss starts with,
    for callers that need the code as well (AuxK's dead-latent counters, the L1 term)."""
    rec = sae.reconstruct(x)
    return reconstruction_mse(x, rec.x_hat), rec


def mse_loss(sae, x: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Plain reconstruction loss (TopK SAEs: sparsity comes from the activation)."""
    m, _ = reconstruction_loss(sae, x)
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
    m, rec = reconstruction_loss(sae, x)
    coef = float(getattr(cfg, "l1_coefficient", 0.0) or 0.0)
    mag = rec.values.abs()
    if loss_kwargs(cfg).get("l1_decoder_norm", False):
        norms = sae.W_dec.norm(dim=1)
        mag = mag * (norms[rec.indices] if rec.is_sparse else norms)
    l1 = mag.sum(-1).mean()
    loss = m + coef * l1 if coef else m
    return loss, {"mse": m.detach(), "l1": l1.detach()}

