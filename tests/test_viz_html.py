"""Interactive figures: exact slices with hover (what each region and point says is checked against encode and
a brute-force count), and every HTML page the jobs write (and every committed one in figures/) opened in headless
Chromium with the network off: the plot must have drawn (traces rendered in the DOM), not just loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from line_arrangement import brute_force_arrangement_count
from matplotlib.collections import PolyCollection
from optional import needs

from splinterp import SAE, SAEConfig
from splinterp.experiments import registry
from splinterp.geometry import plane_through
from splinterp.viz import slices
from splinterp.viz.output import write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = Path(__file__).resolve().parent.parent
HTML_JOBS = ("lifting", "llm_projection", "llm_partitions", "mnist_slices")


# ------------------------------------------------------------------------------------------ helpers
def figure_data(page: Path) -> list[dict]:
    """The plotly traces a page hands to Plotly.newPlot (read from its source, not from the renderer)."""
    s = page.read_text("utf-8")
    i = s.index("Plotly.newPlot(")
    data, _ = json.JSONDecoder().raw_decode(s[s.index("[", i):])
    return data


def rendered_dom(page: Path, profile: Path) -> str:
    """The DOM of `page` after its scripts ran in headless Chromium, with every network request refused."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
           "--virtual-time-budget=30000", "--dump-dom", page.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    return out.stdout


def check_drawn(page: Path, profile: Path) -> None:
    """Assert the page's plot drew: 2-D SVG scatter traces are counted one for one; WebGL / 3-D pages must show
    their plot container and one legend entry per trace the figure puts in its legend."""
    data = figure_data(page)
    dom = rendered_dom(page, profile)
    assert 'class="main-svg"' in dom, f"{page.name}: plotly did not draw (no main-svg)"
    svg_scatter = sum(t.get("type", "scatter") == "scatter" for t in data)
    if svg_scatter:
        assert dom.count('class="trace scatter') == svg_scatter, page.name
    legend = sum(t.get("showlegend") is not False for t in data)
    if legend > 1:
        assert dom.count('class="traces"') == legend, page.name
    if any(t.get("type") in ("scatter3d", "mesh3d") for t in data):
        assert 'class="gl-container"' in dom or "<canvas" in dom, page.name


@pytest.fixture(scope="module")
def html_out(tmp_path_factory):
    """The quick outputs of every job that writes HTML (one folder: the LLM jobs share the harvest)."""
    out = tmp_path_factory.mktemp("html_jobs")
    res = {name: registry.run_job(name, out, quick=True, threads=1) for name in HTML_JOBS}
    return out, res


# ------------------------------------------------------------------------------- slices with hover
def _relu_sae(d_in=6, d_sae=9, seed=0):
    sae = SAE(SAEConfig(d_in, d_sae, "relu", seed=seed, dtype="float64"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g, dtype=torch.float64))
        sae.b_enc.copy_(0.5 * torch.randn(d_sae, generator=g, dtype=torch.float64))
    return sae


def _arrangement_count(sae, plane, bounds) -> int:
    """1 + L + I of the latent lines u_i(a, b) = 0 on the box (general position), by brute force."""
    W, b = sae.W_enc.detach().double(), sae.b_enc.detach().double()
    return brute_force_arrangement_count(torch.stack([plane.u @ W, plane.v @ W]).numpy(),
                                         (plane.origin @ W + b).numpy(), bounds)


def test_slice_views_hover_says_what_encode_says():
    sae = _relu_sae()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 6, generator=g, dtype=torch.float64)
    plane = plane_through(X[0], X[1], X[2])
    bounds = plane.bounds(0.3)
    (view,) = slices.slice_views({"relu": sae}, plane, bounds, X, [f"x{i}" for i in range(40)])
    assert view.n_regions == _arrangement_count(sae, plane, bounds)  # exact count, independent of slice_2d
    fig = slices.plot_slices_plotly([view])
    fills = [t for t in fig.data if t.fill == "toself"]
    assert len(fills) == view.n_regions  # one hoverable polygon per exact region
    rng = np.random.default_rng(0)
    for r in rng.choice(view.n_regions, 10, replace=False):
        poly = np.asarray(view.slice.polygons[r])
        w = rng.dirichlet(np.ones(len(poly)))
        x = view.slice.to_input((w @ poly)[None])
        z = sae.encode(x)[0]
        active = torch.nonzero(z).ravel().tolist()
        assert active == torch.nonzero(view.slice.masks[r]).ravel().tolist()  # the region's set is encode's
        listed = [int(m) for m in re.findall(r"(\d+) \(-?[\d.]+\)", fills[r].text.split("<br>")[-1])]
        assert set(listed) <= set(active) and len(listed) == min(8, len(active))
    # points: projection, region of the projection and error are those computed directly
    D = X - view.slice.origin
    ab = np.column_stack([(D @ view.slice.u).numpy(), (D @ view.slice.v).numpy()])
    assert np.allclose(view.points_ab, ab)
    err = ((X - sae(X)) ** 2).sum(1).detach().numpy()
    for i in (0, 5, 17):
        assert f"|x − x̂|² = {err[i]:.4g}" in view.point_text[i]
        want = view.slice.regions_at(ab[i:i + 1])[0]
        assert f"projection in region {want} " in view.point_text[i]
    # static version: one polygon per region, one dot per point
    mfig = slices.plot_slices([view])
    (pc,) = [c for c in mfig.axes[0].collections if isinstance(c, PolyCollection)]
    assert len(pc.get_paths()) == view.n_regions


