"""Exact closed-form decoder update of PAM-SGD (paper_splinterp.md section 4.3).

With the codes z_r fixed, the decoder block of the PAM objective

    sum_r |x_r - z_r W - b|^2 + alpha |W|^2 + beta |b|^2 + mu |W - W_prev|^2 + nu |b - b_prev|^2

(W = W_dec [d_sae, d_in], b = b_dec [d_in], rows x_r, z_r) is a ridge / proximal least-squares problem in
(W, b) jointly. Setting both gradients to zero gives the (d_sae + 1) x (d_sae + 1) block system

    [ G + (alpha + mu) I    s_z           ] [ W   ]   [ S_zx + mu W_prev           ]
    [ s_z^T                 N + beta + nu ] [ b^T ] = [ s_x^T + nu b_prev^T        ]

with G = sum z z^T, S_zx = sum z x^T, s_z = sum z, s_x = sum x. Eliminating b gives the paper's form
(A = G + (alpha+mu) I - s_z s_z^T / (N + beta + nu), ...); solving the block system directly is the same
answer and needs no special case for the intercept.

Only these sufficient statistics are needed, so they are accumulated over batches
(`DecoderAccumulator`) and the solve is exact however the data are split. Sparse codes (k non-zeros per
row) make G cost O(N k^2) by scattering the k x k outer products instead of O(N d_sae^2) by a dense
matmul; S_zx costs O(N k d_in). Statistics are kept in float64: G's condition number is the square of Z's.

Weight scales (`scale=`): "absolute" takes alpha, beta, mu, nu as the numbers in the objective above.
"relative" reads them in units of the problem: alpha and mu are multiplied by g = trace(G) / d_sae (the
data weight sum_r z_ri^2 of an average latent), beta and nu by N (the data weight of the bias). Then the
step is equivariant under rescaling: for any c != 0 and s, codes c Z, data s X and anchors (s/c) W_prev,
s b_prev give (s/c) W and s b, because every term of the objective scales by s^2 (g by c^2). With c = s:
the same W and a b scaled by c. In absolute units the same ridge means more or less depending on the
scale of the codes, which is how a fixed 1e-6 ridge can be negligible on one data set and not on another.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from splinterp.errors import ConfigError, DTypeError, EmptyDataError, NonFiniteError, ShapeError
from splinterp.validation import all_finite, check_data, check_finite

log = logging.getLogger(__name__)

# elements per scatter chunk: temporaries of this many values stay cache-sized (measured best near 1M)
_CHUNK_ELEMS = 1 << 20
# condition-number estimate above which the Cholesky answer is not trusted
_MAX_COND = 1e13


_SPLIT_MIN_ROWS = 4096
_SPLIT_MAX_BYTES = 1 << 30
WORKER_THREAD_NAME = "splinterp-decoder"
"""Name of the helper thread that scatters half of a large CPU batch; it lives only during that update."""

Scale = Literal["absolute", "relative"]
SCALES = ("absolute", "relative")


class DecoderWeights(NamedTuple):
    """The weights of the decoder objective in absolute units (the numbers the solve uses)."""

    alpha: float
    beta: float
    mu: float
    nu: float


def _scatter_sparse(bufs: tuple[torch.Tensor, ...], vals: torch.Tensor, idx: torch.Tensor, X: torch.Tensor) -> None:
    """Add sparse codes (vals, idx [n, k]) and their inputs X [n, d_in] into (P, g_diag, S_zx, s_z)."""
    P2, g_diag, S_zx, s_z = bufs
    n, k = vals.shape
    d = P2.shape[0]
    flat_idx, flat_vals = idx.reshape(-1), vals.reshape(-1)
    s_z.index_add_(0, flat_idx, flat_vals)
    # G: scatter-add of the outer products, O(N k^2). Only position pairs a < b are scattered (into P);
    # G = P + P^T + diag(sum v^2), which stays right when an index repeats within a row.
    if k > 1:
        a, b = torch.triu_indices(k, k, 1, device=idx.device)
        upper = a * k + b  # positions of the pairs a < b in a row's flattened k x k outer product
        P = P2.view(-1)
        rows = max(1, _CHUNK_ELEMS // (k * k))
        for s in range(0, n, rows):
            v, i = vals[s:s + rows], idx[s:s + rows]
            m = v.shape[0]
            keys = (i[:, :, None] * d + i[:, None, :]).reshape(m, k * k).index_select(1, upper)
            prods = (v[:, :, None] * v[:, None, :]).reshape(m, k * k).index_select(1, upper)
            P.scatter_add_(0, keys.reshape(-1), prods.reshape(-1))  # serial on CPU: deterministic
    g_diag.index_add_(0, flat_idx, flat_vals * flat_vals)
    # S_zx = Z^T X, with Z^T as a sparse [d_sae, N] matrix (k entries per column): O(N k d_in)
    rows_of = torch.arange(n, device=idx.device).repeat_interleave(k)
    Zt = torch.sparse_coo_tensor(torch.stack([flat_idx, rows_of]), flat_vals, (d, n), check_invariants=False)
    S_zx += torch.sparse.mm(Zt, X)


@dataclass
class SparseCodes:
    """Codes stored as k (value, latent index) pairs per row: z_r = sum_j values[r, j] e_{indices[r, j]}.

    Padding entries carry value 0 (any index). Repeated indices in a row add up, as in `to_dense`.
    """

    values: torch.Tensor  # [N, k] float
    indices: torch.Tensor  # [N, k] int64
    d_sae: int

    def __post_init__(self) -> None:
        v, i = self.values, self.indices
        if not isinstance(v, torch.Tensor) or not isinstance(i, torch.Tensor):
            raise DTypeError("SparseCodes values and indices must be torch tensors")
        if v.ndim != 2 or i.shape != v.shape:
            raise ShapeError(f"SparseCodes values and indices must both be [N, k]; got {tuple(v.shape)} and "
                             f"{tuple(i.shape)}")
        if not v.is_floating_point():
            raise DTypeError(f"SparseCodes values must be floating point, got {v.dtype}")
        if i.dtype not in (torch.int64, torch.int32):
            raise DTypeError(f"SparseCodes indices must be int64 (or int32), got {i.dtype}")
        if isinstance(self.d_sae, bool) or not isinstance(self.d_sae, int) or self.d_sae < 1:
            raise ConfigError(f"SparseCodes d_sae must be a positive integer, got {self.d_sae!r}")
        if i.numel() and (int(i.min()) < 0 or int(i.max()) >= self.d_sae):
            raise ShapeError(f"SparseCodes indices must lie in [0, {self.d_sae}), got range "
                             f"[{int(i.min())}, {int(i.max())}]")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.d_sae)

    def __len__(self) -> int:
        return self.values.shape[0]

    def __getitem__(self, rows) -> SparseCodes:
        return SparseCodes(self.values[rows], self.indices[rows], self.d_sae)

    def to_dense(self) -> torch.Tensor:
        z = torch.zeros(self.values.shape[0], self.d_sae, dtype=self.values.dtype, device=self.values.device)
        return z.scatter_add_(1, self.indices.long(), self.values)

    @classmethod
    def from_dense(cls, z: torch.Tensor, k: int | None = None) -> SparseCodes:
        """Keep the k largest |z| per row (k = the largest row count of non-zeros if None): exact when
        no row has more than k non-zeros."""
        if z.ndim != 2:
            raise ShapeError(f"codes must be 2-D [N, d_sae], got {tuple(z.shape)}")
        if k is None:
            k = int((z != 0).sum(1).max()) if z.shape[0] else 0
        k = max(1, min(int(k), z.shape[1]))
        idx = torch.topk(z.abs(), k, dim=1, sorted=False).indices
        return cls(torch.gather(z, 1, idx), idx, z.shape[1])


class DecoderAccumulator:
    """Sufficient statistics (G = sum z z^T, S_zx = sum z x^T, s_z, s_x, N) of the decoder problem.

    `update` batch by batch (dense or `SparseCodes` codes), then `solve`: the answer equals the
    full-batch `solve_decoder` on the concatenated data.
    """

    def __init__(self, d_sae: int, d_in: int, *, dtype: torch.dtype = torch.float64,
                 device: str | torch.device = "cpu", method: str = "auto"):
        if method not in ("auto", "sparse", "dense"):
            raise ConfigError(f"method must be 'auto', 'sparse' or 'dense', got {method!r}")
        self.d_sae, self.d_in, self.dtype, self.device, self.method = d_sae, d_in, dtype, torch.device(device), method
        # G = sum z z^T is kept as P + P^T + diag(g_diag) (see _update_sparse)
        self._P = torch.zeros(d_sae, d_sae, dtype=dtype, device=self.device)
        self._g_diag = torch.zeros(d_sae, dtype=dtype, device=self.device)
        self._S_zx = torch.zeros(d_sae, d_in, dtype=dtype, device=self.device)
        self._s_z = torch.zeros(d_sae, dtype=dtype, device=self.device)
        self.s_x = torch.zeros(d_in, dtype=dtype, device=self.device)
        self.n = 0
        self._aux: tuple[torch.Tensor, ...] | None = None  # second-half partial sums (see _update_sparse)

    @property
    def S_zx(self) -> torch.Tensor:
        """sum_r z_r x_r^T [d_sae, d_in]."""
        self._fold()
        return self._S_zx

    @property
    def s_z(self) -> torch.Tensor:
        """sum_r z_r [d_sae]."""
        self._fold()
        return self._s_z

    @property
    def G(self) -> torch.Tensor:
        """sum_r z_r z_r^T [d_sae, d_sae]."""
        self._fold()
        G = self._P + self._P.T
        G.diagonal().add_(self._g_diag)
        return G

    def sum_tensors(self) -> list[torch.Tensor]:
        """The accumulated sums (in place, fixed order). Adding these and `n` across accumulators merges
        them: `splinterp.distributed` all-reduces them so every process solves the same system."""
        self._fold()
        return [self._P, self._g_diag, self._S_zx, self._s_z, self.s_x]

    # ------------------------------------------------------------------ accumulation
    def update(self, Z: torch.Tensor | SparseCodes, X: torch.Tensor, *, check: bool = True) -> DecoderAccumulator:
        """Add a batch: codes Z ([B, d_sae] dense or SparseCodes) and the inputs X [B, d_in] they encode.

        `check=False` skips the finiteness scans (for callers that validated the data already).
        """
        if check:
            X = check_data(X, self.d_in, name="X", allow_empty=True)
        elif X.ndim != 2 or X.shape[1] != self.d_in:
            raise ShapeError(f"X must be [N, d_in={self.d_in}], got {tuple(X.shape)}")
        n = X.shape[0]
        if isinstance(Z, SparseCodes):
            if Z.d_sae != self.d_sae:
                raise ShapeError(f"SparseCodes has d_sae={Z.d_sae}, the accumulator d_sae={self.d_sae}")
            if len(Z) != n:
                raise ShapeError(f"codes have {len(Z)} rows but X has {n}")
            if check:
                check_finite(Z.values, "Z.values")
            sparse = Z
            if self.method == "dense" or (self.method == "auto" and 8 * Z.values.shape[1] > self.d_sae):
                Z, sparse = Z.to_dense(), None  # wide padded codes: a BLAS Gram matrix is cheaper
        else:
            if not isinstance(Z, torch.Tensor) or Z.ndim != 2 or Z.shape != (n, self.d_sae):
                shape = tuple(Z.shape) if hasattr(Z, "shape") else type(Z).__name__
                raise ShapeError(f"Z must be [N={n}, d_sae={self.d_sae}] (or SparseCodes), got {shape}")
            if Z.is_sparse or Z.layout != torch.strided:
                Z = Z.to_dense()
            if not Z.is_floating_point():
                raise DTypeError(f"Z must be floating point, got {Z.dtype}")
            if check:
                check_finite(Z, "Z")
            sparse = None
            if self.method != "dense" and n:
                kmax = int((Z != 0).sum(1).max())
                # scatter of k x k outer products beats a BLAS Gram matrix only for clearly sparse codes
                if self.method == "sparse" or 8 * kmax <= self.d_sae:
                    sparse = SparseCodes.from_dense(Z, kmax)
        if n == 0:
            return self
        X = X.to(device=self.device, dtype=self.dtype)
        if sparse is not None:
            self._update_sparse(sparse.values.to(device=self.device, dtype=self.dtype),
                                sparse.indices.to(device=self.device, dtype=torch.int64), X)
        else:
            Z = Z.to(device=self.device, dtype=self.dtype)
            self._P.addmm_(Z.T, Z, alpha=0.5)
            self._S_zx.addmm_(Z.T, X)
            self._s_z += Z.sum(0)
        self.s_x += X.sum(0)
        self.n += n
        return self

    def _update_sparse(self, vals: torch.Tensor, idx: torch.Tensor, X: torch.Tensor) -> None:
        n = vals.shape[0]
        main = (self._P, self._g_diag, self._S_zx, self._s_z)
        # On CPU a large batch is split in two halves summed into separate buffers, the second half on a
        # worker thread when torch has more than one thread (the scatter itself is serial). The split is a
        # fixed function of (device, d_sae, n), so results are the same bits whatever the thread count.
        split = (self.device.type == "cpu" and n >= _SPLIT_MIN_ROWS
                 and self.d_sae * self.d_sae * vals.element_size() <= _SPLIT_MAX_BYTES)
        if not split:
            _scatter_sparse(main, vals, idx, X)
            return
        if self._aux is None:
            self._aux = tuple(torch.zeros_like(t) for t in main)
        h = n // 2
        if torch.get_num_threads() > 1:
            # a thread scoped to this call (no pool outlives it); starting one costs microseconds, the
            # scatter of >= 2048 rows milliseconds
            err: list[BaseException] = []

            def second_half() -> None:
                try:
                    _scatter_sparse(self._aux, vals[h:], idx[h:], X[h:])
                except BaseException as e:  # re-raised in the caller's thread below
                    err.append(e)

            t = threading.Thread(target=second_half, name=WORKER_THREAD_NAME, daemon=True)
            t.start()
            try:
                _scatter_sparse(main, vals[:h], idx[:h], X[:h])
            finally:
                t.join()
            if err:
                raise err[0]
        else:
            _scatter_sparse(main, vals[:h], idx[:h], X[:h])
            _scatter_sparse(self._aux, vals[h:], idx[h:], X[h:])

    def _fold(self) -> None:
        """Add the second-half buffers into the main ones (before anything reads the sums)."""
        if self._aux is not None:
            for t, a in zip((self._P, self._g_diag, self._S_zx, self._s_z), self._aux):
                t += a
            self._aux = None

    # ------------------------------------------------------------------ solve
    def latent_energy(self) -> float:
        """g = trace(G) / d_sae = sum_r |z_r|^2 / d_sae: the data weight of an average latent in the
        objective (the unit of alpha and mu under scale="relative")."""
        self._fold()
        return float(2.0 * self._P.diagonal().sum() + self._g_diag.sum()) / self.d_sae

    def weights(self, alpha: float = 0.0, beta: float = 0.0, mu: float = 0.0, nu: float = 0.0,
                scale: Scale = "absolute") -> DecoderWeights:
        """The objective's weights in absolute units: as given ("absolute"), or alpha, mu times
        `latent_energy()` and beta, nu times N ("relative"; see the module docstring)."""
        for name, v in (("alpha", alpha), ("beta", beta), ("mu", mu), ("nu", nu)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or v == float("inf"):
                raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
        if scale not in SCALES:
            raise ConfigError(f"scale must be one of {SCALES}, got {scale!r}")
        if scale == "absolute":
            return DecoderWeights(float(alpha), float(beta), float(mu), float(nu))
        g, n = self.latent_energy(), float(self.n)
        return DecoderWeights(float(alpha) * g, float(beta) * n, float(mu) * g, float(nu) * n)

    def solve(self, alpha: float = 0.0, beta: float = 0.0, mu: float = 0.0, nu: float = 0.0,
              W_prev: torch.Tensor | None = None, b_prev: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None, *, scale: Scale = "absolute") -> tuple[torch.Tensor, torch.Tensor]:
        """Exact joint minimiser (W_dec [d_sae, d_in], b_dec [d_in]) of the accumulated problem, with the
        weights read in `scale` units (see `weights`).

        Latents that never fired carry no data term: with alpha + mu = 0 their rows are undetermined, so
        they keep W_prev's row (zero without W_prev) and the rest is solved exactly. A system that is
        still singular or badly conditioned falls back to an eigendecomposition (minimum-norm solution)
        with a logged warning.
        """
        self._fold()
        if self.n == 0:
            raise EmptyDataError("the decoder accumulator has seen no rows; cannot solve")
        if not (all_finite(self._s_z) and all_finite(self._g_diag)):
            raise NonFiniteError("the codes contain NaN or inf (an encoder that diverged?); cannot solve")
        asked = (alpha, beta, mu, nu)
        alpha, beta, mu, nu = self.weights(alpha, beta, mu, nu, scale)
        d, n_in = self.d_sae, self.d_in
        out_dtype = out_dtype or torch.float32
        Wp = _check_prev(W_prev, (d, n_in), "W_prev", self.device, self.dtype)
        bp = _check_prev(b_prev, (n_in,), "b_prev", self.device, self.dtype)
        if asked[2] > 0 and Wp is None:
            raise ConfigError("mu > 0 pulls W_dec towards W_prev, which was not given")
        if asked[3] > 0 and bp is None:
            raise ConfigError("nu > 0 pulls b_dec towards b_prev, which was not given")

        ridge = float(alpha) + float(mu)
        G = self.G
        used = torch.ones(d, dtype=torch.bool, device=self.device)
        if ridge == 0.0:
            used = G.diagonal() > 0
        S = used.nonzero().squeeze(1)
        m = S.numel()
        M = torch.empty(m + 1, m + 1, dtype=self.dtype, device=self.device)
        M[:m, :m] = G if m == d else G[S][:, S]
        del G
        M[:m, :m].diagonal().add_(ridge)
        M[:m, m] = self._s_z[S]
        M[m, :m] = self._s_z[S]
        M[m, m] = self.n + float(beta) + float(nu)
        R = torch.empty(m + 1, n_in, dtype=self.dtype, device=self.device)
        R[:m] = self._S_zx[S]
        R[m] = self.s_x
        if mu > 0:
            R[:m] += float(mu) * Wp[S]
        if nu > 0:
            R[m] += float(nu) * bp
        sol = _spd_solve(M, R)
        W = Wp.clone() if Wp is not None else torch.zeros(d, n_in, dtype=self.dtype, device=self.device)
        W[S] = sol[:m]
        if m < d:
            log.debug("decoder solve: %d of %d latents never fired; their rows are kept", d - m, d)
        return W.to(out_dtype), sol[m].to(out_dtype)


def _check_prev(t, shape, name, device, dtype):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if hasattr(t, "shape") else type(t).__name__
        raise ShapeError(f"{name} must have shape {shape}, got {got}")
    if not all_finite(t):
        raise NonFiniteError(f"{name} contains NaN or inf")
    return t.detach().to(device=device, dtype=dtype)


def _spd_solve(M: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Solve M X = R for symmetric positive semi-definite M: Cholesky, else eigh pseudo-inverse."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        dg = L.diagonal()
        cond_est = float((dg.max() / dg.min()) ** 2)
        if cond_est < _MAX_COND:
            return torch.cholesky_solve(R, L)
        reason = f"condition number about {cond_est:.1e}"
    else:
        reason = "the system is singular (Cholesky failed)"
    evals, evecs = torch.linalg.eigh(M)
    cutoff = evals.abs().max() * M.shape[0] * torch.finfo(M.dtype).eps
    keep = evals > cutoff
    log.warning("decoder solve: %s; using the minimum-norm eigendecomposition solution (%d of %d directions "
                "kept). Add a small alpha or mu_dec to make the problem well posed.",
                reason, int(keep.sum()), M.shape[0])
    V = evecs[:, keep]
    return V @ ((V.T @ R) / evals[keep, None])


def solve_decoder(Z: torch.Tensor | SparseCodes, X: torch.Tensor, alpha: float = 0.0, beta: float = 0.0,
                  mu: float = 0.0, nu: float = 0.0, W_prev: torch.Tensor | None = None,
                  b_prev: torch.Tensor | None = None, *, method: str = "auto",
                  batch_size: int = 65536, scale: Scale = "absolute") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact joint minimiser (W_dec [d_sae, d_in], b_dec [d_in]) of
    sum_r |x_r - z_r W - b|^2 + alpha|W|^2 + beta|b|^2 + mu|W - W_prev|^2 + nu|b - b_prev|^2,
    the weights read in `scale` units ("absolute": as given; "relative": see the module docstring).

    Z: dense [N, d_sae], a torch sparse tensor, or `SparseCodes` (values/indices [N, k]). Computed in
    float64 and returned in X's dtype. `method`: "sparse" (scatter, O(N k^2)), "dense" (BLAS Gram matrix)
    or "auto" (sparse when rows have at most d_sae/8 non-zeros).
    """
    X = check_data(X, name="X")
    if isinstance(Z, SparseCodes):
        d_sae = Z.d_sae
    elif isinstance(Z, torch.Tensor) and Z.ndim == 2:
        d_sae = Z.shape[1]
    else:
        shape = tuple(Z.shape) if hasattr(Z, "shape") else type(Z).__name__
        raise ShapeError(f"Z must be [N, d_sae] (dense or sparse tensor) or SparseCodes, got {shape}")
    if (len(Z) if isinstance(Z, SparseCodes) else Z.shape[0]) != X.shape[0]:
        raise ShapeError(f"Z has {Z.shape[0]} rows but X has {X.shape[0]}")
    if isinstance(Z, torch.Tensor) and Z.layout != torch.strided:
        Z = Z.to_dense()
    acc = DecoderAccumulator(d_sae, X.shape[1], device=X.device, method=method)
    for s in range(0, X.shape[0], batch_size):
        acc.update(Z[s:s + batch_size], X[s:s + batch_size])
    return acc.solve(alpha, beta, mu, nu, W_prev, b_prev, out_dtype=X.dtype, scale=scale)
