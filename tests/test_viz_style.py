"""The shared figure style: one distinct colour per method within each family, readable labels, and axes
drawn the way the style promises (read back from the rendered figure)."""

from __future__ import annotations

import pytest
from matplotlib.figure import Figure

from splinterp.errors import ConfigError
from splinterp.viz.style import STYLES, bars_from_zero, integer_ticks, metric_label, plain_log_ticks, style

FAMILIES = {
    "trainers": ("sgd", "pam_sgd", "pam_sgd_authors", "pam_sgd_ridge"),
    "models": ("kmeans", "sae", "local_pca", "pca"),
    "architectures": ("relu", "topk", "topk_abs", "jumprelu", "gated"),
    "transfer": ("scratch", "forward", "backward"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_colours_and_markers_are_distinct_within_a_family(family):
    keys = FAMILIES[family]
    assert len({STYLES[k]["color"] for k in keys}) == len(keys)
    assert len({STYLES[k]["marker"] for k in keys}) == len(keys)


def test_style_lookup():
    assert style("pam_sgd")["label"] == "PAM-SGD"
    ridge = style("pam_sgd_alpha=100")
    assert ridge["color"] == STYLES["pam_sgd_ridge"]["color"] and ridge["label"] == "PAM-SGD, ridge alpha=100"
    assert style("sgd", label="x")["label"] == "x"
    with pytest.raises(ConfigError, match="no style"):
        style("adamw")


def test_metric_labels():
    assert metric_label("test_mse") == "test MSE"
    assert metric_label("train_l0").startswith("train $L_0$")
    assert metric_label("something_else") == "something else"


def _labels(fig, ax, axis):
    fig.canvas.draw()
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text().replace("\u2212", "-") for t in ticks if t.get_text()]


def test_log_ticks_read_as_plain_numbers():
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([40, 200, 400, 4000], [0.78, 0.4, 0.3, 0.18])
    ax.set(xscale="log", yscale="log")
    plain_log_ticks(ax, "x", values=[40, 200, 400, 4000])
    plain_log_ticks(ax, "y")
    assert _labels(fig, ax, "x") == ["40", "200", "400", "4000"]
    assert all("^" not in t and "times" not in t for t in _labels(fig, ax, "y"))


def test_integer_ticks_and_bars_from_zero():
    fig = Figure()
    ax = fig.add_subplot()
    ax.plot([1, 2, 3], [0.9, 0.95, 0.93])
    integer_ticks(ax, "x")
    assert all(float(t).is_integer() for t in _labels(fig, ax, "x"))
    ax.set_ylim(0.62, 1.0)
    bars_from_zero(ax)
    assert ax.get_ylim()[0] == 0.0
