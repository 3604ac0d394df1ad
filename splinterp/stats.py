"""Summaries of a result over several seeds: the mean with a Student-t confidence interval.

Why Student-t: with the 3-10 seeds an experiment can afford, the sample standard deviation is itself
noisy, and the normal quantile 1.96 would give intervals that cover the true mean far less often than
stated (with 5 seeds the right factor is t(0.975, 4) = 2.776).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

from splinterp.errors import ConfigError, EmptyDataError, NonFiniteError


class MeanCI(NamedTuple):
    """Mean of n values and the two-sided confidence interval [low, high] of the mean."""

    mean: float
    low: float
    high: float
    half_width: float
    """t(1 - (1 - confidence) / 2, n - 1) * sd / sqrt(n); nan for a single value (no spread to estimate)."""
    sd: float
    """Sample standard deviation (n - 1 in the denominator); nan for a single value."""
    n: int

    def format(self, digits: int = 3) -> str:
        """"mean ± half_width" (or the mean alone for one value)."""
        if math.isnan(self.half_width):
            return f"{self.mean:.{digits}g}"
        return f"{self.mean:.{digits}g} ± {self.half_width:.2g}"


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> MeanCI:
    """Mean and Student-t confidence interval of the mean of independent values (e.g. one per seed)."""
    from scipy.stats import t as student_t

    xs = [float(v) for v in values]
    if not xs:
        raise EmptyDataError("mean_ci needs at least one value")
    if not all(math.isfinite(v) for v in xs):
        raise NonFiniteError(f"mean_ci got a non-finite value: {xs}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ConfigError(f"confidence must lie in (0, 1), got {confidence!r}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return MeanCI(mean, math.nan, math.nan, math.nan, math.nan, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in xs) / (n - 1))
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return MeanCI(mean, mean - half, mean + half, half, sd, n)


__all__ = ["MeanCI", "mean_ci"]
