"""splinterp.viz: orientation (what is drawn at (a, b) is the cell the geometry assigns to (a, b)), colours,
and every public function on tiny inputs returning a figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from splinterp import SAE, SAEConfig
from splinterp.geometry import PowerDiagram, plane_through
from splinterp.viz import cells as vcells
from splinterp.viz import colors, lift, llm, mnist, partition, power, raster, training
from splinterp.viz.output import save_png, write_html


# ------------------------------------------------------------------------------------------ helpers
def render(fig: Figure) -> np.ndarray:
    """RGB float image [H, W, 3] of the figure as Agg draws it (row 0 = top)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float64) / 255.0


def drawn_color(fig: Figure, img: np.ndarray, ax, point) -> np.ndarray:
    """The rendered colour at data point (a, b) of `ax`."""
    px, py = ax.transData.transform(point)
    return img[int(round(img.shape[0] - py)), int(round(px))]


def interior_points(pd: PowerDiagram, bounds, n: int, margin: float, seed: int = 0) -> np.ndarray:
    """Random points whose cell key is the same at every point within `margin` (well inside a cell)."""
    rng = np.random.default_rng(seed)
    xmin, xmax, ymin, ymax = bounds
    P = np.column_stack([rng.uniform(xmin + margin, xmax - margin, 20 * n),
                         rng.uniform(ymin + margin, ymax - margin, 20 * n)])
    keys = pd.keys(P)
    ok = np.ones(len(P), bool)
    for dx, dy in [(margin, 0), (-margin, 0), (0, margin), (0, -margin), (margin, margin), (-margin, -margin),
                   (margin, -margin), (-margin, margin)]:
        ok &= (pd.keys(P + [dx, dy]) == keys).all(1)
    return P[ok][:n]


def asymmetric_diagram(order: int = 1) -> PowerDiagram:
    """Sites placed so that any transpose / rotation / flip of the picture changes the cells."""
    c = np.array([[-1.5, -0.4], [1.2, -1.3], [0.4, 1.4], [1.6, 1.0], [-0.7, 0.9]])
    w = np.array([0.5, 0.1, 0.9, 0.2, 0.0])
    return PowerDiagram(c, w, order=order)


BOUNDS = (-2.0, 2.0, -1.5, 2.5)  # deliberately not square and not symmetric


# ---------------------------------------------------------------------------------------- orientation
def test_pixel_centers_layout_is_xy_with_row0_at_ymin():
    P = raster.pixel_centers((0, 4, 10, 12), (2, 4))
    img = P.reshape(2, 4, 2)
    assert np.allclose(img[0, :, 1], 10.5) and np.allclose(img[1, :, 1], 11.5)  # rows follow y, bottom first
    assert np.allclose(img[0, :, 0], [0.5, 1.5, 2.5, 3.5])  # columns follow x
    assert raster.pixel_of((3.9, 11.9), (0, 4, 10, 12), (2, 4)) == (1, 3)


def test_show_raster_draws_each_value_at_its_point():
    bounds, shape = BOUNDS, (40, 50)
    P = raster.pixel_centers(bounds, shape)
    # a colour that encodes position: red grows with x, blue with y
    rgb = np.stack([(P[:, 0] - bounds[0]) / 4.0, np.full(len(P), 0.5), (P[:, 1] - bounds[2]) / 4.0], 1)
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    raster.show_raster(ax, rgb.reshape(*shape, 3), bounds)
    ax.set_xlim(bounds[:2])
    ax.set_ylim(bounds[2:])
    img = render(fig)
    for pt in [(-1.7, 2.2), (1.6, -1.2), (0.9, 1.7), (-0.3, -0.8)]:
        want = np.array([(pt[0] - bounds[0]) / 4.0, 0.5, (pt[1] - bounds[2]) / 4.0])
        assert np.abs(drawn_color(fig, img, ax, pt) - want).max() < 0.04, pt


@pytest.mark.parametrize("order", [1, 2])
def test_power_polygons_drawn_where_the_geometry_puts_them(order):
    pd = asymmetric_diagram(order)
    cells = pd.cells_2d(BOUNDS)
    cmap = vcells.cells_colormap(cells)
    fig = power.plot_power_diagram(pd, BOUNDS, cmap=cmap, sites=False, alpha=1.0, cells=cells)
    ax = fig.axes[0]
    img = render(fig)
    pts = interior_points(pd, BOUNDS, 40, margin=0.06)
    assert len(pts) >= 20
    for p in pts:
        key = tuple(int(s) for s in pd.keys(p[None])[0])
        assert np.abs(drawn_color(fig, img, ax, p) - cmap(key)).max() < 0.02, (p, key)


