"""Slice2D.adjacency: neighbours found from the hyperplanes their shared edge lies on are exactly the pairs of
polygons that share a boundary segment (found independently by coincident edge midpoints), and each pair's
active sets differ by exactly the edge's label."""

import numpy as np
import pytest
import torch
from conftest import random_sae

import splinterp as sp
from splinterp.geometry import plane_through, slice_2d


def _shared_edges(polygons, tol=1e-9):
    """Pairs of polygons with an edge midpoint in common, by brute force over all edges."""
    mids, owner = [], []
    for i, p in enumerate(polygons):
        mids.append((p + np.roll(p, -1, 0)) / 2)
        owner += [i] * len(p)
    M, O = np.concatenate(mids), np.array(owner)
    scale = float(np.ptp(M, axis=0).max())
    out = set()
    for a in range(len(M)):
        close = np.flatnonzero(np.abs(M - M[a]).max(1) <= tol * scale)
        out |= {(min(O[a], O[b]), max(O[a], O[b])) for b in close if O[b] != O[a]}
    return out


@pytest.mark.parametrize("arch", sp.ARCHITECTURES)
def test_neighbours_differ_by_exactly_their_label(arch):
    sae = random_sae(arch, d_in=6, d_sae=18, k=3, dtype="float64", seed=4)
    X = torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    sl = slice_2d(sae, plane_through(*X))
    adj = sl.adjacency()
    assert {tuple(e) for e in adj.edges.tolist()} == _shared_edges(sl.polygons)
    m = sl.masks.numpy()
    s = None if sl.signs is None else sl.signs.numpy()
    for (r1, r2), label in zip(adj.edges, adj.labels):
        diff = m[r1] != m[r2]
        if s is not None:
            diff |= m[r1] & m[r2] & (s[r1] != s[r2])
        assert tuple(np.flatnonzero(diff)) == label and len(label) in (1, 2)
        if arch in ("relu", "jumprelu", "gated"):
            assert len(label) == 1  # one latent flips across a line
    assert (adj.lengths > 0).all() and adj.degree().sum() == 2 * len(adj)
    r0 = int(adj.edges[0, 0])
    assert int(adj.edges[0, 1]) in adj.neighbors(r0)
