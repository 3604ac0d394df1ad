"""Exact convex polygons in the plane, batched in numpy: the engine behind `PowerDiagram.cells_2d` and
`slice_2d`.

Sites are given in "linear form": f_i(x) = g_i . x + h_i, the power distance minus |x|^2
(g_i = -2 c_i, h_i = |c_i|^2 - alpha_i), so comparisons between sites are half-planes. A null site
(the ReLU rule) is f = 0.

Polygon batches are padded arrays: verts [P, V, 2] float64 and counts n [P]; vertices are
counter-clockwise and the padding slots hold copies of vertex 0, so a min/max over all slots equals the
min/max over the real vertices. Everything is vectorised over the batch; Python loops run over clipping
steps, never over polygons.

Two algorithms:

- `order_k_cells`: k-th order cells (optionally with the null site) by refinement. Inside an
  order-(t-1) cell T, the t-th nearest site is the argmin of f over the sites not in T, so the order-t
  cells inside T are the first-order cells of the remaining sites clipped to T. Only sites that can win
  somewhere in T are candidates: site j can win only if min over T's vertices of f_j is at most
  min_l max over T's vertices of f_l (f is affine, so extremes over a polygon are at vertices). Each
  order-t cell S is the union of its pieces from the parents S - {i}; the union is convex, so the cell is
  the convex hull of the pieces' vertices. With a null site, a piece where the null site is nearest
  is final: its active set is T. Level 0 is the box cut into about m/16 tiles, so the first level is
  local too. Cost: about (cells of all orders up to k) * (a few candidates) clips, all batched.
- `arrangement_cells`: the cells of a line arrangement {f_i = 0} (ReLU / JumpReLU / Gated: latent i is
  active iff f_i < 0), by splitting every polygon by each line in turn.

Tolerances (documented, relative): a vertex within 1e-12 * (|a x| + |b y| + |c|) of a clipping line is
put on it (no near-duplicate vertices); hull vertices whose turn has |sin| <= 1e-10 are dropped as
collinear; polygons with area <= area_tol (default 1e-13 of the box area) are dropped as slivers of
rounding (cells that thin are below float64 resolution of the box).
"""

from __future__ import annotations

import numpy as np

from splinterp.errors import ConfigError, NonFiniteError, ShapeError

SNAP_REL = 1e-12
COLLINEAR_SIN = 1e-10
AREA_TOL_REL = 1e-13
_CHUNK_ELEMS = 1 << 22  # candidate search works on [cells, sites] blocks of at most this many floats
_DOMINANCE_TOP = 4  # a candidate is first tested against the cell's 4 strongest sites


# ----------------------------------------------------------------------------------------------- boxes
def check_bounds(bounds) -> tuple[float, float, float, float]:
    """(xmin, xmax, ymin, ymax) as floats; finite and non-degenerate."""
    try:
        b = tuple(float(v) for v in bounds)
    except TypeError:
        raise ShapeError(f"bounds must be (xmin, xmax, ymin, ymax), got {bounds!r}") from None
    if len(b) != 4:
        raise ShapeError(f"bounds must be (xmin, xmax, ymin, ymax), got {len(b)} numbers")
    if not all(np.isfinite(b)):
        raise NonFiniteError(f"bounds must be finite, got {b}")
    if not (b[0] < b[1] and b[2] < b[3]):
        raise ConfigError(f"bounds need xmin < xmax and ymin < ymax, got {b}")
    return b


def box_polygon(bounds) -> np.ndarray:
    """The box as a counter-clockwise polygon [4, 2]."""
    x0, x1, y0, y1 = check_bounds(bounds)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


