"""Exact non-emptiness of an activation pattern (a region of any SAE) by linear programming, in any dimension.

A region is an intersection of half-spaces in the scores u(x) = x @ W + b, so "is there an input with
this pattern?" is an LP. Strict inequalities are handled with a margin t: we maximise t subject to

    relu / jumprelu / gated   u_i - theta_i >= t  (i in S),      theta_j - u_j >= t  (j not in S)
    topk (|S| = k)            u_i >= s + t, u_i >= t  (i in S),  u_j <= s - t  (j not in S)
    topk (|S| < k)            u_i >= t  (i in S),                u_j <= -t     (j not in S)
    plain k-set (no ReLU)     u_i >= s + t  (i in S),            u_j <= s - t  (j not in S)
    topk_abs (signs sigma)    sigma_i u_i >= s + t, sigma_i u_i >= t (i in S), |u_j| <= s - t (j not in S)

with one auxiliary level s, so there are O(d_sae) rows (not k * (d_sae - k) pairwise ones). The pattern
has an interior point iff t* > 0. Ties follow the SAE: latents with identical score functions are ranked
by index (the k-th place may cut such a group, whose members then sit at the level s without margin),
and latents with constant scores (zero weights) are decided without the LP.

Numerically: scores are normalised (x centred on the box, scores divided by their largest magnitude),
HiGHS runs with feasibility tolerances 1e-9 and a pattern counts as non-empty iff the normalised margin
t* > tol (default 1e-7, two orders above the solver's tolerance). Patterns realised only on a set of
measure zero (ties: t* = 0) count as empty. t is capped at 1 (normalised) so unbounded cells give a
finite LP; without a box a second LP then finds a witness of smallest infinity
norm among those with margin >= t*/2, so witnesses are deep inside the cell *and* of moderate size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sps
import torch
from scipy.optimize import linprog

from splinterp.errors import ConfigError, NonFiniteError, ShapeError
from splinterp.sae import SAE
from splinterp.validation import as_tensor, check_mask

log = logging.getLogger(__name__)

LP_TOL = 1e-7
_HIGHS = {"primal_feasibility_tolerance": 1e-9, "dual_feasibility_tolerance": 1e-9, "time_limit": 600.0}


def check_box(bounds, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Normalise a box in R^n: None; (lo, hi) scalars (a cube); an array [n, 2]; or, for n = 2,
    (xmin, xmax, ymin, ymax) as in `cells_2d`. Returns (lo [n], hi [n]) float64."""
    if bounds is None:
        return None
    arr = np.asarray(bounds, dtype=np.float64)
    if arr.shape == (2,):
        lo, hi = np.full(n, arr[0]), np.full(n, arr[1])
    elif arr.shape == (n, 2):
        lo, hi = arr[:, 0].copy(), arr[:, 1].copy()
    elif n == 2 and arr.shape == (4,):
        lo, hi = arr[[0, 2]], arr[[1, 3]]
    else:
        raise ShapeError(
            f"bounds must be (lo, hi), an array [n={n}, 2]"
            + (" or (xmin, xmax, ymin, ymax)" if n == 2 else "")
            + f"; got shape {arr.shape}"
        )
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise NonFiniteError("bounds must be finite")
    if not (lo < hi).all():
        raise ConfigError("bounds need lo < hi in every coordinate")
    return lo, hi


@dataclass(frozen=True)
class PatternLP:
    """Result of `pattern_lp`: nonempty, a witness x (float64) or None, and the margin t* in score units
    (the smallest slack of the pattern's strict inequalities at the best point; capped)."""

    nonempty: bool
    witness: np.ndarray | None
    margin: float


def _tie_groups(W: np.ndarray, b: np.ndarray, absolute: bool) -> np.ndarray:
    """int [m]: latents whose ranking scores are the same function share a group (exact duplicates; for
    topk_abs up to a global sign). Ties between them are decided by index, not by geometry."""
    R = np.concatenate([W.T, b[:, None]], 1)
    if absolute:
        first = np.argmax(R != 0, axis=1)
        sgn = np.sign(R[np.arange(len(R)), first])
        R = R * np.where(sgn == 0, 1.0, sgn)[:, None]
    return np.unique(R, axis=0, return_inverse=True)[1].reshape(-1)


