"""Local complexity: how many region boundaries cross a ball around each input (exact, one-layer SAEs).

Humayun, Balestriero and Baraniuk (2024, "Deep networks always grok") measure a network's local complexity
as the number of partition boundaries (neurons' hyperplanes) that meet a neighbourhood of an input. For a
one-layer SAE this is exact and needs no sampling. Definition used here: the number of hyperplanes of the
half-space description of x's own region (`halfspaces`) at distance < radius from x, i.e. that meet the open
ball B(x, radius):
- relu / jumprelu / gated: the latent hyperplanes {u_i = theta_i} meeting the ball (each is a boundary of
  the partition everywhere, so this is the number of latents whose state changes somewhere in the ball);
- topk with k positive active latents: the bisectors {u_i = u_j} between an active latent i and an inactive
  latent j, and the null-site (ReLU) hyperplanes {u_i = 0} of the active latents, meeting the ball; with
  fewer than k active, the zero hyperplanes of all latents meeting it;
- topk_abs: the bisectors {s_i u_i = u_j} and {s_i u_i = -u_j} (s_i the sign of an active u_i, j inactive)
  and the sign hyperplanes {u_i = 0} of the active latents.
Every region change seen in the ball crosses one of these (a sampled y in another region violates one of
x's half-spaces, whose hyperplane then meets the segment x-y inside the ball); for TopK, a counted bisector
may be hidden behind others inside the ball, so the count is that of x's region's constraints in reach.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from splinterp.errors import ShapeError
from splinterp.geometry.checks import check_nonneg_float, takes_sae
from splinterp.geometry.halfspaces import hyperplanes_within, point_patterns, site_form
from splinterp.geometry.regions import DEFAULT_BATCH, input_chunks
from splinterp.geometry.scores import check_score_gaps, encoder_f64
from splinterp.sae import SAE


class LocalComplexity(NamedTuple):
    """count int64 [N]; boundaries: per input an int64 array [c, 2] of (latent, partner) pairs, partner -1
    for a threshold / null / sign hyperplane (None unless asked for)."""

    count: torch.Tensor
    boundaries: list | None


@takes_sae
@torch.no_grad()
def local_complexity(sae: SAE, X, radius, batch_size: int = DEFAULT_BATCH,
                     return_boundaries: bool = False) -> LocalComplexity:
    """The number of region boundaries meeting the ball of the given radius around each row of X (see the
    module docstring for exactly what is counted). radius: a number >= 0, or one per row."""
    n = int(X.shape[0]) if hasattr(X, "shape") else None
    r_all = np.asarray(radius.detach().cpu() if isinstance(radius, torch.Tensor) else radius, dtype=np.float64)
    if r_all.ndim == 0:
        check_nonneg_float(float(r_all), "radius")
    elif r_all.shape != (n,) or not (np.isfinite(r_all).all() and (r_all >= 0).all()):
        raise ShapeError(f"radius must be a number >= 0 or finite values >= 0 of shape [N={n}], got {r_all.shape}")
    enc = encoder_f64(sae)
    form = site_form(enc.W, enc.b, enc.architecture, enc.k, enc.theta)
    counts, lists = [], []
    for start, xb in input_chunks(sae, X, batch_size):
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below, by row
            S = xb.detach().cpu().double().numpy() @ form.A + form.c
        check_score_gaps(S, start)
        r = r_all if r_all.ndim == 0 else r_all[start : start + len(S)]
        hp = hyperplanes_within(form, S, point_patterns(form, S), r)
        counts.append(np.bincount(hp.row, minlength=len(S)))
        if return_boundaries:
            pair = np.column_stack([form.latent[hp.a], np.where(hp.b >= 0, form.latent[np.maximum(hp.b, 0)], -1)])
            order = np.argsort(hp.row, kind="stable")
            cuts = np.cumsum(np.bincount(hp.row, minlength=len(S)))[:-1]
            lists.extend(np.split(pair[order], cuts))
    return LocalComplexity(torch.from_numpy(np.concatenate(counts)), lists if return_boundaries else None)
