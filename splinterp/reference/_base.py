"""Shared pieces of the reference autoencoders: the common estimator API and the batched kernels.

All three reference AEs (k-means, local PCA, PCA) are *linear-decoder* autoencoders: `decode(Z) = Z @ W_dec +
b_dec`, exactly like an SAE. Only the encoders differ. Keeping that in one base class is what lets code written
for `splinterp.SAE` (which only calls `encode`/`decode`) run on them unchanged.

Numerics: fits work on data centred by its training mean (k-means, k-flats and PCA are translation invariant,
and centring keeps the |x|^2 - 2 x.c + |c|^2 expansion accurate in float32), and scaled by a power of two
(`scale_exponent`) so that its largest entry is about 1: the objectives are scale-free, scaling by 2^e is
exact in floating point (the same fit, to the last bit, wherever nothing overflowed before), and squared
distances of data at 1e19 or 1e-30 no longer overflow to inf or underflow to 0. Distances are computed in row
chunks whose temporaries hold at most `_BUDGET` elements, so memory stays bounded for any N.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from splinterp.errors import ConfigError, CorruptFileError, DTypeError, NonFiniteError, NotFittedError, ShapeError
from splinterp.validation import all_finite, as_tensor, check_data

log = logging.getLogger(__name__)

_BUDGET = 1 << 24
"""Max elements of one [rows, columns] temporary (64 MiB in float32)."""

FIT_DTYPES = (torch.float32, torch.float64)


def tqdm_disable(progress: bool | None, work: float) -> bool | None:
    """tqdm's `disable` for a fit: progress=True/False force it on/off; None shows a bar only for big fits
    (work ~ multiply-adds, > 1e11 is ~10 s on a CPU) and only on a terminal (tqdm's disable=None)."""
    if progress is not None:
        return not progress
    return None if work > 1e11 else True


def chunk_rows(n_cols: int, chunk_size: int | None = None) -> int:
    """Rows per chunk so that a [rows, n_cols] temporary stays under the memory budget."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(1, _BUDGET // max(1, n_cols))


def scale_exponent(*tensors: torch.Tensor) -> int:
    """e with max |entry| * 2^-e in [1, 2) over `tensors` (0 if all are zero or empty), clamped so that 2^-e and
    2^e are normal numbers of the dtype. Multiplying by 2^-e is exact, so it changes no result, only the range."""
    m = max((float(t.abs().max()) for t in tensors if t.numel()), default=0.0)
    if m == 0.0 or not math.isfinite(m):
        return 0
    lim = math.frexp(torch.finfo(tensors[0].dtype).max)[1] - 2  # 126 for float32, 1022 for float64
    return max(-lim, min(lim, math.frexp(m)[1] - 1))


def times_pow2(t: torch.Tensor, e: int) -> torch.Tensor:
    """t * 2^e, exact (no rounding) while the result stays in the dtype's normal range; t itself when e == 0."""
    return t if e == 0 else t * (2.0**e)


def scale_back(t: torch.Tensor, e: int) -> tuple[torch.Tensor, bool]:
    """(t * 2^e, whether that was exact): it is not where results fall among the subnormal numbers (data near
    1e-40 in float32) or overflow, and then the stored model is not quite the fitted one."""
    out = times_pow2(t, e)
    return out, e == 0 or torch.equal(times_pow2(out, -e), t)


def times_4_pow(value: float, e: int) -> float:
    """A sum of squares computed at scale 2^-e, back in the data's units (value * 4^e); inf where the true value
    exceeds the float64 range (data near 1e200), like any float64 overflow, never an OverflowError."""
    return value * 2.0**e * 2.0**e


def check_sq_norms(x_sq: torch.Tensor, what: str) -> None:
    """NonFiniteError naming the first row of X whose squared distance to the model overflows its dtype (rows far
    beyond the fitted data, at the model's scale); a silent inf would give that row an arbitrary region."""
    if all_finite(x_sq):
        return
    row = int((~torch.isfinite(x_sq)).nonzero()[0, 0])
    raise NonFiniteError(f"X row {row} is so far from the {what} that its squared distance overflows {x_sq.dtype}; "
                         "encode it in float64 (model.double() and X.double()) or rescale it")


def center(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(offset = column mean, X - offset, squared row norms of the centred data)."""
    offset = X.mean(0)
    Xc = X - offset
    return offset, Xc, (Xc * Xc).sum(1)


def nearest_centres(
    Xc: torch.Tensor, x_sq: torch.Tensor, C: torch.Tensor, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every point, for R centre sets at once.

    Xc [N, d], x_sq [N] = |x|^2, C [R, k, d]. Returns labels [R, N] (int64; ties -> lowest index) and the
    squared distances to the chosen centre [R, N] (from the expansion, clamped at 0). One GEMM per chunk
    covers all R restarts.
    """
    R, k, d = C.shape
    N = Xc.shape[0]
    Cf = C.reshape(R * k, d)
    c_sq = (Cf * Cf).sum(1)
    labels = torch.empty(R, N, dtype=torch.long, device=Xc.device)
    mind = torch.empty(R, N, dtype=Xc.dtype, device=Xc.device)
    step = chunk_rows(R * k, chunk_size)
    for s in range(0, N, step):
        e = min(s + step, N)
        D = torch.addmm(c_sq, Xc[s:e], Cf.T, alpha=-2.0).view(e - s, R, k)
        v, i = D.min(dim=2)
        labels[:, s:e] = i.T
        mind[:, s:e] = (v + x_sq[s:e, None]).clamp_min_(0).T
    return labels, mind


def cluster_sums(
    Xc: torch.Tensor, labels: torch.Tensor, k: int, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums [R, k, d] and counts [R, k] for labels [R, N].

    CPU: index_add_ (N*d adds per restart, deterministic there). Other devices: a one-hot GEMM per chunk,
    deterministic where index_add_ would use atomics, and GPUs are fastest at GEMMs anyway.
    """
    R, N = labels.shape
    d = Xc.shape[1]
    flat = labels + torch.arange(R, device=labels.device)[:, None] * k  # [R, N] ids in [0, R*k)
    counts = torch.bincount(flat.reshape(-1), minlength=R * k).view(R, k)
    if Xc.device.type == "cpu":
        sums = torch.zeros(R, k, d, dtype=Xc.dtype)
        for r in range(R):
            sums[r].index_add_(0, labels[r], Xc)
        return sums, counts
    sums = torch.zeros(R * k, d, dtype=Xc.dtype, device=Xc.device)
    step = chunk_rows(R * k, chunk_size)
    for s in range(0, N, step):
        e = min(s + step, N)
        onehot = torch.zeros(e - s, R * k, dtype=Xc.dtype, device=Xc.device)
        onehot.scatter_(1, flat[:, s:e].T, 1.0)
        sums.addmm_(onehot.T, Xc[s:e])
    return sums.view(R, k, d), counts


def exact_sq_errors(
    Xc: torch.Tensor,
    labels: torch.Tensor,
    means: torch.Tensor,
    bases: torch.Tensor | None = None,
    coefs: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Squared reconstruction error per point for assigned flats -> [N] in Xc's dtype.

    labels [N], means [m, d]; for rank r > 0 also coefs [N, r] = U_l^T (x - mu_l) (bases is then unused).
    |x - mu_l|^2 comes from the difference itself (no |x|^2 - 2 x.c + |c|^2 cancellation); since U_l has
    orthonormal (or zero) columns, |x - mu_l - U_l a|^2 = |x - mu_l|^2 - |a|^2, which avoids gathering a
    [N, d, r] basis per point.
    """
    N, d = Xc.shape
    r = 0 if coefs is None else coefs.shape[1]
    out = torch.empty(N, dtype=Xc.dtype, device=Xc.device)
    step = chunk_rows(d, chunk_size)
    for s in range(0, N, step):
        e = min(s + step, N)
        diff = Xc[s:e] - means[labels[s:e]]
        out[s:e] = (diff * diff).sum(1)
        if r > 0:
            out[s:e] -= (coefs[s:e] * coefs[s:e]).sum(1)
    return out.clamp_min_(0)


def sq_dist_to_points(Xc: torch.Tensor, x_sq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Squared distances from the points Xc[idx] (any index shape S) to all points: [*S, N]."""
    P = Xc[idx]
    D = torch.matmul(P, Xc.T).mul_(-2.0)
    D += x_sq[idx][..., None]
    D += x_sq
    return D.clamp_min_(0)


def kmeans_plusplus(
    Xc: torch.Tensor, x_sq: torch.Tensor, k: int, n_restarts: int, generator: torch.Generator
) -> torch.Tensor:
    """Greedy k-means++ seeding for `n_restarts` independent restarts at once -> centres [R, k, d].

    Arthur & Vassilvitskii's D^2 sampling with 2 + floor(ln k) candidates per step; the candidate that
    lowers the total potential most is kept. The loop over the k centres is inherently sequential;
    restarts and candidates are batched.
    """
    N = Xc.shape[0]
    R = n_restarts
    n_trials = 2 + int(math.log(k))
    idx = torch.empty(R, k, dtype=torch.long, device=Xc.device)
    idx[:, 0] = torch.randint(N, (R,), generator=generator, device=Xc.device)
    closest = sq_dist_to_points(Xc, x_sq, idx[:, 0])  # [R, N]
    step = chunk_rows(R * n_trials)
    for j in range(1, k):
        w = closest.clone()
        w[w.sum(1) <= 0] = 1.0  # all points already centres (duplicates): sample uniformly
        cand = torch.multinomial(w, n_trials, replacement=True, generator=generator)  # [R, t]
        pots = torch.zeros(R, n_trials, dtype=torch.float64, device=Xc.device)
        for s in range(0, N, step):
            e = min(s + step, N)
            P = Xc[cand]  # [R, t, d]
            D = torch.matmul(P, Xc[s:e].T).mul_(-2.0)
            D += x_sq[cand][..., None]
            D += x_sq[s:e]
            D.clamp_min_(0)
            pots += torch.minimum(D, closest[:, None, s:e]).sum(2, dtype=torch.float64)
        best = cand.gather(1, pots.argmin(1, keepdim=True)).squeeze(1)
        idx[:, j] = best
        closest = torch.minimum(closest, sq_dist_to_points(Xc, x_sq, best))
    return Xc[idx]


def flip_signs(U: torch.Tensor) -> torch.Tensor:
    """Deterministic sign for basis columns [..., d, r]: the largest-|.| entry of each column is positive."""
    i = U.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(U.gather(-2, i))
    sign[sign == 0] = 1
    return U * sign


def _top_eigh(M: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest q eigenpairs of a symmetric float64 matrix, descending -> (values [q], vectors [n, q]).

    A full torch.linalg.eigh: exact, on any device. (scipy's subset MRRR driver is ~4x faster for q << n on one
    core, but its BLAS threads fight torch's for the cores; not worth the surprise.)
    """
    w, v = torch.linalg.eigh(M)
    return w[-q:].flip(0), v[:, -q:].flip(1)


def top_directions(Y: torch.Tensor, r: int, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r principal directions of already-centred rows Y [n, d] -> (U [d, r], singular values [r]).

    Exact, in float64: eigh of the d x d scatter matrix when n > d, else of the n x n Gram matrix (U = Y^T v / s,
    re-orthonormalised) -- both several times cheaper than an SVD of Y. Directions beyond the numerical rank of
    Y (fewer than r+1 points, duplicates, a degenerate cloud) come back as zero columns with singular value 0:
    the flat is then the affine hull of the data, a lower-rank piece, still optimal for those points and
    deterministic. The rank cut-off is s_i <= s_1 * max(max(n, d) * eps(dtype), 10 sqrt(max(n, d) eps64)),
    the second term being what squaring into a scatter/Gram matrix can resolve.
    """
    n, d = Y.shape
    U = torch.zeros(d, r, dtype=torch.float64, device=Y.device)
    s = torch.zeros(r, dtype=torch.float64, device=Y.device)
    if r == 0 or n == 0:
        return U.to(Y.dtype), s.to(Y.dtype)
    step = chunk_rows(max(n, d), chunk_size)
    if n > d:
        S = torch.zeros(d, d, dtype=torch.float64, device=Y.device)
        for a in range(0, n, step):
            Yb = Y[a : a + step].double()
            S.addmm_(Yb.T, Yb)
        q = min(r, d)
        evals, U[:, :q] = _top_eigh(S, q)
        s[:q] = evals.clamp_min(0).sqrt()
    else:
        Y64 = Y.double()
        q = min(r, n)
        evals, V = _top_eigh(Y64 @ Y64.T, q)
        s[:q] = evals.clamp_min(0).sqrt()
        U[:, :q] = (Y64.T @ V) / s[:q].clamp_min(torch.finfo(torch.float64).tiny)
    m = max(n, d)
    tol = s[0] * max(m * torch.finfo(Y.dtype).eps, 10 * (m * torch.finfo(torch.float64).eps) ** 0.5)
    keep = s > tol
    s[~keep] = 0
    U[:, ~keep] = 0
    if n <= d and bool(keep.any()):  # Gram path: U = Y^T V / s is orthonormal only up to rounding
        kq = int(keep.sum())  # kept columns are the leading ones (s is sorted)
        U[:, :kq] = torch.linalg.qr(U[:, :kq]).Q
    return flip_signs(U).to(Y.dtype), s.to(Y.dtype)


class ReferenceAE(nn.Module):
    """Common API of the reference autoencoders (scikit-learn names + the SAE names).

    `encode`/`transform`, `decode`/`inverse_transform`, `forward`/`reconstruct`, `score` (= mse, lower is
    better, unlike scikit-learn's score), `regions`, `n_parameters`. Subclasses set `W_dec`/`b_dec` and
    implement `fit` and `_encode`.
    """

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        self._device = torch.device(device)
        self._fitted = False
        self._dtype: torch.dtype | None = None
        self._d_in: int | None = None

    # ------------------------------------------------------------------ bookkeeping
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        self._require_fitted()
        return self._dtype

    @property
    def d_in(self) -> int:
        self._require_fitted()
        return self._d_in

    @property
    def d_sae(self) -> int:
        """Width of the code (the SAE name, so SAE-agnostic tools can size things)."""
        return self.W_dec.shape[0]

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802 (SAE name)
        raise NotImplementedError

    @property
    def b_dec(self) -> torch.Tensor:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):  # keep `device`/`dtype` in step with .to()/.cuda()/.double()
        out = super()._apply(fn, recurse)
        for b in self.buffers():
            self._device = b.device
            if b.is_floating_point() and self._dtype is not None:
                self._dtype = b.dtype
            break
        return out

    # ------------------------------------------------------------------ state_dict (save / load)
    _FIT_ATTRS: tuple[str, ...] = ()
    """Plain attributes `fit` sets (inertia_, n_iter_, ...): saved in the state_dict's extra state."""

    def get_extra_state(self) -> dict[str, Any]:
        return {"fitted": self._fitted, "d_in": self._d_in, **{a: getattr(self, a) for a in self._FIT_ATTRS}}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "fitted" not in state:
            raise CorruptFileError(f"{type(self).__name__}: not a reference-AE state_dict (bad extra state)")
        for a in self._FIT_ATTRS:
            if a in state:
                setattr(self, a, state[a])
        if state["fitted"]:
            missing = [n for n, b in self._buffers.items() if b is None and n in self._fitted_buffers()]
            if missing:
                raise CorruptFileError(f"{type(self).__name__}: the state_dict says fitted but lacks {missing}")
            self._fitted, self._d_in = True, int(state["d_in"])
            self._dtype = next(b.dtype for b in self.buffers() if b.is_floating_point())
            problem = self._loaded_mismatch()
            if problem:
                self._fitted = False
                raise ConfigError(f"{type(self).__name__}: the state_dict does not fit its settings: {problem}")

    def _loaded_mismatch(self) -> str | None:
        """What a loaded state disagrees with in the constructor's settings (n_clusters, rank...), if anything."""
        return None

    def _fitted_buffers(self) -> list[str]:
        return [n for n in self._buffers if n != "labels_"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # an unfitted model holds None buffers, which nn.Module would skip: give them the saved shapes first
        for name, buf in list(self._buffers.items()):
            src = state_dict.get(prefix + name)
            if buf is None and isinstance(src, torch.Tensor):
                self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=self._device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call fit(X) first")

    def _fit_input(self, X) -> torch.Tensor:
        """Validate training data and copy it to the model's device (fit is the one place that moves data)."""
        X = check_data(X, name="X")
        if X.dtype not in FIT_DTYPES:
            raise DTypeError(f"X has dtype {X.dtype}; fit needs float32 or float64 (convert with X.float())")
        return X.to(self._device)

    def _check_x(self, X, name: str = "X") -> torch.Tensor:
        self._require_fitted()
        return check_data(X, self._d_in, name=name, dtype=self._dtype, device=self._device, allow_empty=True)

    def _mark_fitted(self, X: torch.Tensor) -> None:
        self._fitted = True
        self._dtype = X.dtype
        self._d_in = X.shape[1]

    def _sq_error_sum(self, X: torch.Tensor) -> float:
        """Sum of squared reconstruction errors of the stored model on X, in float64 (the objective it achieves)."""
        return float(((X.double() - self.forward(X).double()) ** 2).sum())

    # ------------------------------------------------------------------ the autoencoder
    def fit(self, X, **kwargs) -> ReferenceAE:
        raise NotImplementedError

    def _encode(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, X) -> torch.Tensor:
        """Code of X [N, d_in] -> [N, d_sae]."""
        return self._encode(self._check_x(X))

    @torch.no_grad()
    def decode(self, Z) -> torch.Tensor:
        """x_hat = Z @ W_dec + b_dec (a linear decoder, like an SAE's)."""
        self._require_fitted()
        Z = as_tensor(Z, "Z")
        if Z.ndim != 2 or Z.shape[1] != self.d_sae:
            raise ShapeError(f"Z must have shape [N, d_sae={self.d_sae}], got {tuple(Z.shape)}")
        check_data(Z, name="Z", dtype=self._dtype, device=self._device, allow_empty=True)
        return Z @ self.W_dec + self.b_dec

    def forward(self, X) -> torch.Tensor:
        """Reconstruction decode(encode(X))."""
        return self.decode(self.encode(X))

    def transform(self, X) -> torch.Tensor:
        """scikit-learn name of `encode`."""
        return self.encode(X)

    def inverse_transform(self, Z) -> torch.Tensor:
        """scikit-learn name of `decode`."""
        return self.decode(Z)

    def reconstruct(self, X) -> torch.Tensor:
        return self.forward(X)

    def fit_transform(self, X, **kwargs) -> torch.Tensor:
        self.fit(X, **kwargs)
        return self.encode(as_tensor(X, "X").to(self._device))

    @torch.no_grad()
    def score(self, X) -> float:
        """Reconstruction mse, mean over all elements (lower is better; SAELens/SAEBench `mse`)."""
        X = self._check_x(X)
        if X.shape[0] == 0:
            raise ShapeError("score needs at least one row")
        err = (X - self.forward(X)).pow(2).sum(dtype=torch.float64)
        return float(err) / X.numel()

    def regions(self, X) -> torch.Tensor:
        """Region (cluster) id of every row, int64 [N]."""
        raise NotImplementedError

    def n_parameters(self) -> int:
        raise NotImplementedError
