"""Sparse SAE kernels: TopK encoding and decoding as sparse products, forward and backward.

Why: a TopK code has k non-zeros out of d_sae per row, so once the scores u = x @ W + b are known (the one
dense product, needed to choose the k) everything else (the decoder, the decoder's gradients, the
encoder's weight and bias gradients) is a sparse product of cost B*k*d_in instead of B*d_sae*d_in. The
scores are computed in row chunks (at least MIN_CHUNK_ROWS rows, at most WORKSPACE_BYTES) into a buffer
that is reused between calls, so a large batch needs O(B*k + chunk*d_sae) memory, not O(B*d_sae).

Pure torch ops (`embedding_bag`, `sampled_addmm`, `topk`, ...), so the same code runs on CPU and CUDA.
One exception, CPU only: with numba installed (the `fast` extra), the bias add, |.| and top-k selection
of float32/float64 scores run fused in `splinterp._numba_kernels` (5x cheaper than torch.topk on CPU,
`python -m bench selection`; the same indices and values); without numba, or with SPLINTERP_NUMBA=0,
torch does it (`cpu_kernel_backend()` says which).

    vals, idx = encode_topk(x, W_enc, b_enc, k)             # [B, k], [B, k]; differentiable in x, W, b
    x_hat = decode(vals, idx, W_dec, b_dec)                  # [B, d_in]; differentiable in vals, W_dec, b_dec
    z = densify(vals, idx, d_sae)                            # the dense code [B, d_sae] if one is needed

`SAE.forward`, `SAE.encode` and `SAE.encode_sparse` use these by default; `dense_reference()` (or
`SAE.forward(x, dense=True)`) switches back to the plain dense formulas, which the tests compare against.

Selection is canonical and identical to `splinterp.sae.topk_indices`: the k largest scores in decreasing
order, ties broken towards the lower latent index. Rows with any tie near the top are redone with a
stable sort (ties have measure zero on real data, so this costs nothing in practice). `TIES` lists the
other rules, which take the tied latents torch.topk takes (the libraries' choice; see `topk_select`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from splinterp.errors import ConfigError, DeviceError, DTypeError, ShapeError

__all__ = [
    "clear_workspace",
    "cpu_kernel_backend",
    "affine_scores",
    "decode",
    "dense_reference",
    "densify",
    "encode_masked",
    "encode_topk",
    "is_sparse_enough",
    "mask_to_padded",
    "set_sparse_enabled",
    "sparse_enabled",
    "topk_select",
]

# ---------------------------------------------------------------------------------------------- switches
_state = threading.local()

MAX_DENSITY = 1 / 16
"""Threshold codes (relu, jumprelu, gated) go sparse only while the busiest row has at most this fraction
of d_sae active: above it the gathers of the sparse products cost more than one dense matmul."""

WORKSPACE_BYTES = 256 << 20
"""CPU: the score rows computed at once fit in this many bytes, and that buffer is kept between calls
(per thread; `clear_workspace()` frees it). Why: the [rows, d_sae] scores are the one big temporary, and
a fresh one costs a page fault per 4 KiB (several % of the matmul on a 2-core machine)."""

MIN_CHUNK_ROWS = 1024
"""Never fewer rows per score matmul (unless the batch is smaller): a BLAS repacks W for every call,
so small row chunks slow the matmul down (measured: 512 rows +28%, 256 rows +60% at d_sae 4096)."""

GPU_CHUNK_ELEMENTS = 1 << 28
"""Score elements computed at once on an accelerator: only a memory bound, kernels like big launches."""


def sparse_enabled() -> bool:
    """Whether SAE.forward / encode take the sparse path (the default; per thread)."""
    return getattr(_state, "enabled", True)


def set_sparse_enabled(flag: bool) -> None:
    """Turn the sparse path on or off for this thread (off = the plain dense formulas)."""
    _state.enabled = bool(flag)


@contextlib.contextmanager
def dense_reference() -> Iterator[None]:
    """Run the block with the dense formulas: the reference the sparse kernels are tested against."""
    old = sparse_enabled()
    set_sparse_enabled(False)
    try:
        yield
    finally:
        set_sparse_enabled(old)


# ---------------------------------------------------------------------------------------------- selection
def _stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The tie rule itself: decreasing score, equal scores by increasing index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


TREE_GROUP = 8
"""Group size of the two-level candidate filter in `topk_select` (CPU)."""

TREE_MIN_D_SAE = 8192
"""The filter runs from this width on: measured 25% off the top-k at d_sae 16384, nothing at 4096."""


def _tree_candidates(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(candidates [R, k*g], ok [R]): a superset of each row's top k, read off two levels of group maxima.

    Why: torch.topk on CPU costs several ns per score; maxima over strided groups are vectorised, and
    the top k scores can only lie in the k groups with the largest maxima (when the k-th and (k+1)-th
    group maxima differ: `ok`), so three small top-k's over ~k*g values replace one over d_sae.
    """
    g = TREE_GROUP
    R, n = s.shape
    if s.device.type != "cpu" or n < TREE_MIN_D_SAE or n % (g * g) or n // (g * g) <= k or not s.is_contiguous():
        return None
    G1, G2 = n // g, n // (g * g)
    step = torch.arange(g, device=s.device)[:, None]
    m1 = s.view(R, g, G1).amax(1)  # group j holds scores j + G1*t
    m2 = m1.view(R, g, G2).amax(1)  # group i holds level-1 groups i + G2*t
    v2, i2 = torch.topk(m2, k + 1)
    ok = v2[:, k - 1] > v2[:, k]
    c1 = (i2[:, None, :k] + G2 * step).reshape(R, k * g)
    v1, j1 = torch.topk(m1.gather(1, c1), k + 1)
    ok &= v1[:, k - 1] > v1[:, k]
    c0 = (c1.gather(1, j1[:, :k])[:, None, :] + G1 * step).reshape(R, k * g)
    return c0, ok


