"""Exact non-emptiness of an activation pattern (a region of any SAE) by linear programming, in any dimension.

A region is an intersection of half-spaces (`halfspaces`: threshold hyperplanes, and for TopK the bisectors
between active and inactive latents), so "is there an input with this pattern?" is an LP. The answer is
geometric: the LP finds the region's Chebyshev ball, the largest ball inside it (and inside the box, when one
is given). With every constraint row-normalised, a_i . x + r |a_i| <= c_i, the radius r is a distance in input
space, so a region is judged by its size, not by how large its scores happen to be.

TopK regions are bounded by up to k (d_sae - k) bisectors. The LP starts with a few per latent and adds those
its solution violates (cutting planes) until none is; the last solution is then optimal for all of them.

What the answers mean (margin = the radius, in input units):
- True: the witness (the ball's centre) has slack >= its margin on every hyperplane of the pattern, recomputed
  exactly in float64 from all of them; `region_is_nonempty` also checks it through the SAE's own
  `select(pre_acts(x))` in the SAE's dtype. A witness that fails a check is never reported as True: that is a
  `PrecisionError` (e.g. a float16 SAE whose rounding is coarser than the region).
- False: no ball of radius above tol * scale fits (tol = 1e-8 by default, ten times the LP's resolution; scale = the
  box's half-side, or without a box the largest distance of a constraint hyperplane from the origin). The
  region is empty, has no interior (only ties), or is thinner than that. Patterns that are impossible by
  counting or by a constant condition (a latent with no weights, identical latents ranked against the tie
  rule) are False with margin -inf.
Without a box, regions are often unbounded cones: the radius is capped at the scale, and among the largest
balls the one whose centre has the smallest infinity norm is taken, so witnesses stay of moderate size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linprog

from splinterp.errors import ConfigError, PrecisionError, ShapeError
from splinterp.geometry.checks import check_box, check_nonneg_float, takes_sae
from splinterp.geometry.halfspaces import (
    Pattern,
    SiteForm,
    constant_violations,
    hyperplanes_within,
    mask_patterns,
    site_form,
)
from splinterp.geometry.scores import encoder_f64
from splinterp.sae import SAE
from splinterp.validation import as_tensor, check_mask

__all__ = ["LP_TOL", "PatternLP", "RegionCheck", "RegionCheckWithMargin", "check_box", "pattern_lp",
           "region_is_nonempty"]

LP_TOL = 1e-8
# HiGHS resolves about 1e-9 (tighter tolerances made it stall on 128-D TopK patterns), so a radius counts only
# above 10x that; the time limit turns a stalled solve into an error, never a hang
_HIGHS = {"primal_feasibility_tolerance": 1e-9, "dual_feasibility_tolerance": 1e-9, "time_limit": 120.0}
_PAIRS_DIRECT = 1024  # up to this many bisectors the LP takes them all at once
_INITIAL_PER_SITE = 3  # cutting planes start with this many nearest competitors per selected site
_MAX_ROUNDS = 100
_SMALL = 1e-3  # weight of the witness's infinity norm against the radius (unbounded regions, no box)


@dataclass(frozen=True)
class PatternLP:
    """Result of `pattern_lp`: nonempty, a witness x (float64) or None, and the margin: the radius of the
    largest ball in the region (input units; certified at the witness when nonempty)."""

    nonempty: bool
    witness: np.ndarray | None
    margin: float


class RegionCheck(NamedTuple):
    """`region_is_nonempty`: whether the pattern has interior, and a witness input (None when empty)."""

    nonempty: bool
    witness: torch.Tensor | None


class RegionCheckWithMargin(NamedTuple):
    """`region_is_nonempty(..., return_margin=True)`: as `RegionCheck`, plus the margin (Chebyshev radius)."""

    nonempty: bool
    witness: torch.Tensor | None
    margin: float


# ------------------------------------------------------------------------------------------ patterns
def mask_pattern(form: SiteForm, active: np.ndarray, signs: np.ndarray | None = None) -> Pattern | None:
    """The constraints of the region with latent pattern `active` (bool [m]; topk_abs: and `signs` +-1 [m]),
    or None if the pattern is impossible by counting."""
    pat, possible = mask_patterns(form, active[None], None if signs is None else (signs > 0)[None])
    return pat if possible[0] else None


class _Rows:
    """The fixed (threshold) rows and the working set of pair rows, as a * x < c in input space."""

    def __init__(self, form: SiteForm, pat: Pattern):
        self.form = form
        above, below = pat.above[0], pat.below[0]
        fa = np.flatnonzero(above & (form.norms > 0))
        fb = np.flatnonzero(below & (form.norms > 0))
        self.fixed_a = np.concatenate([-form.A[:, fa].T, form.A[:, fb].T])
        self.fixed_c = np.concatenate([form.c[fa] - form.theta[fa], form.theta[fb] - form.c[fb]])
        self.P = pat.selected[0]
        self.Q = np.flatnonzero(pat.competitor[0])
        self.pairs: set[tuple[int, int]] = set()

    def add_pairs(self, p: np.ndarray, q: np.ndarray) -> int:
        before = len(self.pairs)
        for a, b in zip(p.tolist(), q.tolist()):
            if self.form.norms[a] > 0 or self.form.norms[b] > 0:
                self.pairs.add((a, b))
        return len(self.pairs) - before

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        A, c = self.fixed_a, self.fixed_c
        if self.pairs:
            p, q = (np.array(v) for v in zip(*sorted(self.pairs)))
            pa = (self.form.A[:, q] - self.form.A[:, p]).T
            keep = np.linalg.norm(pa, axis=1) > 0  # identical functions: constant, checked before
            A = np.concatenate([A, pa[keep]])
            c = np.concatenate([c, (self.form.c[p] - self.form.c[q])[keep]])
        return A, c


def _initial_pairs(rows: _Rows, x0: np.ndarray) -> None:
    """All bisectors if there are few; else per selected site its nearest competitors at x0 (by the lower
    bound of their distance), and per competitor its nearest selected site."""
    P, Q, form = rows.P, rows.Q, rows.form
    if len(P) == 0 or len(Q) == 0:
        return
    if len(P) * len(Q) <= _PAIRS_DIRECT:
        rows.add_pairs(np.repeat(P, len(Q)), np.tile(Q, len(P)))
        return
    s = form.scores(x0[None])[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        lb = (s[P][:, None] - s[Q][None, :]) / (form.norms[P][:, None] + form.norms[Q][None, :])
    lb = np.nan_to_num(lb, nan=np.inf)
    t = min(_INITIAL_PER_SITE, len(Q))
    near_q = np.argpartition(lb, t - 1, axis=1)[:, :t]
    rows.add_pairs(np.repeat(P, t), Q[near_q.ravel()])
    rows.add_pairs(P[lb.argmin(0)], Q)


def _solve(c, A, ub, bnds):
    """HiGHS's interior-point method (with crossover): the dual simplex stalled on degenerate Chebyshev LPs of
    trained SAEs (784-D MNIST TopK, pixels of zero variance); the simplex is the fallback."""
    kw = dict(A_ub=A if A.shape[0] else None, b_ub=ub if A.shape[0] else None, bounds=bnds)
    res = linprog(c, method="highs-ipm", options=_HIGHS, **kw)
    if res.status != 0:
        res = linprog(c, method="highs-ds", options=_HIGHS, **kw)
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the pattern LP (status {res.status}): {res.message}")
    return res.x


class _Frame:
    """Normalised coordinates x = xc + sx * z, so that the LP sees numbers of order one."""

    def __init__(self, rows: _Rows, box):
        n = rows.form.A.shape[0]
        if box is not None:
            lo, hi = box
            self.xc, self.sx = (lo + hi) / 2, float(((hi - lo) / 2).max())
            self.zlo, self.zhi = (lo - self.xc) / self.sx, (hi - self.xc) / self.sx
        else:
            A, c = rows.matrix()
            nrm = np.linalg.norm(A, axis=1)
            dist = np.abs(c[nrm > 0]) / nrm[nrm > 0]
            sx = float(dist.max()) if dist.size else 1.0
            self.xc, self.sx = np.zeros(n), sx if np.isfinite(sx) and sx > 0 else 1.0
            self.zlo = self.zhi = None
        self.n = n

    def rows(self, A: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row-normalised rows in z with the radius column: a_hat . z + rho <= c_hat (and the box's)."""
        nrm = np.linalg.norm(A, axis=1)
        Az = A / nrm[:, None]
        cz = (c - A @ self.xc) / (self.sx * nrm)
        Az = np.hstack([Az, np.ones((len(Az), 1))])
        if self.zlo is not None:  # the ball inside the box: z_j + rho <= zhi_j, -z_j + rho <= -zlo_j
            eye = np.eye(self.n)
            one = np.ones((self.n, 1))
            Az = np.vstack([Az, np.hstack([eye, one]), np.hstack([-eye, one])])
            cz = np.concatenate([cz, self.zhi, -self.zlo])
        return Az, cz

    def x(self, z: np.ndarray) -> np.ndarray:
        return self.xc + self.sx * z

    def z_bounds(self):
        if self.zlo is None:
            return [(None, None)] * self.n
        return list(zip(self.zlo, self.zhi))


