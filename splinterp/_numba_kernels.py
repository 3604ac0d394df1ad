"""CPU kernels in numba: the fused TopK selection (scores + bias, optional |.|, top k, the selected values).

Why: `torch.topk` on CPU copies every row into (value, index) pairs before a partial sort, about 2 ns per
score: at d_sae 4096 that is a sixth of a training step. Here each row costs one vectorised pass (maxima
of 4k strided blocks), a bisection on those maxima for a guess t0 just below the k-th largest score, and
a compare-only pass over the blocks whose maximum reaches t0; the few scores >= t0 are collected and
insertion-sorted.

Exactness does not depend on the guess: a row's result is kept only if at least k scores were >= t0
(then every score left out is < t0 <= the k-th kept one); otherwise, and for any row holding a NaN, the
row is flagged and the caller redoes it with torch. Order: decreasing score, equal scores by increasing
index (a later equal score never displaces an earlier one), exactly `splinterp.sae.topk_indices`.

Imported lazily by `splinterp.kernels`; needs numba (the `fast` extra).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba as nb
import numpy as np
import torch

__all__ = ["select_rows"]


BLOCKS_PER_K = 4
"""Scores are grouped into BLOCKS_PER_K * k strided blocks (block q holds latents q, q + n_blocks, ...)."""


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _block_max(row, b, absolute, nblk, G, bm):  # pragma: no cover (compiled)
    # bm[q] = max of block q, NaN if the block holds one (so the exact pass visits it and sees the NaN).
    # Exact IEEE (no fastmath): blocks are skipped on this value. The loop over q is a plain map, which
    # LLVM vectorises; slices start at 0 so numba can drop its negative-index handling.
    for q in range(nblk):
        v = row[q] + b[q]
        bm[q] = abs(v) if absolute else v
    for t in range(1, G):
        blk = row[t * nblk : (t + 1) * nblk]
        bb = b[t * nblk : (t + 1) * nblk]
        for q in range(nblk):
            v = blk[q] + bb[q]
            s = abs(v) if absolute else v
            bm[q] = s if (s > bm[q] or s != s) else bm[q]


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _floor_guess(bm, k):  # pragma: no cover (compiled)
    # a value with at least k block maxima >= it (so at least k scores >= it), near the k-th largest:
    # bisection between min and max by counting, no sort
    lo = bm[0]
    hi = bm[0]
    for q in range(bm.shape[0]):
        x = bm[q]
        lo = x if x < lo else lo
        hi = x if x > hi else hi
    for _ in range(10):
        mid = lo + (hi - lo) * 0.5
        cnt = 0
        for q in range(bm.shape[0]):
            cnt += bm[q] >= mid
        if cnt >= k:
            lo = mid
        else:
            hi = mid
    return lo


@nb.njit(nogil=True, cache=True, boundscheck=False, inline="always")
def _take(row, b, j, absolute, t0, cs, cj, c, cap):  # pragma: no cover (compiled)
    # latent j joins the candidates if its score reaches t0: (new count, fail); fail on NaN or overflow
    v = row[j] + b[j]
    s = abs(v) if absolute else v
    if not s < t0:  # s >= t0, or s is NaN
        if s != s or c == cap:
            return c, True
        cs[c] = s
        cj[c] = j
        return c + 1, False
    return c, False


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _select(u, b, k, absolute, r0, r1, idx_out, val_out, bad):  # pragma: no cover (compiled)
    n = u.shape[1]
    nblk = min(BLOCKS_PER_K * k, n)
    G = n // nblk  # latents past G * nblk are in no block: they only enter the exact scan
    cap = min(n, 16 * k)  # more candidates than this (e.g. many tied scores): let torch do the row
    bm = np.empty(nblk, u.dtype)
    cs = np.empty(cap, u.dtype)
    cj = np.empty(cap, np.int64)
    for r in range(r0, r1):
        row = u[r]
        _block_max(row, b, absolute, nblk, G, bm)
        t0 = _floor_guess(bm, k)
        c = 0
        fail = t0 != t0
        # exact pass: every score >= t0 (or NaN) is a candidate, and only blocks whose maximum reaches
        # t0 (or is NaN) can hold one; then the latents in no block
        for q in range(nblk):
            if fail:
                break
            if not bm[q] < t0:
                for t in range(G):
                    c, fail = _take(row, b, q + t * nblk, absolute, t0, cs, cj, c, cap)
                    if fail:
                        break
        for j in range(G * nblk, n):
            if fail:
                break
            c, fail = _take(row, b, j, absolute, t0, cs, cj, c, cap)
        bad[r] = fail or c < k
        if bad[r]:
            continue
        # insertion sort of the candidates: decreasing score, equal scores by increasing index
        for i in range(1, c):
            x = cs[i]
            xj = cj[i]
            p = i
            while p > 0 and (cs[p - 1] < x or (cs[p - 1] == x and cj[p - 1] > xj)):
                cs[p] = cs[p - 1]
                cj[p] = cj[p - 1]
                p -= 1
            cs[p] = x
            cj[p] = xj
        for t in range(k):
            j = cj[t]
            idx_out[r, t] = j
            val_out[r, t] = row[j] + b[j]


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _reset_after_fork() -> None:  # a forked child has the pool object but none of its threads
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=_reset_after_fork)


def _executor(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size != size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(size, thread_name_prefix="splinterp-topk"), size
        return _pool


MIN_ROWS_PER_THREAD = 64
"""Rows below which a thread is not worth waking."""


def select_rows(
    u: torch.Tensor, b: torch.Tensor, k: int, absolute: bool, threads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [R, k], values [R, k], bad [R]) of s = u + b (or |u + b|) for a contiguous CPU u [R, n].

    values are u + b at the selected latents (signed). Rows with bad True hold garbage: redo them.
    """
    un, bn = u.numpy(), b.contiguous().numpy()
    R = un.shape[0]
    idx = np.empty((R, k), np.int64)
    val = np.empty((R, k), un.dtype)
    bad = np.zeros(R, np.bool_)
    parts = max(1, min(threads, R // MIN_ROWS_PER_THREAD))
    if parts == 1:
        _select(un, bn, k, absolute, 0, R, idx, val, bad)
    else:
        bounds = np.linspace(0, R, parts + 1).astype(np.int64)
        pool = _executor(parts)
        futures = [
            pool.submit(_select, un, bn, k, absolute, int(bounds[i]), int(bounds[i + 1]), idx, val, bad)
            for i in range(parts)
        ]
        for f in futures:
            f.result()
    return torch.from_numpy(idx), torch.from_numpy(val), torch.from_numpy(bad)
