"""Default PAM-SGD (proximal decoder step, relative weights) vs SGD vs the authors' PAM settings on MNIST,
at 1 / 5 / 10 / 100% of the 4,000 offline training digits: final test mse, mean and 95% CI over seeds.

Why: the authors' decoder step (ridge 1e-6, no proximal term) fits the training rows exactly when there are
fewer of them than latents, and its test error then blows up; the default step of `PAMConfig` keeps the
decoder near its previous value where the codes say nothing. This is the evidence for that default.

Setting (E2 of the paper, its "paper" epoch schedule, as in splinterp.experiments.e2_mnist): untied SAE,
784 -> 256 latents, k 15 (TopK), Adam lr 3e-3, batch 128, epochs = min(20, max(10, int(20 * fraction))),
inputs standardised (0.1307, 0.3081), mse = mean over elements. ReLU is E2's plain ReLU autoencoder (no
L1). Seed s (0..n-1) draws the training subset, the SAE's initial weights and the batch order; all three
methods start from the same weights and see the same batches. Test: the 1,000 offline test digits.

`--select` is how the defaults were chosen, on a validation split: the first 3,000 training digits are
the pool the fractions are drawn from and the last 1,000 are the validation set (test digits never used).

    python -m bench pam_default                     # the test table (5 seeds, topk, topk_abs, relu)
    python -m bench.bench_pam_default --select      # the validation table the defaults were chosen on
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import torch

from bench.common import row

FRACTIONS = (0.01, 0.05, 0.1, 1.0)
ARCHS = ("topk", "topk_abs", "relu")
D_SAE, K, LR, BATCH = 256, 15, 3e-3, 128
METHODS = ("sgd", "pam_default", "pam_authors")
LABELS = {"sgd": "SGD", "pam_default": "PAM-SGD (default)", "pam_authors": "PAM-SGD (authors' settings)"}
CANDIDATES: dict[str, dict[str, Any]] = {
    "ridge 0.1, no prox": dict(alpha=0.1, mu_dec=0.0, nu_dec=0.0),
    "prox 1, no ridge": dict(alpha=0.0, mu_dec=1.0, nu_dec=1.0),
    "prox 1, ridge 0.03 (default)": dict(alpha=0.03, mu_dec=1.0, nu_dec=1.0),
    "prox 1, ridge 0.1": dict(alpha=0.1, mu_dec=1.0, nu_dec=1.0),
    "prox 3, ridge 0.03": dict(alpha=0.03, mu_dec=3.0, nu_dec=3.0),
}
"""Relative-weight settings compared on the validation split (`--select`); all decoder_scale="relative"."""


def paper_epochs(fraction: float) -> int:
    """E2's "paper" schedule with E = 20, E_min = 10: 10 epochs up to half the data, 20 for all of it."""
    return min(20, max(10, int(20 * fraction)))


