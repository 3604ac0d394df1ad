"""Power diagrams: the SAE <-> power-diagram identities, exact 2-D cells against brute force, LP
non-emptiness against sampling, lifting, the Aurenhammer first-order form."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import random_sae
from hypothesis import given, settings
from hypothesis import strategies as st

import splinterp as sp
from splinterp.errors import ConfigError, DTypeError, NonFiniteError, ShapeError, TooLargeError
from splinterp.geometry import PowerDiagram, power_diagram, region_ids, section_weights
from splinterp.geometry import cells2d as c2

ARCHS = sp.ARCHITECTURES


def _sae64(arch, **kw):
    return random_sae(arch, dtype="float64", **kw)


def _key_tuple(row, m):
    return tuple(int(v) for v in row if v < m)


def point_in_polygons(P, polys, tol=1e-9):
    """bool [N, R]: point inside (or within tol of) each convex counter-clockwise polygon."""
    out = np.zeros((len(P), len(polys)), dtype=bool)
    for r, v in enumerate(polys):
        e = np.roll(v, -1, 0) - v
        rel = P[:, None, :] - v[None]
        cross = e[None, :, 0] * rel[..., 1] - e[None, :, 1] * rel[..., 0]
        out[:, r] = (cross >= -tol * np.linalg.norm(e, axis=1)[None]).all(1)
    return out


# ------------------------------------------------------------------------------- SAE <-> diagram
@settings(max_examples=40, deadline=None)
@given(
    d_in=st.integers(1, 6),
    d_sae=st.integers(1, 40),
    k=st.integers(1, 8),
    seed=st.integers(0, 10_000),
    b_dec_in=st.booleans(),
)
def test_topk_set_is_the_kth_order_power_cell(d_in, d_sae, k, seed, b_dec_in):
    k = min(k, d_sae)
    sae = _sae64("topk", d_in=d_in, d_sae=d_sae, k=k, seed=seed, apply_b_dec_to_input=b_dec_in)
    X = torch.randn(300, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    pd = power_diagram(sae)
    idx, active = sae.select_topk(sae.pre_acts(X).detach())
    assert np.array_equal(pd.ksets(X), idx.numpy())  # same sites, same order (nearest = largest score)
    assert np.array_equal(pd.active(X), sae.select(sae.pre_acts(X).detach()).numpy())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("b_dec_in", [False, True])
def test_diagram_reproduces_every_architecture_and_region_ids(arch, b_dec_in):
    sae = _sae64(arch, d_in=4, d_sae=25, k=4, apply_b_dec_to_input=b_dec_in)
    X = torch.randn(2000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = sae.pre_acts(X).detach()
    mask = sae.select(u).numpy()
    pd = power_diagram(sae)
    act = pd.active(X)
    if arch == "topk_abs":
        assert pd.signed_pairs and pd.n_sites == 50 and not pd.null_site
        lat, pos = pd.latent_mask(act)
        assert np.array_equal(lat, mask)
        assert np.array_equal(pos[lat], (u.numpy() > 0)[lat])
    else:
        assert np.array_equal(act, mask)
    assert np.array_equal(pd.assign(X), region_ids(sae, X).numpy())


def test_scores_are_half_the_power_gap_to_the_null_site():
    sae = _sae64("jumprelu", d_in=3, d_sae=10)
    X = torch.randn(100, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    W, b = sae.encoder_affine()
    pd = power_diagram(sae)
    theta = sae.thresholds().detach().numpy()
    # u_i = (|x|^2 - pow_i) / 2 with the unshifted weights; the threshold shifts alpha by -2 theta
    plain = PowerDiagram(W.detach().numpy().T, pd.weights + 2 * theta)
    u = (X @ W + b).detach().numpy()
    x2 = (X**2).sum(1, keepdim=True).numpy()
    np.testing.assert_allclose((x2 - plain.power_distances(X)) / 2, u, rtol=1e-10, atol=1e-10)
    # ReLU-rule with thresholds: active iff pow_i + 2 theta_i < |x|^2 = power distance to the null site
    assert np.array_equal(pd.active(X), pd.power_distances(X) < x2)
    assert np.array_equal(pd.active(X), sae.select(torch.as_tensor(u)).numpy())


def test_ksets_sorted_by_power_distance_with_ties_to_lower_index():
    c = np.array([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    pd = PowerDiagram(c, np.zeros(4), order=3)
    ks = pd.ksets(np.array([[0.0, 0.0], [0.9, 0.0], [-0.6, 0.0]]))
    assert ks.tolist() == [[0, 1, 2], [2, 0, 1], [3, 0, 1]]
    pw = pd.power_distances(np.array([[0.9, 0.0]]))
    assert np.all(np.diff(pw[0, ks[1]]) >= 0)


# --------------------------------------------------------------------------------- exact 2-D cells
def brute_cells(pd, bounds):
    """Every k-set (or active set) polygon by clipping the box with all its defining half-planes."""
    m, k = pd.n_sites, pd.order
    # linear forms from the centres and weights themselves: pow_i(x) - |x|^2 = -2 c_i . x + |c_i|^2 - alpha_i
    g, h = -2.0 * pd.centers, (pd.centers**2).sum(1) - pd.weights
    box = c2.box_polygon(bounds)
    if pd.null_site:
        g = np.vstack([g, np.zeros((1, 2))])
        h = np.append(h, 0.0)
        sets = [s for r in range(k + 1) for s in itertools.combinations(range(m), r)]
    else:
        sets = list(itertools.combinations(range(m), k))
    out = {}
    for S in sets:
        outside = [j for j in range(m) if j not in S]
        if pd.null_site and len(S) < k:  # S beats the null site, everything else loses to it
            pairs = [(i, m) for i in S] + [(m, j) for j in outside]
        else:
            pairs = [(i, j) for i in S for j in outside] + ([(i, m) for i in S] if pd.null_site else [])
        v, n = box[None].copy(), np.array([4])
        for i, j in pairs:
            d = g[i] - g[j]
            v, n = c2.clip(v, n, d[:1], d[1:], np.array([h[i] - h[j]]))
            if n[0] < 3:
                break
        if n[0] >= 3:
            a = c2.polygon_areas(v, n)[0]
            if a > 1e-12:
                out[tuple(S)] = a
    return out


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 4), null=st.booleans(), seed=st.integers(0, 10_000))
def test_cells_2d_equal_brute_force_half_plane_intersections(m, k, null, seed):
    k = min(k, m)
    rng = np.random.default_rng(seed)
    pd = PowerDiagram(rng.uniform(-1, 1, (m, 2)), rng.uniform(-0.3, 0.5, m), order=k, null_site=null)
    bounds = (-1.3, 1.2, -1.1, 1.4)
    cells = pd.cells_2d(bounds)
    got = {c.key: c.area for c in cells}
    want = brute_cells(pd, bounds)
    big = {s for s, a in want.items() if a > 1e-9}
    assert big <= set(got) <= set(want)
    for s, a in got.items():
        assert math.isclose(a, want[s], rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 6),
    null=st.booleans(),
    relu_view=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_cells_2d_tile_the_box_and_contain_their_points(m, k, null, relu_view, seed):
    rng = np.random.default_rng(seed)
    if relu_view:
        m = min(m, 15)
        k, null = m, True  # the arrangement path
    k = min(k, m)
    pd = PowerDiagram(rng.uniform(-1, 1, (m, 2)), rng.uniform(-0.2, 0.3, m), order=k, null_site=null)
    bounds = (-1.0, 1.5, -0.8, 1.0)
    cells = pd.cells_2d(bounds)
    box_area = 2.5 * 1.8
    areas = np.array([c.area for c in cells])
    assert abs(areas.sum() - box_area) <= 1e-9 * box_area
    assert (areas > 0).all() and len({c.key for c in cells}) == len(cells)
    for c in cells:
        v = c.vertices
        assert v.dtype == np.float64 and v.shape[0] >= 3
        e = np.roll(v, -1, 0) - v
        turn = e[:, 0] * np.roll(e, -1, 0)[:, 1] - e[:, 1] * np.roll(e, -1, 0)[:, 0]
        assert (turn > 0).all()  # strictly convex, counter-clockwise
        assert _key_tuple(pd.keys(v.mean(0)[None])[0], m) == c.key  # the centroid is in the right cell
    P = np.column_stack([rng.uniform(-1.0, 1.5, 1500), rng.uniform(-0.8, 1.0, 1500)])
    keys = [_key_tuple(r, m) for r in pd.keys(P)]
    where = {c.key: i for i, c in enumerate(cells)}
    assert set(keys) <= set(where)  # every sampled cell has a polygon
    inside = point_in_polygons(P, [c.vertices for c in cells])
    assert inside[np.arange(len(P)), [where[kk] for kk in keys]].all()


def test_identical_sites_tie_towards_the_lower_index():
    rng = np.random.default_rng(3)
    c = rng.uniform(-1, 1, (6, 2))
    pd = PowerDiagram(np.vstack([c, c]), np.zeros(12), order=1)
    cells = pd.cells_2d((-2, 2, -2, 2))
    assert sorted(cl.key for cl in cells) == [(i,) for i in range(6)]
    assert pd.is_nonempty([7])[0] is False and pd.is_nonempty([1])[0] is True
    # a site at the origin with weight 0 is the null site itself: it never fires
    pd0 = PowerDiagram(np.vstack([[0.0, 0.0], c]), np.zeros(7), order=2, null_site=True)
    assert all(0 not in cl.key for cl in pd0.cells_2d((-2, 2, -2, 2)))


@pytest.mark.slow
def test_cells_2d_256_sites_order_15():
    rng = np.random.default_rng(0)
    pd = PowerDiagram(rng.uniform(-1, 1, (256, 2)), rng.uniform(0, 0.05, 256), order=15)
    cells = pd.cells_2d((-1, 1, -1, 1))
    assert abs(sum(c.area for c in cells) - 4) < 4e-9
    P = rng.uniform(-1, 1, (20000, 2))
    assert {_key_tuple(r, 256) for r in pd.keys(P)} <= {c.key for c in cells}


# ------------------------------------------------------------------------------ LP non-emptiness
@pytest.mark.parametrize("null", [False, True])
def test_lp_agrees_with_exact_cells_in_2d(null):
    rng = np.random.default_rng(5)
    m, k = 7, 3
    pd = PowerDiagram(rng.uniform(-1, 1, (m, 2)), rng.uniform(-0.2, 0.4, m), order=k, null_site=null)
    bounds = (-1.2, 1.2, -1.0, 1.1)
    cells = {c.key: c.area for c in pd.cells_2d(bounds)}
    sizes = range(k + 1) if null else [k]
    for S in (s for r in sizes for s in itertools.combinations(range(m), r)):
        ok, x = pd.is_nonempty(S, bounds=bounds)
        if ok:
            assert S in cells and _key_tuple(pd.keys(x[None])[0], m) == S
            assert bounds[0] <= x[0] <= bounds[1] and bounds[2] <= x[1] <= bounds[3]
        elif S in cells:
            assert cells[S] < 1e-8  # LP margin below tolerance: only a sliver
        # without a box the cell may extend outside it, never the other way round
        if S in cells and cells[S] > 1e-8:
            assert pd.is_nonempty(S)[0]


def test_lp_in_higher_dimension_and_known_empty_cells():
    rng = np.random.default_rng(2)
    n, m, k = 6, 30, 4
    c = rng.normal(size=(m, n))
    w = rng.uniform(0, 1, m)
    c[1], w[1] = c[0], w[0] - 0.5  # site 1 is dominated by site 0 everywhere
    pd = PowerDiagram(c, w, order=k)
    X = rng.normal(size=(400, n)) * 2
    seen = {tuple(r) for r in pd.keys(X)}
    for S in list(seen)[:15]:
        ok, x = pd.is_nonempty(list(S))
        assert ok and tuple(pd.keys(x[None])[0]) == S
    first = PowerDiagram(c, w, order=1)
    assert first.is_nonempty([1]) == (False, None)
    assert first.is_nonempty([0])[0]
    # any k-set that contains 1 but not 0 is empty (1 always loses to 0)
    S = [1] + [j for j in range(2, m)][: k - 1]
    assert pd.is_nonempty(S)[0] is False
    mask = np.zeros(m, dtype=bool)
    mask[S] = True
    assert pd.is_nonempty(mask)[0] is False


def test_lp_and_dense_sampling_agree_on_which_sampled_cells_exist():
    rng = np.random.default_rng(11)
    pd = PowerDiagram(rng.uniform(-1, 1, (12, 2)), rng.uniform(0, 0.3, 12), order=3, null_site=True)
    P = rng.uniform(-1, 1, (20000, 2))
    seen = {_key_tuple(r, 12) for r in pd.keys(P)}
    for S in seen:
        assert pd.is_nonempty(S, bounds=(-1, 1, -1, 1))[0]
    # sets that are never seen in dense sampling and have no polygon are empty for the LP
    cells = {c.key for c in pd.cells_2d((-1, 1, -1, 1))}
    unseen = [s for s in itertools.combinations(range(12), 3) if s not in cells][:30]
    assert not any(pd.is_nonempty(s, bounds=(-1, 1, -1, 1))[0] for s in unseen)


# ------------------------------------------------------------------------------------- lifting
@pytest.mark.parametrize("order", [1, 3])
def test_nearest_lifted_sites_are_the_power_cell(order):
    rng = np.random.default_rng(4)
    pd = PowerDiagram(rng.normal(size=(15, 3)), rng.uniform(-1, 2, 15), order=order)
    L = pd.lift()
    assert L.shape == (15, 4) and np.isclose(L[:, -1].min(), 0)
    X = rng.normal(size=(500, 3))
    Xl = np.hstack([X, np.zeros((500, 1))])
    d2 = ((Xl[:, None, :] - L[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d2, pd.power_distances(X) + pd.weights.max(), rtol=1e-10, atol=1e-10)
    nearest = np.argsort(d2, axis=1, kind="stable")[:, :order]
    assert np.array_equal(nearest, pd.ksets(X))
    back = PowerDiagram.from_lifted(pd.lift(K=7.0), order=order)
    np.testing.assert_allclose(back.weights, pd.weights - 7.0, atol=1e-12)  # same diagram, shifted weights
    assert np.array_equal(back.ksets(X), pd.ksets(X))


def test_lift_with_null_site_and_section_weights():
    sae = _sae64("topk", d_in=3, d_sae=12, k=3)
    pd = power_diagram(sae)
    L = pd.lift(K=float(max(pd.weights.max(), 0)) + 1)
    assert L.shape == (13, 4) and np.allclose(L[-1, :3], 0)
    back = PowerDiagram.from_lifted(L, order=3, null_site=True)
    X = np.random.default_rng(0).normal(size=(300, 3))
    assert np.array_equal(back.keys(X), pd.keys(X))
    # a plane at height z0 cuts the Voronoi diagram of (c, z) in the power diagram alpha = -(z - z0)^2
    np.testing.assert_allclose(section_weights([1.0, -2.0, 0.5], plane_height=0.5), [-0.25, -6.25, 0.0])
    with pytest.raises(ConfigError, match="K must be"):
        pd.lift(K=float(pd.weights.max()) - 1)


# ----------------------------------------------------------------------------------- Aurenhammer
@pytest.mark.parametrize("null", [False, True])
def test_first_order_form_over_subsets(null):
    rng = np.random.default_rng(9)
    m, k = 8, 3
    pd = PowerDiagram(rng.normal(size=(m, 2)), rng.uniform(-0.5, 0.5, m), order=k, null_site=null)
    first, subsets = pd.as_first_order()
    assert len(subsets) == (sum(math.comb(m, r) for r in range(k + 1)) if null else math.comb(m, k))
    X = rng.normal(size=(1000, 2))
    win = first.ksets(X)[:, 0]
    assert np.array_equal(subsets[win], pd.active(X))
    with pytest.raises(ConfigError, match="max_sites"):
        PowerDiagram(rng.normal(size=(40, 2)), np.zeros(40), order=20).as_first_order()


def test_relu_first_order_form_is_the_pattern_diagram():
    sae = _sae64("relu", d_in=2, d_sae=5)
    first, subsets = power_diagram(sae).as_first_order()
    assert len(subsets) == 2**5
    X = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert np.array_equal(subsets[first.ksets(X)[:, 0]], sae.select(sae.pre_acts(X).detach()).numpy())


# --------------------------------------------------------------------------------------- errors
def test_bad_input_is_named():
    pd = PowerDiagram(np.zeros((3, 2)), np.zeros(3), order=2)
    with pytest.raises(ShapeError, match="dim=2"):
        pd.ksets(np.zeros((4, 3)))
    with pytest.raises(DTypeError):
        pd.ksets(np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(NonFiniteError):
        pd.ksets(np.array([[0.0, np.nan]]))
    with pytest.raises(ConfigError, match="order"):
        PowerDiagram(np.zeros((3, 2)), np.zeros(3), order=4)
    with pytest.raises(ShapeError, match="weights"):
        PowerDiagram(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ConfigError, match="xmin < xmax"):
        pd.cells_2d((1, 0, 0, 1))
    with pytest.raises(ShapeError, match="2-D diagram"):
        PowerDiagram(np.zeros((3, 3)), np.zeros(3)).cells_2d()
    with pytest.raises(ConfigError, match="indices must be in"):
        pd.is_nonempty([0, 5])
    with pytest.raises(ConfigError, match="max_cells"):
        PowerDiagram(np.random.default_rng(0).normal(size=(50, 2)), np.zeros(50), order=3).cells_2d(
            (-3, 3, -3, 3), max_cells=10
        )
    assert pd.is_nonempty([0, 1, 2]) == (False, None)  # wrong size for order 2


def test_arrangement_cell_count_is_predicted_exactly():
    rng = np.random.default_rng(6)
    G, H = rng.normal(size=(30, 2)), rng.normal(size=30) * 0.3
    bounds = (-1, 1, -1, 1)
    masks, polys = c2.arrangement_cells(G, H, bounds)
    f = c2.box_polygon(bounds) @ G.T + H
    crossing = (f.min(0) < 0) & (f.max(0) > 0)
    assert len(polys) == c2.arrangement_cell_bound(G[crossing], H[crossing], bounds)
    with pytest.raises(ConfigError, match="up to"):
        c2.arrangement_cells(G, H, bounds, max_cells=len(polys) - 1)


# ------------------------------------------------------------------------- exact at the edges (issue A)
def _ring(radius):
    """A site at the origin, six on a ring of the given radius around it, four far out; all weights 0."""
    ang = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    far = [[0.9, 0.9], [0.9, -0.9], [-0.9, 0.9], [-0.9, -0.9]]
    c = np.vstack([[0.0, 0.0], radius * np.column_stack([np.cos(ang), np.sin(ang)]), far])
    return PowerDiagram(c, np.zeros(len(c)))


def test_a_tiny_real_cell_is_not_dropped():
    # the origin's Voronoi cell is a regular hexagon with inradius r/2: area (sqrt(3)/2) r^2 = 3.1e-13, about
    # 1e-13 of the box, yet 3e-7 of the box side wide (about 1e9 float64 steps)
    r = 6e-7
    pd = _ring(r)
    cells = pd.cells_2d((-1, 1, -1, 1))
    assert len(cells) == 11
    by_key = {c.key: c for c in cells}
    assert tuple(pd.keys(np.zeros((1, 2)))[0]) in by_key
    assert by_key[(0,)].area == pytest.approx(np.sqrt(3) / 2 * r**2, rel=1e-6)
    assert sum(c.area for c in cells) == pytest.approx(4.0, rel=1e-12)


def test_precision_does_not_depend_on_where_the_sites_are():
    rng = np.random.default_rng(0)
    c, w = rng.uniform(-1, 1, (30, 2)), rng.uniform(0, 0.05, 30)
    here = {cl.key: cl.area for cl in PowerDiagram(c, w, order=2).cells_2d((-1, 1, -1, 1))}
    t = 1e6
    there = {cl.key: cl.area for cl in PowerDiagram(c + t, w, order=2).cells_2d((t - 1, t + 1, t - 1, t + 1))}
    assert set(here) == set(there)
    assert max(abs(here[k] - there[k]) for k in here) < 1e-9 * 4  # was 2.7e-4 of the box before recentring
    P = rng.uniform(-1, 1, (2000, 2))
    assert np.array_equal(PowerDiagram(c, w, order=2).keys(P), PowerDiagram(c + t, w, order=2).keys(P + t))


def test_high_order_uses_the_complement_and_matches_brute_force():
    # order 499 of 500 sites: the 499 nearest are all but the farthest, i.e. the order-1 diagram of -f
    rng = np.random.default_rng(1)
    c, w = rng.uniform(-1, 1, (500, 2)), rng.uniform(0, 0.05, 500)
    cells = PowerDiagram(c, w, order=499).cells_2d((-1, 1, -1, 1))
    P = rng.uniform(-1, 1, (3000, 2))
    pw = ((P[:, None, :] - c[None]) ** 2).sum(-1) - w  # brute-force power distances
    farthest = pw.argmax(1)
    keys = {c.key for c in cells}
    assert {tuple(sorted(set(range(500)) - {int(f)})) for f in farthest} <= keys
    assert sum(cl.area for cl in cells) == pytest.approx(4.0, rel=1e-9)


@pytest.mark.parametrize("m, k", [(2000, 300), (4096, 64)])
def test_too_many_cells_are_refused_up_front(m, k):
    rng = np.random.default_rng(2)
    pd = PowerDiagram(rng.uniform(-1, 1, (m, 2)), rng.uniform(0, 0.05, m), order=k)
    with pytest.raises(TooLargeError, match=r"max_cells=2,000,000") as err:
        pd.cells_2d((-1, 1, -1, 1))
    predicted = int(str(err.value).split("about ")[1].split(" cells")[0].replace(",", ""))
    assert predicted > 2_000_000


def test_a_2d_topk_sae_too_large_to_draw_is_refused_not_killed():
    sae = random_sae("topk", d_in=2, d_sae=2000, k=100, dtype="float64")
    with pytest.raises(TooLargeError, match="max_cells"):
        power_diagram(sae).cells_2d((-3, 3, -3, 3))


def test_bad_arguments_are_named_never_coerced():
    pd = PowerDiagram(np.random.default_rng(0).normal(size=(5, 2)), np.zeros(5), order=3)
    for S in ([0.7, 1.9, 2.2], [0, 1, float("nan")], np.array([0.0, 1.0, 2.0])):
        with pytest.raises(DTypeError, match="integer indices"):
            pd.is_nonempty(S)
    with pytest.raises(DTypeError, match="string"):
        pd.is_nonempty("ab")
    with pytest.raises(DTypeError, match="bounds"):
        pd.cells_2d(bounds="abcd")
    with pytest.raises(ConfigError, match="area_tol"):
        pd.cells_2d(area_tol=float("nan"))
    with pytest.raises(ConfigError, match="max_cells"):
        pd.cells_2d(max_cells=2.5)
    for bad in [(np.nan, 1, 0, 1), (0, 1, 0, np.inf)]:
        with pytest.raises(NonFiniteError, match="bounds"):
            pd.cells_2d(bad)
    with pytest.raises(NonFiniteError, match="bounds"):
        pd.is_nonempty([0, 1, 2], bounds=(np.nan, 1))
    assert pd.is_nonempty(np.array([0, 1, 2], dtype=np.int32)).nonempty in (True, False)
