"""Partitions of a 2-D slice of input space by an SAE or a reference autoencoder, shaded by reconstruction
error; and the E1 three-panel picture (k-means | TopK SAE | k-means + local PCA).

A slice is the plane x(a, b) = origin + a u + b v (e.g. `geometry.plane_through(x0, x1, x2)` through three
MNIST digits, or the top-2 PCA plane), drawn in (a, b) coordinates: a to the right, b up.

How each model's cells are obtained:
- SAE (any architecture): exact polygons from `geometry.slice_2d`;
- k-means AE: exact polygons too. On the plane, |x(a, b) - c|^2 differs between centroids by an affine
  function of (a, b), so the nearest-centroid cells are a power diagram in (a, b) with centres
  c' = (u.(c - o), v.(c - o)) and weights |c'|^2 - |o - c|^2 (exact for any u, v);
- any other model with ``regions(X)`` (local PCA AE: quadric boundaries): a raster at pixel centres in the
  `splinterp.viz.raster` orientation (``origin="lower"``), with boundary pixels outlined.
Error: the squared reconstruction error |x - model(x)|^2 at every pixel; `plot_slice_comparison` draws it
as its own row (one colour scale, region boundaries over it); `plot_slice_partition` as a black veil whose
opacity grows with the error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.colors import Normalize, to_rgb
from matplotlib.figure import Figure

from splinterp.viz.cells import cells_colormap, draw_cells, setup_axes
from splinterp.viz.colors import ColorMap
from splinterp.viz.raster import check_bounds, pixel_centers, raster_shape, show_raster

VEIL_MAX = 0.7


def _is_sae(model) -> bool:
    return hasattr(model, "cfg") and hasattr(model.cfg, "architecture") and hasattr(model, "encoder_affine")


def _is_kmeans(model) -> bool:
    return hasattr(model, "cluster_centers_")


def _dtype(model) -> torch.dtype:
    dt = getattr(model, "dtype", torch.float32)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def _device(model):
    return getattr(model, "device", "cpu")


def _vec(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64))
    if t.ndim != 1:
        raise ValueError(f"plane vectors must be 1-D, got shape {tuple(t.shape)}")
    return t


def plane_points(origin, u, v, ab: np.ndarray) -> torch.Tensor:
    """Inputs [N, d] (float64) at plane coordinates ab [N, 2]."""
    o, uu, vv = _vec(origin), _vec(u), _vec(v)
    ab = torch.as_tensor(np.asarray(ab, dtype=np.float64))
    return o + ab[:, :1] * uu + ab[:, 1:] * vv


@torch.no_grad()
def reconstruction_errors(model, X: torch.Tensor, batch_size: int = 16384) -> np.ndarray:
    """float64 [N]: |x - model(x)|^2 per row (rows cast to the model's dtype and device)."""
    out = []
    for s in range(0, X.shape[0], batch_size):
        xb = X[s: s + batch_size].to(device=_device(model), dtype=_dtype(model))
        out.append(((xb - model(xb)) ** 2).sum(1).double().cpu())
    return torch.cat(out).numpy()


def kmeans_slice_diagram(model, origin, u, v):
    """The k-means AE's nearest-centroid cells on the plane, as an exact PowerDiagram in (a, b)."""
    from splinterp.geometry import PowerDiagram

    C = model.cluster_centers_.detach().cpu().double()
    o, uu, vv = _vec(origin), _vec(u), _vec(v)
    D = C - o
    cp = torch.stack([D @ uu, D @ vv], 1)
    alpha = (cp**2).sum(1) - (D**2).sum(1)
    return PowerDiagram(cp.numpy(), alpha.numpy())


class SlicePartition:
    """A model's partition of one slice: exact polygons (`cells`: list of (key, vertices)) or a label
    raster (`labels` [H, W]); plus the squared error raster `errors` [H, W]."""

    def __init__(self, model, origin, u, v, bounds, resolution: int = 300, errors: bool = True):
        self.bounds = check_bounds(bounds)
        self.shape = raster_shape(self.bounds, resolution)
        P = pixel_centers(self.bounds, self.shape)
        X = plane_points(origin, u, v, P)
        self.cells = self.labels = None
        if _is_sae(model):
            from splinterp.geometry import slice_2d

            sl = slice_2d(model, _vec(origin).to(torch.float64), _vec(u), _vec(v), self.bounds)
            masks = sl.masks.numpy()
            signs = None if sl.signs is None else sl.signs.numpy()
            keys = [tuple(np.flatnonzero(m).tolist()) if signs is None else
                    tuple((int(i), bool(signs[r, i])) for i in np.flatnonzero(m)) for r, m in enumerate(masks)]
            self.cells = list(zip(keys, sl.polygons))
            self.kind = "exact polygons (slice_2d)"
        elif _is_kmeans(model):
            pd = kmeans_slice_diagram(model, origin, u, v)
            self.cells = [(c.key, c.vertices) for c in pd.cells_2d(self.bounds)]
            self.kind = "exact polygons (power diagram of projected centroids)"
        elif hasattr(model, "regions"):
            with torch.no_grad():
                lab = model.regions(X.to(device=_device(model), dtype=_dtype(model)))
            self.labels = torch.as_tensor(lab).cpu().numpy().reshape(self.shape)
            self.kind = f"raster {self.shape[1]}x{self.shape[0]} (model.regions at pixel centres)"
        else:
            raise TypeError(f"{type(model).__name__} is neither an SAE nor a model with regions(X)")
        self.errors = reconstruction_errors(model, X).reshape(self.shape) if errors else None

    @property
    def n_regions(self) -> int:
        return len(self.cells) if self.cells is not None else len(np.unique(self.labels))

    def colormap(self) -> ColorMap:
        if self.cells is not None:
            return cells_colormap(self.cells)
        ids = np.unique(self.labels).tolist()
        if len(ids) <= 256:
            return ColorMap(ids)
        right = self.labels[:, :-1] != self.labels[:, 1:]
        up = self.labels[:-1] != self.labels[1:]
        pos = {k: i for i, k in enumerate(ids)}
        pairs = {(pos[a], pos[b]) for a, b in zip(self.labels[:, :-1][right], self.labels[:, 1:][right])}
        pairs |= {(pos[a], pos[b]) for a, b in zip(self.labels[:-1][up], self.labels[1:][up])}
        return ColorMap(ids, sorted(pairs))

    def draw(self, ax, cmap: ColorMap | None = None, alpha: float = 0.85, err_vmax: float | None = None,
             edge_width: float = 0.5) -> None:
        cmap = cmap or self.colormap()
        if self.cells is not None:
            draw_cells(ax, self.cells, cmap, alpha=alpha, linewidth=edge_width, edgecolor="0.2")
        else:
            ids = np.unique(self.labels)
            rgba = np.ones((*self.shape, 4))
            rgba[..., :3] = cmap.rgb_of(ids.tolist())[np.searchsorted(ids, self.labels)]
            rgba[..., 3] = alpha
            if len(ids) > 64:  # many regions: outline boundary pixels
                edge = np.zeros(self.shape, bool)
                edge[:, 1:] |= self.labels[:, 1:] != self.labels[:, :-1]
                edge[1:] |= self.labels[1:] != self.labels[:-1]
                rgba[edge] = (0.2, 0.2, 0.2, 1.0)
            show_raster(ax, rgba, self.bounds, zorder=1)
            if len(ids) <= 64:  # few regions: thin boundary lines between pixel centres (the 0.5 level)
                P = pixel_centers(self.bounds, self.shape).reshape(*self.shape, 2)
                for v in ids:
                    ax.contour(P[0, :, 0], P[:, 0, 1], (self.labels == v).astype(float), levels=[0.5],
                               colors="0.2", linewidths=max(edge_width, 0.3), zorder=1.5)
        if self.errors is not None and err_vmax is not None and err_vmax > 0:
            veil = np.zeros((*self.shape, 4))
            veil[..., 3] = VEIL_MAX * np.clip(self.errors / err_vmax, 0, 1)
            show_raster(ax, veil, self.bounds, zorder=2)


    def draw_boundaries(self, ax, color="white", width: float = 0.4) -> None:
        """Only the region boundaries (exact polygon edges, or label changes of a raster), for drawing over
        another picture of the slice (the error map)."""
        if self.cells is not None:
            draw_cells(ax, self.cells, facecolors=["none"] * len(self.cells), edgecolor=color, linewidth=width,
                       alpha=1.0, zorder=3)
            return
        edge = np.zeros(self.shape, bool)
        edge[:, 1:] |= self.labels[:, 1:] != self.labels[:, :-1]
        edge[1:] |= self.labels[1:] != self.labels[:-1]
        rgba = np.zeros((*self.shape, 4))
        rgba[edge] = (*to_rgb(color), 1.0)
        show_raster(ax, rgba, self.bounds, zorder=3)


def plot_slice_partition(model, origin, u, v, bounds, ax=None, *, resolution: int = 300, shade_error: bool = True,
                         err_vmax: float | None = None, anchors_ab=None, anchor_labels: Sequence[str] | None = None,
                         title: str | None = None, alpha: float = 0.85) -> Figure:
    """One model's partition of the plane origin + a u + b v over `bounds` (see the module doc)."""
    fig = _fig_for(ax, (5.4, 5.2))
    ax = ax or fig.axes[0]
    part = SlicePartition(model, origin, u, v, bounds, resolution, errors=shade_error)
    vmax = err_vmax if err_vmax is not None else (float(np.percentile(part.errors, 98)) if shade_error else None)
    part.draw(ax, alpha=alpha, err_vmax=vmax)
    _anchors(ax, anchors_ab, anchor_labels)
    setup_axes(ax, bounds, title or f"{type(model).__name__}: {part.n_regions} regions")
    return fig


def _fig_for(ax, size) -> Figure:
    if ax is not None:
        return ax.figure
    fig = Figure(figsize=size, layout="constrained")
    fig.add_subplot()
    return fig


def _anchors(ax, anchors_ab, labels) -> None:
    if anchors_ab is None:
        return
    A = np.asarray(anchors_ab, dtype=np.float64)
    ax.scatter(A[:, 0], A[:, 1], s=70, marker="*", c="yellow", edgecolors="k", zorder=6, linewidths=0.8)
    for i, p in enumerate(A):
        if labels is not None:
            ax.annotate(str(labels[i]), p, xytext=(5, 5), textcoords="offset points", fontsize=9, weight="bold",
                        zorder=7, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})


