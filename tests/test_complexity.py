"""local_complexity against dense sampling in the ball: every region change a sample sees is explained by a
counted boundary, and (ReLU-type) every counted hyperplane is seen changing somewhere in the ball."""

import numpy as np
import pytest
import torch
from conftest import random_sae

from splinterp.errors import ShapeError
from splinterp.geometry import local_complexity


def _ball(x, r, n, g):
    v = torch.randn(n, x.shape[0], dtype=torch.float64, generator=g)
    v /= v.norm(dim=1, keepdim=True)
    rad = r * torch.rand(n, 1, dtype=torch.float64, generator=g) ** (1 / x.shape[0])
    return x[None] + rad * v


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "gated"])
def test_relu_type_count_is_the_latents_that_change_in_the_ball(arch):
    sae = random_sae(arch, d_in=2, d_sae=30, dtype="float64", seed=1)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(10, 2, dtype=torch.float64, generator=g)
    r = 0.4
    lc = local_complexity(sae, X, r, return_boundaries=True)
    for i, x in enumerate(X):
        Y = _ball(x, r, 40_000, g)
        m0 = sae.select(sae.pre_acts(x[None]))[0]
        seen = set(torch.nonzero((sae.select(sae.pre_acts(Y)) != m0).any(0)).flatten().tolist())
        counted = set(lc.boundaries[i][:, 0].tolist())
        assert (lc.boundaries[i][:, 1] == -1).all() and int(lc.count[i]) == len(counted)
        assert seen == counted  # in 2-D 40k samples see every hyperplane that cuts the ball


@pytest.mark.parametrize("arch", ["topk", "topk_abs"])
def test_topk_every_change_seen_is_a_counted_boundary(arch):
    sae = random_sae(arch, d_in=3, d_sae=25, k=3, dtype="float64", seed=2)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 3, dtype=torch.float64, generator=g)
    r = 0.3
    lc = local_complexity(sae, X, r, return_boundaries=True)
    n_seen = 0
    for i, x in enumerate(X):
        counted = {tuple(p) for p in lc.boundaries[i].tolist()}
        ux = sae.pre_acts(x[None])[0]
        mx = sae.select(ux[None])[0]
        Y = _ball(x, r, 20_000, g)
        uy = sae.pre_acts(Y)
        my = sae.select(uy)
        for j in torch.nonzero((my != mx).any(1) | ((uy > 0) != (ux > 0)).any(1) & (arch == "topk_abs")).flatten():
            left = torch.nonzero(mx & ~my[j]).flatten().tolist()
            entered = torch.nonzero(my[j] & ~mx).flatten().tolist()
            if left and entered:  # a swap: each leaving latent was overtaken by each entering one
                n_seen += 1
                assert all((i_, j_) in counted for i_ in left for j_ in entered)
            elif left and arch == "topk":  # the ReLU: the latent's score fell to <= 0
                assert all((i_, -1) in counted for i_ in left if uy[j, i_] <= 0)
    assert n_seen > 0
    # the count is what the boundaries list holds, and a bigger ball meets at least as many
    assert torch.equal(lc.count, torch.tensor([len(b) for b in lc.boundaries]))
    assert (local_complexity(sae, X, 2 * r).count >= lc.count).all()


def test_radius_per_row_and_bad_radius():
    sae = random_sae("relu", d_in=3, d_sae=10, dtype="float64")
    X = torch.randn(4, 3, dtype=torch.float64)
    r = torch.tensor([0.0, 0.1, 0.5, 5.0], dtype=torch.float64)
    per_row = local_complexity(sae, X, r).count
    assert per_row[0] == 0 and torch.equal(per_row[3:], local_complexity(sae, X[3:], 5.0).count)
    with pytest.raises(ShapeError, match="radius"):
        local_complexity(sae, X, np.ones(3))
