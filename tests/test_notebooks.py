"""The notebooks show their figures: the committed files carry them (read with nbformat, no kernel), executing a
notebook shows as many figures as it promises (its metadata "splinterp": {"figures": N}), every one an image,
and `splinterp notebooks` stores them (checked on small notebooks made here, with a failing one among them).

Figures are counted here from the raw outputs (image/png data decoded with Pillow), not with the command's own
helpers. Executing a notebook takes 15-30 s of wall time on 2 loaded cores (a kernel and, for plotly figures,
Chromium starting are a good part of it; measured with --durations): 01 (27 s) and 07 (20 s) run in the default
suite; 02 (E1, 17 s), 03 (E2 and a small SGD/PAM-SGD run, 16 s), 04 (MiniLM harvest, E3, projections, 21 s),
05 (shrinkage sweep, 24 s), 06 (Group-SAE, 15 s) and 07 in its full-size mode (19 s) are marked slow.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest
from optional import needs
from PIL import Image

from splinterp.commands import notebooks as cmd
from splinterp.viz.display import find_chromium

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ALL = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
SLOW = {"02_between_kmeans_and_pca", "03_mnist_pam_sgd", "04_llm_pam_sgd", "05_gated_shrinkage", "06_group_sae"}
MAX_BYTES = 2_000_000
"""Largest committed notebook (they are 0.1-0.7 MB with quick settings)."""
needs_chromium = needs(find_chromium() is not None, "Chromium (Debian package chromium)")
FIGURE_AS_TEXT = re.compile(r"<(matplotlib\.figure\.)?Figure( size)? |^Figure\(\{")


def promised(nb) -> int:
    return nb.metadata["splinterp"]["figures"]


def images(nb) -> list[tuple[int, np.ndarray]]:
    """(cell index, decoded RGB pixels) of every image/png output."""
    out = []
    for i, cell in enumerate(nb.cells):
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if "image/png" in o.get("data", {}):
                img = Image.open(io.BytesIO(base64.b64decode(o["data"]["image/png"])))
                out.append((i, np.asarray(img.convert("RGB"))))
    return out


def assert_shows_its_figures(nb, name: str, stored: bool) -> None:
    """Every figure an image, as many as promised, no figure left as text; `stored`: in the committed form too
    (no scripts, no plotly JSON: GitHub shows neither)."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for o in cell.outputs:
            assert o.output_type != "error", f"{name} cell {i}: {o.get('ename')}: {o.get('evalue')}"
            data = o.get("data", {})
            if set(data) == {"text/plain"}:
                assert not FIGURE_AS_TEXT.search(str(data["text/plain"])), f"{name} cell {i} shows a figure as text"
            if stored:
                assert "<script" not in str(data.get("text/html", "")), f"{name} cell {i} stores a script"
                assert "application/vnd.plotly.v1+json" not in data, f"{name} cell {i} stores plotly JSON"
                assert "application/vnd.jupyter.widget-view+json" not in data, f"{name} cell {i} stores a widget"
            if o.get("metadata", {}).get("splinterp", {}).get("figure") == "plotly" and not stored:
                assert "Plotly.newPlot" in data["text/html"], f"{name} cell {i}: no interactive HTML"
    shown = images(nb)
    assert len(shown) == promised(nb), f"{name} promises {promised(nb)} figures, shows {len(shown)}"
    for i, img in shown:
        h, w, _ = img.shape
        ink = (np.abs(img.astype(int) - img[0, 0].astype(int)).sum(-1) > 30).mean()
        assert w >= 300 and h >= 200, f"{name} cell {i}: a {w}x{h} image is too small to read"
        assert 0.01 < ink, f"{name} cell {i}: the image is blank ({ink:.1%} of pixels differ from the corner)"


