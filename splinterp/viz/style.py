"""One look for every figure: a colour, label and marker per method and per architecture (the same in every
figure of the package), readable metric names, and the axis conventions a reader expects.

Why one place: a reader compares figures side by side; PAM-SGD must be the same colour in the E2 curves, the
training-size plot, the ablation bars and the LLM figures, and an axis must say "test MSE", not `test_mse`.

    from splinterp.viz.style import style, metric_label, integer_ticks, plain_log_ticks, bars_from_zero
    ax.plot(x, y, **style("pam_sgd"))          # color, label, marker
    ax.set_ylabel(metric_label("test_mse"))    # "test MSE"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from splinterp.errors import ConfigError

__all__ = ["STYLES", "band", "bars_from_zero", "integer_ticks", "metric_label", "plain_log_ticks", "style"]

# Okabe-Ito colour-blind-safe palette, assigned once.
_BLUE, _VERMILLION, _ORANGE, _GREEN, _PURPLE = "#0072B2", "#D55E00", "#E69F00", "#009E73", "#CC79A7"
_SKY, _YELLOW, _GREY, _BLACK = "#56B4E9", "#F0E442", "#7F7F7F", "#000000"

STYLES: dict[str, dict[str, Any]] = {
    # trainers
    "sgd": {"color": _BLUE, "label": "SGD", "marker": "o"},
    "pam_sgd": {"color": _VERMILLION, "label": "PAM-SGD", "marker": "s"},
    "pam_sgd_authors": {"color": _ORANGE, "label": "PAM-SGD (authors' settings)", "marker": "^"},
    "pam_sgd_ridge": {"color": _PURPLE, "label": "PAM-SGD, large ridge", "marker": "D"},
    # reference autoencoders and the SAE between them
    "kmeans": {"color": _GREY, "label": "k-means AE", "marker": "v"},
    "sae": {"color": _BLUE, "label": "TopK SAE", "marker": "o"},
    "local_pca": {"color": _GREEN, "label": "k-means + local PCA AE", "marker": "P"},
    "pca": {"color": _BLACK, "label": "PCA AE", "marker": "*"},
    # architectures
    "relu": {"color": _BLUE, "label": "ReLU", "marker": "o"},
    "topk": {"color": _VERMILLION, "label": "TopK", "marker": "s"},
    "topk_abs": {"color": _ORANGE, "label": "TopK |u| (paper's variant)", "marker": "^"},
    "jumprelu": {"color": _PURPLE, "label": "JumpReLU", "marker": "D"},
    "gated": {"color": _GREEN, "label": "Gated", "marker": "P"},
    # transfer directions
    "scratch": {"color": _GREY, "label": "from scratch", "marker": "o"},
    "forward": {"color": _SKY, "label": "forward (from layer l-1)", "marker": ">"},
    "backward": {"color": _YELLOW, "label": "backward (from layer l+1)", "marker": "<"},
}


def style(key: str, **overrides: Any) -> dict[str, Any]:
    """Matplotlib keyword arguments (color, label, marker) of a method / model / architecture key, e.g.
    `ax.plot(x, y, **style("pam_sgd"))`. Keys of the form "pam_sgd_alpha=100" map to the large-ridge style."""
    base = key.split("_alpha=")[0] + "_ridge" if "_alpha=" in key else key
    if base not in STYLES:
        raise ConfigError(f"no style for {key!r}; known: {sorted(STYLES)}")
    out = dict(STYLES[base])
    if "_alpha=" in key:
        out["label"] = f"PAM-SGD, ridge alpha={key.split('_alpha=')[1]}"
    out.update(overrides)
    return out


_METRICS = {
    "mse": "MSE", "fvu": "FVU (fraction of variance unexplained)", "l0": "$L_0$ (active latents per input)",
    "l1": "$L_1$ of the code", "explained_variance": "explained variance", "cossim": "cosine similarity",
    "loss": "training loss", "n_regions": "regions (distinct active sets)",
    "relative_reconstruction_bias": r"shrinkage $\gamma$", "gamma": r"shrinkage $\gamma$",
    "pct_nonzero": "non-zero latents (%)", "dead_features": "dead latents", "wall_time": "wall time (s)",
}


def metric_label(key: str) -> str:
    """A readable axis label for a metric key: "test_mse" -> "test MSE", "train_l0" -> "train $L_0$ (...)"."""
    prefix = ""
    for p in ("train_", "test_"):
        if key.startswith(p):
            prefix, key = p[:-1] + " ", key[len(p):]
    return prefix + _METRICS.get(key, key.replace("_", " "))


def integer_ticks(ax, axis: str = "x") -> None:
    """Only whole numbers on `axis` (epochs, steps, layers, counts)."""
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def plain_log_ticks(ax, axis: str = "y", values: Sequence[float] | None = None) -> None:
    """Tick labels a person reads on a log axis: 0.2, 0.5, 1, 2 (not 2x10^-1). `values` puts ticks exactly
    there (e.g. the data's x values when there are few)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    if values is not None:
        a.set_major_locator(FixedLocator(list(values)))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_formatter(NullFormatter())


def bars_from_zero(ax, axis: str = "y") -> None:
    """Bar charts start at 0, so bar lengths compare (a truncated axis exaggerates differences)."""
    lo, hi = ax.get_ylim() if axis == "y" else ax.get_xlim()
    lo, hi = min(0.0, lo), max(0.0, hi)
    (ax.set_ylim if axis == "y" else ax.set_xlim)(lo, hi)


def band(ax, x, mean, lo, hi, key: str, **overrides: Any):
    """A mean line with a shaded confidence band (lo..hi), in the style of `key`."""
    st = style(key, **overrides)
    x, mean, lo, hi = (np.asarray(v, dtype=float) for v in (x, mean, lo, hi))
    line = ax.plot(x, mean, **st)[0]
    ax.fill_between(x, lo, hi, color=st["color"], alpha=0.2, linewidth=0)
    return line