def test_llm_partitions_job_draws_every_exact_region(html_out):
    out, res = html_out
    r = res["llm_partitions"]
    for plane, page in (("tokens", "llm_slice_tokens.html"), ("pca", "llm_slice_pca.html")):
        data = figure_data(out / page)
        fills = [t for t in data if t.get("fill") == "toself"]
        assert len(fills) == r[f"{plane}_topk_regions"] + r[f"{plane}_relu_regions"]
        assert all(t["text"].startswith("<b>region ") for t in fills)
        tokens = [t for t in data if t.get("name", "").startswith("held-out")]
        assert len(tokens) == 2 and all(len(t["text"]) == r["n_tokens"] for t in tokens)
        assert r[f"{plane}_topk_area_error"] < 1e-9 and r[f"{plane}_relu_area_error"] < 1e-9
    assert len(r["anchor_tokens"]) == 3
    mnist = figure_data(out / "mnist_slice_partitions.html")
    m = res["mnist_slices"]
    assert sum(t.get("fill") == "toself" for t in mnist) == m["topk_regions_in_slice"] + m["relu_regions_in_slice"]


def test_llm_projection_colours_every_point(html_out):
    out, _ = html_out
    data = figure_data(out / "llm_pca_regions.html")
    grey = "#b4b4b4"
    colours = [c for t in data for c in t["marker"]["color"]]
    assert colours and grey not in colours  # no point left in an uncoloured "other" group


# --------------------------------------------------------------------------------- Chromium, offline
@needs(CHROMIUM is not None, "Debian package chromium")
def test_chromium_check_fails_on_a_page_that_needs_the_network(tmp_path):
    """The negative control: the same figure drawn from the CDN does not render offline, from a local bundle it
    does (so the check below can fail, and the network really is off)."""
    import plotly.graph_objects as go

    fig = go.Figure([go.Scatter(x=[0, 1, 2], y=[1, 0, 1], name=f"t{i}") for i in range(3)])
    write_html(fig, tmp_path / "cdn.html", plotlyjs="cdn")
    write_html(fig, tmp_path / "local.html", plotlyjs="directory")
    assert 'class="main-svg"' not in rendered_dom(tmp_path / "cdn.html", tmp_path / "p1")
    dom = rendered_dom(tmp_path / "local.html", tmp_path / "p2")
    assert dom.count('class="trace scatter') == 3


@needs(CHROMIUM is not None, "Debian package chromium")
def test_every_html_the_jobs_write_draws_offline(html_out, tmp_path):
    out, _ = html_out
    pages = sorted(out.glob("*.html"))
    want = {o for n in HTML_JOBS for o in registry.get(n).outputs if o.endswith(".html")}
    assert {p.name for p in pages} == want
    for i, page in enumerate(pages):
        check_drawn(page, tmp_path / f"profile{i}")


@needs(CHROMIUM is not None, "Debian package chromium")
def test_committed_html_figures_draw_offline(tmp_path):
    pages = sorted((ROOT / "figures").glob("*.html"))
    assert pages
    for i, page in enumerate(pages):
        check_drawn(page, tmp_path / f"profile{i}")


def test_llm_segments_job_pieces_are_encodes(html_out):
    """Runs on the folder of the HTML jobs, so the harvest and the two SAEs come from the shared store."""
    out, _ = html_out
    res = registry.run_job("llm_segments", out, quick=True, threads=1)
    for arch in ("topk", "relu"):
        assert res[f"segment_{arch}_pieces"] > 1 and res[f"segment_{arch}_encode_agreement"] == 1.0
    assert (out / "segments_tokens.png").stat().st_size > 10_000


def test_rewriting_a_figure_gives_the_same_page(tmp_path):
    """plotly draws a random div id per page; ours comes from the file name, so committed pages only change
    when the figure does."""
    import plotly.graph_objects as go

    from splinterp.viz.output import write_html

    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    first = write_html(fig, tmp_path / "page.html", "cdn").read_text()
    assert write_html(fig, tmp_path / "page.html", "cdn").read_text() == first
    fig.add_trace(go.Scatter(x=[0], y=[0]))
    assert write_html(fig, tmp_path / "page.html", "cdn").read_text() != first
