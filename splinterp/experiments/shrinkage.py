"""Shrinkage: ReLU vs Gated vs JumpReLU vs TopK SAEs at similar L0 on real transformer activations.

The Gated SAE paper's point (Rajamanoharan et al. 2024): an L1 penalty makes a ReLU SAE *shrink* its codes,
so reconstructions come out too small: the relative reconstruction bias gamma = E|x_hat|^2 / E<x, x_hat>
(`splinterp.metrics`, SAELens's `relative_reconstruction_bias`) is below 1. Gated and JumpReLU SAEs decide
*which* latents fire apart from *how much*, and TopK has no magnitude penalty at all, so they should sit at
gamma ~ 1 and recover more of the model's loss at the same L0.

What is measured, per architecture, over a sweep of its sparsity knob (Pareto sweep):
- L0, FVU and gamma on the held-out (standardised) tokens of `layer`;
- loss recovered with the SAE spliced into the model after block `layer` (`splinterp.evals`; the SAE's
  standardiser is inverted inside the splice). For a causal LM that is `ce_loss_score`. The offline
  MiniLM has no LM head, so it is **`emb_loss_score`, the sentence-embedding version of loss recovered**:
  (D_ablation - D_sae) / D_ablation with D the mean squared distance between the clean sentence embedding
  and the spliced one (1 = the embedding is untouched, 0 = as bad as zero-ablating the layer). It is
  measured on held-out texts (never harvested for training) and is not comparable with CE numbers.
"At similar L0": per architecture the sweep point whose L0 is nearest (in log scale) to `target_l0`.

Sparsity knobs: relu `l1_coefficient` (L1 weighted by the decoder row norms, SAELens's standard SAE, so
the decoder cannot grow to dodge the penalty); gated `l1_coefficient` (its gate L1, with the frozen-decoder
auxiliary loss); jumprelu the L0 coefficient (straight-through estimator, rectangle kernel of width
`jumprelu_bandwidth`, raw thresholds); topk `k`. See `splinterp.train.gated` / `splinterp.train.jumprelu`.

API: `ShrinkageConfig` (+ `quick()`, `preset()`), `run_shrinkage(cfg, out_dir)`; job `shrinkage`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splinterp.atomic import write_json, write_text
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RunSettings, llm_config, register, to_jsonable
from splinterp.llm import LLMContext, LLMDataConfig, SweepPointConfig, knob_name

log = logging.getLogger(__name__)

ARCHS = ("relu", "gated", "jumprelu", "topk")
LOSS_METRICS = ("auto", "embedding", "ce")
COLORS = {"relu": "#1f77b4", "gated": "#2ca02c", "jumprelu": "#9467bd", "topk": "#d62728", "topk_abs": "#ff7f0e"}


def default_sweeps(quick: bool) -> dict[str, tuple[float, ...]]:
    """Sparsity knob values per architecture (tuned on MiniLM block 3 so that each sweep spans the TopK L0s
    around `target_l0` with the default training budget)."""
    if quick:
        return {"relu": (0.003, 0.01), "gated": (0.01, 0.05), "jumprelu": (3e-4, 1e-3), "topk": (4, 8)}
    return {"relu": (0.002, 0.004, 0.008), "gated": (0.01, 0.02, 0.03), "jumprelu": (1e-4, 1e-3, 1e-2),
            "topk": (16, 32, 64)}


@dataclass
class ShrinkageConfig:
    """Settings of the shrinkage job. Defaults are the full run; `quick()` is the small preset."""

    data: LLMDataConfig = field(default_factory=LLMDataConfig)
    """Which model, texts, layers and split the activations come from (see `splinterp.llm.LLMDataConfig`)."""
    layer: int | None = None
    """Block the SAEs are trained on and spliced after; None = the middle block of the cache."""
    target_l0: float = 32.0
    """The L0 at which architectures are compared (the nearest sweep point of each)."""
    sweeps: dict[str, tuple[float, ...]] = field(default_factory=lambda: default_sweeps(False))
    """{architecture: sparsity knob values}: l1 (relu, gated), L0 coefficient (jumprelu), k (topk)."""
    training: SweepPointConfig = field(default_factory=SweepPointConfig)
    """How each sweep point is trained (its `sparse_start_l0` should be `target_l0`)."""
    loss_metric: str = "auto"
    """"embedding" (sentence-embedding loss recovered), "ce" (causal LMs) or "auto": CE when the model has
    an LM head, the embedding version otherwise (the offline MiniLM)."""
    embedding_distance: str = "mse"
    """Distance between sentence embeddings of the embedding loss recovered: 'mse' or 'cos'."""
    seed: int = 0
    """Seed of every random choice (text order, initialisation, batch order, subsets)."""
    device: str = "cpu"
    """Torch device the model and the SAEs run on."""
    progress: bool = False
    """Progress bars while training."""

    def __post_init__(self) -> None:
        unknown = set(self.sweeps) - set(ARCHS) - {"topk_abs"}
        if unknown or not self.sweeps:
            raise ConfigError(f"sweeps must map architectures among {ARCHS} to values, got {sorted(self.sweeps)}")
        if self.loss_metric not in LOSS_METRICS:
            raise ConfigError(f"loss_metric must be one of {LOSS_METRICS}, got {self.loss_metric!r}")
        if not self.target_l0 > 0:
            raise ConfigError(f"target_l0 must be > 0, got {self.target_l0!r}")

    @classmethod
    def quick(cls, **changes: Any) -> ShrinkageConfig:
        base = cls(data=LLMDataConfig.preset(True), target_l0=8.0, sweeps=default_sweeps(True),
                   training=SweepPointConfig.preset(True))
        return dataclasses.replace(base, **changes)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, device: str = "cpu", **changes: Any) -> ShrinkageConfig:
        c = cls.quick() if quick else cls()
        return dataclasses.replace(c, seed=seed, device=device, **changes)


class LossRecovered:
    """Loss recovered of SAEs spliced after one block: CE score for causal LMs, embedding score otherwise."""

    def __init__(self, ctx: LLMContext, metric: str = "auto", distance: str = "mse"):
        from splinterp.data.harvest import load_model

        self.ctx, self.distance = ctx, distance
        model = ctx.data.model
        self.kind = metric
        self.model = self.tok = None
        if metric in ("auto", "ce") and model is not None:
            try:
                self.model, self.tok, _ = load_model(model, ctx.device, causal_lm=True)
                self.kind = "ce"
            except ConfigError as e:
                if metric == "ce":
                    raise
                log.warning("%s has no causal-LM head (%s); using the sentence-embedding loss recovered", model, e)
        elif metric == "ce":
            raise ConfigError("loss_metric='ce' needs a causal LM; the offline MiniLM has no LM head")
        if self.model is None:
            self.model, self.tok, _ = load_model(model, ctx.device)
            self.kind = "embedding"
        self.texts = ctx.eval_texts()

    @property
    def key(self) -> str:
        return "ce_loss_score" if self.kind == "ce" else "emb_loss_score"

    def __call__(self, sae: Any, layer: int) -> dict[str, Any]:
        from splinterp.evals import ce_loss_score, embedding_loss_score

        common = dict(texts=self.texts, max_length=self.ctx.data.max_length,
                      standardizer=self.ctx.standardizer(layer), device=self.ctx.device, seed=self.ctx.seed)
        sae.eval()
        if self.kind == "ce":
            return ce_loss_score(self.model, self.tok, sae, layer, include_kl=True, **common)
        return embedding_loss_score(self.model, self.tok, sae, layer, metric=self.distance, **common)


def _nearest(points: list[dict[str, Any]], target: float) -> dict[str, Any]:
    return min(points, key=lambda p: abs(math.log(max(p["l0"], 1e-9) / target)))


def _md_table(rows: list[dict[str, Any]], loss_key: str) -> str:
    head = f"| architecture | knob | L0 | FVU | gamma (rel. reconstruction bias) | l2_ratio | {loss_key} |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['knob']}={r['value']:g} | {r['l0']:.1f} | {r['fvu']:.3f} | "
                     f"{r['gamma']:.3f} | {r['l2_ratio']:.3f} | {r['loss_recovered']:.3f} |")
    return "\n".join(lines) + "\n"


def run_shrinkage(cfg: ShrinkageConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train the sweep, measure gamma / L0 / FVU / loss recovered, write the plots and tables."""
    from matplotlib.figure import Figure

    from splinterp.viz.output import save_png

    out_dir = Path(out_dir)
    ctx = LLMContext(out_dir, cfg.data, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    cfg = dataclasses.replace(cfg, layer=ctx.pick_layer(cfg.layer))
    lr_eval = LossRecovered(ctx, cfg.loss_metric, cfg.embedding_distance)
    points: dict[str, list[dict[str, Any]]] = {}
    for arch, values in cfg.sweeps.items():
        for v in values:
            t = cfg.training.train(ctx, arch, v, cfg.layer, seed=cfg.seed, progress=cfg.progress)
            m = t.final[str(cfg.layer)]
            lr_res = lr_eval(t.sae, cfg.layer)
            p = {"architecture": arch, "knob": knob_name(arch), "value": float(v),
                 "l0": m["l0"], "fvu": m["fvu"], "gamma": m["relative_reconstruction_bias"],
                 "l2_ratio": m["l2_ratio"], "dead_features": m["dead_features"],
                 "loss_recovered": lr_res[lr_eval.key], "loss_eval": {k: v2 for k, v2 in lr_res.items()},
                 "train_seconds": t.train_seconds, "reused": t.reused}
            log.info("shrinkage %s %s=%g: l0 %.1f fvu %.3f gamma %.3f %s %.3f", arch, p["knob"], v, p["l0"],
                     p["fvu"], p["gamma"], lr_eval.key, p["loss_recovered"])
            points.setdefault(arch, []).append(p)
    matched = [_nearest(pts, cfg.target_l0) for pts in points.values()]
    all_rows = [p for pts in points.values() for p in pts]
    # figures: Pareto (L0 vs loss recovered, L0 vs FVU), shrinkage (gamma vs L0 + matched bars)
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for arch, pts in points.items():
        pts = sorted(pts, key=lambda p: p["l0"])
        xs = [p["l0"] for p in pts]
        ax1.plot(xs, [p["loss_recovered"] for p in pts], marker="o", color=COLORS.get(arch), label=arch)
        ax2.plot(xs, [p["fvu"] for p in pts], marker="o", color=COLORS.get(arch), label=arch)
    ax1.set(xscale="log", xlabel="L0 (held-out tokens)", ylabel=lr_eval.key,
            title=f"loss recovered vs L0 (layer {cfg.layer})")
    ax2.set(xscale="log", yscale="log", xlabel="L0", ylabel="FVU (held-out tokens)", title="FVU vs L0")
    for ax in (ax1, ax2):
        ax.axvline(cfg.target_l0, color="0.6", ls=":", lw=1)
        ax.legend()
    fig.tight_layout()
    save_png(fig, out_dir / "shrinkage_pareto.png")
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for arch, pts in points.items():
        pts = sorted(pts, key=lambda p: p["l0"])
        ax1.plot([p["l0"] for p in pts], [p["gamma"] for p in pts], marker="o", color=COLORS.get(arch), label=arch)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set(xscale="log", xlabel="L0", ylabel="gamma = E|x_hat|^2 / E<x, x_hat>",
            title="shrinkage (gamma < 1 = shrunk)")
    ax1.legend()
    names = [f"{r['architecture']}\nL0={r['l0']:.0f}" for r in matched]
    ax2.bar(names, [r["gamma"] for r in matched], color=[COLORS.get(r["architecture"]) for r in matched])
    ax2.axhline(1.0, color="k", lw=0.8)
    lo = min(r["gamma"] for r in matched)
    ax2.set(ylim=(min(0.9 * lo, 0.95), max(1.05, 1.02 * max(r["gamma"] for r in matched))),
            ylabel="gamma", title=f"at L0 near {cfg.target_l0:g}")
    fig.tight_layout()
    save_png(fig, out_dir / "shrinkage_gamma.png")
    md = (f"Layer {cfg.layer}, d_sae {cfg.training.d_sae}, held-out tokens; loss recovered = `{lr_eval.key}`"
          f"{' (sentence-embedding version)' if lr_eval.kind == 'embedding' else ''}.\n\n"
          f"At L0 near {cfg.target_l0:g}:\n\n" + _md_table(matched, lr_eval.key)
          + "\nFull sweep (Pareto):\n\n" + _md_table(sorted(all_rows, key=lambda r: (r["architecture"], r["l0"])),
                                                    lr_eval.key))
    write_text(out_dir / "shrinkage_table.md", md)
    res = {"layer": cfg.layer, "d_sae": cfg.training.d_sae, "target_l0": cfg.target_l0, "loss_metric": lr_eval.key,
           "model": cfg.data.model or "minilm", "matched": matched, "sweep": all_rows,
           "config": dataclasses.asdict(cfg)}
    write_json(out_dir / "shrinkage.json", to_jsonable(res))
    return res


@register("shrinkage", "Shrinkage: relu vs gated vs jumprelu vs topk at similar L0 on MiniLM activations: gamma "
      "(relative reconstruction bias), L0, FVU, loss recovered (sentence-embedding version); Pareto sweep",
      outputs=["shrinkage.json", "shrinkage_table.md", "shrinkage_pareto.png", "shrinkage_gamma.png"],
      quick_seconds=40, quick_threads=1, tags=("llm",))
def shrinkage_job(out_dir: Path, run: RunSettings) -> dict:
    res = run_shrinkage(llm_config(ShrinkageConfig.preset, run), out_dir)
    return {"loss_metric": res["loss_metric"], "target_l0": res["target_l0"],
            "matched": {r["architecture"]: {k: r[k] for k in ("value", "l0", "fvu", "gamma", "loss_recovered")}
                        for r in res["matched"]}}
