"""`splinterp notebooks`: run the notebooks top to bottom and store them with their outputs, so that a reader
browsing the repository (GitHub renders .ipynb files) sees every figure without running anything.

Each notebook runs in a fresh Jupyter kernel (nbclient, ipykernel), in its own folder as Jupyter would run it,
with SPLINTERP_QUICK (1 unless --no-quick), SPLINTERP_OUT (--out) and SPLINTERP_DEVICE (--device) set and
SPLINTERP_SAE_FOLDER / SPLINTERP_ACTIVATIONS unset (07 shows its demo SAE), progress bars off. Then:

- It must show the number of figures its metadata promises (``"splinterp": {"figures": N}``), each as an
  image (`splinterp.viz.display` marks them), and no figure as bare text (`<Figure size ...>`).
- What is stored: every output as the kernel made it, except that
  - plotly figures keep their PNG and lose their interactive HTML: it carries plotly.js (about 4.8 MB a figure)
    and GitHub would render it blank (it runs no scripts, and prefers HTML to PNG). Run the notebook in Jupyter
    for the interactive version.
  - every PNG (matplotlib figures are drawn at 100 dpi) is re-encoded by `compact_png`: as a 256-colour palette
    image where that is faithful (plots of flat colours: about 3x smaller), else losslessly. Measured on the
    figures of `splinterp reproduce --quick`: 3.5 MB of PNG become 1.3 MB.
  - widget outputs (tqdm progress bars in Jupyter) are dropped: their state is not stored, so no viewer could
    draw them, and their text fallback is the bar at 0%.
  No execution timestamps are recorded, so re-running changes only what the figures and numbers change.
- The notebook file is replaced atomically, and only when all of the above holds: a notebook that fails keeps
  its previous content, the others still run, and the exit status is 1.

Plotly figures are drawn as PNG by headless Chromium (`splinterp.viz.display.plotly_png`), which this command
therefore requires (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import base64
import io
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from splinterp.commands import Command
from splinterp.errors import ConfigError, DatasetNotFoundError, NotebookError

PALETTE_MAX_ERROR = 0.75
"""Largest mean change (in levels of 255, the largest of R, G, B per pixel) for which `compact_png` stores a
palette image: flat-colour plots stay under 0.35, smooth shading (error-shaded partitions, translucent 3-D
boxes) goes over and is kept in full colour, where 256 colours would show bands."""
META = "splinterp"
"""Key of the notebook metadata: {"figures": N} (the promise, written by hand), {"outputs": {...}} (by us)."""
WIDGET = "application/vnd.jupyter.widget-view+json"
UNSET_VARIABLES = ("SPLINTERP_SAE_FOLDER", "SPLINTERP_ACTIVATIONS")
_FIGURE_AS_TEXT = re.compile(r"^<Figure size \d+x\d+ with \d+ Axes>$|^Figure\(\{")


@dataclass
class NotebooksOptions:
    only: list[str] = field(default_factory=list)
    """Run only these notebooks: names with or without .ipynb, or a unique start of one (e.g. 01 07)."""
    folder: str = "notebooks"
    """Folder of the notebooks (every *.ipynb in it)."""
    quick: bool = True
    """Small settings (SPLINTERP_QUICK=1): what the committed outputs show. --no-quick: the full-size settings."""
    out: str = "out/notebooks"
    """Folder the notebooks write their own files into (their SPLINTERP_OUT)."""
    device: str = "cpu"
    """Torch device the notebooks compute on (their SPLINTERP_DEVICE), e.g. cpu, cuda."""
    timeout: int = 1800
    """Seconds one cell may run before it is stopped (the notebook then counts as failed)."""

    def __post_init__(self) -> None:
        from splinterp.validation import check_positive_int

        check_positive_int(self.timeout, "--timeout")


# ---------------------------------------------------------------------------------------------- reading
def select(folder: Path, only: list[str]) -> list[Path]:
    """The notebooks of `folder` that `only` names (all when empty), sorted by name."""
    if not folder.is_dir():
        raise DatasetNotFoundError(f"--folder {folder} is not a folder")
    books = sorted(folder.glob("*.ipynb"))
    if not books:
        raise DatasetNotFoundError(f"--folder {folder} holds no .ipynb notebook")
    if not only:
        return books
    chosen: list[Path] = []
    for name in only:
        stem = name[:-len(".ipynb")] if name.endswith(".ipynb") else name
        hits = [p for p in books if p.stem == stem] or [p for p in books if p.stem.startswith(stem)]
        if len(hits) != 1:
            what = "matches several notebooks" if hits else "names no notebook"
            raise ConfigError(f"--only {name} {what} of {folder}; there are: {', '.join(p.stem for p in books)}")
        if hits[0] not in chosen:
            chosen.append(hits[0])
    return sorted(chosen)


def promised_figures(nb, name: str) -> int:
    """The number of figures the notebook says it shows (metadata "splinterp": {"figures": N})."""
    n = nb.metadata.get(META, {}).get("figures")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise NotebookError(f"{name} does not say how many figures it shows: set its metadata "
                            f'"{META}": {{"figures": N}} (got {n!r})')
    return n


def outputs(nb) -> Iterator[tuple[int, dict]]:
    """(cell index, output) of every output of every code cell."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                yield i, out


