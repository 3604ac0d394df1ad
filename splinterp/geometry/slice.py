"""Exact 2-D slices of an SAE's partition: the regions met by a plane origin + a*u + b*v in input space.

On the plane the scores are affine in (a, b):

    u(a, b) = (origin + a u + b v) @ W + b_enc = [a, b] @ [u @ W; v @ W] + (origin @ W + b_enc),

so the restricted SAE is an SAE-like spline in 2-D with the same selection rule, and its partition is the
2-D power diagram of the projected sites (`diagram_from_affine`): for topk the order-k diagram split by
the ReLU null site, for relu/jumprelu/gated the line arrangement {u_i = theta_i}, for topk_abs the
order-k diagram of 2 d_sae signed sites. `slice_2d` returns every region's exact polygon (in (a, b)
coordinates), its active set and its affine map restricted to the plane; `Slice2D.adjacency` its region
graph. The number of regions of a ReLU-type slice in general position is exactly 1 + L + I (L latent lines
crossing the box, I of their crossings inside it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from splinterp.errors import ConfigError, ShapeError
from splinterp.geometry.checks import check_bounds, input_point, takes_sae
from splinterp.geometry.polygons import polygon_areas
from splinterp.geometry.power import PowerDiagram, diagram_from_affine
from splinterp.geometry.regions import affine_map
from splinterp.geometry.scores import check_scores
from splinterp.geometry.signed_sites import signed_site, split_signed_mask
from splinterp.sae import SAE
from splinterp.validation import as_tensor

_COLLINEAR_ULPS = 1e3  # a plane spanned by less than this many rounding steps of its points is noise



@dataclass(frozen=True)
class Plane:
    """An affine plane origin + a*u + b*v (u, v orthonormal, float64) and the (a, b) coordinates of the
    three points it was built from (rows: x0, x1, x2)."""

    origin: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    coords: np.ndarray

    def to_input(self, ab) -> torch.Tensor:
        """Points [N, 2] in (a, b) -> inputs [N, d_in] (float64)."""
        ab = torch.as_tensor(np.asarray(ab, dtype=np.float64))
        if ab.ndim != 2 or ab.shape[1] != 2:
            raise ShapeError(f"ab must have shape [N, 2], got {tuple(ab.shape)}")
        return self.origin + ab[:, :1] * self.u + ab[:, 1:] * self.v

    def bounds(self, margin: float = 0.25) -> tuple[float, float, float, float]:
        """A box around the three points, widened by `margin` times its larger side on every side."""
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise ConfigError(f"margin must be a finite number >= 0, got {margin!r}")
        lo, hi = self.coords.min(0), self.coords.max(0)
        pad = margin * float((hi - lo).max())
        return (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)


def plane_through(x0, x1, x2) -> Plane:
    """The plane through three inputs: origin x0, u along x1 - x0, v the Gram-Schmidt rest of x2 - x0.

    Points given in float32 (or float16) carry that rounding: a direction shorter than about 1e3 rounding
    steps of the points (in their own dtype) is noise, so coincident or collinear points are refused with
    that tolerance, not with float64's."""
    x0 = as_tensor(x0, "x0")
    d = x0.shape[-1] if x0.ndim == 1 else -1
    dtypes = [as_tensor(x, f"x{i}").dtype for i, x in enumerate((x0, x1, x2))]
    eps = max(torch.finfo(t).eps if t.is_floating_point else 0.0 for t in dtypes)
    x0, x1, x2 = (input_point(x, d, f"x{i}") for i, x in enumerate((x0, x1, x2)))
    noise = _COLLINEAR_ULPS * eps * max(float(x0.norm() + x1.norm() + x2.norm()), 1e-300)
    e1 = x1 - x0
    n1 = float(e1.norm())
    if n1 <= max(noise, 1e-12 * float(x0.norm())):
        raise ShapeError(f"plane_through: x0 and x1 coincide (|x1 - x0| = {n1:.3g}, rounding noise {noise:.3g})")
    u = e1 / n1
    e2 = x2 - x0
    e2p = e2 - (e2 @ u) * u
    e2p = e2p - (e2p @ u) * u  # second pass: orthogonal to working precision
    n2 = float(e2p.norm())
    if n2 <= max(noise, 1e-10 * max(float(e2.norm()), n1)):
        raise ShapeError(
            f"plane_through: the three points are (nearly) collinear: x2 is {n2:.3g} off the line through x0, x1, "
            f"within rounding noise {noise:.3g} of {dtypes[0]} points"
        )
    v = e2p / n2
    coords = np.array([[0.0, 0.0], [n1, 0.0], [float(e2 @ u), n2]])
    return Plane(x0, u, v, coords)


