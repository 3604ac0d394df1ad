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
"At similar L0": per architecture the sweep point whose mean L0 over seeds is nearest (in log scale) to
`target_l0`; the figures and tables state the L0 each matched point actually has. "Pareto-better than ReLU":
per seed, the architecture's FVU (and loss recovered) interpolated linearly in log L0 between its sweep points
at the L0 of ReLU's matched point, against ReLU's own; no extrapolation outside the sweep.

Seeds: every sweep point is trained once per seed (initialisation and batch order); the activations, the text
split and the held-out texts of the loss-recovered eval are those of the first seed.

Sparsity knobs: relu `l1_coefficient` (L1 weighted by the decoder row norms, SAELens's standard SAE, so
the decoder cannot grow to dodge the penalty); gated `l1_coefficient` (its gate L1, with the frozen-decoder
auxiliary loss); jumprelu the L0 coefficient (straight-through estimator, rectangle kernel of width
`jumprelu_bandwidth`, raw thresholds); topk `k`. See `splinterp.train.gated` / `splinterp.train.jumprelu`.

API: `ShrinkageConfig` (+ `quick()`, `preset()`), `run_shrinkage(cfg, out_dir)`; job `shrinkage`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splinterp.atomic import write_json, write_text
from splinterp.claims import (
    cell,
    claims_markdown,
    diff_verdict,
    format_cell,
    interval_verdict,
    seeds_phrase,
    tables_markdown,
    yerr,
)
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RepeatedOverSeeds, RunSettings, llm_config, register, to_jsonable
from splinterp.llm import LLMContext, LLMDataConfig, SweepPointConfig, knob_name

log = logging.getLogger(__name__)

ARCHS = ("relu", "gated", "jumprelu", "topk")
LOSS_METRICS = ("auto", "embedding", "ce")
GAMMA_NEAR_ONE = (0.95, 1.05)
"""The band of gamma read as "no shrinkage" by the claims table."""


def default_sweeps(quick: bool) -> dict[str, tuple[float, ...]]:
    """Sparsity knob values per architecture (tuned on MiniLM block 3 so that each sweep spans the TopK L0s
    around `target_l0` with the default training budget)."""
    if quick:
        # (the quick budget is too short for JumpReLU's thresholds to follow its coefficient: its L0 stays
        # near where the sparse start put it, 12-14 for any coefficient from 1e-3 to 1)
        return {"relu": (0.005, 0.01, 0.02), "gated": (0.01, 0.02, 0.03), "jumprelu": (1e-3, 0.1),
                "topk": (4, 8, 16)}
    return {"relu": (0.002, 0.004, 0.008), "gated": (0.01, 0.02, 0.03), "jumprelu": (1e-4, 1e-3, 1e-2),
            "topk": (16, 32, 64)}


@dataclass
class ShrinkageConfig(RepeatedOverSeeds):
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
    """Seed of the data: text order, train/test split, held-out texts (the first of `seeds`)."""
    seeds: tuple[int, ...] | None = None
    """Seeds of the SAE trainings (initialisation, batch order), every sweep point trained once per seed;
    None = (seed,)."""
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
        self.check_seeds()

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


POINT_METRICS = ("l0", "fvu", "gamma", "l2_ratio", "loss_recovered", "dead_features")
ARCH_LABEL = {"relu": "ReLU", "gated": "Gated", "jumprelu": "JumpReLU", "topk": "TopK", "topk_abs": "TopK |u|"}


def _nearest(points: list[dict[str, Any]], target: float) -> dict[str, Any]:
    return min(points, key=lambda p: abs(math.log(max(p["l0"]["mean"], 1e-9) / target)))


def _interp_log_l0(l0s: list[float], ys: list[float], at: float) -> float | None:
    """y at L0 = `at`, linear in log L0 between the sweep points around it; None outside the sweep."""
    import numpy as np

    pts = sorted(zip(l0s, ys))
    xs = [math.log(max(x, 1e-9)) for x, _ in pts]
    x = math.log(max(at, 1e-9))
    if not xs[0] <= x <= xs[-1]:
        return None
    return float(np.interp(x, xs, [y for _, y in pts]))


def _point_row(p: dict[str, Any]) -> str:
    return (f"| {ARCH_LABEL.get(p['architecture'], p['architecture'])} | {p['knob']}={p['value']:g} | "
            f"{format_cell(p['l0'], '.1f')} | {format_cell(p['fvu'], '.3f')} | {format_cell(p['gamma'], '.3f')} | "
            f"{format_cell(p['l2_ratio'], '.3f')} | {format_cell(p['loss_recovered'], '.3f')} |")