def figure_kind(out: dict) -> str | None:
    """The kind `splinterp.viz.display` marked this output with (matplotlib, plotly, file), "image" for any
    other image output, None when it shows no figure."""
    from splinterp.viz.display import METADATA_KEY

    marked = out.get("metadata", {}).get(METADATA_KEY, {}).get("figure")
    if marked:
        return marked
    return "image" if "image/png" in out.get("data", {}) else None


def check_figures(nb, name: str) -> int:
    """Raise NotebookError unless every figure of the executed notebook displays as an image and their number
    is the promised one; return that number."""
    shown = 0
    for i, out in outputs(nb):
        data = out.get("data", {})
        if set(data) == {"text/plain"} and _FIGURE_AS_TEXT.match(str(data["text/plain"]).strip()):
            raise NotebookError(f"{name}, cell {i}: a figure is shown as text ({str(data['text/plain'])[:60]}); "
                                "end the cell with splinterp.viz.display.show(fig), or call enable() first")
        kind = figure_kind(out)
        if kind is None:
            continue
        if "image/png" not in data:
            raise NotebookError(f"{name}, cell {i}: the {kind} figure has no PNG (is Chromium installed?)")
        shown += 1
    promised = promised_figures(nb, name)
    if shown != promised:
        raise NotebookError(f"{name} shows {shown} figure(s) but its metadata promises {promised}")
    return shown


# ---------------------------------------------------------------------------------------------- running
def kernel_env(quick: bool, out: Path, device: str, cwd: Path) -> dict[str, str]:
    """The environment of the kernel: ours, with the notebook settings (module doc)."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET_VARIABLES}
    env.update(SPLINTERP_QUICK="1" if quick else "0", SPLINTERP_OUT=os.path.relpath(out.resolve(), cwd.resolve()),
               SPLINTERP_DEVICE=device, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return env


def execute(path: Path, *, quick: bool = True, out: str | Path = "out/notebooks", device: str = "cpu",
            timeout: int = 1800):
    """The notebook at `path` run top to bottom in a fresh kernel (in its folder, settings as in the module
    doc), with every output as the kernel made it (plotly figures with their interactive HTML). Raises
    NotebookError naming the cell when one fails."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    promised_figures(nb, path.stem)  # refuse before spending minutes on it
    cwd = path.resolve().parent
    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    # the kernel's own log at ERROR: ipykernel 7 warns on every start that it uses local TCP, as Jupyter does
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, record_timing=False,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute(env=kernel_env(quick, Path(out), device, cwd))
    except CellExecutionError as e:
        raise NotebookError(f"{path.stem}: a cell failed:\n{_last_lines(str(e))}") from None
    except (CellTimeoutError, DeadKernelError) as e:
        raise NotebookError(f"{path.stem}: {type(e).__name__}: {_last_lines(str(e))}") from None
    return nb


