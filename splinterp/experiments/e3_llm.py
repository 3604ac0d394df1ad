"""E3: PAM-SGD vs SGD on real transformer activations, plus the helpers every LLM job shares.

The paper's E3 (paper_splinterp.md 5.3, reference_code.md 4) trains TopK and ReLU SAEs on Gemma-2-2B
activations with SGD and with PAM-SGD, and reports test loss curves, a training-set-size ablation and the
code sparsity (% non-zero latents) of ReLU SAEs. Here the activations are harvested offline from the shipped
text (`splinterp.data.text.offline_texts`) through the shipped all-MiniLM-L6-v2 (6 blocks, d_model 384), or
any Hugging Face model (`LLMDataConfig.model`, e.g. "gpt2", "google/gemma-2-2b" where a hub is reachable).
None of the authors' script bugs is reproduced:

- every real token is kept, taken from the attention mask (their "last token" index was wrong under left
  padding), and the layer convention is explicit (resid_post of block `layer`);
- the test split is held out by text (`split_unit="text"`: no text has tokens on both sides) and the
  per-feature standardisation is fitted on the training split only;
- both methods train an *untied* SAE from the *same* initial weights with the same Adam settings on the same
  batches; no proximal term on one side only, no clipping on one side only;
- the ReLU sparsity penalty is the same for both methods, and reported losses are plain mse (no penalty);
- PAM-SGD alternates the encoder pass and the exact decoder solve in Algorithm C.1 order by default
  (`order="encoder_first"`): the decoder used for evaluation is the exact minimiser for the encoder being
  evaluated. The LLM script's order is available as `order="decoder_first"`.

Three methods are compared: SGD, the default PAM-SGD (`PAMConfig()`: the proximal decoder step with weights
relative to the code statistics) and PAM-SGD with the authors' decoder step (`PAMConfig.authors()`: ridge 1e-6
in absolute units, no proximal term); all three share the encoder's Adam settings and batches.

Seeds: every SAE training is repeated over `seeds` (initialisation, batch order and the training-size subsets
change with the seed); the harvested activations and the train/test split of the texts are those of the
first seed. Tables and figures show the mean and the Student-t 95% CI over seeds.

The activations come from `splinterp.llm` (harvested once per output folder, shared with the other LLM
jobs). Any Hugging Face model id or folder:

    splinterp reproduce --only e3_llm shrinkage --model gpt2 --out out_gpt2 [--quick]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splinterp.atomic import write_json, write_text
from splinterp.claims import cell, claims_markdown, diff_verdict, format_cell, seeds_phrase, tables_markdown, yerr
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RepeatedOverSeeds, RunSettings, llm_config, register, to_jsonable
from splinterp.llm import LLMContext, LLMDataConfig
from splinterp.viz.style import STYLES

log = logging.getLogger(__name__)


@dataclass
class E3Config(RepeatedOverSeeds):
    """Settings of E3. Defaults are the full run on this machine; `E3Config.quick()` is the small preset."""

    data: LLMDataConfig = field(default_factory=LLMDataConfig)
    """Which model, texts, layers and split the activations come from (see `splinterp.llm.LLMDataConfig`)."""
    layer: int | None = None
    """Block whose resid_post is used; None = the middle block (3 of MiniLM's 6; the paper used the middle
    of Gemma-2-2B too)."""
    architectures: tuple[str, ...] = ("topk", "relu")
    """SAE architectures compared (TopK and ReLU in the paper)."""
    d_sae: int = 512
    """Latents of every SAE."""
    k: int = 40
    """TopK: 40 / 512 = 7.8% active, the paper's 320 / 4096."""
    relu_l1: float = 1e-4
    """L1 coefficient of the ReLU SAE's loss (plain sum |z_i|, as the paper), the same for every method."""
    sparsity_l1s: tuple[float, ...] = (1e-3, 3e-3)
    """Extra ReLU L1 coefficients at which the code sparsity of the methods is compared (the main runs'
    relu_l1 is always included): which method gives sparser codes may depend on the penalty."""
    epochs: int = 8
    """Epochs of the main runs on the whole training split."""
    batch_size: int = 256
    """Mini-batch rows (every method)."""
    lr: float = 1e-3
    """Adam learning rate of the encoder (every method) and the decoder (SGD)."""
    order: str = "encoder_first"
    """PAM-SGD order: "encoder_first" (Algorithm C.1) or "decoder_first" (the authors' LLM script)."""
    fractions: tuple[float, ...] = (0.02, 0.1, 0.3, 1.0)
    """Training-set-size sweep: seeded random subsets of the training split (a new subset per seed)."""
    fraction_epochs: int = 5
    """Epochs of every run of the training-set-size sweep."""
    fraction_architectures: tuple[str, ...] = ("topk", "relu")
    """Architectures of the training-set-size sweep."""
    seed: int = 0
    """Seed of the data: text order and train/test split (the first of `seeds`)."""
    seeds: tuple[int, ...] | None = None
    """Seeds of the SAE trainings (initialisation, batch order, subsets), each run repeated per seed;
    None = (seed,)."""
    device: str = "cpu"
    """Torch device the model and the SAEs run on."""
    progress: bool = False
    """Progress bars while training."""

    def __post_init__(self) -> None:
        if not self.architectures or any(a not in ("topk", "topk_abs", "relu") for a in self.architectures):
            raise ConfigError(f"architectures must be among topk, topk_abs, relu; got {self.architectures!r}")
        if any(a not in self.architectures for a in self.fraction_architectures):
            raise ConfigError(f"fraction_architectures {self.fraction_architectures!r} must be among "
                              f"architectures {self.architectures!r}")
        if not self.fractions or any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"fractions must be a non-empty list in (0, 1], got {self.fractions!r}")
        self.check_seeds()

    @classmethod
    def quick(cls, **changes: Any) -> E3Config:
        base = cls(data=LLMDataConfig.preset(True), d_sae=128, k=10, epochs=3, batch_size=128, lr=2e-3,
                   fractions=(0.1, 0.3, 1.0), fraction_epochs=2, fraction_architectures=("topk",),
                   sparsity_l1s=(1e-3,))
        return dataclasses.replace(base, **changes)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, device: str = "cpu", **changes: Any) -> E3Config:
        c = cls.quick() if quick else cls()
        return dataclasses.replace(c, seed=seed, device=device, **changes)


