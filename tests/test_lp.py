"""region_is_nonempty: LP witnesses reproduce their pattern, known-empty patterns are found empty, and the
LP agrees with the exact 2-D partition."""

import logging

import numpy as np
import pytest
import torch
from conftest import random_sae

import splinterp as sp
from splinterp.errors import ConfigError, ShapeError
from splinterp.geometry import region_is_nonempty, slice_2d
from splinterp.geometry.lp import check_box, pattern_lp

ARCHS = sp.ARCHITECTURES


def _pattern(sae, x):
    u = sae.pre_acts(x[None]).detach()[0]
    return sae.select(u[None])[0], u > 0


def _reproduces(sae, x, mask, signs=None):
    m, pos = _pattern(sae, x)
    ok = torch.equal(m, mask)
    if signs is not None:
        ok = ok and torch.equal(pos[mask], signs[mask])
    return ok


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("b_dec_in", [False, True])
def test_witnesses_reproduce_observed_patterns(arch, b_dec_in):
    sae = random_sae(arch, d_in=8, d_sae=40, k=5, dtype="float64", apply_b_dec_to_input=b_dec_in)
    X = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for x in X:
        mask, pos = _pattern(sae, x)
        signs = pos if arch == "topk_abs" else None
        ok, w = region_is_nonempty(sae, mask, signs=signs)
        assert ok and w.dtype == torch.float64 and w.shape == (8,)
        assert _reproduces(sae, w, mask, signs)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_patterns_witnesses_are_valid(arch):
    """On arbitrary (mostly impossible) patterns: whenever the LP says yes, the witness proves it."""
    sae = random_sae(arch, d_in=3, d_sae=12, k=3, dtype="float64")
    g = torch.Generator().manual_seed(1)
    n_yes = 0
    for _ in range(25):
        if arch in ("topk", "topk_abs"):
            mask = torch.zeros(12, dtype=torch.bool)
            mask[torch.randperm(12, generator=g)[:3]] = True
        else:
            mask = torch.rand(12, generator=g) < 0.4
        signs = (torch.rand(12, generator=g) < 0.5) if arch == "topk_abs" else None
        ok, w = region_is_nonempty(sae, mask, signs=signs)
        if ok:
            n_yes += 1
            assert _reproduces(sae, w, mask, signs)
        else:
            assert w is None
    assert n_yes < 25  # in 3-D most random patterns of 12 latents are impossible


def test_lp_agrees_with_the_exact_2d_partition():
    sae = random_sae("relu", d_in=2, d_sae=8, dtype="float64")
    bounds = (-2.0, 2.0, -2.0, 2.0)
    sl = slice_2d(sae, torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), bounds)
    seen = {tuple(m.tolist()) for m in sl.masks}
    big = {tuple(m.tolist()) for m, a in zip(sl.masks, sl.areas) if a > 1e-6}
    box = np.array([[-2.0, 2.0], [-2.0, 2.0]])
    for r in range(1 << 8):
        mask = torch.tensor([(r >> i) & 1 == 1 for i in range(8)])
        ok, w = region_is_nonempty(sae, mask, bounds=box)
        key = tuple(mask.tolist())
        if ok:
            assert key in seen and _reproduces(sae, w, mask)
            assert (w.abs() <= 2.0 + 1e-9).all()
        else:
            assert key not in big


def test_topk_lp_in_2d_against_slice():
    sae = random_sae("topk", d_in=2, d_sae=9, k=3, dtype="float64")
    bounds = (-1.5, 1.5, -1.5, 1.5)
    sl = slice_2d(sae, torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), bounds)
    for mask, area in zip(sl.masks, sl.areas):
        ok, w = region_is_nonempty(sae, mask, bounds=(-1.5, 1.5))
        assert ok or area < 1e-6
        # swap one active latent for an inactive one: the LP answer matches the partition
        on, off = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        if len(on) and len(off):
            m2 = mask.clone()
            m2[on[0]], m2[off[0]] = False, True
            ok2, w2 = region_is_nonempty(sae, m2, bounds=(-1.5, 1.5))
            present = any(torch.equal(m2, mm) for mm in sl.masks)
            assert ok2 <= present
            if ok2:
                assert _reproduces(sae, w2, m2)