def _last_lines(text: str, n: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def compact_png(data: bytes) -> bytes:
    """The smallest faithful PNG encoding of the image `data`: RGB without the alpha channel when every pixel is
    opaque, and a 256-colour palette image when that changes pixels by at most `PALETTE_MAX_ERROR` on average;
    `data` itself when nothing smaller qualifies. Images with transparency are only re-encoded losslessly."""
    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    rgba = np.asarray(img.convert("RGBA"))
    candidates = [data]
    if (rgba[..., 3] == 255).all():
        rgb = img.convert("RGB")
        candidates.append(_png_bytes(rgb))
        pal = rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        error = np.abs(np.asarray(pal.convert("RGB"), dtype=np.int16) - rgba[..., :3].astype(np.int16)).max(-1).mean()
        if error <= PALETTE_MAX_ERROR:
            candidates.append(_png_bytes(pal))
    return min(candidates, key=len)


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def for_storage(nb, quick: bool):
    """The executed notebook as it is committed (module doc): plotly figures without their interactive HTML,
    PNGs compacted, widget outputs dropped, and the run's settings in the metadata. Changes `nb` in place and
    returns it."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if WIDGET not in o.get("data", {})]
    for _, out in outputs(nb):
        data = out.get("data", {})
        if figure_kind(out) == "plotly" and "image/png" in data:
            data.pop("text/html", None)
        if "image/png" in data:
            data["image/png"] = base64.b64encode(compact_png(base64.b64decode(data["image/png"]))).decode("ascii")
    nb.metadata.setdefault(META, {})["outputs"] = {"quick": quick}
    return nb


def store(path: Path, nb) -> int:
    """Validate `nb` and write it over `path` atomically; its size in bytes."""
    import nbformat

    from splinterp.atomic import write_text

    nbformat.validate(nb)
    text = nbformat.writes(nb)
    if not text.endswith("\n"):
        text += "\n"
    write_text(path, text)
    return len(text.encode("utf-8"))


def run_notebooks(o: NotebooksOptions) -> int:
    from splinterp.errors import BrowserNotFoundError
    from splinterp.viz.display import CHROMIUM_ENV, find_chromium

    books = select(Path(o.folder), o.only)
    if find_chromium() is None:
        raise BrowserNotFoundError("splinterp notebooks draws plotly figures as PNG with headless Chromium and "
                                   f"found none (Debian: apt-get install chromium; or set {CHROMIUM_ENV})")
    failed: list[str] = []
    for path in books:
        t0 = time.perf_counter()
        try:
            nb = execute(path, quick=o.quick, out=o.out, device=o.device, timeout=o.timeout)
            n = check_figures(nb, path.stem)
            size = store(path, for_storage(nb, o.quick))
        except NotebookError as e:
            failed.append(path.stem)
            print(f"splinterp notebooks: {e}\n  ({path} left as it was)", file=sys.stderr)
            continue
        print(f"{path.stem}: {n} figures, {size / 1e3:.0f} kB, {time.perf_counter() - t0:.0f} s")
    if failed:
        print(f"splinterp notebooks: {len(failed)} of {len(books)} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"splinterp notebooks: {len(books)} notebook(s) run and stored with their outputs")
    return 0


COMMAND = Command("notebooks", NotebooksOptions, run_notebooks, "run the notebooks and store them with their figures",
                  "Execute each notebook in a fresh kernel (quick settings unless --no-quick), check that it shows "
                  "the figures it promises, and write it back with its outputs (plotly figures as PNG).")
