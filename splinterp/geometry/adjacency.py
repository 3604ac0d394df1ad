"""The region adjacency graph of a slice: which regions share a boundary segment, and what changes across it.

Each edge of a region's polygon that is not on the box lies on one hyperplane of the region's half-space
description (`halfspaces`), restricted to the plane: the line of latent i (relu-type: i flips), a bisector
u_i = u_j between an active latent i and an inactive j (TopK: i is swapped out for j), or the null-site line
u_i = 0 of an active latent (TopK: i leaves; with fewer than k active, a latent crossing zero enters or
leaves). The line is found from the geometry, by evaluating the region's hyperplanes at the edge's midpoint
(those within 1e-9 of the box's size), and the neighbour's key follows from it; so an edge's label says what
changes, and the two masks must differ by exactly that (what the tests check). Where several hyperplanes
meet the midpoint (a degenerate slice), the neighbour is found by looking just across the edge instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splinterp.geometry.halfspaces import hyperplanes_within, mask_patterns, site_form
from splinterp.geometry.signed_sites import site_latent, site_positive

_TIGHT_REL = 1e-9  # an edge lies on the hyperplanes within this fraction of the box's size of its midpoint
_BOX_REL = 1e-12  # an edge on the box boundary: both ends on the same side, to this fraction of the box
_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True, eq=False)
class SliceAdjacency:
    """edges int64 [E, 2] (r1 < r2, each pair once), labels: per edge the latents whose state changes across
    it (flip, enter, leave; a swap is two; a topk_abs sign flip is the latent itself), lengths float64 [E]:
    the shared boundary's length in (a, b) units."""

    edges: np.ndarray
    labels: list
    lengths: np.ndarray
    n_regions: int

    def __len__(self) -> int:
        return len(self.edges)

    def neighbors(self, region: int) -> np.ndarray:
        """The regions adjacent to `region`, ascending."""
        e = self.edges
        return np.unique(np.concatenate([e[e[:, 0] == region, 1], e[e[:, 1] == region, 0]]))

    def degree(self) -> np.ndarray:
        """int64 [R]: neighbours per region."""
        return np.bincount(self.edges.ravel(), minlength=self.n_regions)


def _region_keys(masks: np.ndarray, signs: np.ndarray | None) -> list[bytes]:
    """One bytes key per region (the mask, and the signs for topk_abs) for exact lookups."""
    rows = np.packbits(masks, axis=1)
    if signs is not None:
        rows = np.concatenate([rows, np.packbits(signs & masks, axis=1)], axis=1)
    return [r.tobytes() for r in rows]


def slice_adjacency(sl) -> SliceAdjacency:
    """The adjacency graph of a `Slice2D` (see the module docstring)."""
    sae = sl.sae
    W, b = sae.encoder_affine()
    W, b = W.detach().cpu().double(), b.detach().cpu().double()
    W2 = torch.stack([sl.u @ W, sl.v @ W]).numpy()
    b2 = (sl.origin @ W + b).numpy()
    th = sae.thresholds()
    form = site_form(W2, b2, sae.cfg.architecture, sae.cfg.k, None if th is None else th.detach().cpu().double())
    masks = sl.masks.numpy()
    signs = None if sl.signs is None else sl.signs.numpy()
    R = len(sl.polygons)
    x0, x1, y0, y1 = sl.bounds
    size = max(x1 - x0, y1 - y0)
    lookup = {key: r for r, key in enumerate(_region_keys(masks, signs))}
    # every polygon edge off the box: (region, midpoint, outward normal, length)
    reg, mid, nrm, length = [], [], [], []
    for r, p in enumerate(sl.polygons):
        q = np.roll(p, -1, axis=0)
        on_box = ((np.abs(p[:, 0] - x0) <= _BOX_REL * size) & (np.abs(q[:, 0] - x0) <= _BOX_REL * size))
        on_box |= (np.abs(p[:, 0] - x1) <= _BOX_REL * size) & (np.abs(q[:, 0] - x1) <= _BOX_REL * size)
        on_box |= (np.abs(p[:, 1] - y0) <= _BOX_REL * size) & (np.abs(q[:, 1] - y0) <= _BOX_REL * size)
        on_box |= (np.abs(p[:, 1] - y1) <= _BOX_REL * size) & (np.abs(q[:, 1] - y1) <= _BOX_REL * size)
        e = q - p
        ln = np.hypot(e[:, 0], e[:, 1])
        use = ~on_box & (ln > 0)
        reg.append(np.full(int(use.sum()), r))
        mid.append(((p + q) / 2)[use])
        nrm.append((np.column_stack([e[:, 1], -e[:, 0]]) / ln[:, None])[use])
        length.append(ln[use])
    reg = np.concatenate(reg) if reg else np.zeros(0, dtype=np.int64)
    mid = np.concatenate(mid) if mid else np.zeros((0, 2))
    nrm = np.concatenate(nrm) if nrm else np.zeros((0, 2))
    length = np.concatenate(length) if length else np.zeros(0)
    other = np.full(len(reg), -1, dtype=np.int64)
    label = [()] * len(reg)
    step = max(1, _CHUNK_ELEMS // max(form.n_sites, 1))
    for s in range(0, len(reg), step):
        rr = reg[s : s + step]
        pat, _ = mask_patterns(form, masks[rr], None if signs is None else signs[rr])
        S = mid[s : s + step] @ form.A + form.c
        hp = hyperplanes_within(form, S, pat, _TIGHT_REL * size)
        hp_rows = np.bincount(hp.row, minlength=len(rr))
        lat_a = form.latent[hp.a]
        lat_b = np.where(hp.b >= 0, form.latent[np.maximum(hp.b, 0)], -1)
        for e in np.flatnonzero(hp_rows):  # the label: the latents of the hyperplanes the edge lies on
            j = hp.row == e
            label[s + e] = tuple(sorted(set(lat_a[j].tolist()) | set(lat_b[j][lat_b[j] >= 0].tolist())))
        for e in np.flatnonzero(hp_rows == 1):  # one hyperplane: the neighbour's key follows from it
            j = int(np.flatnonzero(hp.row == e)[0])
            mk = masks[rr[e]].copy()
            sg = None if signs is None else signs[rr[e]].copy()
            a, bb = int(hp.a[j]), int(hp.b[j])
            if signs is not None:  # signed sites: a selected (latent, sign), bb a competitor or -1 (sign flip)
                la = int(site_latent(a))
                if bb >= 0:
                    lb = int(site_latent(bb))
                    mk[la], mk[lb] = False, True
                    sg[la], sg[lb] = False, bool(site_positive(bb))
                else:
                    sg[la] = not sg[la]
            elif bb >= 0:
                mk[a], mk[bb] = False, True
            else:
                mk[a] = not mk[a]
            key = _region_keys(mk[None], None if sg is None else sg[None])[0]
            other[s + e] = lookup.get(key, -1)
    # degenerate midpoints, or a neighbour not found by its key: look just across the edge
    miss = np.flatnonzero(other < 0)
    if miss.size:
        probe = mid[miss] + 1e-7 * size * nrm[miss]
        other[miss] = sl.regions_at(probe)
    ok = np.flatnonzero((other >= 0) & (other != reg))
    a, b_, ln = reg[ok], other[ok], length[ok]
    lo, hi = np.minimum(a, b_), np.maximum(a, b_)
    pairs, first = np.unique(np.column_stack([lo, hi]), axis=0, return_index=True)
    pairs = pairs.reshape(-1, 2)
    return SliceAdjacency(pairs.astype(np.int64), [label[ok[f]] for f in first], ln[first], R)
