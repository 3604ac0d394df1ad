"""Spline geometry of SAEs on real transformer activations: region statistics per layer and per architecture.

An SAE cuts activation space into linear regions (one per active set; `splinterp.geometry.regions`) and, for
TopK, the regions are the cells of a k-th order power diagram of its encoder sites
(`splinterp.geometry.power`). This job measures, on **held-out tokens** (standardised as in training):
- `region_stats`: n_regions (distinct active sets), regions per token, region perplexity (exp of the entropy of
  the region distribution), the share of tokens in the most visited region, the share of tokens alone in
  their region;
- the coarser cells of the same power diagram at low orders: the order-m cell of a token is the set of its m
  nearest sites in power distance (= its m largest encoder scores, thresholds included for JumpReLU/Gated),
  for m = 1, 2, 4: how many distinct cells the tokens visit and their perplexity. Order 1 is the "which
  latent wins" partition (a k-means-like Voronoi partition in power distance).
for the per-layer TopK SAEs of every layer (the same SAEs as the Group-SAE and transfer jobs) and for every
architecture at one layer, at the knob values that give an L0 near the TopK k (as in the shrinkage job).

API: `GeometryConfig` (+ `quick()`, `preset()`), `run_llm_geometry(cfg, out_dir)`; job `llm_geometry`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splinterp.atomic import write_json, write_text
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RunSettings, llm_config, register, to_jsonable
from splinterp.llm import LayerSAEConfig, LLMContext, LLMDataConfig, SweepPointConfig, knob_name

log = logging.getLogger(__name__)


def default_arch_knobs(quick: bool) -> dict[str, float]:
    """Sparsity knob per architecture giving an L0 near the TopK k of the preset (values of the shrinkage sweep)."""
    if quick:
        return {"relu": 0.003, "gated": 0.01, "jumprelu": 3e-4, "topk": 8, "topk_abs": 8}
    return {"relu": 0.004, "gated": 0.02, "jumprelu": 1e-4, "topk": 32, "topk_abs": 32}


@dataclass
class GeometryConfig:
    """Settings of the geometry job. Defaults are the full run; `quick()` is the small preset."""

    data: LLMDataConfig = field(default_factory=LLMDataConfig)
    """Which model, texts, layers and split the activations come from (see `splinterp.llm.LLMDataConfig`)."""
    sae: LayerSAEConfig = field(default_factory=LayerSAEConfig)
    """How each per-layer or per-group SAE is trained (shared with the other LLM jobs, so the store trains it
    once)."""
    layers: tuple[int, ...] | None = None
    """Layers whose per-layer SAE is measured; None = every layer of the cache."""
    arch_layer: int | None = None
    """Block of the per-architecture SAEs; None = the middle block of the cache."""
    arch_knobs: dict[str, float] = field(default_factory=lambda: default_arch_knobs(False))
    """{architecture: knob} trained at `arch_layer` (k for topk/topk_abs, the sparsity coefficient otherwise)."""
    arch_training: SweepPointConfig = field(default_factory=SweepPointConfig)
    """How the per-architecture SAEs are trained: the shrinkage job's settings, so that its SAEs are reused."""
    orders: tuple[int, ...] = (1, 2, 4)
    """Power-diagram orders whose cells are counted (order m: the set of the m largest encoder scores)."""
    seed: int = 0
    """Seed of every random choice (text order, initialisation, batch order, subsets)."""
    device: str = "cpu"
    """Torch device the model and the SAEs run on."""
    progress: bool = False
    """Progress bars while training."""

    @classmethod
    def quick(cls, **changes: Any) -> GeometryConfig:
        base = cls(data=LLMDataConfig.preset(True), sae=LayerSAEConfig.preset(True),
                   arch_knobs=default_arch_knobs(True), arch_training=SweepPointConfig.preset(True))
        return dataclasses.replace(base, **changes)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, device: str = "cpu", **changes: Any) -> GeometryConfig:
        c = cls.quick() if quick else cls()
        return dataclasses.replace(c, seed=seed, device=device, **changes)


@torch.no_grad()
def geometry_row(sae: Any, X: torch.Tensor, orders: tuple[int, ...] = (1, 2, 4)) -> dict[str, Any]:
    """Region statistics and low-order power-cell statistics of `sae` on tokens X (see the module doc)."""
    from splinterp import metrics
    from splinterp.geometry import geometry_report

    rep = geometry_report(sae, X, orders=orders)
    m = metrics.evaluate(sae, X)
    n = rep["n_inputs"]
    row: dict[str, Any] = {
        "n_tokens": n, "l0": m["l0"], "fvu": m["fvu"], "n_regions": rep["n_regions"],
        "regions_per_token": rep["regions_per_input"], "region_perplexity": rep["region_perplexity"],
        "largest_region_frac": rep["largest_region_frac"], "singleton_input_frac": rep["singleton_input_frac"],
    }
    row.update({k: v for k, v in rep.items() if k.startswith("order")})
    return row


