"""Argument checks shared by the geometry entry points: boxes, index sets, tolerances, counts.

Why one place: a box is a box whether `cells_2d`, `slice_2d`, the LP or `enumerate_regions` reads it, and bad
arguments must be refused the same way everywhere (named, never coerced: no truncated float index, no string
parsed as four numbers, no NaN tolerance that silently drops every cell).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from splinterp.errors import ConfigError, DTypeError, NonFiniteError, NotAModelError, ShapeError
from splinterp.validation import as_tensor, check_finite


def _numbers(value, name: str) -> np.ndarray:
    """A float64 array from a sequence or array of real numbers (bools and strings refused)."""
    if isinstance(value, (str, bytes)):
        raise DTypeError(f"{name} must be numbers, got the string {value!r}")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        raise ShapeError(f"{name} must be an array of numbers, got {value!r}") from None
    if arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise DTypeError(f"{name} must be real numbers, got {value!r} (dtype {arr.dtype})")
    return arr.astype(np.float64)


def check_box(bounds, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A box in R^n as (lo [n], hi [n]) float64, or None for no box.

    Accepted: None; (lo, hi) scalars (a cube); an array [n, 2] of (lo, hi) rows; for n = 2 also
    (xmin, xmax, ymin, ymax) as in `cells_2d`. Finite, lo < hi in every coordinate.
    """
    if bounds is None:
        return None
    arr = _numbers(bounds, "bounds")
    if arr.shape == (2,):
        lo, hi = np.full(n, arr[0]), np.full(n, arr[1])
    elif arr.shape == (n, 2):
        lo, hi = arr[:, 0].copy(), arr[:, 1].copy()
    elif n == 2 and arr.shape == (4,):
        lo, hi = arr[[0, 2]], arr[[1, 3]]
    else:
        raise ShapeError(
            f"bounds must be (lo, hi), an array [n={n}, 2]"
            + (" or (xmin, xmax, ymin, ymax)" if n == 2 else "")
            + f"; got shape {arr.shape}"
        )
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise NonFiniteError(f"bounds must be finite, got {arr.tolist()}")
    if not (lo < hi).all():
        raise ConfigError(f"bounds need lo < hi in every coordinate (xmin < xmax and ymin < ymax), got {arr.tolist()}")
    return lo, hi


def check_bounds(bounds) -> tuple[float, float, float, float]:
    """A 2-D box (xmin, xmax, ymin, ymax) as floats (`check_box` with n = 2, written out)."""
    arr = _numbers(bounds, "bounds")
    if arr.shape != (4,):
        raise ShapeError(f"bounds must be (xmin, xmax, ymin, ymax), got shape {arr.shape}")
    lo, hi = check_box(arr, 2)
    return (float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1]))


def check_index_set(S, m: int, name: str = "S") -> np.ndarray:
    """bool mask [m] from a mask [m] or integer indices in [0, m) without repeats (floats, NaN and strings
    refused: an index is never truncated)."""
    if isinstance(S, (str, bytes)):
        raise DTypeError(f"{name} must be integer indices or a bool mask, got the string {S!r}")
    if isinstance(S, torch.Tensor):
        S = S.detach().cpu().numpy()
    try:
        arr = np.asarray(S)
    except (TypeError, ValueError):
        raise DTypeError(f"{name} must be integer indices or a bool mask, got {S!r}") from None
    if arr.dtype == bool:
        if arr.shape != (m,):
            raise ShapeError(f"{name} as a mask must have shape [{m}], got {arr.shape}")
        return arr.copy()
    if arr.size and arr.dtype.kind not in "iu":
        raise DTypeError(f"{name} must be integer indices or a bool mask, got {arr.dtype} values {arr.tolist()!r}")
    idx = arr.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= m):
        raise ConfigError(f"{name}: indices must be in [0, {m}), got {idx.tolist()}")
    if len(set(idx.tolist())) != idx.size:
        raise ConfigError(f"{name} has repeated indices: {idx.tolist()}")
    mask = np.zeros(m, dtype=bool)
    mask[idx] = True
    return mask


def check_nonneg_float(value, name: str, allow_none: bool = False) -> float | None:
    """A finite number >= 0 (None passes when allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DTypeError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be finite and >= 0, got {value!r}")
    return v


def check_count(value, name: str, minimum: int = 1) -> int:
    """An integer >= minimum (bools and floats such as 2.5 refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def input_point(x, d: int, name: str) -> torch.Tensor:
    """One finite floating input [d_in] (a [1, d_in] row is accepted) as float64 on the CPU: the points that
    define slices and segments."""
    t = as_tensor(x, name)
    if t.ndim == 2 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 1 or t.shape[0] != d:
        raise ShapeError(f"{name} must have shape [d_in={d}], got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise DTypeError(f"{name} must be floating point, got {t.dtype}")
    check_finite(t, name)
    return t.detach().cpu().double()


def takes_sae(fn):
    """Decorator of the public geometry functions: their first argument may be our SAE or an SAE object of
    SAELens, sparsify or dictionary_learning (converted by `splinterp.as_sae`, which keeps the library's score
    order, so the active sets are the library's; convert once yourself to reuse it across many calls)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if args:
            args = (as_geometry_sae(args[0]), *args[1:])
        elif "sae" in kwargs:
            kwargs["sae"] = as_geometry_sae(kwargs["sae"])
        return fn(*args, **kwargs)

    return wrapper


def as_geometry_sae(sae):
    """Our SAE as it is, another library's SAE object converted (`splinterp.as_sae`); anything else is a
    NotAModelError naming `sae` (the geometry reads an SAE's encoder_affine and thresholds)."""
    from splinterp.io.objects import as_sae_if_foreign
    from splinterp.sae import SAE

    sae = as_sae_if_foreign(sae)
    if not isinstance(sae, SAE):
        raise NotAModelError(f"sae must be a splinterp SAE, got {type(sae).__name__}; an SAE from SAELens, "
                             "sparsify or dictionary_learning converts with splinterp.as_sae(obj)")
    return sae
