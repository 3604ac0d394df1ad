"""The signed-site layout of topk_abs, in one place.

Ranking |u| is not a power diagram of the latents' own sites, but it is the order-k diagram of 2 d_sae
signed sites: site 2i + 1 carries the score +u_i and site 2i the score -u_i. The k largest signed scores
are exactly the k largest |u_i| with their signs, so a topk_abs region key is a set of signed sites. Every
module that builds, reads or compares such keys (`power`, `regions`, `slice`, `segments`, the LP) uses these
functions, so the convention "2i + 1 = positive sign" lives here only. Works on numpy arrays and torch tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def signed_site(latent, positive):
    """Site index of latent(s) with the given sign(s): 2 * latent + 1 if positive else 2 * latent."""
    return latent * 2 + positive


def site_latent(site):
    """The latent a signed site belongs to."""
    return site // 2


def site_positive(site):
    """Whether a signed site carries the positive score."""
    return site % 2 == 1


def interleave(negative: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Rows for the 2m signed sites from per-latent rows [m, ...] of the negative and the positive site."""
    out = np.empty((2 * negative.shape[0], *negative.shape[1:]), dtype=np.result_type(negative, positive))
    out[signed_site(np.arange(negative.shape[0]), 0)] = negative
    out[signed_site(np.arange(negative.shape[0]), 1)] = positive
    return out


class SignedMasks(NamedTuple):
    """latents: bool [..., m] active latents; positive: bool [..., m] whose active site is the positive one."""

    latents: np.ndarray
    positive: np.ndarray


def split_signed_mask(site_mask) -> SignedMasks:
    """bool [..., 2m] signed-site mask -> SignedMasks(latent mask [..., m], positive-sign mask [..., m])."""
    sm = np.asarray(site_mask, dtype=bool)
    pairs = sm.reshape(*sm.shape[:-1], -1, 2)
    return SignedMasks(pairs.any(-1), pairs[..., 1])