def _md_table(points: list[dict[str, Any]], loss_key: str) -> str:
    lines = [f"| architecture | knob | L0 | FVU | gamma (rel. reconstruction bias) | l2_ratio | {loss_key} |",
             "|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [_point_row(p) for p in points]) + "\n"


def shrinkage_claims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Claim rows: ReLU shrinks (gamma < 1); Gated / JumpReLU / TopK have gamma near 1 at
    ReLU's L0; Gated /
    JumpReLU / TopK are Pareto-better than ReLU (FVU and loss recovered at ReLU's L0, per seed)."""
    matched = {p["architecture"]: p for p in res["matched"]}
    lo, hi = GAMMA_NEAR_ONE
    rows = []
    if "relu" in matched:
        r = matched["relu"]
        s, verdict = diff_verdict([1 - g for g in r["gamma"]["values"]])
        rows.append({"claim": "an L1 penalty shrinks ReLU codes (gamma < 1)",
                     "measurement": f"1 - gamma of ReLU at L0 {r['l0']['mean']:.1f} ({r['knob']}={r['value']:g})",
                     "value": s, "rule": "holds if the CI is above 0, does not hold if below, else inconclusive",
                     "verdict": verdict})
    if "relu" not in matched:
        return rows
    relu = matched["relu"]
    seeds = res["seeds"]

    def at_relu_l0(pts: list[dict[str, Any]], metric: str) -> list[float] | None:
        out = []
        for i in range(len(seeds)):
            y = _interp_log_l0([p["l0"]["values"][i] for p in pts], [p[metric]["values"][i] for p in pts],
                               relu["l0"]["values"][i])
            if y is None:
                return None
            out.append(y)
        return out

    for arch in ("gated", "jumprelu", "topk"):
        pts = [p for p in res["sweep"] if p["architecture"] == arch]
        if not pts:
            continue
        g = at_relu_l0(pts, "gamma")
        claim = f"{ARCH_LABEL[arch]} removes shrinkage (gamma near 1) at ReLU's L0"
        rule = f"holds if the CI lies in [{lo:g}, {hi:g}], does not hold if it lies outside, else inconclusive"
        if g is None:  # fall back on the matched point, and say so
            p = matched[arch]
            rows.append({"claim": claim, "measurement": f"gamma at its own matched L0 {p['l0']['mean']:.1f} "
                                                        f"({p['knob']}={p['value']:g}): ReLU's L0 "
                                                        f"{relu['l0']['mean']:.1f} is outside its sweep",
                         "value": p["gamma"], "rule": rule, "verdict": interval_verdict(p["gamma"], lo, hi)})
        else:
            s = cell(g)
            rows.append({"claim": claim, "measurement": f"gamma interpolated (log L0) at ReLU's L0 "
                                                        f"{relu['l0']['mean']:.1f}", "value": s, "rule": rule,
                         "verdict": interval_verdict(s, lo, hi)})
        for metric, better, what in (("fvu", -1, "FVU"), ("loss_recovered", 1, res["loss_metric"])):
            ys = at_relu_l0(pts, metric)
            d = None if ys is None else [better * (y - r) for y, r in zip(ys, relu[metric]["values"])]
            claim = f"{ARCH_LABEL[arch]} is Pareto-better than ReLU ({what})"
            meas = (f"{what} of {ARCH_LABEL[arch]} interpolated at ReLU's L0 ({relu['l0']['mean']:.1f}), "
                    f"{'ReLU minus it' if better < 0 else 'minus ReLU'}")
            rule = "holds if the CI is above 0, does not hold if below, else inconclusive"
            if d is None:
                rows.append({"claim": claim, "measurement": meas, "value": None, "rule": rule,
                             "verdict": f"inconclusive (ReLU's L0 outside the {ARCH_LABEL[arch]} sweep)"})
                continue
            s, verdict = diff_verdict(d)
            rows.append({"claim": claim, "measurement": meas, "value": s, "rule": rule, "verdict": verdict})
    return rows


def run_shrinkage(cfg: ShrinkageConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train the sweep over seeds, measure gamma / L0 / FVU / loss recovered, write the plots and tables."""
    from splinterp.viz.output import save_png

    out_dir = Path(out_dir)
    ctx = LLMContext(out_dir, cfg.data, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    cfg = dataclasses.replace(cfg, layer=ctx.pick_layer(cfg.layer))
    lr_eval = LossRecovered(ctx, cfg.loss_metric, cfg.embedding_distance)
    seeds = cfg.run_seeds
    sweep: list[dict[str, Any]] = []
    for arch, values in cfg.sweeps.items():
        for v in values:
            per_seed = []
            for s in seeds:
                t = cfg.training.train(ctx, arch, v, cfg.layer, seed=s, progress=cfg.progress)
                m = t.final[str(cfg.layer)]
                lr_res = lr_eval(t.sae, cfg.layer)
                per_seed.append({"seed": s, "l0": m["l0"], "fvu": m["fvu"], "gamma": m["relative_reconstruction_bias"],
                                 "l2_ratio": m["l2_ratio"], "dead_features": m["dead_features"],
                                 "loss_recovered": lr_res[lr_eval.key], "loss_eval": dict(lr_res),
                                 "train_seconds": t.train_seconds, "reused": t.reused})
                log.info("shrinkage %s %s=%g seed %d: l0 %.1f fvu %.3f gamma %.3f", arch, knob_name(arch), v, s,
                         m["l0"], m["fvu"], m["relative_reconstruction_bias"])
            sweep.append({"architecture": arch, "knob": knob_name(arch), "value": float(v), "per_seed": per_seed,
                          **{k: cell(p[k] for p in per_seed) for k in POINT_METRICS}})
    matched = [_nearest([p for p in sweep if p["architecture"] == a], cfg.target_l0) for a in cfg.sweeps]
    res = {"layer": cfg.layer, "d_sae": cfg.training.d_sae, "target_l0": cfg.target_l0, "loss_metric": lr_eval.key,
           "loss_kind": lr_eval.kind, "model": cfg.data.model or "minilm", "seeds": list(seeds),
           "n_seeds": len(seeds), "data_seed": cfg.seed, "matched": matched, "sweep": sweep,
           "config": dataclasses.asdict(cfg)}
    res["claims"] = shrinkage_claims(res)
    for name, fig in shrinkage_figures(res).items():
        save_png(fig, out_dir / f"{name}.png")
    write_json(out_dir / "shrinkage.json", to_jsonable(res))
    write_text(out_dir / "shrinkage_table.md",
               tables_markdown(shrinkage_tables(out_dir)))
    return res


def _describe(res: dict[str, Any]) -> str:
    model = "all-MiniLM-L6-v2" if res["model"] == "minilm" else res["model"]
    return (f"{model}, block {res['layer']} resid_post, d_sae {res['d_sae']}, held-out tokens of the offline text "
            f"({seeds_phrase(res['n_seeds'])})")


def shrinkage_figures(res: dict[str, Any]) -> dict[str, Any]:
    """{file stem: Figure}: the Pareto sweep (loss recovered and FVU vs L0) and gamma (vs L0, and at the matched
    points, bars from 0 with the 95% CI and the actual L0 under each bar)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator

    from splinterp.viz.style import bars_from_zero, metric_label, plain_log_ticks, style

    what = _describe(res)
    archs = list(dict.fromkeys(p["architecture"] for p in res["sweep"]))
    loss_label = ("loss recovered (sentence-embedding version)" if res.get("loss_kind") == "embedding"
                  else "loss recovered (CE)")
    figs = {}
    fig = Figure(figsize=(11, 4.5))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for arch in archs:
        pts = sorted((p for p in res["sweep"] if p["architecture"] == arch), key=lambda p: p["l0"]["mean"])
        xs = [p["l0"]["mean"] for p in pts]
        xerr = yerr([p["l0"] for p in pts])
        for ax, key in ((ax1, "loss_recovered"), (ax2, "fvu")):
            ss = [p[key] for p in pts]
            ax.errorbar(xs, [s["mean"] for s in ss], xerr=xerr, yerr=yerr(ss), capsize=2,
                        **style(arch, label=ARCH_LABEL.get(arch, arch)))
    ax1.set(xscale="log", xlabel=metric_label("l0"), ylabel=loss_label, title="loss recovered vs L0 (higher is better)")
    ax2.set(xscale="log", xlabel=metric_label("l0"), ylabel=metric_label("fvu"), title="FVU vs L0 (lower is better)")
    for ax in (ax1, ax2):
        ax.axvline(res["target_l0"], color="0.6", ls=":", lw=1, label=f"target L0 = {res['target_l0']:g}")
        plain_log_ticks(ax, "x")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.legend(fontsize=8)
    fig.suptitle(f"Shrinkage sweep, mean ± 95% CI: {what}", fontsize=10)
    fig.tight_layout()
    figs["shrinkage_pareto"] = fig
    fig = Figure(figsize=(11, 4.5))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for arch in archs:
        pts = sorted((p for p in res["sweep"] if p["architecture"] == arch), key=lambda p: p["l0"]["mean"])
        ax1.errorbar([p["l0"]["mean"] for p in pts], [p["gamma"]["mean"] for p in pts],
                     yerr=yerr([p["gamma"] for p in pts]), capsize=2, **style(arch, label=ARCH_LABEL.get(arch, arch)))
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhspan(*GAMMA_NEAR_ONE, color="0.85", zorder=0, label=rf"$\gamma$ in {list(GAMMA_NEAR_ONE)}")
    ax1.set(xscale="log", xlabel=metric_label("l0"),
            ylabel=r"shrinkage $\gamma = E|\hat x|^2 / E\langle x, \hat x\rangle$",
            title=r"$\gamma$ vs L0 ($\gamma$ < 1: codes shrunk)")
    plain_log_ticks(ax1, "x")
    ax1.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.legend(fontsize=8)
    m = res["matched"]
    names = [f"{ARCH_LABEL.get(r['architecture'], r['architecture'])}\nL0 = {r['l0']['mean']:.1f}" for r in m]
    ax2.bar(names, [r["gamma"]["mean"] for r in m], yerr=yerr([r["gamma"] for r in m]), capsize=4,
            color=[style(r["architecture"])["color"] for r in m])
    ax2.axhline(1.0, color="k", lw=0.8)
    bars_from_zero(ax2)
    ax2.set(ylabel=r"shrinkage $\gamma$",
            title=f"at each sweep's point nearest L0 = {res['target_l0']:g}\n(actual L0 under each bar)")
    fig.suptitle(f"Shrinkage, mean ± 95% CI: {what}", fontsize=10)
    fig.tight_layout()
    figs["shrinkage_gamma"] = fig
    return figs


def shrinkage_tables(folder: str | os.PathLike) -> dict[str, str]:
    """The README tables of the shrinkage job from `folder/shrinkage.json`: matched, sweep, claims."""
    res = json.loads((Path(folder) / "shrinkage.json").read_text("utf-8"))
    loss = f"`{res['loss_metric']}`" + (" (sentence-embedding version)" if res.get("loss_kind") == "embedding"
                                        else "")
    head = (f"{_describe(res)}; loss recovered = {loss}. Cells: mean ± 95% CI half-width (n seeds); seeds vary "
            f"the SAE initialisation and batch order, the activations and texts are those of seed {res['data_seed']}.")
    return {"matched": f"{head}\n\nEach architecture's sweep point nearest L0 = {res['target_l0']:g}:\n\n"
                       + _md_table(res["matched"], res["loss_metric"]),
            "sweep": "Full sweep (Pareto):\n\n" + _md_table(
                sorted(res["sweep"], key=lambda p: (p["architecture"], p["l0"]["mean"])), res["loss_metric"]),
            "claims": claims_markdown(res["claims"])}


@register("shrinkage", "Shrinkage: relu vs gated vs jumprelu vs topk at similar L0 on MiniLM activations: gamma "
          "(relative reconstruction bias), L0, FVU, loss recovered (sentence-embedding version); Pareto sweep; claims",
          outputs=["shrinkage.json", "shrinkage_table.md", "shrinkage_pareto.png", "shrinkage_gamma.png"],
          quick_seconds=40, quick_threads=1, tags=("llm",), tables=shrinkage_tables)
def shrinkage_job(out_dir: Path, run: RunSettings) -> dict:
    cfg = dataclasses.replace(llm_config(ShrinkageConfig.preset, run), seeds=run.seeds)
    res = run_shrinkage(cfg, out_dir)
    return {"loss_metric": res["loss_metric"], "target_l0": res["target_l0"], "n_seeds": res["n_seeds"],
            "matched": {r["architecture"]: {"value": r["value"], **{k: r[k]["mean"] for k in
                                                                     ("l0", "fvu", "gamma", "loss_recovered")}}
                        for r in res["matched"]},
            "claims": {r["claim"]: r["verdict"] for r in res["claims"]}}
