"""Count, mean and sum of squared deviations of a stream of rows, merged exactly (Chan, Golub, LeVeque 1979).

Why one place: streamed standardisation, streamed metrics (explained variance) and the data-parallel
merge of both need the same pairwise update, and a one-pass sum of squares loses precision where the mean
is large. Accumulated in float64 whatever the data's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class Moments:
    """Per-feature moments of N rows: `mean` [d] and `m2` [d] = sum_r (x_r - mean)^2, float64."""

    n: int
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor) -> Moments:
        """Moments of a batch [N, d] (N >= 1)."""
        x = x.detach().to(torch.float64)
        mean = x.mean(0)
        return cls(int(x.shape[0]), mean, ((x - mean) ** 2).sum(0))

    @classmethod
    def from_std(cls, n: int, mean: torch.Tensor, std: torch.Tensor) -> Moments:
        """Moments from a population standard deviation (std^2 = m2 / n)."""
        return cls(int(n), mean.to(torch.float64), std.to(torch.float64) ** 2 * n)

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of rows together (exact, order-independent up to rounding)."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean.to(self.mean.device) - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2.to(self.m2.device) + delta ** 2 * (self.n * other.n / n)
        return Moments(n, mean, m2)

    @staticmethod
    def combine(parts: Iterable[Moments | None]) -> Moments | None:
        """Merge several parts in order (None parts are skipped); None when there is no row at all."""
        out: Moments | None = None
        for p in parts:
            if p is None or p.n == 0:
                continue
            out = p if out is None else out.merge(p)
        return out

    @property
    def var(self) -> torch.Tensor:
        """Population variance per feature (m2 / n)."""
        return self.m2 / self.n
