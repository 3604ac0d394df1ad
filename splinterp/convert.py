"""Exact conversions between SAE architectures that define the same function.

A Gated SAE (Rajamanoharan et al. 2024) with weight sharing r_mag is a JumpReLU SAE: the gate
x.W_enc + b_gate > 0 fires iff the magnitude pre-activation u = x.(W_enc * exp(r_mag)) + b_mag exceeds
b_mag - exp(r_mag) * b_gate (multiply the gate by exp(r_mag) > 0), and the ReLU adds u > 0. So
    W_enc' = W_enc * exp(r_mag),  b_enc' = b_mag,  threshold = max(b_mag - exp(r_mag) * b_gate, 0),
with the decoder unchanged. Conversely a JumpReLU SAE with threshold >= 0 is a Gated SAE with
r_mag = 0, W_enc = W, b_mag = b_enc, b_gate = b_enc - threshold. The JumpReLU form is what inference
tools (SAELens, Gemma Scope) expect, and what the geometry module reads most simply.
"""

from __future__ import annotations

import torch

from splinterp.errors import ConfigError
from splinterp.sae import SAE


def _copy_common(src: SAE, dst: SAE) -> None:
    with torch.no_grad():
        dst.W_dec.copy_(src.W_dec.detach())
        dst.b_dec.copy_(src.b_dec.detach())


def gated_to_jumprelu(sae: SAE) -> SAE:
    """The JumpReLU SAE computing exactly the same encode/decode as a Gated SAE (untied, even if `sae` was)."""
    if not isinstance(sae, SAE) or sae.cfg.architecture != "gated":
        raise ConfigError(f"gated_to_jumprelu needs a gated SAE, got {getattr(sae, 'architecture', type(sae))!r}")
    meta = dict(sae.cfg.metadata, converted_from="gated")
    out = SAE(sae.cfg.replace(architecture="jumprelu", tied=False, metadata=meta))
    scale = torch.exp(sae.r_mag.detach())
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc.detach() * scale)
        out.b_enc.copy_(sae.b_mag.detach())
        thr = torch.clamp(sae.b_mag.detach() - scale * sae.b_gate.detach(), min=0)
        out.threshold.copy_(thr.to(out.threshold.dtype))
    _copy_common(sae, out)
    return out.train(sae.training)


def jumprelu_to_gated(sae: SAE) -> SAE:
    """The Gated SAE (r_mag = 0) computing the same function as a JumpReLU SAE with thresholds >= 0."""
    if not isinstance(sae, SAE) or sae.cfg.architecture != "jumprelu":
        raise ConfigError(f"jumprelu_to_gated needs a jumprelu SAE, got {getattr(sae, 'architecture', type(sae))!r}")
    thr = sae.threshold.detach()
    if bool((thr < 0).any()):
        raise ConfigError(f"{int((thr < 0).sum())} thresholds are negative: such latents can output negative "
                          "values, which no Gated SAE can")
    meta = dict(sae.cfg.metadata, converted_from="jumprelu")
    out = SAE(sae.cfg.replace(architecture="gated", metadata=meta))
    with torch.no_grad():
        out.W_enc.copy_(sae.W_enc.detach())
        out.b_mag.copy_(sae.b_enc.detach())
        out.b_gate.copy_(sae.b_enc.detach() - thr.to(sae.b_enc.dtype))
        out.r_mag.zero_()
    if not sae.cfg.tied:
        _copy_common(sae, out)
    else:
        with torch.no_grad():
            out.b_dec.copy_(sae.b_dec.detach())
    return out.train(sae.training)
