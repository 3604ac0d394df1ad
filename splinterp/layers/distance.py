"""Distances between the layers of a model, measured on the same tokens (Group-SAE, Ghilardi et al. 2025).

The angular distance between layers i and j is the mean over tokens t of

    d_ij = arccos(cos(a_i(t), a_j(t))) / pi        in [0, 1]

with a_l(t) the activation of token t at layer l (optionally centred: a_l(t) - mean_l). It is 0 when the
two layers point the same way on every token, 1/2 when they are orthogonal, 1 when opposite.

Conventions (stated because they change the numbers):
- cosines are computed in float64 and clipped to [-1, 1] before arccos, so nearly parallel vectors do not
  give NaN; arccos is ill-conditioned at +-1, so a distance near 0 or 1 is good to about 1e-8 (absolute),
  elsewhere to float64 rounding;
- a zero vector has cosine 0 with everything (torch's `cosine_similarity` convention), i.e. distance 1/2;
- centring (`center=True`) subtracts each layer's exact mean over the same split, computed in a first
  pass over the data. group-sae centres with an exponential moving average of batch means instead; the
  exact mean is the quantity that average estimates, and it makes the result independent of the order
  and size of the batches.
The matrix is streamed: `AngularDistanceMatrix.update` takes batches [B, L, d] of the same tokens at L
layers, so a cache of any size is read once (twice with centring) and never held in memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from splinterp.errors import ConfigError, EmptyDataError, ShapeError
from splinterp.validation import as_tensor, check_finite

log = logging.getLogger(__name__)

_F64 = torch.float64


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their norm; zero rows stay zero (so their cosine with anything is 0)."""
    n = x.norm(dim=-1, keepdim=True)
    return x / torch.where(n > 0, n, torch.ones_like(n))


def angular_distance(a, b, center: bool = False) -> float:
    """Mean over rows of arccos(cos(a_r, b_r)) / pi for two activation matrices [N, d] of the same tokens.

    center: subtract each matrix's own column mean first.
    """
    a, b = as_tensor(a, "a"), as_tensor(b, "b")
    if a.ndim != 2 or a.shape != b.shape:
        raise ShapeError(f"a and b must both be [N, d] with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0:
        raise EmptyDataError("angular distance of an empty set is undefined")
    acc = AngularDistanceMatrix(2)
    if center:
        acc.mean = torch.stack([a.to(_F64).mean(0), b.to(_F64).mean(0)])
    acc.update(torch.stack([a, b], 1))
    return float(acc.value()[0, 1])


class AngularDistanceMatrix:
    """Streaming mean angular distance between L layers: `update([B, L, d])` batches, then `value()`.

    `mean` ([L, d], optional): subtracted from each layer's activations before the angles are taken.
    """

    def __init__(self, n_layers: int, mean: torch.Tensor | None = None):
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ConfigError(f"n_layers must be a positive integer, got {n_layers!r}")
        self.n_layers = n_layers
        self.mean = mean
        self._sum = torch.zeros(n_layers, n_layers, dtype=_F64)
        self.n = 0

    @torch.no_grad()
    def update(self, acts: torch.Tensor) -> AngularDistanceMatrix:
        acts = as_tensor(acts, "acts")
        if acts.ndim != 3 or acts.shape[1] != self.n_layers:
            raise ShapeError(f"acts must be [B, L={self.n_layers}, d], got {tuple(acts.shape)}")
        if not acts.is_floating_point():
            raise ConfigError(f"acts must be floating point, got {acts.dtype}")
        check_finite(acts, "acts")
        x = acts.to(_F64)
        if self.mean is not None:
            mean = as_tensor(self.mean, "mean").to(device=x.device, dtype=_F64)
            if mean.shape != x.shape[1:]:
                raise ShapeError(f"mean must be [L, d] = {tuple(x.shape[1:])}, got {tuple(mean.shape)}")
            x = x - mean
        u = _unit_rows(x)
        cos = torch.einsum("bid,bjd->bij", u, u).clamp_(-1.0, 1.0)
        ang = torch.arccos(cos) / math.pi
        ang.diagonal(dim1=1, dim2=2).zero_()  # a layer is at distance 0 from itself (rounding aside)
        self._sum += ang.sum(0).cpu()
        self.n += acts.shape[0]
        return self

    def value(self) -> np.ndarray:
        """Symmetric [L, L] matrix of mean angular distances, zero diagonal."""
        if self.n == 0:
            raise EmptyDataError("no tokens were accumulated; the distance matrix is undefined")
        m = (self._sum / self.n).numpy()
        return (m + m.T) / 2


@dataclass
class LayerDistances:
    """A distance matrix between `layers` (model block indices), with how it was measured."""

    layers: list[int]
    matrix: np.ndarray
    n_tokens: int
    metric: str = "angular"
    centered: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=np.float64)
        L = len(self.layers)
        if self.matrix.shape != (L, L):
            raise ShapeError(f"matrix must be [{L}, {L}] for {L} layers, got {self.matrix.shape}")
        if len(set(self.layers)) != L:
            raise ConfigError(f"layers must be distinct, got {self.layers}")

    def sub(self, layers: Sequence[int]) -> LayerDistances:
        """The distances among a subset of the layers (e.g. without the last one)."""
        missing = [v for v in layers if v not in self.layers]
        if missing:
            raise ConfigError(f"layers {missing} are not in this matrix (it has {self.layers})")
        pos = [self.layers.index(v) for v in layers]
        return LayerDistances(list(layers), self.matrix[np.ix_(pos, pos)], self.n_tokens, self.metric,
                              self.centered, dict(self.metadata))

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "matrix": self.matrix.tolist(), "n_tokens": self.n_tokens,
                "metric": self.metric, "centered": self.centered, "metadata": self.metadata}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerDistances:
        return cls([int(v) for v in d["layers"]], np.asarray(d["matrix"], dtype=np.float64), int(d["n_tokens"]),
                   str(d.get("metric", "angular")), bool(d.get("centered", False)), dict(d.get("metadata") or {}))


