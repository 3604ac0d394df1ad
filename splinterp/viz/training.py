"""Training curves: SGD vs PAM-SGD (or any runs) from `History` objects or plain dicts of lists."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from splinterp.viz.colors import palette
from splinterp.viz.style import integer_ticks, metric_label, plain_log_ticks, style

_LINESTYLES = {"train": "--", "test": "-"}


def as_curves(history: Any) -> dict[str, list[float]]:
    """A run's per-epoch series as {name: list of floats}.

    Accepts `splinterp.train.History` (or its `to_dict()`: per-epoch records), a dict of lists, or a
    dataclass of lists; keeps the numeric columns (epochs where a column is missing become NaN).
    """
    records = getattr(history, "records", None)
    if records is None and isinstance(history, Mapping) and isinstance(history.get("records"), list):
        records = history["records"]
    if records is not None:
        keys = list(dict.fromkeys(k for r in records for k in r))
        d = {k: [r.get(k) for r in records] for k in keys}
    elif dataclasses.is_dataclass(history) and not isinstance(history, type):
        d = dataclasses.asdict(history)
    elif isinstance(history, Mapping):
        d = dict(history)
    else:
        raise TypeError(f"cannot read training curves from {type(history).__name__}: pass a History or a dict")
    out = {}
    for k, v in d.items():
        if not isinstance(v, (list, tuple, np.ndarray)) or not len(v):
            continue
        vals = list(np.ravel(np.asarray(v, dtype=object)))
        if all(x is None or (isinstance(x, (int, float, np.number)) and not isinstance(x, bool)) for x in vals) \
                and any(x is not None for x in vals):
            out[str(k)] = [float("nan") if x is None else float(x) for x in vals]
    return out


def plot_training_curves(
    histories: Mapping[str, Any],
    metrics: Sequence[str] = ("train_mse", "test_mse"),
    x: str | None = None,
    logy: bool = True,
    title: str | None = None,
    ax=None,
) -> Figure:
    """Curves of `metrics` against epoch for each named run (e.g. {"SGD": h1, "PAM-SGD": h2}).

    One colour per run; train dashed, test solid (by the metric name's prefix). `x` names a series to use
    as the x axis (e.g. "wall_time"); default is the epoch index 1..n. Metrics a run lacks are skipped.
    """
    if not histories:
        raise ValueError("histories is empty: pass {run name: History or dict}")
    if ax is None:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    cols = palette(max(len(histories), 1))
    drawn = 0
    for color, (name, h) in zip(cols, histories.items()):
        curves = as_curves(h)
        for m in metrics:
            if m not in curves:
                continue
            y = np.asarray(curves[m])
            if x is not None and x in curves:
                xs = np.asarray(curves[x])
            elif x is None and "epoch" in curves:
                xs = np.asarray(curves["epoch"])
            else:
                xs = np.arange(1, len(y) + 1)
            style = next((s for p, s in _LINESTYLES.items() if m.startswith(p)), "-")
            ax.plot(xs[: len(y)], y, style, color=color * 0.8, lw=2, label=f"{name}: {m}", marker="o", ms=3)
            drawn += 1
    if drawn == 0:
        raise ValueError(f"none of the runs has any of the metrics {list(metrics)}")
    if logy:
        ax.set_yscale("log")
        plain_log_ticks(ax, "y")
    ax.set_xlabel(metric_label(x) if x else "epoch")
    if x is None:
        integer_ticks(ax, "x")
    ax.set_ylabel(", ".join(metric_label(m) for m in metrics))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def readable_log_axis(ax, axis: str = "y") -> None:
    """Log scale with ticks at 1, 2, 5 x 10^k written plainly (0.2, 0.5, 1): a range inside one decade still
    gets labelled ticks."""
    from matplotlib.ticker import LogLocator

    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    plain_log_ticks(ax, axis)
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))


def plot_mean_curves(runs: Mapping[str, Mapping[str, Mapping[str, Sequence[float | None]]]],
                     metrics: Sequence[str] = ("train_mse", "test_mse"), logy: bool = True,
                     title: str | None = None, ax=None) -> Figure:
    """Per-epoch means over seeds with their 95% CI bands, one colour per method (`viz.style`).

    runs = {method key: {metric: {"mean": [...], "low": [...], "high": [...]}}} (low/high None or NaN
    with a single seed: no band is drawn). Train dashed, test solid; epochs 1..n with integer ticks.
    """
    if not runs:
        raise ValueError("runs is empty: pass {method: {metric: {mean, low, high}}}")
    if ax is None:
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    drawn = 0
    for key, curves in runs.items():
        st = style(key)
        for m in metrics:
            if m not in curves:
                continue
            c = curves[m]
            mean = np.asarray(c["mean"], dtype=float)
            xs = np.arange(1, len(mean) + 1)
            ls = next((s for p, s in _LINESTYLES.items() if m.startswith(p)), "-")
            ax.plot(xs, mean, ls=ls, color=st["color"], marker=st["marker"], ms=3, lw=1.8,
                    label=st["label"] if ls == "-" or "test_" + m.removeprefix("train_") not in curves else None)
            lo = np.asarray([np.nan if v is None else v for v in c.get("low") or [None] * len(mean)], dtype=float)
            hi = np.asarray([np.nan if v is None else v for v in c.get("high") or [None] * len(mean)], dtype=float)
            if np.isfinite(lo).all() and np.isfinite(hi).all():
                ax.fill_between(xs, lo, hi, color=st["color"], alpha=0.2, linewidth=0)
            drawn += 1
    if drawn == 0:
        raise ValueError(f"none of the runs has any of the metrics {list(metrics)}")
    if logy:
        readable_log_axis(ax, "y")
    integer_ticks(ax, "x")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE (dashed: train, solid: test)" if len(metrics) > 1 else metric_label(metrics[0]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return fig


def plot_metric_bars(results: Mapping[str, Mapping[str, float]], metric: str, title: str | None = None,
                     ax=None) -> Figure:
    """Bar chart of one final metric per run: results = {run: {metric: value}}."""
    names = [n for n in results if metric in results[n]]
    if not names:
        raise ValueError(f"no run has metric {metric!r}")
    if ax is None:
        fig = Figure(figsize=(1.2 + 1.1 * len(names), 3.6), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    vals = [float(results[n][metric]) for n in names]
    bars = ax.bar(names, vals, color=palette(len(names)) * 0.85)
    ax.bar_label(bars, fmt="%.4g", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.grid(axis="y", alpha=0.3)
    return fig