def plot_slice_comparison(models: Mapping[str, object], origin, u, v, bounds, *, resolution: int = 300,
                          shade_error: bool = True, anchors_ab=None, anchor_labels: Sequence[str] | None = None,
                          suptitle: str | None = None, anchor_images: Sequence[np.ndarray] | None = None,
                          axis_labels: tuple[str, str] = ("a", "b")) -> Figure:
    """Several models' partitions of the same slice side by side.

    Top row: each model's regions (exact polygons where they exist). Bottom row (with `shade_error`): the
    squared reconstruction error |x - model(x)|^2 at every point of the slice on one shared colour scale, with
    the same region boundaries drawn over it, so error is read on its own scale and not through region colours.
    models: {panel title: SAE / KMeansAE / LocalPCAAE / ...}. anchor_images (optional): the inputs the plane
    passes through, shown as 28x28 thumbnails in an extra first column. axis_labels: what a and b are.
    """
    if not models:
        raise ValueError("models is empty")
    parts = {name: SlicePartition(m, origin, u, v, bounds, resolution, errors=shade_error)
             for name, m in models.items()}
    thumbs = anchor_images is not None
    n = len(parts) + (1 if thumbs else 0)
    rows = 2 if shade_error else 1
    fig = Figure(figsize=(4.3 * len(parts) + (1.3 if thumbs else 0) + 0.8, 4.7 * rows + 0.3), layout="constrained")
    grid = fig.subplots(rows, n, squeeze=False, width_ratios=([0.3] if thumbs else []) + [1.0] * len(parts))
    if thumbs:
        _thumbnails(fig, grid[0, 0], anchor_images, anchor_labels)
        if rows == 2:
            grid[1, 0].set_axis_off()
        grid = grid[:, 1:]
    for ax, (name, part) in zip(grid[0], parts.items()):
        part.draw(ax, edge_width=0.5 if part.n_regions < 300 else 0.15)
        _anchors(ax, anchors_ab, anchor_labels)
        setup_axes(ax, bounds, f"{name}\n{part.n_regions} regions, {part.kind.split(' (')[0]}", fontsize=10)
    if shade_error:
        import matplotlib.cm as cm
        from matplotlib import colormaps

        vmax = float(np.percentile(np.concatenate([p.errors.ravel() for p in parts.values()]), 98)) or 1.0
        norm = Normalize(0, vmax)
        for ax, (name, part) in zip(grid[1], parts.items()):
            show_raster(ax, colormaps["magma"](norm(part.errors)), bounds, zorder=1)
            part.draw_boundaries(ax, width=0.4 if part.n_regions < 300 else 0.12)
            _anchors(ax, anchors_ab, anchor_labels)
            setup_axes(ax, bounds, f"{name}: reconstruction error", fontsize=10)
        fig.colorbar(cm.ScalarMappable(norm, "magma"), ax=list(grid[1]), shrink=0.85,
                     label="|x − x̂|² (clipped at its 98th percentile)")
    for ax in grid.ravel():
        ax.set_xlabel(axis_labels[0], fontsize=8)
        ax.set_ylabel(axis_labels[1], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=13)
    return fig


