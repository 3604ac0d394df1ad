"""Batched convex polygons in the plane: the primitives behind `cells2d` (areas, widths, clipping, hulls).

A batch is a padded array verts [P, V, 2] float64 with counts n [P]; vertices are counter-clockwise and the
padding slots hold copies of vertex 0, so a min/max over all slots equals the min/max over the real
vertices. Everything is vectorised over the batch; Python loops run over clipping steps, never over polygons.

Tolerances (relative, documented once here):
- SNAP_REL: a vertex within 1e-12 * (|a x| + |b y| + |c|) of a clipping line is put on it, so no
  near-duplicate vertex and no rounding sliver is made where a line passes through a vertex;
- COLLINEAR_SIN: hull vertices whose turn has |sin| <= 1e-10 are dropped as flat;
- WIDTH_REL: a polygon whose width (the smallest distance between two parallel lines enclosing it) is at
  most 1e-11 of the box's length scale is a rounding sliver: snapping moves a vertex by at most about
  2e-12 of the box, so slivers of rounding are thinner than that, while 1e-11 of the box is still about
  4e4 float64 steps of its side (a real cell 4.5e-11 of the box wide was found in a 784 -> 1024 slice).
The shoelace area is taken relative to vertex 0, so it does not lose digits far from the origin.
"""

from __future__ import annotations

import numpy as np

from splinterp.geometry.checks import check_bounds

SNAP_REL = 1e-12
COLLINEAR_SIN = 1e-10
WIDTH_REL = 1e-11


