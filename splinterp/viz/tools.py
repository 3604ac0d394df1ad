"""Pictures of the exact region tools: the regions met along a segment (`geometry.segment_regions`) with the
reconstruction error along it, the distance of inputs to their region's boundary (`geometry.boundary_distance`)
per architecture, and local complexity (`geometry.local_complexity`) over a slice.

Why these: a segment between two inputs shows how often the SAE's affine piece changes on the way (each change
a latent entering, leaving or swapping) and whether the error jumps there; boundary distances say how far an
input can move before its code's support changes (how robust the piece is); local complexity says where the
partition is dense.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from splinterp.viz.cells import draw_cells, setup_axes
from splinterp.viz.colors import palette
from splinterp.viz.raster import pixel_centers, raster_shape, show_raster
from splinterp.viz.style import style


@torch.no_grad()
def segment_errors(sae, seg, n: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t [n], squared reconstruction error |x(t) - sae(x(t))|^2 [n], 1 where encode's active set at x(t) equals
    the exact piece's [n]) on a uniform grid of the segment."""
    t = np.linspace(0.0, 1.0, n)
    X = seg.points(t).to(device=sae.device, dtype=sae.dtype)
    z = sae.encode(X)
    err = ((X - sae.decode(z)) ** 2).sum(1).double().cpu().numpy()
    piece = seg.piece_at(t)
    same = ((z != 0).cpu() == seg.masks[torch.from_numpy(piece)]).all(1).numpy()
    return t, err, same


def plot_segments(segments: Mapping[str, tuple], *, endpoints: tuple[str, str] = ("x₀", "x₁"),
                  images: Sequence[np.ndarray] | None = None, suptitle: str | None = None) -> Figure:
    """For each SAE ({title: (sae, Segment, style key)}): a band of the exact pieces along t (one colour per
    piece, neighbours different, breakpoints as ticks) over the reconstruction error along the segment.
    images: the two endpoints as 28x28 thumbnails (MNIST)."""
    n = len(segments)
    top = 1 if images is not None else 0
    fig = Figure(figsize=(11, 2.9 * n + 0.6 + 0.9 * top), layout="constrained")
    allax = fig.subplots(2 * n + top, 1, height_ratios=[0.6] * top + [0.32, 1.0] * n)
    grid = allax[top:]
    for ax in grid[1:]:
        ax.sharex(grid[0])
    pal = palette(24)
    for s, (title, (sae, seg, key)) in enumerate(segments.items()):
        band, ax = grid[2 * s], grid[2 * s + 1]
        starts, ends = seg.starts, seg.ends
        for p, (a, b) in enumerate(zip(starts, ends)):
            band.axvspan(a, b, color=pal[p % len(pal)], lw=0)
        band.vlines(seg.breaks, 0, 1, color="k", lw=0.5)
        band.set_yticks([])
        band.set_ylim(0, 1)
        kinds = seg.kinds
        counts = ", ".join(f"{kinds.count(k)} {k}s" for k in ("swap", "enter", "leave", "flip") if kinds.count(k))
        band.set_title(f"{title}: {len(seg)} exact pieces along the segment ({counts or 'no change'})", fontsize=10,
                       loc="left")
        t, err, _ = segment_errors(sae, seg)
        st = style(key)
        ax.plot(t, err, color=st["color"], lw=1.4, label=f"{st['label']} SAE: |x(t) − x̂(t)|²")
        ax.vlines(seg.breaks, 0, 1, transform=ax.get_xaxis_transform(), color="0.6", lw=0.4, zorder=0)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("squared error", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    grid[-1].set_xlim(0, 1)
    grid[-1].set_xlabel(f"t along x(t) = (1 − t) {endpoints[0]} + t {endpoints[1]}   "
                        "(grey lines: exact region changes)")
    if images is not None:
        head = allax[0]
        head.set_axis_off()
        for img, xpos, lab in zip(images, (0.0, 0.93), endpoints):
            sub = head.inset_axes([xpos, 0.0, 0.07, 1.0])
            side = int(round(np.sqrt(np.asarray(img).size)))
            sub.imshow(np.asarray(img, dtype=float).reshape(side, side), cmap="gray")
            sub.set_xticks([])
            sub.set_yticks([])
            sub.set_xlabel(f"t = {int(xpos > 0)}: {lab}", fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=12)
    return fig


def plot_boundary_histograms(distances: Mapping[str, np.ndarray], *, suptitle: str | None = None,
                             xlabel: str = "distance to the region's boundary") -> Figure:
    """One histogram (log-spaced bins, step outline) of boundary distances per architecture ({style key:
    distances}), in the architecture's colour from `viz.style`, medians marked."""
    fig = Figure(figsize=(8.5, 5), layout="constrained")
    ax = fig.add_subplot()
    finite = np.concatenate([d[np.isfinite(d) & (d > 0)] for d in distances.values()])
    bins = np.geomspace(finite.min(), finite.max(), 40) if len(finite) else 10
    for key, d in distances.items():
        d = np.asarray(d, dtype=float)
        d = d[np.isfinite(d) & (d > 0)]
        st = style(key)
        med = float(np.median(d)) if len(d) else float("nan")
        ax.hist(d, bins=bins, histtype="step", lw=1.8, color=st["color"], label=f"{st['label']} (median {med:.3g})")
        ax.axvline(med, color=st["color"], ls=":", lw=1.2)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel + " (log scale; dotted: median)")
    ax.set_ylabel("inputs")
    ax.legend(fontsize=9, title="SAE architecture")
    ax.grid(alpha=0.3)
    if suptitle:
        ax.set_title(suptitle, fontsize=11)
    return fig