# -------------------------------------------------------------------------------------- polygon basics
def polygon_areas(verts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Signed shoelace areas [P] (positive for counter-clockwise); padding slots add nothing."""
    if verts.shape[0] == 0:
        return np.zeros(0)
    V = verts.shape[1]
    ar = np.arange(V)
    nxt = np.where(ar[None, :] + 1 < n[:, None], ar[None, :] + 1, 0)
    x, y = verts[..., 0], verts[..., 1]
    xn = np.take_along_axis(x, nxt, 1)
    yn = np.take_along_axis(y, nxt, 1)
    term = np.where(ar[None, :] < n[:, None], x * yn - xn * y, 0.0)
    return 0.5 * term.sum(1)


def _pad_fill(verts: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Fill slots >= n with vertex 0 (the batch invariant)."""
    V = verts.shape[1]
    pad = np.arange(V)[None, :] >= n[:, None]
    if pad.any():
        verts = np.where(pad[..., None], verts[:, :1], verts)
    return verts


def to_list(verts: np.ndarray, n: np.ndarray) -> list[np.ndarray]:
    return [np.ascontiguousarray(verts[i, : n[i]]) for i in range(verts.shape[0])]


def clip(verts: np.ndarray, n: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray):
    """Clip each convex polygon p to its half-plane a[p] x + b[p] y + c[p] <= 0 (Sutherland-Hodgman).

    Returns (verts, n); a polygon that vanishes gets n = 0. Only polygons that the line actually cuts
    are recomputed.
    """
    P, V, _ = verts.shape
    if P == 0:
        return verts, n
    x, y = verts[..., 0], verts[..., 1]
    s = x * a[:, None] + y * b[:, None] + c[:, None]
    scale = np.abs(x * a[:, None]) + np.abs(y * b[:, None]) + np.abs(c)[:, None]
    s[np.abs(s) <= SNAP_REL * scale] = 0.0
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
    sub = _pad_fill(sub, new_n)
    if Vn > V:
        verts = np.concatenate([verts, np.repeat(verts[:, :1], Vn - V, axis=1)], axis=1)
    else:
        verts = verts.copy()
    verts[part] = sub
    n[part] = new_n
    return verts, n


def _drop_small(verts, n, area_tol, *others):
    area = polygon_areas(verts, n)
    keep = (n >= 3) & (area > area_tol)
    return (verts[keep], n[keep], *(o[keep] for o in others))


def _trim(verts: np.ndarray, n: np.ndarray) -> np.ndarray:
    V = max(int(n.max()) if n.size else 1, 1)
    return verts[:, :V]


# -------------------------------------------------------------------------------------- convex merging
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
    return _pad_fill(out, counts), counts


# ------------------------------------------------------------------------------- k-th order power cells
def _level_pieces(verts, n, T, G, H, tol, prio):
    """The pieces of the next refinement level, pruned twice.

    1. Envelope bound: site j (not in T) can be the nearest remaining site somewhere in cell c only if
       min over c's vertices of f_j <= min_l max over c's vertices of f_l.
    2. Pairwise: j is dead in c if some l has f_l < f_j at every vertex (then everywhere in c); a dead site
       is never the minimum, so the alive ones decide alone. A piece (c, j) is then clipped only by the
       alive competitors l whose bisector actually cuts c (f_j > f_l at some vertex).
    Returns piece cell ids pc [P], piece sites [P], and a padded competitor table comp [P, R] with counts
    cnt [P], pieces sorted by cnt descending (so "has an r-th constraint" is a prefix).
    """
    C, V, _ = verts.shape
    M = G.shape[0]
    # 1a. bounding-box bound, [C, M] work: extremes of an affine f over a box are centre +- spread
    lo_xy = verts.min(1)
    hi_xy = verts.max(1)
    cen, hw = (lo_xy + hi_xy) / 2, (hi_xy - lo_xy) / 2
    absG = np.abs(G).T
    cand = np.zeros((C, M), dtype=bool)
    step = max(1, _CHUNK_ELEMS // max(M, 1))
    for s in range(0, C, step):
        base = cen[s : s + step] @ G.T + H
        spread = hw[s : s + step] @ absG
        lo, hi = base - spread, base + spread
        if T.shape[1]:
            r = np.arange(lo.shape[0])[:, None]
            lo[r, T[s : s + step]] = np.inf
            hi[r, T[s : s + step]] = np.inf
        cand[s : s + step] = lo <= hi.min(1)[:, None] + tol
    # 1b. the same bound at the vertices, on the survivors only (the minimiser of max_v f_l survives 1a)
    cc, cj = np.nonzero(cand)
    F = np.einsum("pvk,pk->pv", verts[cc], G[cj]) + H[cj][:, None]  # [entries, V]
    fmin, fmax = F.min(1), F.max(1)
    U = np.full(C, np.inf)
    np.minimum.at(U, cc, fmax)
    keep = fmin <= U[cc] + tol
    cc, cj, F, fmax = cc[keep], cj[keep], F[keep], fmax[keep]
    # 2a. dominance by the strongest few sites of the cell (smallest max over the cell)
    order = np.lexsort((fmax, cc))
    cc, cj, F = cc[order], cj[order], F[order]
    q = np.bincount(cc, minlength=C)
    off = np.cumsum(q) - q
    rank = np.arange(len(cc)) - off[cc]
    dead = np.zeros(len(cc), dtype=bool)
    for r in range(min(_DOMINANCE_TOP, int(q.max()) if len(q) else 0)):
        has = q[cc] > r
        e = np.flatnonzero(has & (rank != r))
        strong = off[cc[e]] + r
        dead[e] |= (F[e] - F[strong]).min(1) > tol
    alive = np.flatnonzero(~dead)
    cc, cj, F = cc[alive], cj[alive], F[alive]
    # 2b. all pairs among the alive: dead ones and the bisectors that cut the cell
    q = np.bincount(cc, minlength=C)
    off = np.cumsum(q) - q
    rep = q[cc]
    ea = np.repeat(np.arange(len(cc)), rep)
    eb = off[cc[ea]] + (np.arange(len(ea)) - np.repeat(np.cumsum(rep) - rep, rep))
    ne = ea != eb
    ea, eb = ea[ne], eb[ne]
    dmin = np.empty(len(ea))
    dmax = np.empty(len(ea))
    pstep = max(1, _CHUNK_ELEMS // V)
    for s in range(0, len(ea), pstep):
        D = F[ea[s : s + pstep]] - F[eb[s : s + pstep]]
        dmin[s : s + pstep], dmax[s : s + pstep] = D.min(1), D.max(1)
    # identical sites tie everywhere: the lower priority (index; the null site first) wins, the other is dead
    a_, b_ = cj[ea], cj[eb]
    lose_tie = (G[a_] == G[b_]).all(1) & (H[a_] == H[b_]) & (prio[a_] > prio[b_])
    dead = np.bincount(ea, weights=((dmin > tol) | lose_tie).astype(np.float64), minlength=len(cc)) > 0
    alive = ~dead
    use = alive[ea] & alive[eb] & (dmax > 0)
    ea_u, eb_u = ea[use], eb[use]
    # pieces = alive candidate entries
    piece_of_entry = np.full(len(cc), -1)
    piece_of_entry[alive] = np.arange(int(alive.sum()))
    pc, site = cc[alive], cj[alive]
    cnt = np.bincount(piece_of_entry[ea_u], minlength=len(pc))
    order = np.argsort(-cnt, kind="stable")
    rank_of_piece = np.empty(len(pc), dtype=np.int64)
    rank_of_piece[order] = np.arange(len(pc))
    R = int(cnt.max()) if len(cnt) else 0
    comp = np.zeros((len(pc), max(R, 1)), dtype=np.int64)
    pidx = rank_of_piece[piece_of_entry[ea_u]]  # ea_u is sorted by entry, so by piece
    cstart = np.cumsum(cnt) - cnt
    slot = np.arange(len(ea_u)) - cstart[piece_of_entry[ea_u]]
    comp[pidx, slot] = cj[eb_u]
    return pc[order], site[order], comp, cnt[order]


def order_k_cells(
    G: np.ndarray,
    H: np.ndarray,
    k: int,
    bounds,
    null: bool = False,
    area_tol: float | None = None,
    max_cells: int = 2_000_000,
) -> tuple[list[tuple[int, ...]], list[np.ndarray]]:
    """Cells of the k-th order diagram of sites f_i = G[i] . x + H[i] inside the box.

    Without `null`: one cell per k-set with interior in the box, key = the sorted k-set. With `null`
    (a site f = 0 that ends the ranking, the TopK-then-ReLU rule): key = the sorted active set, the
    members of the k-set that beat the null site (may be shorter than k, or empty).
    Returns (keys, polygons) with polygons [V, 2] counter-clockwise.
    """
    G = np.asarray(G, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    m = G.shape[0]
    if not 1 <= k <= m:
        raise ConfigError(f"order k must satisfy 1 <= k <= number of sites ({m}), got {k}")
    box = box_polygon(bounds)
    x0, x1, y0, y1 = check_bounds(bounds)
    box_area = (x1 - x0) * (y1 - y0)
    length = max(abs(x0), abs(x1), abs(y0), abs(y1), x1 - x0, y1 - y0)
    if area_tol is None:
        area_tol = AREA_TOL_REL * box_area
    if null:
        G = np.vstack([G, np.zeros((1, 2))])
        H = np.concatenate([H, [0.0]])
    fscale = float(np.abs(G).sum(1).max() * length + np.abs(H).max()) if m else 1.0
    cand_tol = 1e-10 * max(fscale, np.finfo(float).tiny)
    null_id = m if null else -1
    prio = np.arange(G.shape[0])  # tie order: lower index first; the null site beats every real site
    if null:
        prio[null_id] = -1

    keys_out: list[tuple[int, ...]] = []
    polys_out: list[np.ndarray] = []
    if not null and k == m:
        return [tuple(range(m))], [box]
    # level 0: the box cut into tiles, so that the first level (where every site is a candidate for the
    # whole box) is local too; level-1 pieces of one site in several tiles are merged like any others
    verts, n = _tiles(bounds, int(np.clip(np.ceil(np.sqrt(G.shape[0] / 16)), 1, 32)))
    T = np.zeros((len(verts), 0), dtype=np.int64)
    for level in range(1, k + 1):
        pc, site, comp, cnt = _level_pieces(verts, n, T, G, H, cand_tol, prio)
        pv, pn = verts[pc], n[pc].copy()
        gj, hj = G[site], H[site]
        for r in range(comp.shape[1]):
            rows = np.flatnonzero(cnt > r)
            rows = rows[pn[rows] >= 3]
            if rows.size == 0:
                continue
            other = comp[rows, r]
            dg = gj[rows] - G[other]
            dh = hj[rows] - H[other]
            sv, sn = clip(pv[rows], pn[rows], dg[:, 0], dg[:, 1], dh)
            if sv.shape[1] > pv.shape[1]:
                pv = np.concatenate([pv, np.repeat(pv[:, :1], sv.shape[1] - pv.shape[1], axis=1)], axis=1)
            elif sv.shape[1] < pv.shape[1]:
                sv = np.concatenate([sv, np.repeat(sv[:, :1], pv.shape[1] - sv.shape[1], axis=1)], axis=1)
            pv[rows], pn[rows] = sv, sn
        pv, pn, pc, site = _drop_small(pv, pn, area_tol, pc, site)
        if null:  # pieces where the null site is nearest: final, keyed by the active set T
            fin = site == null_id
            if fin.any():
                fk, fv, fn = _merge_by_key(pv[fin], pn[fin], T[pc[fin]], length, area_tol)
                keys_out.extend(tuple(int(t) for t in row) for row in fk)
                polys_out.extend(to_list(fv, fn))
            pv, pn, pc, site = pv[~fin], pn[~fin], pc[~fin], site[~fin]
        if len(pc) == 0:
            break
        newkeys = np.sort(np.concatenate([T[pc], site[:, None]], axis=1), axis=1)
        T, verts, n = _merge_by_key(pv, pn, newkeys, length, area_tol)
        if len(T) + len(keys_out) > max_cells:
            raise ConfigError(
                f"more than max_cells={max_cells} cells at order {level}; use a smaller box or raise max_cells"
            )
        if level == k:
            keys_out.extend(tuple(int(t) for t in row) for row in T)
            polys_out.extend(to_list(verts, n))
    return keys_out, polys_out


def _tiles(bounds, per_side: int):
    """The box as per_side x per_side rectangles (verts [P, 4, 2], n [P])."""
    x0, x1, y0, y1 = check_bounds(bounds)
    xs = np.linspace(x0, x1, per_side + 1)
    ys = np.linspace(y0, y1, per_side + 1)
    xs[-1], ys[-1] = x1, y1
    a, b = np.meshgrid(np.arange(per_side), np.arange(per_side), indexing="ij")
    a, b = a.ravel(), b.ravel()
    verts = np.stack(
        [
            np.stack([xs[a], ys[b]], -1),
            np.stack([xs[a + 1], ys[b]], -1),
            np.stack([xs[a + 1], ys[b + 1]], -1),
            np.stack([xs[a], ys[b + 1]], -1),
        ],
        1,
    )
    return verts, np.full(len(verts), 4)


def _merge_by_key(pv, pn, keys, length, area_tol):
    """Union of the pieces that share a key (convex by construction): (unique keys, verts, n).

    Single pieces are kept as they are; groups of several pieces become the hull of their vertices.
    """
    uk, inv, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    multi = counts[inv] > 1
    Vmax = pv.shape[1]
    cv = np.zeros((len(uk), Vmax, 2))
    cn = np.zeros(len(uk), dtype=np.int64)
    single = np.flatnonzero(~multi)
    cv[inv[single]] = pv[single]
    cn[inv[single]] = pn[single]
    mrows = np.flatnonzero(multi)
    if mrows.size:
        gid_of = np.unique(inv[mrows])  # the keys that need merging
        local = np.searchsorted(gid_of, inv[mrows])
        valid = np.arange(Vmax)[None, :] < pn[mrows][:, None]
        hv, hn = hull_groups(pv[mrows][valid], np.repeat(local, pn[mrows]), len(gid_of), length)
        if hv.shape[1] > Vmax:
            cv = np.concatenate([cv, np.repeat(cv[:, :1], hv.shape[1] - Vmax, axis=1)], axis=1)
            Vmax = hv.shape[1]
        hv = np.concatenate([hv, np.repeat(hv[:, :1], Vmax - hv.shape[1], axis=1)], axis=1)
        cv[gid_of], cn[gid_of] = hv, hn
    cv = _pad_fill(cv, cn)
    cv, cn, uk = _drop_small(cv, cn, area_tol, uk)
    return uk, _trim(cv, cn), cn


# ------------------------------------------------------------------------------------ line arrangements
def arrangement_cell_bound(G: np.ndarray, H: np.ndarray, bounds) -> int:
    """Upper bound on the cells of the lines f_i = 0 inside the box: 1 + lines + crossings inside (Euler:
    a chord that meets j earlier chords adds j + 1 cells; equality in general position). O(m^2), chunked."""
    x0, x1, y0, y1 = check_bounds(bounds)
    L = len(H)
    total = 1 + L
    step = max(1, _CHUNK_ELEMS // max(L, 1))
    for s in range(0, L, step):
        a, c = G[s : s + step, None, :], H[s : s + step, None]
        det = a[..., 0] * G[None, :, 1] - a[..., 1] * G[None, :, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            px = (a[..., 1] * H[None, :] - c * G[None, :, 1]) / det
            py = (c * G[None, :, 0] - a[..., 0] * H[None, :]) / det
        inside = (px > x0) & (px < x1) & (py > y0) & (py < y1)
        later = np.arange(s, min(s + step, L))[:, None] < np.arange(L)[None, :]
        total += int((inside & later).sum())
    return total


def arrangement_cells(
    G: np.ndarray,
    H: np.ndarray,
    bounds,
    area_tol: float | None = None,
    max_cells: int = 2_000_000,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cells of the arrangement of the lines f_i = 0 inside the box.

    Returns (masks bool [R, m] with mask[r, i] = f_i < 0 on cell r, polygons). Exact: each polygon is split
    by each line that crosses it, O(cells * lines). Latents whose line misses the box cost one sign test.
    """
    G = np.asarray(G, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    x0, x1, y0, y1 = check_bounds(bounds)
    if area_tol is None:
        area_tol = AREA_TOL_REL * (x1 - x0) * (y1 - y0)
    verts = box_polygon(bounds)[None]
    n = np.array([4])
    corners = verts[0]
    fc = corners @ G.T + H  # [4, m]: lines that miss the box never split anything
    crossing = np.flatnonzero((fc.min(0) < 0) & (fc.max(0) > 0))
    bound = arrangement_cell_bound(G[crossing], H[crossing], bounds)
    if bound > max_cells:
        raise ConfigError(
            f"this arrangement has up to {bound} cells in the box (> max_cells={max_cells}); "
            "use a smaller box or raise max_cells"
        )
    for i in crossing:
        a, b, c = G[i, 0], G[i, 1], H[i]
        P = verts.shape[0]
        s = verts @ G[i] + c
        valid = np.arange(verts.shape[1])[None, :] < n[:, None]
        cut = ((s < 0) & valid).any(1) & ((s > 0) & valid).any(1)
        rows = np.flatnonzero(cut)
        if rows.size == 0:
            continue
        if P + rows.size > max_cells:
            raise ConfigError(f"more than max_cells={max_cells} cells; use a smaller box or raise max_cells")
        ones = np.ones(rows.size)
        v1, n1 = clip(verts[rows], n[rows], a * ones, b * ones, c * ones)
        v2, n2 = clip(verts[rows], n[rows], -a * ones, -b * ones, -c * ones)
        V = max(verts.shape[1], v1.shape[1], v2.shape[1])

        def widen(v, V=V):
            return v if v.shape[1] == V else np.concatenate([v, np.repeat(v[:, :1], V - v.shape[1], 1)], 1)

        verts, v1, v2 = widen(verts), widen(v1), widen(v2)
        verts[rows], n = v1, n.copy()
        n[rows] = n1
        verts = np.concatenate([verts, v2])
        n = np.concatenate([n, n2])
        verts, n = _drop_small(verts, n, area_tol)
    # the active set of a cell is read at an interior point: the vertex mean of a convex polygon
    valid = np.arange(verts.shape[1])[None, :] < n[:, None]
    centroid = (verts * valid[..., None]).sum(1) / n[:, None]
    masks = (centroid @ G.T + H) < 0
    return masks, to_list(verts, n)
