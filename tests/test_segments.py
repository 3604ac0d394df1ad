"""segment_regions: dense sampling along the segment never sees a change the result misses, every piece's
active set is the SAE's at its midpoint, and the labels at each break are what sampling sees change."""

import numpy as np
import pytest
import torch
from conftest import random_sae

import splinterp as sp
from splinterp.errors import ShapeError
from splinterp.geometry import active_mask, segment_regions

ARCHS = sp.ARCHITECTURES


def _region_rows(sae, X):
    """A per-input region key (mask, and for topk_abs the signs) from the SAE's own encode path."""
    m = active_mask(sae, X).numpy()
    if sae.cfg.architecture == "topk_abs":
        return np.concatenate([m, (sae.pre_acts(X) > 0).numpy() & m], 1)
    return m


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d_in, d_sae, k", [(3, 12, 2), (16, 80, 6)])
def test_breaks_match_dense_sampling(arch, d_in, d_sae, k):
    sae = random_sae(arch, d_in=d_in, d_sae=d_sae, k=k, dtype="float64", seed=d_sae)
    g = torch.Generator().manual_seed(d_in)
    x0 = 2 * torch.randn(d_in, dtype=torch.float64, generator=g)
    x1 = 2 * torch.randn(d_in, dtype=torch.float64, generator=g)
    seg = segment_regions(sae, x0, x1)
    t = np.linspace(0.0, 1.0, 100_001)
    key = _region_rows(sae, seg.points(t))
    change = np.flatnonzero((key[1:] != key[:-1]).any(1))
    # every change seen between two samples has a break between them, and (at this density) vice versa
    for c in change:
        assert ((seg.breaks >= t[c]) & (seg.breaks <= t[c + 1])).any()
    assert len(seg.breaks) >= len(change) and len(seg.breaks) > 0
    # every sample lies in the piece the result says, with that piece's active set (and signs)
    piece = seg.piece_at(t)
    mine = seg.masks.numpy() if seg.signs is None else np.concatenate([seg.masks.numpy(), seg.signs.numpy()], 1)
    assert np.array_equal(mine[piece], key)
    # and every piece's midpoint encodes to its active set (pieces too short to be sampled included)
    assert np.array_equal(_region_rows(sae, seg.midpoints()), mine)


@pytest.mark.parametrize("arch", ["relu", "topk", "topk_abs"])
def test_labels_say_what_changes(arch):
    sae = random_sae(arch, d_in=8, d_sae=40, k=4, dtype="float64", seed=5)
    g = torch.Generator().manual_seed(1)
    seg = segment_regions(sae, torch.randn(8, dtype=torch.float64, generator=g) * 3,
                          torch.randn(8, dtype=torch.float64, generator=g) * 3)
    eps = 1e-9
    before = active_mask(sae, seg.points(seg.breaks - eps))
    after = active_mask(sae, seg.points(seg.breaks + eps))
    for b in range(len(seg.breaks)):
        assert set(seg.entered[b]) == set(torch.nonzero(after[b] & ~before[b]).flatten().tolist())
        assert set(seg.left[b]) == set(torch.nonzero(before[b] & ~after[b]).flatten().tolist())
    kinds = set(seg.kinds)
    assert kinds <= {"enter", "leave", "swap", "flip"}
    if arch == "topk":
        assert "swap" in kinds  # the k-set changes by one latent for another along the way
    assert seg.lengths.sum() == pytest.approx(float((seg.x1 - seg.x0).norm()))


def test_float32_sae_and_bad_input():
    sae = random_sae("topk", d_in=6, d_sae=30, k=3)
    x0, x1 = torch.randn(6), torch.randn(6)
    seg = segment_regions(sae, x0, x1)
    mids = seg.midpoints()
    assert torch.equal(active_mask(sae.double(), mids), seg.masks)
    with pytest.raises(ShapeError, match="x1"):
        segment_regions(sae, x0, torch.randn(5))
