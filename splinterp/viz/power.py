"""Power diagrams in 2-D, drawn from exact polygons (`PowerDiagram.cells_2d`), and the paper's figures
5 and 6 done exactly.

Circles: a site with weight alpha_i > 0 gets a circle of radius sqrt(alpha_i) (the power distance is
zero on it); sites with alpha_i <= 0 get none (no NaN circles). Cells: one colour per key (site, or
sorted k-set), see `splinterp.viz.colors`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle

from splinterp.viz.cells import cells_colormap, draw_cells, polygon_centroid, setup_axes
from splinterp.viz.colors import ColorMap, palette
from splinterp.viz.raster import pixel_centers, raster_shape, show_raster


def _diagram(centers, weights, order=1):
    from splinterp.geometry.power import PowerDiagram

    return PowerDiagram(np.asarray(centers, dtype=np.float64), np.asarray(weights, dtype=np.float64), order=order)


def site_colors(n: int) -> np.ndarray:
    """RGB [n, 3]: the colour of site i (dot, circle, label), a darker shade of cell colour i of a
    first-order diagram coloured by `ColorMap([(0,), (1,), ...])`, so a circle is seen to belong to its site."""
    return palette(n) * 0.5


def draw_sites(ax, pd, circles: bool = True, weight_labels: bool | Sequence[int] = False, color=None,
               size: float = 30, label_fmt: str = "{i}: α={a:.2f}", index_labels: bool = True,
               label_offset: tuple[float, float] = (4, 4), zorder: float = 3) -> list:
    """Sites as dots in their own colour (`site_colors`), circles of radius sqrt(alpha) in the same colour
    where alpha > 0, a label on every site (its index, with alpha when `weight_labels`); sites with
    alpha <= 0 (no circle: sqrt(alpha) is not real) drawn hollow; the null site (if any) as a hollow
    square at the origin. Returns legend handles that explain these marks (`site_legend_handles`)."""
    C, w = pd.centers, pd.weights
    cols = site_colors(len(C)) if color is None else np.tile(np.asarray(matplotlib_rgb(color)), (len(C), 1))
    pos = (w > 0) | (not circles)  # hollow marks a site without a circle only where circles are drawn
    ax.scatter(C[pos, 0], C[pos, 1], s=size, c=cols[pos], zorder=zorder + 1, edgecolors="k", linewidths=0.5)
    ax.scatter(C[~pos, 0], C[~pos, 1], s=size, facecolors="white", edgecolors=cols[~pos], zorder=zorder + 1,
               linewidths=1.4)
    if circles:
        for c, a, col in zip(C, w, cols):
            if a > 0:
                ax.add_patch(Circle(c, np.sqrt(a), fill=False, ec=col, lw=1.4, alpha=0.9, zorder=zorder))
    labelled = set(range(len(C)) if weight_labels is True else (weight_labels or []))
    for i in range(len(C)):
        if i in labelled:
            txt = label_fmt.format(i=i, a=w[i])
        elif index_labels:
            txt = str(i)
        else:
            continue
        ax.annotate(txt, C[i], xytext=label_offset, textcoords="offset points", fontsize=7, color=cols[i],
                    weight="bold", zorder=zorder + 2,
                    bbox={"boxstyle": "round,pad=0.12", "fc": "white", "ec": "none", "alpha": 0.75})
    if getattr(pd, "null_site", False):
        ax.scatter([0], [0], s=size * 1.6, marker="s", facecolors="white", edgecolors="k", zorder=zorder + 1)
        ax.annotate("null", (0, 0), xytext=(4, -9), textcoords="offset points", fontsize=7, zorder=zorder + 2)
    return site_legend_handles(pd, circles)


def matplotlib_rgb(color) -> tuple:
    from matplotlib.colors import to_rgb

    return to_rgb(color)


def site_legend_handles(pd, circles: bool = True, site_label: str = "site cᵢ (label i: αᵢ)") -> list:
    """Legend entries for the marks `draw_sites` makes (only those present in this diagram)."""
    w = pd.weights
    h = [Line2D([], [], marker="o", ls="", mfc="0.35", mec="k", label=site_label)]
    if circles and (w > 0).any():
        h.append(Line2D([], [], marker="o", ls="", mfc="none", mec="0.35", ms=14,
                        label="circle of radius √αᵢ (αᵢ > 0), in the site's colour"))
    if circles and (w <= 0).any():
        h.append(Line2D([], [], marker="o", ls="", mfc="white", mec="0.35", mew=1.4,
                        label=f"hollow: αᵢ ≤ 0, no circle ({int((w <= 0).sum())} sites)"))
    if getattr(pd, "null_site", False):
        h.append(Line2D([], [], marker="s", ls="", mfc="white", mec="k", label="null site (ReLU: inactive)"))
    return h


def plot_power_diagram(pd, bounds=(-1, 1, -1, 1), ax=None, *, title: str | None = None, circles: bool = True,
                       weight_labels: bool | Sequence[int] = False, cmap: ColorMap | None = None,
                       sites: bool = True, alpha: float = 0.7, cells=None, legend: bool = False,
                       label_offset: tuple[float, float] = (4, 4)) -> Figure:
    """Draw a 2-D power diagram of any order from its exact cells, with sites and sqrt(alpha) circles.

    pd: a `splinterp.geometry.PowerDiagram` with dim 2 (e.g. `power_diagram(sae)` for a 2-D SAE). cmap:
    a ColorMap over the cell keys (default: one distinct colour per key). `cells` may pass precomputed
    `pd.cells_2d(bounds)`. legend: explain the site marks (dots, circles, hollow sites with alpha <= 0).
    """
    if pd.dim != 2:
        raise ValueError(f"plot_power_diagram draws 2-D diagrams; this one has dim={pd.dim} (use a slice)")
    if ax is None:
        fig = Figure(figsize=(5.2, 5.2), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    cells = pd.cells_2d(bounds) if cells is None else cells
    draw_cells(ax, cells, cmap or cells_colormap(cells), alpha=alpha)
    if sites:
        handles = draw_sites(ax, pd, circles=circles, weight_labels=weight_labels, label_offset=label_offset)
        if legend:
            ax.legend(handles=handles, fontsize=7, loc="lower left", framealpha=0.85)
    setup_axes(ax, bounds, title)
    _xy_labels(ax)
    return fig


def _xy_labels(ax) -> None:
    ax.set_xlabel("x₁")
    ax.set_ylabel("x₂")


def power_raster(pd, bounds, resolution: int = 200) -> tuple[np.ndarray, list]:
    """(key index image [H, W], keys): each pixel centre's cell key computed point-wise by `pd.keys`
    (no polygons involved), in the `raster` orientation; keys[i] is the key of index i."""
    shape = raster_shape(bounds, resolution)
    K = pd.keys(pixel_centers(bounds, shape))
    uniq, inv = np.unique(K, axis=0, return_inverse=True)
    n = pd.n_sites
    keys = [tuple(int(s) for s in row if s < n) if pd.null_site else tuple(int(s) for s in row) for row in uniq]
    return inv.reshape(shape), keys


def plot_power_raster(pd, bounds, resolution: int = 200, ax=None, cmap: ColorMap | None = None,
                      title: str | None = None) -> Figure:
    """The same diagram as `plot_power_diagram`, computed pixel by pixel (for checking the polygons)."""
    if ax is None:
        fig = Figure(figsize=(5.2, 5.2), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    img, keys = power_raster(pd, bounds, resolution)
    cmap = cmap or ColorMap(sorted(keys, key=lambda k: (len(k), k)))
    rgb = cmap.rgb_of(keys)[img]
    show_raster(ax, rgb, bounds)
    setup_axes(ax, bounds, title)
    return fig


# ------------------------------------------------------------------------------------ paper figures
def fig5_sites(seed: int = 42) -> dict:
    """The random inputs of figure 5: 12 sites in [-4, 4]^2, their classes (3), weights U[0.5, 2.5], and
    200 points in three Gaussian blobs for k-means."""
    rng = np.random.default_rng(seed)
    sites = rng.uniform(-4, 4, (12, 2))
    classes = rng.integers(0, 3, 12)
    weights = rng.uniform(0.5, 2.5, 12)
    n = 200
    pts = rng.normal(size=(n, 2))
    pts[: n // 3] += (-2.0, -2.0)
    pts[n // 3: 2 * n // 3] += (2.0, -2.0)
    return {"sites": sites, "classes": classes, "weights": weights, "points": pts}


def fig5_voronoi_to_power(seed: int = 42, bounds=(-4.5, 4.5, -4.5, 4.5), kmeans_centers=None) -> Figure:
    """Figure 5, exactly: (a) Voronoi diagram of 12 sites, (b) 1-nearest-neighbour classification (the
    Voronoi cells united by class), (c) k-means (k=3) on 200 points: the clusters are the Voronoi cells of
    the centroids, (d) power diagram of the same 12 sites with weights U[0.5, 2.5] and circles of radius
    sqrt(alpha). All partitions are exact polygons.

    kmeans_centers: the 3 fitted centroids for panel (c); default fits `splinterp.reference.KMeansAE`.
    """
    d = fig5_sites(seed)
    sites, classes, weights, pts = d["sites"], d["classes"], d["weights"], d["points"]
    if kmeans_centers is None:
        import torch

        from splinterp.reference.kmeans import KMeansAE

        km = KMeansAE(3, seed=seed).fit(torch.from_numpy(pts))
        kmeans_centers = km.cluster_centers_.numpy()
    kmeans_centers = np.asarray(kmeans_centers, dtype=np.float64)
    fig = Figure(figsize=(11, 11), layout="constrained")
    axes = fig.subplots(2, 2)
    site_cmap = ColorMap([(i,) for i in range(len(sites))])

    vor = _diagram(sites, np.zeros(len(sites)))
    vcells = vor.cells_2d(bounds)
    plot_power_diagram(vor, bounds, axes[0, 0], cmap=site_cmap, circles=False,
                       title="(a) Voronoi diagram: nearest site")

    class_cols = palette(3)
    ax = axes[0, 1]
    draw_cells(ax, vcells, facecolors=[class_cols[classes[c.key[0]]] for c in vcells], alpha=0.7,
               edgecolor="0.55", linewidth=0.4)
    for k in range(3):
        sel = classes == k
        ax.scatter(sites[sel, 0], sites[sel, 1], s=40, color=class_cols[k] * 0.6, edgecolors="k", zorder=4,
                   label=f"class {k}")
    ax.legend(fontsize=8, loc="lower left")
    setup_axes(ax, bounds, "(b) 1-nearest-neighbour classes: Voronoi cells united")
    _xy_labels(ax)

    ax = axes[1, 0]
    km_pd = _diagram(kmeans_centers, np.zeros(len(kmeans_centers)))
    kcells = km_pd.cells_2d(bounds)
    km_cmap = ColorMap([(i,) for i in range(len(kmeans_centers))])
    draw_cells(ax, kcells, km_cmap, alpha=0.55)
    lab = km_pd.keys(pts)[:, 0]
    ax.scatter(pts[:, 0], pts[:, 1], s=9, c=[km_cmap((int(i),)) * 0.6 for i in lab], zorder=3, linewidths=0)
    ax.scatter(kmeans_centers[:, 0], kmeans_centers[:, 1], s=220, marker="*", c="k", zorder=4)
    setup_axes(ax, bounds, "(c) k-means (k=3): Voronoi cells of the centroids (★)")
    _xy_labels(ax)

    pw = _diagram(sites, weights)
    plot_power_diagram(pw, bounds, axes[1, 1], cmap=site_cmap, weight_labels=True, legend=True,
                       title="(d) power diagram of the same 12 sites: cell i = argminᵢ |x − cᵢ|² − αᵢ")
    fig.suptitle("From Voronoi to power diagrams (exact cells)", fontsize=15)
    return fig


def label_cells(ax, cells, bounds, min_frac: float = 0.006, fontsize: float = 7.5) -> list:
    """Write every cell's key ("{i,j}") on it: at its centroid (inside, cells are convex); a cell too small
    for its label (area < min_frac of the box) gets the label beside it with a leader line. Returns the texts."""
    xmin, xmax, ymin, ymax = bounds
    box = (xmax - xmin) * (ymax - ymin)
    texts = []
    small = 0
    for c in cells:
        key = cell_key_of(c)
        txt = "{" + ",".join(map(str, key)) + "}"
        cx, cy = polygon_centroid(np.asarray(c.vertices))
        bbox = {"boxstyle": "round,pad=0.12", "fc": "white", "ec": "0.3", "lw": 0.4, "alpha": 0.85}
        if abs(c.area) >= min_frac * box:
            texts.append(ax.text(cx, cy, txt, fontsize=fontsize, ha="center", va="center", zorder=6, bbox=bbox))
        else:
            off = (28 if cx < (xmin + xmax) / 2 else -28, 22 - 16 * small)
            small += 1
            texts.append(ax.annotate(txt, (cx, cy), xytext=off, textcoords="offset points", fontsize=fontsize,
                                     ha="center", va="center", zorder=6, bbox=bbox,
                                     arrowprops={"arrowstyle": "-", "lw": 0.7, "color": "0.2"}))
    return texts


def cell_key_of(cell) -> tuple:
    return tuple(cell.key) if hasattr(cell, "key") else tuple(cell[0])


def fig6_sites(seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """The inputs of figure 6: 7 centres in [-3, 3]^2 and weights 2 U[0, 1) with 4 added to the first."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-3, 3, (7, 2))
    alpha = 2.0 * rng.uniform(0, 1, 7)
    alpha[0] += 4.0
    return centers, alpha


