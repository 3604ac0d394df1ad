"""Exact cells of 2-D power diagrams of any order and of line arrangements: the engine behind
`PowerDiagram.cells_2d` and `slice_2d`.

Sites are given in linear form f_i(x) = g_i . x + h_i (the power distance minus a term common to every
site), so comparisons between sites are half-planes; a null site (the ReLU rule) is f = 0. Callers pass
box-centred coordinates (`PowerDiagram` recentres), so precision does not depend on where the box lies.

- `order_k_cells`: k-th order cells by refinement. Inside an order-(t-1) cell T the t-th nearest site is the
  argmin of f over the sites not in T, so the order-t cells inside T are the first-order cells of the
  remaining sites clipped to T. Site j can win somewhere in T only if min over T of f_j is at most
  U(T) = min_l max over T of f_l (f is affine: extremes are at vertices). Each order-t cell S is the union of
  its pieces from the parents S - {i}, which is convex, so it is the hull of the pieces' vertices.
  With a null site, a piece where the null site is nearest is final: its active set is T.
  Candidates are not searched among all m sites at every order: the box is cut into tiles (about m / 16),
  and each tile keeps once the sites that can be among the k nearest somewhere in it (min over the tile of
  f_l at most beta, the k-th smallest max over the tile). At any order t <= k, in any cell inside the
  tile, the best site's max is at most the t-th smallest max over the tile <= beta, and a candidate's min
  is at least its min over the tile, so the list holds every candidate. Cells are refined inside their
  tile and their pieces merged across tiles at the end, so the time follows the cells produced times the
  tiles' list lengths, not cells x sites.
  Exactness shortcuts: sites that cannot beat the null site anywhere in the box are removed (they are never
  active there); when k is at least the number left, TopK is ReLU on them (the arrangement below); without a
  null site and k > m/2 the k nearest sites are the complement of the m - k farthest (order m - k of -f).
- `arrangement_cells`: the cells of a line arrangement {f_i = 0} (ReLU / JumpReLU / Gated: latent i is
  active iff f_i < 0), by splitting each polygon by each line that crosses it. In general position there
  are exactly 1 + L + I cells (L lines crossing the box, I crossing points inside it).

Refusal: both predict their size and raise `TooLargeError` naming `max_cells` and the prediction when the
cells summed over the orders computed would exceed it. `arrangement_cell_bound` is exact, before any work;
for order k the estimate is made after order 1 (order t has about (2t - 1) times the order-1 cells in a
Voronoi-like diagram, on the share of the box where t sites beat the null site) and renewed after every
order from the last two orders' growth, and the exact running count is checked too, so the work stays
within about max_cells cells. Slivers thinner than
`polygons.WIDTH_REL` of the box are rounding, not cells (see `polygons`); an explicit `area_tol` drops cells
by area as well.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from splinterp.errors import ConfigError, TooLargeError
from splinterp.geometry.checks import check_bounds
from splinterp.geometry.polygons import (
    WIDTH_REL,
    box_polygon,
    clip,
    drop_slivers,
    hull_groups,
    line_values,
    pad_fill,
    polygon_areas,
    tiles,
    to_list,
    trim,
    widen,
)

__all__ = [  # the engine, and the polygon primitives it is built on (re-exported for callers of old)
    "Cells", "arrangement_cell_bound", "arrangement_cells", "box_polygon", "check_bounds", "clip",
    "crossing_lines", "order_k_cells", "polygon_areas",
]

_CHUNK_ELEMS = 1 << 22  # [rows, sites] and [entries, vertices] blocks of at most this many floats
_DOMINANCE_TOP = 4  # a candidate is first tested against the cell's 4 strongest sites
TILE_SITES = 16  # the box is cut into about m / 16 tiles (at most 32 x 32), each with its own candidate list
_GRID = 64  # sample grid (per side) for the share of the box where t sites beat the null site


class Cells(NamedTuple):
    """Cells of a 2-D diagram: masks bool [R, m] (site i in cell r's key: its k-set, or with a null site its
    active set) and one counter-clockwise polygon [V, 2] per cell."""

    masks: np.ndarray
    polygons: list


def length_scale(bounds) -> float:
    x0, x1, y0, y1 = check_bounds(bounds)
    return max(abs(x0), abs(x1), abs(y0), abs(y1), x1 - x0, y1 - y0)


def _too_large(what: str, predicted: int, max_cells: int, how: str = "about") -> TooLargeError:
    return TooLargeError(
        f"{what}: {how} {predicted:,} cells predicted, more than max_cells={max_cells:,}; "
        "use a smaller box or a lower order, or raise max_cells"
    )


# ------------------------------------------------------------------------------- k-th order power cells
def order_k_cells(
    G: np.ndarray,
    H: np.ndarray,
    k: int,
    bounds,
    null: bool = False,
    area_tol: float | None = None,
    max_cells: int = 2_000_000,
) -> Cells:
    """Cells of the k-th order diagram of sites f_i = G[i] . x + H[i] inside the box.

    Without `null`: one cell per k-set with interior in the box. With `null` (a site f = 0 that ends the
    ranking, the TopK-then-ReLU rule): one cell per active set, the members of the k-set that beat the null
    site (may be fewer than k, or none). Ties between identical sites go to the lower index.
    """
    G = np.asarray(G, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    m = G.shape[0]
    if not 1 <= k <= m:
        raise ConfigError(f"order k must satisfy 1 <= k <= number of sites ({m}), got {k}")
    bounds = check_bounds(bounds)
    if null:
        corners = box_polygon(bounds)
        alive = np.flatnonzero((corners @ G.T + H).min(0) < 0)  # can beat the null site somewhere in the box
        if alive.size <= k:  # every site that can fire is in the k-set: TopK is ReLU here
            sub = arrangement_cells(G[alive], H[alive], bounds, area_tol=area_tol, max_cells=max_cells)
            return Cells(_widen_masks(sub.masks, alive, m), sub.polygons)
        sub = _refine(G[alive], H[alive], k, bounds, True, area_tol, max_cells, np.arange(alive.size))
        return Cells(_widen_masks(sub.masks, alive, m), sub.polygons)
    if k == m:
        return Cells(np.ones((1, m), dtype=bool), [box_polygon(bounds)])
    if 2 * k > m:  # the k nearest are the complement of the m - k farthest (ties: higher index is "farther")
        far = _refine(-G, -H, m - k, bounds, False, area_tol, max_cells, -np.arange(m))
        return Cells(~far.masks, far.polygons)
    return _refine(G, H, k, bounds, False, area_tol, max_cells, np.arange(m))


def _widen_masks(masks: np.ndarray, cols: np.ndarray, m: int) -> np.ndarray:
    out = np.zeros((masks.shape[0], m), dtype=bool)
    out[:, cols] = masks
    return out


def _refine(G, H, k, bounds, null, area_tol, max_cells, prio) -> Cells:
    """The refinement itself (see the module docstring); prio orders identical sites (lower wins)."""
    m = G.shape[0]
    length = length_scale(bounds)
    wtol = WIDTH_REL * length
    if null:
        G = np.vstack([G, np.zeros((1, 2))])
        H = np.concatenate([H, [0.0]])
        prio = np.concatenate([prio, [np.iinfo(np.int64).min]])  # the null site wins every tie
    M = G.shape[0]
    null_id = m if null else -1
    fscale = float(np.abs(G).sum(1).max() * length + np.abs(H).max()) if M else 1.0
    tol = 1e-10 * max(fscale, np.finfo(float).tiny)

    verts, n = tiles(bounds, int(np.clip(np.ceil(np.sqrt(M / TILE_SITES)), 1, 32)))
    tile = np.arange(len(verts))
    T = np.zeros((len(verts), 0), dtype=np.int64)
    tptr, tsite, tbeta = _tile_lists(verts, G, H, tol, k)
    share = _null_share(G[:m], H[:m], bounds, k) if null else np.ones(k + 1)
    done_keys, done_verts, done_n = [], [], []  # final cells, still split by tiles
    total = last = 0
    for level in range(1, k + 1):
        pv, pn, pc, psite = _refine_level(verts, n, T, tile, tptr, tsite, tbeta, G, H, tol, prio, wtol, area_tol)
        ptile = tile[pc]
        produced = 0
        if null:  # pieces where the null site is nearest: final, keyed by the active set T
            fin = psite == null_id
            if fin.any():
                fk = np.full((int(fin.sum()), k), -1, dtype=np.int64)
                fk[:, : level - 1] = T[pc[fin]]
                uk, fv, fn, _ = _merge_by_key(pv[fin], pn[fin], np.column_stack([ptile[fin], fk]), length, wtol,
                                              area_tol)
                done_keys.append(uk[:, 1:])
                done_verts.append(fv)
                done_n.append(fn)
                produced += len(uk)
            keep = ~fin
            pv, pn, pc, psite, ptile = pv[keep], pn[keep], pc[keep], psite[keep], ptile[keep]
        newkeys = np.sort(np.concatenate([T[pc], psite[:, None]], axis=1), axis=1)
        uk, verts, n, _ = _merge_by_key(pv, pn, np.column_stack([ptile, newkeys]), length, wtol, area_tol)
        tile, T = uk[:, 0], uk[:, 1:]
        produced += len(uk)
        total += produced
        # the orders still to come, extrapolated linearly from the last two (order 2 has about 3x the cells of
        # order 1 in a Voronoi-like diagram), on the share of the box where they still exist
        growth = 2 * produced if level == 1 else produced - last
        last = produced
        ahead = [max(produced + (t - level) * growth, 0) * share[t] / max(share[level], 1e-12)
                 for t in range(level + 1, k + 1)]
        predicted = total + int(sum(ahead))
        if predicted > max_cells:
            raise _too_large(f"order {k} with {m} sites (estimated after order {level})", predicted, max_cells)
        if total > max_cells:
            raise _too_large(f"order {k} with {m} sites (counted up to order {level})", total, max_cells)
        if level == k or len(T) == 0:
            done_keys.append(T)
            done_verts.append(verts)
            done_n.append(n)
            break
    # one cell per key: the pieces of a cell that several tiles cut are merged (a cell is convex)
    keys = np.concatenate([np.pad(K, ((0, 0), (0, k - K.shape[1])), constant_values=-1) for K in done_keys])
    V = max(v.shape[1] for v in done_verts)
    cv = np.concatenate([widen(v, V) for v in done_verts])
    cn = np.concatenate(done_n)
    uk, cv, cn, _ = _merge_by_key(cv, cn, keys, length, wtol, area_tol)
    masks = np.zeros((len(uk), m), dtype=bool)
    r, c = np.nonzero(uk >= 0)
    masks[r, uk[r, c]] = True
    return Cells(masks, to_list(cv, cn))


def _null_share(G, H, bounds, k) -> np.ndarray:
    """share[t]: fraction of a grid over the box where at least t - 1 sites beat the null site (the part of
    the box where order-t cells still exist)."""
    x0, x1, y0, y1 = bounds
    xs = x0 + (np.arange(_GRID) + 0.5) / _GRID * (x1 - x0)
    ys = y0 + (np.arange(_GRID) + 0.5) / _GRID * (y1 - y0)
    P = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    count = np.zeros(len(P), dtype=np.int64)
    step = max(1, _CHUNK_ELEMS // max(len(P), 1))
    for s in range(0, len(G), step):
        count += ((P @ G[s : s + step].T + H[s : s + step]) < 0).sum(1)
    return np.array([1.0] + [float((count >= t - 1).mean()) for t in range(1, k + 1)])


def _tile_lists(verts, G, H, tol, k):
    """Per tile the sites that can be among the k nearest somewhere in it: every l with min over the tile of
    f_l <= beta, beta the k-th smallest max over the tile. -> (ptr [tiles+1], site [E], beta [tiles]).

    Why this suffices at every order t <= k in every cell c inside the tile: the best site's max over c is at
    most the t-th smallest max over the tile <= beta, and a candidate's min over c is at least its min over
    the tile. Each tile first adds to every f the same linear term (minus the gradient of the site nearest at
    its centre), which changes no comparison but makes the nearby sites' f nearly flat over the tile, so the
    bounds are tight. A bounding-box bound prunes; the vertex values decide."""
    C, M = len(verts), G.shape[0]
    cen = (verts.min(1) + verts.max(1)) / 2
    hw = (verts.max(1) - verts.min(1)) / 2
    r = min(k, M)
    beta = np.empty(C)
    rows, cols = [], []
    step = max(1, _CHUNK_ELEMS // (2 * max(M, 1)))
    shift = np.empty((C, 2))
    for s in range(0, C, step):
        base = cen[s : s + step] @ G.T + H
        a = -G[base.argmin(1)]  # [c, 2]: the common linear term of this tile
        shift[s : s + step] = a
        base += (cen[s : s + step] * a).sum(1)[:, None]
        spread = np.abs(G[None, :, 0] + a[:, None, 0]) * hw[s : s + step, None, 0]
        spread += np.abs(G[None, :, 1] + a[:, None, 1]) * hw[s : s + step, None, 1]
        b = np.partition(base + spread, r - 1, axis=1)[:, r - 1] + tol
        i, j = np.nonzero(base - spread <= b[:, None])
        fmin, fmax = _vertex_range(verts, i + s, G, H, j, a[i])
        b = _rth_smallest(i, fmax, r, len(base)) + tol
        beta[s : s + step] = b
        keep = fmin <= b[i]
        rows.append(i[keep] + s)
        cols.append(j[keep])
    rows_a = np.concatenate(rows)
    ptr = np.zeros(C + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(rows_a, minlength=C))
    return ptr, np.concatenate(cols), beta


def _rth_smallest(group: np.ndarray, values: np.ndarray, r: int, n_groups: int) -> np.ndarray:
    """Per group the r-th smallest of its values (inf where a group has fewer than r)."""
    out = np.full(n_groups, np.inf)
    if len(group) == 0:
        return out
    order = np.lexsort((values, group))
    g = group[order]
    cnt = np.bincount(g, minlength=n_groups)
    rank = np.arange(len(g)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    hit = rank == r - 1
    out[g[hit]] = values[order][hit]
    return out


def _vertex_range(verts, rows, G, H, sites, shift=None) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over the vertices of polygon rows[e] of f_{sites[e]} (plus shift[e] . x, a term common to
    the row's sites), exact (padding repeats vertex 0), chunked to [chunk, V] blocks."""
    lo, hi = np.empty(len(rows)), np.empty(len(rows))
    step = max(1, _CHUNK_ELEMS // (2 * max(verts.shape[1], 1)))
    for s in range(0, len(rows), step):
        r, j = rows[s : s + step], sites[s : s + step]
        g = G[j] if shift is None else G[j] + shift[s : s + step]
        F = np.einsum("pvk,pk->pv", verts[r], g) + H[j][:, None]
        lo[s : s + step], hi[s : s + step] = F.min(1), F.max(1)
    return lo, hi


def _refine_level(verts, n, T, tile, tptr, tsite, tbeta, G, H, tol, prio, wtol, area_tol):
    """All pieces of the next order -> (pv, pn, parent cell, site). Cells are sorted by tile (they are merged
    by (tile, key)); consecutive tiles are screened together against the union of their lists (a superset
    of each cell's candidates) in dense blocks of at most about _CHUNK_ELEMS entries."""
    C = len(verts)
    cuts = np.flatnonzero(np.diff(tile)) + 1
    starts = np.concatenate([[0], cuts])
    stops = np.concatenate([cuts, [C]])
    parts = []
    a0, sites = 0, np.zeros(0, dtype=np.int64)
    for a, b in zip(starts, stops):
        t = tile[a]
        merged = np.union1d(sites, tsite[tptr[t] : tptr[t + 1]])
        if a > a0 and (b - a0) * len(merged) > _CHUNK_ELEMS // 4:  # flush the tiles gathered so far
            parts += _refine_block(verts, n, T, a0, a, sites, G, H, tol, prio, wtol, area_tol)
            a0, merged = a, tsite[tptr[t] : tptr[t + 1]]
        sites = merged
    parts += _refine_block(verts, n, T, a0, C, sites, G, H, tol, prio, wtol, area_tol)
    Vm = max(p[0].shape[1] for p in parts)
    return (np.concatenate([widen(p[0], Vm) for p in parts]), *(np.concatenate([p[i] for p in parts])
                                                                 for i in (1, 2, 3)))


def _refine_block(verts, n, T, a, b, sites, G, H, tol, prio, wtol, area_tol):
    """Cells a..b-1 against `sites`, in dense chunks of bounded memory."""
    step = max(1, _CHUNK_ELEMS // max(4 * len(sites), 1))
    return [_refine_chunk(verts, n, T, s, min(s + step, b), sites, G, H, tol, prio, wtol, area_tol)
            for s in range(a, b, step)]


def _refine_chunk(verts, n, T, c0, c1, sites, G, H, tol, prio, wtol, area_tol):
    """Pieces of cells c0..c1-1 whose candidates are among `sites`: (pv, pn, parent cell, site)."""
    Gl, Hl = G[sites], H[sites]
    # bounding-box bounds, dense [cells, list]; the minimiser of max over the cell survives them
    lo_xy, hi_xy = verts[c0:c1].min(1), verts[c0:c1].max(1)
    cen, hw = (lo_xy + hi_xy) / 2, (hi_xy - lo_xy) / 2
    mid = cen @ Gl.T + Hl
    spread = hw @ np.abs(Gl).T
    if T.shape[1]:  # the sites of the cell's own key are not candidates
        pos = np.full(G.shape[0], -1)
        pos[sites] = np.arange(len(sites))
        tk = pos[T[c0:c1]]
        r = np.broadcast_to(np.arange(c1 - c0)[:, None], tk.shape)
        mid[r[tk >= 0], tk[tk >= 0]] = np.inf
    ub = (mid + spread).min(1)
    ci, li = np.nonzero(mid - spread <= ub[:, None] + tol)
    cc, cj = ci + c0, sites[li]
    F = np.einsum("pvk,pk->pv", verts[cc], G[cj]) + H[cj][:, None]  # [entries, V] (padding repeats vertex 0)
    fmin, fmax = F.min(1), F.max(1)
    U = np.full(c1 - c0, np.inf)
    np.minimum.at(U, cc - c0, fmax)
    cand = fmin <= U[cc - c0] + tol
    pc, psite, comp, cnt = _prune(cc[cand] - c0, cj[cand], F[cand], G, H, tol, prio)
    pc = pc + c0
    pv, pn = verts[pc], n[pc].copy()
    gj, hj = G[psite], H[psite]
    for r in range(comp.shape[1]):
        rows = np.flatnonzero(cnt > r)
        rows = rows[pn[rows] >= 3]
        if rows.size == 0:
            continue
        other = comp[rows, r]
        dg = gj[rows] - G[other]
        dh = hj[rows] - H[other]
        sv, sn = clip(pv[rows], pn[rows], dg[:, 0], dg[:, 1], dh)
        Vn = max(pv.shape[1], sv.shape[1])
        pv, sv = widen(pv, Vn), widen(sv, Vn)
        pv[rows], pn[rows] = sv, sn
    pv, pn, pc, psite = drop_slivers(pv, pn, wtol, area_tol, pc, psite)
    return trim(pv, pn), pn, pc, psite


def _prune(cc, cj, F, G, H, tol, prio):
    """Candidate entries (cell, site, f at the cell's vertices) -> pieces, pruned by dominance.

    j is dead in cell c if some l has f_l < f_j at every vertex (then everywhere in c); a dead site is never
    the minimum, so the alive ones decide alone. A piece (c, j) is then clipped only by the alive
    competitors l whose bisector actually cuts c (f_j > f_l at some vertex). Returns piece cells pc [P],
    piece sites [P], and a padded competitor table comp [P, R] with counts cnt [P], sorted by cnt
    descending (so "has an r-th constraint" is a prefix).
    """
    V = F.shape[1] if F.ndim == 2 else 1
    fmax = F.max(1) if len(F) else np.zeros(0)
    C = int(cc.max()) + 1 if len(cc) else 0
    # dominance by the strongest few sites of the cell (smallest max over the cell)
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
    # all pairs among the alive: dead ones and the bisectors that cut the cell
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


def _merge_by_key(pv, pn, keys, length, wtol, area_tol):
    """Union of the pieces that share a key (convex by construction): (unique keys, verts, n, inv) with
    inv[p] the output row of piece p, -1 where its cell was dropped as a sliver.

    Single pieces are kept as they are; groups of several pieces become the hull of their vertices.
    """
    if len(keys) == 0:
        return keys, np.zeros((0, 1, 2)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
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
        Vmax = max(Vmax, hv.shape[1])
        cv, hv = widen(cv, Vmax), widen(hv, Vmax)
        cv[gid_of], cn[gid_of] = hv, hn
    cv = pad_fill(cv, cn)
    rows = np.arange(len(uk))
    cv, cn, uk, rows = drop_slivers(cv, cn, wtol, area_tol, uk, rows)
    new_row = np.full(len(counts), -1, dtype=np.int64)
    new_row[rows] = np.arange(len(rows))
    return uk, trim(cv, cn), cn, new_row[inv]


# ------------------------------------------------------------------------------------ line arrangements
def arrangement_cell_bound(G: np.ndarray, H: np.ndarray, bounds) -> int:
    """Cells of the lines f_i = 0 inside the box, at most 1 + lines + crossings inside (Euler: a chord that
    meets j earlier chords adds j + 1 cells; equality in general position). O(m^2) time, chunked memory."""
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


def crossing_lines(G: np.ndarray, H: np.ndarray, bounds) -> np.ndarray:
    """Indices of the lines f_i = 0 that cut the box (strictly negative and positive corners, with the same
    snapping as the clipping)."""
    corners = box_polygon(bounds)
    s = line_values(np.broadcast_to(corners, (len(H), 4, 2)), G[:, 0], G[:, 1], H)
    return np.flatnonzero((s < 0).any(1) & (s > 0).any(1))


def arrangement_cells(
    G: np.ndarray,
    H: np.ndarray,
    bounds,
    area_tol: float | None = None,
    max_cells: int = 2_000_000,
) -> Cells:
    """Cells of the arrangement of the lines f_i = 0 inside the box; masks[r, i] = f_i < 0 on cell r.

    Exact: each polygon is split by each line that crosses it. Memory: the polygons, plus blocks of
    [rows, m] while the masks are read (never cells x lines at once); lines that miss the box cost one test.
    """
    G = np.asarray(G, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    bounds = check_bounds(bounds)
    wtol = WIDTH_REL * length_scale(bounds)
    m = len(H)
    crossing = crossing_lines(G, H, bounds)
    bound = arrangement_cell_bound(G[crossing], H[crossing], bounds)
    if bound > max_cells:
        raise _too_large(f"an arrangement of {len(crossing)} lines crossing the box", bound, max_cells, "up to")
    verts = box_polygon(bounds)[None]
    n = np.array([4])
    for i in crossing:
        s = line_values(verts, G[i, 0], G[i, 1], H[i])
        valid = np.arange(verts.shape[1])[None, :] < n[:, None]
        cut = ((s < 0) & valid).any(1) & ((s > 0) & valid).any(1)
        rows = np.flatnonzero(cut)
        if rows.size == 0:
            continue
        ones = np.ones(rows.size)
        a, b, c = G[i, 0] * ones, G[i, 1] * ones, H[i] * ones
        v1, n1 = drop_slivers(*clip(verts[rows], n[rows], a, b, c), wtol, area_tol)
        v2, n2 = drop_slivers(*clip(verts[rows], n[rows], -a, -b, -c), wtol, area_tol)
        keep = np.flatnonzero(~cut)
        V = max(verts.shape[1], v1.shape[1], v2.shape[1])
        verts = np.concatenate([widen(verts[keep], V), widen(v1, V), widen(v2, V)])
        n = np.concatenate([n[keep], n1, n2])
        if len(n) > max_cells:
            raise _too_large("an arrangement (counted while splitting)", len(n), max_cells)
    # the active set of a cell is read at an interior point: the vertex mean of a convex polygon
    valid = np.arange(verts.shape[1])[None, :] < n[:, None]
    centroid = (verts * valid[..., None]).sum(1) / n[:, None]
    masks = np.empty((len(n), m), dtype=bool)
    step = max(1, _CHUNK_ELEMS // max(m, 1))
    for s in range(0, len(n), step):
        masks[s : s + step] = (centroid[s : s + step] @ G.T + H) < 0
    return Cells(masks, to_list(verts, n))
