"""Drawing exact 2-D cells (convex polygons with keys, e.g. `PowerDiagram.cells_2d` or `slice_2d`).

A cell is anything with ``.key`` (hashable) and ``.vertices`` [V, 2] (counter-clockwise), or a
``(key, vertices)`` pair. Colours come from a `ColorMap` over the keys, so the same key has the same
colour in every panel that shares the map, and more than `colors.MAX_DISTINCT` cells are coloured with
neighbours always different (adjacency from shared edges).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.collections import PolyCollection
from scipy.spatial import cKDTree

from splinterp.geometry.polygons import polygon_area, polygon_centroid  # noqa: F401 (the one shoelace)
from splinterp.viz.colors import MAX_DISTINCT, ColorMap
from splinterp.viz.raster import check_bounds


def cell_key(cell):
    return cell.key if hasattr(cell, "key") else cell[0]


def cell_vertices(cell) -> np.ndarray:
    v = cell.vertices if hasattr(cell, "vertices") else cell[1]
    return np.asarray(v, dtype=np.float64)


def cell_adjacency(cells: Sequence, tol: float = 1e-9) -> list[tuple[int, int]]:
    """Pairs (i, j) of cells that share an edge: two cells are neighbours when an edge midpoint of one
    coincides (within tol times the drawing's size) with an edge midpoint of the other. Exact for the
    face-to-face subdivisions that power diagrams of any order and their slices are."""
    mids, owner = [], []
    for i, c in enumerate(cells):
        v = cell_vertices(c)
        mids.append(0.5 * (v + np.roll(v, -1, axis=0)))
        owner.append(np.full(len(v), i))
    if not mids:
        return []
    M, O = np.concatenate(mids), np.concatenate(owner)
    scale = float(np.ptp(M, axis=0).max()) or 1.0
    pairs = cKDTree(M).query_pairs(tol * scale, output_type="ndarray")
    a, b = O[pairs[:, 0]], O[pairs[:, 1]]
    keep = a != b
    return sorted({(int(min(i, j)), int(max(i, j))) for i, j in zip(a[keep], b[keep])})


def cells_colormap(cells: Sequence, keys: Sequence | None = None) -> ColorMap:
    """A ColorMap over the cells' keys (in the given `keys` order, else sorted), distinct per key when
    there are at most MAX_DISTINCT keys, otherwise neighbour-distinct."""
    ks = [cell_key(c) for c in cells]
    order = list(keys) if keys is not None else sorted(set(ks), key=_sort_key)
    missing = set(ks) - set(order)
    if missing:
        order += sorted(missing, key=_sort_key)
    if len(order) <= MAX_DISTINCT:
        return ColorMap(order)
    pos = {k: i for i, k in enumerate(order)}
    edges = [(pos[ks[i]], pos[ks[j]]) for i, j in cell_adjacency(cells)]
    return ColorMap(order, edges)


def _sort_key(k):
    return (len(k), tuple(k)) if isinstance(k, tuple) else (0, (k,))


def draw_cells(ax, cells: Sequence, cmap: ColorMap | None = None, alpha: float = 0.75,
               edgecolor="0.15", linewidth: float = 0.6, facecolors: Sequence | None = None,
               zorder: float = 1.0) -> PolyCollection:
    """Fill each cell's exact polygon with its key's colour (or `facecolors`) and outline it."""
    if facecolors is None:
        cmap = cmap or cells_colormap(cells)
        facecolors = [cmap(cell_key(c)) for c in cells]
    pc = PolyCollection([cell_vertices(c) for c in cells], facecolors=facecolors, edgecolors=edgecolor,
                        linewidths=linewidth, alpha=alpha, zorder=zorder)
    ax.add_collection(pc)
    return pc


def setup_axes(ax, bounds, title: str | None = None, ticks: bool = True, fontsize: float = 11) -> None:
    """Limits = bounds, equal aspect, x to the right and y up."""
    xmin, xmax, ymin, ymax = check_bounds(bounds)
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymin, ymax)
    ax.set_aspect("equal")
    if not ticks:
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        ax.tick_params(labelsize=8)
    if title:
        ax.set_title(title, fontsize=fontsize)


def locate(cells: Sequence, points, tol: float = 1e-12) -> np.ndarray:
    """int [N]: index of the (first) cell whose closed polygon contains each point, -1 if none."""
    P = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    out = np.full(len(P), -1, dtype=np.int64)
    for i, c in enumerate(cells):
        v = cell_vertices(c)
        e = np.roll(v, -1, axis=0) - v  # CCW edges: inside iff left of every edge
        rel = P[:, None, :] - v[None]
        cross = e[None, :, 0] * rel[..., 1] - e[None, :, 1] * rel[..., 0]
        scale = np.linalg.norm(e, axis=1)[None] * (np.abs(rel).sum(-1) + 1.0)
        inside = (cross >= -tol * scale).all(1) & (out < 0)
        out[inside] = i
    return out


def rasterize_cells(cells: Sequence, bounds, shape: tuple[int, int]) -> np.ndarray:
    """int [H, W]: the cell index at every pixel centre (`raster.pixel_centers` orientation), -1 outside."""
    from splinterp.viz.raster import pixel_centers

    return locate(cells, pixel_centers(bounds, shape)).reshape(shape)
