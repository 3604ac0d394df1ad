"""Exact slices of SAEs with data projected onto them: static (matplotlib) and interactive (plotly) figures.

A `SliceView` is one panel: the exact partition of a plane by one SAE (`geometry.slice_2d`), plus data
points projected orthogonally onto the plane (tokens, digits) with their hover text and reconstruction
error. `slice_views` builds the panels of several SAEs on one plane; `plot_slices` draws them side by side
(PNG) and `plot_slices_plotly` interactively: hovering a region shows its active latents with their values
(at the region's centroid, a point of the region), hovering a point shows its text, context, the region its
projection falls in, its own active latents and its reconstruction error.

Why a projection: the data live in d_in dimensions and the plane is 2-D, so a point is drawn at its
orthogonal projection, whose region is in general not the point's own region (the hover shows both, and the
point's distance to the plane). The anchors the plane passes through lie on it exactly.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from splinterp.errors import ConfigError
from splinterp.viz.cells import cells_colormap, draw_cells, polygon_centroid, setup_axes
from splinterp.viz.colors import to_hex

ERROR_LABEL = "relative reconstruction error |x − x̂|² / |x|²"


@dataclass
class SliceView:
    """One panel: an SAE's exact slice and the points projected onto its plane."""

    title: str
    slice: object
    """A `geometry.Slice2D`."""
    region_text: list[str]
    """Hover text per region (active latents and values)."""
    points_ab: np.ndarray | None = None
    """[N, 2] projections of the points onto the plane, in the slice's (a, b) coordinates."""
    point_text: list[str] | None = None
    """Hover text per point."""
    point_error: np.ndarray | None = None
    """[N] relative reconstruction error per point (the colour of its dot)."""
    point_region: np.ndarray | None = None
    """[N] region (index into the slice's polygons) of each projection, -1 outside the box."""
    anchors_ab: np.ndarray | None = None
    """[3, 2] the points the plane was built through (they lie on it)."""
    anchor_labels: Sequence[str] | None = None

    @property
    def n_regions(self) -> int:
        return len(self.slice.polygons)


def _latent_list(idx: np.ndarray, vals: np.ndarray, n: int) -> str:
    order = np.argsort(-np.abs(vals), kind="stable")[:n]
    out = ", ".join(f"{int(idx[o])} ({vals[o]:.2f})" for o in order)
    return out + (f" +{len(idx) - n} more" if len(idx) > n else "")


@torch.no_grad()
def region_texts(sl, n_latents: int = 8) -> list[str]:
    """Hover text per region: its active latents (the exact active set of the slice) with their values at the
    region's centroid, largest first."""
    sae = sl.sae
    if not sl.polygons:
        return []
    cen = np.array([polygon_centroid(np.asarray(p)) for p in sl.polygons])
    z = sae.encode(sl.to_input(cen).to(device=sae.device, dtype=sae.dtype)).double().cpu().numpy()
    masks = sl.masks.numpy()
    areas = sl.areas
    box = (sl.bounds[1] - sl.bounds[0]) * (sl.bounds[3] - sl.bounds[2])
    out = []
    for r in range(len(sl.polygons)):
        idx = np.flatnonzero(masks[r])
        out.append(f"<b>region {r}</b> ({100 * areas[r] / box:.2g}% of the view)<br>"
                   f"active latents ({len(idx)}), value at the region's centre:<br>"
                   f"{_latent_list(idx, z[r, idx], n_latents) if len(idx) else 'none'}")
    return out


