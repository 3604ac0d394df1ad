"""PCA autoencoder: the optimal affine autoencoder of rank r (Eckart-Young), the one-region case of local PCA.

encode(x) = U^T (x - mean) [N, rank], decode(z) = z @ U^T + mean, i.e. W_dec = components_ (rows = principal
directions) and b_dec = mean_. LocalPCAAE(n_regions=1, rank=r) reconstructs identically; PCAAE drops its constant
region indicator and puts the mean in b_dec, so its code is the usual PCA score vector.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from splinterp.errors import ConfigError
from splinterp.reference._base import ReferenceAE, center, scale_exponent, times_pow2, top_directions
from splinterp.validation import check_dataclass_types, check_device

log = logging.getLogger(__name__)


@dataclass
class PCAConfig:
    rank: int
    """Number of principal components kept."""
    seed: int = 0
    """Unused (PCA is exact and deterministic); kept so every reference AE takes a seed."""
    device: str = "cpu"
    """Device the fit runs on."""
    chunk_size: int | None = None
    """Rows per chunk of the scatter-matrix pass; None picks one that keeps temporaries under 64 MiB."""

    def __post_init__(self) -> None:
        check_dataclass_types(self, "PCAAE")  # wrong types (seed=1.5, tol="x", progress="yes") before meaning
        check_device(self.device)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"rank must be an integer >= 0, got {self.rank!r}")


class PCAAE(ReferenceAE):
    """Exact PCA as an autoencoder (eigh of the scatter matrix or thin SVD, in float64).

    Attributes after `fit`: `components_` [rank, d] (orthonormal rows, sign fixed so the largest-|.| entry is
    positive; zero rows past the data's numerical rank), `mean_` [d], `singular_values_` [rank],
    `explained_variance_` [rank] (ddof=1, like scikit-learn).
    """

    _FIT_ATTRS = ("_n_samples",)

    def __init__(self, rank: int, seed: int = 0, device: str | torch.device = "cpu", chunk_size: int | None = None):
        cfg = PCAConfig(rank, seed, str(device), chunk_size)
        super().__init__(cfg.device)
        self.cfg = cfg
        self.register_buffer("mean_", None)
        self.register_buffer("components_", None)
        self.register_buffer("singular_values_", None)
        self._n_samples: int | None = None

    @classmethod
    def from_config(cls, cfg: PCAConfig) -> PCAAE:
        return cls(**vars(cfg))

    @property
    def rank(self) -> int:
        return self.cfg.rank

    def _loaded_mismatch(self) -> str | None:
        r = self.components_.shape[0]
        return None if r == self.rank else f"{r} components, rank={self.rank}"

    @property
    def explained_variance_(self) -> torch.Tensor:
        self._require_fitted()
        return self.singular_values_.pow(2) / max(1, self._n_samples - 1)

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802
        self._require_fitted()
        return self.components_

    @property
    def b_dec(self) -> torch.Tensor:
        self._require_fitted()
        return self.mean_

    @torch.no_grad()
    def fit(self, X) -> PCAAE:
        """Fit on X [N, d] (tensor or numpy, float32/float64; copied to `device`)."""
        X = self._fit_input(X)
        N, d = X.shape
        if self.cfg.rank > d:
            raise ConfigError(f"rank={self.cfg.rank} is larger than the data dimension d={d}")
        e = scale_exponent(X)  # on X * 2^-e (exact): the float64 scatter matrix of huge data stays finite
        offset, Xc, _ = center(times_pow2(X, -e))
        U, s = top_directions(Xc, self.cfg.rank, self.cfg.chunk_size)
        self.mean_ = times_pow2(offset, e)
        self.components_ = U.T.contiguous()
        self.singular_values_ = times_pow2(s, e)
        self._n_samples = N
        self._mark_fitted(X)
        log.info(
            "PCA rank %d: kept %.4g of the total variance",
            self.cfg.rank,
            float(s.double().pow(2).sum() / Xc.double().pow(2).sum().clamp_min(1e-300)),
        )
        return self

    def _encode(self, X: torch.Tensor) -> torch.Tensor:
        return (X - self.mean_) @ self.components_.T

    @torch.no_grad()
    def regions(self, X) -> torch.Tensor:
        """A single region: zeros, int64 [N]."""
        X = self._check_x(X)
        return torch.zeros(X.shape[0], dtype=torch.long, device=X.device)

    def n_parameters(self) -> int:
        """Stored numbers: the mean and the rank x d components, d * (1 + rank)."""
        return self.d_in * (1 + self.cfg.rank)

    def extra_repr(self) -> str:
        return f"rank={self.cfg.rank}, fitted={self._fitted}"
