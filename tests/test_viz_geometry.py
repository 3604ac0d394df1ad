"""What the geometry figures draw (not only that they return): one polygon per exact cell, a label on every
site and cell where the figure promises one, each circle in its own site's colour, legends that explain the
marks, per-method colours from `viz.style`."""

from __future__ import annotations

import re

import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.patches import Circle

from splinterp.geometry import PowerDiagram
from splinterp.viz import lift, power


def _polys(ax) -> list[PolyCollection]:
    return [c for c in ax.collections if isinstance(c, PolyCollection) and not hasattr(c, "get_offsets3d")]


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _circles(ax) -> list[Circle]:
    return [p for p in ax.patches if isinstance(p, Circle)]


def test_fig6_order2_panel_labels_every_cell_once_and_draws_no_circles():
    centers, alpha = power.fig6_sites(42)
    fig = power.fig6_voronoi_power_order2(centers=centers, weights=alpha)
    ax = fig.axes[2]
    cells = PowerDiagram(centers, alpha, order=2).cells_2d((-4, 4, -4, 4))
    assert len(cells) == 11
    (pc,) = _polys(ax)
    assert len(pc.get_paths()) == len(cells)  # one polygon per exact cell
    labels = [t for t in _texts(ax) if t.startswith("{")]
    want = {"{" + ",".join(map(str, c.key)) + "}" for c in cells}
    assert sorted(labels) == sorted(want)  # every 2-set labelled, exactly once
    assert not _circles(ax)  # no circles clutter the 2nd-order panel
    assert not [t for t in _texts(ax) if "α" in t]  # no alpha labels under the 2-set labels
    # the first-order power panel: every site labelled with its alpha, one circle per positive weight
    ax1 = fig.axes[1]
    assert sorted(t for t in _texts(ax1) if "α" in t) == sorted(f"{i}: α={a:.2f}" for i, a in enumerate(alpha))
    assert len(_circles(ax1)) == int((alpha > 0).sum())


def test_fig5d_every_site_labelled_and_each_circle_in_its_sites_colour():
    fig = power.fig5_voronoi_to_power(42, kmeans_centers=np.array([[-2.0, -2.0], [2.0, -2.0], [0.0, 2.0]]))
    ax = fig.axes[3]
    w = power.fig5_sites(42)["weights"]
    assert sorted(t for t in _texts(ax) if "α" in t) == sorted(f"{i}: α={a:.2f}" for i, a in enumerate(w))
    circ = _circles(ax)
    assert len(circ) == 12
    cols = power.site_colors(12)
    C = power.fig5_sites(42)["sites"]
    for c in circ:  # each circle sits on a site, has radius sqrt(alpha) and that site's colour
        i = int(np.argmin(np.linalg.norm(C - np.asarray(c.center), axis=1)))
        assert np.allclose(c.center, C[i]) and np.isclose(c.radius, np.sqrt(w[i]))
        assert np.allclose(c.get_edgecolor()[:3], cols[i])
    assert len({tuple(np.round(c.get_edgecolor()[:3], 3)) for c in circ}) == 12  # 12 different colours
    assert ax.get_legend() is not None


def test_sites_without_circle_are_hollow_and_explained():
    pd = PowerDiagram(np.array([[0.0, 0.0], [1.0, 0.5], [-1.0, 0.3], [0.2, -1.0]]), np.array([0.3, -0.2, 0.0, 0.5]))
    fig = power.plot_power_diagram(pd, (-2, 2, -2, 2), weight_labels=True, legend=True)
    ax = fig.axes[0]
    assert len(_circles(ax)) == 2
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("no circle (2 sites)" in t for t in legend)
    hollow = [c for c in ax.collections if not isinstance(c, PolyCollection) and len(c.get_offsets())
              and np.allclose(c.get_facecolor()[:, :3], 1.0)]
    assert sum(len(c.get_offsets()) for c in hollow) == 2  # the two sites with alpha <= 0


def test_lift_right_panel_shows_height_against_cell_area():
    centers, alpha = lift.fig7_sites(42)
    pd = PowerDiagram(centers, alpha)
    fig = lift.plot_lift_3d(pd, (-2, 2, -2, 2))
    ax2, ax3 = fig.axes[1], fig.axes[2]
    assert sorted(t for t in _texts(ax2) if "α" in t) == sorted(f"{i}: α={a:.2f}" for i, a in enumerate(alpha))
    assert any("probe" in t.get_text() for t in ax2.get_legend().get_texts())
    K = lift.default_K(alpha)
    xs = np.concatenate([c.get_offsets()[:, 0] for c in ax3.collections])
    assert np.allclose(np.sort(xs), np.sort(np.sqrt(K - alpha)))  # one point per site at its lift height
    rho = float(re.search(r"correlation ([+-][0-9.]+)", ax3.get_title()).group(1))
    assert rho < 0  # the paper's message holds on these sites: higher site, smaller cell


# ------------------------------------------------------------------ figures of the exact region tools
def _sae(arch: str, d_in: int = 5, d_sae: int = 12, seed: int = 0, k: int | None = None):
    import torch

    from splinterp import SAE, SAEConfig

    sae = SAE(SAEConfig(d_in, d_sae, arch, k=k, seed=seed, dtype="float64"))
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        sae.b_enc.copy_(0.4 * torch.randn(d_sae, generator=g, dtype=torch.float64))
    return sae


