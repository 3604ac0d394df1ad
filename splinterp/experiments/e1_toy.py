"""E1, "between k-means and PCA": k-means AE | TopK SAE | k-means + local PCA AE on the 2-D three-cluster toy.

What the paper's scripts show (reference_code.md section 2) is the picture; what they compute has bugs that this
module does not reproduce. Here:

- everything is seeded (data, SAE init, k-means, local PCA) and every model sees the same training points;
- the SAE is a real TopK SAE (`splinterp.SAE`, architecture "topk": the k largest scores, then ReLU), untied,
  with a decoder bias, no unit-norm constraint on the atoms, trained with Adam on the plain mse, so gradients
  reach the encoder (the authors' hard top-3 variant froze it) and reconstructions are not confined to the unit
  disk. Its b_dec starts at the training mean (the usual SAE initialisation); the best of `n_restarts` seeded
  runs is kept (k-means gets `kmeans_n_init` restarts too);
- **capacity is matched by the number of regions**: the SAE's regions are measured on the training points with
  `splinterp.geometry.region_stats` (points share a region iff they share an active set), and the k-means AE and
  the local-PCA AE get exactly that many regions. Parameter counts are reported next to every mse.
- mse is the mean over all elements of (x - x_hat)^2 (`splinterp.metrics`), on the training points and on a
  held-out draw of the same distribution.

The expected picture (paper_splinterp.md section 2): a k-means AE is piecewise constant, a Top-1 SAE has rank-1
affine pieces on an order-1 power diagram, and the k-means + local PCA AE (k-flats) is the optimal piecewise
affine AE with rank-r pieces, so at equal region count mse(k-means) >= mse(Top-1 SAE) >= mse(local PCA rank 1)
is expected. A Top-3 SAE in 2-D has rank-2 (full-rank) pieces, so its fair local-PCA match is rank min(k, 2),
which is exact in 2-D; the rank-1 local PCA is reported as the paper's baseline anyway.

Every fit is repeated over the run's seeds (SAE initialisation and restarts, k-means restarts; the training and
held-out points are fixed by `data_seed`) and reported as mean ± Student-t 95% CI. The claim (table "claims"): at
the SAE's region count, train mse(k-means) - mse(SAE) > 0 and mse(SAE) - mse(local PCA) > 0, paired by seed, each
judged by `splinterp.claims.RULE`; "holds" when both hold, "does not hold" when either does not. It is tested
against the paper's rank-1 local PCA and, for k > 1, against the fair rank-min(k, 2) one.

API: `run_e1(E1Config(...), out_dir, seeds)` -> results dict; `E1Config.quick()` for the small preset;
`e1_tables(folder)`; the registered job `e1_toy` writes e1_toy.json, e1_toy_k1.png, e1_toy_k3.png (the
partitions of the first seed's models).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from splinterp.atomic import write_json, write_with
from splinterp.claims import RULE, aggregate_runs, between_claims_table, cell, format_cell, markdown_table, verdict
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RunSettings, register, to_jsonable

log = logging.getLogger(__name__)

JOB = "e1_toy"


@dataclass
class E1Config:
    """Settings of E1. Defaults are the full run; `E1Config.quick()` is the small preset."""

    n_train: int = 100
    """Training points (the paper's toy has 100)."""
    n_test: int = 2000
    """Held-out points from the same distribution (another seed)."""
    sae_sizes: tuple[tuple[int, int], ...] = ((1, 4), (3, 8))
    """(k, d_sae) of each TopK SAE."""
    steps: int = 3000
    """Full-batch Adam steps per SAE restart."""
    steps_per_record: int = 500
    """Steps per History record (one 'epoch' of the trainer = this many full-batch steps)."""
    lr: float = 1e-2
    """Adam learning rate of the SAE restarts."""
    n_restarts: int = 4
    """Seeded SAE restarts; the one with the lowest training mse is kept."""
    kmeans_n_init: int = 10
    """k-means++ restarts of every k-means fit (and of the local-PCA initialisation)."""
    paper_n_clusters: int = 3
    """k-means / local-PCA size of the authors' figure, reported as an extra baseline."""
    bounds: tuple[float, float, float, float] = (-2.0, 2.0, -2.0, 2.0)
    """(xmin, xmax, ymin, ymax) of the figure panels, in data coordinates."""
    resolution: int = 300
    """Pixels along each side of the figure rasters (and of the grid on which regions in view are counted)."""
    data_seed: int = 0
    """Seed of the training points (the held-out points use data_seed + 1): fixed over the run's seeds."""
    seed: int = 0
    """Seed of the SAE initialisation and restarts and of the k-means restarts (run_e1 replaces it per seed)."""
    device: str = "cpu"
    """Torch device the models train on."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form notes stored with the results."""

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test", "steps", "steps_per_record", "n_restarts", "kmeans_n_init",
                     "paper_n_clusters", "resolution"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"E1Config.{name} must be a positive integer, got {v!r}")
        if self.n_train < 4:
            raise ConfigError(f"E1Config.n_train must be >= 4 (three non-empty clusters), got {self.n_train}")
        if not self.sae_sizes:
            raise ConfigError("E1Config.sae_sizes is empty: give at least one (k, d_sae)")
        for pair in self.sae_sizes:
            if len(pair) != 2:
                raise ConfigError(f"E1Config.sae_sizes entries are (k, d_sae), got {pair!r}")
            k, d = pair
            if not (isinstance(k, int) and isinstance(d, int) and 1 <= k <= d):
                raise ConfigError(f"E1Config.sae_sizes needs integers 1 <= k <= d_sae, got {pair!r}")
        if not self.lr > 0:
            raise ConfigError(f"E1Config.lr must be > 0, got {self.lr!r}")
        if len(self.bounds) != 4 or not (self.bounds[0] < self.bounds[1] and self.bounds[2] < self.bounds[3]):
            raise ConfigError(f"E1Config.bounds must be (xmin, xmax, ymin, ymax), got {self.bounds!r}")

    @classmethod
    def quick(cls, **overrides) -> E1Config:
        """Small preset (seconds on 2 CPU cores): fewer steps and restarts, coarser rasters."""
        base = dict(n_test=1000, steps=800, steps_per_record=200, lr=2e-2, n_restarts=2, kmeans_n_init=4,
                    resolution=120)
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _n_params(model) -> int:
    if hasattr(model, "n_parameters") and callable(model.n_parameters):
        return int(model.n_parameters())
    return int(sum(p.numel() for p in model.parameters()))


