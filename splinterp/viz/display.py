"""Showing figures in notebooks: one output per figure that Jupyter, VS Code and GitHub all display.

Why this exists: our figures are built without pyplot (`matplotlib.figure.Figure`), so IPython has no formatter
for them and a cell shows `<Figure size 1100x1100 with 4 Axes>`; a plotly figure's own output
(`application/vnd.plotly.v1+json`) is drawn only where plotly's extension is installed, never on GitHub, which
renders image/png and does not run the scripts of an HTML output.

What a figure becomes (`mime_bundle`):

- matplotlib Figure: image/png at `dpi`.
- plotly Figure: image/png drawn by plotly.js itself in headless Chromium (`plotly_png`; the same renderer as
  the interactive figure; offline: plotly.js comes from the plotly package), and text/html, the interactive
  figure with plotly.js inlined (self-contained and offline, about 4.8 MB per figure), which Jupyter and
  VS Code prefer over the PNG. Without a Chromium (`find_chromium`) the PNG is left out, with a warning.
- the path of a PNG file (what experiment jobs write): image/png, the file's bytes.

Every output carries the metadata ``{"splinterp": {"figure": KIND}}`` (KIND: matplotlib, plotly or file), by which
`splinterp notebooks` finds the plotly outputs and stores only their PNG (GitHub would show the HTML, blank).

Two ways in, one bundle::

    from splinterp.viz.display import enable, show
    enable()    # from now on a figure that is a cell's value displays as above
    show(fig)   # display now: several figures in one cell, figures in a loop, PNG files

Nothing happens at import: `enable` registers its formatters with the running IPython only when called.
"""

from __future__ import annotations

import base64
import html as _html
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splinterp.errors import BrowserNotFoundError, ConfigError, FigureRenderError, NotAFigureError

log = logging.getLogger(__name__)

__all__ = ["CHROMIUM_ENV", "DPI", "METADATA_KEY", "disable", "enable", "find_chromium", "figure_kind", "mime_bundle",
           "plotly_html", "plotly_png", "run_page", "show", "show_outputs"]

DPI = 100
"""Resolution of matplotlib PNGs: a figure of figsize (w, h) inches becomes 100 w x 100 h pixels."""
METADATA_KEY = "splinterp"
"""Key of the output metadata that marks an output as a figure: {"splinterp": {"figure": kind}}."""
CHROMIUM_ENV = "SPLINTERP_CHROMIUM"
"""Environment variable naming the Chromium / Chrome executable, when it is not one `find_chromium` knows."""
PLOTLY_SIZE = (900, 600)
"""PNG size (pixels) of a plotly figure whose layout sets no width / height."""

_CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_CHROMIUM_PATHS = ("/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
                   "/Applications/Chromium.app/Contents/MacOS/Chromium")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_RESULT_ID = "splinterp-result"


# --------------------------------------------------------------------------------------------- kinds
def figure_kind(obj: Any) -> str:
    """"matplotlib", "plotly" or "file" (a path to a .png); NotAFigureError for anything else."""
    from matplotlib.figure import Figure

    if isinstance(obj, Figure):
        return "matplotlib"
    if _is_plotly(obj):
        return "plotly"
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj)
        if path.suffix.lower() != ".png":
            raise NotAFigureError(f"show() displays PNG files; {path} is not a .png (show the figure object instead)")
        return "file"
    raise NotAFigureError(f"show() takes a matplotlib Figure, a plotly Figure or the path of a PNG file, "
                          f"got {type(obj).__name__}")


def _is_plotly(obj: Any) -> bool:
    mod = sys.modules.get("plotly.basedatatypes")  # plotly figures exist only once plotly is imported
    return mod is not None and isinstance(obj, mod.BaseFigure)


