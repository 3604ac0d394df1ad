"""Exact 2-D slices of an SAE's partition: the regions met by a plane origin + a*u + b*v in input space.

On the plane the scores are affine in (a, b):

    u(a, b) = (origin + a u + b v) @ W + b_enc = [a, b] @ [u @ W; v @ W] + (origin @ W + b_enc),

so the restricted SAE is an SAE-like spline in 2-D with the same selection rule, and its partition is the
2-D power diagram of the projected sites (`diagram_from_affine`): for topk the order-k diagram split by
the ReLU null site, for relu/jumprelu/gated the line arrangement {u_i = theta_i}, for topk_abs the
order-k diagram of 2 d_sae signed sites. `slice_2d` returns every region's exact polygon (in (a, b)
coordinates), its active set and its affine map restricted to the plane.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splinterp.errors import DTypeError, ShapeError
from splinterp.geometry import cells2d
from splinterp.geometry.power import PowerDiagram, diagram_from_affine
from splinterp.geometry.regions import affine_map
from splinterp.sae import SAE
from splinterp.validation import as_tensor, check_finite


def _vec(x, d: int, name: str) -> torch.Tensor:
    t = as_tensor(x, name)
    if t.ndim != 1 or t.shape[0] != d:
        raise ShapeError(f"{name} must have shape [d_in={d}], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise DTypeError(f"{name} must be floating point, got {t.dtype}")
    check_finite(t, name)
    return t.detach().cpu().double()


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
        lo, hi = self.coords.min(0), self.coords.max(0)
        pad = margin * float((hi - lo).max())
        return (lo[0] - pad, hi[0] + pad, lo[1] - pad, hi[1] + pad)


def plane_through(x0, x1, x2) -> Plane:
    """The plane through three inputs: origin x0, u along x1 - x0, v the Gram-Schmidt rest of x2 - x0."""
    x0 = as_tensor(x0, "x0")
    d = x0.shape[-1] if x0.ndim == 1 else -1
    x0, x1, x2 = (_vec(x, d, f"x{i}") for i, x in enumerate((x0, x1, x2)))
    e1 = x1 - x0
    n1 = float(e1.norm())
    scale = max(float(x0.abs().max()), float(x1.abs().max()), float(x2.abs().max()), 1e-300)
    if n1 <= 1e-12 * scale:
        raise ShapeError("plane_through: x0 and x1 coincide")
    u = e1 / n1
    e2 = x2 - x0
    e2p = e2 - (e2 @ u) * u
    e2p = e2p - (e2p @ u) * u  # second pass: orthogonal to working precision
    n2 = float(e2p.norm())
    if n2 <= 1e-10 * max(float(e2.norm()), n1):
        raise ShapeError("plane_through: the three points are (nearly) collinear")
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
        return np.array(
            [
                0.5 * float(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(np.roll(p[:, 0], -1), p[:, 1]))
                for p in self.polygons
            ]
        )

    def area_error(self) -> float:
        """|sum of polygon areas - box area| / box area (float64 rounding and dropped slivers only)."""
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
                rows[r] = np.sort(idx * 2 + sg[r, idx])  # site 2i+1 = positive score
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


@torch.no_grad()
def slice_2d(
    sae: SAE, origin, u, v, bounds=(-1.0, 1.0, -1.0, 1.0), *, area_tol: float | None = None, max_cells: int = 250_000
) -> Slice2D:
    """The exact regions of `sae` on the plane origin + a*u + b*v, (a, b) in the box
    (amin, amax, bmin, bmax). u and v need not be orthonormal (use `plane_through` for a plane through
    three inputs). Geometry is float64 whatever the SAE's dtype. Raises ConfigError past max_cells regions
    (the masks alone take regions * d_sae bytes; relu-type slices are counted before any work is done)."""
    d = sae.cfg.d_in
    o, uu, vv = _vec(origin, d, "origin"), _vec(u, d, "u"), _vec(v, d, "v")
    bounds = cells2d.check_bounds(bounds)
    W, b = sae.encoder_affine()
    W, b = W.detach().cpu().double(), b.detach().cpu().double()
    W2 = torch.stack([uu @ W, vv @ W])  # [2, d_sae]
    b2 = o @ W + b
    th = sae.thresholds()
    arch = sae.cfg.architecture
    pd = diagram_from_affine(W2, b2, arch, sae.cfg.k, None if th is None else th.detach().cpu().double())
    cells = pd.cells_2d(bounds, area_tol=area_tol, max_cells=max_cells)
    d_sae = sae.cfg.d_sae
    masks = np.zeros((len(cells), d_sae), dtype=bool)
    signs = None
    if arch == "topk_abs":
        signs = np.zeros((len(cells), d_sae), dtype=bool)
        for r, c in enumerate(cells):
            s = np.asarray(c.key, dtype=np.int64)
            masks[r, s // 2] = True
            signs[r, s // 2] = (s % 2) == 1
    else:
        for r, c in enumerate(cells):
            masks[r, list(c.key)] = True
    masks_t = torch.from_numpy(masks)
    return Slice2D(
        polygons=[c.vertices for c in cells],
        masks=masks_t,
        signs=None if signs is None else torch.from_numpy(signs),
        bounds=bounds,
        diagram=pd,
        sae=sae,
        origin=o,
        u=uu,
        v=vv,
    )
