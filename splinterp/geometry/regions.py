"""Linear regions of an SAE: active sets, region ids, the affine map on each region, region statistics.

An SAE is a piecewise-affine spline. With scores u(x) = x @ W + b (`SAE.encoder_affine`, every
architecture folded into that form) and the active set S(x) chosen by `SAE.select`, on the region where S
is constant

    sae(x) = x @ (W[:, S] @ W_dec[S]) + (b[S] @ W_dec[S] + b_dec).

For topk_abs a region is an active set *and* the signs of the selected scores (ranking by |u| splits each
set by sign), so region keys carry the signs too. Scores that overflow the SAE's dtype are an error
(`scores.checked_scores`), never NaN regions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splinterp.errors import ConfigError
from splinterp.geometry.checks import check_count, takes_sae
from splinterp.geometry.scores import checked_scores
from splinterp.geometry.signed_sites import signed_site, site_latent, site_positive
from splinterp.sae import SAE, TOPK_ARCHITECTURES
from splinterp.validation import check_data, check_mask

DEFAULT_BATCH = 16384


def input_chunks(sae: SAE, X, batch_size: int):
    """Validated chunks (start row, chunk) of X on the SAE's device (X itself may live on the CPU)."""
    batch_size = check_count(batch_size, "batch_size")
    X = check_data(X, sae.cfg.d_in, name="X", dtype=sae.dtype)
    for start in range(0, X.shape[0], batch_size):
        yield start, X[start : start + batch_size].to(sae.device, non_blocking=True)