def fit_toy_sae(X: torch.Tensor, k: int, d_sae: int, cfg: E1Config, seed: int):
    """Train a TopK SAE (untied, decoder bias, Adam, full batch) with `cfg.n_restarts` seeded restarts;
    return (best SAE, its History, the training mse of every restart)."""
    from splinterp import SAE, SAEConfig, metrics
    from splinterp.train import SGDConfig, train_sgd

    n_epochs = max(1, round(cfg.steps / cfg.steps_per_record))
    batches = [X] * cfg.steps_per_record  # one trainer "epoch" = steps_per_record full-batch Adam steps
    best = None
    finals = []
    for r in tqdm(range(cfg.n_restarts), desc=f"E1 Top-{k} SAE ({d_sae} latents)", leave=False):
        s = seed + 1000 * r
        sae = SAE(SAEConfig(d_in=X.shape[1], d_sae=d_sae, architecture="topk", k=k, seed=s, device=cfg.device))
        with torch.no_grad():
            sae.b_dec.copy_(X.mean(0))
        hist = train_sgd(sae, batches, SGDConfig(epochs=n_epochs, lr=cfg.lr, seed=s, progress=False,
                                                 eval_train=False))
        mse = metrics.evaluate(sae, X)["mse"]
        finals.append(mse)
        log.info("E1 Top-%d SAE d_sae=%d restart %d: train mse %.5g", k, d_sae, r, mse)
        if best is None or mse < best[0]:
            best = (mse, sae, hist)
    return best[1], best[2], finals