def _rows(W: np.ndarray, b: np.ndarray, active: np.ndarray, k, null: bool, theta: np.ndarray, signs):
    """Rows 'sig * u_lat + a_s * s + a_t * t <= kap' of the pattern LP, or None if the pattern is
    impossible without solving anything (counting, ties between identical latents, constant scores)."""
    S = np.flatnonzero(active)
    N = np.flatnonzero(~active)
    const = ~W.any(0)  # a latent with no weights has a constant score: its conditions are checked here
    lat, sig, a_s, a_t, kap = [], [], [], [], []

    def add(idx, sg, s_, t_, kp):
        lat.append(idx)
        sig.append(np.broadcast_to(np.asarray(sg, np.float64), idx.shape))
        a_s.append(np.full(idx.shape, float(s_)))
        a_t.append(np.broadcast_to(np.asarray(t_, np.float64), idx.shape))
        kap.append(np.broadcast_to(np.asarray(kp, np.float64), idx.shape))

    def threshold_rows(S_, N_):  # u_i > theta_i on S_, u_j <= theta_j on N_
        if (b[S_[const[S_]]] <= theta[S_[const[S_]]]).any() or (b[N_[const[N_]]] > theta[N_[const[N_]]]).any():
            return False
        S_, N_ = S_[~const[S_]], N_[~const[N_]]
        add(S_, -1.0, 0, 1, -theta[S_])
        add(N_, 1.0, 0, 1, theta[N_])
        return True

    if k is None or (signs is None and null and len(S) < k):  # threshold rule (TopK with < k active too)
        if not threshold_rows(S, N):
            return None
    else:
        if len(S) > k or ((signs is not None or not null) and len(S) != k):
            return None
        # k-set: S above a level s, the rest below it, margin t on both sides. Identical latents tie and
        # the lower index wins, so S must take a prefix of each tie group; a group cut by the k-th place
        # sits exactly at the level (no margin for its members) and at most one group can be cut.
        grp = _tie_groups(W, b, signs is not None)
        m = len(grp)
        cut = np.zeros(m, dtype=bool)
        if len(np.unique(grp)) < m:
            order = np.lexsort((np.arange(m), grp))
            a, g = active[order], grp[order]
            if ((g[1:] == g[:-1]) & a[1:] & ~a[:-1]).any():
                return None
            n_in = np.bincount(grp, weights=active.astype(np.float64))
            size = np.bincount(grp)
            split = (n_in > 0) & (n_in < size)
            if split.sum() > 1:
                return None
            cut = split[grp]
        margin = np.where(cut, 0.0, 1.0)
        if signs is not None:  # topk_abs: sigma_i u_i >= s + t, sigma_i u_i >= t; -s <= u_j <= s
            sg = signs[S]
            add(S, -sg, 1, margin[S], 0.0)
            add(S, -sg, 0, 1, 0.0)
            add(N, 1.0, -1, margin[N], 0.0)
            add(N, -1.0, -1, margin[N], 0.0)
        else:
            if len(N):
                add(S, -1.0, 1, margin[S], 0.0)
                add(N, 1.0, -1, margin[N], 0.0)
            if null and not threshold_rows(S, np.zeros(0, dtype=np.int64)):
                return None
    if not lat:
        z = np.zeros(0)
        return z.astype(np.int64), z, z, z, z
    return tuple(np.concatenate(v) for v in (lat, sig, a_s, a_t, kap))  # type: ignore[return-value]


