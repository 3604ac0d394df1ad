"""enumerate_regions: Zaslavsky's count for a ReLU SAE in general position with every vertex in the box, the
exact slice count in 2-D, and dense sampling in 3-D."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import random_sae

import splinterp as sp
from splinterp.errors import TooLargeError
from splinterp.geometry import enumerate_regions, slice_2d


def test_relu_general_position_matches_zaslavsky():
    n, m = 3, 7
    g = torch.Generator().manual_seed(5)
    W = torch.randn(n, m, dtype=torch.float64, generator=g)
    P = 0.5 * torch.randn(m, n, dtype=torch.float64, generator=g)  # hyperplane i passes through P[i]
    sae = sp.make_sae(n, m, "relu", dtype="float64")
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.b_enc.copy_(-(P * W.T).sum(1))
    b = sae.b_enc.detach().numpy()
    Wn = W.numpy()
    vertices = [np.linalg.solve(Wn[:, list(c)].T, -b[list(c)]) for c in itertools.combinations(range(m), n)]
    half = 1.5 * max(np.abs(v).max() for v in vertices)  # every vertex inside the box
    en = enumerate_regions(sae, (-half, half))
    assert len(en) == sum(math.comb(m, i) for i in range(n + 1))
    got = sae.select(sae.pre_acts(en.witnesses))
    assert torch.equal(got, en.masks) and (en.witnesses.abs() <= half).all() and (en.margins > 0).all()
    assert len({tuple(r.tolist()) for r in en.masks}) == len(en)


@pytest.mark.parametrize("arch", sp.ARCHITECTURES)
def test_2d_count_equals_the_slice(arch):
    sae = random_sae(arch, d_in=2, d_sae=8, k=3, dtype="float64", seed=3)
    box = (-2.0, 2.0, -2.0, 2.0)
    en = enumerate_regions(sae, box)
    e = torch.eye(2, dtype=torch.float64)
    sl = slice_2d(sae, torch.zeros(2, dtype=torch.float64), e[0], e[1], box)
    def keys(masks, signs):
        s = signs if signs is not None else torch.zeros_like(masks)
        return {(tuple(a.tolist()), tuple((b & a).tolist())) for a, b in zip(masks, s)}
    assert keys(en.masks, en.signs) == keys(sl.masks, sl.signs)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_3d_contains_every_sampled_region(arch):
    sae = random_sae(arch, d_in=3, d_sae=9, k=3, dtype="float64", seed=6)
    en = enumerate_regions(sae, (-1.5, 1.5))
    X = (torch.rand(200_000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 1.5
    seen = {tuple(r.tolist()) for r in torch.unique(sae.select(sae.pre_acts(X)), dim=0)}
    found = {tuple(r.tolist()) for r in en.masks}
    assert torch.equal(sae.select(sae.pre_acts(en.witnesses)), en.masks)  # each region found has its witness
    assert seen <= found
    assert len(found - seen) <= 0.05 * len(found)  # what sampling misses is rare (and tiny)


def test_refusals():
    sae = random_sae("relu", d_in=3, d_sae=12, dtype="float64")
    with pytest.raises(TooLargeError, match="max_regions=5"):
        enumerate_regions(sae, (-3.0, 3.0), max_regions=5)
    with pytest.raises(TooLargeError, match="max_lps"):
        enumerate_regions(random_sae("topk", d_in=3, d_sae=400, k=20), (-1.0, 1.0), max_lps=1000)
