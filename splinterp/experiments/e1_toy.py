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

API: `run_e1(E1Config(...), out_dir)` -> results dict; `E1Config.quick()` for the small preset; the registered
job `e1_toy` writes e1_toy.json, e1_toy_k1.png, e1_toy_k3.png.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from splinterp.atomic import write_json, write_with
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
    seed: int = 0
    """Seed of every random choice (initialisation, batch order, subsets, restarts)."""
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


def _figure(X, km, sae, lp, cfg: E1Config, title: str):
    """The three-panel picture through `splinterp.viz.partition.plot_e1_panels`; a minimal raster figure
    (origin="lower", x right, y up) if that is unavailable."""
    try:
        from splinterp.viz.partition import plot_e1_panels
    except ImportError as e:
        log.warning("splinterp.viz.partition.plot_e1_panels unavailable (%s); drawing a minimal figure", e)
        return _minimal_figure(X, km, sae, lp, cfg, title)
    return plot_e1_panels(X.detach().cpu(), km, sae, lp, bounds=cfg.bounds, resolution=cfg.resolution,
                          suptitle=title)


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


def run_e1(cfg: E1Config | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Run E1; write `e1_toy.json` and one `e1_toy_k<k>.png` per SAE size into `out_dir` (if given)."""
    from splinterp.data import make_grid, make_three_clusters
    from splinterp.geometry import region_stats
    from splinterp.reference import KMeansAE, LocalPCAAE

    cfg = cfg if cfg is not None else E1Config()
    t0 = time.perf_counter()
    X, _ = make_three_clusters(cfg.n_train, seed=cfg.seed, device=cfg.device)
    Xt, _ = make_three_clusters(cfg.n_test, seed=cfg.seed + 1, device=cfg.device)
    grid, _ = make_grid(cfg.bounds, cfg.resolution, device=cfg.device)
    d = X.shape[1]

    def kmeans(m: int):
        return KMeansAE(m, n_init=cfg.kmeans_n_init, seed=cfg.seed, device=cfg.device).fit(X)

    def local_pca(m: int, rank: int):
        return LocalPCAAE(m, rank, kmeans_n_init=cfg.kmeans_n_init, seed=cfg.seed, device=cfg.device).fit(X)

    results: dict[str, Any] = {
        "config": cfg.to_dict(),
        "matching": "regions: the k-means AE and the local-PCA AE get as many regions as the SAE has on the "
                    "training points (splinterp.geometry.region_stats)",
        "mse": "mean over all elements of (x - x_hat)^2",
        "runs": {},
    }
    m0 = cfg.paper_n_clusters
    results["paper_baseline"] = {
        "n_clusters": m0,
        "kmeans": _evaluate(kmeans(m0), X, Xt),
        "local_pca_rank1": _evaluate(local_pca(m0, 1), X, Xt),
    }
    figures = {}
    for k, d_sae in cfg.sae_sizes:
        sae, hist, restarts = fit_toy_sae(X, k, d_sae, cfg, cfg.seed)
        stats = region_stats(sae, X)
        m = int(stats["n_regions"])
        if m > X.shape[0]:  # cannot happen (at most one region per point), guards the reference fits
            raise ConfigError(f"SAE has {m} regions on {X.shape[0]} points")
        km, lp1 = kmeans(m), local_pca(m, 1)
        run: dict[str, Any] = {
            "k": k, "d_sae": d_sae, "n_regions_matched": m,
            "sae": {**_evaluate(sae, X, Xt), "n_regions_train": m,
                    "n_regions_test": int(region_stats(sae, Xt)["n_regions"]),
                    "n_regions_in_view": int(region_stats(sae, grid)["n_regions"]),
                    "region_entropy_train": stats["region_entropy"],
                    "restart_train_mse": restarts, "train_loss_curve": hist["train_loss"]},
            "kmeans": {**_evaluate(km, X, Xt), "n_regions": m},
            "local_pca_rank1": {**_evaluate(lp1, X, Xt), "n_regions": m, "rank": 1},
        }
        r_match = min(k, d)
        if r_match != 1:
            run["local_pca_matched_rank"] = {**_evaluate(local_pca(m, r_match), X, Xt), "n_regions": m,
                                             "rank": r_match}
        s, kmse, lmse = run["sae"]["train_mse"], run["kmeans"]["train_mse"], run["local_pca_rank1"]["train_mse"]
        run["sae_between_kmeans_and_local_pca_rank1"] = bool(kmse >= s >= lmse)
        run["sae_below_kmeans"] = bool(s <= kmse)
        log.info("E1 k=%d d_sae=%d: %d regions; train mse k-means %.4g | SAE %.4g | local PCA r1 %.4g", k, d_sae,
                 m, kmse, s, lmse)
        results["runs"][f"k{k}"] = run
        figures[k] = _figure(
            X, km, sae, lp1, cfg,
            f"E1: k-means AE | Top-{k} SAE | k-means + local PCA (rank 1), matched at {m} regions "
            f"(train mse {kmse:.4f} | {s:.4f} | {lmse:.4f})")
    results["wall_time_s"] = time.perf_counter() - t0
    results = to_jsonable(results)
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / f"{JOB}.json", results)
        for k, fig in figures.items():
            write_with(out / f"{JOB}_k{k}.png", lambda p, fig=fig: fig.savefig(p, format="png", dpi=110))
    return results


@register(JOB, "E1: k-means AE | TopK SAE (k=1, 3) | local-PCA AE on the 2-D toy, matched region count",
          outputs=[f"{JOB}.json", f"{JOB}_k1.png", f"{JOB}_k3.png"], quick_seconds=20)
def e1_toy_job(out_dir: Path, run: RunSettings) -> dict:
    quick, seed, device = run.quick, run.seed, run.device
    cfg = E1Config.quick(seed=seed, device=device) if quick else E1Config(seed=seed, device=device)
    res = run_e1(cfg, out_dir)
    summary: dict[str, Any] = {"paper_baseline_kmeans_mse": res["paper_baseline"]["kmeans"]["train_mse"],
                               "paper_baseline_local_pca_mse": res["paper_baseline"]["local_pca_rank1"]["train_mse"]}
    for name, run in res["runs"].items():
        summary[name] = {"n_regions": run["n_regions_matched"], "kmeans_mse": run["kmeans"]["train_mse"],
                         "sae_mse": run["sae"]["train_mse"], "local_pca_rank1_mse": run["local_pca_rank1"]["train_mse"],
                         "between": run["sae_between_kmeans_and_local_pca_rank1"]}
    return summary