def subset(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Seeded random rows, max(1, round(fraction * n)) of range(n) (E2's rule)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: max(1, round(fraction * n))]


def final_mse(method: str, arch: str, X: torch.Tensor, X_eval: torch.Tensor, seed: int, epochs: int,
              pam: dict[str, Any] | None = None) -> float:
    """Train one SAE from seed `seed`'s weights and batch order; its mse on X_eval (non-finite if it diverged)."""
    import splinterp as sp
    from splinterp import metrics
    from splinterp.errors import NonFiniteError
    from splinterp.train import PAMConfig, SGDConfig, train_pam_sgd, train_sgd

    sae = sp.make_sae(784, D_SAE, arch, K if arch != "relu" else None, seed=seed)
    common = dict(epochs=epochs, batch_size=BATCH, lr=LR, seed=seed, progress=False, eval_train=False)
    try:
        if method == "sgd":
            train_sgd(sae, X, SGDConfig(**common))
        elif method == "pam_authors":
            train_pam_sgd(sae, X, PAMConfig.authors(**common))
        else:
            train_pam_sgd(sae, X, PAMConfig(**common, **(pam or {})))
    except NonFiniteError:
        return math.inf
    return metrics.evaluate(sae, X_eval)["mse"]


def sweep(X_pool: torch.Tensor, X_eval: torch.Tensor, archs, seeds, fractions,
          methods: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """{arch: {method: {fraction: [mse per seed]}}}; `methods` maps a name to PAMConfig overrides (None:
    the name is one of METHODS)."""
    out: dict[str, Any] = {}
    for arch in archs:
        for f in fractions:
            for seed in seeds:
                X = X_pool[subset(X_pool.shape[0], f, seed)]
                for name, pam in methods.items():
                    method = name if pam is None else "pam_default"
                    v = final_mse(method, arch, X, X_eval, seed, paper_epochs(f), pam)
                    out.setdefault(arch, {}).setdefault(name, {}).setdefault(f, []).append(v)
    return out


def _cell(vals: list[float]) -> str:
    from splinterp.stats import mean_ci

    finite = [v for v in vals if math.isfinite(v)]
    if len(finite) < len(vals):
        return f"diverged in {len(vals) - len(finite)} of {len(vals)}" + (
            f"; others {mean_ci(finite).format()}" if finite else "")
    return mean_ci(vals).format()


def markdown(res: dict[str, Any], n_pool: int, baseline: str = "sgd") -> list[str]:
    """One table per architecture: mean ± 95% CI half-width per fraction, and the mean's ratio to SGD."""
    from splinterp.stats import mean_ci

    lines: list[str] = []
    for arch, by_m in res.items():
        fracs = list(next(iter(by_m.values())))
        head = " | ".join(f"{100 * f:g}% ({max(1, round(f * n_pool))} rows)" for f in fracs)
        lines += [f"{arch}:", "", f"| method | {head} |", "|---" * (len(fracs) + 1) + "|"]
        for m, by_f in by_m.items():
            cells = []
            for f in fracs:
                c = _cell(by_f[f])
                base = by_m.get(baseline, {}).get(f)
                if m != baseline and base and all(map(math.isfinite, by_f[f] + base)):
                    c += f" ({mean_ci(by_f[f]).mean / mean_ci(base).mean:.2f}x)"
                cells.append(c)
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _data(select: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    from splinterp.data import load_mnist

    X_tr = load_mnist("train")[0]
    if select:
        return X_tr[:3000], X_tr[3000:], "validation: pool = first 3,000 training digits, eval = last 1,000"
    return X_tr, load_mnist("test")[0], "test: pool = the 4,000 training digits, eval = the 1,000 test digits"


def evidence(seeds: int = 5, archs=ARCHS, fractions=FRACTIONS) -> tuple[dict[str, Any], str]:
    X_pool, X_eval, where = _data(select=False)
    res = sweep(X_pool, X_eval, archs, range(seeds), fractions, {m: None for m in METHODS})
    return res, where


def selection(seeds: int = 3, archs=ARCHS, fractions=FRACTIONS) -> tuple[dict[str, Any], str]:
    X_pool, X_eval, where = _data(select=True)
    methods: dict[str, Any] = {"sgd": None, "pam_authors": None, **CANDIDATES}
    return sweep(X_pool, X_eval, archs, range(seeds), fractions, methods), where


def run(quick: bool = False) -> dict:
    """The test table as bench rows (ratio of mean test mse to SGD's) and the Markdown table as notes."""
    from splinterp.stats import mean_ci

    t0 = time.perf_counter()
    seeds, archs, fractions = (2, ("topk",), (0.05, 1.0)) if quick else (5, ARCHS, FRACTIONS)
    res, where = evidence(seeds, archs, fractions)
    rows = []
    for arch, by_m in res.items():
        for f in fractions:
            sgd = by_m["sgd"][f]
            for m in ("pam_default", "pam_authors"):
                vals = by_m[m][f]
                if not all(map(math.isfinite, vals + sgd)):
                    continue
                a, b = mean_ci(vals), mean_ci(sgd)
                rows.append(row(f"{arch}, {100 * f:g}% of the data: {LABELS[m]} test mse {a.format()}", a.mean / b.mean,
                                f"SGD test mse {b.format()} (same {len(vals)} seeds)"))
    notes = [f"{seeds} seeds (initialisation, batch order and subset), {where}; mean ± 95% Student-t CI "
             f"half-width, (ratio of means to SGD); wall {time.perf_counter() - t0:.0f} s"] + [
        line for line in markdown(res, 4000) if line]
    return {"name": "pam_default", "rows": rows, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_pam_default", description=__doc__.splitlines()[0])
    ap.add_argument("--select", action="store_true", help="the validation table the defaults were chosen on")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 5, or 3 with --select)")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated architectures")
    ap.add_argument("--json", default=None, help="also write the per-seed numbers here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)  # small problems: one thread is faster on a shared machine
    archs = tuple(a.archs.split(","))
    t0 = time.perf_counter()
    if a.select:
        res, where = selection(a.seeds or 3, archs)
    else:
        res, where = evidence(a.seeds or 5, archs)
    print(f"{where}; final mse, mean ± 95% CI half-width over seeds (ratio of means to SGD); "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("\n".join(markdown(res, 3000 if a.select else 4000)))
    if a.json:
        from splinterp.atomic import write_text

        write_text(a.json, json.dumps({arch: {m: {str(f): v for f, v in by_f.items()} for m, by_f in by_m.items()}
                                       for arch, by_m in res.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
