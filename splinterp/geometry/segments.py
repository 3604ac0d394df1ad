"""The regions along a segment x0 -> x1: exact breakpoints, each piece's active set, what changed at each break.

On the segment x(t) = x0 + t (x1 - x0), t in [0, 1], every score is a line in t: u_i(t) = u_i(x0) + t du_i.
- relu / jumprelu / gated: latent i flips where its line crosses its threshold, t = (theta_i - u_i(x0)) / du_i.
- topk: the k-set (the k highest lines) changes only where its lowest member is overtaken by the highest
  non-member: a kinetic sweep from t = 0 finds these swaps one after another (at each step the next event is
  the earliest crossing of a member by a steeper non-member; simultaneous crossings are taken one at a time,
  which orders them by slope, as the right-hand limit does). The ReLU adds the zero crossings of the lines.
- topk_abs: the same sweep over the 2 d_sae signed lines +-u_i (`signed_sites`), whose k-set is the region.
These candidate breakpoints are a superset: each piece between consecutive candidates gets the SAE's own
selection (`SAE.select`) at its midpoint, in float64, and neighbouring pieces with the same active set (and
signs) are merged, so every breakpoint returned is a real change. Exact in the sense of the rest of the
geometry: float64 lines, no sampling, any dimension, every architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from splinterp.geometry.checks import input_point, takes_sae
from splinterp.geometry.halfspaces import site_form
from splinterp.geometry.scores import check_score_gaps, encoder_f64
from splinterp.sae import SAE

_CHUNK_ELEMS = 1 << 22


@dataclass(frozen=True, eq=False)
class Segment:
    """The pieces of the segment x0 -> x1 (float64), from `segment_regions`.

    breaks [B]: the t in (0, 1) where the region changes, ascending; pieces are [0, breaks[0]], ...,
    [breaks[-1], 1] (starts / ends [B + 1]). masks bool [B + 1, d_sae]: each piece's active set; signs
    bool [B + 1, d_sae] (topk_abs: score > 0 on the active latents) or None. At break b, `entered[b]` and
    `left[b]` are the latents that became active / inactive there (one of each: a TopK swap), and
    `flipped[b]` those whose sign changed while staying active (topk_abs).
    """

    x0: torch.Tensor
    x1: torch.Tensor
    breaks: np.ndarray
    masks: torch.Tensor
    signs: torch.Tensor | None
    entered: list
    left: list
    flipped: list

    def __len__(self) -> int:
        return self.masks.shape[0]

    @property
    def starts(self) -> np.ndarray:
        return np.concatenate([[0.0], self.breaks])

    @property
    def ends(self) -> np.ndarray:
        return np.concatenate([self.breaks, [1.0]])

    @property
    def lengths(self) -> np.ndarray:
        """float64 [B + 1]: each piece's length in input space."""
        return (self.ends - self.starts) * float((self.x1 - self.x0).norm())

    @property
    def kinds(self) -> list[str]:
        """Per break: "enter", "leave", "swap" (one latent for another) or "flip" (a sign, topk_abs)."""
        out = []
        for e, lf, fl in zip(self.entered, self.left, self.flipped):
            out.append("swap" if e and lf else "enter" if e else "leave" if lf else "flip" if fl else "none")
        return out

    def points(self, t) -> torch.Tensor:
        """Inputs [N, d_in] (float64) at the given t values."""
        t = torch.as_tensor(np.asarray(t, dtype=np.float64)).reshape(-1, 1)
        return self.x0 + t * (self.x1 - self.x0)

    def piece_at(self, t) -> np.ndarray:
        """int64 [N]: the piece containing each t (a t exactly at a break belongs to the piece after it)."""
        return np.searchsorted(self.breaks, np.asarray(t, dtype=np.float64), side="right")

    def midpoints(self) -> torch.Tensor:
        """The middle input of every piece [B + 1, d_in]."""
        return self.points((self.starts + self.ends) / 2)