def _evaluate(model, X: torch.Tensor, Xt: torch.Tensor) -> dict[str, float]:
    from splinterp import metrics

    return {"train_mse": metrics.evaluate(model, X)["mse"], "test_mse": metrics.evaluate(model, Xt)["mse"],
            "n_parameters": _n_params(model)}


def _figure(X, km, sae, lp, cfg: E1Config, title: str, titles: Sequence[str] | None = None):
    """The three-panel picture through `splinterp.viz.partition.plot_e1_panels`; a minimal raster figure
    (origin="lower", x right, y up) if that is unavailable."""
    try:
        from splinterp.viz.partition import plot_e1_panels
    except ImportError as e:
        log.warning("splinterp.viz.partition.plot_e1_panels unavailable (%s); drawing a minimal figure", e)
        return _minimal_figure(X, km, sae, lp, cfg, title)
    return plot_e1_panels(X.detach().cpu(), km, sae, lp, bounds=cfg.bounds, resolution=cfg.resolution,
                          suptitle=title, titles=titles)


def _minimal_figure(X, km, sae, lp, cfg: E1Config, title: str):
    from matplotlib.figure import Figure

    from splinterp.geometry import region_ids
    from splinterp.viz.raster import pixel_centers, raster_shape, show_raster

    shape = raster_shape(cfg.bounds, cfg.resolution)
    P = torch.from_numpy(pixel_centers(cfg.bounds, shape)).to(device=cfg.device, dtype=X.dtype)
    fig = Figure(figsize=(17, 6), layout="constrained")
    Xn = X.detach().cpu().numpy()
    for ax, name, model in zip(fig.subplots(1, 3), ("k-means AE", "TopK SAE", "local PCA AE"), (km, sae, lp)):
        ids = region_ids(model, P) if model is sae else model.regions(P)
        show_raster(ax, (ids.cpu().numpy() % 20).reshape(shape), cfg.bounds, cmap="tab20", alpha=0.6)
        ax.scatter(Xn[:, 0], Xn[:, 1], s=8, c="k")
        ax.set_title(name)
    fig.suptitle(title)
    return fig


def run_one_seed(cfg: E1Config, X: torch.Tensor, Xt: torch.Tensor, grid: torch.Tensor):
    """Every model of E1 for `cfg.seed`: (records, models per k for the figure)."""
    from splinterp.geometry import region_stats
    from splinterp.reference import KMeansAE, LocalPCAAE

    d = X.shape[1]

    def kmeans(m: int):
        return KMeansAE(m, n_init=cfg.kmeans_n_init, seed=cfg.seed, device=cfg.device).fit(X)

    def local_pca(m: int, rank: int):
        return LocalPCAAE(m, rank, kmeans_n_init=cfg.kmeans_n_init, seed=cfg.seed, device=cfg.device).fit(X)

    m0 = cfg.paper_n_clusters
    recs = [dict(_evaluate(kmeans(m0), X, Xt), k=None, model="kmeans", n_regions=m0, setting="paper"),
            dict(_evaluate(local_pca(m0, 1), X, Xt), k=None, model="local_pca_rank1", n_regions=m0, setting="paper")]
    models = {}
    for k, d_sae in cfg.sae_sizes:
        sae, hist, restarts = fit_toy_sae(X, k, d_sae, cfg, cfg.seed)
        stats = region_stats(sae, X)
        m = int(stats["n_regions"])
        if m > X.shape[0]:  # cannot happen (at most one region per point), guards the reference fits
            raise ConfigError(f"SAE has {m} regions on {X.shape[0]} points")
        km, lp1 = kmeans(m), local_pca(m, 1)
        in_view = int(region_stats(sae, grid)["n_regions"])
        recs.append(dict(_evaluate(sae, X, Xt), k=k, model="sae", d_sae=d_sae, n_regions=m,
                         n_regions_test=int(region_stats(sae, Xt)["n_regions"]), n_regions_in_view=in_view,
                         region_entropy_train=stats["region_entropy"], restart_train_mse=restarts,
                         train_loss_curve=hist["train_loss"]))
        recs.append(dict(_evaluate(km, X, Xt), k=k, model="kmeans", n_regions=m))
        recs.append(dict(_evaluate(lp1, X, Xt), k=k, model="local_pca_rank1", n_regions=m, rank=1))
        r_fair = min(k, d)
        lp_fair = None
        if r_fair != 1:
            lp_fair = local_pca(m, r_fair)
            recs.append(dict(_evaluate(lp_fair, X, Xt), k=k, model=f"local_pca_rank{r_fair}", n_regions=m,
                             rank=r_fair))
        models[k] = (km, sae, lp1, lp_fair, m, in_view)
        log.info("E1 seed %d k=%d d_sae=%d: %d regions; train mse k-means %.4g | SAE %.4g | local PCA r1 %.4g",
                 cfg.seed, k, d_sae, m, recs[-3]["train_mse"], recs[-4]["train_mse"], recs[-2]["train_mse"])
    for r in recs:
        r["seed"] = cfg.seed
    return recs, models