@pytest.mark.parametrize("name", ALL)
def test_committed_notebook_carries_its_figures(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert path.stat().st_size < MAX_BYTES
    assert "SPLINTERP_QUICK" in "\n".join(c.source for c in nb.cells), f"{name} does not read SPLINTERP_QUICK"
    assert nb.metadata["splinterp"]["outputs"] == {"quick": True}, f"{name}: outputs not made with quick settings"
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{name} was not run top to bottom in one go: {counts}"
    assert promised(nb) >= 1
    assert_shows_its_figures(nb, name, stored=True)


def test_every_notebook_is_committed_and_promises_figures():
    assert len(ALL) == 7
    for name in ALL:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        assert isinstance(promised(nb), int)


def _params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ALL]


@needs_chromium
@pytest.mark.parametrize("name", _params())
def test_notebook_shows_its_figures_when_run(name, tmp_path):
    nb = cmd.execute(NOTEBOOKS / f"{name}.ipynb", quick=True, out=tmp_path / "out", timeout=900)
    assert_shows_its_figures(nb, name, stored=False)
    assert (tmp_path / "out" / name).is_dir()
    assert_shows_its_figures(cmd.for_storage(nb, quick=True), name, stored=True)


@pytest.mark.slow
@needs_chromium
def test_notebook_07_runs_in_its_default_full_size_mode(tmp_path):
    """Regression: the full-size mode asked for 5000 MNIST training images of a split that has 4000."""
    nb = cmd.execute(NOTEBOOKS / "07_geometry_of_your_own_sae.ipynb", quick=False, out=tmp_path / "out",
                     timeout=900)
    assert "quick=False" in nb.cells[1].outputs[0]["text"]
    assert_shows_its_figures(nb, "07", stored=False)


# ------------------------------------------------------------------------------------ the command itself
def _notebook(cells: list[str], figures: int | None) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if figures is not None:
        nb.metadata["splinterp"] = {"figures": figures}
    return nb


SETUP = "import os\nfrom splinterp.viz.display import enable, show\nenable()"
MPL = ("from matplotlib.figure import Figure\nfig = Figure(figsize=(4, 3), facecolor='#ff0000')\n"
       "ax = fig.add_axes((0, 0, 1, 1))\nax.plot([0, 1], [0, 1], color='black', lw=8)\nax.axis('off')\n")
PLOTLY = ("import plotly.graph_objects as go\n"
          "pfig = go.Figure(go.Bar(x=[1, 2], y=[3, 1]), layout={'width': 320, 'height': 240})\n")