@torch.no_grad()
def project_points(sl, X: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(ab [N, 2], distance to the plane [N]) of inputs X [N, d_in] (float64) on the plane of `sl` (a
    `Slice2D` or a `Plane`: anything with origin, u, v)."""
    D = X.detach().cpu().double() - sl.origin
    uv = torch.stack([sl.u, sl.v], 1)
    # u, v need not be orthonormal: least-squares coordinates in the plane
    ab = torch.linalg.lstsq(uv, D.T).solution.T
    dist = (D - ab @ uv.T).norm(dim=1)
    return ab.numpy(), dist.numpy()


@torch.no_grad()
def point_texts(sae, X: torch.Tensor, labels: Sequence[str], contexts: Sequence[str] | None, region: np.ndarray,
                dist: np.ndarray, n_latents: int = 6) -> tuple[list[str], np.ndarray]:
    """(hover text per point, relative reconstruction error per point)."""
    Xs = X.to(device=sae.device, dtype=sae.dtype)
    z = sae.encode(Xs)
    err = ((Xs - sae.decode(z)) ** 2).sum(1).double().cpu().numpy()
    rel = err / np.maximum((Xs.double() ** 2).sum(1).cpu().numpy(), 1e-300)
    z = z.double().cpu().numpy()
    out = []
    for i in range(len(Xs)):
        idx = np.flatnonzero(z[i])
        t = f"<b>{html.escape(str(labels[i]))}</b>"
        if contexts is not None and contexts[i]:
            t += f"<br>context: …{html.escape(contexts[i][-60:])}"
        t += (f"<br>projection in region {int(region[i])}" if region[i] >= 0 else "<br>projection outside the view")
        t += f" (distance to the plane {dist[i]:.3g})"
        t += f"<br>own active latents ({len(idx)}): {_latent_list(idx, z[i, idx], n_latents) if len(idx) else 'none'}"
        t += f"<br>reconstruction error |x − x̂|² = {err[i]:.4g} (relative {rel[i]:.3f})"
        out.append(t)
    return out, rel


def slice_views(saes: Mapping[str, object], plane, bounds, X: torch.Tensor | None = None,
                labels: Sequence[str] | None = None, contexts: Sequence[str] | None = None,
                anchor_labels: Sequence[str] | None = None, max_cells: int = 250_000) -> list[SliceView]:
    """One `SliceView` per SAE ({panel title: SAE}) on the plane (a `geometry.Plane`) over `bounds`, with
    the rows of X (optional) projected onto it; `labels` / `contexts` are their hover texts. The first
    len(anchor_labels) of the plane's three points are drawn as anchors (all three when None)."""
    from splinterp.geometry import slice_2d

    if not saes:
        raise ConfigError("saes is empty: give at least one {title: SAE}")
    if X is not None and labels is not None and len(labels) != X.shape[0]:
        raise ConfigError(f"labels has {len(labels)} entries for {X.shape[0]} points")
    views = []
    for title, sae in saes.items():
        sl = slice_2d(sae, plane, bounds=bounds, max_cells=max_cells)
        n_anchor = 3 if anchor_labels is None else len(anchor_labels)
        v = SliceView(title, sl, region_texts(sl), anchors_ab=np.asarray(plane.coords)[:n_anchor],
                      anchor_labels=anchor_labels)
        if X is not None:
            ab, dist = project_points(sl, X)
            v.points_ab, v.point_region = ab, sl.regions_at(ab)
            labs = labels if labels is not None else [f"point {i}" for i in range(X.shape[0])]
            v.point_text, v.point_error = point_texts(sae, X, labs, contexts, v.point_region, dist)
        views.append(v)
    return views


def pca_plane(X: torch.Tensor):
    """The plane through the mean of X along its top-2 principal directions, as a `geometry.Plane` whose
    (a, b) coordinates are the first two principal components; plus the explained-variance ratios."""
    from splinterp.geometry import Plane

    Xd = X.detach().cpu().double()
    mu = Xd.mean(0)
    _, S, Vt = torch.linalg.svd(Xd - mu, full_matrices=False)
    u, v = Vt[0], Vt[1]
    sign = torch.sign(u[u.abs().argmax()]), torch.sign(v[v.abs().argmax()])  # deterministic orientation
    u, v = u * sign[0], v * sign[1]
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    explained = (S[:2] ** 2 / (S**2).sum()).numpy()
    return Plane(mu, u, v, coords), explained


def data_bounds(ab: np.ndarray, lo: float = 5, hi: float = 95, pad: float = 0.1) -> tuple[float, ...]:
    """A box around the central part of projected points (percentiles lo..hi, padded by `pad` of its side)."""
    a0, b0 = np.percentile(ab, lo, axis=0)
    a1, b1 = np.percentile(ab, hi, axis=0)
    pa, pb = pad * (a1 - a0), pad * (b1 - b0)
    return (float(a0 - pa), float(a1 + pa), float(b0 - pb), float(b1 + pb))


def _error_norm(views: Sequence[SliceView]):
    from matplotlib.colors import Normalize

    errs = [v.point_error for v in views if v.point_error is not None and len(v.point_error)]
    hi = float(np.percentile(np.concatenate(errs), 98)) if errs else 1.0
    return Normalize(0.0, hi if hi > 0 else 1.0)


def plot_slices(views: Sequence[SliceView], *, axis_labels: tuple[str, str] = ("a", "b"),
                suptitle: str | None = None, ax_row=None, points_label: str = "held-out points") -> Figure:
    """The panels side by side (matplotlib): exact region polygons (neighbours never share a colour), points
    at their projections coloured by relative reconstruction error (one scale for all panels), anchors as
    stars with their labels."""
    n = len(views)
    if ax_row is None:
        fig = Figure(figsize=(max(5.6 * n + 1.0, 8.5), 6.4), layout="constrained")
        axes = fig.subplots(1, n, squeeze=False)[0]
    else:
        axes = list(ax_row)
        fig = axes[0].figure
    norm = _error_norm(views)
    sc = None
    for ax, v in zip(axes, views):
        sl = v.slice
        cells = [(tuple(np.flatnonzero(m).tolist()), p) for m, p in zip(sl.masks.numpy(), sl.polygons)]
        draw_cells(ax, cells, cells_colormap(cells), alpha=0.55, linewidth=0.3 if v.n_regions > 300 else 0.6,
                   edgecolor="0.25")
        if v.points_ab is not None:
            sc = ax.scatter(v.points_ab[:, 0], v.points_ab[:, 1], c=v.point_error, cmap="viridis", norm=norm, s=14,
                            edgecolors="k", linewidths=0.3, zorder=4)
        if v.anchors_ab is not None:
            A = np.asarray(v.anchors_ab)
            ax.scatter(A[:, 0], A[:, 1], s=150, marker="*", c="yellow", edgecolors="k", zorder=6, linewidths=0.9)
            for i, p in enumerate(A):
                if v.anchor_labels is not None:
                    ax.annotate(str(v.anchor_labels[i]), p, xytext=(6, 6), textcoords="offset points", fontsize=9,
                                weight="bold", zorder=7,
                                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
        setup_axes(ax, sl.bounds, f"{v.title}\n{v.n_regions} regions (exact polygons)", fontsize=10)
        ax.set_xlabel(axis_labels[0], fontsize=9)
        ax.set_ylabel(axis_labels[1], fontsize=9)
    if sc is not None:
        fig.colorbar(sc, ax=list(axes), shrink=0.85, label=ERROR_LABEL)
    handles = slice_legend_handles(sc is not None, points_label)
    if ax_row is None:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles) if n > 1 else 1, fontsize=9)
        if suptitle:
            fig.suptitle(suptitle, fontsize=12 if n > 1 else 10, wrap=True)
    return fig