def e1_claims(runs: Sequence[dict[str, Any]], cfg: E1Config) -> list[dict[str, Any]]:
    """Per SAE size and local-PCA rank: k-means - SAE and SAE - local PCA (train mse), paired by seed."""
    def by_seed(k, model):
        return {r["seed"]: r["train_mse"] for r in runs if r["k"] == k and r["model"] == model}

    rows = []
    for k, d_sae in cfg.sae_sizes:
        sae, km = by_seed(k, "sae"), by_seed(k, "kmeans")
        for lp_model in dict.fromkeys(("local_pca_rank1", f"local_pca_rank{min(k, 2)}")):
            lp = by_seed(k, lp_model)
            seeds = sorted(set(sae) & set(km) & set(lp))
            above, below = cell(km[s] - sae[s] for s in seeds), cell(sae[s] - lp[s] for s in seeds)
            va, vb = verdict(above, "positive"), verdict(below, "positive")
            v = "holds" if va == vb == "holds" else "does not hold" if "does not hold" in (va, vb) else "inconclusive"
            rank = int(lp_model.removeprefix("local_pca_rank"))
            fair = "the paper's rank 1" + (", unfair to Top-k pieces of rank 2" if min(k, 2) > 1 else "") \
                if rank == 1 else f"rank {rank} = the rank of the SAE's pieces (fair)"
            rows.append({"claim": "the SAE lies between the k-means AE and the local-PCA AE at matched regions",
                         "setting": f"Top-{k} SAE ({d_sae} latents), 2-D toy, local PCA {fair}", "k": k, "rank": rank,
                         "kmeans_minus_sae": dict(above, verdict=va), "sae_minus_local_pca": dict(below, verdict=vb),
                         "verdict": v})
    return rows


