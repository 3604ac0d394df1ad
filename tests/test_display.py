"""splinterp.viz.display: what a figure becomes in a notebook.

Checked against things the code under test does not compute: the pixel size a figure of known size and dpi
must have, colours painted on purpose and read back from the decoded PNG (Pillow), and what plotly.js itself
reports after drawing in a real headless Chromium (traces drawn, globals left alone).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from matplotlib.figure import Figure
from optional import needs
from PIL import Image

from splinterp.errors import BrowserNotFoundError, ConfigError, NotAFigureError
from splinterp.viz import display

CHROMIUM = display.find_chromium() is not None
needs_chromium = needs(CHROMIUM, "Chromium (Debian package chromium)")


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _red_figure(w: float = 4, h: float = 3) -> Figure:
    fig = Figure(figsize=(w, h), facecolor="#ff0000")
    return fig


def test_matplotlib_figure_becomes_png_of_its_size_and_colours():
    data, meta = display.mime_bundle(_red_figure(4, 3), dpi=50)
    assert set(data) == {"image/png", "text/plain"}
    img = _decode(data["image/png"])
    assert img.shape == (150, 200, 3)  # 3 in x 50 dpi rows, 4 in x 50 dpi columns
    assert (img == [255, 0, 0]).all()
    assert meta == {display.METADATA_KEY: {"figure": "matplotlib"}}
    assert _decode(display.mime_bundle(_red_figure(4, 3))[0]["image/png"]).shape == (300, 400, 3)  # default 100 dpi


def test_png_file_is_shown_as_its_own_bytes(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (7, 5), (0, 0, 255)).save(path)
    data, meta = display.mime_bundle(path)
    assert base64.b64decode(data["image/png"]) == path.read_bytes()
    assert meta[display.METADATA_KEY]["figure"] == "file"


def test_what_is_not_a_figure_is_refused(tmp_path):
    (tmp_path / "fake.png").write_text("not a png")
    (tmp_path / "page.html").write_text("<html></html>")
    with pytest.raises(NotAFigureError, match="not a PNG"):
        display.mime_bundle(tmp_path / "fake.png")
    with pytest.raises(NotAFigureError, match="not a .png"):
        display.mime_bundle(tmp_path / "page.html")
    with pytest.raises(NotAFigureError, match="got list"):
        display.mime_bundle([1, 2])
    with pytest.raises(FileNotFoundError):
        display.mime_bundle(tmp_path / "missing.png")
    with pytest.raises(ConfigError, match="dpi"):
        display.mime_bundle(_red_figure(), dpi=0)


def test_show_outside_ipython_says_to_save():
    with pytest.raises(ConfigError, match="save_png"):
        display.show(_red_figure())


def test_no_chromium_is_said_plainly(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(display.CHROMIUM_ENV, raising=False)
    monkeypatch.setattr(display, "_CHROMIUM_PATHS", ())
    assert display.find_chromium() is None
    with pytest.raises(BrowserNotFoundError, match="apt-get install chromium"):
        display.run_page("<html></html>")
    monkeypatch.setenv(display.CHROMIUM_ENV, str(tmp_path / "nothing-here"))
    with pytest.raises(BrowserNotFoundError, match=display.CHROMIUM_ENV):
        display.find_chromium()


def test_plotly_bundle_without_png_or_html_parts():
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]), layout={"title": {"text": "two points"}})
    data, meta = display.mime_bundle(fig, png=False)
    assert set(data) == {"text/html", "text/plain"} and "two points" in data["text/plain"]
    assert meta[display.METADATA_KEY]["figure"] == "plotly"
    assert set(display.mime_bundle(fig, png=False, html=False)[0]) == {"text/plain"}


def _marker_figure(trace_type: str):
    """A red marker in the middle of a green page, no axes: what a correct drawing looks like is known."""
    import plotly.graph_objects as go

    layout = {"width": 300, "height": 200, "paper_bgcolor": "#00ff00", "plot_bgcolor": "#00ff00",
              "showlegend": False, "margin": {"l": 0, "r": 0, "t": 0, "b": 0},
              "xaxis": {"visible": False, "range": [-1, 1]}, "yaxis": {"visible": False, "range": [-1, 1]}}
    marker = {"color": "#ff0000", "size": 60, "opacity": 1}
    if trace_type == "scatter3d":
        axis = {"visible": False}
        layout["scene"] = {"xaxis": axis, "yaxis": axis, "zaxis": axis, "bgcolor": "#00ff00"}
        return go.Figure(go.Scatter3d(x=[0], y=[0], z=[0], mode="markers", marker=marker), layout=layout)
    trace = go.Scattergl if trace_type == "scattergl" else go.Scatter
    return go.Figure(trace(x=[0], y=[0], mode="markers", marker=marker), layout=layout)


@needs_chromium
@pytest.mark.parametrize("trace_type", ["scatter", "scattergl", "scatter3d"])
def test_plotly_png_draws_the_figure(trace_type):
    png = display.plotly_png(_marker_figure(trace_type))
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert img.shape == (200, 300, 3)
    green = (np.abs(img - [0, 255, 0]).sum(-1) < 30).mean()
    red = np.abs(img - [255, 0, 0]).sum(-1) < 60
    assert green > 0.8, f"page colour covers only {green:.0%}"
    assert red.sum() > 100, f"{trace_type}: the red marker was not drawn"
    ys, xs = np.nonzero(red)
    assert abs(xs.mean() - 150) < 25 and abs(ys.mean() - 100) < 25  # in the middle, where it was put


@needs_chromium
def test_plotly_png_scale_and_size():
    img = Image.open(io.BytesIO(display.plotly_png(_marker_figure("scatter"), width=160, height=120, scale=2)))
    assert img.size == (320, 240)


@needs_chromium
def test_plotly_html_draws_offline_in_a_page_with_amd_and_commonjs_globals():
    """The fragment carries plotly.js and draws in a page that has require.js-style `define` and CommonJS
    `module` globals (classic Notebook, some VS Code set-ups) without handing plotly.js to them; text such as
    </script> in hover labels cannot break out of the figure's data."""
    import plotly.graph_objects as go

    evil = "</script><script>splinterpResult('escaped')</script>"
    fig = go.Figure([go.Scatter(x=[0, 1], y=[0, 1], text=[evil, "b"]), go.Bar(x=[0, 1], y=[2, 3])])
    page = ("<!DOCTYPE html><html><head></head><body>"
            "<script>var define = function () { throw new Error('AMD used'); }; define.amd = {};"
            " var module = {exports: {}}; var exports = module.exports;</script>"
            + display.plotly_html(fig) +
            "<script>setTimeout(function () { var g = document.querySelector('.js-plotly-plot');"
            " splinterpResult(JSON.stringify({plotly: typeof window.Plotly, traces: g ? g._fullData.length : -1,"
            " points: document.querySelectorAll('.scatterlayer .point').length,"
            " bars: document.querySelectorAll('.barlayer .point').length,"
            " text: g ? g.data[0].text[0] : null, exported: Object.keys(module.exports).length})); }, 1000);"
            "</script></body></html>")
    got = json.loads(display.run_page(page))
    assert got == {"plotly": "object", "traces": 2, "points": 2, "bars": 2, "text": evil, "exported": 0}
    assert "cdn" not in display.plotly_html(fig).lower()[:2000]


@needs_chromium
def test_a_page_that_reports_nothing_is_an_error():
    from splinterp.errors import FigureRenderError

    with pytest.raises(FigureRenderError, match="no result"):
        display.run_page("<html><body>nothing</body></html>", budget_ms=500)