@takes_sae
@torch.no_grad()
def active_mask(sae: SAE, X, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """bool [N, d_sae]: which latents fire on each input (the mask `encode` uses)."""
    out = [sae.select(checked_scores(sae, xb, start), xb) for start, xb in input_chunks(sae, X, batch_size)]
    return torch.cat(out).cpu()


# ----------------------------------------------------------------------------------------------- keys
def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [B, d] -> int64 [B, ceil(d/64)], one bit per latent (works on CPU and CUDA)."""
    B, d = mask.shape
    pad = (-d) % 64
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    weights = (2 ** torch.arange(8, device=mask.device, dtype=torch.int32)).to(torch.uint8)
    by = (mask.view(B, -1, 8).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)
    return by.contiguous().view(torch.int64)


def _region_keys(sae: SAE, xb: torch.Tensor, start: int = 0) -> torch.Tensor:
    """int64 [B, w]: a canonical key per input, equal iff the inputs share a linear region: sorted active
    indices (inactive slots = d_sae) for topk, sorted signed sites for topk_abs, packed bits otherwise."""
    u = checked_scores(sae, xb, start)
    if sae.cfg.architecture in TOPK_ARCHITECTURES:
        idx, active = sae.select_topk(u)
        if sae.cfg.architecture == "topk_abs":
            key = signed_site(idx, (u.gather(-1, idx) > 0).long())
        else:
            key = torch.where(active, idx, torch.full_like(idx, sae.cfg.d_sae))
        return torch.sort(key, dim=-1).values
    return _pack_bits(sae.select(u, xb))


_HASH_SEED = 0x5EED5


def _hash_rows(keys: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash per key row (int64 arithmetic wraps); collisions are detected by the caller."""
    h = (keys * multipliers[: keys.shape[1]]).sum(-1)
    h = h ^ (h >> 31)
    return h * -0x61C8864680B583EB  # odd constant (golden ratio) mixes the high bits down


def _first_occurrence(inverse: torch.Tensor, n_unique: int) -> torch.Tensor:
    pos = torch.arange(inverse.numel(), device=inverse.device)
    first = torch.full((n_unique,), inverse.numel(), device=inverse.device, dtype=pos.dtype)
    return first.scatter_reduce_(0, inverse, pos, reduce="amin")


class _KeyTable:
    """One key per distinct hash, to prove that equal hashes mean equal keys.

    Chunks' (hash, key) pairs are buffered and merged into the table only when the buffer outgrows it,
    so the sorting work is amortised (O(R log R) in all for R regions) instead of one full sort per chunk.
    """

    def __init__(self):
        self.h: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.n_pending = 0

    def add(self, h: torch.Tensor, k: torch.Tensor) -> bool:
        """Buffer unique (hash, key) rows; False if a hash collision was detected."""
        self.pending.append((h, k))
        self.n_pending += h.numel()
        if self.h is None or self.n_pending > self.h.numel():
            return self.merge()
        return True

    def merge(self) -> bool:
        parts = ([(self.h, self.k)] if self.h is not None else []) + self.pending
        h = torch.cat([p[0] for p in parts])
        k = torch.cat([p[1] for p in parts])
        self.pending, self.n_pending = [], 0
        uh, inv = torch.unique(h, return_inverse=True)
        rep_k = k[_first_occurrence(inv, uh.numel())]
        self.h, self.k = uh, rep_k
        return torch.equal(k, rep_k[inv])


def _unique_rows(keys: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(unique hashes, one key each) of a chunk, or None if two different keys share a hash."""
    uh, inv = torch.unique(h, return_inverse=True)
    rep_keys = keys[_first_occurrence(inv, uh.numel())]
    return (uh, rep_keys) if torch.equal(keys, rep_keys[inv]) else None


@torch.no_grad()
def _region_table(sae: SAE, X, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N] in order of first appearance, keys [R, w] of the regions in id order); see `region_ids`."""
    gen = torch.Generator().manual_seed(_HASH_SEED)
    mult = None
    table = _KeyTable()
    hashes = []
    ok = True
    for start, xb in input_chunks(sae, X, batch_size):
        keys = _region_keys(sae, xb, start)
        if mult is None:
            mult = (torch.randint(-(2**62), 2**62, (keys.shape[1],), generator=gen) * 2 + 1).to(keys.device)
        h = _hash_rows(keys, mult)
        chunk = _unique_rows(keys, h)
        ok = chunk is not None and table.add(*chunk)
        if not ok:
            break
        hashes.append(h)
    ok = ok and (table.h is None or table.merge())
    if not ok:  # astronomically rare: exact but memory-hungry path
        keys = torch.cat([_region_keys(sae, xb, start).cpu() for start, xb in input_chunks(sae, X, batch_size)])
        uniq, ids = torch.unique(keys, dim=0, return_inverse=True)
    else:
        _, ids = torch.unique(torch.cat(hashes), return_inverse=True)
        uniq = table.k
    ids = ids.cpu()
    n = int(ids.max()) + 1 if ids.numel() else 0
    rank = _first_appearance_rank(ids, n)
    order = torch.empty(n, dtype=torch.int64)
    order[rank] = torch.arange(n)
    return rank[ids], uniq.cpu()[order]


@takes_sae
@torch.no_grad()
def region_ids(sae: SAE, X, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """int64 [N]: equal exactly when two inputs lie in the same linear region.

    Ids are 0..R-1 in order of first appearance. Exact, chunked, and memory bounded by N hashes plus one
    key per region: each input's region key (sorted active indices for TopK, packed bits otherwise) is
    hashed, and every key is checked against the stored key of its hash, so a hash collision can never
    merge two regions; if one ever occurs we fall back to an exact unique over all keys. `region_index`
    gives the same ids together with each region's active set.
    """
    return _region_table(sae, X, batch_size)[0]


@dataclass(frozen=True, eq=False)
class RegionIndex:
    """The regions met by a data set: `ids` [N] (as `region_ids`), and per region its active set.

    masks: bool [R, d_sae] (row r = the active latents of region r); signs: bool [R, d_sae] for topk_abs
    (True = positive score, read on the active latents), else None. `active_set(r)` gives the latents.
    """

    ids: torch.Tensor
    masks: torch.Tensor
    signs: torch.Tensor | None

    def __len__(self) -> int:
        return self.masks.shape[0]

    @property
    def counts(self) -> torch.Tensor:
        """int64 [R]: inputs per region."""
        return torch.bincount(self.ids, minlength=len(self))

    def _check(self, region: int) -> int:
        if isinstance(region, bool) or not isinstance(region, int) or not 0 <= region < len(self):
            raise ConfigError(f"region must be an integer id in [0, {len(self)}), got {region!r}")
        return region

    def active_set(self, region: int) -> torch.Tensor:
        """int64 [|S|]: the active latents of region `region`, ascending."""
        return torch.nonzero(self.masks[self._check(region)]).flatten()

    def mask(self, region: int) -> torch.Tensor:
        """bool [d_sae]: the activation pattern of region `region` (what `affine_map` takes)."""
        return self.masks[self._check(region)]


@takes_sae
@torch.no_grad()
def region_index(sae: SAE, X, batch_size: int = DEFAULT_BATCH) -> RegionIndex:
    """`region_ids` of X plus the active set (and, for topk_abs, the signs) of every region met."""
    ids, keys = _region_table(sae, X, batch_size)
    d = sae.cfg.d_sae
    R = keys.shape[0]
    signs = None
    arch = sae.cfg.architecture
    if arch in TOPK_ARCHITECTURES:
        masks = torch.zeros(R, d + 1, dtype=torch.bool)
        if arch == "topk_abs":
            lat = site_latent(keys)
            masks.scatter_(1, lat, True)
            signs = torch.zeros(R, d + 1, dtype=torch.bool)
            signs.scatter_(1, lat, site_positive(keys))
            signs = signs[:, :d]
        else:
            masks.scatter_(1, keys, True)  # inactive slots hold d_sae: the extra column
        masks = masks[:, :d]
    else:
        bits = keys.contiguous().view(torch.uint8).view(R, -1)
        weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.uint8)
        masks = ((bits[..., None] & weights) > 0).reshape(R, -1)[:, :d]
    return RegionIndex(ids, masks, signs)


def _first_appearance_rank(ids: torch.Tensor, n: int) -> torch.Tensor:
    """rank [n]: the position of each id among the ids ordered by first appearance."""
    first = _first_occurrence(ids, n)
    rank = torch.empty(n, dtype=torch.int64)
    rank[torch.argsort(first)] = torch.arange(n)
    return rank


# ------------------------------------------------------------------------------------------ statistics
@takes_sae
def region_stats(sae: SAE, X, batch_size: int = DEFAULT_BATCH) -> dict:
    """Statistics of how inputs fall into regions.

    n_inputs, n_regions; region_entropy (nats) of the empirical region distribution and its
    exp (region_perplexity, the effective number of regions); largest_region_frac (share of inputs in
    the most visited region); singleton_frac (share of regions visited by exactly one input);
    singleton_input_frac (share of inputs alone in their region); region_sizes (sizes, largest first)
    and size_histogram {size: number of regions of that size}.
    """
    ids = region_ids(sae, X, batch_size)
    counts = torch.bincount(ids)
    n = int(ids.numel())
    p = counts.double() / n
    entropy = float(-(p * p.log()).sum())
    sizes, n_of_size = torch.unique(counts, return_counts=True)
    singletons = int((counts == 1).sum())
    return {
        "n_inputs": n,
        "n_regions": int(counts.numel()),
        "region_entropy": entropy,
        "region_perplexity": math.exp(entropy),
        "largest_region_frac": float(counts.max()) / n,
        "singleton_frac": singletons / counts.numel(),
        "singleton_input_frac": singletons / n,
        "region_sizes": torch.sort(counts, descending=True).values.tolist(),
        "size_histogram": {int(s): int(c) for s, c in zip(sizes, n_of_size)},
    }


# ------------------------------------------------------------------------------------------ affine maps
def _masks_to_padded_indices(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, d] bool -> (indices [R, m], valid [R, m]) with m = the largest active count (at least 1)."""
    m = max(int(masks.sum(1).max()) if masks.numel() else 0, 1)
    vals, idx = torch.topk(masks.to(torch.int8), m, dim=1)
    return idx, vals.bool()


@takes_sae
@torch.no_grad()
def affine_maps(sae: SAE, masks) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched affine pieces: masks bool [R, d_sae] -> (A [R, d_in, d_in], c [R, d_in]).

    For every input x whose active set is masks[r]: sae(x) = x @ A[r] + c[r]. Only the active columns are
    gathered, so the cost is R * |S| * d_in^2, not R * d_sae * d_in^2.
    """
    masks = check_mask(masks, sae.cfg.d_sae, "masks").to(sae.device)
    if masks.ndim == 1:
        masks = masks[None]
    W, b = sae.encoder_affine()
    idx, valid = _masks_to_padded_indices(masks)
    v = valid.to(W.dtype)
    enc = W.T[idx] * v[..., None]  # [R, m, d_in], rows W[:, S]^T
    dec = sae.W_dec[idx]  # [R, m, d_in]
    A = enc.transpose(1, 2) @ dec
    c = ((b[idx] * v)[:, None, :] @ dec)[:, 0] + sae.b_dec
    return A, c


@takes_sae
def affine_map(sae: SAE, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine piece on one region: mask bool [d_sae] -> (A [d_in, d_in], c [d_in]), sae(x) = x @ A + c."""
    mask = check_mask(mask, sae.cfg.d_sae)
    if mask.ndim != 1:
        raise ConfigError("affine_map takes one mask [d_sae]; use affine_maps for a batch [R, d_sae]")
    A, c = affine_maps(sae, mask[None])
    return A[0], c[0]


@takes_sae
@torch.no_grad()
def piece_rank(sae: SAE, masks, rtol: float | None = None) -> torch.Tensor:
    """int64 [R]: rank of the linear part W[:, S] @ W_dec[S] of each piece (at most |S|).

    Computed from the |S| x |S| core of two thin QR factorisations, not from the d_in x d_in matrix.
    """
    masks = check_mask(masks, sae.cfg.d_sae, "masks").to(sae.device)
    if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol >= 0):
        raise ConfigError(f"rtol must be a number >= 0 or None, got {rtol!r}")
    if masks.ndim == 1:
        masks = masks[None]
    W, _ = sae.encoder_affine()
    idx, valid = _masks_to_padded_indices(masks)
    v = valid.to(W.dtype)[..., None]
    enc = (W.T[idx] * v).transpose(1, 2)  # [R, d_in, m]
    dec = (sae.W_dec[idx] * v).transpose(1, 2)  # [R, d_in, m]
    r1 = torch.linalg.qr(enc.double(), mode="reduced").R
    r2 = torch.linalg.qr(dec.double(), mode="reduced").R
    core = r1 @ r2.transpose(1, 2)
    return torch.linalg.matrix_rank(core, rtol=rtol).cpu()
