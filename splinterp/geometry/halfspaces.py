"""A region of a one-layer SAE as an intersection of half-spaces, and the hyperplanes of it near a point.

Every architecture ranks or thresholds affine *site* scores s_a(x) = x @ A[:, a] + c_a:
- relu / jumprelu / gated: sites = latents, rule s_a > theta_a. The region of an active set S is
  {s_a > theta_a for a in S, s_a < theta_a otherwise}: one hyperplane per latent.
- topk (TopK, then ReLU): sites = latents. With all k selected latents positive (|S| = k) the region is
  {s_p > s_q for p in S, q not in S} and {s_p > 0 for p in S}: the bisectors between an active and an
  inactive latent, and the null-site (ReLU) hyperplanes of the active ones. With |S| < k every positive
  latent is active, and the region is the threshold region above with theta = 0.
- topk_abs: sites = 2 d_sae signed latents (`signed_sites`); S is k signed sites, and the region is
  {s_p > s_q for p in S, q a signed site of a latent not in S} and {s_p > 0 for p in S}.
- a plain k-set of a power diagram (no null site): the bisectors only.
Ties between identical score functions follow the SAE (the lower index wins), so such pairs are constant
conditions, not hyperplanes.

Since a region is the intersection of these half-spaces, the distance from an interior point to the
region's boundary is the smallest distance to one of the hyperplanes (a redundant one is never closer than
the boundary). `hyperplanes_within` lists those within a radius, exactly: pairs are pruned with the lower
bound (s_p - s_q) / (|A_p| + |A_q|) <= (s_p - s_q) / |A_p - A_q| and only the survivors get their exact norm.
It serves `boundary_distance` (the nearest), `local_complexity` (all within r) and the LP (its constraints
and the certificate of its witness).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from splinterp.errors import ConfigError
from splinterp.geometry.signed_sites import signed_site, site_latent, site_positive
from splinterp.sae import topk_indices

_CHUNK_ELEMS = 1 << 22


class SiteForm(NamedTuple):
    """Site scores s(x) = x @ A + c (A [n, M]), thresholds theta [M], the column norms of A, the latent of each
    site, the ranking depth k (None: threshold rule) and whether the sites are signed (topk_abs)."""

    A: np.ndarray
    c: np.ndarray
    theta: np.ndarray
    norms: np.ndarray
    latent: np.ndarray
    k: int | None
    signed: bool
    null: bool

    @property
    def n_sites(self) -> int:
        return self.A.shape[1]

    def scores(self, X: np.ndarray) -> np.ndarray:
        return X @ self.A + self.c


def site_form(W, b, architecture: str, k: int | None = None, theta=None) -> SiteForm:
    """The sites of scores u = x @ W + b under an SAE rule (`architecture`, or "kset" for a plain k-set)."""
    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    m = W.shape[1]
    if architecture == "topk_abs":
        sites = np.arange(2 * m)
        lat = site_latent(sites)
        sign = np.where(site_positive(sites), 1.0, -1.0)
        A, c = W[:, lat] * sign, b[lat] * sign
        th = np.zeros(2 * m)
        signed = True
    else:
        A, c, lat, signed = W, b, np.arange(m), False
        th = np.zeros(m) if theta is None else np.asarray(theta, dtype=np.float64)
    if architecture in ("relu", "jumprelu", "gated"):
        kk, null = None, True
    elif architecture in ("topk", "topk_abs", "kset"):
        if k is None:
            raise ConfigError(f"{architecture} needs k")
        kk, null = int(k), architecture == "topk"
    else:
        raise ConfigError(f"unknown architecture {architecture!r}")
    return SiteForm(A, c, th, np.linalg.norm(A, axis=0), lat, kk, signed, null)


class Pattern(NamedTuple):
    """What a region requires, per row: `selected` sites [B, k'] must each beat every `competitor` [B, M]
    site; `above` sites must have s > theta, `below` sites s < theta (bool [B, M])."""

    selected: np.ndarray
    competitor: np.ndarray
    above: np.ndarray
    below: np.ndarray


def point_patterns(form: SiteForm, S: np.ndarray) -> Pattern:
    """The pattern of the region each row of site scores S [B, M] lies in (ties: lower index first)."""
    B, M = S.shape
    none = np.zeros((B, M), dtype=bool)
    if form.k is None:
        above = S > form.theta
        return Pattern(np.zeros((B, 0), dtype=np.int64), none, above, ~above)
    sel = topk_indices(torch.from_numpy(S), form.k).numpy()
    selmask = np.zeros((B, M), dtype=bool)
    np.put_along_axis(selmask, sel, True, axis=1)
    if form.signed:
        taken = np.zeros((B, M // 2), dtype=bool)
        np.put_along_axis(taken, site_latent(sel), True, axis=1)
        return Pattern(sel, ~taken[:, form.latent], selmask, none)
    if not form.null:
        return Pattern(sel, ~selmask, none, none)
    full = (np.take_along_axis(S, sel, 1) > 0).all(1)
    pos = S > 0
    competitor = np.where(full[:, None], ~selmask, False)
    above = np.where(full[:, None], selmask, pos)
    below = np.where(full[:, None], False, ~pos)
    return Pattern(sel, competitor, above, below)


def mask_patterns(form: SiteForm, masks: np.ndarray, signs: np.ndarray | None = None) -> tuple[Pattern, np.ndarray]:
    """The patterns of regions given by latent masks bool [B, m] (topk_abs: and signs bool [B, m], True =
    positive) -> (Pattern, possible bool [B]); impossible rows (wrong size for the rule) get empty patterns."""
    masks = np.asarray(masks, dtype=bool)
    B, m = masks.shape
    M = form.n_sites
    size = masks.sum(1)
    none = np.zeros((B, M), dtype=bool)
    if form.k is None:
        return Pattern(np.zeros((B, 0), dtype=np.int64), none, masks.copy(), ~masks), np.ones(B, dtype=bool)
    k = form.k
    possible = size == k if (form.signed or not form.null) else size <= k
    full = possible & (size == k)
    sel = np.zeros((B, k), dtype=np.int64)
    rows, cols = np.nonzero(masks & full[:, None])
    slot = np.arange(len(rows)) - np.repeat(np.cumsum(np.bincount(rows, minlength=B)) - np.bincount(rows, minlength=B),
                                            np.bincount(rows, minlength=B))
    if form.signed:
        pos = np.asarray(signs, dtype=bool)[rows, cols]
        sel[rows, slot] = signed_site(cols, pos.astype(np.int64))
        selmask = np.zeros((B, M), dtype=bool)
        selmask[rows, sel[rows, slot]] = True
        competitor = np.where(full[:, None], ~masks[:, form.latent], False)
        return Pattern(sel, competitor, selmask, none), possible
    sel[rows, slot] = cols
    competitor = np.where(full[:, None], ~masks, False)
    if not form.null:
        return Pattern(sel, competitor, none, none), possible
    above = np.where(possible[:, None], masks, False)
    below = np.where(possible[:, None] & ~full[:, None], ~masks, False)
    return Pattern(sel, competitor, above, below), possible


class Hyperplanes(NamedTuple):
    """Hyperplanes of rows' regions: row [E], site a [E] (the selected site of a pair, or the site of a
    threshold row), site b [E] (the competitor of a pair, -1 for a threshold row), signed distance [E]
    (> 0 when the point satisfies the constraint)."""

    row: np.ndarray
    a: np.ndarray
    b: np.ndarray
    distance: np.ndarray


def constant_violations(form: SiteForm, pat: Pattern) -> np.ndarray:
    """bool [B]: rows whose pattern breaks a constant condition (a site with no weights on the wrong side of
    its threshold, or two identical score functions ranked against the tie rule)."""
    flat = form.norms == 0
    bad = ((pat.above & flat) & ~(form.c > form.theta)).any(1) | ((pat.below & flat) & (form.c > form.theta)).any(1)
    if pat.selected.shape[1] and pat.competitor.any():
        for r in np.flatnonzero(pat.competitor.any(1)):
            P = pat.selected[r]
            Q = np.flatnonzero(pat.competitor[r])
            same = _identical_pairs(form, P, Q)
            if same[0].size:
                p, q = P[same[0]], Q[same[1]]
                diff = form.c[p] - form.c[q]
                bad[r] |= bool(((diff < 0) | ((diff == 0) & (q < p))).any())
    return bad


def _identical_pairs(form: SiteForm, P: np.ndarray, Q: np.ndarray):
    """(i, j) positions with A[:, P[i]] == A[:, Q[j]] exactly (constant score difference)."""
    if P.size == 0 or Q.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    keyP = np.ascontiguousarray(form.A[:, P].T)
    keyQ = np.ascontiguousarray(form.A[:, Q].T)
    allk = np.concatenate([keyP, keyQ])
    _, inv = np.unique(allk, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    ip, iq = inv[: len(P)], inv[len(P) :]
    order = np.argsort(iq, kind="stable")
    lo = np.searchsorted(iq[order], ip, side="left")
    hi = np.searchsorted(iq[order], ip, side="right")
    cnt = hi - lo
    i = np.repeat(np.arange(len(P)), cnt)
    j = order[np.repeat(lo - np.concatenate([[0], np.cumsum(cnt)[:-1]]), cnt) + np.arange(int(cnt.sum()))]
    return i, j


def hyperplanes_within(form: SiteForm, S: np.ndarray, pat: Pattern, radius) -> Hyperplanes:
    """Every hyperplane of each row's region at distance < radius[row] from the point whose site scores are
    S [B, M] (violated ones have negative distance and are always listed). Pairs of identical score
    functions are constant conditions and are skipped (see `constant_violations`)."""
    B, M = S.shape
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (B,))
    rows, sa, sb, dist = [], [], [], []
    # threshold rows
    gap = S - form.theta
    with np.errstate(divide="ignore", invalid="ignore"):
        d_thr = np.where(pat.above, gap, -gap) / form.norms
    near = (pat.above | pat.below) & (form.norms > 0) & (d_thr < radius[:, None])
    r_, a_ = np.nonzero(near)
    rows.append(r_)
    sa.append(a_)
    sb.append(np.full(len(r_), -1, dtype=np.int64))
    dist.append(d_thr[r_, a_])
    # pairs, pruned by the lower bound, exact norms for the survivors
    k = pat.selected.shape[1]
    if k and pat.competitor.any():
        step = max(1, _CHUNK_ELEMS // max(k * M, 1))
        for s in range(0, B, step):
            sl = slice(s, min(s + step, B))
            sel = pat.selected[sl]
            Ss = S[sl]
            top = np.take_along_axis(Ss, sel, 1)  # [b, k]
            num = top[:, :, None] - Ss[:, None, :]
            den = form.norms[sel][:, :, None] + form.norms[None, None, :]
            with np.errstate(divide="ignore", invalid="ignore"):
                lb = num / den
            cand = pat.competitor[sl][:, None, :] & (lb < radius[sl, None, None])
            bi, pi, qj = np.nonzero(cand)
            if bi.size == 0:
                continue
            p = sel[bi, pi]
            nrm = _pair_norms(form.A, p, qj)
            ok = nrm > 0
            d = num[bi, pi, qj][ok] / nrm[ok]
            keep = d < radius[sl][bi[ok]]
            rows.append(bi[ok][keep] + s)
            sa.append(p[ok][keep])
            sb.append(qj[ok][keep])
            dist.append(d[keep])
    return Hyperplanes(*(np.concatenate(v) for v in (rows, sa, sb, dist)))


def _pair_norms(A: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """|A[:, p] - A[:, q]| for each pair, computed from the difference (no Gram cancellation), chunked."""
    out = np.empty(len(p))
    step = max(1, _CHUNK_ELEMS // max(A.shape[0], 1))
    At = A.T
    for s in range(0, len(p), step):
        out[s : s + step] = np.linalg.norm(At[p[s : s + step]] - At[q[s : s + step]], axis=1)
    return out


def nearest_hyperplane(form: SiteForm, S: np.ndarray, pat: Pattern) -> Hyperplanes:
    """Per row the nearest hyperplane of its region (one entry per row; distance inf and a = b = -1 if the
    region has none, e.g. a constant SAE). The search radius starts at an upper bound from the threshold rows
    and one pair per row (the weakest selected site against the strongest competitor)."""
    B, M = S.shape
    ub = np.full(B, np.inf)
    gap = S - form.theta
    with np.errstate(divide="ignore", invalid="ignore"):
        d_thr = np.where(pat.above, gap, -gap) / form.norms
    d_thr = np.where((pat.above | pat.below) & (form.norms > 0), d_thr, np.inf)
    if M:
        ub = np.minimum(ub, d_thr.min(1))
    if pat.selected.shape[1] and pat.competitor.any():
        has = np.flatnonzero(pat.competitor.any(1))
        top = np.take_along_axis(S[has], pat.selected[has], 1)
        p = pat.selected[has, top.argmin(1)]
        q = np.where(pat.competitor[has], S[has], -np.inf).argmax(1)
        nrm = _pair_norms(form.A, p, q)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = (S[has, p] - S[has, q]) / nrm
        ub[has] = np.minimum(ub[has], np.where(nrm > 0, d, np.inf))
    hp = hyperplanes_within(form, S, pat, np.nextafter(ub, np.inf))
    best_d = np.full(B, np.inf)
    best_a = np.full(B, -1, dtype=np.int64)
    best_b = np.full(B, -1, dtype=np.int64)
    if len(hp.row):
        order = np.lexsort((hp.b, hp.a, hp.distance, hp.row))
        first = np.ones(len(order), dtype=bool)
        first[1:] = hp.row[order][1:] != hp.row[order][:-1]
        o = order[first]
        best_d[hp.row[o]], best_a[hp.row[o]], best_b[hp.row[o]] = hp.distance[o], hp.a[o], hp.b[o]
    return Hyperplanes(np.arange(B), best_a, best_b, best_d)