# --------------------------------------------------------------------------------------------- bundles
def mime_bundle(obj: Any, *, dpi: int = DPI, html: bool = True, png: bool = True
                ) -> tuple[dict[str, str], dict[str, Any]]:
    """(data, metadata) of the output that displays `obj` (see the module doc), as IPython's `display(data,
    metadata=metadata, raw=True)` takes them. `html`: include a plotly figure's interactive HTML; `png`: its
    PNG (needs Chromium; left out with a warning where there is none)."""
    kind = figure_kind(obj)
    meta: dict[str, Any] = {METADATA_KEY: {"figure": kind}}
    if kind == "matplotlib":
        if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 10:
            raise ConfigError(f"dpi must be an integer >= 10, got {dpi!r}")
        buf = io.BytesIO()
        obj.savefig(buf, format="png", dpi=dpi)
        return {"image/png": _b64(buf.getvalue()), "text/plain": repr(obj)}, meta
    if kind == "file":
        path = Path(obj)
        if not path.is_file():
            raise FileNotFoundError(f"show(): no PNG file at {path}")
        data = path.read_bytes()
        if not data.startswith(_PNG_SIGNATURE):
            raise NotAFigureError(f"show(): {path} is not a PNG file (its first bytes are not PNG's)")
        return {"image/png": _b64(data), "text/plain": f"<image {path.name}>"}, meta
    title = _plotly_title(obj)
    out = {"text/plain": f"<plotly figure{': ' + title if title else ''}>"}
    if html:
        out["text/html"] = plotly_html(obj)
    if png:
        if find_chromium() is None:
            log.warning("no Chromium or Chrome found (set %s to its path): the plotly figure %r is shown as "
                        "interactive HTML only, with no PNG for viewers that do not run scripts (GitHub)",
                        CHROMIUM_ENV, title)
        else:
            out["image/png"] = _b64(plotly_png(obj))
    return out, meta


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _plotly_title(fig) -> str:
    title = fig.layout.title.text
    return str(title) if title else ""


def show(*objs: Any, dpi: int = DPI, html: bool = True, png: bool = True) -> None:
    """Display each figure (matplotlib, plotly, or a PNG file path) in the running notebook, as `mime_bundle`
    describes. Outside IPython there is nowhere to show it: a ConfigError says to save it instead."""
    from IPython import get_ipython
    from IPython.display import display

    if get_ipython() is None:
        raise ConfigError("show() displays figures in a Jupyter / IPython session; in a script save them with "
                          "splinterp.viz.save_png or splinterp.viz.write_html")
    for obj in objs:
        data, meta = mime_bundle(obj, dpi=dpi, html=html, png=png)
        display(data, metadata=meta, raw=True)


def show_outputs(folder: str | os.PathLike, outputs: Sequence[str]) -> None:
    """Display the files an experiment job wrote (its declared `outputs`, relative to `folder`): PNGs as
    figures, markdown tables as markdown, HTML pages as a line naming the file (open it in a browser; the
    notebook shows the interactive figure by building it, not from the page)."""
    from IPython.display import Markdown, display

    folder = Path(folder)
    for name in outputs:
        path = folder / name
        if name.endswith(".png"):
            display(Markdown(f"**{name}**"))
            show(path)
        elif name.endswith(".md"):
            display(Markdown(path.read_text("utf-8")))
        elif name.endswith(".html"):
            display(Markdown(f"Interactive page: `{path}` (open it in a browser)."))


# --------------------------------------------------------------------------------------------- IPython
def _display_plotly(fig) -> None:
    show(fig)


def _formatter_types() -> list[type]:
    from matplotlib.figure import Figure

    types: list[type] = [Figure]
    try:
        from plotly.basedatatypes import BaseFigure
    except ImportError:  # plotly is a dependency, but a formatter for it is no reason to fail
        return types
    return [*types, BaseFigure]