def _violated(rows: _Rows, pat: Pattern, x: np.ndarray, r: float) -> bool:
    """Add the bisectors that the ball of radius r at x crosses but the working set lacks; True if any."""
    if len(rows.P) == 0 or len(rows.Q) == 0:
        return False
    form = rows.form
    hp = hyperplanes_within(form, form.scores(x[None]), pat, r * (1 - 1e-7))
    pair = hp.b >= 0
    a, b, d = hp.a[pair], hp.b[pair], hp.distance[pair]
    new = np.array([(i, j) not in rows.pairs for i, j in zip(a.tolist(), b.tolist())], dtype=bool)
    if not new.any():
        return False
    a, b, d = a[new], b[new], d[new]
    order = np.argsort(d, kind="stable")
    a, b = a[order], b[order]
    _, fa = np.unique(a, return_index=True)  # the most violated per selected site and per competitor
    _, fb = np.unique(b, return_index=True)
    pick = np.union1d(fa, fb)
    rows.add_pairs(a[pick], b[pick])
    return True


def _certified_radius(rows: _Rows, pat: Pattern, frame: _Frame, x: np.ndarray, r: float) -> float:
    """The smallest slack at x over every hyperplane of the pattern (and the box), computed exactly."""
    form = rows.form
    hp = hyperplanes_within(form, form.scores(x[None]), pat, max(2 * r, 0.0))
    d = float(hp.distance.min()) if len(hp.distance) else 2 * r
    if frame.zlo is not None:
        lo, hi = frame.xc + frame.sx * frame.zlo, frame.xc + frame.sx * frame.zhi
        d = min(d, float((x - lo).min()), float((hi - x).min()))
    return d


