"""boundary_distance against bisection: along random directions the region never changes before the
returned distance, and along the normal of the returned hyperplane it changes exactly there, by exactly the
returned latents."""

import numpy as np
import pytest
import torch
from conftest import random_sae

import splinterp as sp
from splinterp.geometry import boundary_distance

ARCHS = sp.ARCHITECTURES


def _key(sae, X):
    u = sae.pre_acts(X)
    m = sae.select(u)
    return torch.cat([m, (u > 0) & m], 1) if sae.cfg.architecture == "topk_abs" else m


def _first_change(sae, x, v, t_max, steps=400, iters=60):
    """The first t along x + t v where the region changes: coarse steps, then bisection (float64)."""
    T = torch.linspace(0, t_max, steps + 1, dtype=torch.float64)
    keys = _key(sae, x[None] + T[:, None] * v[None])
    diff = (keys != keys[0]).any(1)
    if not diff.any():
        return np.inf
    j = int(torch.nonzero(diff)[0])
    lo, hi = float(T[j - 1]), float(T[j])
    k0 = keys[0]
    for _ in range(iters):
        mid = (lo + hi) / 2
        if torch.equal(_key(sae, (x + mid * v)[None])[0], k0):
            lo = mid
        else:
            hi = mid
    return hi


@pytest.mark.parametrize("arch", ARCHS)
def test_boundary_distance_against_bisection(arch):
    sae = random_sae(arch, d_in=4, d_sae=24, k=3, dtype="float64", seed=2)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 4, dtype=torch.float64, generator=g)
    bd = boundary_distance(sae, X, batch_size=5)
    W, b = sae.encoder_affine()
    W = W.detach()
    for i, x in enumerate(X):
        d = float(bd.distance[i])
        assert 0 < d < np.inf
        for _ in range(8):  # no change before d in any direction
            v = torch.randn(4, dtype=torch.float64, generator=g)
            v /= v.norm()
            assert _first_change(sae, x, v, 3 * d + 1) >= d * (1 - 1e-9)
        # along the returned hyperplane's normal (built here from W) the change comes exactly at d
        a, p = int(bd.latent[i]), int(bd.partner[i])
        u = sae.pre_acts(x[None])[0].detach()
        if p < 0:  # a threshold / null / sign hyperplane of latent a: move its score towards its threshold
            theta = 0.0 if sae.thresholds() is None else float(sae.thresholds().detach()[a])
            n = -torch.sign(u[a] - theta) * W[:, a]
        else:  # a swap: move u_a - u_p (signed as the SAE ranks them) towards 0
            sa = torch.sign(u[a]) if arch == "topk_abs" else 1.0
            sp_ = torch.sign(u[p]) if arch == "topk_abs" else 1.0
            n = -(sa * W[:, a] - sp_ * W[:, p])
        n = n / n.norm()
        assert _first_change(sae, x, n, 3 * d) == pytest.approx(d, rel=1e-7)
        after = _key(sae, (x + (d * (1 + 1e-6)) * n)[None])[0]
        before = _key(sae, x[None])[0]
        changed = set(torch.nonzero(after[: sae.cfg.d_sae] != before[: sae.cfg.d_sae]).flatten().tolist())
        if arch != "topk_abs" or p >= 0:
            assert changed == ({a} if p < 0 else {a, p})


def test_float32_input_and_zero_weight_sae():
    sae = random_sae("relu", d_in=3, d_sae=6)
    bd = boundary_distance(sae, torch.randn(4, 3))
    assert bd.distance.dtype == torch.float64 and (bd.distance > 0).all()
    flat = sp.make_sae(3, 4, "relu", dtype="float64")
    with torch.no_grad():
        flat.W_enc.zero_()
    assert torch.isinf(boundary_distance(flat, torch.randn(2, 3, dtype=torch.float64)).distance).all()