TIES = ("lowest_index", "torch", "torch_relu")
"""Which of several exactly tied k-th scores TopK takes: "lowest_index" (ours: the same on every device and
backend), "torch" (those torch.topk takes on the scores: SAELens), "torch_relu" (those torch.topk takes on
relu(scores): sparsify and dictionary_learning, which apply the ReLU before the top-k)."""


def topk_select(scores: torch.Tensor, k: int, ties: str = "lowest_index") -> torch.Tensor:
    """Indices [R, k] of the k largest scores per row, decreasing, ties towards the lower index.

    The one implementation of the tie rule (`splinterp.sae.topk_indices` calls it): on CPU float32/64 the
    fused numba selection when installed, else one `topk` of k+1 (over a candidate superset on CPU), which
    tells whether any of the top k+1 scores tie without an extra pass; rows with a tie (or NaN) are redone
    with a stable sort.

    ties="torch" / "torch_relu": the set torch.topk selects from the scores (or from relu(scores)), which among
    equal scores is whatever its algorithm picks (on CPU, ten equal scores with k=3 give latents 8, 6, 7); the
    libraries call it on the very scores we compute, so their active sets are ours on tied rows too. The set
    is then put in the canonical order (decreasing score, then increasing index).
    """
    if scores.ndim != 2:
        raise ShapeError(f"scores must be 2-D [rows, d_sae], got shape {tuple(scores.shape)}")
    n = scores.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"k must be an integer with 1 <= k <= {n}, got {k!r}")
    if ties not in TIES:
        raise ConfigError(f"ties must be one of {TIES}, got {ties!r}")
    if scores.shape[0] == 0:
        return torch.empty(0, k, dtype=torch.long, device=scores.device)
    if ties != "lowest_index":
        ranked = torch.relu(scores) if ties == "torch_relu" else scores
        idx = torch.topk(ranked, k, dim=-1, sorted=False).indices
        idx = idx.sort(-1).values  # then a stable sort by decreasing score: the canonical order of the set
        return idx.gather(-1, scores.gather(-1, idx).sort(dim=-1, descending=True, stable=True).indices).contiguous()
    fused = _fused_cpu_select(scores, n, k)
    if fused is not None:
        s = scores.detach().contiguous()
        return _fused_topk(fused, s, s.new_zeros(n), k, False)[0]
    return _torch_topk_select(scores, k)


