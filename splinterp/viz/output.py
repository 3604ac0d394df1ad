"""Writing figures: PNG through `splinterp.atomic` (never a half-written file) and plotly HTML.

HTML and plotly.js: ``plotlyjs="directory"`` (default) writes one shared ``plotly.min.js`` (~4.8 MB) next
to the HTML files, so every page works offline and a folder of many pages carries the library once;
``"inline"`` embeds it in each page (self-contained single file, ~4.8 MB each); ``"cdn"`` loads it
from the plotly CDN (tiny files, needs network to view).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path

from splinterp.atomic import write_text, write_with
from splinterp.errors import ConfigError

PLOTLYJS_MODES = ("directory", "inline", "cdn")
PLOTLY_BUNDLE = "plotly.min.js"
DEFAULT_PLOTLYJS = "directory"
"""Mode used when `write_html` gets plotlyjs=None outside a `plotlyjs_mode` block."""
_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar("splinterp_plotlyjs", default=None)


@contextlib.contextmanager
def plotlyjs_mode(mode: str | None) -> Iterator[None]:
    """`write_html(..., plotlyjs=None)` inside the block uses `mode` (None: unchanged). Scoped to the block
    and the current thread/task, so no module default is ever changed."""
    if mode is not None and mode not in PLOTLYJS_MODES:
        raise ConfigError(f"plotlyjs must be one of {PLOTLYJS_MODES}, got {mode!r}")
    token = _MODE.set(mode) if mode is not None else None
    try:
        yield
    finally:
        if token is not None:
            _MODE.reset(token)


def save_png(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG, atomically."""
    path = Path(path)
    write_with(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    return path


def write_html(fig, path: str | os.PathLike, plotlyjs: str | None = None) -> Path:
    """Save a plotly figure as a standalone HTML page, atomically (see the module doc for `plotlyjs`;
    None means the mode of the enclosing `plotlyjs_mode` block, else `DEFAULT_PLOTLYJS`)."""
    plotlyjs = plotlyjs or _MODE.get() or DEFAULT_PLOTLYJS
    if plotlyjs not in PLOTLYJS_MODES:
        raise ConfigError(f"plotlyjs must be one of {PLOTLYJS_MODES}, got {plotlyjs!r}")
    path = Path(path)
    # the plot's div id from the file name (plotly draws a random one), so a rerun rewrites the same page
    div_id = "splinterp-" + "".join(c if c.isalnum() else "-" for c in path.stem)
    page = fig.to_html(include_plotlyjs={"inline": True}.get(plotlyjs, plotlyjs), full_html=True, div_id=div_id)
    if plotlyjs == "directory":
        from plotly.offline import get_plotlyjs

        bundle = path.parent / PLOTLY_BUNDLE
        js = get_plotlyjs()
        if not bundle.is_file() or bundle.stat().st_size != len(js.encode("utf-8")):
            write_text(bundle, js)
    write_text(path, page)
    return path