def _solve(c, A, ub, bnds):
    res = linprog(
        c, A_ub=A if A.shape[0] else None, b_ub=ub if A.shape[0] else None, bounds=bnds, method="highs", options=_HIGHS
    )
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the pattern LP (status {res.status}): {res.message}")
    return res.x


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
    small_witness: bool = True,
) -> PatternLP:
    """Largest-margin point of the pattern `active` for affine scores u(x) = x @ W + b (W [n, m]).

    Rules: k None -> u_i > theta_i on S only (relu/jumprelu/gated); k with null -> TopK then ReLU
    (theta as the ReLU level, default 0); k without null -> the plain k-set; signs (+1/-1 [m], read on S)
    -> topk_abs. See the module docstring for the LP and its tolerance.
    """
    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n, m = W.shape
    active = np.asarray(active, dtype=bool)
    theta = np.zeros(m) if theta is None else np.asarray(theta, dtype=np.float64)
    if signs is not None:
        signs = np.where(np.asarray(signs, dtype=np.float64) > 0, 1.0, -1.0)
    rows = _rows(W, b, active, k, null, theta, signs)
    if rows is None:
        return PatternLP(False, None, float("-inf"))
    lat, sig, a_s, a_t, kap = rows
    box = check_box(bounds, n)
    if box is None:
        xc, sx = np.zeros(n), 1.0
        zb = [(None, None)] * n
    else:
        lo, hi = box
        xc = (lo + hi) / 2
        sx = float(((hi - lo) / 2).max())
        zb = list(zip((lo - xc) / sx, (hi - xc) / sx))
    bb = b + xc @ W
    Wz = sx * W
    su = float(np.linalg.norm(Wz, axis=0).max() + np.abs(bb).max() + np.abs(theta).max()) if m else 1.0
    su = su if su > 0 else 1.0
    # variables: z [n], s, t
    Ax = (sig[:, None] * Wz.T[lat]) / su
    A = sps.hstack([sps.csr_matrix(Ax), sps.csr_matrix(a_s[:, None]), sps.csr_matrix(a_t[:, None])], format="csr")
    ub = (kap - sig * bb[lat]) / su
    c = np.zeros(n + 2)
    c[-1] = -1.0
    sol = _solve(c, A, ub, zb + [(None, None), (None, 1.0)])
    t_star = float(sol[-1])
    if not t_star > tol:
        return PatternLP(False, None, t_star * su)
    z = sol[:n]
    if box is None and small_witness and n:
        # second LP: smallest |z|_inf with margin >= t*/2 (variables z, s, t, r)
        eye = sps.identity(n, format="csr")
        col = sps.csr_matrix(-np.ones((n, 1)))
        zeros = sps.csr_matrix((n, 2))
        A2 = sps.vstack(
            [
                sps.hstack([A, sps.csr_matrix((A.shape[0], 1))]),
                sps.hstack([eye, zeros, col]),
                sps.hstack([-eye, zeros, col]),
            ],
            format="csr",
        )
        ub2 = np.concatenate([ub, np.zeros(2 * n)])
        c2 = np.zeros(n + 3)
        c2[-1] = 1.0
        try:
            sol2 = _solve(c2, A2, ub2, zb + [(None, None), (min(t_star, 1.0) / 2, 1.0), (0, None)])
            z = sol2[:n]
        except RuntimeError:  # keep the first witness: it is valid, just possibly far out
            log.warning("second (small-witness) LP failed; returning the first LP's witness")
    return PatternLP(True, xc + sx * z, t_star * su)


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


@torch.no_grad()
def region_is_nonempty(sae: SAE, mask, signs=None, bounds=None, *, tol: float = LP_TOL, return_margin: bool = False):
    """Does any input produce the activation pattern `mask` (bool [d_sae])? -> (bool, witness x or None).

    Exact LP over the SAE's affine scores (`encoder_affine`), any architecture, any d_in. topk: the
    active latents must be the top-k and positive (fewer than k active means all others are <= 0);
    topk_abs: pass `signs` ([d_sae] bool or +-1, read on the active latents): a topk_abs region is a set
    *and* the signs of its scores. `bounds` restricts the search to a box (see `check_box`). The witness
    (a tensor in the SAE's dtype and device) has the largest margin the LP finds; it is checked with
    `sae.select(sae.pre_acts(x))` and a warning is logged if rounding in the SAE's dtype breaks it. With
    `return_margin`, a third value gives the margin in score units.
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
    W, b = sae.encoder_affine()
    W = W.detach().double().cpu().numpy()
    b = b.detach().double().cpu().numpy()
    th = sae.thresholds()
    theta = None if th is None else th.detach().double().cpu().numpy()
    m_np = mask.detach().cpu().numpy()
    if arch in ("relu", "jumprelu", "gated"):
        res = pattern_lp(W, b, m_np, theta=theta, bounds=bounds, tol=tol)
    elif arch == "topk":
        res = pattern_lp(W, b, m_np, k=sae.cfg.k, null=True, bounds=bounds, tol=tol)
    else:
        res = pattern_lp(W, b, m_np, k=sae.cfg.k, null=False, signs=sg, bounds=bounds, tol=tol)
    x = None
    if res.nonempty:
        x = torch.as_tensor(res.witness, dtype=sae.dtype, device=sae.device)
        u = sae.pre_acts(x[None])
        got = sae.select(u, x[None])[0].cpu()
        ok = torch.equal(got, mask.cpu())
        if ok and sg is not None:
            ok = bool(((u[0].cpu().double().numpy() > 0) == (sg > 0))[m_np].all())
        if not ok:
            log.warning(
                "LP witness (margin %.3g) does not reproduce the pattern in %s arithmetic", res.margin, sae.dtype
            )
    return (res.nonempty, x, res.margin) if return_margin else (res.nonempty, x)
