"""k-means autoencoder: one-hot code of the nearest centroid, decoder = the centroids.

It is the piecewise-constant spline on the Voronoi diagram of the centroids, and minimising its reconstruction
error is exactly the k-means objective; a Top-1 SAE with W_enc = C^T, b_enc = -|c|^2/2 and W_dec = C is the same
map. Fitting is Lloyd's algorithm in torch: all `n_init` restarts run batched (one GEMM per chunk for every
restart), restarts that converge drop out, and the restart with the lowest exact inertia wins. By default
(`refine=True`) that restart is then polished with batched Hartigan moves, which can only lower the objective:
on MNIST this makes the fit a little better than scikit-learn's at the same n_init / max_iter.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass
from typing import Literal

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
    kmeans_plusplus,
    nearest_centres,
    scale_back,
    scale_exponent,
    times_4_pow,
    times_pow2,
    tqdm_disable,
)
from splinterp.validation import as_tensor, check_dataclass_types, check_device, check_finite, check_positive_int

log = logging.getLogger(__name__)

Init = Literal["k-means++", "random"]
INITS = typing.get_args(Init)


@dataclass
class KMeansConfig:
    n_clusters: int
    """Number of centroids (= regions of the k-means autoencoder)."""
    n_init: int = 10
    """Independent restarts; the one with the lowest inertia is kept."""
    max_iter: int = 300
    """Most Lloyd iterations per restart."""
    tol: float = 1e-4
    """Stop when the total squared centroid shift is <= tol * mean feature variance (scikit-learn's rule),
    or when no label changes."""
    init: Init = "k-means++"
    """Seeding of the centroids: "k-means++" (D^2 sampling) or "random" rows."""
    seed: int = 0
    """Seed of the restarts (a private generator; the global RNG is never touched)."""
    device: str = "cpu"
    """Device the fit runs on."""
    chunk_size: int | None = None
    """Rows per distance chunk; None picks one that keeps temporaries under 64 MiB."""
    progress: bool | None = None
    """tqdm bar over Lloyd iterations; None shows it only for big fits."""
    refine: bool = True
    """Polish the kept restart with batched Hartigan moves (`hartigan_refine`): never worse, usually a little
    better than Lloyd alone. False gives plain Lloyd k-means (what LocalPCAAE at rank 0 does)."""

    def __post_init__(self) -> None:
        check_dataclass_types(self, "KMeansAE")  # wrong types (seed=1.5, tol="x", progress="yes") before meaning
        check_device(self.device)
        check_positive_int(self.n_clusters, "n_clusters")
        check_positive_int(self.n_init, "n_init")
        check_positive_int(self.max_iter, "max_iter")
        if not self.tol >= 0:
            raise ConfigError(f"tol must be >= 0, got {self.tol!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.chunk_size is not None:
            check_positive_int(self.chunk_size, "chunk_size")


def _update_sums(Xc, sums64, counts, active, old, new, k: int, chunk_size: int | None) -> None:
    """Move the points whose label changed (old -> new, [Ra, N]) between the float64 cluster sums, in place.

    sums64 [R*k, d] and counts [R*k] are indexed by restart * k + cluster; one index_add_ for all restarts.
    """
    a, n = (old != new).nonzero(as_tuple=True)
    if a.numel() == 0:
        return
    base = active[a] * k
    src, dst = base + old[a, n], base + new[a, n]
    counts += torch.bincount(dst, minlength=counts.numel()) - torch.bincount(src, minlength=counts.numel())
    step = chunk_rows(Xc.shape[1], chunk_size)
    for s in range(0, n.numel(), step):
        x = Xc[n[s : s + step]].double()
        sums64.index_add_(0, dst[s : s + step], x)
        sums64.index_add_(0, src[s : s + step], x.neg_())


def lloyd(
    Xc: torch.Tensor,
    x_sq: torch.Tensor,
    C0: torch.Tensor,
    max_iter: int,
    tol_abs: float,
    chunk_size: int | None = None,
    disable_bar: bool | None = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd iterations from centres C0 [R, k, d] -> (centres [R, k, d], iterations [R]).

    Each iteration: assign to the nearest centre, move each centre to its cluster mean. A restart stops when
    no label changes or the total squared shift is <= tol_abs. An empty cluster is re-seeded at the points
    farthest from their centres (largest first, ties to the lower index), so results are deterministic.
    """
    R, k, d = C0.shape
    N = Xc.shape[0]
    C = C0.clone()
    n_iter = torch.zeros(R, dtype=torch.long)
    prev = torch.full((R, N), -1, dtype=torch.long, device=Xc.device)
    active = torch.arange(R, device=Xc.device)
    # CPU: cluster sums are kept in float64 and updated only for the points that changed cluster (few, after
    # the first iterations). Elsewhere they are recomputed with the deterministic one-hot GEMM.
    incremental = Xc.device.type == "cpu"
    sums64 = torch.zeros(R * k, d, dtype=torch.float64) if incremental else None
    counts_all = torch.zeros(R * k, dtype=torch.long, device=Xc.device)
    bar = tqdm(range(max_iter), desc="k-means", disable=disable_bar, leave=False)
    for it in bar:
        Ca = C[active]
        labels, mind = nearest_centres(Xc, x_sq, Ca, chunk_size)
        n_iter[active.cpu()] += 1
        strict = (labels == prev[active]).all(1)
        if not incremental:
            sums, counts = cluster_sums(Xc, labels, k, chunk_size)
        elif it == 0:
            sums, counts = cluster_sums(Xc, labels, k, chunk_size)
            sums64.view(R, k, d)[active] = sums.double()
            counts_all.view(R, k)[active] = counts
        else:
            _update_sums(Xc, sums64, counts_all, active, prev[active], labels, k, chunk_size)
            counts = counts_all.view(R, k)[active]
            sums = sums64.view(R, k, d)[active]
        newC = (sums / counts.clamp_min(1).unsqueeze(-1).to(sums.dtype)).to(Xc.dtype)
        empty = counts == 0
        if bool(empty.any()):
            for a in empty.any(1).nonzero().flatten().tolist():
                js = empty[a].nonzero().flatten()
                far = torch.argsort(mind[a], descending=True, stable=True)[: js.numel()]
                newC[a, js] = Xc[far]
                log.debug("k-means: re-seeded %d empty cluster(s) in restart %d", js.numel(), int(active[a]))
        shift = (newC - Ca).pow(2).sum((1, 2))
        C[active] = torch.where(strict[:, None, None], Ca, newC)
        prev[active] = labels
        active = active[~(strict | (shift <= tol_abs))]
        bar.set_postfix(running=int(active.numel()))
        if active.numel() == 0:
            break
    return C, n_iter


def _means(Xc: torch.Tensor, labels: torch.Tensor, k: int, chunk_size: int | None):
    sums, counts = cluster_sums(Xc, labels[None], k, chunk_size)
    return sums[0] / counts[0].clamp_min(1).unsqueeze(1).to(sums.dtype), counts[0]


def hartigan_refine(
    Xc: torch.Tensor,
    x_sq: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    max_rounds: int,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Polish a k-means partition with batched Hartigan moves -> (labels, centres, accepted rounds).

    Moving x from cluster a (n_a points) to b changes the objective by n_b/(n_b+1)|x-c_b|^2 - n_a/(n_a-1)|x-c_a|^2
    (centroid shifts included), so a Lloyd fixed point can still have improving moves. Each round computes that
    gain for every point at once, applies the best-gain moves together, and keeps them only if the exact
    objective falls (else it retries with the better half of the moves, down to the single best one). The
    objective therefore never rises, and a partition with no improving move is also a Lloyd fixed point.
    """
    N = Xc.shape[0]
    eps = 64 * torch.finfo(Xc.dtype).eps
    C, counts = _means(Xc, labels, k, chunk_size)
    obj = exact_sq_errors(Xc, labels, C, chunk_size=chunk_size).sum(dtype=torch.float64)
    rows = torch.arange(N, device=Xc.device)
    rounds = 0  # accepted rounds
    for _ in range(max_rounds):
        gain = torch.empty(N, dtype=Xc.dtype, device=Xc.device)
        dest = torch.empty(N, dtype=torch.long, device=Xc.device)
        n = counts.to(Xc.dtype)
        c_sq = (C * C).sum(1)
        w_add = n / (n + 1)
        w_rem = torch.where(counts > 1, n / (n - 1).clamp_min(1), torch.zeros_like(n))
        step = chunk_rows(k, chunk_size)
        for s in range(0, N, step):
            e = min(s + step, N)
            D = torch.addmm(c_sq, Xc[s:e], C.T, alpha=-2.0).add_(x_sq[s:e, None]).clamp_min_(0)
            a = labels[s:e]
            own = D[rows[: e - s], a]
            A = D * w_add
            A[rows[: e - s], a] = float("inf")
            add, b = A.min(1)
            rem = w_rem[a] * own
            g = rem - add
            g[(counts[a] <= 1) | (g <= eps * (own + D.min(1).values + 1e-30))] = 0  # no move / float noise
            gain[s:e], dest[s:e] = g, b
        movers = (gain > 0).nonzero().flatten()
        if movers.numel() == 0:
            break
        movers = movers[torch.argsort(gain[movers], descending=True, stable=True)]
        g = movers.numel()
        accepted = False
        while g >= 1:
            new = labels.clone()
            new[movers[:g]] = dest[movers[:g]]
            newC, newcounts = _means(Xc, new, k, chunk_size)
            if bool((newcounts > 0).all()):
                new_obj = exact_sq_errors(Xc, new, newC, chunk_size=chunk_size).sum(dtype=torch.float64)
                if new_obj < obj:
                    labels, C, counts, obj, accepted = new, newC, newcounts, new_obj, True
                    rounds += 1
                    break
            g //= 2
        if not accepted:
            break
    return labels, C, rounds


class KMeansAE(ReferenceAE):
    """k-means as an autoencoder. `encode` = one-hot of the nearest centroid [N, n_clusters] (hard, not
    distances), `decode(Z) = Z @ cluster_centers_`.

    Attributes after `fit`: `cluster_centers_` [k, d], `labels_` [N], `inertia_` (sum of squared distances to
    the nearest centroid over the training data, like scikit-learn), `n_iter_` (Lloyd iterations of the kept
    restart), `n_refine_rounds_` (Hartigan rounds after it).
    """

    _FIT_ATTRS = ("inertia_", "n_iter_", "n_refine_rounds_")

    def __init__(
        self,
        n_clusters: int,
        n_init: int = 10,
        max_iter: int = 300,
        tol: float = 1e-4,
        init: str = "k-means++",
        seed: int = 0,
        device: str | torch.device = "cpu",
        chunk_size: int | None = None,
        progress: bool | None = None,
        refine: bool = True,
    ):
        cfg = KMeansConfig(n_clusters, n_init, max_iter, tol, init, seed, str(device), chunk_size, progress, refine)
        super().__init__(cfg.device)
        self.cfg = cfg
        self.register_buffer("_offset", None)
        self.register_buffer("_centres", None)  # centred by _offset
        self.register_buffer("labels_", None)
        self.inertia_: float | None = None
        self.n_iter_: int | None = None
        self.n_refine_rounds_: int | None = None

    @classmethod
    def from_config(cls, cfg: KMeansConfig) -> KMeansAE:
        return cls(**vars(cfg))

    @property
    def n_clusters(self) -> int:
        return self.cfg.n_clusters

    def _loaded_mismatch(self) -> str | None:
        n = self._centres.shape[0]
        return None if n == self.n_clusters else f"{n} centres, n_clusters={self.n_clusters}"

    @property
    def cluster_centers_(self) -> torch.Tensor:
        self._require_fitted()
        return self._centres + self._offset

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802
        return self.cluster_centers_

    @property
    def b_dec(self) -> torch.Tensor:
        self._require_fitted()
        return torch.zeros_like(self._offset)

    @torch.no_grad()
    def fit(self, X, init=None) -> KMeansAE:
        """Fit on X [N, d] (tensor or numpy, float32/float64; copied to `device`).

        `init`: optional initial centres [n_clusters, d]; then a single run starts from them (n_init ignored).
        """
        cfg = self.cfg
        X = self._fit_input(X)
        N, d = X.shape
        k = cfg.n_clusters
        if k > N:
            raise ConfigError(f"n_clusters={k} is larger than the number of points N={N}")
        e = scale_exponent(X)  # fit on X * 2^-e (exact; squared distances stay finite), scale back at the end
        offset, Xc, x_sq = center(times_pow2(X, -e))
        tol_abs = float(cfg.tol * Xc.var(0).mean()) if N > 1 else 0.0
        gen = torch.Generator(device=X.device).manual_seed(cfg.seed)
        if init is not None:
            C0 = as_tensor(init, "init").to(device=X.device)
            if C0.shape != (k, d):
                raise ShapeError(f"init must have shape [n_clusters={k}, d={d}], got {tuple(C0.shape)}")
            if C0.dtype != X.dtype:
                raise DTypeError(f"init has dtype {C0.dtype} but X has {X.dtype}; convert it explicitly")
            check_finite(C0, "init")
            C0 = (times_pow2(C0, -e) - offset)[None]
        elif cfg.init == "k-means++":
            C0 = kmeans_plusplus(Xc, x_sq, k, cfg.n_init, gen)
        else:  # random distinct points
            idx = torch.rand(cfg.n_init, N, generator=gen, device=X.device).argsort(1)[:, :k]
            C0 = Xc[idx]
        disable = tqdm_disable(cfg.progress, float(N) * d * k * C0.shape[0] * 30)
        C, n_iter = lloyd(Xc, x_sq, C0, cfg.max_iter, tol_abs, cfg.chunk_size, disable)
        labels, _ = nearest_centres(Xc, x_sq, C, cfg.chunk_size)
        inertia = torch.stack(
            [
                exact_sq_errors(Xc, labels[r], C[r], chunk_size=cfg.chunk_size).sum(dtype=torch.float64)
                for r in range(C.shape[0])
            ]
        )
        best = int(inertia.argmin())
        centres, best_labels, best_inertia = C[best], labels[best], float(inertia[best])
        self.n_refine_rounds_ = 0
        if cfg.refine:
            best_labels, centres, self.n_refine_rounds_ = hartigan_refine(
                Xc, x_sq, best_labels, k, cfg.max_iter, cfg.chunk_size
            )
            # labels_ always = nearest centroid of the final centres (a Hartigan optimum is Lloyd-stable)
            best_labels = nearest_centres(Xc, x_sq, centres[None], cfg.chunk_size)[0][0]
            best_inertia = float(
                exact_sq_errors(Xc, best_labels, centres, chunk_size=cfg.chunk_size).sum(dtype=torch.float64)
            )
        self._offset, exact_offset = scale_back(offset, e)
        stored, exact_centres = scale_back(centres, e)
        self._centres = stored.contiguous()
        self.labels_ = best_labels.contiguous()
        self.inertia_ = times_4_pow(best_inertia, e)
        self.n_iter_ = int(n_iter[best])
        self._mark_fitted(X)
        if not (exact_offset and exact_centres):  # subnormal data: report what the stored centroids achieve
            self.inertia_ = self._sq_error_sum(X)
        if int(torch.bincount(self.labels_, minlength=k).eq(0).sum()) > 0:
            log.warning("k-means: some clusters are empty at the end (fewer distinct points than n_clusters?)")
        log.info(
            "k-means k=%d: inertia %.6g after %d iterations (best of %d)", k, self.inertia_, self.n_iter_, C.shape[0]
        )
        return self

    def _labels(self, X: torch.Tensor) -> torch.Tensor:
        e = scale_exponent(self._offset, self._centres)  # the model's scale, as in fit: same labels, no overflow
        Xc = times_pow2(X, -e) - times_pow2(self._offset, -e)
        x_sq = (Xc * Xc).sum(1)
        check_sq_norms(x_sq, "centroids")
        labels, _ = nearest_centres(Xc, x_sq, times_pow2(self._centres, -e)[None], self.cfg.chunk_size)
        return labels[0]

    def _encode(self, X: torch.Tensor) -> torch.Tensor:
        Z = torch.zeros(X.shape[0], self.n_clusters, dtype=X.dtype, device=X.device)
        return Z.scatter_(1, self._labels(X)[:, None], 1.0)

    @torch.no_grad()
    def regions(self, X) -> torch.Tensor:
        """Index of the nearest centroid (the Voronoi cell), int64 [N]; ties go to the lower index."""
        return self._labels(self._check_x(X))

    def predict(self, X) -> torch.Tensor:
        """scikit-learn name of `regions`."""
        return self.regions(X)

    def n_parameters(self) -> int:
        """Stored numbers: the k x d centroids (the encoder reuses them; there is no other parameter)."""
        return self.cfg.n_clusters * self.d_in

    def extra_repr(self) -> str:
        return f"n_clusters={self.cfg.n_clusters}, n_init={self.cfg.n_init}, fitted={self._fitted}"
