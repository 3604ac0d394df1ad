"""k-means + local PCA autoencoder (k-flats): the optimal piecewise-affine autoencoder with rank-r pieces.

Each region j has a mean mu_j and an orthonormal basis U_j [d, r]. A point goes to the region whose affine flat
reconstructs it best, argmin_j |(I - U_j U_j^T)(x - mu_j)|^2, and is reconstructed as mu_j + U_j U_j^T (x - mu_j).
Fitting alternates the two exact block minimisations (Bradley-Mangasarian k-flats / Kambhatla-Leen local PCA):
assignment for fixed flats, then per-region mean + top-r PCA (Eckart-Young) for fixed regions. Neither step can
raise the objective, so `objective_history_` never increases. Rank 0 is Lloyd's k-means, step for step.

Code layout (`encode`): n_regions blocks of width 1 + rank, block j = [1, U_j^T (x - mu_j)] for the assigned
region and zeros elsewhere, so Z has shape [N, n_regions * (1 + rank)] and at most 1 + rank non-zeros per row.
The leading 1 is the region indicator: it makes the region recoverable from the code even where the
coefficients are all zero (x at the mean, rank 0, a one-point region), and it makes the decoder linear,
decode(Z) = Z @ W_dec with W_dec rows [mu_j; U_j^T] per block -- the same form as an SAE decoder, so SAE metrics
apply unchanged. At rank 0 the code is exactly the k-means one-hot code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from splinterp.errors import ConfigError, DTypeError, ShapeError
from splinterp.reference._base import (
    ReferenceAE,
    center,
    check_sq_norms,
    chunk_rows,
    cluster_sums,
    exact_sq_errors,
    nearest_centres,
    scale_back,
    scale_exponent,
    times_4_pow,
    times_pow2,
    top_directions,
    tqdm_disable,
)
from splinterp.reference.kmeans import KMeansAE
from splinterp.validation import as_tensor, check_dataclass_types, check_device, check_finite, check_positive_int

log = logging.getLogger(__name__)


@dataclass
class LocalPCAConfig:
    n_regions: int
    """Number of regions (clusters), each with its own affine piece."""
    rank: int
    """Dimension of each region's PCA subspace (0: k-means)."""
    n_init: int = 1
    """Restarts, restart i initialised from KMeansAE(seed=seed + i); the lowest objective is kept."""
    max_iter: int = 100
    """Most alternations of assignment and per-region PCA."""
    tol: float = 1e-6
    """Stop when no label changes or the objective falls by <= tol * objective in one iteration."""
    kmeans_n_init: int = 10
    """Restarts of the k-means that initialises the regions."""
    kmeans_max_iter: int = 300
    """Most Lloyd iterations of that k-means."""
    seed: int = 0
    """Seed of the k-means initialisation (a private generator)."""
    device: str = "cpu"
    """Device the fit runs on."""
    chunk_size: int | None = None
    """Rows per distance chunk; None picks one that keeps temporaries under 64 MiB."""
    progress: bool | None = None
    """tqdm bars; None shows them only for big fits."""

    def __post_init__(self) -> None:
        check_dataclass_types(self, "LocalPCAAE")  # wrong types (seed=1.5, tol="x", progress="yes") before meaning
        check_device(self.device)
        check_positive_int(self.n_regions, "n_regions")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"rank must be an integer >= 0, got {self.rank!r}")
        for name in ("n_init", "max_iter", "kmeans_n_init", "kmeans_max_iter"):
            check_positive_int(getattr(self, name), name)
        if not self.tol >= 0:
            raise ConfigError(f"tol must be >= 0, got {self.tol!r}")
        if self.chunk_size is not None:
            check_positive_int(self.chunk_size, "chunk_size")