E3_METHODS = ("sgd", "pam_sgd", "pam_sgd_authors")
"""SGD, the default PAM-SGD (`PAMConfig()`) and PAM-SGD with the authors' decoder step (`PAMConfig.authors()`)."""
PAM_VARIANTS = ("pam_sgd", "pam_sgd_authors")
ARCH_NAMES = {"topk": "TopK", "topk_abs": "TopK |u|", "relu": "ReLU"}


def _e3_train(cfg: E3Config, arch: str, method: str, X: torch.Tensor, Xt: torch.Tensor, epochs: int, seed: int,
              l1: float | None = None):
    from splinterp import SAE, SAEConfig, metrics
    from splinterp.train import PAMConfig, SGDConfig, train_pam_sgd, train_sgd

    if method not in E3_METHODS:
        raise ConfigError(f"method must be one of {E3_METHODS}, got {method!r}")
    sae = SAE(SAEConfig(d_in=X.shape[1], d_sae=cfg.d_sae, architecture=arch,
                        k=cfg.k if arch.startswith("topk") else None, seed=seed, device=cfg.device,
                        metadata={"layer": cfg.layer, "model_name": cfg.data.model or "minilm", "standardized": True}))
    common = dict(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, eval_train=False,
                  l1_coefficient=(cfg.relu_l1 if l1 is None else l1) if arch == "relu" else 0.0,
                  progress=cfg.progress)
    t0 = time.perf_counter()
    if method == "sgd":
        hist = train_sgd(sae, X, SGDConfig(**common), eval_data=Xt)
    elif method == "pam_sgd":
        hist = train_pam_sgd(sae, X, PAMConfig(**common, order=cfg.order), eval_data=Xt)
    else:  # the authors' decoder step, with the same encoder optimiser and batches as the others
        hist = train_pam_sgd(sae, X, PAMConfig.authors(**common, order=cfg.order), eval_data=Xt)
    seconds = time.perf_counter() - t0
    final = metrics.evaluate(sae, Xt)
    return hist, final, seconds