def _kset_events(p: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Times in (0, 1) where the k highest of the lines p + t q change (a kinetic sweep; ties at t = 0 and at
    every event go to the steeper line, then to the lower index)."""
    M = len(p)
    if k >= M:
        return np.zeros(0)
    order = np.lexsort((np.arange(M), -q, -p))
    inside = np.zeros(M, dtype=bool)
    inside[order[:k]] = True
    t_now, events = 0.0, []
    for _ in range(4 * M * M + 10):  # each swap raises the members' total slope: the sweep ends
        S, N = np.flatnonzero(inside), np.flatnonzero(~inside)
        best_t, best = np.inf, None
        step = max(1, _CHUNK_ELEMS // max(len(N), 1))
        for s in range(0, len(S), step):
            i = S[s : s + step]
            dq = q[N][None, :] - q[i][:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                t = (p[i][:, None] - p[N][None, :]) / dq
            t = np.where(dq > 0, np.maximum(t, t_now), np.inf)
            flat = int(np.argmin(t))
            if t.flat[flat] < best_t:
                best_t, best = float(t.flat[flat]), (i[flat // len(N)], N[flat % len(N)])
        if best is None or not best_t < 1.0:
            break
        inside[best[0]], inside[best[1]] = False, True
        if best_t > 0.0:
            events.append(best_t)
        t_now = best_t
    return np.asarray(events)


def _select(sae: SAE, U: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The SAE's own rule on float64 scores [P, d_sae] -> (masks, signs or None), chunked."""
    masks, signs = [], []
    step = max(1, _CHUNK_ELEMS // max(U.shape[1], 1))
    for s in range(0, len(U), step):
        u = torch.from_numpy(U[s : s + step])
        mk = sae.select(u)
        masks.append(mk)
        signs.append((u > 0) & mk)
    return torch.cat(masks), (torch.cat(signs) if sae.cfg.architecture == "topk_abs" else None)


@takes_sae
@torch.no_grad()
def segment_regions(sae: SAE, x0, x1) -> Segment:
    """The exact regions crossed by the segment x0 -> x1, in any dimension and for every architecture.

    Returns a `Segment`: the breakpoints t in (0, 1) in order, each piece's active set (and signs for
    topk_abs), and per breakpoint the latents that entered, left or changed sign. See the module docstring.
    """
    d = sae.cfg.d_in
    a, b = input_point(x0, d, "x0"), input_point(x1, d, "x1")
    enc = encoder_f64(sae)
    A = a.numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below, by name
        u0 = A @ enc.W + enc.b
        du = (b.numpy() - A) @ enc.W
        ends = np.stack([u0, u0 + du, du])
    check_score_gaps(ends, name="the segment's ends (x0, x1, x1 - x0)")
    arch = sae.cfg.architecture
    cand = []
    if arch in ("relu", "jumprelu", "gated", "topk"):
        theta = np.zeros_like(u0) if enc.theta is None else enc.theta
        with np.errstate(divide="ignore", invalid="ignore"):
            cand.append((theta - u0) / du)
    if arch == "topk":
        cand.append(_kset_events(u0, du, sae.cfg.k))
    if arch == "topk_abs":  # the signed lines +-u_i, in the `signed_sites` layout
        form = site_form(enc.W, enc.b, arch, sae.cfg.k)
        cand.append(_kset_events(A @ form.A + form.c, (b.numpy() - A) @ form.A, sae.cfg.k))
    t = np.concatenate(cand) if cand else np.zeros(0)
    t = np.unique(t[(t > 0) & (t < 1)])
    edges = np.concatenate([[0.0], t, [1.0]])
    mids = (edges[:-1] + edges[1:]) / 2
    masks, signs = _select(sae, u0[None, :] + mids[:, None] * du[None, :])
    # merge neighbouring pieces with the same region: only real changes remain
    same = (masks[1:] == masks[:-1]).all(1)
    if signs is not None:
        same &= (signs[1:] == signs[:-1]).all(1)
    keep = torch.cat([torch.ones(1, dtype=torch.bool), ~same]).numpy()
    masks = masks[torch.from_numpy(keep)]
    signs = None if signs is None else signs[torch.from_numpy(keep)]
    breaks = t[~same.numpy()]
    entered, left, flipped = [], [], []
    for j in range(len(breaks)):
        before, after = masks[j], masks[j + 1]
        entered.append(tuple(torch.nonzero(after & ~before).flatten().tolist()))
        left.append(tuple(torch.nonzero(before & ~after).flatten().tolist()))
        if signs is not None:
            flipped.append(tuple(torch.nonzero(before & after & (signs[j] != signs[j + 1])).flatten().tolist()))
        else:
            flipped.append(())
    return Segment(a, b, breaks, masks, signs, entered, left, flipped)
