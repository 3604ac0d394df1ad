"""The exact distance from each input to the boundary of its region, and which latent change lies there.

A region is an intersection of half-spaces (`halfspaces`), so the distance from an inside point to its
boundary is the smallest distance to one of its hyperplanes (a redundant hyperplane is never closer than the
boundary):
- relu / jumprelu / gated: |u_i - theta_i| / |w_i| over all latents (a flip of latent i);
- topk with k positive active latents: (u_i - u_j) / |w_i - w_j| for i active, j inactive (a swap), and
  u_i / |w_i| for i active (the ReLU: i leaves); with fewer than k active, |u_i| / |w_i| over all latents;
- topk_abs: (s_i u_i -+ u_j) / |s_i w_i -+ w_j| (a swap, s_i the sign of u_i) and |u_i| / |w_i| (a sign flip).
w_i are the encoder columns and thresholds are folded in (`SAE.encoder_affine`, `SAE.thresholds`). The
region of x is read in float64 from those affine maps (for a float32 SAE it may differ from `encode` within
rounding of a boundary). Pairs are pruned by a lower bound before their exact norms are taken, so the cost is
one score matrix plus a few exact pairs per input.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from splinterp.geometry.checks import takes_sae
from splinterp.geometry.halfspaces import nearest_hyperplane, point_patterns, site_form
from splinterp.geometry.regions import DEFAULT_BATCH, input_chunks
from splinterp.geometry.scores import check_score_gaps, encoder_f64
from splinterp.sae import SAE


class BoundaryDistance(NamedTuple):
    """distance float64 [N]: Euclidean distance to the region's boundary (inf for an SAE with no boundary);
    latent int64 [N]: the latent that flips, leaves, or is swapped out there; partner int64 [N]: the latent
    swapped in (-1 for a flip / threshold crossing)."""

    distance: torch.Tensor
    latent: torch.Tensor
    partner: torch.Tensor


@takes_sae
@torch.no_grad()
def boundary_distance(sae: SAE, X, batch_size: int = DEFAULT_BATCH) -> BoundaryDistance:
    """Exact distance from each input (rows of X [N, d_in]) to the boundary of its region; see the module
    docstring for the hyperplanes per architecture."""
    enc = encoder_f64(sae)
    form = site_form(enc.W, enc.b, enc.architecture, enc.k, enc.theta)
    dist, lat, par = [], [], []
    for start, xb in input_chunks(sae, X, batch_size):
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below, by row
            S = xb.detach().cpu().double().numpy() @ form.A + form.c
        check_score_gaps(S, start)
        hp = nearest_hyperplane(form, S, point_patterns(form, S))
        dist.append(hp.distance)
        lat.append(np.where(hp.a >= 0, form.latent[np.maximum(hp.a, 0)], -1))
        par.append(np.where(hp.b >= 0, form.latent[np.maximum(hp.b, 0)], -1))
    return BoundaryDistance(*(torch.from_numpy(np.concatenate(v)) for v in (dist, lat, par)))