def _curve_summary(curves: list[list[float]]) -> dict[str, list]:
    """Per-epoch mean / low / high over seeds (low = high = mean with one seed)."""
    per_epoch = [cell(v) for v in zip(*curves)]
    return {"mean": [s["mean"] for s in per_epoch],
            "low": [s["mean"] if s["low"] is None else s["low"] for s in per_epoch],
            "high": [s["mean"] if s["high"] is None else s["high"] for s in per_epoch]}


def _describe(res: dict[str, Any]) -> str:
    model = "all-MiniLM-L6-v2" if res["model"] == "minilm" else res["model"]
    return f"{model}, block {res['layer']} resid_post, offline text ({seeds_phrase(res['n_seeds'])})"


def run_e3(cfg: E3Config, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Run E3 into `out_dir`: curves, training-set size, ReLU code sparsity, claims. Returns the results dict."""
    from splinterp.viz.output import save_png

    out_dir = Path(out_dir)
    ctx = LLMContext(out_dir, cfg.data, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    layer = ctx.pick_layer(cfg.layer)
    cfg = dataclasses.replace(cfg, layer=layer)
    X = ctx.train(layer).to(cfg.device)
    Xt = ctx.test(layer)
    seeds = cfg.run_seeds
    res: dict[str, Any] = {"layer": layer, "n_train": int(X.shape[0]), "n_test": int(Xt.shape[0]),
                           "d_in": int(X.shape[1]), "d_sae": cfg.d_sae, "k": cfg.k, "model": cfg.data.model or "minilm",
                           "seeds": list(seeds), "n_seeds": len(seeds), "data_seed": cfg.seed,
                           "methods": list(E3_METHODS), "runs": {}, "fractions": {}, "sparsity": {}}
    metric_keys = ("test_mse", "test_fvu", "test_l0", "pct_nonzero", "dead_features", "seconds")
    # warm-up, not reported: the process's one-off start-up costs must not land in the first timed run
    for method in E3_METHODS:
        _e3_train(cfg, cfg.architectures[0], method, X[: 2 * cfg.batch_size], Xt[:64], 1, seeds[0])
    for arch in cfg.architectures:
        for method in E3_METHODS:
            per_seed = []
            for s in seeds:
                hist, final, secs = _e3_train(cfg, arch, method, X, Xt, cfg.epochs, s)
                per_seed.append({"seed": s, "test_mse": final["mse"], "test_fvu": final["fvu"], "test_l0": final["l0"],
                                 "pct_nonzero": 100.0 * final["l0"] / cfg.d_sae,
                                 "dead_features": final["dead_features"], "seconds": secs,
                                 "test_mse_curve": list(hist["test_mse"])})
                log.info("E3 %s/%s seed %d: test mse %.4f l0 %.1f", arch, method, s, final["mse"], final["l0"])
            res["runs"][f"{arch}/{method}"] = {
                "per_seed": per_seed, **{k: cell(p[k] for p in per_seed) for k in metric_keys},
                "test_mse_curve": _curve_summary([p["test_mse_curve"] for p in per_seed])}
    # training-set size: a seeded subset per seed and fraction
    n = X.shape[0]
    for arch in cfg.fraction_architectures:
        res["fractions"][arch] = {m: {} for m in E3_METHODS}
        for f in cfg.fractions:
            m_rows = min(max(int(round(f * n)), cfg.batch_size // 4, 8), n)
            vals: dict[str, list[float]] = {m: [] for m in E3_METHODS}
            for s in seeds:
                idx = torch.randperm(n, generator=torch.Generator().manual_seed(s + 101))[:m_rows]
                for method in E3_METHODS:
                    _, final, _ = _e3_train(cfg, arch, method, X[idx], Xt, cfg.fraction_epochs, s)
                    vals[method].append(final["mse"])
            for method in E3_METHODS:
                res["fractions"][arch][method][f"{f:g}"] = {"n_rows": m_rows, "test_mse": cell(vals[method])}
    # ReLU code sparsity under every method, at several L1 coefficients
    if "relu" in cfg.architectures:
        for l1 in (cfg.relu_l1, *cfg.sparsity_l1s):
            if f"{l1:g}" in res["sparsity"]:
                continue
            entry = {}
            for method in E3_METHODS:
                if l1 == cfg.relu_l1:
                    r = res["runs"][f"relu/{method}"]
                    entry[method] = {"pct_nonzero": r["pct_nonzero"], "test_mse": r["test_mse"]}
                    continue
                pct, mse = [], []
                for s in seeds:
                    _, final, _ = _e3_train(cfg, "relu", method, X, Xt, cfg.epochs, s, l1=l1)
                    pct.append(100.0 * final["l0"] / cfg.d_sae)
                    mse.append(final["mse"])
                entry[method] = {"pct_nonzero": cell(pct), "test_mse": cell(mse)}
            res["sparsity"][f"{l1:g}"] = entry
    res["claims"] = e3_claims(res)
    res["config"] = dataclasses.asdict(cfg)
    for name, fig in e3_figures(res).items():
        save_png(fig, out_dir / f"{name}.png")
    write_json(out_dir / "e3_llm.json", to_jsonable(res))
    write_text(out_dir / "e3_llm_table.md", tables_markdown(e3_tables(out_dir)))
    return res


def e3_claims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Claim rows from the per-seed numbers: PAM-SGD's sample efficiency (smallest training fraction) and
    sparser ReLU codes, for each PAM-SGD variant; verdict by `DIFF_RULE` on the paired per-seed differences."""
    rows = []
    label = {"pam_sgd": "PAM-SGD (default)", "pam_sgd_authors": "PAM-SGD (authors' settings)"}
    for arch, by_method in res["fractions"].items():
        f = min(by_method["sgd"], key=float)
        n_rows = by_method["sgd"][f]["n_rows"]
        for v in PAM_VARIANTS:
            d = [a - b for a, b in zip(by_method["sgd"][f]["test_mse"]["values"],
                                       by_method[v][f]["test_mse"]["values"])]
            s, verdict = diff_verdict(d)
            rows.append({"claim": f"{label[v]} is more sample-efficient than SGD ({ARCH_NAMES.get(arch, arch)} SAE)",
                         "measurement": f"test MSE of SGD minus {label[v]}, {100 * float(f):g}% of the training "
                                        f"tokens ({n_rows} rows)",
                         "value": s, "rule": "holds if the CI is above 0 (PAM lower), does not hold if below, "
                                             "else inconclusive", "verdict": verdict})
    for l1, by_method in res["sparsity"].items():
        for v in PAM_VARIANTS:
            d = [a - b for a, b in zip(by_method["sgd"]["pct_nonzero"]["values"],
                                       by_method[v]["pct_nonzero"]["values"])]
            s, verdict = diff_verdict(d)
            rows.append({"claim": f"{label[v]} gives sparser ReLU codes than SGD (L1 {l1})",
                         "measurement": "% non-zero latents on held-out tokens, SGD minus PAM",
                         "value": s, "rule": "holds if the CI is above 0 (PAM sparser), does not hold if below, "
                                             "else inconclusive", "verdict": verdict})
    return rows


def e3_figures(res: dict[str, Any]) -> dict[str, Any]:
    """{file stem: Figure}: test-MSE curves per epoch, training-set size, ReLU code sparsity (mean and 95% CI)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator

    from splinterp.viz.style import bars_from_zero, integer_ticks, metric_label, plain_log_ticks, style

    what = _describe(res)
    figs = {}
    archs = list(dict.fromkeys(k.split("/")[0] for k in res["runs"]))
    fig = Figure(figsize=(5.5 * len(archs), 4.3))
    for i, arch in enumerate(archs):
        ax = fig.add_subplot(1, len(archs), i + 1)
        for method in E3_METHODS:
            c = res["runs"][f"{arch}/{method}"]["test_mse_curve"]
            x = list(range(1, len(c["mean"]) + 1))
            st = style(method)
            ax.plot(x, c["mean"], **st)
            ax.fill_between(x, c["low"], c["high"], color=st["color"], alpha=0.2, linewidth=0)
        ax.set(title=f"{ARCH_NAMES.get(arch, arch)} SAE, d_sae {res['d_sae']}", xlabel="epoch",
               ylabel=metric_label("test_mse") + " (standardised)")
        integer_ticks(ax, "x")
        ax.legend(fontsize=8)
    fig.suptitle(f"E3: held-out MSE per epoch, mean and 95% CI band; {what}", fontsize=10)
    fig.tight_layout()
    figs["e3_llm_curves"] = fig
    archs = list(res["fractions"])
    fig = Figure(figsize=(5.5 * max(len(archs), 1), 4.3))
    for i, arch in enumerate(archs):
        ax = fig.add_subplot(1, len(archs), i + 1)
        fr = sorted(res["fractions"][arch]["sgd"], key=float)
        rows = [res["fractions"][arch]["sgd"][f]["n_rows"] for f in fr]
        for method in E3_METHODS:
            ss = [res["fractions"][arch][method][f]["test_mse"] for f in fr]
            ax.errorbar(rows, [s["mean"] for s in ss], yerr=yerr(ss), capsize=3, **style(method))
        ax.set(xscale="log", yscale="log", xlabel="training tokens (log scale)",
               ylabel=metric_label("test_mse") + " (standardised)",
               title=f"{ARCH_NAMES.get(arch, arch)} SAE, {res['config']['fraction_epochs']} epochs per run")
        plain_log_ticks(ax, "x", values=rows)
        plain_log_ticks(ax, "y")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.legend(fontsize=8)
    fig.suptitle(f"E3: training-set size, mean ± 95% CI\n{what}", fontsize=10)
    fig.tight_layout()
    figs["e3_llm_training_size"] = fig
    lams = list(res["sparsity"])
    fig = Figure(figsize=(2.5 + 2.0 * max(len(lams), 1), 4.3))
    ax = fig.add_subplot(1, 1, 1)
    w = 0.8 / len(E3_METHODS)
    for j, method in enumerate(E3_METHODS):
        ss = [res["sparsity"][lam][method]["pct_nonzero"] for lam in lams]
        xs = [i + (j - (len(E3_METHODS) - 1) / 2) * w for i in range(len(lams))]
        st = style(method)
        ax.bar(xs, [s["mean"] for s in ss], width=w, yerr=yerr(ss), capsize=3, color=st["color"], label=st["label"])
    ax.set_xticks(range(len(lams)), [f"L1 = {lam}" for lam in lams])
    ax.set(ylabel=metric_label("pct_nonzero") + ", held-out tokens", xlabel="ReLU SAE's L1 coefficient")
    bars_from_zero(ax)
    ax.legend(fontsize=8)
    ax.set_title(f"E3: ReLU SAE code sparsity, mean ± 95% CI\n{what}", fontsize=10)
    fig.tight_layout()
    figs["e3_llm_sparsity"] = fig
    return figs


def e3_tables(folder: str | os.PathLike) -> dict[str, str]:
    """The README tables of E3 rendered from `folder/e3_llm.json`: runs, training_size, sparsity, claims."""
    res = json.loads((Path(folder) / "e3_llm.json").read_text("utf-8"))
    c = res["config"]
    head = (f"{_describe(res)}: {res['n_train']} training / {res['n_test']} held-out tokens (standardised), d_sae "
            f"{res['d_sae']}, k {res['k']}, ReLU L1 {c['relu_l1']:g}, Adam lr {c['lr']:g}, PAM order {c['order']}. "
            "Cells: mean ± 95% CI half-width (n seeds); seeds vary the SAE initialisation and batch order, the "
            f"activations and text split are those of seed {res['data_seed']}.\n\n")
    lines = [head + f"{c['epochs']} epochs on the whole training split:", "",
             "| SAE | method | test MSE | test FVU | L0 | % non-zero | dead latents | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        arch, method = name.split("/")
        specs = (("test_mse", ".4f"), ("test_fvu", ".4f"), ("test_l0", ".1f"), ("pct_nonzero", ".2f"),
                 ("dead_features", ".1f"), ("seconds", ".2g"))
        cells = [format_cell(r[key], spec) for key, spec in specs]
        lines.append(f"| {ARCH_NAMES.get(arch, arch)} | {STYLES[method]['label']} | " + " | ".join(cells) + " |")
    out = {"runs": "\n".join(lines) + "\n"}
    lines = [f"Training-set size: final test MSE after {c['fraction_epochs']} epochs on a random subset (a new one "
             "per seed).", ""]
    for arch, by_method in res["fractions"].items():
        fr = sorted(by_method["sgd"], key=float)
        lines += ["| SAE | method | " + " | ".join(f"{100 * float(f):g}% ({by_method['sgd'][f]['n_rows']} rows)"
                                                  for f in fr) + " |", "|---|---|" + "---|" * len(fr)]
        for method in E3_METHODS:
            lines.append(f"| {ARCH_NAMES.get(arch, arch)} | {STYLES[method]['label']} | "
                         + " | ".join(format_cell(by_method[method][f]["test_mse"], ".4f") for f in fr) + " |")
        lines.append("")
    out["training_size"] = "\n".join(lines)
    if res["sparsity"]:
        lines = ["ReLU code sparsity: % non-zero latents on held-out tokens, and test MSE.", "",
                 "| ReLU L1 | method | % non-zero | test MSE |", "|---|---|---|---|"]
        for lam, by_method in res["sparsity"].items():
            for method in E3_METHODS:
                v = by_method[method]
                lines.append(f"| {lam} | {STYLES[method]['label']} | {format_cell(v['pct_nonzero'], '.1f')} | "
                             f"{format_cell(v['test_mse'], '.4f')} |")
        out["sparsity"] = "\n".join(lines) + "\n"
    out["claims"] = claims_markdown(res["claims"])
    return out



@register("e3_llm", "E3: SGD vs PAM-SGD (default and authors' settings) on real MiniLM activations (offline text): "
          "TopK and ReLU test curves, training-set size, ReLU code sparsity, claims",
          outputs=["e3_llm.json", "e3_llm_table.md", "e3_llm_curves.png", "e3_llm_training_size.png",
                   "e3_llm_sparsity.png"],
          quick_seconds=30, quick_threads=1, tags=("llm",), tables=e3_tables)
def e3_llm_job(out_dir: Path, run: RunSettings) -> dict:
    cfg = dataclasses.replace(llm_config(E3Config.preset, run), seeds=run.seeds)
    res = run_e3(cfg, out_dir)
    return {"layer": res["layer"], "n_train": res["n_train"], "n_test": res["n_test"], "n_seeds": res["n_seeds"],
            "final_test_mse": {k: v["test_mse"]["mean"] for k, v in res["runs"].items()},
            "claims": {r["claim"]: r["verdict"] for r in res["claims"]}}
