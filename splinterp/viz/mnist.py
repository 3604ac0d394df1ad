"""MNIST pictures: encoder/decoder filters as 28x28 images, and reconstructions side by side."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.figure import Figure

IMAGE_SHAPE = (28, 28)


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _check_images(a: np.ndarray, name: str, image_shape: tuple[int, int]) -> np.ndarray:
    n_pix = image_shape[0] * image_shape[1]
    if a.ndim != 2 or a.shape[1] != n_pix:
        raise ValueError(f"{name} must be [n, {n_pix}] (flattened {image_shape[0]}x{image_shape[1]} images), "
                         f"got shape {a.shape}")
    return a


def filter_rows(sae, which: str = "decoder") -> np.ndarray:
    """[d_sae, d_in]: the SAE's encoder columns (W_enc.T, folded affine form) or decoder rows (W_dec)."""
    if which == "decoder":
        return _np(sae.W_dec)
    if which == "encoder":
        W, _ = sae.encoder_affine()
        return _np(W).T
    raise ValueError(f"which must be 'encoder' or 'decoder', got {which!r}")


def plot_filters(filters, n: int = 64, ncols: int = 8, order=None, title: str | None = None,
                 image_shape: tuple[int, int] = IMAGE_SHAPE, ax_grid=None) -> Figure:
    """Show n filters (rows of `filters` [m, 784], or an SAE's decoder rows) as images.

    Each filter is scaled by its own largest |value| and drawn with a diverging map (red positive, blue
    negative, white zero), so shapes are comparable whatever the norms. `order` picks which rows (default
    the first n).
    """
    if not isinstance(filters, (np.ndarray, torch.Tensor)) and hasattr(filters, "W_dec"):
        filters = filter_rows(filters, "decoder")
    F = _check_images(_np(filters), "filters", image_shape)
    idx = np.arange(min(n, len(F))) if order is None else np.asarray(order)[:n]
    nrows = max(1, math.ceil(len(idx) / ncols))
    fig = Figure(figsize=(1.1 * ncols, 1.1 * nrows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for a in axes.ravel():
        a.set_axis_off()
    for a, i in zip(axes.ravel(), idx):
        img = F[i].reshape(image_shape)
        m = float(np.abs(img).max()) or 1.0
        a.imshow(img, cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
        a.set_title(str(int(i)), fontsize=7, pad=1)
    if title:
        fig.suptitle(title)
    return fig


def plot_encoder_decoder_filters(sae, n: int = 16, ncols: int = 8, order=None) -> Figure:
    """Encoder columns (top) and decoder rows (bottom) of the same n latents, as 28x28 images."""
    enc, dec = filter_rows(sae, "encoder"), filter_rows(sae, "decoder")
    idx = np.arange(min(n, len(dec))) if order is None else np.asarray(order)[:n]
    nrows = max(1, math.ceil(len(idx) / ncols))
    fig = Figure(figsize=(1.1 * ncols, 2.3 * nrows + 0.8), layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    for sub, F, name in ((top, enc, "encoder (W_enc columns)"), (bottom, dec, "decoder (W_dec rows)")):
        axes = sub.subplots(nrows, ncols, squeeze=False)
        for a in axes.ravel():
            a.set_axis_off()
        for a, i in zip(axes.ravel(), idx):
            img = F[i].reshape(IMAGE_SHAPE)
            m = float(np.abs(img).max()) or 1.0
            a.imshow(img, cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
            a.set_title(str(int(i)), fontsize=7, pad=1)
        sub.suptitle(name, fontsize=10)
    return fig


def plot_reconstructions(x, reconstructions: Mapping[str, object], n: int = 8,
                         image_shape: tuple[int, int] = IMAGE_SHAPE) -> Figure:
    """Originals (first row) and each model's reconstructions (one row per model), with per-row MSE.

    All images of one column share the original's grey scale, so a reconstruction that is too faint or
    too bright shows as such.
    """
    X = _check_images(_np(x), "x", image_shape)[:n]
    rows = {"original": X}
    for name, r in reconstructions.items():
        R = _check_images(_np(r), f"reconstructions[{name!r}]", image_shape)[: len(X)]
        if R.shape != X.shape:
            raise ValueError(f"reconstructions[{name!r}] has {len(R)} rows, x has {len(X)}")
        rows[name] = R
    fig = Figure(figsize=(1.15 * len(X) + 1.6, 1.25 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(X), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(len(X)):
            a = axes[r, c]
            lo, hi = float(X[c].min()), float(X[c].max())
            a.imshow(imgs[c].reshape(image_shape), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            a.set_xticks([])
            a.set_yticks([])
        label = name if name == "original" else f"{name}\nmse {np.mean((imgs - X) ** 2):.3g}"
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    return fig