def test_power_raster_matches_polygons_pixel_for_pixel():
    pd = asymmetric_diagram(2)
    img, keys = power.power_raster(pd, BOUNDS, resolution=120)
    shape = img.shape
    cells = pd.cells_2d(BOUNDS)
    idx = vcells.rasterize_cells(cells, BOUNDS, shape)
    poly_keys = np.array([hash(tuple(cells[i].key)) for i in idx.ravel()]).reshape(shape)
    pix_keys = np.array([hash(keys[i]) for i in img.ravel()]).reshape(shape)
    assert (poly_keys == pix_keys).mean() > 0.995  # only pixels whose centre sits on an edge may differ


def test_power_raster_figure_orientation():
    pd = asymmetric_diagram(1)
    cmap = colors.ColorMap([(i,) for i in range(pd.n_sites)])
    fig = power.plot_power_raster(pd, BOUNDS, resolution=200, cmap=cmap)
    ax = fig.axes[0]
    img = render(fig)
    for p in interior_points(pd, BOUNDS, 30, margin=0.08, seed=1):
        key = (int(pd.keys(p[None])[0, 0]),)
        assert np.abs(drawn_color(fig, img, ax, p) - cmap(key)).max() < 0.02


class _Quadrants(torch.nn.Module):
    """A 'reference AE' whose regions are asymmetric in x and y: a transposed raster would be caught."""

    def regions(self, X):
        return (X[:, 0] > 0.5).long() + 2 * (X[:, 1] > -0.25).long() + 4 * (X[:, 0] + 2 * X[:, 1] > 2.2).long()

    def forward(self, X):
        return X


def test_raster_partition_of_a_regions_model_is_not_transposed():
    model = _Quadrants()
    o, u, v = torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    part = partition.SlicePartition(model, o, u, v, BOUNDS, resolution=150, errors=False)
    cmap = part.colormap()
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    part.draw(ax, cmap, alpha=1.0)
    vcells.setup_axes(ax, BOUNDS)
    img = render(fig)
    for p in [(1.5, -1.2), (-1.2, 1.5), (1.5, 1.8), (-1.5, -1.0), (0.2, 0.6)]:
        want = cmap(int(model.regions(torch.tensor([p]))[0]))
        assert np.abs(drawn_color(fig, img, ax, p) - want).max() < 0.02, p


def test_sae_slice_polygons_drawn_at_the_encoders_active_set():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=5, d_sae=10, architecture="topk", k=2, seed=0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
    x0, x1, x2 = torch.randn(3, 5)
    pl = plane_through(x0, x1, x2)
    bounds = pl.bounds(0.3)
    part = partition.SlicePartition(sae, pl.origin, pl.u, pl.v, bounds, resolution=60, errors=False)
    cmap = part.colormap()
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    part.draw(ax, cmap, alpha=1.0, edge_width=0.0)
    vcells.setup_axes(ax, bounds)
    img = render(fig)
    rng = np.random.default_rng(0)
    checked = 0
    span = np.array([bounds[1] - bounds[0], bounds[3] - bounds[2]])
    for _ in range(200):
        ab = np.array([bounds[0], bounds[2]]) + rng.uniform(0.05, 0.95, 2) * span  # away from the frame
        probe = ab + 0.02 * span * np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]])
        X = partition.plane_points(pl.origin, pl.u, pl.v, probe).float()
        masks = sae.select(sae.pre_acts(X))
        if not (masks == masks[0]).all():
            continue  # too close to a boundary for a pixel test
        key = tuple(torch.nonzero(masks[0]).ravel().tolist())
        assert np.abs(drawn_color(fig, img, ax, ab) - cmap(key)).max() < 0.02
        checked += 1
    assert checked >= 30


