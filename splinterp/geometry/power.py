"""Power diagrams of SAEs: sites, k-th order assignment, exact 2-D cells, LP non-emptiness, lifting.

Sites (c_i, alpha_i), power distance pow_i(x) = |x - c_i|^2 - alpha_i. With c_i = W[:, i] and
alpha_i = |c_i|^2 + 2 b_i (W, b from `SAE.encoder_affine`), the scores are u_i(x) = (|x|^2 - pow_i(x)) / 2,
so ranking scores from largest to smallest ranks power distances from smallest to largest.

What the diagram means for each architecture (`power_diagram(sae)`):
- ``topk``: order k with the null site (centre 0, weight 0, pow = |x|^2). The TopK set is the k-th order
  power cell; a selected latent is active iff it also beats the null site (u_i > 0). Regions are the
  order-k cells split by the null site, keyed by their active set.
- ``relu``: order d_sae with the null site: every site beating the null site is active, i.e. the cells of
  the hyperplane arrangement {u_i = 0} (TopK with k = d_sae is ReLU).
- ``jumprelu`` / ``gated``: as relu with weights alpha_i - 2 theta_i (u_i > theta_i iff
  pow_i + 2 theta_i < |x|^2), theta from `SAE.thresholds`.
- ``topk_abs``: ranking |u| is not a power diagram of these sites. It is the order-k diagram (no null
  site) of 2 d_sae signed sites: site 2i+1 has score +u_i (c = w_i, alpha = |w_i|^2 + 2 b_i) and site 2i
  score -u_i (c = -w_i, alpha = |w_i|^2 - 2 b_i); the k largest of the 2 d_sae signed scores are exactly
  the k largest |u_i| with their signs. `signed_pairs=True` marks this layout (`signed_sites`: site 2i+1
  is the positive sign of latent i).

Numbers are numpy float64 throughout (exact geometry needs float64, and scipy's LP and hulls are numpy);
inputs may be torch or numpy, float32 or float64, and are converted to float64. Comparisons are made in a
frame where precision does not depend on where the sites or the box are (see `PowerDiagram.__post_init__`
and `cells_2d`, which works in box-centred coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import combinations
from typing import NamedTuple

import numpy as np
import torch

from splinterp.errors import ConfigError, DTypeError, PrecisionError, ShapeError
from splinterp.geometry import cells2d
from splinterp.geometry.checks import (
    check_bounds,
    check_count,
    check_index_set,
    check_nonneg_float,
    takes_sae,
)
from splinterp.geometry.lp import LP_TOL, RegionCheck, RegionCheckWithMargin, pattern_lp
from splinterp.geometry.polygons import polygon_area
from splinterp.geometry.signed_sites import SignedMasks, interleave, split_signed_mask
from splinterp.sae import SAE, topk_indices
from splinterp.validation import as_tensor, check_finite

_CHUNK = 16384


def _f64(x, name: str, ndim: int) -> np.ndarray:
    t = as_tensor(x, name)
    if not t.is_floating_point():
        raise DTypeError(f"{name} must be a floating array, got {t.dtype}")
    if t.ndim != ndim:
        raise ShapeError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    check_finite(t, name)
    return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float64)


class FirstOrderForm(NamedTuple):
    """`PowerDiagram.as_first_order`: a first-order diagram whose site c is the subset subsets[c] (bool [C, m])."""

    diagram: PowerDiagram
    subsets: np.ndarray


@dataclass(frozen=True)
class Cell2D:
    """One cell of a 2-D diagram: its key (sorted k-set, or the active set with a null site) and an exact
    convex polygon [V, 2] (counter-clockwise, float64) clipped to the box."""

    key: tuple[int, ...]
    vertices: np.ndarray

    @property
    def area(self) -> float:
        return polygon_area(self.vertices)


@dataclass(frozen=True, eq=False)
class PowerDiagram:
    """A k-th order power diagram: centers [m, n], weights [m] (float64), order k, optional null site.

    null_site: a site at the origin with weight 0 (power distance |x|^2); a site in the k-set is *active*
    only if it is strictly closer than the null site (the ReLU rule). Cells are then keyed by the active
    set. signed_pairs: sites come in (-u_i, +u_i) pairs (the topk_abs layout, see the module docstring).
    """

    centers: np.ndarray
    weights: np.ndarray
    order: int = 1
    null_site: bool = False
    signed_pairs: bool = False
    offsets: np.ndarray | None = field(default=None, repr=False)
    """Optional h [m] of the linear form f_i(x) = pow_i(x) - |x|^2 = -2 c_i . x + h_i when it is known
    exactly (an SAE's scores give h = -2 b, see `diagram_from_affine`); by default |c_i|^2 - alpha_i, which
    loses digits when |c_i|^2 is much larger than the scores."""

    def __post_init__(self):
        c = _f64(self.centers, "centers", 2)
        w = _f64(self.weights, "weights", 1)
        if w.shape[0] != c.shape[0]:
            raise ShapeError(f"weights has {w.shape[0]} entries but there are {c.shape[0]} centers")
        if c.shape[0] < 1 or c.shape[1] < 1:
            raise ShapeError(f"need at least one site in at least one dimension, got centers {c.shape}")
        k = self.order
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= c.shape[0]:
            raise ConfigError(f"order must be an integer in [1, {c.shape[0]}], got {k!r}")
        if self.signed_pairs and c.shape[0] % 2:
            raise ConfigError("signed_pairs needs an even number of sites")
        c.setflags(write=False)
        w.setflags(write=False)
        object.__setattr__(self, "centers", c)
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "order", int(k))
        # Every comparison uses the linear form f_i(x) = pow_i(x) - |x - ref|^2 = g_i . (x - ref) + h_i, the
        # same for all sites up to a common term. With a null site (power distance |x|^2) or exact offsets the
        # reference is the origin; otherwise it is the centres' mean, so that precision does not depend on
        # where the sites are (sites near 1e6 get the digits of sites near 0).
        if self.offsets is not None:
            h0 = _f64(self.offsets, "offsets", 1)
            if h0.shape != w.shape:
                raise ShapeError(f"offsets has {h0.shape[0]} entries but there are {c.shape[0]} centers")
        if self.null_site or self.offsets is not None:
            ref = np.zeros(c.shape[1])
            g = -2.0 * c
            h = h0 if self.offsets is not None else np.einsum("ij,ij->i", c, c) - w
        else:
            ref = c.mean(0)
            cr = c - ref
            g = -2.0 * cr
            h = np.einsum("ij,ij->i", cr, cr) - w
        for name, v in (("_ref", ref), ("_g", g), ("_h", h)):
            v = np.ascontiguousarray(v, dtype=np.float64)
            v.setflags(write=False)
            object.__setattr__(self, name, v)

    # ------------------------------------------------------------------ basics
    @property
    def n_sites(self) -> int:
        return self.centers.shape[0]

    @property
    def dim(self) -> int:
        return self.centers.shape[1]

    def __repr__(self) -> str:
        extra = ", null_site" if self.null_site else ""
        extra += ", signed_pairs" if self.signed_pairs else ""
        return f"PowerDiagram(m={self.n_sites}, dim={self.dim}, order={self.order}{extra})"

    def _points(self, X, name="X") -> np.ndarray:
        X = _f64(X, name, 2)
        if X.shape[1] != self.dim:
            raise ShapeError(f"{name} has {X.shape[1]} columns but the diagram lives in dim={self.dim}")
        return X

    def _f(self, X: np.ndarray) -> np.ndarray:
        return (X - self._ref) @ self._g.T + self._h

    def _ranked(self, X: np.ndarray) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
        """Chunks of X: (rows, f [b, m], indices of the `order` nearest sites [b, order]) (ties: lower index)."""
        for s in range(0, X.shape[0], _CHUNK):
            f = self._f(X[s : s + _CHUNK])
            yield slice(s, s + _CHUNK), f, topk_indices(-torch.from_numpy(f), self.order).numpy()

    def power_distances(self, X) -> np.ndarray:
        """float64 [N, m]: pow_i(x) = |x - c_i|^2 - alpha_i (the null site's is |x|^2)."""
        X = self._points(X)
        d = X - self._ref
        return self._f(X) + np.einsum("ij,ij->i", d, d)[:, None]

    def ksets(self, X) -> np.ndarray:
        """int64 [N, k]: the k nearest (real) sites in power distance, nearest first, ties towards the
        lower index (the SAE's rule). Computed from f = pow - |x - ref|^2 (same ranking, less rounding)."""
        X = self._points(X)
        out = np.empty((X.shape[0], self.order), dtype=np.int64)
        for rows, _, ks in self._ranked(X):
            out[rows] = ks
        return out

    def active(self, X) -> np.ndarray:
        """bool [N, m]: site i is in the k-set and (with a null site) strictly beats the null site."""
        X = self._points(X)
        out = np.zeros((X.shape[0], self.n_sites), dtype=bool)
        if self.null_site and self.order == self.n_sites:
            for s in range(0, X.shape[0], _CHUNK):
                out[s : s + _CHUNK] = self._f(X[s : s + _CHUNK]) < 0
            return out
        for rows, f, ks in self._ranked(X):
            keep = np.take_along_axis(f, ks, 1) < 0 if self.null_site else np.ones(ks.shape, bool)
            r = np.broadcast_to(np.arange(ks.shape[0])[:, None], ks.shape)
            out[rows][r[keep], ks[keep]] = True
        return out

    def keys(self, X) -> np.ndarray:
        """int64 [N, k]: the cell key of each point, sorted; with a null site the sites that lose to it
        are replaced by m (so a key is the active set padded with m)."""
        X = self._points(X)
        out = np.empty((X.shape[0], self.order), dtype=np.int64)
        for rows, f, ks in self._ranked(X):
            if self.null_site:
                ks = np.where(np.take_along_axis(f, ks, 1) < 0, ks, self.n_sites)
            out[rows] = np.sort(ks, 1)
        return out

    def _key_rows(self, X) -> np.ndarray:
        """A compact per-point row identifying the cell (packed bits for the arrangement case)."""
        if self.null_site and self.order == self.n_sites:
            return np.packbits(self.active(X), axis=1)
        return self.keys(X)

    def assign(self, X) -> np.ndarray:
        """int64 [N]: canonical cell ids, equal iff same cell, numbered 0.. in order of first appearance
        (the convention of `geometry.region_ids`, so power_diagram(sae).assign(X) == region_ids(sae, X))."""
        rows = self._key_rows(X)
        _, first, inv = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        return rank[inv]

    def latent_mask(self, site_mask) -> SignedMasks:
        """signed_pairs only: bool [..., 2m] site mask -> SignedMasks(latents [..., m], positive [..., m])."""
        if not self.signed_pairs:
            raise ConfigError("latent_mask is for signed-pair diagrams (topk_abs); here site i is latent i")
        return split_signed_mask(site_mask)

    # ------------------------------------------------------------------ exact 2-D cells
    def cell_masks(
        self, bounds=(-1.0, 1.0, -1.0, 1.0), area_tol: float | None = None, max_cells: int = 2_000_000
    ) -> cells2d.Cells:
        """The exact cells in the box as `cells2d.Cells` (site masks [R, m], polygons): the form `slice_2d`
        uses, which never builds per-cell Python keys. See `cells_2d` for the arguments."""
        if self.dim != 2:
            raise ShapeError(f"cells_2d needs a 2-D diagram, this one has dim={self.dim} (use a slice)")
        x0, x1, y0, y1 = check_bounds(bounds)
        area_tol = check_nonneg_float(area_tol, "area_tol", allow_none=True)
        max_cells = check_count(max_cells, "max_cells")
        # box-centred coordinates: f_i(centre + y) = g_i . y + f_i(centre)
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        local = (x0 - centre[0], x1 - centre[0], y0 - centre[1], y1 - centre[1])
        H = self._f(centre[None])[0]
        if self.null_site and self.order == self.n_sites:
            cells = cells2d.arrangement_cells(self._g, H, local, area_tol, max_cells)
        else:
            cells = cells2d.order_k_cells(self._g, H, self.order, local, self.null_site, area_tol, max_cells)
        return cells2d.Cells(cells.masks, [p + centre for p in cells.polygons])

    def cells_2d(
        self, bounds=(-1.0, 1.0, -1.0, 1.0), area_tol: float | None = None, max_cells: int = 2_000_000
    ) -> list[Cell2D]:
        """The exact cells of a 2-D diagram inside the box (xmin, xmax, ymin, ymax), any order.

        Order k by refinement of order k-1 (see `cells2d`); with a null site and order = m (relu view) by
        the line arrangement. No cell is dropped for being small: only slivers thinner than
        `polygons.WIDTH_REL` (1e-11) of the box, which are rounding; `area_tol` (absolute, optional) drops
        cells of at most that area as well. `max_cells` bounds the cells summed over the orders computed:
        past it (predicted before the work, checked after each order) a TooLargeError is raised.
        """
        cells = self.cell_masks(bounds, area_tol, max_cells)
        return [Cell2D(tuple(np.flatnonzero(mk).tolist()), p) for mk, p in zip(cells.masks, cells.polygons)]

    # ------------------------------------------------------------------ LP non-emptiness
    def is_nonempty(self, S, bounds=None, tol: float = LP_TOL, return_margin: bool = False):
        """Is the cell S non-empty (with interior)? -> RegionCheck(nonempty, witness or None). Any dimension.

        S: site indices (integers) or a bool mask [m]: the k-set, or with a null site the active set (at
        most k). The LP of `lp` on the scores u_i = (|x|^2 - pow_i(x)) / 2: the largest ball in the cell,
        row-normalised constraints, so its radius (the margin, returned with `return_margin`) is a distance.
        False means no ball of radius above tol times the scale fits (cells of measure zero, only ties,
        count as empty); a witness that does not land in S is a PrecisionError, never True.
        bounds: restrict to a box (see `checks.check_box`).
        """
        mask = check_index_set(S, self.n_sites, "S")
        # scores u_i = -f_i / 2 are affine in y = x - ref
        res = pattern_lp(
            -0.5 * self._g.T, -0.5 * self._h, mask, k=self.order, null=self.null_site,
            bounds=None if bounds is None else _shift_box(bounds, self._ref), tol=tol,
        )
        witness = None
        if res.nonempty:
            witness = res.witness + self._ref
            key = self.keys(witness[None])[0]
            want = np.sort(np.concatenate([np.flatnonzero(mask), np.full(self.order - mask.sum(), self.n_sites)]))
            if not np.array_equal(key, want):
                raise PrecisionError(f"is_nonempty: the LP witness (margin {res.margin:.3g}) lands in cell {key}")
        if return_margin:
            return RegionCheckWithMargin(res.nonempty, witness, res.margin)
        return RegionCheck(res.nonempty, witness)

    # ------------------------------------------------------------------ lifting
    def lift(self, K: float | None = None) -> np.ndarray:
        """Lifted Voronoi sites [m (+1), n+1]: (c_i, h_i) with h_i = sqrt(K - alpha_i), K >= max alpha
        (default: the max, counting the null site's weight 0). The section {h = 0} of the Voronoi diagram
        of these points, with x embedded as (x, 0), is this power diagram: |(x,0) - (c,h)|^2 = pow + K.
        With a null site its lifted point (0, sqrt(K)) is the last row.
        """
        w = np.append(self.weights, 0.0) if self.null_site else self.weights
        wmax = float(w.max())
        K = wmax if K is None else float(K)
        if not math.isfinite(K) or K < wmax:
            raise ConfigError(f"K must be >= max weight ({wmax}), got {K}")
        c = np.vstack([self.centers, np.zeros((1, self.dim))]) if self.null_site else self.centers
        return np.hstack([c, np.sqrt(K - w)[:, None]])

    @classmethod
    def from_lifted(
        cls, points, plane_height: float = 0.0, order: int = 1, null_site: bool = False, signed_pairs: bool = False
    ) -> PowerDiagram:
        """The section {h = plane_height} of the Voronoi diagram of points [m, n+1], as a power diagram:
        centres points[:, :n], weights `section_weights(points[:, n], plane_height)`. With null_site the
        last point is taken as the null site and must sit over the origin at the same height offset as
        the weights' zero (i.e. as produced by `lift`); its weight becomes the zero of the result."""
        P = _f64(points, "points", 2)
        if P.shape[1] < 2:
            raise ShapeError("lifted points need at least 2 coordinates")
        w = section_weights(P[:, -1], plane_height)
        c = P[:, :-1]
        if null_site:
            if np.abs(c[-1]).max() > 0:
                raise ConfigError("with null_site the last lifted point must lie over the origin")
            w = w[:-1] - w[-1]
            c = c[:-1]
        return cls(c, w, order=order, null_site=null_site, signed_pairs=signed_pairs)

    # ------------------------------------------------------------------ Aurenhammer
    def as_first_order(self, max_sites: int = 200_000) -> FirstOrderForm:
        """The order-k diagram as a first-order power diagram over subsets -> FirstOrderForm(diagram, subsets
        bool [C, m]).

        Site S: mu_S = sum_{i in S} c_i, alpha_S = |mu_S|^2 - sum_{i in S}(|c_i|^2 - alpha_i), so that
        pow_S(x) = |x|^2 + sum_{i in S} f_i(x). Without a null site the subsets are the k-subsets; with it
        they are all subsets of size <= k (the null site fills the rest with f = 0), whose first-order cells
        are the active sets (for relu, k = m: the 2^m patterns of Balestriero et al.'s view).
        """
        m, k = self.n_sites, self.order
        sizes = range(0, k + 1) if self.null_site else [k]
        total = sum(math.comb(m, s) for s in sizes)
        if total > max_sites:
            raise ConfigError(f"the first-order form has {total} sites (> max_sites={max_sites})")
        subsets = np.zeros((total, m), dtype=bool)
        r = 0
        for s in sizes:
            for comb in combinations(range(m), s):
                subsets[r, list(comb)] = True
                r += 1
        S = subsets.astype(np.float64)
        mu = S @ self.centers
        c, w = self.centers, self.weights
        h0 = self.offsets if self.offsets is not None else np.einsum("ij,ij->i", c, c) - w
        alpha = np.einsum("ij,ij->i", mu, mu) - S @ np.asarray(h0, dtype=np.float64)
        return FirstOrderForm(PowerDiagram(mu, alpha, order=1), subsets)


def _shift_box(bounds, ref: np.ndarray) -> np.ndarray:
    """A box for x as a box for y = x - ref ([n, 2] rows of (lo, hi))."""
    from splinterp.geometry.checks import check_box

    lo, hi = check_box(bounds, len(ref))
    return np.column_stack([lo - ref, hi - ref])


def section_weights(heights, plane_height: float = 0.0) -> np.ndarray:
    """Weights of the power diagram cut by the plane {h = plane_height} from the Voronoi diagram of points
    at these heights: alpha_i = -(h_i - plane_height)^2 (any common constant may be added)."""
    try:
        h = np.asarray(heights.detach().cpu() if isinstance(heights, torch.Tensor) else heights, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"heights must be a 1-D array of numbers, got {heights!r}") from None
    if h.ndim != 1 or not np.isfinite(h).all():
        raise ConfigError(f"heights must be a 1-D array of finite numbers, got shape {h.shape}")
    if isinstance(plane_height, bool) or not isinstance(plane_height, (int, float)) or not np.isfinite(plane_height):
        raise ConfigError(f"plane_height must be a finite number, got {plane_height!r}")
    return -((h - float(plane_height)) ** 2)


# ---------------------------------------------------------------------------------------------- SAEs
def diagram_from_affine(W, b, architecture: str, k: int | None = None, thresholds=None) -> PowerDiagram:
    """The power diagram of affine scores u(x) = x @ W + b (W [n, m]) under an SAE selection rule.

    Site i has centre W[:, i] and weight |W[:, i]|^2 + 2 b_i, and its linear form f_i = -2 u_i is passed
    exactly (`offsets` = -2 b), so the diagram compares the SAE's own scores."""
    W = _f64(W, "W", 2)
    b = _f64(b, "b", 1)
    if b.shape[0] != W.shape[1]:
        raise ShapeError(f"b has {b.shape[0]} entries but W has {W.shape[1]} columns")
    c = W.T
    sq = np.einsum("ij,ij->i", c, c)
    m = c.shape[0]
    if architecture == "topk":
        return PowerDiagram(c, sq + 2.0 * b, order=k, null_site=True, offsets=-2.0 * b)
    if architecture == "relu":
        return PowerDiagram(c, sq + 2.0 * b, order=m, null_site=True, offsets=-2.0 * b)
    if architecture in ("jumprelu", "gated"):
        if thresholds is None:
            raise ConfigError(f"{architecture} needs thresholds")
        bt = b - _f64(thresholds, "thresholds", 1)  # u_i > theta_i iff u_i - theta_i > 0
        return PowerDiagram(c, sq + 2.0 * bt, order=m, null_site=True, offsets=-2.0 * bt)
    if architecture == "topk_abs":  # signed sites: -u_i and +u_i (`signed_sites` layout)
        return PowerDiagram(
            interleave(-c, c), interleave(sq - 2.0 * b, sq + 2.0 * b), order=k, signed_pairs=True,
            offsets=interleave(2.0 * b, -2.0 * b),
        )
    raise ConfigError(f"unknown architecture {architecture!r}")


@takes_sae
@torch.no_grad()
def power_diagram(sae: SAE) -> PowerDiagram:
    """The SAE's power diagram (see the module docstring for what it means per architecture)."""
    W, b = sae.encoder_affine()
    th = sae.thresholds()
    return diagram_from_affine(
        W.detach().double(),
        b.detach().double(),
        sae.cfg.architecture,
        sae.cfg.k,
        None if th is None else th.detach().double(),
    )
