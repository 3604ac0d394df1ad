"""Geometry figure jobs for `splinterp reproduce`: power diagrams (figs 5, 6), lifting (fig 7), a 2-D TopK
SAE's regions = power cells, MNIST slice partitions (TopK / ReLU / k-means AE / local-PCA AE), and PCA
projections of real LLM activations coloured by SAE region. See `registry` for the job contract.

Each job also checks the exactness its picture claims and returns the check as a number (e.g. the
fraction of probe points whose polygon agrees with the point-wise rule, which must be 1.0).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from splinterp.experiments.registry import RunSettings, register
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
def power_diagrams(out_dir: Path, run: RunSettings) -> dict:
    seed = run.seed
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
def lifting(out_dir: Path, run: RunSettings) -> dict:
    seed = run.seed
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


@register("llm_projection", "PCA of real MiniLM activations (offline text, middle block) coloured by TopK-SAE "
          "region and by most active latent; hover shows token, context, region and active latents",
          outputs=["llm_pca_regions.html", "llm_pca_top_latent_3d.html", "llm_pca_top_latent.png"],
          quick_seconds=20, quick_threads=1, tags=("llm",))
def llm_projection(out_dir: Path, run: RunSettings) -> dict:
    """Uses the LLM jobs' shared activation cache and per-layer SAE store (`splinterp.llm`), so the
    harvest and the SAE are made once per output folder whichever LLM job runs first."""
    from splinterp.geometry import region_stats
    from splinterp.llm import LayerSAEConfig, LLMContext, LLMDataConfig
    from splinterp.viz.llm import (
        activation_projection,
        plot_activation_projection,
        plot_activation_projection_static,
        points_from_cache,
    )

    quick, seed = run.quick, run.seed
    ctx = LLMContext(out_dir, LLMDataConfig.preset(quick, **run.llm_data_changes()), seed=seed, device=run.device)
    layer = ctx.pick_layer(run.layer)
    trained = LayerSAEConfig.preset(quick).train(ctx, [layer], seed=seed)
    sae = trained.sae.cpu().eval()
    X, toks, ctx_txt = points_from_cache(ctx.cache, layer, n=1500 if quick else 4000, split="test", seed=seed)
    Xs = ctx.standardizer(layer).transform(X).to(sae.dtype)
    kw = dict(tokens=toks, contexts=ctx_txt, seed=seed)
    model = ctx.data.model or "all-MiniLM-L6-v2"
    where = (f"{model.split('/')[-1]}, block {layer} resid_post, {Xs.shape[0]} held-out tokens; "
             f"TopK SAE d_sae={sae.cfg.d_sae}, k={sae.cfg.k}")
    p_region = activation_projection(Xs, sae, color_by="region", dims=2, **kw)
    p_region.title += f"<br>{where}"
    write_html(plot_activation_projection(None, projection=p_region), out_dir / "llm_pca_regions.html")
    p_top3 = activation_projection(Xs, sae, color_by="top_latent", dims=3, **kw)
    p_top3.title += f"<br>{where}"
    write_html(plot_activation_projection(None, projection=p_top3), out_dir / "llm_pca_top_latent_3d.html")
    p_top2 = activation_projection(Xs, sae, color_by="top_latent", dims=2, **kw)
    p_top2.title += f"\n{where}"
    save_png(plot_activation_projection_static(None, projection=p_top2), out_dir / "llm_pca_top_latent.png")
    stats = region_stats(sae, Xs)
    return {"layer": layer, "n_points": int(Xs.shape[0]), "sae": f"topk d_sae={sae.cfg.d_sae} k={sae.cfg.k}",
            "sae_reused": trained.reused, "test_fvu": trained.final[str(layer)].get("fvu"),
            "n_regions": stats["n_regions"], "largest_region_frac": stats["largest_region_frac"],
            "singleton_frac": stats["singleton_frac"], "pca_explained": p_region.explained.round(4).tolist()}


def _toy_topk_sae(X: torch.Tensor, d_sae: int, k: int, seed: int, device: str, epochs: int):
    """A TopK SAE on the 2-D toy, encoder initialised at data points (full-batch Adam via train_sgd)."""
    from splinterp import SAE, SAEConfig
    from splinterp.train import SGDConfig, train_sgd

    sae = SAE(SAEConfig(d_in=2, d_sae=d_sae, architecture="topk", k=k, seed=seed, device=device))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(X[torch.randperm(X.shape[0], generator=g)[:d_sae]].T.to(sae.W_enc))
        sae.b_enc.copy_(0.3 * torch.randn(d_sae, generator=g).to(sae.b_enc))
    hist = train_sgd(sae, X.to(device), SGDConfig(epochs=epochs, batch_size=X.shape[0], lr=1e-2, seed=seed,
                                                  eval_train=False, progress=False))
    return sae, hist


@register("sae_power_cells", "A TopK SAE on the 2-D three-cluster toy: its regions drawn as the exact cells of "
          "its k-th order power diagram (with the ReLU null site) next to sae.encode's active set per pixel",
          outputs=["sae_topk_power_cells.png"], quick_seconds=12)
def sae_power_cells(out_dir: Path, run: RunSettings) -> dict:
    quick, seed, device = run.quick, run.seed, run.device
    from splinterp.data.toy import make_three_clusters
    from splinterp.geometry import active_mask, power_diagram
    from splinterp.viz.power import plot_sae_power_cells

    X, _ = make_three_clusters(200, seed=seed)
    sae, hist = _toy_topk_sae(X, d_sae=12, k=2, seed=seed, device=device, epochs=120 if quick else 1000)
    sae = sae.cpu()
    bounds = (-2.2, 2.2, -2.2, 2.2)
    save_png(plot_sae_power_cells(sae, bounds, X=X.numpy()), out_dir / "sae_topk_power_cells.png")
    # the theorem on random points: polygon containing x <-> active set of encode(x)
    pd = power_diagram(sae)
    cells = pd.cells_2d(bounds)
    rng = np.random.default_rng(seed)
    P = rng.uniform(-2.2, 2.2, (20000, 2))
    from splinterp.viz.cells import locate

    idx = locate(cells, P)
    mask = active_mask(sae, torch.from_numpy(P).float()).numpy()
    agree = np.mean([i >= 0 and tuple(np.flatnonzero(m).tolist()) == tuple(cells[i].key) for i, m in zip(idx, mask)])
    return {"n_regions_in_view": len(cells), "polygon_equals_encode_active_set": float(agree),
            "train_mse_last": hist.last.get("train_running_mse")}


@register("mnist_slices", "A plane through three MNIST digits (0, 1, 7) cut by a TopK SAE, a ReLU SAE (exact "
          "polygons), a k-means AE (exact) and a k-means + local PCA AE (raster), with the reconstruction error on its "
          "own scale; interactive page: hover a region (active latents) or a held-out digit (label, region, error)",
          outputs=["mnist_slice_partitions.png", "mnist_slice_partitions.html"], quick_seconds=30)
def mnist_slices(out_dir: Path, run: RunSettings) -> dict:
    quick, seed, device = run.quick, run.seed, run.device
    from splinterp import SAE, SAEConfig
    from splinterp.data.mnist import load_mnist
    from splinterp.geometry import plane_through
    from splinterp.reference import KMeansAE, LocalPCAAE
    from splinterp.train import SGDConfig, train_sgd
    from splinterp.viz.partition import plot_slice_comparison
    from splinterp.viz.slices import plot_slices_plotly, slice_views

    n, d_sae, epochs, resolution = (1500, 64, 2, 160) if quick else (4000, 256, 10, 300)
    X, y = load_mnist("train", n=n, seed=seed, device=device)
    common = dict(epochs=epochs, batch_size=128, lr=2e-3, seed=seed, eval_train=False, progress=False)
    topk = SAE(SAEConfig(784, d_sae, "topk", k=8, seed=seed, device=device))
    train_sgd(topk, X, SGDConfig(**common))
    relu = SAE(SAEConfig(784, d_sae, "relu", seed=seed, device=device))
    train_sgd(relu, X, SGDConfig(l1_coefficient=3e-3, **common))
    n_clusters = 16 if quick else 64
    km = KMeansAE(n_clusters, n_init=1 if quick else 4, max_iter=50 if quick else 300, seed=seed, device=device).fit(X)
    # local PCA is fitted on fewer rows in quick mode: its per-region exact PCA dominates the job's time
    lp = LocalPCAAE(8 if quick else 16, rank=3 if quick else 8, max_iter=4 if quick else 50, kmeans_n_init=1,
                    seed=seed, device=device).fit(X[:800] if quick else X)
    picks = [int(torch.nonzero(y == dgt)[0]) for dgt in (0, 1, 7)]
    plane = plane_through(*(X[i].cpu() for i in picks))
    bounds = plane.bounds(0.3)
    saes = {f"TopK SAE (d_sae={d_sae}, k=8)": topk.cpu(), f"ReLU SAE (d_sae={d_sae}, L1 3e-3)": relu.cpu()}
    models = {**saes, f"k-means AE ({n_clusters} centroids)": km.cpu(),
              f"local PCA AE ({lp.n_regions} regions x rank {lp.rank})": lp.cpu()}
    axis = ("a: along digit 0 → digit 1 (input units)", "b: orthogonal, towards digit 7")
    fig = plot_slice_comparison(models, plane.origin, plane.u, plane.v, bounds, resolution=resolution,
                                anchors_ab=plane.coords, anchor_labels=["0", "1", "7"],
                                anchor_images=[X[i].cpu().numpy() for i in picks], axis_labels=axis,
                                suptitle=f"One plane through three MNIST training digits (0, 1, 7), cut by four "
                                         f"autoencoders trained on {n} digits")
    save_png(fig, out_dir / "mnist_slice_partitions.png")
    Xt, yt = load_mnist("test", n=300 if quick else 1000, seed=seed)
    views = slice_views(saes, plane, bounds, Xt.cpu(), [f"test digit {int(v)}" for v in yt],
                        anchor_labels=["0", "1", "7"])
    write_html(plot_slices_plotly(views, axis_labels=axis,
                                  title="Exact SAE regions on a plane through three MNIST digits (0, 1, 7); held-out "
                                        "digits projected; hover a region or a digit"),
               out_dir / "mnist_slice_partitions.html")

    res = {"n_train": n, "d_sae": d_sae}
    for name, v in zip(("topk", "relu"), views):
        res[f"{name}_regions_in_slice"] = v.n_regions
        res[f"{name}_slice_area_error"] = v.slice.area_error()
    with torch.no_grad():
        for name, m in models.items():
            res[f"mse[{name}]"] = float(((X.cpu() - m(X.cpu().to(m.dtype))) ** 2).mean())
    return res