def slice_legend_handles(points: bool = True, points_label: str = "held-out points") -> list:
    """Legend entries of `plot_slices`: anchors (stars) and projected points."""
    h = [Line2D([], [], marker="*", ls="", mfc="yellow", mec="k", ms=12, label="point(s) the plane passes through"),
         Line2D([], [], marker="s", ls="", mfc="0.85", mec="0.25", ms=10,
                label="exact region (distinct active set; neighbours differ in colour)")]
    if points:
        h.append(Line2D([], [], marker="o", ls="", mfc="0.6", mec="k", ms=5,
                        label=f"{points_label}, projected onto the plane (colour: their error)"))
    return h


def plot_slices_plotly(views: Sequence[SliceView], *, axis_labels: tuple[str, str] = ("a", "b"),
                       title: str = ""):
    """The same panels, interactive: one filled trace per region (hover: its active latents and values), the
    projected points (hover: text, context, region, own latents, error), the anchors. Write it with
    `splinterp.viz.write_html` (offline by default)."""
    import plotly.graph_objects as go
    from matplotlib import colormaps
    from plotly.subplots import make_subplots

    n = len(views)
    fig = make_subplots(rows=1, cols=n, subplot_titles=[f"{v.title}: {v.n_regions} regions" for v in views],
                        horizontal_spacing=0.06)
    norm = _error_norm(views)
    vir = colormaps["viridis"]
    for c, v in enumerate(views, start=1):
        sl = v.slice
        cells = [(tuple(np.flatnonzero(m).tolist()), p) for m, p in zip(sl.masks.numpy(), sl.polygons)]
        cmap = cells_colormap(cells)
        for r, (key, poly) in enumerate(cells):
            P = np.vstack([poly, poly[:1]])
            fig.add_trace(go.Scatter(x=P[:, 0], y=P[:, 1], mode="lines", fill="toself", hoveron="fills",
                                     fillcolor=to_hex(cmap(key)), opacity=0.6, line={"color": "#404040", "width": 0.5},
                                     text=v.region_text[r], hoverinfo="text", showlegend=False,
                                     name=f"region {r}"), row=1, col=c)
        if v.points_ab is not None:
            cols = [to_hex(vir(norm(e))[:3]) for e in v.point_error]
            fig.add_trace(go.Scatter(x=v.points_ab[:, 0], y=v.points_ab[:, 1], mode="markers",
                                     marker={"size": 7, "color": cols, "line": {"color": "black", "width": 0.5}},
                                     text=v.point_text, hovertemplate="%{text}<extra></extra>",
                                     name="held-out points (colour: error)", showlegend=c == 1), row=1, col=c)
        if v.anchors_ab is not None:
            A = np.asarray(v.anchors_ab)
            labs = [str(s) for s in (v.anchor_labels or [""] * len(A))]
            fig.add_trace(go.Scatter(x=A[:, 0], y=A[:, 1], mode="markers+text", text=labs, textposition="top right",
                                     marker={"symbol": "star", "size": 15, "color": "yellow",
                                             "line": {"color": "black", "width": 1}},
                                     hovertext=[f"plane passes through {html.escape(s)}" for s in labs],
                                     hoverinfo="text", name="points the plane passes through",
                                     showlegend=c == 1), row=1, col=c)
        x0, x1, y0, y1 = sl.bounds
        fig.update_xaxes(range=[x0, x1], title_text=axis_labels[0], row=1, col=c)
        fig.update_yaxes(range=[y0, y1], title_text=axis_labels[1], scaleanchor=f"x{c if c > 1 else ''}",
                         row=1, col=c)
    fig.update_layout(title={"text": title, "font": {"size": 14}}, template="plotly_white", width=620 * n + 80,
                      height=680, hovermode="closest", legend={"orientation": "h", "y": -0.12},
                      margin={"l": 40, "r": 20, "t": 90, "b": 60})
    return fig