def test_known_empty_patterns():
    sae = random_sae("relu", d_in=4, d_sae=6, dtype="float64")
    with torch.no_grad():
        sae.W_enc[:, 1] = sae.W_enc[:, 0]
        sae.b_enc[1] = sae.b_enc[0]
    assert region_is_nonempty(sae, torch.tensor([True, False, False, False, False, False])) == (False, None)
    ok, w = region_is_nonempty(sae, torch.tensor([True, True, False, False, False, False]))
    assert ok and _reproduces(sae, w, torch.tensor([True, True, False, False, False, False]))
    # a dead latent (zero weights, negative bias) can never fire; patterns without it are unaffected
    with torch.no_grad():
        sae.W_enc[:, 5] = 0
        sae.b_enc[5] = -1.0
    assert region_is_nonempty(sae, torch.tensor([False, False, True, False, False, True]))[0] is False
    assert region_is_nonempty(sae, torch.tensor([False, False, True, False, False, False]))[0] is True
    topk = random_sae("topk", d_in=4, d_sae=6, k=2, dtype="float64")
    assert region_is_nonempty(topk, torch.tensor([True, True, True, False, False, False])) == (False, None)


def test_topk_duplicate_latents_tie_towards_the_lower_index():
    sae = random_sae("topk", d_in=3, d_sae=6, k=2, dtype="float64")
    with torch.no_grad():
        sae.W_enc[:, 3] = sae.W_enc[:, 2]
        sae.b_enc[3] = sae.b_enc[2]
    # {2, 3} together is fine; 3 without 2 is impossible (2 wins the tie); {0, 2} is cut inside the pair
    for S, want in [([2, 3], True), ([0, 3], False), ([0, 2], True)]:
        mask = torch.zeros(6, dtype=torch.bool)
        mask[S] = True
        ok, w = region_is_nonempty(sae, mask)
        assert ok is want
        if ok:
            assert _reproduces(sae, w, mask)


def test_bounds_restrict_the_search():
    sae = sp.make_sae(1, 1, "relu", dtype="float64")
    with torch.no_grad():
        sae.W_enc.fill_(1.0)
        sae.b_enc.fill_(-5.0)  # fires iff x > 5
    on = torch.tensor([True])
    assert region_is_nonempty(sae, on)[0] is True
    assert region_is_nonempty(sae, on, bounds=(-1.0, 1.0)) == (False, None)
    ok, w = region_is_nonempty(sae, on, bounds=(-10.0, 10.0))
    assert ok and 5 < float(w) <= 10


def test_witness_is_small_without_bounds():
    # the region is an unbounded cone; the second LP keeps the witness near the origin
    sae = random_sae("relu", d_in=20, d_sae=30, dtype="float64")
    mask, _ = _pattern(sae, torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    ok, w, margin = region_is_nonempty(sae, mask, return_margin=True)
    assert ok and margin > 0 and float(w.abs().max()) < 1e3


def test_float32_sae_witness_works_in_float32(caplog):
    sae = random_sae("topk", d_in=16, d_sae=64, k=8)
    X = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    with caplog.at_level(logging.WARNING):
        for x in X:
            mask, _ = _pattern(sae, x)
            ok, w = region_is_nonempty(sae, mask)
            assert ok and w.dtype == torch.float32 and _reproduces(sae, w, mask)
    assert "does not reproduce" not in caplog.text


def test_high_dimensional_topk():
    sae = random_sae("topk", d_in=128, d_sae=512, k=16, dtype="float64")
    x = torch.randn(128, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask, _ = _pattern(sae, x)
    ok, w = region_is_nonempty(sae, mask)
    assert ok and _reproduces(sae, w, mask)


def test_bad_input_is_named():
    sae = random_sae("topk_abs", d_in=3, d_sae=6, k=2)
    mask = torch.zeros(6, dtype=torch.bool)
    mask[:2] = True
    with pytest.raises(ConfigError, match="signs"):
        region_is_nonempty(sae, mask)
    with pytest.raises(ShapeError, match="signs"):
        region_is_nonempty(sae, mask, signs=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ConfigError, match="signs are only"):
        region_is_nonempty(random_sae("relu", d_in=3, d_sae=6), mask, signs=mask)
    with pytest.raises(ShapeError):
        region_is_nonempty(sae, torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(ShapeError, match="bounds"):
        check_box((0, 1, 2), 3)
    with pytest.raises(ConfigError, match="lo < hi"):
        check_box((1.0, 0.0), 3)
    assert check_box((0, 1, 2, 3), 2)[1].tolist() == [1.0, 3.0]
    # a plain k-set of the wrong size is simply impossible
    assert pattern_lp(np.eye(2), np.zeros(2), np.array([True, True]), k=1, null=False).nonempty is False
