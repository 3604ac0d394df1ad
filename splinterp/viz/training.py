"""Training curves: SGD vs PAM-SGD (or any runs) from `History` objects or plain dicts of lists."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from splinterp.viz.colors import palette
from splinterp.viz.style import band, bars_from_zero, integer_ticks, metric_label, plain_log_ticks, style

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


def plot_setting_bars(panels: Mapping[str, tuple[Sequence[Mapping[str, Any]], str]], metric: str,
                      title: str) -> Figure:
    """Grouped bars of a metric's mean over seeds with 95% CI error bars, from zero: one panel per entry of
    panels = {panel title: (cells, x-axis label)}, where each cell has "value" (the setting), "method" (a
    `viz.style` key: colour and legend) and `metric` ({"mean", "half_width"}, half_width None for 1 seed)."""
    fig = Figure(figsize=(4.8 * len(panels), 4.3), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, (cells, xlabel)) in zip(axes, panels.items()):
        values = sorted({c["value"] for c in cells})
        methods = list(dict.fromkeys(c["method"] for c in cells))
        width = 0.8 / len(methods)
        top = 0.0
        for j, m in enumerate(methods):
            cs = {c["value"]: c[metric] for c in cells if c["method"] == m}
            xs = np.arange(len(values)) + (j - (len(methods) - 1) / 2) * width
            means = [cs[v]["mean"] if v in cs else np.nan for v in values]
            errs = [cs[v]["half_width"] if v in cs and cs[v]["half_width"] is not None else 0.0 for v in values]
            st = style(m)
            bars = ax.bar(xs, means, width, color=st["color"], label=st["label"])
            has_ci = [i for i, v in enumerate(values) if v in cs and cs[v]["half_width"] is not None]
            if has_ci:  # one seed: no CI, no error bar
                ax.errorbar(xs[has_ci], np.asarray(means)[has_ci], yerr=np.asarray(errs)[has_ci], fmt="none",
                            ecolor="k", capsize=3, lw=1)
            ax.bar_label(bars, fmt="%.3g", fontsize=7, label_type="center", color="white")
            top = max([top] + [a + e for a, e in zip(means, errs) if np.isfinite(a)])
        ax.set_xticks(np.arange(len(values)), [f"{v:g}" for v in values])
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("final " + metric_label(metric))
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, 1.3 * top if top > 0 else 1.0)
        bars_from_zero(ax)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(title)
    return fig


def plot_metric_against(panels: Mapping[str, Sequence[Mapping[str, Any]]], metric: str, xlabel: str,
                        title: str) -> Figure:
    """A metric's mean over seeds with its 95% CI band against x (log axes, ticks at the x values), one line per
    method (`viz.style` colours): panels = {panel title: cells}, each cell with "x", "method" and `metric`
    ({"mean", "low", "high"}; low/high None for 1 seed: no band)."""
    fig = Figure(figsize=(max(6.5, 4.8 * len(panels)), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, cells) in zip(axes, panels.items()):
        for m in dict.fromkeys(c["method"] for c in cells):
            cs = sorted((c for c in cells if c["method"] == m), key=lambda c: c["x"])
            t = [c[metric] for c in cs]
            lo = [x["low"] if x["low"] is not None else x["mean"] for x in t]
            hi = [x["high"] if x["high"] is not None else x["mean"] for x in t]
            band(ax, [c["x"] for c in cs], [x["mean"] for x in t], lo, hi, m)
        ax.set_xscale("log")
        plain_log_ticks(ax, "x", values=sorted({c["x"] for c in cells}))
        readable_log_axis(ax, "y")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final " + metric_label(metric))
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig
