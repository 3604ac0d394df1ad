"""slice_2d: the exact partition of a plane through input space agrees with the SAE on sampled points,
tiles the box, and carries the right affine maps."""

import numpy as np
import pytest
import torch
from conftest import random_sae
from line_arrangement import brute_force_arrangement_count
from test_power import point_in_polygons

import splinterp as sp
from splinterp.errors import ConfigError, ShapeError
from splinterp.geometry import active_mask, plane_through, slice_2d

ARCHS = sp.ARCHITECTURES


def _plane(d, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3, d, dtype=torch.float64, generator=g)
    return plane_through(X[0], X[1], X[2]), X


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("b_dec_in", [False, True])
def test_slice_matches_active_mask_and_tiles_the_box(arch, b_dec_in):
    sae = random_sae(arch, d_in=7, d_sae=25, k=4, dtype="float64", apply_b_dec_to_input=b_dec_in)
    plane, _ = _plane(7, 0)
    bounds = plane.bounds(0.3)
    sl = slice_2d(sae, plane.origin, plane.u, plane.v, bounds)
    assert len(sl) > 1 and sl.area_error() < 1e-9
    assert (sl.areas > 0).all()
    assert len(
        {
            (tuple(m.tolist()), None if sl.signs is None else tuple(s.tolist()))
            for m, s in zip(sl.masks, sl.signs if sl.signs is not None else [None] * len(sl))
        }
    ) == len(sl)
    rng = np.random.default_rng(1)
    ab = np.column_stack([rng.uniform(bounds[0], bounds[1], 2000), rng.uniform(bounds[2], bounds[3], 2000)])
    r = sl.regions_at(ab)
    assert (r >= 0).all()
    X = sl.to_input(ab)
    assert torch.equal(sl.masks[r], active_mask(sae, X))
    if arch == "topk_abs":
        u = sae.pre_acts(X).detach()
        assert torch.equal(sl.signs[r] & sl.masks[r], (u > 0) & sl.masks[r])
    # the lookup is the geometric one: each point lies in the polygon regions_at names
    inside = point_in_polygons(ab, sl.polygons)
    assert inside[np.arange(len(ab)), r].all()


