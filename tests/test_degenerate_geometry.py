"""Degenerate power diagrams and SAEs: the exact tools must stay exact, and ties follow the one rule
(lower latent index first) everywhere: `SAE.select`, `PowerDiagram.ksets`, `cells_2d`, the LP."""

import numpy as np
import pytest
import torch

import splinterp as sp
from splinterp.geometry import PowerDiagram, power_diagram, region_ids, region_is_nonempty

BOX = (-2.0, 2.0, -2.0, 2.0)
BOX_AREA = 16.0


def assert_tiles(pd: PowerDiagram, bounds=BOX, n_probe=3000, seed=0):
    """Cells cover the box exactly once, and random points lie in the cell of their own k-set."""
    cells = pd.cells_2d(bounds)
    assert sum(c.area for c in cells) == pytest.approx((bounds[1] - bounds[0]) * (bounds[3] - bounds[2]), rel=1e-9)
    keys = [c.key for c in cells]
    assert len(set(keys)) == len(keys), "a k-set got two polygons"
    rng = np.random.default_rng(seed)
    pts = np.column_stack([rng.uniform(bounds[0], bounds[1], n_probe), rng.uniform(bounds[2], bounds[3], n_probe)])
    m = len(pd.weights)  # keys pad inactive slots (null site beats them) with m: drop the padding
    got = {tuple(i for i in k if i < m) for k in pd.keys(pts).tolist()}
    assert got <= set(keys), "a sampled point's k-set has no polygon"
    return cells


def sae_2d(centres, biases, k=None, arch="topk"):
    centres = torch.as_tensor(centres, dtype=torch.float64)
    sae = sp.make_sae(2, centres.shape[0], arch, k=k, dtype="float64")
    with torch.no_grad():
        sae.W_enc.copy_(centres.T)
        sae.b_enc.copy_(torch.as_tensor(biases, dtype=torch.float64))
    return sae


@pytest.mark.parametrize("order", [1, 2, 3])
def test_duplicate_sites(order):
    c = np.array([[0.5, 0.5], [0.5, 0.5], [-1.0, 0.2], [0.3, -1.1], [0.5, 0.5]])
    cells = assert_tiles(PowerDiagram(c, np.zeros(5), order=order))
    # among identical sites only the lowest indices can appear first: site 4 never beats 0 and 1
    assert not any(4 in key and not {0, 1} <= set(key) for key in (c.key for c in cells))


@pytest.mark.parametrize("order", [1, 2])
def test_collinear_and_cocircular_sites(order):
    collinear = np.column_stack([np.linspace(-1.5, 1.5, 6), np.zeros(6)])
    assert_tiles(PowerDiagram(collinear, np.zeros(6), order=order))
    angles = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    cocircular = np.column_stack([np.cos(angles), np.sin(angles)])  # all bisectors meet at the origin
    cells = assert_tiles(PowerDiagram(cocircular, np.zeros(8), order=order))
    assert len(cells) == 8


def test_zero_and_negative_weights_and_far_sites():
    c = np.array([[0.0, 0.0], [1.0, 0.0], [500.0, 300.0], [-800.0, 10.0]])
    assert_tiles(PowerDiagram(c, np.array([0.0, -0.5, 0.0, 0.0]), order=1))
    assert_tiles(PowerDiagram(c, np.array([0.0, 0.0, 2.6e5, 6.5e5]), order=2))


def test_k_equal_to_the_number_of_sites_gives_one_cell():
    c = np.random.default_rng(0).normal(size=(5, 2))
    cells = assert_tiles(PowerDiagram(c, np.zeros(5), order=5))
    assert [cell.key for cell in cells] == [(0, 1, 2, 3, 4)]


@pytest.mark.parametrize("k", [1, 4])
def test_topk_sae_with_k_1_and_k_d_sae_matches_its_diagram(k):
    sae = sae_2d(np.random.default_rng(1).normal(size=(4, 2)), [0.1, -0.3, 0.2, 0.0], k=k)
    pd = power_diagram(sae)
    assert_tiles(pd)
    X = torch.rand(2000, 2, dtype=torch.float64) * 4 - 2
    assert torch.equal(region_ids(sae, X), torch.as_tensor(pd.assign(X.numpy())))


def test_points_exactly_on_a_boundary_tie_towards_the_lower_index():
    # sites symmetric about x = 0 with equal biases: every point on x = 0 has tied scores
    sae = sae_2d([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0]], [0.0, 0.0, -20.0], k=1)
    X = torch.tensor([[0.0, -1.0], [0.0, 0.5], [0.0, 1.5]], dtype=torch.float64)
    idx, _ = sae.select_topk(sae.pre_acts(X))
    assert idx[:, 0].tolist() == [0, 0, 0]
    assert power_diagram(sae).ksets(X.numpy())[:, 0].tolist() == [0, 0, 0]


def test_dead_latent_regions_are_empty_by_lp():
    # latent 2 has a bias so negative that it can never be among the top 2 inside the box
    sae = sae_2d([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], [0.0, 0.0, -1e3], k=2)
    mask = torch.tensor([True, False, True])
    ok, witness = region_is_nonempty(sae, mask, bounds=BOX)
    assert not ok and witness is None
    ok, witness = region_is_nonempty(sae, torch.tensor([True, True, False]), bounds=BOX)
    assert ok and torch.equal(sae.select(sae.pre_acts(torch.as_tensor(witness)[None]))[0],
                              torch.tensor([True, True, False]))
    assert all(2 not in c.key for c in power_diagram(sae).cells_2d(BOX))