def test_e1_style_slice_of_kmeans_is_exact():
    from splinterp.reference import KMeansAE

    X = torch.randn(200, 6, dtype=torch.float64)
    km = KMeansAE(5, n_init=1, seed=0).fit(X)
    pl = plane_through(X[0], X[1], X[2])
    pd = partition.kmeans_slice_diagram(km, pl.origin, pl.u, pl.v)
    ab = np.random.default_rng(0).uniform(-3, 3, (500, 2))
    Xp = partition.plane_points(pl.origin, pl.u, pl.v, ab)
    assert np.array_equal(pd.keys(ab)[:, 0], km.regions(Xp).numpy())


# -------------------------------------------------------------------------------------------- colours
def test_palette_is_distinct_and_prefix_stable():
    p = colors.palette(40)
    assert np.array_equal(colors.palette(12), p[:12])
    assert colors.min_pairwise_distance(colors.palette(12)) > 30  # CIELAB: clearly different
    assert colors.min_pairwise_distance(colors.palette(colors.MAX_DISTINCT)) > 5
    assert len({tuple(c) for c in colors.palette(colors.MAX_DISTINCT)}) == colors.MAX_DISTINCT
    with pytest.raises(ValueError):
        colors.palette(colors.MAX_DISTINCT + 1)


def test_second_order_cells_all_get_their_own_colour():
    rng = np.random.default_rng(42)
    pd = PowerDiagram(rng.uniform(-3, 3, (7, 2)), 2 * rng.uniform(0, 1, 7), order=2)
    cells = pd.cells_2d((-4, 4, -4, 4))
    cmap = vcells.cells_colormap(cells)
    cols = {tuple(cmap(c.key)) for c in cells}
    assert len(cols) == len(cells)  # the authors' mod-20 ids collided here


def test_many_cells_neighbours_always_differ():
    rng = np.random.default_rng(1)
    pd = PowerDiagram(rng.uniform(-1, 1, (400, 2)), np.zeros(400))
    cells = pd.cells_2d((-1, 1, -1, 1))
    assert len(cells) > colors.MAX_DISTINCT
    cmap = vcells.cells_colormap(cells)
    adj = vcells.cell_adjacency(cells)
    assert len(adj) > len(cells)  # a planar subdivision has more edges than faces
    for i, j in adj:
        assert not np.array_equal(cmap(cells[i].key), cmap(cells[j].key))


def test_cell_adjacency_agrees_with_probing_across_edges():
    pd = asymmetric_diagram(2)
    cells = pd.cells_2d(BOUNDS)
    adj = set(vcells.cell_adjacency(cells))
    index = {tuple(c.key): i for i, c in enumerate(cells)}
    probed = set()
    for i, c in enumerate(cells):
        v = c.vertices
        for a, b in zip(v, np.roll(v, -1, 0)):
            mid, e = (a + b) / 2, b - a
            if np.linalg.norm(e) < 1e-6:
                continue
            out = mid + 1e-7 * np.array([e[1], -e[0]]) / np.linalg.norm(e)  # CCW: outward is to the right
            x0, x1, y0, y1 = BOUNDS
            if not (x0 < out[0] < x1 and y0 < out[1] < y1):
                continue
            j = index[tuple(int(s) for s in pd.keys(out[None])[0])]
            probed.add((min(i, j), max(i, j)))
    assert adj == probed


def test_greedy_coloring_rejects_too_few_colours():
    with pytest.raises(ValueError):
        colors.greedy_coloring(3, [(0, 1), (1, 2), (0, 2)], n_colors=2)


# ------------------------------------------------------------------------------------------- lifting
def test_lift_scene_sections_are_the_power_cells():
    rng = np.random.default_rng(3)
    pd = PowerDiagram(rng.uniform(-1.5, 1.5, (6, 2)), rng.uniform(0, 1, 6))
    s = lift.lift_scene(pd, (-2, 2, -2, 2))
    areas2d = {c.key[0]: abs(c.area) for c in s["cells"]}
    for i, faces in enumerate(s["cells3d"]):
        floor = [f for f in faces if np.allclose(f[:, 2], 0.0)]
        if i in areas2d:
            assert len(floor) == 1
            assert abs(abs(vcells.polygon_area(floor[0][:, :2])) - areas2d[i]) < 1e-6
        else:
            assert not floor  # a site with an empty power cell has a 3-D cell that misses the plane
    assert np.all(s["lifted"][:, 2] > 0)


def test_lift_rejects_higher_order():
    with pytest.raises(ValueError):
        lift.lift_scene(asymmetric_diagram(2), (-2, 2, -2, 2))