def _torch_topk_select(scores: torch.Tensor, k: int) -> torch.Tensor:
    n = scores.shape[1]
    if k == n:
        return _stable_topk(scores, k)
    tree = _tree_candidates(scores, k)
    if tree is None:
        v, i = torch.topk(scores, k + 1, dim=-1)
        idx = i[:, :k]
        bad = ~(v[:, :-1] > v[:, 1:]).all(-1)
    else:
        cand, ok = tree
        v, i = torch.topk(scores.gather(1, cand), k + 1, dim=-1)
        idx = cand.gather(1, i[:, :k])
        bad = ~(ok & (v[:, :-1] > v[:, 1:]).all(-1))
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        idx = idx.clone()
        idx[rows] = _stable_topk(scores[rows], k)
    return idx.contiguous()


FUSED_MAX_K = 256
"""The fused CPU selection insertion-sorts its ~k candidates per row (O(k^2)): above this k, torch.topk."""


def _fused_cpu_select(x: torch.Tensor, d_sae: int, k: int):
    """The numba selection function when it applies (CPU, float32/64, k <= FUSED_MAX_K, numba importable)."""
    if x.device.type != "cpu" or x.dtype not in _NUMBA_DTYPES or k > FUSED_MAX_K or k >= d_sae:
        return None
    mod = _numba_kernels()
    return None if mod is None else mod.select_rows


_NUMBA_DTYPES = (torch.float32, torch.float64)
_NUMBA = None  # None: not tried yet; False: unavailable or disabled; else the splinterp._numba_kernels module


def _numba_kernels():
    """splinterp._numba_kernels, or None without numba (or with SPLINTERP_NUMBA=0 at the first call)."""
    global _NUMBA
    if _NUMBA is None:
        if os.environ.get("SPLINTERP_NUMBA", "1") == "0":
            _NUMBA = False
        else:
            try:
                from splinterp import _numba_kernels as mod
            except ImportError:  # numba not installed (the `fast` extra): torch does the work
                _NUMBA = False
            except Exception as e:  # a numba that is installed but broken must not break encoding
                warnings.warn(f"splinterp: numba kernels unavailable ({e!r}); using torch", stacklevel=3)
                _NUMBA = False
            else:
                _NUMBA = mod
    return _NUMBA or None


def cpu_kernel_backend() -> str:
    """Which CPU float32/float64 TopK selection runs: "numba" (the `fast` extra) or "torch".

    Set SPLINTERP_NUMBA=0 before the first encode to force torch."""
    return "numba" if _numba_kernels() is not None else "torch"


def _fused_topk(select, u: torch.Tensor, b: torch.Tensor, k: int, absolute: bool):
    """(indices, values) of u + b through the fused kernel; rows it flags (NaN, or a failed guess) via torch."""
    idx, vals, bad = select(u, b, k, absolute, torch.get_num_threads())
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        ur = u[rows] + b
        ix = _torch_topk_select(ur.abs() if absolute else ur, k)
        idx[rows] = ix
        vals[rows] = ur.gather(1, ix)
    return idx, vals


