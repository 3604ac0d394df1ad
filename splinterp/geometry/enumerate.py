"""Every region of an SAE that meets a box, in any dimension: a breadth-first search across facets, with LPs.

The regions inside a (convex) box form a connected graph through their shared facets, and crossing one facet
changes the region in one of a few ways (`halfspaces`): relu-type, or TopK with fewer than k active: one
latent flips; TopK with k active: an active latent is swapped for an inactive one, or leaves (the ReLU);
topk_abs: a signed latent is swapped for a signed inactive one, or an active latent changes sign. Starting
from the region at the box's centre, every such neighbour pattern not seen yet is tested with the exact LP
of `lp` restricted to the box (a Chebyshev ball inside region and box), and the ones that exist join the
queue. Nothing is sampled, so no region is missed, however small (down to the LP's resolution, see `lp`).

Cost: one LP per (region found, neighbour pattern not yet seen): d_sae per region for relu-type SAEs,
about k (d_sae - k) for TopK. `max_regions` stops the search (TooLargeError) and `max_lps` refuses up front
when the regions allowed times the patterns per region would exceed it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from splinterp.errors import TooLargeError
from splinterp.geometry.checks import check_box, check_count, takes_sae
from splinterp.geometry.halfspaces import SiteForm, mask_patterns, site_form
from splinterp.geometry.lp import LP_TOL, solve_pattern
from splinterp.geometry.scores import encoder_f64
from splinterp.sae import SAE


@dataclass(frozen=True, eq=False)
class RegionEnumeration:
    """The regions meeting the box: masks bool [R, d_sae]; signs bool [R, d_sae] (topk_abs) or None;
    witnesses float64 [R, d_in] (the centre of each region's largest ball inside the box); margins float64
    [R] (that ball's radius); n_lps: how many LPs the search solved."""

    masks: torch.Tensor
    signs: torch.Tensor | None
    witnesses: torch.Tensor
    margins: torch.Tensor
    n_lps: int

    def __len__(self) -> int:
        return self.masks.shape[0]


def _neighbours(form: SiteForm, mask: np.ndarray, signs: np.ndarray | None):
    """Every pattern one facet away from (mask, signs): list of (mask, signs)."""
    m = len(mask)
    on, off = np.flatnonzero(mask), np.flatnonzero(~mask)
    out = []
    if form.k is None or (not form.signed and len(on) < form.k):
        for i in range(m):
            mk = mask.copy()
            mk[i] = not mk[i]
            out.append((mk, None))
        return out
    for i in on:
        for j in off:
            for sj in ((False, True) if form.signed else (None,)):
                mk = mask.copy()
                mk[i], mk[j] = False, True
                sg = None
                if form.signed:
                    sg = signs.copy()
                    sg[i], sg[j] = False, sj
                out.append((mk, sg))
        mk = mask.copy()
        if form.signed:  # the active latent's score changes sign
            sg = signs.copy()
            sg[i] = not sg[i]
            out.append((mk, sg))
        else:  # the ReLU: it leaves
            mk[i] = False
            out.append((mk, None))
    return out


def _patterns_per_region(form: SiteForm, m: int) -> int:
    if form.k is None:
        return m
    k = min(form.k, m)
    return k * (m - k) * (2 if form.signed else 1) + max(k, m)


def _key(mask: np.ndarray, signs: np.ndarray | None) -> bytes:
    return np.packbits(mask).tobytes() + (b"" if signs is None else np.packbits(signs & mask).tobytes())


@takes_sae
@torch.no_grad()
def enumerate_regions(sae: SAE, bounds, max_regions: int = 10_000, *, max_lps: int = 1_000_000,
                      tol: float = LP_TOL) -> RegionEnumeration:
    """Every region of `sae` that meets the box `bounds` ((lo, hi) for a cube, [d_in, 2] rows, or for
    d_in = 2 (xmin, xmax, ymin, ymax)), by a breadth-first search over facets with exact LPs (module
    docstring). Raises TooLargeError past `max_regions` regions, or up front when `max_regions` times the
    neighbour patterns per region exceeds `max_lps`."""
    max_regions = check_count(max_regions, "max_regions")
    max_lps = check_count(max_lps, "max_lps")
    enc = encoder_f64(sae)
    n, m = enc.W.shape
    lo, hi = check_box(bounds, n)
    form = site_form(enc.W, enc.b, enc.architecture, enc.k, enc.theta)
    per = _patterns_per_region(form, m)
    if per * max_regions > max_lps:
        raise TooLargeError(
            f"enumerate_regions may solve up to {per:,} LPs per region x max_regions={max_regions:,} = "
            f"{per * max_regions:,} LPs, more than max_lps={max_lps:,}; lower max_regions or raise max_lps"
        )
    box = np.column_stack([lo, hi])
    signed = enc.architecture == "topk_abs"

    def pattern_of(x: np.ndarray):
        u = torch.from_numpy(x[None] @ enc.W + enc.b)
        mk = sae.select(u)[0].numpy()
        return mk, ((u[0] > 0).numpy() & mk) if signed else None

    def solve(mk, sg):
        pat, possible = mask_patterns(form, mk[None], None if sg is None else sg[None])
        if not possible[0]:
            return None
        res = solve_pattern(form, pat, box, tol)
        return res if res.nonempty else None

    n_lps = 0
    rng = np.random.default_rng(0)
    start = None
    for attempt in range(16):  # the centre may lie on a boundary: then a point next to it
        x = (lo + hi) / 2 + (0 if attempt == 0 else 1e-3 * (hi - lo) / 2 * rng.uniform(-1, 1, n))
        mk, sg = pattern_of(x)
        res = solve(mk, sg)
        n_lps += 1
        if res is not None:
            start = (mk, sg, res)
            break
    found = {}
    if start is not None:
        found[_key(start[0], start[1])] = start
    queue = deque([start] if start is not None else [])
    tried = set(found)
    while queue:
        mk, sg, _ = queue.popleft()
        for nk, ns in _neighbours(form, mk, sg):
            key = _key(nk, ns)
            if key in tried:
                continue
            tried.add(key)
            res = solve(nk, ns)
            n_lps += 1
            if res is None:
                continue
            found[key] = (nk, ns, res)
            if len(found) > max_regions:
                raise TooLargeError(
                    f"more than max_regions={max_regions:,} regions meet the box (after {n_lps:,} LPs); "
                    "use a smaller box or raise max_regions"
                )
            queue.append(found[key])
    items = list(found.values())
    masks = torch.from_numpy(np.array([it[0] for it in items], dtype=bool).reshape(len(items), m))
    signs = torch.from_numpy(np.array([it[1] for it in items], dtype=bool).reshape(len(items), m)) if signed else None
    wit = torch.from_numpy(np.array([it[2].witness for it in items], dtype=np.float64).reshape(len(items), n))
    mar = torch.tensor([it[2].margin for it in items], dtype=torch.float64)
    return RegionEnumeration(masks, signs, wit, mar, n_lps)
