"""Geometry figure jobs for `splinterp reproduce`: power diagrams (figs 5, 6), lifting (fig 7), a 2-D TopK
SAE's regions = power cells, MNIST slice partitions (TopK / ReLU / k-means AE / local-PCA AE), and PCA
projections of real LLM activations coloured by SAE region. See `registry` for the job contract.

Each job also checks the exactness its picture claims and returns the check as a number (e.g. the
fraction of probe points whose polygon agrees with the point-wise rule, which must be 1.0).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from splinterp.experiments.registry import register
from splinterp.viz.output import save_png, write_html

log = logging.getLogger(__name__)


def _polygon_agreement(pd, cells, bounds, n: int, seed: int) -> float:
    """Fraction of random points whose containing polygon's key equals pd's point-wise key."""
    from splinterp.viz.cells import cell_key, locate

    rng = np.random.default_rng(seed)
    xmin, xmax, ymin, ymax = bounds
    P = np.column_stack([rng.uniform(xmin, xmax, n), rng.uniform(ymin, ymax, n)])
    idx = locate(cells, P)
    keys = pd.keys(P)
    m = pd.n_sites
    ok = 0
    for i, row in zip(idx, keys):
        want = tuple(int(s) for s in row if s < m) if pd.null_site else tuple(int(s) for s in row)
        ok += i >= 0 and tuple(cell_key(cells[i])) == want
    return ok / n


@register("power_diagrams", "Figures 5 and 6: Voronoi, 1-NN, k-means and power diagrams; Voronoi vs power vs "
          "2nd-order power (exact polygons)",
          outputs=["power_fig5_voronoi_to_power.png", "power_fig6_voronoi_power_order2.png"], quick_seconds=10)
def power_diagrams(out_dir: Path, quick: bool, seed: int, device: str) -> dict:
    from splinterp.geometry.power import PowerDiagram
    from splinterp.viz.power import fig5_voronoi_to_power, fig6_sites, fig6_voronoi_power_order2

    fig_seed = 42 + seed  # seed 0 gives the paper scripts' seed 42 (not their numbers: a different RNG)
    save_png(fig5_voronoi_to_power(fig_seed), out_dir / "power_fig5_voronoi_to_power.png")
    centers, alpha = fig6_sites(fig_seed)
    save_png(fig6_voronoi_power_order2(centers=centers, weights=alpha),
             out_dir / "power_fig6_voronoi_power_order2.png")
    bounds = (-4.0, 4.0, -4.0, 4.0)
    res = {}
    for name, pd in (("voronoi", PowerDiagram(centers, np.zeros(len(centers)))),
                     ("power", PowerDiagram(centers, alpha)), ("power_order2", PowerDiagram(centers, alpha, order=2))):
        cells = pd.cells_2d(bounds)
        res[f"fig6_{name}_cells"] = len(cells)
        res[f"fig6_{name}_polygon_agreement"] = _polygon_agreement(pd, cells, bounds, 2000, seed)
    res["fig6_empty_power_cells"] = int(len(centers) - res["fig6_power_cells"])
    res["fig6_alpha"] = alpha.round(4).tolist()
    return res


@register("lifting", "Figure 7: a power diagram is the h = 0 section of the Voronoi diagram of lifted sites "
          "(c, sqrt(K - alpha)); static and interactive", outputs=["lift_fig7.png", "lift_fig7.html"],
          quick_seconds=10)
def lifting(out_dir: Path, quick: bool, seed: int, device: str) -> dict:
    from splinterp.geometry.power import PowerDiagram
    from splinterp.viz.lift import default_K, fig7_sites, plot_lift_3d, plot_lift_plotly

    centers, alpha = fig7_sites(42 + seed)
    pd = PowerDiagram(centers, alpha)
    bounds = (-2.0, 2.0, -2.0, 2.0)
    save_png(plot_lift_3d(pd, bounds, seed=seed), out_dir / "lift_fig7.png")
    write_html(plot_lift_plotly(pd, bounds, seed=seed), out_dir / "lift_fig7.html")
    # the claim, checked on many plane points: nearest lifted site == power cell
    K = default_K(alpha)
    L = pd.lift(K)
    rng = np.random.default_rng(seed)
    P = rng.uniform(-2, 2, (20000, 2))
    d2 = ((P[:, None, :] - L[None, :, :2]) ** 2).sum(-1) + L[None, :, 2] ** 2
    agree = float((d2.argmin(1) == pd.keys(P)[:, 0]).mean())
    return {"K": K, "heights": L[:, 2].round(4).tolist(), "nearest_lifted_equals_power_cell": agree}


@register("llm_projection", "PCA of real MiniLM layer-3 activations (offline text) coloured by TopK-SAE region "
          "and by most active latent; hover shows token, region and active latents",
          outputs=["llm_pca_regions.html", "llm_pca_top_latent_3d.html", "llm_pca_top_latent.png"],
          quick_seconds=35)
def llm_projection(out_dir: Path, quick: bool, seed: int, device: str) -> dict:
    from splinterp import SAE, SAEConfig
    from splinterp.data.cache import Standardizer
    from splinterp.data.harvest import harvest
    from splinterp.data.text import offline_texts
    from splinterp.geometry import region_stats
    from splinterp.train import SGDConfig, train_sgd
    from splinterp.viz.llm import (
        activation_projection,
        plot_activation_projection,
        plot_activation_projection_static,
        points_from_cache,
    )

    n_texts, epochs, n_points = (30, 3, 1500) if quick else (400, 20, 4000)
    layer = 3
    with tempfile.TemporaryDirectory(prefix="splinterp_llm_") as tmp:
        cache = harvest(None, offline_texts(n_texts, seed=seed), layers=[layer], out=Path(tmp) / "cache",
                        device=device, seed=seed, progress=False)
        X_train = cache.load(layer, split="train")
        std = Standardizer.fit(X_train)
        sae = SAE(SAEConfig(d_in=cache.d_model, d_sae=256, architecture="topk", k=8, seed=seed, device=device))
        hist = train_sgd(sae, std.transform(X_train),
                         SGDConfig(epochs=epochs, batch_size=128, lr=2e-3, seed=seed, eval_train=quick is False,
                                   progress=False))
        X, toks, ctx = points_from_cache(cache, layer, n=n_points, split=None, seed=seed)
    Xs = std.transform(X).to(sae.dtype)
    sae.eval()
    p_region = activation_projection(Xs, sae, tokens=toks, contexts=ctx, color_by="region", dims=2, seed=seed)
    write_html(plot_activation_projection(None, projection=p_region), out_dir / "llm_pca_regions.html")
    p_top = activation_projection(Xs, sae, tokens=toks, contexts=ctx, color_by="top_latent", dims=3, seed=seed)
    write_html(plot_activation_projection(None, projection=p_top), out_dir / "llm_pca_top_latent_3d.html")
    p_top2 = activation_projection(Xs, sae, tokens=toks, contexts=ctx, color_by="top_latent", dims=2, seed=seed)
    save_png(plot_activation_projection_static(None, projection=p_top2), out_dir / "llm_pca_top_latent.png")
    stats = region_stats(sae, Xs)
    return {"n_tokens_cached": cache.n_tokens, "n_points": int(Xs.shape[0]), "layer": layer,
            "train_mse_last": hist.last.get("train_mse"), "n_regions": stats["n_regions"],
            "largest_region_frac": stats["largest_region_frac"], "singleton_frac": stats["singleton_frac"],
            "pca_explained": p_region.explained.round(4).tolist()}
