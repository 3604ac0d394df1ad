"""mean_ci against Student-t table values computed by hand, and its coverage on simulated data."""

import math

import numpy as np
import pytest

from splinterp.errors import ConfigError, EmptyDataError, NonFiniteError
from splinterp.stats import mean_ci


@pytest.mark.parametrize("values, t_table", [
    ([1.0, 2.0, 3.0, 4.0, 5.0], 2.776),  # t(0.975, 4) from a printed table
    ([0.41, 0.39], 12.706),  # t(0.975, 1)
    (list(range(10)), 2.262),  # t(0.975, 9)
])
def test_against_hand_computation(values, t_table):
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    want = t_table * sd / math.sqrt(n)
    got = mean_ci(values)
    assert got.mean == pytest.approx(mean, rel=1e-15) and got.sd == pytest.approx(sd, rel=1e-12)
    assert got.half_width == pytest.approx(want, rel=2e-4)  # the table has 4 significant digits
    assert (got.low, got.high) == pytest.approx((mean - got.half_width, mean + got.half_width))
    assert got.n == n


def test_one_value_has_no_interval_and_format():
    one = mean_ci([0.5])
    assert one.mean == 0.5 and math.isnan(one.half_width) and one.format() == "0.5"
    assert mean_ci([1.0, 2.0, 3.0, 4.0, 5.0]).format() == "3 ± 2"


def test_coverage_on_normal_samples():
    """95% intervals from 5 normal draws cover the true mean in 95% of 4,000 trials (binomial sd 0.34%;
    the normal quantile 1.96 instead of t would give about 88%)."""
    rng = np.random.default_rng(0)
    draws = rng.normal(3.0, 2.0, size=(4000, 5))
    hits = sum(mean_ci(row).low <= 3.0 <= mean_ci(row).high for row in draws)
    assert abs(hits / 4000 - 0.95) < 0.012


def test_bad_input():
    with pytest.raises(EmptyDataError):
        mean_ci([])
    with pytest.raises(NonFiniteError):
        mean_ci([1.0, float("inf")])
    with pytest.raises(ConfigError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)