def _thumbnails(fig, ax, images, labels) -> None:
    ax.set_axis_off()
    ax.set_title("plane through", fontsize=10)
    n = len(images)
    for i, img in enumerate(images):
        sub = ax.inset_axes([0.3, 1 - (i + 1) / n + 0.02, 0.7, 1 / n - 0.04])
        side = int(round(np.sqrt(np.asarray(img).size)))
        sub.imshow(np.asarray(img, dtype=np.float64).reshape(side, side), cmap="gray", interpolation="nearest")
        sub.set_xticks([])
        sub.set_yticks([])
        if labels is not None:
            sub.set_ylabel(str(labels[i]), rotation=0, ha="right", va="center", fontsize=11, weight="bold")


# ------------------------------------------------------------------------------------------------ E1
@torch.no_grad()
def _mse(model, X: torch.Tensor) -> float:
    """Mean over all elements of (x - x_hat)^2 (the `metrics.mse` convention)."""
    Xm = X.to(device=_device(model), dtype=_dtype(model))
    return float(((Xm - model(Xm)) ** 2).double().mean())


def plot_e1_panels(X, kmeans, sae, local_pca, bounds=(-2.0, 2.0, -2.0, 2.0), *, resolution: int = 300,
                   titles: Sequence[str] | None = None, suptitle: str | None = None) -> Figure:
    """E1, "between k-means and PCA", given fitted models on 2-D data X [N, 2]:
    k-means AE (exact Voronoi cells, points joined to their centroid) | SAE (exact regions from
    `slice_2d`, power centres marked) | k-means + local PCA AE (region raster, each flat drawn as a
    segment, points joined to their reconstruction). Titles carry each model's MSE on X."""
    X = torch.as_tensor(np.asarray(X.cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float64))
    if X.ndim != 2 or X.shape[1] != 2:
        raise ValueError(f"X must be [N, 2] toy data, got shape {tuple(X.shape)}")
    Xn = X.numpy()
    e1, e2, o = np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.zeros(2)
    fig = Figure(figsize=(17, 6.6), layout="constrained")
    axes = fig.subplots(1, 3)
    default = [f"k-means AE ({kmeans.cluster_centers_.shape[0]} centroids)",
               f"{sae.cfg.architecture} SAE ({sae.cfg.d_sae} latents"
               + (f", k={sae.cfg.k})" if sae.cfg.k else ")"),
               f"k-means + local PCA AE ({local_pca.n_regions} regions, rank {local_pca.rank})"]
    titles = list(titles) if titles is not None else default

    # k-means
    ax = axes[0]
    part = SlicePartition(kmeans, o, e1, e2, bounds, resolution, errors=False)
    part.draw(ax, alpha=0.6)
    C = kmeans.cluster_centers_.detach().cpu().double().numpy()
    rec = _recon_np(kmeans, X)
    ax.add_collection(_segments(Xn, rec, "k", 0.25))
    ax.scatter(*Xn.T, s=10, c="k", zorder=4, linewidths=0)
    ax.scatter(*C.T, s=110, c="crimson", edgecolors="k", zorder=5)
    setup_axes(ax, bounds, f"{titles[0]}\nMSE {_mse(kmeans, X):.4f}", fontsize=11)

    # SAE
    ax = axes[1]
    part = SlicePartition(sae, o, e1, e2, bounds, resolution, errors=False)
    part.draw(ax, alpha=0.6, edge_width=0.4)
    from splinterp.geometry import power_diagram

    pd = power_diagram(sae)
    rec = _recon_np(sae, X)
    ax.add_collection(_segments(Xn, rec, "k", 0.25))
    ax.scatter(*Xn.T, s=10, c="k", zorder=4, linewidths=0)
    inside = _in_bounds(pd.centers, bounds)
    ax.scatter(*pd.centers[inside].T, s=22, marker="x", c="crimson", zorder=5, linewidths=1.0)
    setup_axes(ax, bounds, f"{titles[1]}\nMSE {_mse(sae, X):.4f}, {part.n_regions} regions in view", fontsize=11)

    # local PCA
    ax = axes[2]
    part = SlicePartition(local_pca, o, e1, e2, bounds, resolution, errors=False)
    if not _draw_flat_cells(ax, local_pca, part, bounds, alpha=0.6):
        part.draw(ax, alpha=0.6)
    rec = _recon_np(local_pca, X)
    ax.add_collection(_segments(Xn, rec, "tab:green", 0.5))
    ax.scatter(*Xn.T, s=10, c="k", zorder=4, linewidths=0)
    M = local_pca.means_.detach().cpu().double().numpy()
    B = local_pca.bases_.detach().cpu().double().numpy()
    span = 0.35 * (bounds[1] - bounds[0])
    for m, b in zip(M, B):
        for j in range(b.shape[1]):
            if np.abs(b[:, j]).sum() > 0:
                ax.plot(*np.stack([m - span * b[:, j], m + span * b[:, j]]).T, color="navy", lw=2, zorder=5)
    ax.scatter(*M.T, s=110, c="crimson", edgecolors="k", zorder=6)
    setup_axes(ax, bounds, f"{titles[2]}\nMSE {_mse(local_pca, X):.4f}", fontsize=11)
    fig.suptitle(suptitle or "Between k-means and PCA: piecewise constant | SAE | optimal piecewise affine",
                 fontsize=14)
    return fig