def _batches_from(source: Any, layers: list[int] | None, split: str | None, batch_size: int,
                  max_tokens: int | None) -> tuple[list[int], Iterable[torch.Tensor]]:
    """(layers, iterable of [B, L, d] batches) from a cache or an in-memory tensor [N, L, d]."""
    from splinterp.data.cache import ActivationCache

    if isinstance(source, ActivationCache):
        layers = list(source.layers) if layers is None else list(layers)

        def gen():
            seen = 0
            for b in source.iter_batches(layers, batch_size, split=split, dtype=None):
                if b.ndim == 2:  # a single layer comes back as [B, d]
                    b = b[:, None]
                if max_tokens is not None:
                    b = b[: max_tokens - seen]
                if b.shape[0] == 0:
                    return
                seen += b.shape[0]
                yield b

        return layers, gen()
    x = as_tensor(source, "activations")
    if x.ndim != 3:
        raise ShapeError(f"activations must be [N, L, d] (the same tokens at L layers), got {tuple(x.shape)}")
    if layers is None:
        layers = list(range(x.shape[1]))
    elif len(layers) != x.shape[1]:
        raise ShapeError(f"{len(layers)} layer ids given for a tensor with {x.shape[1]} layers")
    if max_tokens is not None:
        x = x[:max_tokens]
    return list(layers), (x[s:s + batch_size] for s in range(0, x.shape[0], batch_size))


def layer_distances(
    source: Any,
    layers: Sequence[int] | None = None,
    *,
    split: str | None = "train",
    center: bool = False,
    batch_size: int = 4096,
    max_tokens: int | None = None,
    progress: bool = False,
) -> LayerDistances:
    """Mean angular distance between every pair of `layers`, streamed over the same tokens.

    source: an `ActivationCache` (its `split`; every layer of the cache holds the same tokens), or a
    tensor [N, L, d] (then `layers` only names the L slices). max_tokens: use the first this many tokens.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ConfigError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    layer_ids, _ = _batches_from(source, None if layers is None else list(layers), split, batch_size, max_tokens)
    mean = None
    if center:
        s, n = None, 0
        for b in _batches_from(source, layer_ids, split, batch_size, max_tokens)[1]:
            bs = b.to(_F64).sum(0)
            s = bs if s is None else s + bs
            n += b.shape[0]
        if n == 0:
            raise EmptyDataError("no tokens to compute the layer means on")
        mean = s / n
    acc = AngularDistanceMatrix(len(layer_ids), mean)
    batches = _batches_from(source, layer_ids, split, batch_size, max_tokens)[1]
    for b in tqdm(batches, desc="layer distances", unit="batch", disable=not progress, leave=False):
        acc.update(b)
    log.info("angular distances between layers %s over %d tokens (centered=%s)", layer_ids, acc.n, center)
    return LayerDistances(layer_ids, acc.value(), acc.n, "angular", center)