def _chunk_rows(n_rows: int, d_sae: int, x: torch.Tensor, copies: int) -> int:
    if x.device.type == "cpu":
        rows = max(MIN_CHUNK_ROWS, WORKSPACE_BYTES // (copies * d_sae * x.element_size()))
    else:
        rows = max(1, GPU_CHUNK_ELEMENTS // d_sae)
    return max(1, min(n_rows, rows))


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch buffer; on CPU the same memory is handed out again while it is big enough."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    buf = getattr(_state, "workspace", None)
    if buf is None or buf.dtype != dtype or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        _state.workspace = buf if numel * buf.element_size() <= WORKSPACE_BYTES else None
    return buf[:numel]


def clear_workspace() -> None:
    """Free this thread's score buffer (it is rebuilt on the next call)."""
    _state.workspace = None


# ---------------------------------------------------------------------------------------------- patterns
class _LatentMajor:
    """The code's pattern transposed (batch rows grouped by latent), built once per indices tensor.

    Why: the weight gradients of encoder and decoder are both sums over the batch rows where a latent
    fires; sorting the indices once serves both backward passes (the holder rides on the indices tensor).
    """

    __slots__ = ("version", "rows", "order", "offsets", "n")

    def __init__(self) -> None:
        self.version = None
        self.rows = self.order = self.offsets = None
        self.n = None

    def get(self, idx: torch.Tensor, n: int) -> _LatentMajor:
        if self.rows is None or self.version != idx._version or self.n != n:
            flat = idx.reshape(-1)
            order = _stable_argsort(flat, n)  # stable: deterministic sums
            counts = torch.bincount(flat, minlength=n)
            itype = torch.int32 if flat.numel() < 2**31 else torch.long
            self.rows = torch.div(order, max(idx.shape[-1], 1), rounding_mode="floor").to(itype)
            self.order = order
            self.offsets = (counts.cumsum(0) - counts).to(itype)
            self.version, self.n = idx._version, n
        return self


def _stable_argsort(flat: torch.Tensor, n: int) -> torch.Tensor:
    """Stable argsort of latent ids in [0, n).

    Why not torch.sort on CPU: its parallel sort falls apart when the cores are shared (measured: 2 ms
    alone, 0.5 s per call with other processes running); numpy's radix sort of 16-bit keys is serial
    and about 1 ms per 100k ids, so ids below 2**32 take one or two 16-bit passes.
    """
    if flat.device.type != "cpu" or n > 2**32 or flat.numel() == 0:
        return torch.sort(flat, stable=True).indices
    a = flat.numpy()
    if n <= 2**16:
        order = np.argsort(a.astype(np.uint16), kind="stable")
    else:
        order = np.argsort((a & 0xFFFF).astype(np.uint16), kind="stable")
        order = order[np.argsort((a[order] >> 16).astype(np.uint16), kind="stable")]
    return torch.from_numpy(order.astype(np.int64, copy=False))


def _pattern_of(idx: torch.Tensor) -> _LatentMajor:
    holder = getattr(idx, "_splinterp_latent_major", None)
    if not isinstance(holder, _LatentMajor):
        holder = _LatentMajor()
        try:
            idx._splinterp_latent_major = holder
        except (AttributeError, RuntimeError):  # e.g. a tensor subclass that refuses attributes
            pass
    return holder


def _latent_sum(pat: _LatentMajor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[i] = sum over (b, j) with idx[b, j] == i of weights[b, j] * table[b]: [n, d], cost nnz * d."""
    w = weights.detach().reshape(-1)[pat.order].to(table.dtype)
    return F.embedding_bag(pat.rows, table.detach().contiguous(), pat.offsets, mode="sum", per_sample_weights=w)


def _row_sum(idx: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_j weights[b, j] * table[idx[b, j]]: [B, d], cost B*m*d.

    Inputs detached: embedding_bag then takes its forward-only kernel (no offset2bag / bag_size outputs,
    which only its own backward needs; the autograd Functions here supply the backward)."""
    B, m = idx.shape
    if m == 0:  # no row has an active latent: every sum is empty
        return table.new_zeros(B, table.shape[1])
    offsets = torch.arange(0, B * m, m, device=idx.device)
    w = weights.detach().reshape(-1)  # detached: embedding_bag skips its backward bookkeeping (offset2bag...)
    return F.embedding_bag(idx.reshape(-1), table.detach(), offsets, mode="sum", per_sample_weights=w)


_SAMPLED_OK = {torch.float32, torch.float64}


def _rowdot(a: torch.Tensor, table: torch.Tensor, idx: torch.Tensor, pat: _LatentMajor | None = None) -> torch.Tensor:
    """out[b, j] = <table[idx[b, j]], a[b]>: [B, m], cost B*m*d (a sampled dense-dense product)."""
    B, m = idx.shape
    n = table.shape[0]
    if B * m == 0:
        return a.new_zeros(B, m)
    if a.device.type == "cpu" and a.dtype in _SAMPLED_OK and table.dtype == a.dtype:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            if pat is not None and n > B:
                # latent-major: each table row is read once, the (smaller) batch rows at random
                crow = torch.cat([pat.offsets.long(), pat.offsets.new_tensor([B * m]).long()])
                pattern = torch.sparse_csr_tensor(
                    crow, pat.rows.long(), a.new_zeros(B * m), size=(n, B), check_invariants=False
                )
                v = torch.sparse.sampled_addmm(pattern, table, a.t(), beta=0.0).values()
                return torch.empty_like(v).index_copy_(0, pat.order, v).view(B, m)
            crow = torch.arange(0, B * m + 1, m, device=a.device)
            pattern = torch.sparse_csr_tensor(
                crow, idx.reshape(-1), a.new_zeros(B * m), size=(B, n), check_invariants=False
            )
            return torch.sparse.sampled_addmm(pattern, a, table.t(), beta=0.0).values().view(B, m)
    out = a.new_empty(B, m)
    step = max(1, (1 << 24) // max(1, m * table.shape[1]))
    for s in range(0, B, step):
        rows = table[idx[s : s + step]]  # [r, m, d]
        out[s : s + step] = torch.bmm(rows, a[s : s + step].unsqueeze(-1).to(rows.dtype)).squeeze(-1)
    return out


# ---------------------------------------------------------------------------------------------- encoder
class _AffineGather(torch.autograd.Function):
    """values[b, j] = u[b, idx[b, j]] with u = x @ W + b (where live; 0 elsewhere), sparse backward.

    The forward receives the values already selected (the selection is not differentiable); this
    function only supplies the gradient: grad_W = x^T G and grad_x = G W^T with G the sparse
    [B, d_sae] pre-activation gradient, both as B*m*d_in gathers instead of dense matmuls.
    """

    @staticmethod
    def forward(ctx, x, W, b, values, idx, live):
        ctx.save_for_backward(x, W, idx, live)
        ctx.holder = _pattern_of(idx)
        ctx.has_live = live is not None
        return values.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_values):
        x, W, idx, live = ctx.saved_tensors
        g = grad_values if not ctx.has_live else grad_values * live
        n = W.shape[1]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _row_sum(idx, g.to(W.dtype), W.t().contiguous())
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            pat = ctx.holder.get(idx, n)
            if ctx.needs_input_grad[1]:
                grad_W = _latent_sum(pat, g, x).to(W.dtype).t()
            if ctx.needs_input_grad[2]:  # a sum per latent, in a fixed order (deterministic on GPU too)
                grad_b = _latent_sum(pat, g, g.new_ones(g.shape[0], 1)).squeeze(1).to(W.dtype)
        return grad_x, grad_W, grad_b, None, None, None


def _check_affine(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> None:
    if x.ndim != 2 or W.ndim != 2 or b.ndim != 1:
        raise ShapeError(
            f"need x [B, d_in], W [d_in, d_sae], b [d_sae]; got {tuple(x.shape)}, {tuple(W.shape)}, {tuple(b.shape)}"
        )
    if x.shape[1] != W.shape[0] or b.shape[0] != W.shape[1]:
        raise ShapeError(f"x {tuple(x.shape)}, W {tuple(W.shape)} and b {tuple(b.shape)} do not fit x @ W + b")
    if not (x.is_floating_point() and W.is_floating_point() and b.is_floating_point()):
        raise DTypeError("x, W and b must be floating point")
    if not x.dtype == W.dtype == b.dtype:
        raise DTypeError(f"x, W and b must share a dtype, got {x.dtype}, {W.dtype}, {b.dtype}")
    if not x.device == W.device == b.device:
        raise DeviceError(f"x, W and b must be on one device, got {x.device}, {W.device}, {b.device}")


def affine_scores(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, *, linear: bool = False) -> torch.Tensor:
    """u = x @ W + b [B, d_sae] for x [B, d_in], rounded as the SAE's library rounds it.

    linear=False: a matmul, then the bias added (two roundings), as SAELens writes `x @ W_enc + b_enc`.
    linear=True: the bias added inside the matmul (`torch.addmm`, what `nn.functional.linear` calls), as
    sparsify and dictionary_learning compute through `nn.Linear`. Equal in exact arithmetic; in half
    precision (and float32 from d_in ~512 on) a quarter of the scores differ in the last bit, enough to
    change an active set, so each SAE keeps its library's form (`SAEConfig.score_order`).
    """
    if linear:
        return torch.addmm(b, x, W)
    return x @ W + b


def encode_topk(
    x: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    k: int,
    *,
    absolute: bool = False,
    chunk_rows: int | None = None,
    linear: bool = False,
    ties: str = "lowest_index",
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK code of x [B, d_in] under scores u = x @ W + b: (values [B, k], indices [B, k]).

    absolute=False: the k largest u, then ReLU (values <= 0 become 0 and pass no gradient), as SAELens
    and sparsify. absolute=True: the k largest |u|, signed values kept (the SplInterp paper's variant).
    Indices are in decreasing order of the ranking score, ties towards the lower index (or as `ties` says:
    see `topk_select`). The scores are rounded as `affine_scores(x, W, b, linear=linear)` rounds them (the
    same values, chunk by chunk).
    """
    _check_affine(x, W, b)
    B, n = x.shape[0], W.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"k must be an integer with 1 <= k <= d_sae={n}, got {k!r}")
    fused = _fused_cpu_select(x, n, k) if ties == "lowest_index" else None
    copies = 2 if absolute and fused is None else 1  # the torch path needs a second buffer for |u|
    rows = chunk_rows or _chunk_rows(B, n, x, copies)
    with torch.no_grad():
        idx = torch.empty(B, k, dtype=torch.long, device=x.device)
        vals = torch.empty(B, k, dtype=torch.result_type(x, W), device=x.device)
        Wd, bd = W.detach(), b.detach()
        fused_bias = torch.zeros_like(bd) if linear else bd  # linear: the bias is already in u
        r = max(1, min(rows, B))
        work = _workspace(copies * r * n, vals.dtype, x.device)
        buf = work[: r * n].view(r, n)
        sbuf = work[r * n :].view(r, n) if copies == 2 else None
        for s in range(0, B, rows):
            xs = x.detach()[s : s + rows]
            u = buf[: xs.shape[0]]
            if linear:
                torch.addmm(bd, xs, Wd, out=u)
            else:
                torch.mm(xs, Wd, out=u)
            if fused is not None:
                idx[s : s + rows], vals[s : s + rows] = _fused_topk(fused, u, fused_bias, k, absolute)
                continue
            if not linear:
                u += bd  # as x @ W + b, so values match the dense formula
            score = torch.abs(u, out=sbuf[: xs.shape[0]]) if absolute else u
            ix = topk_select(score, k, ties)
            idx[s : s + rows] = ix
            torch.gather(u, 1, ix, out=vals[s : s + rows])
        if absolute:
            live = None
        else:
            live = vals > 0
            vals = torch.where(live, vals, vals.new_zeros(()))
    values = _AffineGather.apply(x, W, b, vals, idx, live)
    return values, idx


def is_sparse_enough(mask: torch.Tensor, max_density: float | None = None) -> bool:
    """Whether a bool activation mask [B, d_sae] is sparse enough for the sparse products to pay."""
    if mask.numel() == 0:
        return True
    limit = MAX_DENSITY if max_density is None else max_density
    per_row = torch.count_nonzero(mask, dim=-1)
    return int(per_row.max()) <= limit * mask.shape[-1]


def mask_to_padded(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B, m], live [B, m]) of a bool mask [B, d_sae]: active latents in increasing order,
    rows padded to the busiest row's count m with index 0 (live False)."""
    if mask.ndim != 2 or mask.dtype != torch.bool:
        raise ShapeError(f"mask must be a 2-D bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    B = mask.shape[0]
    rows, cols = mask.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=B)
    m = int(counts.max()) if B else 0
    pos = torch.arange(rows.numel(), device=mask.device) - (counts.cumsum(0) - counts)[rows]
    idx = torch.zeros(B, m, dtype=torch.long, device=mask.device)
    idx[rows, pos] = cols
    live = torch.zeros(B, m, dtype=torch.bool, device=mask.device)
    live[rows, pos] = True
    return idx, live


def encode_masked(
    x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, u: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse form of z = u * mask for a threshold rule (relu, jumprelu, gated): (values, indices) [B, m].

    m is the largest number of active latents in a row; shorter rows are padded with index 0 and value 0
    (padding passes no gradient). `u` is x @ W + b, already computed (detached); the gradient goes to
    x, W and b through the sparse backward.
    """
    _check_affine(x, W, b)
    if u.shape != (x.shape[0], W.shape[1]) or mask.shape != u.shape:
        raise ShapeError(f"u and mask must have shape {(x.shape[0], W.shape[1])}")
    with torch.no_grad():
        idx, live = mask_to_padded(mask)
        vals = u.detach().gather(1, idx) * live
    values = _AffineGather.apply(x, W, b, vals, idx, live)
    return values, idx


# ---------------------------------------------------------------------------------------------- decoder
class _SparseDecode(torch.autograd.Function):
    """x_hat[b] = sum_j values[b, j] W_dec[idx[b, j]] + b_dec, every pass a B*m*d_in gather."""

    @staticmethod
    def forward(ctx, values, idx, W_dec, b_dec):
        ctx.save_for_backward(values, idx, W_dec)
        ctx.holder = _pattern_of(idx)
        out = _row_sum(idx, values.to(W_dec.dtype), W_dec.contiguous())
        if b_dec is not None:
            out += b_dec
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        values, idx, W_dec = ctx.saved_tensors
        grad_values = grad_W = grad_b = None
        pat = ctx.holder.get(idx, W_dec.shape[0]) if any(ctx.needs_input_grad[:3]) else None
        if ctx.needs_input_grad[0]:
            grad_values = _rowdot(grad_out, W_dec, idx, pat).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = _latent_sum(pat, values, grad_out).to(W_dec.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = grad_out.sum(0)
        return grad_values, None, grad_W, grad_b


def decode(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> torch.Tensor:
    """x_hat = sum_j values[:, j] * W_dec[indices[:, j]] + b_dec for a sparse code [B, m]."""
    if values.ndim != 2 or values.shape != indices.shape:
        raise ShapeError(
            f"values and indices must both be [B, m], got {tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if W_dec.ndim != 2 or (b_dec is not None and b_dec.shape != (W_dec.shape[1],)):
        raise ShapeError(f"need W_dec [d_sae, d_in] and b_dec [d_in], got {tuple(W_dec.shape)}")
    if indices.dtype not in (torch.long, torch.int32):
        raise DTypeError(f"indices must be int64 or int32, got {indices.dtype}")
    if indices.shape[1] == 0 or indices.shape[0] == 0:  # no active latent anywhere: x_hat = b_dec
        out = values.new_zeros(values.shape[0], W_dec.shape[1]) + values.sum() * 0  # keeps the graph
        return out if b_dec is None else out + b_dec
    return _SparseDecode.apply(values, indices, W_dec, b_dec)


def densify(values: torch.Tensor, indices: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The dense code z [B, d_sae] of a sparse one (padding entries add 0); differentiable in values."""
    z = values.new_zeros(*values.shape[:-1], d_sae)
    return z.scatter_add(-1, indices, values)
