"""Linear regions of an SAE: active sets, region ids, the affine map on each region, region statistics.

An SAE is a piecewise-affine spline. With scores u(x) = x @ W + b (`SAE.encoder_affine`, every
architecture folded into that form) and the active set S(x) chosen by `SAE.select`, on the region where S
is constant

    sae(x) = x @ (W[:, S] @ W_dec[S]) + (b[S] @ W_dec[S] + b_dec).

For topk_abs a region is an active set *and* the signs of the selected scores (ranking by |u| splits each
set by sign), so region keys carry the signs too.
"""

from __future__ import annotations

import math

import torch

from splinterp.errors import ConfigError
from splinterp.sae import SAE, TOPK_ARCHITECTURES
from splinterp.validation import check_data, check_mask

DEFAULT_BATCH = 16384


def _rows(sae: SAE, X, batch_size: int):
    """Validated chunks of X on the SAE's device (X itself may live on the CPU)."""
    X = check_data(X, sae.cfg.d_in, name="X", dtype=sae.dtype)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, X.shape[0], batch_size):
        yield X[start : start + batch_size].to(sae.device, non_blocking=True)


@torch.no_grad()
def active_mask(sae: SAE, X, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """bool [N, d_sae]: which latents fire on each input (the mask `encode` uses)."""
    out = [sae.active(xb) for xb in _rows(sae, X, batch_size)]
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


def _region_keys(sae: SAE, xb: torch.Tensor) -> torch.Tensor:
    """int64 [B, w]: a canonical key per input, equal iff the inputs share a linear region."""
    u = sae._pre_acts(xb)
    if sae.cfg.architecture in TOPK_ARCHITECTURES:
        idx, active = sae.select_topk(u)
        if sae.cfg.architecture == "topk_abs":
            key = idx * 2 + (u.gather(-1, idx) > 0)
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
def region_ids(sae: SAE, X, batch_size: int = DEFAULT_BATCH) -> torch.Tensor:
    """int64 [N]: equal exactly when two inputs lie in the same linear region.

    Ids are 0..R-1 in order of first appearance. Exact, chunked, and memory bounded by N hashes plus one
    key per region: each input's region key (sorted active indices for TopK, packed bits otherwise) is
    hashed, and every key is checked against the stored key of its hash, so a hash collision can never
    merge two regions; if one ever occurs we fall back to an exact unique over all keys.
    """
    gen = torch.Generator().manual_seed(_HASH_SEED)
    mult = None
    table = _KeyTable()
    hashes = []
    ok = True
    for xb in _rows(sae, X, batch_size):
        keys = _region_keys(sae, xb)
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
        keys = torch.cat([_region_keys(sae, xb).cpu() for xb in _rows(sae, X, batch_size)])
        _, ids = torch.unique(keys, dim=0, return_inverse=True)
    else:
        _, ids = torch.unique(torch.cat(hashes), return_inverse=True)
    return _relabel_by_first_appearance(ids.cpu())


def _relabel_by_first_appearance(ids: torch.Tensor) -> torch.Tensor:
    n = int(ids.max()) + 1 if ids.numel() else 0
    first = _first_occurrence(ids, n)
    rank = torch.empty(n, dtype=torch.int64)
    rank[torch.argsort(first)] = torch.arange(n)
    return rank[ids]


# ------------------------------------------------------------------------------------------ statistics
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


def affine_map(sae: SAE, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine piece on one region: mask bool [d_sae] -> (A [d_in, d_in], c [d_in]), sae(x) = x @ A + c."""
    mask = check_mask(mask, sae.cfg.d_sae)
    if mask.ndim != 1:
        raise ConfigError("affine_map takes one mask [d_sae]; use affine_maps for a batch [R, d_sae]")
    A, c = affine_maps(sae, mask[None])
    return A[0], c[0]


@torch.no_grad()
def piece_rank(sae: SAE, masks, rtol: float | None = None) -> torch.Tensor:
    """int64 [R]: rank of the linear part W[:, S] @ W_dec[S] of each piece (at most |S|).

    Computed from the |S| x |S| core of two thin QR factorisations, not from the d_in x d_in matrix.
    """
    masks = check_mask(masks, sae.cfg.d_sae, "masks").to(sae.device)
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
