"""Synthetic 2-D data, evaluation grids with one documented orientation, and deterministic splits.

Grid orientation ('xy', the one convention of the package): `make_grid` returns points whose flat index is
`row * W + col` with `col` indexing x (left to right) and `row` indexing y (bottom to top). So
`grid_to_image(values, shape)[row, col]` is the value at (x[col], y[row]), and
`plt.imshow(img, origin="lower", extent=grid_extent(bounds, resolution))` draws every pixel centred on its
grid point. (The E1 scripts used 'ij' indexing with the default origin, which rotates the picture.)
"""

from __future__ import annotations

import numpy as np
import torch

from splinterp.errors import ConfigError, ShapeError
from splinterp.validation import as_tensor, check_positive_int


def make_three_clusters(
    n: int = 100, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The E1 toy: three 2-D clusters -> (X [n, 2], cluster id int64 [n]).

    Cluster 0, int(0.4 n) points, a noisy horizontal line: x = linspace(-1.5, 0) + 0.1 N(0,1), y = -0.8 + 0.1 N.
    Cluster 1, int(0.3 n) points, a dense square: x ~ U[-0.4, 0.4), y ~ U[0.4, 1.2).
    Cluster 2, the rest (30 of 100), a scattered diagonal: t = linspace(0, 1), x = 0.8 + t + 0.15 N,
    y = t - 0.5 + 0.15 N. Seeded (the authors' scripts were not), drawn in float64 then cast to `dtype`.
    """
    n = check_positive_int(n, "n")
    n1, n2 = int(0.4 * n), int(0.3 * n)
    n3 = n - n1 - n2
    if min(n1, n2, n3) < 1:
        raise ConfigError(f"n={n} is too small for three non-empty clusters (need n >= 4)")
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def randn(m: int) -> torch.Tensor:
        return torch.randn(m, generator=g, dtype=f64)

    x1 = torch.linspace(-1.5, 0.0, n1, dtype=f64) + 0.1 * randn(n1)
    y1 = -0.8 + 0.1 * randn(n1)
    x2 = 0.8 * torch.rand(n2, generator=g, dtype=f64) - 0.4
    y2 = 0.8 * torch.rand(n2, generator=g, dtype=f64) + 0.4
    t = torch.linspace(0.0, 1.0, n3, dtype=f64)
    x3 = 0.8 + t + 0.15 * randn(n3)
    y3 = t - 0.5 + 0.15 * randn(n3)
    X = torch.stack([torch.cat([x1, x2, x3]), torch.cat([y1, y2, y3])], dim=1)
    y = torch.cat([torch.full((n1,), 0), torch.full((n2,), 1), torch.full((n3,), 2)]).long()
    return X.to(device=device, dtype=dtype), y.to(device)


def _bounds(bounds) -> tuple[float, float, float, float]:
    if isinstance(bounds, (int, float)):
        b = float(bounds)
        bounds = (-b, b, -b, b)
    if len(bounds) != 4:
        raise ConfigError(f"bounds must be (xmin, xmax, ymin, ymax) or one number b for [-b, b]^2, got {bounds!r}")
    xmin, xmax, ymin, ymax = (float(v) for v in bounds)
    if not (xmin < xmax and ymin < ymax):
        raise ConfigError(f"bounds must satisfy xmin < xmax and ymin < ymax, got {bounds!r}")
    return xmin, xmax, ymin, ymax


def _resolution(resolution) -> tuple[int, int]:
    if isinstance(resolution, (int, np.integer)):
        resolution = (resolution, resolution)
    nx, ny = (check_positive_int(v, "resolution") for v in resolution)
    if nx < 2 or ny < 2:
        raise ConfigError(f"resolution must be >= 2 along each axis, got {resolution!r}")
    return nx, ny


def make_grid(
    bounds=(-2.0, 2.0, -2.0, 2.0),
    resolution=95,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Regular grid -> (points [H*W, 2], shape (H, W)), 'xy' orientation (see the module docstring).

    bounds = (xmin, xmax, ymin, ymax) (inclusive; a number b means [-b, b]^2); resolution = n or (nx, ny).
    points[row * W + col] = (x[col], y[row]) with x = linspace(xmin, xmax, W), y = linspace(ymin, ymax, H).
    """
    xmin, xmax, ymin, ymax = _bounds(bounds)
    nx, ny = _resolution(resolution)
    xs = torch.linspace(xmin, xmax, nx, dtype=torch.float64)
    ys = torch.linspace(ymin, ymax, ny, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W]: row = y index, col = x index
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    return points.to(device=device, dtype=dtype), (ny, nx)


def grid_extent(bounds=(-2.0, 2.0, -2.0, 2.0), resolution=95) -> tuple[float, float, float, float]:
    """imshow `extent` that centres each pixel on its grid point (bounds padded by half a cell)."""
    xmin, xmax, ymin, ymax = _bounds(bounds)
    nx, ny = _resolution(resolution)
    hx, hy = (xmax - xmin) / (nx - 1) / 2, (ymax - ymin) / (ny - 1) / 2
    return (xmin - hx, xmax + hx, ymin - hy, ymax + hy)


def grid_to_image(values, shape: tuple[int, int]):
    """Per-point values [H*W, ...] -> image [H, W, ...]; draw with origin="lower". Tensor or numpy in, same out."""
    H, W = shape
    if values.shape[0] != H * W:
        raise ShapeError(f"values has {values.shape[0]} rows but the grid has H*W = {H}*{W} = {H * W} points")
    return values.reshape(H, W, *values.shape[1:])


def train_test_split(X, y=None, test_frac: float = 0.2, seed: int = 0, stratify: bool = False):
    """Deterministic seeded split -> (X_train, X_test) or (X_train, X_test, y_train, y_test).

    Rows are shuffled by a torch generator seeded with `seed`; round(test_frac * N) of them go to the test set
    (at least one in each part). With `stratify=True` (needs y) each class contributes round(test_frac * n_c)
    test rows. Tensors and numpy arrays are both accepted; outputs have the input's type.
    """
    if not 0.0 < test_frac < 1.0:
        raise ConfigError(f"test_frac must be in (0, 1), got {test_frac!r}")
    N = X.shape[0]
    if N < 2:
        raise ConfigError(f"need at least 2 rows to split, got {N}")
    if y is not None and y.shape[0] != N:
        raise ShapeError(f"X has {N} rows but y has {y.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(N, generator=g, dtype=torch.float64)
    perm = torch.argsort(keys)
    if stratify:
        if y is None:
            raise ConfigError("stratify=True needs labels y")
        yt = torch.tensor(y, dtype=torch.long) if isinstance(y, np.ndarray) else as_tensor(y, "y").cpu().long()
        classes, inv, counts = torch.unique(yt, return_inverse=True, return_counts=True)
        by_class = perm[torch.argsort(inv[perm], stable=True)]  # grouped by class, random within a class
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty(N, dtype=torch.long)
        rank[by_class] = torch.arange(N) - starts.repeat_interleave(counts)
        n_test_c = torch.round(counts.double() * test_frac).long()
        in_test = rank < n_test_c[inv]
    else:
        n_test = min(max(int(round(test_frac * N)), 1), N - 1)
        in_test = torch.zeros(N, dtype=torch.bool)
        in_test[perm[:n_test]] = True
    if bool(in_test.all()) or not bool(in_test.any()):
        raise ConfigError(f"test_frac={test_frac} leaves one side of the split empty for N={N}")
    train_idx, test_idx = perm[~in_test[perm]], perm[in_test[perm]]

    def take(a, idx):
        if isinstance(a, np.ndarray):
            return a[idx.numpy()]
        return a[idx.to(a.device)]

    out = [take(X, train_idx), take(X, test_idx)]
    if y is not None:
        out += [take(y, train_idx), take(y, test_idx)]
    return tuple(out)
