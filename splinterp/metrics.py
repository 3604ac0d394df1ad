"""Reconstruction and sparsity metrics with SAELens / SAEBench names and formulas.

Every metric is a sum over the evaluation set divided once at the end, so `MetricAccumulator` gives the
same number whether the data arrive in one batch or many (sums in float64). The one-shot functions
(`mse`, `l0`, ...) are thin wrappers for a single batch.

Conventions (rows are tokens / samples, x and x_hat are [N, d_in], z is [N, d_sae]):
- ``mse``                mean over all N * d_in elements of (x - x_hat)^2 (SAEBench; torch's mse_loss).
- ``mse_per_token``      sum over features, mean over rows: |x - x_hat|^2 averaged over tokens (the
                         SAELens training-loss convention); equals d_in * mse.
- ``l0``                 mean number of non-zero latents per row.
- ``l1``                 mean over rows of sum_i |z_i|.
- ``explained_variance`` 1 - sum_r |x_r - x_hat_r|^2 / sum_r |x_r - mean(x)|^2, both sums over the whole
                         set and mean(x) the per-feature mean of the whole set; ``fvu`` = 1 - that.
- ``cossim``             mean over rows of cos(x_r, x_hat_r) (0 for a zero row, as torch's eps rule gives).
- ``l2_ratio``           mean over rows of |x_hat_r| / |x_r| (rows with x_r = 0 are skipped).
- ``relative_reconstruction_bias`` gamma = E|x_hat|^2 / E<x, x_hat> (Gated SAE paper, eq. 10): the
                         scale minimising E|x_hat / gamma - x|^2; < 1 means shrinkage.
- ``feature_density``    per latent, the fraction of rows where it is non-zero; ``dead_features`` counts
                         latents that never fire on the set, ``frac_alive`` = fraction that fire at least once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

from splinterp.errors import ConfigError, DTypeError, EmptyDataError, NotAModelError, ShapeError
from splinterp.moments import Moments
from splinterp.validation import as_tensor, check_data, check_device, check_finite

log = logging.getLogger(__name__)

_F64 = torch.float64


def _pair(x, x_hat) -> tuple[torch.Tensor, torch.Tensor]:
    """Data and reconstruction: floating, finite (a NaN would turn every metric into NaN), the same shape."""
    x, x_hat = as_tensor(x, "x"), as_tensor(x_hat, "x_hat")
    if x.ndim != 2 or x_hat.shape != x.shape:
        raise ShapeError(f"x and x_hat must both be [N, d_in] with the same shape, got {tuple(x.shape)} and "
                         f"{tuple(x_hat.shape)}")
    return check_data(x, name="x", allow_empty=True), check_data(x_hat, name="x_hat", allow_empty=True)


class MetricAccumulator:
    """Streams batches (x, x_hat, z) and returns every metric of this module over all of them."""

    def __init__(self) -> None:
        self.n = 0
        self.d_in: int | None = None
        self.d_sae: int | None = None
        self._sse = 0.0
        self._moments: Moments | None = None  # per-feature mean and m2 of x (float64), for the variance
        self._cos = 0.0
        self._l2r = 0.0
        self._l2r_n = 0
        self._xhat2 = 0.0
        self._xdot = 0.0
        self._l0 = 0.0
        self._l1 = 0.0
        self._fires: torch.Tensor | None = None  # per-latent count of rows where it is non-zero

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor | None = None, *,
               sparse: tuple[torch.Tensor, torch.Tensor] | None = None,
               d_sae: int | None = None) -> MetricAccumulator:
        """Add a batch. Codes either dense (`z` [B, d_sae]) or sparse (`sparse` = (values [B, m],
        indices [B, m]) with `d_sae`; zero values are padding and count as inactive)."""
        x, x_hat = _pair(x, x_hat)
        b = x.shape[0]
        if b == 0:
            return self
        if self.d_in is None:
            self.d_in = x.shape[1]
        elif x.shape[1] != self.d_in:
            raise ShapeError(f"batch has d_in={x.shape[1]}, earlier batches had {self.d_in}")
        xd, xhd = x.to(_F64), x_hat.to(_F64)
        self._sse += float(((xd - xhd) ** 2).sum())
        batch = Moments.of(xd)
        self._moments = batch if self._moments is None else self._moments.merge(batch)
        nx, nxh = xd.norm(dim=1), xhd.norm(dim=1)
        dots = (xd * xhd).sum(1)
        self._cos += float((dots / (nx * nxh).clamp_min(1e-8)).sum())
        ok = nx > 0
        self._l2r += float((nxh[ok] / nx[ok]).sum())
        self._l2r_n += int(ok.sum())
        self._xhat2 += float((nxh ** 2).sum())
        self._xdot += float(dots.sum())
        if z is not None or sparse is not None:
            if sparse is not None:
                vals, idx = (as_tensor(t, "codes") for t in sparse)
                if vals.ndim != 2 or idx.shape != vals.shape or vals.shape[0] != b or d_sae is None:
                    raise ShapeError(f"sparse codes must be (values, indices) [N={b}, m] with d_sae given, got "
                                     f"{tuple(vals.shape)} and {tuple(idx.shape)}")
                width = d_sae
            else:
                z = as_tensor(z, "z")
                if z.ndim != 2 or z.shape[0] != b:
                    raise ShapeError(f"z must be [N={b}, d_sae], got {tuple(z.shape)}")
                width = z.shape[1]
            if self.d_sae is None:
                self.d_sae = width
                dev = vals.device if sparse is not None else z.device
                self._fires = torch.zeros(width, dtype=torch.int64, device=dev)
            elif width != self.d_sae:
                raise ShapeError(f"codes have d_sae={width}, earlier batches had {self.d_sae}")
            if sparse is not None:
                live = vals != 0
                self._l0 += float(live.sum())
                self._l1 += float(vals.to(_F64).abs().sum())
                fired = torch.bincount(idx[live].to(torch.int64), minlength=width)
                self._fires += fired.to(self._fires.device)
            else:
                nz = z != 0
                self._l0 += float(nz.sum())
                self._l1 += float(z.to(_F64).abs().sum())
                self._fires += nz.sum(0).to(self._fires.device)
        self.n += b
        return self

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Add the rows `other` saw (e.g. another process's share): the same metrics as one stream over
        both, up to rounding (the moments merge exactly, `splinterp.moments`)."""
        if not isinstance(other, MetricAccumulator):
            raise TypeError(f"can only merge a MetricAccumulator, got {type(other).__name__}")
        if other.n == 0:
            return self
        if self.n == 0:
            for k, v in vars(other).items():
                setattr(self, k, v.clone() if isinstance(v, torch.Tensor) else v)
            return self
        if other.d_in != self.d_in or other.d_sae != self.d_sae:
            raise ShapeError(f"cannot merge accumulators of (d_in, d_sae) = {(other.d_in, other.d_sae)} into "
                             f"{(self.d_in, self.d_sae)}")
        self._moments = self._moments.merge(other._moments)
        for k in ("_sse", "_cos", "_l2r", "_l2r_n", "_xhat2", "_xdot", "_l0", "_l1"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        if self._fires is not None:
            self._fires = self._fires + other._fires.to(self._fires.device)
        self.n += other.n
        return self

    def feature_density(self) -> torch.Tensor:
        """Fraction of rows on which each latent is non-zero [d_sae] (float64)."""
        if self._fires is None:
            raise EmptyDataError("no codes were given to the accumulator; feature density is undefined")
        return self._fires.to(_F64) / max(self.n, 1)

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            raise EmptyDataError("no rows were accumulated; metrics are undefined")
        n, d = self.n, self.d_in
        m2 = float(self._moments.m2.sum()) if self._moments is not None else 0.0
        ev = 1.0 - self._sse / m2 if m2 > 0 else math.nan
        out = {
            "mse": self._sse / (n * d),
            "mse_per_token": self._sse / n,
            "explained_variance": ev,
            "fvu": 1.0 - ev,
            "cossim": self._cos / n,
            "l2_ratio": self._l2r / self._l2r_n if self._l2r_n else math.nan,
            "relative_reconstruction_bias": self._xhat2 / self._xdot if self._xdot != 0 else math.nan,
        }
        if self._fires is not None:
            alive = int((self._fires > 0).sum())
            out.update({
                "l0": self._l0 / n,
                "l1": self._l1 / n,
                "frac_alive": alive / self.d_sae,
                "dead_features": self.d_sae - alive,
            })
        out["n_tokens"] = n
        return out


# ---------------------------------------------------------------------- one-shot functions
def mse(x, x_hat, reduction: str = "mean") -> float:
    """(x - x_hat)^2 averaged over all elements ("mean"), or summed over features and averaged over rows
    ("sum_per_token", the SAELens loss convention = d_in * mean)."""
    if not isinstance(reduction, str) or reduction not in ("mean", "sum_per_token"):
        raise ConfigError(f"reduction must be 'mean' or 'sum_per_token', got {reduction!r}")
    x, x_hat = _pair(x, x_hat)
    sse = float(((x.to(_F64) - x_hat.to(_F64)) ** 2).sum())
    if x.numel() == 0:
        raise EmptyDataError("mse of an empty set is undefined")
    return sse / x.numel() if reduction == "mean" else sse / x.shape[0]


def _codes(z) -> torch.Tensor:
    z = as_tensor(z, "z")
    if z.ndim != 2:
        raise ShapeError(f"codes z must be [N, d_sae], got {tuple(z.shape)}")
    if z.shape[0] == 0:
        raise EmptyDataError("codes z have no rows")
    check_finite(z, "z")
    return z


def l0(z) -> float:
    """Mean number of non-zero latents per row."""
    z = _codes(z)
    return float((z != 0).sum()) / z.shape[0]


def l1(z) -> float:
    """Mean over rows of sum_i |z_i|."""
    z = _codes(z)
    return float(z.to(_F64).abs().sum()) / z.shape[0]


def feature_density(z) -> torch.Tensor:
    """Per latent, the fraction of rows where it is non-zero [d_sae]."""
    z = _codes(z)
    return (z != 0).sum(0).to(_F64) / z.shape[0]


def dead_features(z) -> int:
    """Number of latents that are zero on every row."""
    return int((feature_density(z) == 0).sum())


def frac_alive(z) -> float:
    """Fraction of latents that fire on at least one row."""
    dens = feature_density(z)
    return float((dens > 0).sum()) / dens.numel()


def _one(x, x_hat, key: str) -> float:
    return MetricAccumulator().update(*_pair(x, x_hat)).compute()[key]


def explained_variance(x, x_hat) -> float:
    """1 - sum|x - x_hat|^2 / sum|x - mean(x)|^2 (nan when x is constant)."""
    return _one(x, x_hat, "explained_variance")


def fvu(x, x_hat) -> float:
    """Fraction of variance unexplained = 1 - explained_variance."""
    return _one(x, x_hat, "fvu")


def cossim(x, x_hat) -> float:
    """Mean cosine similarity between rows of x and x_hat."""
    return _one(x, x_hat, "cossim")


def l2_ratio(x, x_hat) -> float:
    """Mean over rows of |x_hat| / |x|."""
    return _one(x, x_hat, "l2_ratio")


def relative_reconstruction_bias(x, x_hat) -> float:
    """Shrinkage gamma = E|x_hat|^2 / E<x, x_hat> (1 = unbiased, < 1 = shrunk)."""
    return _one(x, x_hat, "relative_reconstruction_bias")


# ---------------------------------------------------------------------- models
def _model_attr(model, *names):
    for n in names:
        v = getattr(model, n, None)
        if v is not None:
            return v
    cfg = getattr(model, "cfg", None)
    for n in names:
        v = getattr(cfg, n, None) if cfg is not None else None
        if v is not None:
            return v
    return None


def _batches(X, batch_size: int, d_in: int | None, dtype, name: str) -> Iterable[torch.Tensor]:
    if isinstance(X, torch.Tensor) or hasattr(X, "__array__") and not isinstance(X, (list, tuple)):
        X = check_data(X, d_in, name=name, dtype=dtype)
        for s in range(0, X.shape[0], batch_size):
            yield X[s:s + batch_size]
        return
    if isinstance(X, (str, bytes)) or not isinstance(X, Iterable):
        raise DTypeError(f"{name} must be a tensor or array [N, d_in], or an iterable of such batches, got "
                         f"{type(X).__name__}")
    for i, x in enumerate(X):
        yield check_data(x, d_in, name=f"{name} batch {i}", dtype=dtype, allow_empty=True)


def _is_sae(model) -> bool:
    from splinterp.sae import SAE  # late: sae imports validation, keep metrics importable on its own

    return isinstance(model, SAE)


@torch.no_grad()
def evaluate(model: Any, X, batch_size: int = 4096, device: str | torch.device | None = None,
             return_density: bool = False) -> dict[str, Any]:
    """Every metric of this module for `model` on X, streamed over batches.

    `model` needs `encode(x) -> z` and `decode(z) -> x_hat` (our SAE, the reference autoencoders); an SAE
    object of SAELens, sparsify or dictionary_learning is converted with `splinterp.as_sae` first.
    X: a tensor / array [N, d_in], or an iterable of such batches. Batches are moved to `device`
    (default: the model's device, else X's); the model itself is not moved.
    """
    from splinterp.io import as_sae_if_foreign

    acc = accumulate(as_sae_if_foreign(model), X, batch_size, device)
    if acc.n == 0:
        raise EmptyDataError("X has no rows: there is nothing to evaluate")
    out: dict[str, Any] = acc.compute()
    if return_density:
        out["feature_density"] = acc.feature_density()
    return out


@torch.no_grad()
def accumulate(model: Any, X, batch_size: int = 4096, device: str | torch.device | None = None) -> MetricAccumulator:
    """The `MetricAccumulator` that `evaluate` computes from (same arguments), e.g. to `merge` the
    shares of several processes before `compute`."""
    if not (callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))):
        raise NotAModelError(f"model must have encode(x) and decode(z) methods (a splinterp SAE, a reference "
                             f"autoencoder), got {type(model).__name__} {repr(model)[:40]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    d_in = _model_attr(model, "d_in")
    dtype = _model_attr(model, "dtype")
    dtype = dtype if isinstance(dtype, torch.dtype) else None
    dev = check_device(device) if device is not None else _model_attr(model, "device")
    acc = MetricAccumulator()
    sparse_sae = _is_sae(model)
    for x in _batches(X, batch_size, d_in, dtype, "X"):
        if dev is not None:
            x = x.to(dev)
        if sparse_sae:  # our SAE: its own pass gives x_hat and the code (sparse where the kernels pay)
            rec = model.reconstruct(x)
            if rec.is_sparse:
                acc.update(x, rec.x_hat, sparse=(rec.values, rec.indices), d_sae=model.cfg.d_sae)
            else:
                acc.update(x, rec.x_hat, rec.values)
            continue
        z = model.encode(x)  # handed back to decode as the model made it (tensor or array)
        x_hat = as_tensor(model.decode(z), "reconstruction")
        acc.update(x, x_hat, as_tensor(z, "codes"))
    return acc


__all__ = [
    "MetricAccumulator", "accumulate", "cossim", "dead_features", "evaluate", "explained_variance", "feature_density",
    "frac_alive", "fvu", "l0", "l1", "l2_ratio", "mse", "relative_reconstruction_bias",
]
