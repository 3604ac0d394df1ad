"""splinterp.moments: the streamed mean / variance merge against numpy's two-pass float64 answer."""

import numpy as np
import pytest
import torch

from splinterp.moments import Moments


@pytest.mark.parametrize("cuts", [(1,), (3, 4, 50), tuple(range(1, 99))])
def test_merged_moments_equal_numpys_two_pass_answer(cuts):
    # a large mean with a small spread: a one-pass sum of squares would lose most digits here
    X = 1e6 + np.random.default_rng(0).normal(size=(100, 5))
    parts = [Moments.of(torch.from_numpy(p)) for p in np.split(X, cuts)]
    m = Moments.combine(parts)
    assert m.n == 100
    np.testing.assert_allclose(m.mean.numpy(), X.mean(0), rtol=1e-15)
    np.testing.assert_allclose(m.var.numpy(), X.var(0), rtol=1e-9)


def test_empty_parts_are_skipped_and_nothing_is_none():
    X = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert Moments.combine([None, Moments.of(X), None]).n == 7
    assert Moments.combine([None]) is None