def enable(shell=None) -> None:
    """Make figures that are a cell's value display through `mime_bundle` in this IPython session (`shell`:
    default the running one). Call it once, in a notebook's first cell; `disable()` undoes it."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    if shell is None:
        raise ConfigError("enable() needs a running Jupyter / IPython session")
    formatters = shell.display_formatter
    for t in _formatter_types():
        if t.__module__.startswith("plotly"):
            # plotly figures display themselves through _ipython_display_, which IPython asks first
            formatters.ipython_display_formatter.for_type(t, _display_plotly)
        else:
            formatters.mimebundle_formatter.for_type(t, lambda fig: mime_bundle(fig))


def disable(shell=None) -> None:
    """Undo `enable`: figures display as they did before."""
    if shell is None:
        from IPython import get_ipython

        shell = get_ipython()
    if shell is None:
        return
    formatters = shell.display_formatter
    for t in _formatter_types():
        for f in (formatters.ipython_display_formatter, formatters.mimebundle_formatter):
            f.pop(t, None)


# --------------------------------------------------------------------------------------------- plotly
def plotly_html(fig) -> str:
    """The interactive figure as an HTML fragment that needs no network: plotly.js (from the plotly package)
    inline, then the figure. plotly.js is loaded with `module`, `exports` and `define` hidden, so that it sets
    `window.Plotly` in any page (a page with require.js or CommonJS globals would otherwise capture it); the
    figure is drawn once its element is in the document (Jupyter runs an output's scripts before attaching it)."""
    from plotly.offline import get_plotlyjs

    div_id = f"splinterp-plotly-{os.urandom(8).hex()}"
    spec = _json_for_script(fig)
    return (f'<div id="{div_id}" class="splinterp-plotly"></div>\n'
            "<script>(function (module, exports, define) {\n" + get_plotlyjs() + "\n}).call(window);</script>\n"
            f'<script type="application/json" id="{div_id}-spec">{spec}</script>\n'
            "<script>(function () {\n"
            f'  var div = document.getElementById("{div_id}") || document.currentScript.parentNode'
            f'.querySelector("#{div_id}");\n'
            f'  var spec = JSON.parse(div.parentNode.querySelector("#{div_id}-spec").textContent);\n'
            "  function draw() {\n"
            "    if (!div.isConnected) { return window.requestAnimationFrame(draw); }\n"
            "    window.Plotly.newPlot(div, spec.data, spec.layout, {responsive: true, displaylogo: false});\n"
            "  }\n"
            "  draw();\n"
            "})();</script>\n")


def _json_for_script(fig) -> str:
    """The figure's JSON, safe inside a <script> element: '<' written as \\u003c (only inside strings, where JSON
    allows it), so text such as '</script>' in hover labels cannot end the element. plotly's encoder escapes it
    already; this keeps it so whatever encoder plotly uses."""
    return fig.to_json().replace("<", "\\u003c")


def plotly_png(fig, *, width: int | None = None, height: int | None = None, scale: float = 1.0,
               timeout: float = 180.0) -> bytes:
    """PNG bytes of a plotly figure, drawn by plotly.js (`Plotly.toImage`) in headless Chromium: exactly what the
    interactive figure shows, 3-D and WebGL traces included, with no network (plotly.js from the plotly
    package). Size: `width` x `height` CSS pixels (default: the layout's, else `PLOTLY_SIZE`) times `scale`.
    BrowserNotFoundError without a Chromium; FigureRenderError when the page fails or runs past `timeout` s."""
    from plotly.offline import get_plotlyjs

    lw, lh = fig.layout.width, fig.layout.height
    w, h = int(width or lw or PLOTLY_SIZE[0]), int(height or lh or PLOTLY_SIZE[1])
    if w < 10 or h < 10 or not 0.1 <= scale <= 10:
        raise ConfigError(f"plotly_png: width and height must be >= 10 and scale in [0.1, 10], got {w}, {h}, {scale}")
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">\n"
            "<script>" + get_plotlyjs() + "</script></head><body>\n"
            f'<div id="fig" style="width:{w}px;height:{h}px"></div>\n'
            f'<script type="application/json" id="spec">{_json_for_script(fig)}</script>\n'
            "<script>\n"
            "var spec = JSON.parse(document.getElementById('spec').textContent);\n"
            "Plotly.newPlot('fig', spec.data, spec.layout, {staticPlot: true})\n"
            f"  .then(function (gd) {{ return Plotly.toImage(gd, {{format: 'png', width: {w}, height: {h}, "
            f"scale: {float(scale)}}}); }})\n"
            "  .then(function (url) { splinterpResult(url); }, function (e) { splinterpResult('error: ' + e); });\n"
            "</script></body></html>")
    result = run_page(page, timeout=timeout)
    prefix = "data:image/png;base64,"
    if not result.startswith(prefix):
        raise FigureRenderError(f"plotly.js could not draw the figure {_plotly_title(fig)!r} as PNG: {result[:300]}")
    return base64.b64decode(result[len(prefix):])