def run_e1(cfg: E1Config | None = None, out_dir: str | Path | None = None,
           seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Run E1 once per seed (default `cfg.seed`); write `e1_toy.json` (per-seed `runs`, mean / CI `cells`,
    `claims`) and one `e1_toy_k<k>.png` per SAE size (the first seed's models) into `out_dir` (if given)."""
    from splinterp.data import make_grid, make_three_clusters

    cfg = cfg if cfg is not None else E1Config()
    seeds = tuple(seeds) if seeds is not None else (cfg.seed,)
    if not seeds:
        raise ConfigError("seeds must not be empty")
    t0 = time.perf_counter()
    X, _ = make_three_clusters(cfg.n_train, seed=cfg.data_seed, device=cfg.device)
    Xt, _ = make_three_clusters(cfg.n_test, seed=cfg.data_seed + 1, device=cfg.device)
    grid, _ = make_grid(cfg.bounds, cfg.resolution, device=cfg.device)
    runs: list[dict[str, Any]] = []
    first = None
    for s in seeds:
        recs, models = run_one_seed(dataclasses.replace(cfg, seed=s), X, Xt, grid)
        runs += recs
        first = first or models
    results: dict[str, Any] = {
        "config": cfg.to_dict(), "seeds": list(seeds),
        "matching": "regions: the k-means AE and the local-PCA AE get as many regions as the SAE has on the "
                    "training points (splinterp.geometry.region_stats)",
        "mse": "mean over all elements of (x - x_hat)^2",
        "seeds_vary": "SAE initialisation and restarts, k-means restarts; the points are fixed (data_seed)",
        "runs": runs,
        "cells": aggregate_runs(runs, ("setting", "k", "model"), ("train_mse", "test_mse", "n_regions")),
        "claims": e1_claims(runs, cfg), "claims_rule": RULE,
    }
    figures = {}
    n = len(seeds)
    for k, (km, sae, lp1, lp_fair, m, _) in first.items():
        mse = {r["model"]: r["train_mse"] for r in runs if r["seed"] == seeds[0] and r["k"] == k}
        fair = ""
        if lp_fair is not None:
            fair = (f"\nthe fair match for the SAE's rank-2 pieces, local PCA of rank 2, is exact in 2-D: train MSE "
                    f"{mse['local_pca_rank2']:.4f} (not drawn: each flat is the whole plane)")
        title = (f"E1, three-cluster toy ({cfg.n_train} points), "
                 + (f"seed {seeds[0]}, the first of {n} seeds (CIs in e1_toy.json)" if n > 1 else
                    f"1 seed ({seeds[0]})")
                 + f":\nk-means AE and local PCA AE get the {m} regions the Top-{k} SAE uses on the training points"
                 + fair)
        titles = [f"k-means AE ({m} centroids)", f"Top-{k} SAE ({sae.cfg.d_sae} latents), {m} regions on the training "
                  "points", f"k-means + local PCA AE ({m} regions, rank 1"
                  + (":\nthe paper's; unfair to the SAE's rank-2 pieces)" if lp_fair is not None else ")")]
        figures[k] = _figure(X, km, sae, lp1, cfg, title, titles)
    results["wall_time_s"] = time.perf_counter() - t0
    results = to_jsonable(results)
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / f"{JOB}.json", results)
        for k, fig in figures.items():
            write_with(out / f"{JOB}_k{k}.png", lambda p, fig=fig: fig.savefig(p, format="png", dpi=110))
    return results


MODEL_NAMES = {"sae": "TopK SAE", "kmeans": "k-means AE", "local_pca_rank1": "k-means + local PCA AE, rank 1",
               "local_pca_rank2": "k-means + local PCA AE, rank 2"}


def e1_tables(folder: Path) -> dict[str, str]:
    """README tables of e1_toy.json in `folder`: "models" (train / test mse per model) and "claims"."""
    path = Path(folder) / f"{JOB}.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text("utf-8"))
    rows = [[f"Top-{c['k']} SAE" if c.get("k") else f"paper's {res['config']['paper_n_clusters']} clusters",
             MODEL_NAMES.get(c["model"], c["model"]), format_cell(c["n_regions"], 4), format_cell(c["train_mse"]),
             format_cell(c["test_mse"])] for c in res["cells"]]
    models = markdown_table(["comparison", "model", "regions", "train MSE", "test MSE"], rows)
    claims = between_claims_table(res["claims"], res["claims_rule"], "train MSE")
    return {"models": models, "claims": claims}


@register(JOB, "E1: k-means AE | TopK SAE (k=1, 3) | local-PCA AE on the 2-D toy, matched region count, over seeds",
          outputs=[f"{JOB}.json", f"{JOB}_k1.png", f"{JOB}_k3.png"], quick_seconds=20, quick_threads=1,
          tables=e1_tables)
def e1_toy_job(out_dir: Path, run: RunSettings) -> dict:
    cfg = E1Config.quick(device=run.device) if run.quick else E1Config(device=run.device)
    res = run_e1(cfg, out_dir, run.seeds)
    summary: dict[str, Any] = {f"{c.get('setting') or 'k' + str(c['k'])}_{c['model']}_train_mse": c["train_mse"]["mean"]
                               for c in res["cells"]}
    summary["claims"] = {r["setting"]: r["verdict"] for r in res["claims"]}
    return summary