@pytest.mark.parametrize("arch", ["topk", "relu", "topk_abs"])
def test_plane_maps_and_affine_maps_reproduce_the_sae(arch):
    sae = random_sae(arch, d_in=6, d_sae=15, k=3, dtype="float64")
    plane, _ = _plane(6, 2)
    sl = slice_2d(sae, plane.origin, plane.u, plane.v, plane.bounds())
    rng = np.random.default_rng(0)
    b = sl.bounds
    ab = np.column_stack([rng.uniform(b[0], b[1], 300), rng.uniform(b[2], b[3], 300)])
    r = sl.regions_at(ab)
    M = sl.plane_maps()
    pred = torch.as_tensor(ab[:, :1]) * M[r, 0] + torch.as_tensor(ab[:, 1:]) * M[r, 1] + M[r, 2]
    X = sl.to_input(ab)
    torch.testing.assert_close(pred, sae(X).detach(), rtol=1e-9, atol=1e-9)
    A, c = sl.affine_map(int(r[0]))
    torch.testing.assert_close(X[0] @ A + c, sae(X[:1]).detach()[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sl.plane_maps([int(r[0])])[0], M[int(r[0])])


def test_plane_through_three_points():
    plane, X = _plane(10, 5)
    assert torch.allclose(plane.u @ plane.v, torch.zeros((), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(plane.u.norm(), torch.ones((), dtype=torch.float64))
    torch.testing.assert_close(plane.to_input(plane.coords), X)
    lo0, hi0, lo1, hi1 = plane.bounds(0.0)
    assert lo0 <= plane.coords[:, 0].min() and hi0 >= plane.coords[:, 0].max()
    with pytest.raises(ShapeError, match="collinear"):
        plane_through(X[0], X[1], 2 * X[1] - X[0])
    with pytest.raises(ShapeError, match="coincide"):
        plane_through(X[0], X[0], X[1])


def test_float32_sae_agrees_away_from_boundaries():
    sae = random_sae("topk", d_in=12, d_sae=40, k=5)
    plane, _ = _plane(12, 3)
    sl = slice_2d(sae, plane.origin, plane.u, plane.v, plane.bounds())
    b = sl.bounds
    rng = np.random.default_rng(2)
    ab = np.column_stack([rng.uniform(b[0], b[1], 3000), rng.uniform(b[2], b[3], 3000)])
    r = sl.regions_at(ab)
    got = active_mask(sae, sl.to_input(ab).float())
    agree = (sl.masks[r] == got).all(1).float().mean()
    assert agree > 0.995  # float32 rounding can only flip points within ~1e-6 of a boundary


def test_regions_at_outside_box_and_errors():
    sae = random_sae("relu", d_in=3, d_sae=5, dtype="float64")
    e = torch.eye(3, dtype=torch.float64)
    sl = slice_2d(sae, torch.zeros(3), e[0], e[1], (-1, 1, -1, 1))
    assert sl.regions_at(np.array([[5.0, 0.0], [0.0, 0.0]]))[0] == -1
    assert sl.regions_at(np.array([[0.0, 0.0]]))[0] >= 0
    with pytest.raises(ShapeError, match="origin"):
        slice_2d(sae, torch.zeros(4), e[0], e[1])
    with pytest.raises(ConfigError, match="xmin < xmax"):
        slice_2d(sae, torch.zeros(3), e[0], e[1], (1, -1, 0, 1))
    with pytest.raises(ShapeError, match="points_ab"):
        sl.regions_at(np.zeros(3))


def test_slice_through_mnist_like_points_many_latents():
    """A plane through three 'images' of a wider SAE: every sampled region has a polygon."""
    sae = random_sae("topk", d_in=64, d_sae=256, k=8, dtype="float64")
    plane, _ = _plane(64, 7)
    sl = slice_2d(sae, plane.origin, plane.u, plane.v, plane.bounds(0.1))
    assert sl.area_error() < 1e-9
    b = sl.bounds
    rng = np.random.default_rng(3)
    ab = np.column_stack([rng.uniform(b[0], b[1], 2000), rng.uniform(b[2], b[3], 2000)])
    r = sl.regions_at(ab)
    assert (r >= 0).all() and torch.equal(sl.masks[r], active_mask(sae, sl.to_input(ab)))


def test_too_many_regions_is_refused_before_the_work():
    sae = random_sae("relu", d_in=5, d_sae=300, dtype="float64")
    e = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ConfigError, match="max_cells"):
        slice_2d(sae, torch.zeros(5), e[0], e[1], (-3, 3, -3, 3), max_cells=100)


# ------------------------------------------------------------------------- exact at the edges (issue A)
def _relu_slice_count(d_in, d_sae, seed, margin=0.3):
    sae = random_sae("relu", d_in=d_in, d_sae=d_sae, dtype="float64", seed=seed)
    plane, _ = _plane(d_in, seed)
    sl = slice_2d(sae, plane.origin, plane.u, plane.v, plane.bounds(margin), max_cells=10_000_000)
    W, b = sae.encoder_affine()
    W2 = torch.stack([plane.u @ W, plane.v @ W]).detach().numpy()
    b2 = (plane.origin @ W + b).detach().numpy()
    return sl, brute_force_arrangement_count(W2, b2, sl.bounds)


@pytest.mark.parametrize("d_in, d_sae, seed", [(5, 16, 0), (12, 64, 1), (40, 256, 2), (64, 512, 3)])
def test_relu_slices_have_exactly_one_plus_lines_plus_crossings_regions(d_in, d_sae, seed):
    sl, want = _relu_slice_count(d_in, d_sae, seed)
    assert len(sl) == want
    assert sl.area_error() < 1e-12


@pytest.mark.slow
def test_relu_784_to_1024_slice_has_exactly_one_plus_lines_plus_crossings_regions():
    sl, want = _relu_slice_count(784, 1024, 0, margin=0.25)
    assert want > 5000 and len(sl) == want


def test_a_tiny_region_is_kept_in_a_slice_and_area_error_sees_drops():
    # the ring reproducer as a 2-D TopK SAE with k = 1: u_i = c_i . x - |c_i|^2 / 2 ranks like the Voronoi sites
    r = 6e-7
    ang = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    c = np.vstack([[0.0, 0.0], r * np.column_stack([np.cos(ang), np.sin(ang)]), [[0.9, 0.9], [0.9, -0.9],
                                                                                 [-0.9, 0.9], [-0.9, -0.9]]])
    sae = sp.make_sae(2, 11, "topk_abs", k=1, dtype="float64")
    with torch.no_grad():  # scores shifted by +10 keep them positive, so |u| ranks as u
        sae.W_enc.copy_(torch.as_tensor(c.T))
        sae.b_enc.copy_(torch.as_tensor(10.0 - (c**2).sum(1) / 2))
    e = torch.eye(2, dtype=torch.float64)
    sl = slice_2d(sae, torch.zeros(2, dtype=torch.float64), e[0], e[1], (-1, 1, -1, 1))
    assert len(sl) == 11 and sl.area_error() < 1e-14
    assert sl.regions_at(np.zeros((1, 2)))[0] >= 0
    dropped = slice_2d(sae, torch.zeros(2, dtype=torch.float64), e[0], e[1], (-1, 1, -1, 1), area_tol=1e-12)
    assert len(dropped) == 10 and dropped.area_error() == pytest.approx(np.sqrt(3) / 2 * r**2 / 4, rel=1e-3)


def test_slice_takes_a_plane():
    sae = random_sae("topk", d_in=7, d_sae=25, k=4, dtype="float64")
    plane, _ = _plane(7, 4)
    a = slice_2d(sae, plane)
    b = slice_2d(sae, plane.origin, plane.u, plane.v, plane.bounds())
    assert a.bounds == b.bounds and torch.equal(a.masks, b.masks)
    assert all(np.array_equal(p, q) for p, q in zip(a.polygons, b.polygons))
    with pytest.raises(ConfigError, match="plane alone"):
        slice_2d(sae, plane, plane.u, plane.v)
    with pytest.raises(ConfigError, match="margin"):
        plane.bounds(float("nan"))


def test_plane_through_refuses_collinear_float32_points():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(50, generator=g)
    x1 = x0 + torch.randn(50, generator=g)
    x2 = x0 + 3 * (x1 - x0)  # on the line, up to float32 rounding (about 1e-6 off it)
    with pytest.raises(ShapeError, match="collinear"):
        plane_through(x0, x1, x2)
    with pytest.raises(ShapeError, match="coincide"):
        plane_through(x0, x0 + 1e-7 * x0, x1)
    plane_through(x0, x1, x2 + 1e-2 * torch.randn(50, generator=g))  # a real plane is fine