def _md(rows: list[dict[str, Any]], orders: tuple[int, ...]) -> str:
    cols = ["SAE", "layer", "L0", "FVU", "tokens", "regions", "regions/token", "region perplexity",
            "largest region", "tokens alone"] + [f"order-{o} cells (perplexity)" for o in orders]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["sae"], str(r["layer"]), f"{r['l0']:.1f}", f"{r['fvu']:.3f}", str(r["n_tokens"]),
                 str(r["n_regions"]),
                 f"{r['regions_per_token']:.3f}", f"{r['region_perplexity']:.0f}", f"{r['largest_region_frac']:.3f}",
                 f"{r['singleton_input_frac']:.3f}"]
        cells += [f"{r[f'order{o}_cells']} ({r[f'order{o}_perplexity']:.1f})" if f"order{o}_cells" in r else "-"
                  for o in orders]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_llm_geometry(cfg: GeometryConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train (or reuse) the SAEs, measure their geometry on held-out tokens, write JSON, table and figure."""
    from matplotlib.figure import Figure

    from splinterp.viz.output import save_png

    out_dir = Path(out_dir)
    ctx = LLMContext(out_dir, cfg.data, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    cfg = dataclasses.replace(cfg, arch_layer=ctx.pick_layer(cfg.arch_layer))
    layers = list(cfg.layers) if cfg.layers is not None else ctx.layers
    missing = [v for v in layers if v not in ctx.layers]
    if missing:
        raise ConfigError(f"layers {missing} are not in the cache (layers {ctx.layers})")
    rows = []
    for v in layers:
        t = cfg.sae.train(ctx, [v], seed=cfg.seed)
        rows.append({"sae": f"{cfg.sae.architecture} k={cfg.sae.k}", "kind": "per_layer", "layer": v,
                     **geometry_row(t.sae, ctx.test(v), cfg.orders)})
    # one layer, every architecture, with the shrinkage job's training settings (so its SAEs are reused)
    for arch, knob in cfg.arch_knobs.items():
        t = cfg.arch_training.train(ctx, arch, knob, cfg.arch_layer, seed=cfg.seed, progress=cfg.progress)
        rows.append({"sae": f"{arch} {knob_name(arch)}={knob:g}", "kind": "architecture", "layer": cfg.arch_layer,
                     **geometry_row(t.sae, ctx.test(cfg.arch_layer), cfg.orders)})
    # figure: per-layer regions/token and order-m perplexities; per-architecture the same
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    per = [r for r in rows if r["kind"] == "per_layer"]
    for o in cfg.orders:
        key = f"order{o}_perplexity"
        ax1.plot([r["layer"] for r in per], [r.get(key, float("nan")) for r in per], marker="o",
                 label=f"order-{o} cells")
    ax1.plot([r["layer"] for r in per], [r["region_perplexity"] for r in per], marker="s", color="k",
             label="regions (active sets)")
    ax1.set(yscale="log", xlabel="layer", ylabel="perplexity (effective number of cells)",
            title=f"per-layer {cfg.sae.architecture} SAEs, held-out tokens", xticks=[r["layer"] for r in per])
    ax1.legend(fontsize=8)
    arch_rows = [r for r in rows if r["kind"] == "architecture"]
    xs = range(len(arch_rows))
    ax2.bar([x - 0.2 for x in xs], [r["regions_per_token"] for r in arch_rows], width=0.4, label="regions / token")
    ax2.bar([x + 0.2 for x in xs], [r.get("order1_cells", 0) / r["n_tokens"] for r in arch_rows], width=0.4,
            label="order-1 cells / token")
    ax2.set_xticks(list(xs), [f"{r['sae'].split()[0]}\nL0={r['l0']:.0f}" for r in arch_rows], fontsize=8)
    ax2.set(ylabel="distinct cells / held-out token", title=f"architectures at layer {cfg.arch_layer}",
            ylim=(0, 1.25))
    ax2.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    save_png(fig, out_dir / "llm_geometry.png")
    md = (f"Held-out tokens ({rows[0]['n_tokens']} per layer), standardised per layer. regions = distinct active "
          "sets (`splinterp.geometry.region_stats`); order-m cells = distinct sets of the m largest encoder scores "
          "(cells of the SAE's order-m power diagram).\n\n" + _md(rows, cfg.orders))
    write_text(out_dir / "llm_geometry_table.md", md)
    res = {"rows": rows, "model": cfg.data.model or "minilm", "config": dataclasses.asdict(cfg)}
    write_json(out_dir / "llm_geometry.json", to_jsonable(res))
    return res


@register("llm_geometry", "Region statistics (n_regions, perplexity, power-diagram cells of order 1/2/4) of "
          "trained SAEs on held-out MiniLM tokens, per layer and per architecture",
          outputs=["llm_geometry.json", "llm_geometry_table.md", "llm_geometry.png"], quick_seconds=20,
          quick_threads=1, tags=("llm",))
def llm_geometry_job(out_dir: Path, run: RunSettings) -> dict:
    res = run_llm_geometry(llm_config(GeometryConfig.preset, run), out_dir)
    return {"rows": [{k: r[k] for k in ("sae", "layer", "l0", "n_regions", "regions_per_token", "region_perplexity")}
                     for r in res["rows"]]}