# --------------------------------------------------------------------------------------------- Chromium
def find_chromium() -> str | None:
    """The Chromium / Chrome executable: `$SPLINTERP_CHROMIUM` when set (it must exist), else the first of
    chromium, chromium-browser, google-chrome(-stable), chrome on PATH, else the macOS application; None if
    there is none."""
    explicit = os.environ.get(CHROMIUM_ENV)
    if explicit:
        found = shutil.which(explicit)
        if found is None:
            raise BrowserNotFoundError(f"{CHROMIUM_ENV}={explicit!r} is not an executable")
        return found
    for name in _CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return next((p for p in _CHROMIUM_PATHS if os.access(p, os.X_OK)), None)


def run_page(page: str, *, timeout: float = 180.0, budget_ms: int = 60_000) -> str:
    """Load the HTML `page` in headless Chromium and return what its script passed to `splinterpResult(text)`
    (a function this defines before the page's own scripts run); FigureRenderError when it passed nothing.

    The page is a local file; Chromium runs with a fresh profile that is deleted afterwards, without its sandbox
    (it refuses to start as root with one; the page is ours), with software WebGL (3-D plotly traces), and with
    a virtual-time budget (`budget_ms`, fast-forwarded while the page is idle) after which it prints the DOM.
    Past `timeout` wall-clock seconds its whole process group is killed."""
    browser = find_chromium()
    if browser is None:
        raise BrowserNotFoundError("no Chromium or Chrome found to draw the figure (Debian: apt-get install "
                                   f"chromium; elsewhere install Chrome, or set {CHROMIUM_ENV} to its path)")
    hook = ("<script>function splinterpResult(text) {"
            f" var e = document.getElementById('{_RESULT_ID}') || document.createElement('pre');"
            f" e.id = '{_RESULT_ID}'; e.textContent = String(text); document.documentElement.appendChild(e); }}"
            "</script>")
    page = page.replace("<head>", "<head>" + hook, 1) if "<head>" in page else hook + page
    with tempfile.TemporaryDirectory(prefix="splinterp-chromium-") as tmp:
        path = Path(tmp) / "page.html"
        path.write_text(page, "utf-8")
        cmd = [browser, "--headless", "--no-sandbox", "--enable-unsafe-swiftshader", "--hide-scrollbars",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
               f"--user-data-dir={Path(tmp) / 'profile'}", f"--virtual-time-budget={int(budget_ms)}",
               "--dump-dom", path.as_uri()]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise FigureRenderError(f"Chromium did not finish the page within {timeout:g} s") from None
        finally:
            _kill_group(proc)  # helpers (GPU, renderer) that outlive the browser process
    dom = out.decode("utf-8", "replace")
    start = dom.find(f'<pre id="{_RESULT_ID}">')
    if start < 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise FigureRenderError(f"the page gave no result in headless Chromium (exit {proc.returncode}; "
                                f"{' | '.join(tail) or 'no message'})")
    start += len(f'<pre id="{_RESULT_ID}">')
    return _html.unescape(dom[start:dom.find("</pre>", start)])


def _kill_group(proc: subprocess.Popen) -> None:
    if hasattr(os, "killpg"):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    elif proc.poll() is None:
        proc.kill()
    proc.wait()

