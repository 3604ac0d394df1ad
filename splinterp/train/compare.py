"""Train one SAE with SGD or PAM-SGD from a shared initialisation and record what a comparison reports.

Why one place: the E2 comparison and the capacity comparison both ask "how well does this method train this
SAE?", and a fair answer needs the same things every time: the same initial weights for every method (same
`seed`), the same mini-batches in the same order (same trainer seed), the same encoder optimiser, and train /
test metrics measured the same way after training (`splinterp.metrics.evaluate`, no penalty terms).

Methods (`METHODS`):
- "sgd": Adam on every parameter (`train_sgd`);
- "pam_sgd": PAM-SGD with `PAMConfig()`'s defaults (the robust proximal decoder step, relative units);
- "pam_sgd_authors": PAM-SGD with the authors' decoder step (`PAMConfig.authors()`: ridge 1e-6 in absolute
  units, no proximal term).

    sae = make_sae(784, 256, "topk", k=15, seed=0)
    rec, sae = train_method(sae, "pam_sgd", X_train, X_test, epochs=10, batch_size=128, lr=3e-3, seed=0)
    rec["test_mse"]
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import torch

from splinterp.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["FINAL_KEYS", "INITS", "METHODS", "authors_init", "make_sae", "train_method"]

METHODS = ("sgd", "pam_sgd", "pam_sgd_authors")
INITS = ("splinterp", "authors")
FINAL_KEYS = ("mse", "l0", "explained_variance", "dead_features")
CURVE_KEYS = ("train_mse", "test_mse", "train_l0", "train_loss", "wall_time")


def authors_init(sae, seed: int) -> None:
    """The authors' E2 initialisation, in place: W_enc ~ 0.1 N(0, 1), b_enc = b_dec = 0, and an untied
    W_dec ~ 0.01 N(0, 1) (tied: W_dec = W_enc^T). W_enc is drawn first from `seed`, so a tied and an untied
    SAE with one seed share their encoder."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    with torch.no_grad():
        sae.W_enc.copy_(0.1 * torch.randn(d_in, d_sae, generator=g, dtype=torch.float64))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        if not sae.cfg.tied:
            sae.W_dec.copy_(0.01 * torch.randn(d_sae, d_in, generator=g, dtype=torch.float64))


def make_sae(d_in: int, d_sae: int, architecture: str, *, k: int | None = None, seed: int = 0,
             device: str = "cpu", tied: bool = False, init: Literal["splinterp", "authors"] = "splinterp"):
    """A fresh SAE whose initial weights depend only on (`seed`, `init`): every method compared from the same
    seed starts from the same weights. `k` is used by the TopK architectures only."""
    from splinterp import SAE, SAEConfig

    if init not in INITS:
        raise ConfigError(f"init must be one of {INITS}, got {init!r}")
    k = k if architecture in ("topk", "topk_abs") else None
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, tied=tied, seed=seed, device=device))
    if init == "authors":
        authors_init(sae, seed)
    return sae


def train_method(sae, method: str, X_train: torch.Tensor, X_test: torch.Tensor | None, *, epochs: int,
                 batch_size: int, lr: float, seed: int, curves: bool = False, **overrides) -> tuple[dict, Any]:
    """Train `sae` in place with `method` (see `METHODS`) and return (record, sae).

    The record holds the final train (and test) metrics of `FINAL_KEYS` as `train_mse`, `test_mse`, ...,
    measured after training without penalties; the optimiser steps, wall time, epochs and rows; per-epoch
    `curves` (train and test mse, train L0, loss, wall time) when asked. `overrides` go into the trainer's
    config (`SGDConfig` / `PAMConfig`, e.g. `weight_decay`, `mu_dec`, `l1_coefficient`).
    """
    from splinterp import metrics
    from splinterp.train import PAMConfig, SGDConfig, train_pam_sgd, train_sgd

    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    common = dict(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=False, eval_train=curves)
    common.update(overrides)
    eval_data = X_test if curves else None
    t0 = time.perf_counter()
    if method == "sgd":
        hist = train_sgd(sae, X_train, SGDConfig(**common), eval_data=eval_data)
    elif method == "pam_sgd":
        hist = train_pam_sgd(sae, X_train, PAMConfig(**common), eval_data=eval_data)
    else:
        hist = train_pam_sgd(sae, X_train, PAMConfig.authors(**common), eval_data=eval_data)
    wall = time.perf_counter() - t0
    rec: dict[str, Any] = {"method": method, "architecture": sae.cfg.architecture, "tied": bool(sae.cfg.tied),
                           "seed": seed, "epochs": epochs, "n_train": int(X_train.shape[0]),
                           "steps": hist.last.get("step"), "wall_time_s": wall, "overrides": dict(overrides)}
    tr = metrics.evaluate(sae, X_train)
    rec.update({f"train_{k}": tr[k] for k in FINAL_KEYS})
    if X_test is not None:
        te = metrics.evaluate(sae, X_test)
        rec.update({f"test_{k}": te[k] for k in FINAL_KEYS})
    if curves:
        rec["curves"] = {k: hist[k] for k in CURVE_KEYS if k in hist.keys()}
    log.info("%s %s (%d rows, %d epochs, seed %d): train mse %.4g, test mse %s, %.1fs", method,
             sae.cfg.architecture, X_train.shape[0], epochs, seed, rec["train_mse"],
             f"{rec.get('test_mse', float('nan')):.4g}", wall)
    return rec, sae
