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

The activations come from `splinterp.llm` (harvested once per output folder, shared with the other LLM
jobs). Any Hugging Face model id or folder:

    splinterp reproduce --only e3_llm shrinkage --model gpt2 --out out_gpt2 [--quick]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splinterp.atomic import write_json, write_text
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RunSettings, llm_config, register, to_jsonable
from splinterp.llm import LLMContext, LLMDataConfig

log = logging.getLogger(__name__)


@dataclass
class E3Config:
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
    """L1 coefficient of the ReLU SAE's loss (plain sum |z_i|, as the paper), the same for SGD and PAM-SGD."""
    sparsity_l1s: tuple[float, ...] = (1e-3, 3e-3)
    """Extra ReLU L1 coefficients at which the code sparsity of SGD and PAM-SGD is compared (the main
    runs' relu_l1 is always included): which method gives sparser codes depends on the penalty."""
    epochs: int = 8
    """Epochs of the main SGD vs PAM-SGD runs on the whole training split."""
    batch_size: int = 256
    """Mini-batch rows (both methods)."""
    lr: float = 1e-3
    """Adam learning rate of the encoder (both methods) and the decoder (SGD)."""
    order: str = "encoder_first"
    """PAM-SGD order: "encoder_first" (Algorithm C.1) or "decoder_first" (the authors' LLM script)."""
    pam_alpha: float = 1e-6
    """Ridge on W_dec in the decoder solve (sum scale)."""
    fractions: tuple[float, ...] = (0.02, 0.1, 0.3, 1.0)
    """Training-set-size ablation: seeded random subsets of the training split."""
    fraction_epochs: int = 5
    """Epochs of every run of the training-set-size sweep."""
    fraction_architectures: tuple[str, ...] = ("topk", "relu")
    """Architectures of the training-set-size sweep."""
    fraction_pam_alphas: tuple[float, ...] = (100.0,)
    """Extra PAM-SGD runs of the training-set-size sweep with this decoder ridge (sum scale), stored as method
    "pam_sgd_alpha=<alpha>": with few rows the exact decoder solve with a tiny ridge interpolates the training
    set and generalises badly (as in E2)."""
    seed: int = 0
    """Seed of every random choice (text order, initialisation, batch order, subsets)."""
    device: str = "cpu"
    """Torch device the model and the SAEs run on."""
    progress: bool = False
    """Progress bars while training."""

    def __post_init__(self) -> None:
        if not self.architectures or any(a not in ("topk", "topk_abs", "relu") for a in self.architectures):
            raise ConfigError(f"architectures must be among topk, topk_abs, relu; got {self.architectures!r}")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"fractions must lie in (0, 1], got {self.fractions!r}")

    @classmethod
    def quick(cls, **changes: Any) -> E3Config:
        base = cls(data=LLMDataConfig.preset(True), d_sae=128, k=10, epochs=3, batch_size=128, lr=2e-3,
                   fractions=(0.25, 1.0), fraction_epochs=2, fraction_architectures=("topk",), sparsity_l1s=())
        return dataclasses.replace(base, **changes)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, device: str = "cpu", **changes: Any) -> E3Config:
        c = cls.quick() if quick else cls()
        return dataclasses.replace(c, seed=seed, device=device, **changes)


E3_METHODS = ("sgd", "pam_sgd")
E3_LABELS = {"sgd": "SGD", "pam_sgd": "PAM-SGD"}


def _e3_train(cfg: E3Config, arch: str, method: str, X: torch.Tensor, Xt: torch.Tensor, epochs: int,
              alpha: float | None = None, l1: float | None = None):
    from splinterp import SAE, SAEConfig, metrics
    from splinterp.train import PAMConfig, SGDConfig, train_pam_sgd, train_sgd

    sae = SAE(SAEConfig(d_in=X.shape[1], d_sae=cfg.d_sae, architecture=arch,
                        k=cfg.k if arch.startswith("topk") else None, seed=cfg.seed, device=cfg.device,
                        metadata={"layer": cfg.layer, "model_name": cfg.data.model or "minilm", "standardized": True}))
    common = dict(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, eval_train=False,
                  l1_coefficient=(cfg.relu_l1 if l1 is None else l1) if arch == "relu" else 0.0,
                  progress=cfg.progress)
    if method == "sgd":
        hist = train_sgd(sae, X, SGDConfig(**common), eval_data=Xt)
    else:
        a = cfg.pam_alpha if alpha is None else alpha
        hist = train_pam_sgd(sae, X, PAMConfig(**common, order=cfg.order, alpha=a), eval_data=Xt)
    final = metrics.evaluate(sae, Xt)
    return sae, hist, final