def assign_to_flats(
    Xc: torch.Tensor,
    x_sq: torch.Tensor,
    means: torch.Tensor,
    bases: torch.Tensor,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best flat for every point -> (labels [N], squared error from the expansion [N], coefficients [N, r]).

    err_j(x) = |x - mu_j|^2 - |U_j^T x - U_j^T mu_j|^2, all regions from one GEMM X @ [mu | U_1 .. U_m] per chunk
    (valid because each U_j has orthonormal or zero columns). Rank 0 is `nearest_centres`, the k-means rule.
    """
    m, d, r = bases.shape
    N = Xc.shape[0]
    if r == 0:
        labels, err = nearest_centres(Xc, x_sq, means[None], chunk_size)
        return labels[0], err[0], Xc.new_zeros(N, 0)
    W = torch.cat([means.T, bases.permute(1, 0, 2).reshape(d, m * r)], dim=1)  # [d, m + m r]
    m_sq = (means * means).sum(1)
    muU = torch.einsum("md,mdr->mr", means, bases)
    labels = torch.empty(N, dtype=torch.long, device=Xc.device)
    err = torch.empty(N, dtype=Xc.dtype, device=Xc.device)
    coefs = torch.empty(N, r, dtype=Xc.dtype, device=Xc.device)
    step = chunk_rows(m * (1 + r), chunk_size)
    for s in range(0, N, step):
        e = min(s + step, N)
        A = Xc[s:e] @ W
        P = A[:, m:].view(e - s, m, r) - muU
        D = m_sq - 2.0 * A[:, :m]
        D -= (P * P).sum(2)
        v, i = D.min(dim=1)
        labels[s:e] = i
        err[s:e] = (v + x_sq[s:e]).clamp_min_(0)
        coefs[s:e] = P[torch.arange(e - s, device=Xc.device), i]
    return labels, err, coefs


def fit_flats(
    Xc: torch.Tensor,
    labels: torch.Tensor,
    err: torch.Tensor,
    m: int,
    r: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal flats for fixed regions -> (means [m, d], bases [m, d, r]).

    Means from one batched one-hot GEMM; bases by exact per-region PCA (the one loop over regions: each
    iteration is a dense eigh/SVD on that region's points). An empty region is re-seeded as a point-flat at the
    worst-reconstructed point (largest `err` first, ties to the lower index), exactly as k-means re-seeds.
    """
    d = Xc.shape[1]
    sums, counts = cluster_sums(Xc, labels[None], m, chunk_size)
    sums, counts = sums[0], counts[0]
    means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
    bases = Xc.new_zeros(m, d, r)
    if r > 0:
        order = torch.argsort(labels, stable=True)
        ends = torch.cumsum(counts, 0).tolist()
        starts = [0] + ends[:-1]
        for j in range(m):
            if counts[j] >= 2:
                Y = Xc[order[starts[j] : ends[j]]] - means[j]
                bases[j], _ = top_directions(Y, r, chunk_size)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel():
        far = torch.argsort(err, descending=True, stable=True)[: empty.numel()]
        means[empty] = Xc[far]
        bases[empty] = 0
        log.debug("local PCA: re-seeded %d empty region(s)", empty.numel())
    return means, bases


class LocalPCAAE(ReferenceAE):
    """k-means + local PCA autoencoder (k-flats), torch-backed, scikit-learn style.

    `encode(X)` -> [N, n_regions * (1 + rank)] block-sparse code (see the module docstring for the layout);
    `decode(Z)` = Z @ W_dec (linear; the region is carried by the code's indicator entry); `regions(X)` ->
    int64 region ids; `regions_from_code(Z)` reads them back from a code.

    Attributes after `fit`: `means_` [m, d], `bases_` [m, d, r] (orthonormal columns; zero columns past a
    region's numerical rank, e.g. a region with <= rank points), `labels_`, `objective_` (sum of squared
    reconstruction errors on the training data), `objective_history_` (after every assignment step, starting
    with the k-means initialisation), `n_iter_`.
    """

    _FIT_ATTRS = ("objective_", "objective_history_", "n_iter_")

    def __init__(
        self,
        n_regions: int,
        rank: int,
        n_init: int = 1,
        max_iter: int = 100,
        tol: float = 1e-6,
        kmeans_n_init: int = 10,
        kmeans_max_iter: int = 300,
        seed: int = 0,
        device: str | torch.device = "cpu",
        chunk_size: int | None = None,
        progress: bool | None = None,
    ):
        cfg = LocalPCAConfig(
            n_regions,
            rank,
            n_init,
            max_iter,
            tol,
            kmeans_n_init,
            kmeans_max_iter,
            seed,
            str(device),
            chunk_size,
            progress,
        )
        super().__init__(cfg.device)
        self.cfg = cfg
        self.register_buffer("_offset", None)
        self.register_buffer("_means", None)  # centred by _offset
        self.register_buffer("bases_", None)
        self.register_buffer("labels_", None)
        self.objective_: float | None = None
        self.objective_history_: list[float] = []
        self.n_iter_: int | None = None

    @classmethod
    def from_config(cls, cfg: LocalPCAConfig) -> LocalPCAAE:
        return cls(**vars(cfg))

    @property
    def n_regions(self) -> int:
        return self.cfg.n_regions

    @property
    def rank(self) -> int:
        return self.cfg.rank

    def _loaded_mismatch(self) -> str | None:
        m, _, r = self.bases_.shape
        ok = (m, r) == (self.n_regions, self.rank)
        return None if ok else f"{m} regions of rank {r}, n_regions={self.n_regions} and rank={self.rank}"

    @property
    def means_(self) -> torch.Tensor:
        self._require_fitted()
        return self._means + self._offset

    @property
    def region_ranks_(self) -> torch.Tensor:
        """Number of non-zero basis columns per region (< rank where a region is degenerate)."""
        self._require_fitted()
        return (self.bases_.abs().sum(1) > 0).sum(1)

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802
        """[n_regions * (1 + rank), d]: per block the mean, then the basis vectors as rows."""
        self._require_fitted()
        m, d, r = self.bases_.shape
        blocks = torch.cat([self.means_[:, None, :], self.bases_.transpose(1, 2)], dim=1)  # [m, 1 + r, d]
        return blocks.reshape(m * (1 + r), d)

    @property
    def b_dec(self) -> torch.Tensor:
        self._require_fitted()
        return torch.zeros_like(self._offset)

    # ------------------------------------------------------------------ fitting
    def _run(self, Xc, x_sq, means, bases, bar_desc: str, disable: bool | None):
        """Alternate assignment / flat fitting from the given flats; returns the final state."""
        cfg = self.cfg
        m, r = cfg.n_regions, cfg.rank
        labels, err, coefs = assign_to_flats(Xc, x_sq, means, bases, cfg.chunk_size)
        obj = float(exact_sq_errors(Xc, labels, means, bases, coefs, cfg.chunk_size).sum(dtype=torch.float64))
        history = [obj]
        n_iter = 0
        for _ in tqdm(range(cfg.max_iter), desc=bar_desc, disable=disable, leave=False):
            means, bases = fit_flats(Xc, labels, err, m, r, cfg.chunk_size)
            n_iter += 1
            new_labels, err, coefs = assign_to_flats(Xc, x_sq, means, bases, cfg.chunk_size)
            new_obj = float(
                exact_sq_errors(Xc, new_labels, means, bases, coefs, cfg.chunk_size).sum(dtype=torch.float64)
            )
            history.append(new_obj)
            converged = bool((new_labels == labels).all()) or (obj - new_obj) <= cfg.tol * obj
            labels, obj = new_labels, new_obj
            if converged:
                break
        return means, bases, labels, obj, history, n_iter

    @torch.no_grad()
    def fit(self, X, init=None) -> LocalPCAAE:
        """Fit on X [N, d] (tensor or numpy, float32/float64; copied to `device`).

        `init`: optional initial means [n_regions, d] (rank-0 flats, a single run); by default each restart
        starts from a KMeansAE fit (its centroids as rank-0 flats), so the first assignment is k-means'.
        """
        cfg = self.cfg
        X = self._fit_input(X)
        N, d = X.shape
        m, r = cfg.n_regions, cfg.rank
        if m > N:
            raise ConfigError(f"n_regions={m} is larger than the number of points N={N}")
        if r > d:
            raise ConfigError(f"rank={r} is larger than the data dimension d={d}")
        e = scale_exponent(X)  # fit on X * 2^-e (exact; squared errors stay finite), scale back at the end
        offset, Xc, x_sq = center(times_pow2(X, -e))
        zero_bases = Xc.new_zeros(m, d, r)
        if init is not None:
            M0 = as_tensor(init, "init").to(device=X.device)
            if M0.shape != (m, d):
                raise ShapeError(f"init must have shape [n_regions={m}, d={d}], got {tuple(M0.shape)}")
            if M0.dtype != X.dtype:
                raise DTypeError(f"init has dtype {M0.dtype} but X has {X.dtype}; convert it explicitly")
            check_finite(M0, "init")
            starts = [times_pow2(M0, -e) - offset]
        else:
            starts = []
            for i in range(cfg.n_init):
                km = KMeansAE(
                    m,
                    n_init=cfg.kmeans_n_init,
                    max_iter=cfg.kmeans_max_iter,
                    seed=cfg.seed + i,
                    device=X.device,
                    chunk_size=cfg.chunk_size,
                    progress=cfg.progress,
                ).fit(X)
                starts.append(times_pow2(km.cluster_centers_, -e) - offset)
        best = None
        for i, M0 in enumerate(starts):
            disable = tqdm_disable(cfg.progress, float(N) * d * m * (1 + r) * 20)
            out = self._run(Xc, x_sq, M0, zero_bases, f"local PCA {i + 1}/{len(starts)}", disable)
            log.info("local PCA m=%d r=%d restart %d: objective %.6g after %d iterations", m, r, i, out[3], out[5])
            if best is None or out[3] < best[3]:
                best = out
        means, bases, labels, obj, history, n_iter = best
        self._offset, exact_offset = scale_back(offset, e)
        stored, exact_means = scale_back(means, e)
        self._means = stored.contiguous()
        self.bases_ = bases.contiguous()  # orthonormal: scale-free
        self.labels_ = labels
        self.objective_ = times_4_pow(obj, e)
        self.objective_history_ = [times_4_pow(v, e) for v in history]
        self.n_iter_ = n_iter
        self._mark_fitted(X)
        if not (exact_offset and exact_means):  # subnormal data: report what the stored flats achieve
            self.objective_ = self._sq_error_sum(X)
        return self

    # ------------------------------------------------------------------ the autoencoder
    def _assign(self, X: torch.Tensor):
        """(labels, squared errors, coefficients) in X's units, computed at the model's scale as in fit."""
        e = scale_exponent(self._offset, self._means)
        Xc = times_pow2(X, -e) - times_pow2(self._offset, -e)
        x_sq = (Xc * Xc).sum(1)
        check_sq_norms(x_sq, "region means")
        labels, err, coefs = assign_to_flats(Xc, x_sq, times_pow2(self._means, -e), self.bases_, self.cfg.chunk_size)
        return labels, times_pow2(times_pow2(err, e), e), times_pow2(coefs, e)

    def _encode(self, X: torch.Tensor) -> torch.Tensor:
        labels, _, coefs = self._assign(X)
        N, m, r = X.shape[0], self.n_regions, self.rank
        Z = X.new_zeros(N, m, 1 + r)
        rows = torch.arange(N, device=X.device)
        Z[rows, labels, 0] = 1.0
        Z[rows, labels, 1:] = coefs
        return Z.reshape(N, m * (1 + r))

    @torch.no_grad()
    def regions(self, X) -> torch.Tensor:
        """Index of the best-reconstructing flat, int64 [N]; ties go to the lower index."""
        return self._assign(self._check_x(X))[0]

    def predict(self, X) -> torch.Tensor:
        return self.regions(X)

    def regions_from_code(self, Z) -> torch.Tensor:
        """Region ids read back from a code (the block whose indicator entry is largest)."""
        self._require_fitted()
        Z = as_tensor(Z, "Z")
        if Z.ndim != 2 or Z.shape[1] != self.d_sae:
            raise ShapeError(f"Z must have shape [N, d_sae={self.d_sae}], got {tuple(Z.shape)}")
        return Z[:, :: 1 + self.rank].argmax(1)

    def n_parameters(self) -> int:
        """Stored numbers: a mean and a d x rank basis per region, n_regions * d * (1 + rank)."""
        return self.n_regions * self.d_in * (1 + self.rank)

    def extra_repr(self) -> str:
        return f"n_regions={self.cfg.n_regions}, rank={self.cfg.rank}, fitted={self._fitted}"
