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

Seeds: every SAE is trained once per seed (initialisation, batch order); the activations, the split and the
held-out tokens are those of the first seed. Tables and the figure show mean and 95% CI over seeds.

API: `GeometryConfig` (+ `quick()`, `preset()`), `run_llm_geometry(cfg, out_dir)`; job `llm_geometry`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splinterp.atomic import write_json, write_text
from splinterp.claims import cell, format_cell, seeds_phrase, tables_markdown, yerr
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RepeatedOverSeeds, RunSettings, llm_config, register, to_jsonable
from splinterp.llm import LayerSAEConfig, LLMContext, LLMDataConfig, SweepPointConfig, knob_name

log = logging.getLogger(__name__)


def default_arch_knobs(quick: bool) -> dict[str, float]:
    """Sparsity knob per architecture giving an L0 near the TopK k of the preset (values of the shrinkage sweep)."""
    if quick:
        return {"relu": 0.01, "gated": 0.01, "jumprelu": 1e-3, "topk": 8, "topk_abs": 8}
    return {"relu": 0.004, "gated": 0.02, "jumprelu": 1e-4, "topk": 32, "topk_abs": 32}


@dataclass
class GeometryConfig(RepeatedOverSeeds):
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
    """Seed of the data: text order and train/test split (the first of `seeds`)."""
    seeds: tuple[int, ...] | None = None
    """Seeds of the SAE trainings, each SAE trained once per seed; None = (seed,)."""
    device: str = "cpu"
    """Torch device the model and the SAEs run on."""
    progress: bool = False
    """Progress bars while training."""

    def __post_init__(self) -> None:
        self.check_seeds()

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


SUMMARY_KEYS = ("l0", "fvu", "n_regions", "regions_per_token", "region_perplexity", "largest_region_frac",
                "singleton_input_frac")


def _summarise_rows(per_seed: list[dict[str, Any]], orders: tuple[int, ...]) -> dict[str, Any]:
    keys = [*SUMMARY_KEYS, *(f"order{o}_{x}" for o in orders for x in ("cells", "perplexity"))]
    return {k: cell(r[k] for r in per_seed) for k in keys if all(k in r for r in per_seed)}


def _md(rows: list[dict[str, Any]], orders: tuple[int, ...]) -> str:
    cols = ["SAE", "layer", "L0", "FVU", "regions", "regions/token", "region perplexity", "largest region",
            "tokens alone"] + [f"order-{o} cells" for o in orders] + [f"order-{o} perplexity" for o in orders]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        specs = (("l0", ".1f"), ("fvu", ".3f"), ("n_regions", ".0f"), ("regions_per_token", ".3f"),
                 ("region_perplexity", ".0f"), ("largest_region_frac", ".3f"), ("singleton_input_frac", ".3f"))
        cells = [r["sae"], str(r["layer"])] + [format_cell(r[key], spec) for key, spec in specs]
        cells += [format_cell(r.get(f"order{o}_cells"), ".0f") for o in orders]
        cells += [format_cell(r.get(f"order{o}_perplexity"), ".1f") for o in orders]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _describe(res: dict[str, Any]) -> str:
    model = "all-MiniLM-L6-v2" if res["model"] == "minilm" else res["model"]
    return f"{model}, resid_post, held-out tokens of the offline text ({seeds_phrase(res['n_seeds'])})"