@needs_chromium
def test_command_stores_figures_and_leaves_failing_notebooks_alone(tmp_path, monkeypatch, capsys):
    from splinterp.cli import main

    folder = tmp_path / "nbs"
    folder.mkdir()
    good = _notebook([SETUP, "print(os.environ['SPLINTERP_QUICK'], 'SPLINTERP_SAE_FOLDER' in os.environ)",
                      MPL + "fig", PLOTLY + "pfig", "show(fig, fig)",
                      "from tqdm.auto import tqdm\nfor _ in tqdm(range(2), disable=False):\n    pass"], figures=4)
    failing = _notebook([SETUP, "raise ValueError('broken on purpose')"], figures=0)
    over_promised = _notebook([SETUP, MPL + "fig"], figures=2)
    bare = _notebook(["import splinterp.viz.display", MPL + "fig"], figures=1)  # import alone changes nothing
    unpromised = _notebook([SETUP], figures=None)
    for name, nb in [("a_good", good), ("b_failing", failing), ("c_over", over_promised), ("d_bare", bare),
                     ("e_unpromised", unpromised)]:
        nbformat.write(nb, folder / f"{name}.ipynb")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    monkeypatch.setenv("SPLINTERP_SAE_FOLDER", "/somewhere")

    assert main(["notebooks", "--folder", str(folder), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "broken on purpose" in err
    assert "c_over shows 1 figure(s) but its metadata promises 2" in err
    assert "d_bare, cell 1: a figure is shown as text" in err
    assert "e_unpromised does not say how many figures" in err
    assert "4 of 5 failed" in err
    for name in ("b_failing", "c_over", "d_bare", "e_unpromised"):
        assert (folder / f"{name}.ipynb").read_bytes() == before[f"{name}.ipynb"], f"{name} was rewritten"

    stored = nbformat.read(folder / "a_good.ipynb", as_version=4)
    assert stored.cells[1].outputs[0]["text"] == "1 False\n"  # quick, and the user's SAE folder not passed on
    assert stored.metadata["splinterp"] == {"figures": 4, "outputs": {"quick": True}}
    shown = images(stored)
    assert [i for i, _ in shown] == [2, 3, 4, 4]
    sizes = [img.shape[:2] for _, img in shown]
    assert sizes == [(300, 400), (240, 320), (300, 400), (300, 400)]  # 4x3 in at 100 dpi; the plotly layout's
    assert (shown[0][1][0, 0] == [255, 0, 0]).all() and (shown[0][1][150, 200] == [0, 0, 0]).all()
    plotly_out = stored.cells[3].outputs[0]
    assert set(plotly_out["data"]) == {"image/png", "text/plain"}  # the 4.8 MB interactive HTML is not stored
    assert_shows_its_figures(stored, "a_good", stored=True)
    assert (folder / "a_good.ipynb").stat().st_size < 50_000


def test_only_names_notebooks_by_name_or_unique_start(tmp_path):
    from splinterp.errors import ConfigError

    for name in ("01_a", "02_b", "10_c"):
        nbformat.write(_notebook([], 0), tmp_path / f"{name}.ipynb")
    assert [p.stem for p in cmd.select(tmp_path, ["02", "01_a.ipynb"])] == ["01_a", "02_b"]
    assert len(cmd.select(tmp_path, [])) == 3
    with pytest.raises(ConfigError, match="names no notebook"):
        cmd.select(tmp_path, ["03"])
    with pytest.raises(ConfigError, match="matches several"):
        cmd.select(tmp_path, ["0"])


def test_only_with_an_unknown_name_is_a_usage_error(tmp_path, capsys):
    from splinterp.cli import main

    nbformat.write(_notebook([], 0), tmp_path / "01_a.ipynb")
    assert main(["notebooks", "--folder", str(tmp_path), "--only", "zz"]) == 2
    assert "--only zz names no notebook" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ stored PNGs
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA")).astype(int)


def test_compact_png_uses_a_palette_only_where_faithful():
    rng = np.random.default_rng(0)
    flat = np.zeros((120, 160, 3), np.uint8)  # a plot: a few flat colours
    flat[:, :80] = (255, 255, 255)
    flat[40:80, 20:140] = (0, 114, 178)
    flat[::7, :] = (213, 94, 0)
    data = _png(Image.fromarray(flat).convert("RGBA"))
    small = cmd.compact_png(data)
    assert len(small) < len(data) and Image.open(io.BytesIO(small)).mode == "P"
    assert np.abs(_pixels(small) - _pixels(data)).max() == 0  # 4 colours fit a palette exactly

    smooth = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)  # far more than 256 colours
    data = _png(Image.fromarray(smooth))
    assert (_pixels(cmd.compact_png(data)) == _pixels(data)).all()  # kept losslessly

    seethrough = np.dstack([flat, np.full((120, 160), 128, np.uint8)])  # transparency is kept as it is
    data = _png(Image.fromarray(seethrough, "RGBA"))
    assert (_pixels(cmd.compact_png(data)) == _pixels(data)).all()


def test_storage_drops_widget_outputs_and_plotly_html():
    nb = _notebook(["x"], figures=1)
    png = base64.b64encode(_png(Image.new("RGB", (400, 300), (0, 0, 255)))).decode()
    nb.cells[0].outputs = [
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "1"},
                                                     "text/plain": "  0%|          | 0/2"}),
        nbformat.v4.new_output("display_data", data={"text/html": "<script>Plotly</script>", "image/png": png,
                                                     "text/plain": "<plotly figure>"},
                               metadata={"splinterp": {"figure": "plotly"}}),
    ]
    stored = cmd.for_storage(nb, quick=False)
    assert [sorted(o.data) for o in stored.cells[0].outputs] == [["image/png", "text/plain"]]
    assert stored.metadata["splinterp"]["outputs"] == {"quick": False}
