import math

import pytest
import torch
from conftest import random_sae
from hypothesis import given, settings
from hypothesis import strategies as st

import splinterp as sp
from splinterp.errors import ConfigError, DTypeError, NonFiniteError, ScoreOverflowError, ShapeError
from splinterp.geometry import (
    active_mask,
    affine_map,
    affine_maps,
    boundary_distance,
    local_complexity,
    piece_rank,
    region_ids,
    region_index,
    region_stats,
    segment_regions,
    slice_2d,
)

ARCHS = sp.ARCHITECTURES


def brute_force_ids(sae, X):
    """Region label by a Python dict over (active set[, signs]) tuples, in order of first appearance."""
    u = sae.pre_acts(X)
    m = sae.select(u)
    keys = {}
    out = []
    for i in range(X.shape[0]):
        key = tuple(m[i].nonzero().flatten().tolist())
        if sae.cfg.architecture == "topk_abs":
            key += tuple((u[i][m[i]] > 0).tolist())
        out.append(keys.setdefault(key, len(keys)))
    return torch.tensor(out)


@settings(max_examples=30, deadline=None)
@given(
    arch=st.sampled_from(ARCHS),
    d_in=st.integers(1, 5),
    d_sae=st.integers(1, 70),
    k=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 400),
    b_dec_in=st.booleans(),
)
def test_region_ids_equal_brute_force(arch, d_in, d_sae, k, seed, batch, b_dec_in):
    sae = random_sae(arch, d_in=d_in, d_sae=d_sae, k=min(k, d_sae), seed=seed, apply_b_dec_to_input=b_dec_in)
    X = torch.randn(500, d_in, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(region_ids(sae, X, batch_size=batch), brute_force_ids(sae, X))


def test_region_ids_pack_more_than_64_latents():
    # latents 0 and 64 land in different 64-bit words: patterns differing only there must differ
    sae = random_sae("relu", d_in=3, d_sae=130)
    X = torch.randn(2000, 3)
    assert torch.equal(region_ids(sae, X, batch_size=333), brute_force_ids(sae, X))


def test_duplicate_inputs_share_a_region_and_ids_start_at_zero():
    sae = random_sae("topk", k=2)
    x = torch.randn(5, 6)
    ids = region_ids(sae, torch.cat([x, x]))
    assert torch.equal(ids[:5], ids[5:]) and int(ids[0]) == 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("b_dec_in", [False, True])
def test_affine_map_reproduces_sae_on_each_region(arch, b_dec_in):
    sae = random_sae(arch, d_sae=24, apply_b_dec_to_input=b_dec_in)
    X = torch.randn(800, 6)
    ids = region_ids(sae, X)
    masks = active_mask(sae, X)
    reps = torch.stack([(ids == r).nonzero()[0, 0] for r in range(int(ids.max()) + 1)])
    A, c = affine_maps(sae, masks[reps])
    pred = (X[:, None, :] @ A[ids])[:, 0] + c[ids]
    torch.testing.assert_close(pred, sae(X), rtol=1e-4, atol=1e-4)
    A0, c0 = affine_map(sae, masks[reps[0]])
    torch.testing.assert_close(A0, A[0])
    torch.testing.assert_close(c0, c[0])


def test_piece_rank_matches_matrix_rank_and_is_at_most_active_count():
    sae = random_sae("relu", d_in=8, d_sae=12)
    with torch.no_grad():  # make two encoder columns parallel so one piece loses rank
        sae.W_enc[:, 1] = 2 * sae.W_enc[:, 0]
    masks = torch.zeros(4, 12, dtype=torch.bool)
    masks[0, [0, 1]] = True  # rank 1 (parallel columns)
    masks[1, [0, 2, 3]] = True
    masks[2, :10] = True  # rank <= 8 = d_in
    A, _ = affine_maps(sae, masks)
    ranks = piece_rank(sae, masks)
    assert ranks.tolist() == [int(torch.linalg.matrix_rank(a)) for a in A]
    assert ranks.tolist()[:2] == [1, 3] and ranks[3] == 0


def test_region_stats_by_hand():
    # 1-D ReLU SAE with one latent firing for x > 0: inputs [-1, -2, 3] -> regions {}, {}, {0}
    sae = sp.make_sae(1, 1, "relu")
    with torch.no_grad():
        sae.W_enc.fill_(1.0)
        sae.b_enc.zero_()
    s = region_stats(sae, torch.tensor([[-1.0], [-2.0], [3.0]]))
    p = [2 / 3, 1 / 3]
    assert s["n_regions"] == 2 and s["n_inputs"] == 3
    assert math.isclose(s["region_entropy"], -sum(q * math.log(q) for q in p))
    assert math.isclose(s["largest_region_frac"], 2 / 3)
    assert s["singleton_frac"] == 0.5 and math.isclose(s["singleton_input_frac"], 1 / 3)
    assert s["region_sizes"] == [2, 1] and s["size_histogram"] == {1: 1, 2: 1}


def test_bad_input_is_named():
    sae = random_sae("topk")
    with pytest.raises(ShapeError, match="d_in=6"):
        region_ids(sae, torch.zeros(4, 5))
    with pytest.raises(ShapeError, match="2-D"):
        region_ids(sae, torch.zeros(6))
    X = torch.zeros(4, 6)
    X[3, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="row 3"):
        active_mask(sae, X)
    with pytest.raises(DTypeError):
        affine_map(sae, torch.zeros(20))
    with pytest.raises(ShapeError):
        affine_map(sae, torch.zeros(19, dtype=torch.bool))
    with pytest.raises(ConfigError):
        region_ids(sae, torch.zeros(4, 6), batch_size=0)


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_hash_collisions_never_merge_regions(monkeypatch, arch):
    """With a deliberately terrible hash every chunk collides: the exact fallback must still be right."""
    import splinterp.geometry.regions as regions

    monkeypatch.setattr(regions, "_hash_rows", lambda keys, mult: keys[:, 0] % 3)
    sae = random_sae(arch, k=3)
    X = torch.randn(600, 6)
    assert torch.equal(region_ids(sae, X, batch_size=50), brute_force_ids(sae, X))


def test_collision_across_chunks_is_detected(monkeypatch):
    """One row per chunk and one hash for all: no chunk collides with itself, so only the table merge
    can catch that different regions share a hash."""
    import splinterp.geometry.regions as regions

    monkeypatch.setattr(regions, "_hash_rows", lambda keys, mult: torch.zeros(keys.shape[0], dtype=torch.int64))
    sae = random_sae("topk", k=2)
    X = torch.randn(300, 6)
    assert torch.equal(region_ids(sae, X, batch_size=1), brute_force_ids(sae, X))


def test_batch_size_must_be_an_integer():
    sae = random_sae("relu", d_in=3, d_sae=6)
    for bad in (2.5, True, "3"):
        with pytest.raises(ConfigError, match="batch_size"):
            active_mask(sae, torch.randn(4, 3), batch_size=bad)


def test_scores_that_overflow_are_an_error_not_nan_regions():
    """Finite inputs whose scores overflow the SAE's dtype: every geometry entry point that reads regions from
    scores says so (a float64 brute force would give other regions than the inf/NaN scores)."""
    relu = sp.make_sae(4, 8, "relu")
    X = torch.full((3, 4), 3e38)
    X[0] = 1.0
    for fn in (active_mask, region_ids, region_stats, region_index):
        with pytest.raises(ScoreOverflowError, match="row 1.*overflow"):
            fn(relu, X)
    half = sp.make_sae(4, 8, "topk", k=2, dtype="float16")
    with pytest.raises(ScoreOverflowError, match="float16"):
        active_mask(half, torch.full((2, 4), 6e4, dtype=torch.float16))
    big = sp.make_sae(3, 5, "topk", k=2, dtype="float64")
    with torch.no_grad():
        big.W_enc.fill_(1.0)  # scores 3e308 from inputs 1e308
    with pytest.raises(ScoreOverflowError):
        slice_2d(big, torch.full((3,), 1e308, dtype=torch.float64), torch.eye(3)[0], torch.eye(3)[1])
    for fn in (boundary_distance, lambda s, X: local_complexity(s, X, 1.0)):
        with pytest.raises(ScoreOverflowError):
            fn(big, torch.full((1, 3), 1e308, dtype=torch.float64))
    with pytest.raises(ScoreOverflowError):
        segment_regions(big, torch.zeros(3, dtype=torch.float64), torch.full((3,), 1e308, dtype=torch.float64))


@pytest.mark.parametrize("arch", ARCHS)
def test_region_index_gives_each_region_its_active_set(arch):
    sae = random_sae(arch, d_in=4, d_sae=70, k=4, dtype="float64")  # 70 latents: two 64-bit words per key
    X = torch.randn(800, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ri = region_index(sae, X, batch_size=100)
    assert torch.equal(ri.ids, brute_force_ids(sae, X))
    u = sae.pre_acts(X)
    mask = sae.select(u)
    for r in range(len(ri)):
        rows = torch.nonzero(ri.ids == r).flatten()
        assert (mask[rows] == ri.mask(r)).all()
        assert torch.equal(ri.active_set(r), torch.nonzero(mask[rows[0]]).flatten())
        if arch == "topk_abs":
            assert ((u[rows] > 0) & mask[rows] == ri.signs[r]).all()
    assert int(ri.counts.sum()) == 800
    with pytest.raises(ConfigError, match="region"):
        ri.active_set(len(ri))