def _draw_flat_cells(ax, local_pca, part: SlicePartition, bounds, alpha: float) -> bool:
    """The cells of a 2-D local-PCA AE with boundaries at sub-pixel accuracy (for `plot_e1_panels`): region i
    is where its squared distance to flat i, d_i(x)^2 = |x - m_i|^2 - |B_i^T (x - m_i)|^2, is the smallest,
    so its cell is the set {margin_i <= 0} of the continuous field margin_i = d_i^2 - min_(j != i) d_j^2,
    filled and outlined by contouring that field (linear interpolation between pixel centres, no staircase).
    False (draw nothing) when the flats span the plane (rank >= 2: every distance is 0, regions are ties)."""
    M = local_pca.means_.detach().cpu().double().numpy()
    B = local_pca.bases_.detach().cpu().double().numpy()
    if M.shape[1] != 2 or np.linalg.matrix_rank(B[0]) >= 2 or len(M) < 2:
        return False
    P = pixel_centers(part.bounds, part.shape).reshape(*part.shape, 2)
    D = P[None] - M[:, None, None, :]
    proj = np.einsum("mhwd,mdr->mhwr", D, B)
    dist = (D ** 2).sum(-1) - (proj ** 2).sum(-1)
    cmap = part.colormap()
    xs, ys = P[0, :, 0], P[:, 0, 1]
    for i in range(len(M)):
        margin = dist[i] - np.delete(dist, i, axis=0).min(0)
        if (margin > 0).all():
            continue
        rgb = cmap.rgb_of([i])[0] if i in set(np.unique(part.labels).tolist()) else (0.8, 0.8, 0.8)
        ax.contourf(xs, ys, margin, levels=[margin.min() - 1.0, 0.0], colors=[tuple(rgb)], alpha=alpha, zorder=1)
        ax.contour(xs, ys, margin, levels=[0.0], colors="0.2", linewidths=0.5, zorder=1.5)
    ax.set_xlim(bounds[0], bounds[1])
    ax.set_ylim(bounds[2], bounds[3])
    return True


def _in_bounds(P: np.ndarray, bounds) -> np.ndarray:
    x0, x1, y0, y1 = bounds
    return (P[:, 0] >= x0) & (P[:, 0] <= x1) & (P[:, 1] >= y0) & (P[:, 1] <= y1)


@torch.no_grad()
def _recon_np(model, X: torch.Tensor) -> np.ndarray:
    return model(X.to(device=_device(model), dtype=_dtype(model))).double().cpu().numpy()


def _segments(A: np.ndarray, B: np.ndarray, color, alpha):
    from matplotlib.collections import LineCollection

    return LineCollection(np.stack([A, B], 1), colors=color, alpha=alpha, linewidths=0.7, zorder=3)