# ------------------------------------------------------------------------- every function -> a figure
def _tiny_topk_2d():
    sae = SAE(SAEConfig(d_in=2, d_sae=6, architecture="topk", k=2, seed=0))
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.3, 0.4, 6))
    return sae


def test_power_figures_return_figures(tmp_path):
    figs = [power.fig5_voronoi_to_power(kmeans_centers=[[-2, -2], [2, -2], [0, 0.5]]),
            power.fig6_voronoi_power_order2(),
            power.plot_power_diagram(asymmetric_diagram(3), BOUNDS, weight_labels=True),
            power.plot_sae_power_cells(_tiny_topk_2d(), (-2, 2, -2, 2), X=np.zeros((3, 2)), resolution=40)]
    for f in figs:
        assert isinstance(f, Figure)
    save_png(figs[1], tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


def test_power_diagram_with_null_site_and_negative_weights_draws_no_nan_circle():
    pd = PowerDiagram(np.array([[0.5, 0.5], [-0.5, 0.2]]), np.array([-0.3, 0.4]), order=1, null_site=True)
    fig = power.plot_power_diagram(pd, (-1, 1, -1, 1))
    circles = [p for p in fig.axes[0].patches if type(p).__name__ == "Circle"]
    assert len(circles) == 1 and np.isfinite(circles[0].radius) and abs(circles[0].radius - np.sqrt(0.4)) < 1e-12


def test_lift_figures(tmp_path):
    pd = PowerDiagram(*lift.fig7_sites(n=5))
    assert isinstance(lift.plot_lift_3d(pd), Figure)
    pfig = lift.plot_lift_plotly(pd)
    write_html(pfig, tmp_path / "a.html", plotlyjs="directory")
    write_html(pfig, tmp_path / "b.html", plotlyjs="cdn")
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000
    assert 'src="plotly.min.js"' in (tmp_path / "a.html").read_text()
    assert (tmp_path / "b.html").stat().st_size < 500_000
    with pytest.raises(ValueError):
        write_html(pfig, tmp_path / "c.html", plotlyjs="nope")


def test_partition_figures():
    from splinterp.reference import KMeansAE, LocalPCAAE

    torch.manual_seed(0)
    X = torch.randn(120, 4)
    topk = SAE(SAEConfig(d_in=4, d_sae=8, architecture="topk", k=2, seed=0))
    relu = SAE(SAEConfig(d_in=4, d_sae=8, architecture="relu", seed=1))
    km = KMeansAE(4, n_init=1, seed=0).fit(X)
    lp = LocalPCAAE(3, rank=1, max_iter=3, kmeans_n_init=1, seed=0).fit(X)
    pl = plane_through(X[0], X[1], X[2])
    b = pl.bounds()
    f = partition.plot_slice_comparison({"topk": topk, "relu": relu, "km": km, "lp": lp}, pl.origin, pl.u, pl.v, b,
                                        resolution=40, anchors_ab=pl.coords, anchor_labels="abc",
                                        anchor_images=[np.zeros(16)] * 3)
    assert isinstance(f, Figure)
    assert isinstance(partition.plot_slice_partition(lp, pl.origin, pl.u, pl.v, b, resolution=30), Figure)
    with pytest.raises(TypeError):
        partition.SlicePartition(object(), pl.origin, pl.u, pl.v, b, 20)


def test_e1_panels():
    from splinterp.data.toy import make_three_clusters
    from splinterp.reference import KMeansAE, LocalPCAAE

    X, _ = make_three_clusters(60, seed=0)
    km = KMeansAE(3, n_init=1, seed=0).fit(X)
    lp = LocalPCAAE(3, rank=1, max_iter=3, kmeans_n_init=1, seed=0).fit(X)
    f = partition.plot_e1_panels(X, km, _tiny_topk_2d(), lp, resolution=40)
    assert isinstance(f, Figure) and len(f.axes) == 3
    with pytest.raises(ValueError):
        partition.plot_e1_panels(torch.zeros(5, 3), km, _tiny_topk_2d(), lp)


def test_llm_projection_figures():
    torch.manual_seed(0)
    X = torch.randn(80, 12)
    sae = SAE(SAEConfig(d_in=12, d_sae=16, architecture="topk", k=2, seed=0))
    toks = [f"t{i}" for i in range(80)]
    for color_by, dims in [("region", 2), ("top_latent", 3), ("none", 2)]:
        f = llm.plot_activation_projection(X, sae, tokens=toks, color_by=color_by, dims=dims)
        assert type(f).__name__ == "Figure" and len(f.data) >= 1
        assert "region:" in f.data[0].text[0] and "t" in f.data[0].text[0]
    f = llm.plot_activation_projection(X, sae, color_by="latent", latent=3)
    assert f.data[0].marker.showscale
    assert isinstance(llm.plot_activation_projection_static(X, sae, color_by="top_latent"), Figure)
    assert isinstance(llm.plot_activation_projection_static(X.numpy(), None, color_by=list("ab" * 40), dims=3),
                      Figure)
    p = llm.activation_projection(X, None, color_by="none", max_points=30)
    assert p.coords.shape == (30, 2)
    with pytest.raises(ValueError):
        llm.activation_projection(X, None, color_by="region")
    with pytest.raises(ValueError):
        llm.activation_projection(X, sae, color_by="latent", latent=99)
    with pytest.raises(ValueError):
        llm.activation_projection(X, sae, tokens=["a"])


def test_pca_matches_svd():
    X = torch.randn(200, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    coords, comps, ev = llm.pca(X, 2)
    _, S, Vh = torch.linalg.svd(X - X.mean(0), full_matrices=False)
    assert torch.allclose(ev.double(), (S[:2] ** 2 / (S**2).sum()), atol=1e-5)
    assert torch.allclose((comps.double() @ Vh[:2].T).abs(), torch.eye(2, dtype=torch.float64), atol=1e-4)


def test_training_and_mnist_figures():
    from splinterp.train import History

    h = History("sgd", {}, [{"epoch": 1, "train_mse": 0.5, "test_mse": 0.6}, {"epoch": 2, "train_mse": 0.3}])
    assert training.as_curves(h)["test_mse"][0] == 0.6 and np.isnan(training.as_curves(h)["test_mse"][1])
    assert isinstance(training.plot_training_curves({"SGD": h, "PAM-SGD": {"train_mse": [0.4, 0.2]}}), Figure)
    assert isinstance(training.plot_metric_bars({"SGD": {"mse": 0.3}, "PAM": {"mse": 0.2}}, "mse"), Figure)
    with pytest.raises(ValueError):
        training.plot_training_curves({"SGD": h}, metrics=("nope",))
    with pytest.raises(TypeError):
        training.as_curves(3)
    sae = SAE(SAEConfig(d_in=784, d_sae=20, architecture="topk", k=3, seed=0))
    assert isinstance(mnist.plot_filters(sae, n=10, ncols=5), Figure)
    assert isinstance(mnist.plot_encoder_decoder_filters(sae, n=6), Figure)
    x = torch.rand(4, 784)
    assert isinstance(mnist.plot_reconstructions(x, {"sae": sae(x).detach()}), Figure)
    with pytest.raises(ValueError):
        mnist.plot_filters(np.zeros((3, 100)))


# ------------------------------------------------------------------------------------ experiment figures
def _hex(c) -> str:
    from matplotlib.colors import to_hex

    return to_hex(c)


def test_mean_curves_draw_one_colour_per_method_with_ci_bands():
    from matplotlib.collections import PolyCollection

    from splinterp.viz.style import style

    ci = {"mean": [0.5, 0.4, 0.3], "low": [0.45, 0.35, 0.25], "high": [0.55, 0.45, 0.35]}
    one = {"mean": [0.6, 0.5, 0.45], "low": [None] * 3, "high": [None] * 3}
    f = training.plot_mean_curves({"sgd": {"train_mse": ci, "test_mse": ci}, "pam_sgd": {"test_mse": one}},
                                  title="E2 curves")
    ax = f.axes[0]
    FigureCanvasAgg(f).draw()
    by_label = {ln.get_label(): ln for ln in ax.get_lines()}
    assert _hex(by_label["SGD"].get_color()) == style("sgd")["color"].lower()
    assert _hex(by_label["PAM-SGD"].get_color()) == style("pam_sgd")["color"].lower()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SGD", "PAM-SGD"]  # one entry per method
    styles = sorted(ln.get_linestyle() for ln in ax.get_lines())
    assert styles == ["-", "-", "--"]  # train dashed, test solid
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2 and all(_hex(b.get_facecolor()[0]) == style("sgd")["color"].lower() for b in bands)
    assert ax.get_title() == "E2 curves" and ax.get_xlabel() == "epoch" and "MSE" in ax.get_ylabel()
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and not any("10^" in s or "times" in s for s in labels)  # plain numbers on the log axis


def test_metric_against_and_setting_bars():
    from splinterp.viz.style import style

    c = lambda m, lo, hi: {"mean": m, "low": lo, "high": hi, "half_width": None if lo is None else m - lo}  # noqa: E731
    cells = [{"x": 0.05, "method": "sgd", "test_mse": c(0.9, 0.8, 1.0)},
             {"x": 1.0, "method": "sgd", "test_mse": c(0.4, 0.35, 0.45)},
             {"x": 0.05, "method": "pam_sgd_authors", "test_mse": c(0.7, None, None)},
             {"x": 1.0, "method": "pam_sgd_authors", "test_mse": c(0.3, None, None)}]
    f = training.plot_metric_against({"TopK SAE": cells}, "test_mse", "fraction", "title")
    ax = f.axes[0]
    FigureCanvasAgg(f).draw()
    assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()] == ["0.05", "1"]
    assert {_hex(ln.get_color()) for ln in ax.get_lines()} == {style("sgd")["color"].lower(),
                                                              style("pam_sgd_authors")["color"].lower()}
    assert ax.get_ylabel() == "final test MSE" and f._suptitle.get_text() == "title"
    bars = [dict(cl, value=v) for cl, v in zip(cells, (0.0, 1e-3, 0.0, 1e-3))]
    g = training.plot_setting_bars({"weight decay": (bars, "Adam weight decay")}, "test_mse", "ablations")
    ax = g.axes[0]
    assert ax.get_ylim()[0] == 0.0  # bars from zero
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == [0.3, 0.4, 0.7, 0.9]
    assert {_hex(p.get_facecolor()) for p in ax.patches} == {style("sgd")["color"].lower(),
                                                            style("pam_sgd_authors")["color"].lower()}
    # error bars only where there is a CI (the SGD bars), of the half-width
    err_segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    assert sorted(round(float(s[1][1] - s[0][1]), 6) for s in err_segments if len(s) == 2) == [0.1, 0.2]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.001"]


def test_e1_local_pca_cells_are_smooth_and_match_the_model():
    """The local-PCA panel is drawn from the continuous assignment score (filled contours, no raster image), and
    the drawn cells agree with the model's own `regions` at points away from the boundaries."""
    from matplotlib.path import Path as MPath

    from splinterp.data.toy import make_three_clusters
    from splinterp.reference import KMeansAE, LocalPCAAE

    X, _ = make_three_clusters(60, seed=0)
    km = KMeansAE(3, n_init=1, seed=0).fit(X)
    lp = LocalPCAAE(3, rank=1, max_iter=3, kmeans_n_init=1, seed=0).fit(X)
    f = partition.plot_e1_panels(X, km, _tiny_topk_2d(), lp, resolution=60)
    ax = f.axes[2]
    assert not ax.images  # no raster: no staircase
    fills = [c for c in ax.collections if hasattr(c, "get_paths") and type(c).__name__ in ("ContourSet",
                                                                                          "QuadContourSet")]
    assert fills
    g = torch.Generator().manual_seed(1)
    P = (torch.rand(400, 2, generator=g, dtype=torch.float64) * 3.6 - 1.8)
    lab = lp.regions(P.to(lp.means_.dtype)).numpy()
    M, B = lp.means_.double().numpy(), lp.bases_.double().numpy()
    D = P.numpy()[None] - M[:, None]
    dist = (D ** 2).sum(-1) - (np.einsum("mnd,mdr->mnr", D, B) ** 2).sum(-1)
    srt = np.sort(dist, 0)
    clear = (srt[1] - srt[0]) > 0.05  # away from every boundary
    filled = [c for c in fills if c.filled]
    assert len(filled) == 3  # one filled cell set per region, in region order
    checked = 0
    for i, c in enumerate(filled):
        inside = np.zeros(len(P), bool)
        for path in c.get_paths():
            for poly in path.to_polygons():
                inside ^= MPath(poly).contains_points(P.numpy())
        checked += int((inside & clear).sum())
        assert np.all(lab[inside & clear] == i)
    assert checked > 100
