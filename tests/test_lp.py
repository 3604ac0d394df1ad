"""region_is_nonempty: LP witnesses reproduce their pattern, known-empty patterns are found empty, and the
LP agrees with the exact 2-D partition."""

import logging

import numpy as np
import pytest
import torch
from conftest import random_sae

import splinterp as sp
from splinterp.errors import ConfigError, PrecisionError, ShapeError
from splinterp.geometry import PowerDiagram, region_is_nonempty, slice_2d
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
    """On arbitrary (mostly impossible) patterns: whenever the LP says yes, the witness proves it, and its
    yes/no answers equal those of an independent LP (scipy, inequalities written from the raw parameters)."""
    sae = random_sae(arch, d_in=3, d_sae=12, k=3, dtype="float64")
    g = torch.Generator().manual_seed(1)
    n_yes, patterns = 0, []
    for _ in range(25):
        if arch in ("topk", "topk_abs"):
            mask = torch.zeros(12, dtype=torch.bool)
            mask[torch.randperm(12, generator=g)[:3]] = True
        else:
            mask = torch.rand(12, generator=g) < 0.4
        signs = (torch.rand(12, generator=g) < 0.5) if arch == "topk_abs" else None
        patterns.append((mask, signs))
        ok, w = region_is_nonempty(sae, mask, signs=signs)
        if ok:
            n_yes += 1
            assert _reproduces(sae, w, mask, signs)
        else:
            assert w is None
    assert n_yes == sum(_independent_lp(sae, m, s) for m, s in patterns)  # and every "no" is right too
    assert 0 < n_yes < 25  # both answers occur: the comparison above tests each


def _raw_scores(sae):
    """(W [d, m], b [m], theta [m]) of the decision scores, read off the raw parameters (not encoder_affine)."""
    W = sae.W_enc.detach().double().numpy()
    shift = sae.b_dec.detach().double().numpy() @ W if sae.cfg.apply_b_dec_to_input else 0.0
    arch = sae.cfg.architecture
    b = (sae.b_gate if arch == "gated" else sae.b_enc).detach().double().numpy() - shift
    theta = sae.threshold.detach().double().numpy() if arch == "jumprelu" else np.zeros(W.shape[1])
    return W, b, theta


def _independent_lp(sae, mask, signs=None) -> bool:
    """Whether the pattern has an interior point, by scipy's linprog on inequalities written here from the
    raw parameters: maximise t subject to every defining inequality holding with slack t, x in a big box."""
    from scipy.optimize import linprog

    W, b, theta = _raw_scores(sae)
    m, rows = mask.numpy(), []  # each row (a, c): a @ x + c >= t
    arch = sae.cfg.architecture
    if arch in ("topk", "topk_abs"):
        s = np.where(signs.numpy(), 1.0, -1.0) if arch == "topk_abs" else np.ones(len(m))
        for i in np.flatnonzero(m):
            rows.append((s[i] * W[:, i], s[i] * b[i]))  # selected and positive (signed for topk_abs)
            for j in np.flatnonzero(~m):
                rows.append((s[i] * W[:, i] - W[:, j], s[i] * b[i] - b[j]))
                if arch == "topk_abs":
                    rows.append((s[i] * W[:, i] + W[:, j], s[i] * b[i] + b[j]))
    else:
        for i in range(len(m)):
            sign = 1.0 if m[i] else -1.0
            rows.append((sign * W[:, i], sign * (b[i] - theta[i])))
    A = np.array([r[0] for r in rows])
    c = np.array([r[1] for r in rows])
    d = W.shape[0]
    # variables (x, t): minimise -t s.t. -A x + t <= c, t <= 1, |x| <= 1e3
    res = linprog(np.r_[np.zeros(d), -1.0], A_ub=np.c_[-A, np.ones(len(A))], b_ub=c,
                  bounds=[(-1e3, 1e3)] * d + [(None, 1.0)], method="highs")
    return res.status == 0 and -res.fun > 1e-9


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


# ------------------------------------------------------------------------- exact at the edges (issue A)
def test_a_tiny_full_dimensional_cell_is_nonempty_with_its_inradius():
    # the ring of radius 2e-5: the origin's cell is a hexagon of inradius 1e-5 (area 3.5e-10 of a box of 4)
    r = 2e-5
    ang = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    c = np.vstack([[0.0, 0.0], r * np.column_stack([np.cos(ang), np.sin(ang)]), [[0.9, 0.9], [-0.9, -0.9]]])
    pd = PowerDiagram(c, np.zeros(len(c)))
    ok, w, margin = pd.is_nonempty([0], return_margin=True)
    assert ok and np.abs(w).max() < r
    assert margin == pytest.approx(r / 2, rel=1e-6)  # the Chebyshev radius of a regular hexagon: its inradius
    assert pd.is_nonempty([0], bounds=(-1, 1, -1, 1)).nonempty


def _cube_sae(d=20, half=1.5e-4):
    """TopK k=1: latent 0 (constant score half) wins exactly on the cube |x_j| < half; latents 2j+1, 2j+2
    score +-x_j; a dead latent with a huge negative bias sets the score scale."""
    m = 2 * d + 2
    W = torch.zeros(d, m, dtype=torch.float64)
    b = torch.zeros(m, dtype=torch.float64)
    b[0] = half
    for j in range(d):
        W[j, 1 + 2 * j], W[j, 2 + 2 * j] = 1.0, -1.0
    b[-1] = -1e3
    sae = sp.make_sae(d, m, "topk", k=1, dtype="float64")
    with torch.no_grad():
        sae.W_enc.copy_(W)
        sae.b_enc.copy_(b)
    return sae


def test_a_small_cube_region_is_nonempty_with_margin_its_half_side():
    sae = _cube_sae()
    X = (torch.rand(1000, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 1.49e-4
    mask = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    mask[0] = True
    assert (sae.select(sae.pre_acts(X)) == mask).all()  # every sample in the cube encodes to {0}
    ok, w, margin = region_is_nonempty(sae, mask, return_margin=True)
    assert ok and torch.equal(sae.select(sae.pre_acts(w[None]))[0], mask)
    assert margin == pytest.approx(1.5e-4, rel=1e-6)  # distance from the centre to the faces x_j = +-1.5e-4


def test_a_witness_that_does_not_reproduce_is_never_reported_true():
    # float32 scores of size 1e4: the two latents differ by 1e-4 * x_2 < one float32 step, so the SAE ranks them
    # as a tie (lower index wins) everywhere in the box; {1} exists exactly (x_2 > 0) but not in float32
    sae = sp.make_sae(2, 2, "topk", k=1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 1.0], [0.0, 1e-4]]))
        sae.b_enc.fill_(1e4)
    with pytest.raises(PrecisionError, match="float32"):
        region_is_nonempty(sae, torch.tensor([False, True]), bounds=(-1.0, 1.0))
    assert region_is_nonempty(sae.double(), torch.tensor([False, True]), bounds=(-1.0, 1.0)).nonempty


def test_result_fields_are_named():
    sae = random_sae("relu", d_in=3, d_sae=5, dtype="float64")
    mask = sae.select(sae.pre_acts(torch.zeros(1, 3, dtype=torch.float64)))[0]
    res = region_is_nonempty(sae, mask, return_margin=True)
    assert res.nonempty and res.witness.shape == (3,) and res.margin > 0
    ok, w = region_is_nonempty(sae, mask)  # the two-field form unpacks as before
    assert ok and torch.equal(w, res.witness)
