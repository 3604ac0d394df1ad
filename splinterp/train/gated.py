"""Gated SAE training loss (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated SAEs").

With x_in = x - b_dec if `apply_b_dec_to_input` else x:
    pi_gate = x_in @ W_enc + b_gate                         (which latents fire)
    pi_mag  = x_in @ (W_enc * exp(r_mag)) + b_mag           (how much; r_mag = the weight sharing)
    f       = 1[pi_gate > 0] * relu(pi_mag),   x_hat = f @ W_dec + b_dec
    loss    = mse(x, x_hat)
            + l1_coefficient * mean_rows sum_i relu(pi_gate)_i * |W_dec[i]|          (sparsity on the gate)
            + aux_coefficient * mse(x, relu(pi_gate) @ sg(W_dec) + sg(b_dec))        (aux reconstruction)
sg = stop-gradient: the auxiliary term trains the gate path to reconstruct through a frozen copy of the
decoder, since the Heaviside gives the gate no gradient from the main reconstruction. The L1 term is
weighted by the decoder row norms so shrinking the gate while growing the decoder cannot escape it.

Scale: mse here is the mean over all elements (as every splinterp loss); the paper sums over the d_in
coordinates, so the paper's lambda equals d_in * l1_coefficient. Settings: `cfg.l1_coefficient`, and
`cfg.loss_kwargs["gated_aux_coefficient"]` (default 1, the paper's).
The loss of architecture "gated" (`splinterp.train.loss_registry.BUILTIN_LOSSES`).
"""

from __future__ import annotations

from typing import Any

import torch

from splinterp.train.losses import loss_kwargs, reconstruction_mse


def gated_loss(sae: Any, x: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Gated SAE loss: mse + l1 on the norm-weighted gate activations + frozen-decoder aux reconstruction."""
    pi_gate, pi_mag = sae.gated_paths(x)
    f = (pi_gate > 0).to(pi_mag.dtype) * torch.relu(pi_mag)
    w_dec = sae.W_dec
    mse = reconstruction_mse(x, f @ w_dec + sae.b_dec)
    gate_act = torch.relu(pi_gate)
    l1 = (gate_act * w_dec.norm(dim=1)).sum(-1).mean()
    aux = reconstruction_mse(x, gate_act @ w_dec.detach() + sae.b_dec.detach())
    coef = float(getattr(cfg, "l1_coefficient", 0.0) or 0.0)
    aux_coef = float(loss_kwargs(cfg).get("gated_aux_coefficient", 1.0))
    loss = mse + coef * l1 + aux_coef * aux
    return loss, {"mse": mse.detach(), "l1": l1.detach(), "aux": aux.detach(),
                  "l0": (f > 0).sum(-1).float().mean().detach()}