def fig6_voronoi_power_order2(seed: int = 42, bounds=(-4, 4, -4, 4), centers=None, weights=None) -> Figure:
    """Figure 6, exactly: Voronoi (all alpha = 0) | power diagram | 2nd-order power diagram of the same
    sites. Every 2-set gets its own colour (no modulo collisions); first-order panels share site colours."""
    if centers is None or weights is None:
        centers, weights = fig6_sites(seed)
    centers, weights = np.asarray(centers, float), np.asarray(weights, float)
    m = len(centers)
    fig = Figure(figsize=(16, 5.8), layout="constrained")
    axes = fig.subplots(1, 3)
    site_cmap = ColorMap([(i,) for i in range(m)])
    plot_power_diagram(_diagram(centers, np.zeros(m)), bounds, axes[0], cmap=site_cmap, circles=False,
                       title="Voronoi diagram (all αᵢ = 0)")
    plot_power_diagram(_diagram(centers, weights), bounds, axes[1], cmap=site_cmap, weight_labels=True,
                       legend=True, title="Power diagram (αᵢ > 0: circles of radius √αᵢ)")
    pd2 = _diagram(centers, weights, order=2)
    cells = pd2.cells_2d(bounds)
    plot_power_diagram(pd2, bounds, axes[2], cells=cells, circles=False, label_offset=(-10, -12),
                       title=f"2nd-order power diagram: {len(cells)} cells, each labelled by its 2-set {{i, j}}")
    label_cells(axes[2], cells, bounds)
    fig.suptitle("Power diagrams and Voronoi diagrams (exact cells)", fontsize=15)
    return fig


