"""The one raster orientation of splinterp: x to the right, y up, ``origin="lower"``.

A raster over ``bounds = (xmin, xmax, ymin, ymax)`` with ``shape = (H, W)`` has pixel (row r, column c)
centred at (grid from `splinterp.data.make_grid`)

    x = xmin + (c + 0.5) * (xmax - xmin) / W,     y = ymin + (r + 0.5) * (ymax - ymin) / H,

i.e. rows follow y (row 0 at the bottom) and columns follow x (meshgrid 'xy' indexing). `pixel_centers`
returns those points flattened row-major (so ``values.reshape(H, W)`` is the image), and `show_raster`
draws an image with ``imshow(origin="lower", extent=bounds)``, which puts each pixel exactly over the
point it was computed at. Every raster in `splinterp.viz` goes through these two functions; the
authors' figures drew 'ij' grids with the default ``origin="upper"`` and so showed their partitions
rotated by 90 degrees, which this convention rules out.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Bounds = tuple[float, float, float, float]


def check_bounds(bounds: Sequence[float]) -> Bounds:
    """(xmin, xmax, ymin, ymax) as floats, with xmin < xmax and ymin < ymax."""
    if len(bounds) != 4:
        raise ValueError(f"bounds must be (xmin, xmax, ymin, ymax), got {bounds!r}")
    xmin, xmax, ymin, ymax = (float(b) for b in bounds)
    if not (np.isfinite([xmin, xmax, ymin, ymax]).all() and xmin < xmax and ymin < ymax):
        raise ValueError(f"bounds must be finite with xmin < xmax and ymin < ymax, got {bounds!r}")
    return xmin, xmax, ymin, ymax


def raster_shape(bounds: Sequence[float], resolution: int) -> tuple[int, int]:
    """(H, W) with about `resolution` pixels along the longer side and square pixels."""
    xmin, xmax, ymin, ymax = check_bounds(bounds)
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    w, h = xmax - xmin, ymax - ymin
    if w >= h:
        return max(2, int(round(resolution * h / w))), int(resolution)
    return int(resolution), max(2, int(round(resolution * w / h)))


def pixel_centers(bounds: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """float64 [H*W, 2]: the (x, y) of every pixel centre, row-major with rows along y (row 0 = ymin).

    Built with `splinterp.data.make_grid` (the package's one 'xy' grid) over the pixel centres, i.e. the
    bounds shrunk by half a pixel, so that ``extent=bounds`` in `show_raster` is exact.
    """
    import torch

    from splinterp.data.toy import make_grid

    xmin, xmax, ymin, ymax = check_bounds(bounds)
    H, W = shape
    if H < 2 or W < 2:
        raise ValueError(f"a raster needs at least 2 x 2 pixels, got shape {shape}")
    hx, hy = 0.5 * (xmax - xmin) / W, 0.5 * (ymax - ymin) / H
    pts, grid_shape = make_grid((xmin + hx, xmax - hx, ymin + hy, ymax - hy), (W, H), dtype=torch.float64)
    if tuple(grid_shape) != (H, W):  # make_grid's layout changed under us: a bug, not bad input
        raise RuntimeError(f"make_grid returned a {tuple(grid_shape)} grid for a {(H, W)} raster")
    return pts.numpy()


def pixel_of(point: Sequence[float], bounds: Sequence[float], shape: tuple[int, int]) -> tuple[int, int]:
    """(row, column) of the pixel that contains the point (x, y)."""
    xmin, xmax, ymin, ymax = check_bounds(bounds)
    H, W = shape
    c = int(np.clip(np.floor((point[0] - xmin) / (xmax - xmin) * W), 0, W - 1))
    r = int(np.clip(np.floor((point[1] - ymin) / (ymax - ymin) * H), 0, H - 1))
    return r, c


def show_raster(ax, image: np.ndarray, bounds: Sequence[float], **kwargs):
    """imshow an [H, W] or [H, W, 3|4] image computed at `pixel_centers(bounds, (H, W))`."""
    xmin, xmax, ymin, ymax = check_bounds(bounds)
    kwargs.setdefault("interpolation", "nearest")
    kwargs.setdefault("aspect", "equal")
    return ax.imshow(image, origin="lower", extent=(xmin, xmax, ymin, ymax), **kwargs)