def _chebyshev(rows: _Rows, pat: Pattern, frame: _Frame):
    """Cutting-plane loop for the largest ball -> (x, r). Without a box the radius is capped at the scale
    (rho <= 1) and, among the balls of the largest radius, the centre of smallest infinity norm is taken
    (objective -rho + _SMALL * max_j |z_j|): a well-defined optimum near the origin, which also makes the
    cutting planes settle fast (an unbounded cone has no unique centre)."""
    n = frame.n
    for _ in range(_MAX_ROUNDS):
        Az, cz = frame.rows(*rows.matrix())
        if frame.zlo is not None:
            c = np.zeros(n + 1)
            c[-1] = -1.0
            sol = _solve(c, Az, cz, frame.z_bounds() + [(None, 1.0)])
        else:  # variables z, rho, t with -t <= z_j <= t
            A2 = np.vstack([
                np.hstack([Az, np.zeros((len(Az), 1))]),
                np.hstack([np.eye(n), np.zeros((n, 1)), -np.ones((n, 1))]),
                np.hstack([-np.eye(n), np.zeros((n, 1)), -np.ones((n, 1))]),
            ])
            c = np.zeros(n + 2)
            c[-2], c[-1] = -1.0, _SMALL
            sol = _solve(c, A2, np.concatenate([cz, np.zeros(2 * n)]), frame.z_bounds() + [(None, 1.0), (0, None)])
        z, rho = sol[:n], float(sol[n])
        x = frame.x(z)
        r = frame.sx * rho
        if rho <= 0 or not _violated(rows, pat, x, r):
            return x, r
    raise PrecisionError(f"the pattern LP did not settle after {_MAX_ROUNDS} rounds of cutting planes")


def solve_pattern(form: SiteForm, pat: Pattern, bounds=None, tol: float = LP_TOL) -> PatternLP:
    """The LP of the module docstring for one pattern of `form`'s sites."""
    if bool(constant_violations(form, pat)[0]):
        return PatternLP(False, None, float("-inf"))
    n = form.A.shape[0]
    rows = _Rows(form, pat)
    box = check_box(bounds, n)
    x0 = np.zeros(n) if box is None else (box[0] + box[1]) / 2
    _initial_pairs(rows, x0)
    frame = _Frame(rows, box)
    x, r = _chebyshev(rows, pat, frame)
    if not r > tol * frame.sx:
        return PatternLP(False, None, r)
    cert = _certified_radius(rows, pat, frame, x, r)
    if not cert >= 0.5 * r:
        raise PrecisionError(f"LP witness with radius {r:.3g} has slack {cert:.3g} on a constraint (rounding)")
    return PatternLP(True, x, cert)