def run_e3(cfg: E3Config, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Run E3 into `out_dir`: curves, training-set size, ReLU code sparsity. Returns the results dict."""
    from matplotlib.figure import Figure

    from splinterp.viz.output import save_png

    out_dir = Path(out_dir)
    ctx = LLMContext(out_dir, cfg.data, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    layer = ctx.pick_layer(cfg.layer)
    cfg = dataclasses.replace(cfg, layer=layer)
    X = ctx.train(layer).to(cfg.device)
    Xt = ctx.test(layer)
    res: dict[str, Any] = {"layer": layer, "n_train": int(X.shape[0]), "n_test": int(Xt.shape[0]),
                           "d_in": int(X.shape[1]), "d_sae": cfg.d_sae, "k": cfg.k, "model": cfg.data.model or "minilm",
                           "runs": {}, "fractions": {}}
    curves: dict[str, Any] = {}
    for arch in cfg.architectures:
        for method in E3_METHODS:
            t0 = time.perf_counter()
            _, hist, final = _e3_train(cfg, arch, method, X, Xt, cfg.epochs)
            name = f"{arch}/{method}"
            curves[name] = hist
            res["runs"][name] = {"test_mse": final["mse"], "test_fvu": final["fvu"], "test_l0": final["l0"],
                                 "pct_nonzero": 100.0 * final["l0"] / cfg.d_sae,
                                 "dead_features": final["dead_features"], "seconds": time.perf_counter() - t0,
                                 "test_mse_curve": hist["test_mse"]}
            log.info("E3 %s: test mse %.4f fvu %.4f l0 %.1f", name, final["mse"], final["fvu"], final["l0"])
        r = res["runs"]
        ratio = r[f"{arch}/pam_sgd"]["test_mse"] / r[f"{arch}/sgd"]["test_mse"]
        res[f"{arch}_pam_improvement_pct"] = 100.0 * (1 - ratio)
    # training-set size
    n = X.shape[0]
    for arch in cfg.fraction_architectures:
        for f in cfg.fractions:
            m = max(int(round(f * n)), cfg.batch_size // 4, 8)
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 101))[:m]
            runs = [(mt, None) for mt in E3_METHODS] + [("pam_sgd", a) for a in cfg.fraction_pam_alphas]
            for method, alpha in runs:
                _, _, final = _e3_train(cfg, arch, method, X[idx], Xt, cfg.fraction_epochs, alpha)
                key = method if alpha is None else f"pam_sgd_alpha={alpha:g}"
                res["fractions"][f"{arch}/{key}/{f:g}"] = {"n_rows": int(m), "test_mse": final["mse"],
                                                           "test_fvu": final["fvu"], "test_l0": final["l0"]}
    # figures
    fig = Figure(figsize=(5.5 * len(cfg.architectures), 4))
    for i, arch in enumerate(cfg.architectures):
        ax = fig.add_subplot(1, len(cfg.architectures), i + 1)
        for method in E3_METHODS:
            y = curves[f"{arch}/{method}"]["test_mse"]
            ax.plot(range(1, len(y) + 1), y, marker="o", ms=3, label=E3_LABELS[method])
        ax.set(title=f"{arch} (layer {cfg.layer}, d_sae {cfg.d_sae})", xlabel="epoch", ylabel="test mse (standardised)",
               yscale="log")
        ax.legend()
    fig.tight_layout()
    save_png(fig, out_dir / "e3_llm_curves.png")
    fig = Figure(figsize=(5.5 * len(cfg.fraction_architectures), 4))
    for i, arch in enumerate(cfg.fraction_architectures):
        ax = fig.add_subplot(1, len(cfg.fraction_architectures), i + 1)
        for key in list(E3_METHODS) + [f"pam_sgd_alpha={a:g}" for a in cfg.fraction_pam_alphas]:
            ys = [res["fractions"][f"{arch}/{key}/{f:g}"]["test_mse"] for f in cfg.fractions]
            label = E3_LABELS.get(key, key.replace("pam_sgd_alpha=", "PAM-SGD, ridge alpha="))
            ax.plot([100 * f for f in cfg.fractions], ys, marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="% of the training split", ylabel="final test mse",
               title=f"{arch}: training-set size ({cfg.fraction_epochs} epochs)")
        ax.legend()
    fig.tight_layout()
    save_png(fig, out_dir / "e3_llm_training_size.png")
    # ReLU code sparsity under both methods, at several L1 coefficients
    res["sparsity"] = {}
    if "relu" in cfg.architectures:
        res["sparsity"][f"{cfg.relu_l1:g}"] = {m: {k: res["runs"][f"relu/{m}"][k] for k in ("pct_nonzero", "test_mse")}
                                               for m in E3_METHODS}
        for l1 in cfg.sparsity_l1s:
            if f"{l1:g}" in res["sparsity"]:
                continue
            res["sparsity"][f"{l1:g}"] = {}
            for method in E3_METHODS:
                _, _, final = _e3_train(cfg, "relu", method, X, Xt, cfg.epochs, l1=l1)
                res["sparsity"][f"{l1:g}"][method] = {"pct_nonzero": 100.0 * final["l0"] / cfg.d_sae,
                                                      "test_mse": final["mse"]}
    fig = Figure(figsize=(1.8 + 1.6 * max(len(res["sparsity"]), 1), 4))
    ax = fig.add_subplot(1, 1, 1)
    lams = list(res["sparsity"])
    for j, method in enumerate(E3_METHODS):
        vals = [res["sparsity"][lam][method]["pct_nonzero"] for lam in lams]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(lams))]
        ax.bar(xs, vals, width=0.38, label=E3_LABELS[method], color=["#1f77b4", "#d62728"][j])
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(lams)), [f"L1 {lam}" for lam in lams])
    ax.set(ylabel="% non-zero latents (held-out tokens)", title="ReLU SAE code sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out_dir / "e3_llm_sparsity.png")
    res["relu_pct_nonzero"] = {lam: {m: v[m]["pct_nonzero"] for m in E3_METHODS} for lam, v in res["sparsity"].items()}
    res["config"] = dataclasses.asdict(cfg)
    write_text(out_dir / "e3_llm_table.md", _e3_markdown(cfg, res))
    write_json(out_dir / "e3_llm.json", to_jsonable(res))
    return res


def _e3_markdown(cfg: E3Config, res: dict[str, Any]) -> str:
    lines = [f"Layer {res['layer']}, {res['n_train']} training / {res['n_test']} held-out tokens (standardised), "
             f"d_sae {cfg.d_sae}, k {cfg.k}, ReLU L1 {cfg.relu_l1:g}, {cfg.epochs} epochs, Adam lr {cfg.lr:g}, "
             f"PAM order {cfg.order}, ridge alpha {cfg.pam_alpha:g}.", "",
             "| SAE | method | test mse | test FVU | L0 | % non-zero | dead | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        arch, method = name.split("/")
        lines.append(f"| {arch} | {E3_LABELS[method]} | {r['test_mse']:.4f} | {r['test_fvu']:.4f} | "
                     f"{r['test_l0']:.1f} | {r['pct_nonzero']:.2f} | {r['dead_features']} | {r['seconds']:.1f} |")
    if res.get("sparsity"):
        lines += ["", "ReLU code sparsity, % non-zero latents on held-out tokens (test mse):", "",
                  "| ReLU L1 | SGD | PAM-SGD |", "|---|---|---|"]
        for lam, v in res["sparsity"].items():
            lines.append(f"| {lam} | {v['sgd']['pct_nonzero']:.1f}% ({v['sgd']['test_mse']:.4f}) | "
                         f"{v['pam_sgd']['pct_nonzero']:.1f}% ({v['pam_sgd']['test_mse']:.4f}) |")
    lines += ["", f"Training-set size ({cfg.fraction_epochs} epochs each), final test mse:", ""]
    keys = sorted({k.rsplit("/", 1)[0] for k in res["fractions"]})
    lines += ["| SAE / method | " + " | ".join(f"{100 * f:g}%" for f in cfg.fractions) + " |",
              "|---|" + "---|" * len(cfg.fractions)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{res['fractions'][f'{k}/{f:g}']['test_mse']:.4f}"
                                              for f in cfg.fractions) + " |")
    return "\n".join(lines) + "\n"


@register("e3_llm", "E3: PAM-SGD vs SGD on real MiniLM activations (offline text): TopK and ReLU test curves, "
          "training-set size, ReLU code sparsity",
          outputs=["e3_llm.json", "e3_llm_table.md", "e3_llm_curves.png", "e3_llm_training_size.png",
                   "e3_llm_sparsity.png"],
          quick_seconds=30, quick_threads=1, tags=("llm",))
def e3_llm_job(out_dir: Path, run: RunSettings) -> dict:
    res = run_e3(llm_config(E3Config.preset, run), out_dir)
    keep = ("layer", "n_train", "n_test", "topk_pam_improvement_pct", "relu_pam_improvement_pct", "relu_pct_nonzero")
    out = {k: res[k] for k in keep if k in res}
    out["final_test_mse"] = {k: v["test_mse"] for k, v in res["runs"].items()}
    return out