def test_segment_figure_draws_one_band_per_exact_piece_and_pieces_match_encode():
    import torch
    from matplotlib.patches import Rectangle

    from splinterp.geometry import segment_regions
    from splinterp.viz import tools

    g = torch.Generator().manual_seed(2)
    x0, x1 = (3 * torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2))
    segs = {}
    for arch, k in (("topk", 3), ("relu", None)):
        sae = _sae(arch, k=k)
        seg = segment_regions(sae, x0, x1)
        segs[arch] = (sae, seg, arch)
        # brute force: active sets at 20,000 samples change only at the exact breaks, and every break is seen
        t = np.linspace(0, 1, 20001)
        act = (sae.encode(seg.points(t)) != 0).numpy()
        changes = t[1:][(act[1:] != act[:-1]).any(1)]
        assert len(changes) == len(seg.breaks)
        assert np.allclose(changes, seg.breaks, atol=1e-4)
    fig = tools.plot_segments(segs)
    bands = [fig.axes[0], fig.axes[2]]
    for ax, (_, seg, _) in zip(bands, segs.values()):
        spans = [p for p in ax.patches if isinstance(p, Rectangle) or p.__class__.__name__ == "Polygon"]
        assert len(spans) == len(seg)
        assert f"{len(seg)} exact pieces" in ax.get_title(loc="left")
    from matplotlib.colors import to_rgb

    from splinterp.viz.style import style

    assert to_rgb(fig.axes[1].lines[0].get_color()) == to_rgb(style("topk")["color"])
    assert to_rgb(fig.axes[3].lines[0].get_color()) == to_rgb(style("relu")["color"])


def test_boundary_histograms_one_outline_per_architecture_in_its_colour():
    from matplotlib.colors import to_rgb

    from splinterp.viz import tools
    from splinterp.viz.style import style

    rng = np.random.default_rng(0)
    d = {"relu": rng.lognormal(0, 1, 200), "topk": rng.lognormal(1, 1, 200), "gated": rng.lognormal(-1, 1, 200)}
    fig = tools.plot_boundary_histograms(d)
    ax = fig.axes[0]
    assert len(ax.patches) == 3
    assert [to_rgb(p.get_edgecolor()) for p in ax.patches] == [to_rgb(style(k)["color"]) for k in d]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"{style(k)['label']} (median {np.median(v):.3g})" for k, v in d.items()]


def test_complexity_map_counts_relu_hyperplanes_in_reach():
    import torch

    from splinterp.geometry import plane_through, slice_2d
    from splinterp.viz import raster, tools

    sae = _sae("relu")
    g = torch.Generator().manual_seed(3)
    plane = plane_through(*(torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)))
    sl = slice_2d(sae, plane, bounds=plane.bounds(0.5))
    grid = tools.complexity_grid(sae, sl, 0.3, resolution=30)
    # brute force: latents whose hyperplane u_i = 0 lies within 0.3 of the pixel centre
    P = sl.to_input(raster.pixel_centers(sl.bounds, grid.shape))
    W, b = sae.W_enc.detach(), sae.b_enc.detach()
    dist = ((P @ W + b).abs() / W.norm(dim=0)).numpy()
    assert np.array_equal(grid.ravel(), (dist < 0.3).sum(1))
    fig = tools.plot_complexity_maps({"relu": (sl, grid)}, radius=0.3)
    (im,) = fig.axes[0].images
    assert np.array_equal(np.asarray(im.get_array()), grid)
    (pc,) = [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    assert len(pc.get_paths()) == len(sl.polygons)  # every exact region edge drawn over the map


def test_tool_jobs_are_registered_with_png_outputs():
    from splinterp.experiments import registry

    jobs = registry.load_all()
    assert set(jobs["mnist_geometry_tools"].outputs) == {"segments_mnist.png", "boundary_distance_hist.png",
                                                          "local_complexity_map.png"}
    assert jobs["llm_segments"].outputs == ("segments_tokens.png",) and "llm" in jobs["llm_segments"].tags
    assert jobs["mnist_geometry_tools"].quick_seconds <= 30 and jobs["llm_segments"].quick_seconds <= 30


def test_slice_comparison_shows_error_on_its_own_scale_with_axes_named():
    """Regions on top, the error below as its own image (not a veil over region colours), axes say what a, b are."""
    import torch

    from splinterp.geometry import plane_through
    from splinterp.viz import partition, raster

    sae = _sae("topk", d_in=5, d_sae=10, k=2)
    g = torch.Generator().manual_seed(4)
    plane = plane_through(*(torch.randn(5, generator=g, dtype=torch.float64) for _ in range(3)))
    b = plane.bounds(0.3)
    fig = partition.plot_slice_comparison({"topk": sae}, plane.origin, plane.u, plane.v, b, resolution=40,
                                          axis_labels=("a: along x0 → x1", "b: towards x2"))
    top, bottom = fig.axes[0], fig.axes[1]
    assert top.get_xlabel() == "a: along x0 → x1" and bottom.get_ylabel() == "b: towards x2"
    assert not top.images  # no veil over the region colours
    (im,) = bottom.images
    shape = raster.raster_shape(b, 40)
    X = plane.to_input(raster.pixel_centers(b, shape))
    err = ((X - sae(X)) ** 2).sum(1).detach().numpy().reshape(shape)
    vmax = np.percentile(err, 98)
    from matplotlib import colormaps

    want = colormaps["magma"](np.clip(err / vmax, 0, 1))
    assert np.allclose(np.asarray(im.get_array()), want, atol=1e-6)
    assert any("|x − x̂|²" in a.get_ylabel() for a in fig.axes)  # the error colour bar is labelled