def plot_sae_power_cells(sae, bounds, X=None, resolution: int = 300) -> Figure:
    """A 2-D SAE's regions two ways: exact power-diagram polygons (`power_diagram(sae).cells_2d`) and the
    active set of `sae.encode` at every pixel. They coincide: the TopK set is the k-th order power cell."""
    import torch

    from splinterp.geometry import active_mask
    from splinterp.geometry.power import power_diagram

    if sae.cfg.d_in != 2:
        raise ValueError(f"plot_sae_power_cells needs a 2-D SAE, got d_in={sae.cfg.d_in}")
    pd = power_diagram(sae)
    cells = pd.cells_2d(bounds)
    cmap = cells_colormap(cells)
    fig = Figure(figsize=(11.5, 5.6), layout="constrained")
    a0, a1 = fig.subplots(1, 2)
    draw_cells(a0, cells, cmap, alpha=0.75)
    draw_sites(a0, pd, circles=True, weight_labels=True)
    setup_axes(a0, bounds, f"exact cells of power_diagram(sae): {len(cells)} regions")
    shape = raster_shape(bounds, resolution)
    P = pixel_centers(bounds, shape)
    mask = active_mask(sae, torch.from_numpy(P).to(sae.dtype)).numpy()
    known = {k: i for i, k in enumerate(cmap.keys)}
    keys = [tuple(np.flatnonzero(row).tolist()) for row in mask]
    rgb = np.array([cmap.colors[known[k]] if k in known else (0.0, 0.0, 0.0) for k in keys]).reshape(*shape, 3)
    show_raster(a1, rgb, bounds, alpha=0.75)
    setup_axes(a1, bounds, "active set of sae.encode at each pixel")
    for ax in (a0, a1):
        _xy_labels(ax)
    if X is not None:
        X = np.asarray(X)
        for ax in (a0, a1):
            ax.scatter(X[:, 0], X[:, 1], s=6, c="k", alpha=0.6, zorder=5, linewidths=0)
    arch = sae.cfg.architecture + (f", k={sae.cfg.k}" if sae.cfg.k else "")
    fig.suptitle(f"{arch} SAE with {sae.cfg.d_sae} latents: regions = power-diagram cells", fontsize=13)
    handles = site_legend_handles(pd, True, site_label="latent i's power centre cᵢ = W_enc[:, i] (label i: αᵢ)")
    handles[1].set_label("circle radius √αᵢ, αᵢ = |cᵢ|² + 2 b_enc,i, in latent i's colour")
    if X is not None:
        handles.append(Line2D([], [], marker="o", ls="", color="k", ms=3, alpha=0.6, label="training data"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8.5)
    return fig