def run_llm_geometry(cfg: GeometryConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train (or reuse) the SAEs over seeds, measure their geometry on held-out tokens, write JSON, table, figure."""
    from splinterp.viz.output import save_png

    out_dir = Path(out_dir)
    ctx = LLMContext(out_dir, cfg.data, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    cfg = dataclasses.replace(cfg, arch_layer=ctx.pick_layer(cfg.arch_layer))
    layers = list(cfg.layers) if cfg.layers is not None else ctx.layers
    missing = [v for v in layers if v not in ctx.layers]
    if missing:
        raise ConfigError(f"layers {missing} are not in the cache (layers {ctx.layers})")
    seeds = cfg.run_seeds
    rows = []
    for v in layers:
        per_seed = [{"seed": s, **geometry_row(cfg.sae.train(ctx, [v], seed=s).sae, ctx.test(v), cfg.orders)}
                    for s in seeds]
        rows.append({"sae": f"{cfg.sae.architecture} k={cfg.sae.k}", "architecture": cfg.sae.architecture,
                     "kind": "per_layer", "layer": v, "n_tokens": per_seed[0]["n_tokens"], "per_seed": per_seed,
                     **_summarise_rows(per_seed, cfg.orders)})
    # one layer, every architecture, with the shrinkage job's training settings (so its SAEs are reused)
    for arch, knob in cfg.arch_knobs.items():
        per_seed = []
        for s in seeds:
            t = cfg.arch_training.train(ctx, arch, knob, cfg.arch_layer, seed=s, progress=cfg.progress)
            per_seed.append({"seed": s, **geometry_row(t.sae, ctx.test(cfg.arch_layer), cfg.orders)})
        rows.append({"sae": f"{arch} {knob_name(arch)}={knob:g}", "architecture": arch, "kind": "architecture",
                     "layer": cfg.arch_layer, "n_tokens": per_seed[0]["n_tokens"], "per_seed": per_seed,
                     **_summarise_rows(per_seed, cfg.orders)})
    res = {"rows": rows, "model": cfg.data.model or "minilm", "seeds": list(seeds), "n_seeds": len(seeds),
           "data_seed": cfg.seed, "orders": list(cfg.orders), "arch_layer": cfg.arch_layer,
           "config": dataclasses.asdict(cfg)}
    save_png(geometry_figure(res), out_dir / "llm_geometry.png")
    write_json(out_dir / "llm_geometry.json", to_jsonable(res))
    write_text(out_dir / "llm_geometry_table.md",
               tables_markdown(geometry_tables(out_dir)))
    return res


def geometry_figure(res: dict[str, Any]):
    """Per-layer perplexities of regions and order-m cells | regions and order-1 cells per token per architecture."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator

    from splinterp.viz.style import bars_from_zero, integer_ticks, plain_log_ticks, style

    fig = Figure(figsize=(12, 4.6))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    per = [r for r in res["rows"] if r["kind"] == "per_layer"]
    xs = [r["layer"] for r in per]
    greys = ["#56B4E9", "#0072B2", "#003f66", "#001f33"]
    for j, o in enumerate(res["orders"]):
        ss = [r.get(f"order{o}_perplexity") for r in per]
        if any(s is None for s in ss):
            continue
        ax1.errorbar(xs, [s["mean"] for s in ss], yerr=yerr(ss), capsize=3, marker="o", color=greys[j % 4],
                     label=f"order-{o} power cells (top-{o} sets)")
    ss = [r["region_perplexity"] for r in per]
    ax1.errorbar(xs, [s["mean"] for s in ss], yerr=yerr(ss), capsize=3, marker="s", color="k",
                 label="regions (active sets)")
    arch = per[0]["architecture"] if per else "topk"
    ax1.set(yscale="log", xlabel="layer", ylabel="perplexity (effective number of cells)",
            title=f"per-layer {style(arch)['label']} SAEs ({per[0]['sae'] if per else ''})", xticks=xs)
    integer_ticks(ax1, "x")
    plain_log_ticks(ax1, "y")
    ax1.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.legend(fontsize=8)
    arch_rows = [r for r in res["rows"] if r["kind"] == "architecture"]
    pos = list(range(len(arch_rows)))
    ss = [r["regions_per_token"] for r in arch_rows]
    colours = [style(r["architecture"])["color"] for r in arch_rows]
    ax2.bar([x - 0.2 for x in pos], [s["mean"] for s in ss], yerr=yerr(ss), capsize=3, width=0.4, color=colours,
            label="regions / token")
    o1 = [r.get("order1_cells") for r in arch_rows]
    if all(s is not None for s in o1):
        n = [r["n_tokens"] for r in arch_rows]
        ax2.bar([x + 0.2 for x in pos], [s["mean"] / k for s, k in zip(o1, n)],
                yerr=[e / k for e, k in zip(yerr(o1), n)], capsize=3, width=0.4, color=colours, alpha=0.45,
                hatch="//", label="order-1 cells / token")
    ax2.set_xticks(pos, [f"{style(r['architecture'])['label']}\nL0 = {r['l0']['mean']:.1f}" for r in arch_rows],
                   fontsize=8)
    ax2.set(ylabel="distinct cells per held-out token", title=f"architectures at layer {res['arch_layer']}")
    bars_from_zero(ax2)
    ax2.set_ylim(0, max(1.25, ax2.get_ylim()[1]))
    ax2.legend(fontsize=8, loc="upper center", ncol=2)
    fig.suptitle(f"Spline geometry of SAEs, mean ± 95% CI: {_describe(res)}", fontsize=10)
    fig.tight_layout()
    return fig


def geometry_tables(folder: str | os.PathLike) -> dict[str, str]:
    """The README tables of the geometry job from `folder/llm_geometry.json`: per_layer, architectures."""
    res = json.loads((Path(folder) / "llm_geometry.json").read_text("utf-8"))
    rows = res["rows"]
    head = (f"{_describe(res)}: {rows[0]['n_tokens']} tokens per layer, standardised per layer. regions = distinct "
            "active sets (`splinterp.geometry.region_stats`); order-m cells = distinct sets of the m largest encoder "
            "scores (cells of the SAE's order-m power diagram). Cells: mean ± 95% CI half-width (n seeds).\n\n")
    orders = tuple(res["orders"])
    return {"per_layer": head + _md([r for r in rows if r["kind"] == "per_layer"], orders),
            "architectures": _md([r for r in rows if r["kind"] == "architecture"], orders)}


@register("llm_geometry", "Region statistics (n_regions, perplexity, power-diagram cells of order 1/2/4) of "
          "trained SAEs on held-out MiniLM tokens, per layer and per architecture",
          outputs=["llm_geometry.json", "llm_geometry_table.md", "llm_geometry.png"], quick_seconds=20,
          quick_threads=1, tags=("llm",), tables=geometry_tables)
def llm_geometry_job(out_dir: Path, run: RunSettings) -> dict:
    cfg = dataclasses.replace(llm_config(GeometryConfig.preset, run), seeds=run.seeds)
    res = run_llm_geometry(cfg, out_dir)
    return {"n_seeds": res["n_seeds"],
            "rows": [{"sae": r["sae"], "layer": r["layer"], **{k: r[k]["mean"] for k in
                                                                ("l0", "n_regions", "regions_per_token",
                                                                 "region_perplexity")}} for r in res["rows"]]}