def box_polygon(bounds) -> np.ndarray:
    """The box (xmin, xmax, ymin, ymax) as a counter-clockwise polygon [4, 2]."""
    x0, x1, y0, y1 = check_bounds(bounds)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def tiles(bounds, per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """The box as per_side x per_side rectangles (verts [P, 4, 2], n [P])."""
    x0, x1, y0, y1 = check_bounds(bounds)
    xs = np.linspace(x0, x1, per_side + 1)
    ys = np.linspace(y0, y1, per_side + 1)
    xs[-1], ys[-1] = x1, y1
    a, b = np.meshgrid(np.arange(per_side), np.arange(per_side), indexing="ij")
    a, b = a.ravel(), b.ravel()
    corners = [(xs[a], ys[b]), (xs[a + 1], ys[b]), (xs[a + 1], ys[b + 1]), (xs[a], ys[b + 1])]
    verts = np.stack([np.stack(c, -1) for c in corners], 1)
    return verts, np.full(len(verts), 4)


# ------------------------------------------------------------------------------------------- basics
def polygon_areas(verts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Signed shoelace areas [P] (positive for counter-clockwise), taken relative to vertex 0."""
    if verts.shape[0] == 0:
        return np.zeros(0)
    V = verts.shape[1]
    ar = np.arange(V)
    nxt = np.where(ar[None, :] + 1 < n[:, None], ar[None, :] + 1, 0)
    rel = verts - verts[:, :1]
    x, y = rel[..., 0], rel[..., 1]
    xn = np.take_along_axis(x, nxt, 1)
    yn = np.take_along_axis(y, nxt, 1)
    term = np.where(ar[None, :] < n[:, None], x * yn - xn * y, 0.0)
    return 0.5 * term.sum(1)


def polygon_centroid(vertices) -> np.ndarray:
    """Area centroid [2] of a simple polygon [V, 2] from the same shoelace terms (relative to vertex 0, so it
    keeps its digits far from the origin); the vertex mean if the polygon has no area."""
    v = np.asarray(vertices, dtype=np.float64)
    rel = v - v[0]
    x, y = rel[:, 0], rel[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2
    if abs(a) < 1e-300:
        return v.mean(0)
    return v[0] + np.array([((x + xn) * cross).sum(), ((y + yn) * cross).sum()]) / (6 * a)


def polygon_area(vertices) -> float:
    """Signed shoelace area of one polygon [V, 2] (the batched `polygon_areas` on a batch of one)."""
    v = np.asarray(vertices, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 2 or len(v) == 0:
        return 0.0
    return float(polygon_areas(v[None], np.array([len(v)]))[0])


def polygon_widths(verts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Width [P] of each convex polygon: min over its edges of the farthest vertex's distance to the edge's
    line (for a convex polygon the narrowest enclosing strip is parallel to an edge). 0 when n < 3.
    Chunked: [chunk, V, V] temporaries of at most about 4M floats."""
    P, V, _ = verts.shape
    out = np.zeros(P)
    step = max(1, (1 << 22) // max(V * V, 1))
    ar = np.arange(V)
    for s in range(0, P, step):
        vs, ns = verts[s : s + step], n[s : s + step]
        nxt = np.where(ar[None, :] + 1 < ns[:, None], ar[None, :] + 1, 0)
        e = np.take_along_axis(vs, nxt[..., None], 1) - vs  # [p, V, 2]
        length = np.hypot(e[..., 0], e[..., 1])
        rx = vs[:, None, :, 0] - vs[:, :, None, 0]  # [p, edge, vertex]
        ry = vs[:, None, :, 1] - vs[:, :, None, 1]
        cross = e[:, :, None, 0] * ry - e[:, :, None, 1] * rx
        with np.errstate(divide="ignore", invalid="ignore"):
            far = cross.max(2) / length
        far = np.where((ar[None, :] < ns[:, None]) & (length > 0), far, np.inf)
        w = far.min(1)
        out[s : s + step] = np.where((ns >= 3) & np.isfinite(w), w, 0.0)
    return out


def pad_fill(verts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Fill slots >= n with vertex 0 (the batch invariant)."""
    V = verts.shape[1]
    pad = np.arange(V)[None, :] >= n[:, None]
    if pad.any():
        verts = np.where(pad[..., None], verts[:, :1], verts)
    return verts


def widen(verts: np.ndarray, V: int) -> np.ndarray:
    """The batch with V vertex slots (extra slots padded with vertex 0)."""
    if verts.shape[1] >= V:
        return verts
    return np.concatenate([verts, np.repeat(verts[:, :1], V - verts.shape[1], axis=1)], axis=1)


def trim(verts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Drop padding slots that no polygon uses."""
    V = max(int(n.max()) if n.size else 1, 1)
    return verts[:, :V]


def to_list(verts: np.ndarray, n: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(verts[i, : n[i]]) for i in range(verts.shape[0])]


def drop_slivers(verts, n, width_tol: float, area_tol: float | None, *others):
    """Keep polygons with at least 3 vertices, width > width_tol and (if given) area > area_tol.

    The exact width is computed only where the cheap bound width >= area / diagonal of the bounding box
    (a convex polygon lies in a strip of its width along its diameter) cannot decide."""
    area = polygon_areas(verts, n)
    diag = np.hypot(*(verts.max(1) - verts.min(1)).T) if len(verts) else np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        surely = area > width_tol * diag
    keep = (n >= 3) & surely
    unsure = np.flatnonzero((n >= 3) & ~surely)
    if unsure.size:
        keep[unsure] = polygon_widths(verts[unsure], n[unsure]) > width_tol
    if area_tol is not None:
        keep &= area > area_tol
    return (verts[keep], n[keep], *(o[keep] for o in others))


# ------------------------------------------------------------------------------------------ clipping
def line_values(verts: np.ndarray, a, b, c) -> np.ndarray:
    """a x + b y + c at every vertex slot [P, V], snapped to 0 within SNAP_REL of the line's scale (the one
    test both `clip` and the arrangement's "does this line cut the polygon" use)."""
    x, y = verts[..., 0], verts[..., 1]
    a, b, c = (np.asarray(t, dtype=np.float64).reshape(-1, 1) for t in (a, b, c))
    s = x * a + y * b + c
    scale = np.abs(x * a) + np.abs(y * b) + np.abs(c)
    s[np.abs(s) <= SNAP_REL * scale] = 0.0
    return s


def clip(verts: np.ndarray, n: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray):
    """Clip each convex polygon p to its half-plane a[p] x + b[p] y + c[p] <= 0 (Sutherland-Hodgman).

    Returns (verts, n); a polygon that vanishes gets n = 0. Only polygons that the line actually cuts
    are recomputed.
    """
    P, V, _ = verts.shape
    if P == 0:
        return verts, n
    s = line_values(verts, a, b, c)
    valid = np.arange(V)[None, :] < n[:, None]
    outside = (s > 0) & valid
    cut = outside.any(1)
    if not cut.any():
        return verts, n
    n = n.copy()
    gone = cut & ~((s <= 0) & valid).any(1)
    n[gone] = 0
    part = np.flatnonzero(cut & ~gone)
    if part.size == 0:
        return verts, n
    vs, ss, ns = verts[part], s[part], n[part]
    ar = np.arange(V)
    nxt = np.where(ar[None, :] + 1 < ns[:, None], ar[None, :] + 1, 0)
    s_next = np.take_along_axis(ss, nxt, 1)
    v_next = np.take_along_axis(vs, nxt[..., None], 1)
    ok = ar[None, :] < ns[:, None]
    emit_v = (ss <= 0) & ok
    emit_x = (((ss < 0) & (s_next > 0)) | ((ss > 0) & (s_next < 0))) & ok
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(emit_x, ss / (ss - s_next), 0.0)
    xpt = vs + t[..., None] * (v_next - vs)
    pts = np.stack([vs, xpt], axis=2).reshape(len(part), 2 * V, 2)
    emit = np.stack([emit_v, emit_x], axis=2).reshape(len(part), 2 * V)
    new_n = emit.sum(1)
    Vn = max(V, int(new_n.max()))
    pos = np.cumsum(emit, 1) - 1
    rows, cols = np.nonzero(emit)
    sub = np.zeros((len(part), Vn, 2))
    sub[rows, pos[rows, cols]] = pts[rows, cols]
    sub = pad_fill(sub, new_n)
    verts = widen(verts, Vn).copy() if Vn > V else verts.copy()
    verts[part] = sub
    n[part] = new_n
    return verts, n


# -------------------------------------------------------------------------------------- convex hulls
def hull_groups(pts: np.ndarray, grp: np.ndarray, n_groups: int, length_scale: float):
    """Convex hull of each group of points, vectorised: (verts [G, V, 2], n [G]) counter-clockwise.

    Points are sorted by angle around their group's centroid (strictly inside a non-degenerate hull), so
    each group is a star-shaped polygon; every hull vertex is a convex vertex of it, so repeatedly deleting
    all reflex and flat vertices at once converges to the hull (Graham's idea without a stack).
    """
    cnt = np.bincount(grp, minlength=n_groups).astype(np.float64)
    cx = np.bincount(grp, pts[:, 0], n_groups) / np.maximum(cnt, 1)
    cy = np.bincount(grp, pts[:, 1], n_groups) / np.maximum(cnt, 1)
    dx, dy = pts[:, 0] - cx[grp], pts[:, 1] - cy[grp]
    order = np.lexsort((np.hypot(dx, dy), np.arctan2(dy, dx), grp))
    pts, grp = pts[order], grp[order]
    # near-duplicates (a vertex shared by several pieces) are adjacent after the sort
    if len(pts) > 1:
        dup = np.zeros(len(pts), dtype=bool)
        dup[1:] = (grp[1:] == grp[:-1]) & (np.abs(pts[1:] - pts[:-1]).max(1) <= 1e-12 * length_scale)
        pts, grp = pts[~dup], grp[~dup]
    while True:
        counts = np.bincount(grp, minlength=n_groups)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ends = starts + counts - 1
        i = np.arange(len(pts))
        first = i == starts[grp]
        last = i == ends[grp]
        prev = np.where(first, ends[grp], i - 1)
        nxt = np.where(last, starts[grp], i + 1)
        e1 = pts - pts[prev]
        e2 = pts[nxt] - pts
        cross = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
        bad = cross <= COLLINEAR_SIN * np.hypot(e1[:, 0], e1[:, 1]) * np.hypot(e2[:, 0], e2[:, 1])
        bad |= counts[grp] < 3
        if not bad.any():
            break
        pts, grp = pts[~bad], grp[~bad]
    counts = np.bincount(grp, minlength=n_groups)
    V = max(int(counts.max()) if counts.size else 1, 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.zeros((n_groups, V, 2))
    out[grp, np.arange(len(pts)) - starts[grp]] = pts
    return pad_fill(out, counts), counts