@dataclass(frozen=True, eq=False)
class Slice2D:
    """The exact partition of a box in the plane origin + a*u + b*v.

    polygons: list of R convex polygons [V, 2] in (a, b), counter-clockwise; masks: bool [R, d_sae]
    active latents; signs: bool [R, d_sae] (topk_abs: score > 0 on the active latents) or None;
    `plane_maps(rows)` gives the affine maps restricted to the plane, `affine_map(r)` the full ones.
    """

    polygons: list
    masks: torch.Tensor
    signs: torch.Tensor | None
    bounds: tuple
    diagram: PowerDiagram
    sae: SAE
    origin: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    def __len__(self) -> int:
        return len(self.polygons)

    @property
    def areas(self) -> np.ndarray:
        """float64 [R]: the polygons' areas (shoelace, `polygons.polygon_areas`)."""
        if not self.polygons:
            return np.zeros(0)
        n = np.array([len(p) for p in self.polygons])
        verts = np.zeros((len(n), int(n.max()), 2))
        for i, p in enumerate(self.polygons):
            verts[i, : len(p)] = p
            verts[i, len(p) :] = p[0]
        return polygon_areas(verts, n)

    def area_error(self) -> float:
        """|sum of polygon areas - box area| / box area (float64 rounding and dropped slivers only: a cell
        dropped as thinner than rounding shows here, it is not hidden)."""
        x0, x1, y0, y1 = self.bounds
        box = (x1 - x0) * (y1 - y0)
        return abs(float(self.areas.sum()) - box) / box

    def regions_at(self, points_ab) -> np.ndarray:
        """int64 [N]: index of the polygon containing each (a, b) point; -1 outside the box (or in a sliver
        dropped as rounding). Exact: the point's cell key is computed, not a point-in-polygon test."""
        P = np.asarray(points_ab, dtype=np.float64)
        if P.ndim != 2 or P.shape[1] != 2:
            raise ShapeError(f"points_ab must have shape [N, 2], got {P.shape}")
        x0, x1, y0, y1 = self.bounds
        inside = (P[:, 0] >= x0) & (P[:, 0] <= x1) & (P[:, 1] >= y0) & (P[:, 1] <= y1)
        out = np.full(P.shape[0], -1, dtype=np.int64)
        if not inside.any() or not len(self.polygons):
            return out
        pk = self.diagram._key_rows(P[inside])
        ck = self._cell_rows()
        allk = np.concatenate([ck, pk])
        _, inv = np.unique(allk, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        lut = np.full(inv.max() + 1, -1, dtype=np.int64)
        lut[inv[: len(ck)]] = np.arange(len(ck))
        out[inside] = lut[inv[len(ck) :]]
        return out

    def _cell_rows(self) -> np.ndarray:
        """Per polygon the same key row that `PowerDiagram._key_rows` gives its points."""
        d = self.diagram
        m = d.n_sites
        if d.null_site and d.order == m:
            return np.packbits(self.masks.numpy(), axis=1)
        if d.signed_pairs:
            mk, sg = self.masks.numpy(), self.signs.numpy().astype(np.int64)
            rows = np.empty((len(mk), d.order), dtype=np.int64)
            for r in range(len(mk)):
                idx = np.flatnonzero(mk[r])
                rows[r] = np.sort(signed_site(idx, sg[r, idx]))
            return rows
        rows = np.full((len(self.polygons), d.order), m, dtype=np.int64)
        for r, mk in enumerate(self.masks.numpy()):
            idx = np.flatnonzero(mk)
            rows[r, : len(idx)] = idx
        return rows

    @torch.no_grad()
    def plane_maps(self, rows=None) -> torch.Tensor:
        """float64 [R', 3, d_in]: sae(origin + a u + b v) = a M[0] + b M[1] + M[2] on each region
        (all regions, or those in `rows`); computed on demand (R * 3 * d_in floats)."""
        masks = self.masks if rows is None else self.masks[torch.as_tensor(rows, dtype=torch.long)]
        W, b = self.sae.encoder_affine()
        W, b = W.detach().cpu().double(), b.detach().cpu().double()
        W2a, W2b, b2 = self.u @ W, self.v @ W, self.origin @ W + b
        Wd = self.sae.W_dec.detach().cpu().double()
        S = masks.double()
        bd = self.sae.b_dec.detach().cpu().double()
        return torch.stack([(S * W2a) @ Wd, (S * W2b) @ Wd, (S * b2) @ Wd + bd], 1)

    def affine_map(self, r: int):
        """The full affine piece (A [d_in, d_in], c [d_in]) of region r (`geometry.affine_map`)."""
        return affine_map(self.sae, self.masks[r].to(self.sae.device))

    def to_input(self, ab) -> torch.Tensor:
        """(a, b) points [N, 2] -> inputs [N, d_in] (float64)."""
        ab = torch.as_tensor(np.asarray(ab, dtype=np.float64))
        return self.origin + ab[:, :1] * self.u + ab[:, 1:] * self.v


    def adjacency(self):
        """The region adjacency graph: `adjacency.SliceAdjacency` (edges between regions that share a boundary
        segment, each labelled with the latents that flip, enter or leave across it)."""
        from splinterp.geometry.adjacency import slice_adjacency

        return slice_adjacency(self)


@takes_sae
@torch.no_grad()
def slice_2d(
    sae: SAE,
    origin,
    u=None,
    v=None,
    bounds=None,
    *,
    area_tol: float | None = None,
    max_cells: int = 250_000,
) -> Slice2D:
    """The exact regions of `sae` on the plane origin + a*u + b*v, (a, b) in the box
    (amin, amax, bmin, bmax).

    `slice_2d(sae, plane)` takes a `Plane` (from `plane_through`), with bounds `plane.bounds()` unless
    given; `slice_2d(sae, origin, u, v, bounds)` takes the vectors (u and v need not be orthonormal), with
    bounds (-1, 1, -1, 1) unless given. Geometry is float64 whatever the SAE's dtype. No region is dropped for
    being small (only slivers thinner than 1e-11 of the box, which are rounding; `area_tol` drops small cells
    on request). Raises TooLargeError past max_cells cells summed over the orders computed (predicted before
    the work: exactly 1 + L + I for relu-type SAEs); the masks take regions * d_sae bytes.
    """
    d = sae.cfg.d_in
    if isinstance(origin, Plane):
        if u is not None or v is not None:
            raise ConfigError("slice_2d(sae, plane) takes the plane alone (u and v come from it); give the box by "
                              "keyword: slice_2d(sae, plane, bounds=(amin, amax, bmin, bmax))")
        plane = origin
        origin, u, v = plane.origin, plane.u, plane.v
        bounds = plane.bounds() if bounds is None else bounds
    elif u is None or v is None:
        raise ConfigError("slice_2d needs a Plane, or origin, u and v")
    bounds = check_bounds((-1.0, 1.0, -1.0, 1.0) if bounds is None else bounds)
    o, uu, vv = input_point(origin, d, "origin"), input_point(u, d, "u"), input_point(v, d, "v")
    W, b = sae.encoder_affine()
    W, b = W.detach().cpu().double(), b.detach().cpu().double()
    W2 = torch.stack([uu @ W, vv @ W])  # [2, d_sae]
    b2 = o @ W + b
    x0_, x1_, y0_, y1_ = bounds  # the power form doubles the scores: they must stay finite at the box's corners
    corners = torch.tensor([[x0_, y0_], [x1_, y0_], [x1_, y1_], [x0_, y1_]], dtype=torch.float64)
    check_scores(2.0 * torch.cat([corners @ W2 + b2, W2]), torch.float64, name="the plane's corner")
    th = sae.thresholds()
    arch = sae.cfg.architecture
    pd = diagram_from_affine(W2, b2, arch, sae.cfg.k, None if th is None else th.detach().cpu().double())
    cells = pd.cell_masks(bounds, area_tol=area_tol, max_cells=max_cells)
    signs = None
    if arch == "topk_abs":
        masks, pos = split_signed_mask(cells.masks)
        signs = torch.from_numpy(pos & masks)
        masks_t = torch.from_numpy(masks)
    else:
        masks_t = torch.from_numpy(cells.masks)
    return Slice2D(
        polygons=cells.polygons,
        masks=masks_t,
        signs=signs,
        bounds=bounds,
        diagram=pd,
        sae=sae,
        origin=o,
        u=uu,
        v=vv,
    )