def pattern_lp(
    W,
    b,
    active,
    *,
    k: int | None = None,
    null: bool = True,
    theta=None,
    signs=None,
    bounds=None,
    tol: float = LP_TOL,
) -> PatternLP:
    """Largest ball (Chebyshev centre and radius) of the pattern `active` for affine scores u = x @ W + b.

    Rules: k None -> u_i > theta_i on S only (relu/jumprelu/gated); k with null -> TopK then ReLU; k without
    null -> the plain k-set; signs (+1/-1 [m], read on S) -> topk_abs. See the module docstring.
    """
    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    active = np.asarray(active, dtype=bool)
    tol = check_nonneg_float(tol, "tol")
    if signs is not None:
        arch = "topk_abs"
        signs = np.where(np.asarray(signs, dtype=np.float64) > 0, 1.0, -1.0)
    elif k is None:
        arch = "jumprelu"
    else:
        arch = "topk" if null else "kset"
    form = site_form(W, b, arch, k, theta)
    pat = mask_pattern(form, active, signs)
    if pat is None:
        return PatternLP(False, None, float("-inf"))
    return solve_pattern(form, pat, bounds, tol)


# ----------------------------------------------------------------------------------------------- SAEs
def _latent_signs(signs, d_sae: int) -> np.ndarray:
    s = as_tensor(signs, "signs")
    if s.ndim != 1 or s.shape[0] != d_sae:
        raise ShapeError(f"signs must have shape [d_sae={d_sae}], got {tuple(s.shape)}")
    s = s.detach().cpu()
    if s.dtype == torch.bool:
        return np.where(s.numpy(), 1.0, -1.0)
    v = s.double().numpy()
    if not np.isin(v, (-1.0, 1.0)).all():
        raise ConfigError("signs must be bool (True = positive score) or +-1")
    return v


@takes_sae
@torch.no_grad()
def region_is_nonempty(sae: SAE, mask, signs=None, bounds=None, *, tol: float = LP_TOL, return_margin: bool = False):
    """Does any input produce the activation pattern `mask` (bool [d_sae])? -> RegionCheck(nonempty, witness).

    Exact LP over the SAE's affine scores (`encoder_affine`), any architecture, any d_in. topk: the active
    latents must be the top-k and positive (fewer than k active means all others are <= 0); topk_abs: pass
    `signs` ([d_sae] bool or +-1, read on the active latents): a topk_abs region is a set *and* the signs of
    its scores. `bounds` restricts the search to a box (see `checks.check_box`). The witness (a tensor in
    the SAE's dtype and device) is the centre of the largest ball in the region; it is checked with
    `sae.select(sae.pre_acts(x))`, and a witness that fails is a PrecisionError, never True. With
    `return_margin`, a third field gives the ball's radius (input units; see the module docstring).
    """
    arch = sae.cfg.architecture
    mask = check_mask(mask, sae.cfg.d_sae)
    if mask.ndim != 1:
        raise ShapeError("region_is_nonempty takes one mask [d_sae]")
    if arch == "topk_abs":
        if signs is None:
            raise ConfigError("topk_abs regions are an active set plus the signs of its scores: pass signs")
        sg = _latent_signs(signs, sae.cfg.d_sae)
    elif signs is not None:
        raise ConfigError(f"signs are only meaningful for topk_abs, not {arch!r}")
    else:
        sg = None
    enc = encoder_f64(sae)
    m_np = mask.detach().cpu().numpy()
    if arch in ("relu", "jumprelu", "gated"):
        res = pattern_lp(enc.W, enc.b, m_np, theta=enc.theta, bounds=bounds, tol=tol)
    elif arch == "topk":
        res = pattern_lp(enc.W, enc.b, m_np, k=sae.cfg.k, null=True, bounds=bounds, tol=tol)
    else:
        res = pattern_lp(enc.W, enc.b, m_np, k=sae.cfg.k, null=False, signs=sg, bounds=bounds, tol=tol)
    x = None
    if res.nonempty:
        x = torch.as_tensor(res.witness, dtype=sae.dtype, device=sae.device)
        u = sae.pre_acts(x[None])
        got = sae.select(u, x[None])[0].cpu()
        ok = torch.equal(got, mask.cpu())
        if ok and sg is not None:
            ok = bool(((u[0].cpu().double().numpy() > 0) == (sg > 0))[m_np].all())
        if not ok:
            raise PrecisionError(
                f"the pattern has a ball of radius {res.margin:.3g} in exact arithmetic, but its centre rounded to "
                f"{sae.dtype} lands in another region: the region is too thin for {sae.dtype}; use sae.double()"
            )
    if return_margin:
        return RegionCheckWithMargin(res.nonempty, x, res.margin)
    return RegionCheck(res.nonempty, x)