def plot_complexity_maps(maps: Mapping[str, tuple], *, radius: float, axis_labels: tuple[str, str] = ("a", "b"),
                         anchors_ab=None, anchor_labels: Sequence[str] | None = None,
                         suptitle: str | None = None) -> Figure:
    """For each SAE ({title: (Slice2D, counts [H, W])}): the local complexity at every pixel of the slice (the
    number of region boundaries within `radius` in input space, a shared colour scale) with the slice's exact
    region edges over it."""
    n = len(maps)
    fig = Figure(figsize=(5.6 * n + 1.2, 5.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    vmax = max(float(np.max(c)) for _, c in maps.values()) or 1.0
    im = None
    for ax, (title, (sl, counts)) in zip(axes, maps.items()):
        im = show_raster(ax, counts, sl.bounds, cmap="viridis", vmin=0, vmax=vmax)
        draw_cells(ax, list(zip(range(len(sl.polygons)), sl.polygons)), facecolors=["none"] * len(sl.polygons),
                   edgecolor="white", linewidth=0.25, alpha=0.8, zorder=3)
        if anchors_ab is not None:
            A = np.asarray(anchors_ab)
            ax.scatter(A[:, 0], A[:, 1], s=120, marker="*", c="yellow", edgecolors="k", zorder=6)
            for i, p in enumerate(A):
                if anchor_labels is not None:
                    ax.annotate(str(anchor_labels[i]), p, xytext=(6, 6), textcoords="offset points", fontsize=9,
                                weight="bold", color="white", zorder=7)
        setup_axes(ax, sl.bounds, f"{title}\nmean {counts.mean():.1f}, max {int(counts.max())} boundaries in reach",
                   fontsize=10)
        ax.set_xlabel(axis_labels[0], fontsize=9)
        ax.set_ylabel(axis_labels[1], fontsize=9)
    fig.colorbar(im, ax=list(axes), shrink=0.85, label=f"region boundaries within radius {radius:.3g} (input space)")
    fig.legend(handles=[Line2D([], [], color="white", mec="k", marker="s", ls="", mfc="none",
                               label="exact region edges on the slice (white)"),
                        Patch(color="0.2", label="colour: local complexity at that point")],
               loc="outside lower center", ncols=2, fontsize=9)
    if suptitle:
        fig.suptitle(suptitle, fontsize=12)
    return fig


def complexity_grid(sae, sl, radius: float, resolution: int = 120) -> np.ndarray:
    """int [H, W]: `local_complexity` at the pixel centres of the slice (raster orientation)."""
    from splinterp.geometry import local_complexity

    shape = raster_shape(sl.bounds, resolution)
    X = sl.to_input(pixel_centers(sl.bounds, shape)).to(device=sae.device, dtype=sae.dtype)
    return local_complexity(sae, X, radius).count.numpy().reshape(shape)
