"""The brute-force region count of a line arrangement clipped to a box: the independent reference that the
exact slice tests (test_slice, test_viz_html, test_slice_command) compare `slice_2d` against."""

import numpy as np


def brute_force_arrangement_count(W2, b2, bounds):
    """1 + L + I by plain float64 loops: L lines a x + b y + c = 0 crossing the box, I pairwise crossings
    strictly inside it (the exact count of a line arrangement in general position clipped to a box)."""
    x0, x1, y0, y1 = bounds
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    a, b, c = W2[0], W2[1], b2
    vals = corners @ np.vstack([a, b]) + c
    cross = np.flatnonzero((vals.min(0) < 0) & (vals.max(0) > 0))
    inside = 0
    for ii, i in enumerate(cross):
        j = cross[ii + 1 :]
        det = a[i] * b[j] - b[i] * a[j]
        with np.errstate(divide="ignore", invalid="ignore"):
            px = (b[i] * c[j] - c[i] * b[j]) / det
            py = (c[i] * a[j] - a[i] * c[j]) / det
        inside += int(((px > x0) & (px < x1) & (py > y0) & (py < y1)).sum())
    return 1 + len(cross) + inside
