"""Group-SAE on real transformer activations: AMAD per number of groups G, and grouped vs per-layer SAEs.

Following Ghilardi et al. (EMNLP 2025, `ghidav/group-sae`; see `splinterp.layers.groups`):
1. mean angular distance between the layers' activations on the same training tokens (centred by default,
   as group-sae centres), `splinterp.layers.layer_distances`;
2. complete-linkage clustering of the layers for every G, **the last layer dropped** (group-sae's choice:
   it keeps its own SAE in both set-ups, so it is not compared), AMAD per G, G chosen by an AMAD threshold;
3. one TopK SAE per group, each training token taken at one layer of its group drawn uniformly (group-sae's
   sampling), vs one SAE per layer with the same settings (same epochs over the same training tokens, hence
   the same number of steps per SAE). Activations are standardised per layer first.

Reported per G (every G of `n_groups` and always the AMAD-chosen one): AMAD, the groups, the FVU of the group
SAE on each layer's held-out tokens next to the per-layer SAE's, the training time (measured, summed over the
SAEs: a singleton group *is* the per-layer SAE of its layer) and the training FLOPs (estimated,
`sae_train_flops`), with the fraction saved relative to the per-layer SAEs. The distance computation is an
extra one-off cost of grouping, reported separately.

Timing: this job's SAEs are stored under their own names (prefix "group_sae_"), so they are trained here and
not read from another job's store entry (whose time was measured under other conditions), and one warm-up
training runs first so that no timed SAE pays the process's one-off start-up costs. An SAE read back from the
store (a second run into the same folder) carries the time recorded when it was trained; the JSON counts them.

Seeds: every SAE is trained once per seed (initialisation, batch order, layer sampling); the activations, the
split and the layer distances are those of the first seed.

API: `GroupSAEConfig` (+ `quick()`, `preset()`), `run_group_sae(cfg, out_dir)`; job `group_sae`.
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

import numpy as np

from splinterp.atomic import write_json, write_text
from splinterp.claims import cell, claims_markdown, diff_verdict, format_cell, seeds_phrase, tables_markdown, yerr
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RepeatedOverSeeds, RunSettings, llm_config, register, to_jsonable
from splinterp.llm import LayerSAEConfig, LLMContext, LLMDataConfig, layer_sae_name, sae_train_flops

log = logging.getLogger(__name__)


@dataclass
class GroupSAEConfig(RepeatedOverSeeds):
    """Settings of the Group-SAE job. Defaults are the full run; `quick()` is the small preset."""

    data: LLMDataConfig = field(default_factory=LLMDataConfig)
    """Which model, texts, layers and split the activations come from (see `splinterp.llm.LLMDataConfig`)."""
    sae: LayerSAEConfig = field(default_factory=LayerSAEConfig)
    """How each per-layer or per-group SAE is trained (shared with the other LLM jobs, so the store trains it
    once)."""
    center: bool = True
    """Centre each layer's activations (exact training-split mean) before measuring angles."""
    drop_last: bool = True
    """Leave the last layer out of the clustering (it is far from the others; group-sae does the same)."""
    amad_threshold: float = 0.2
    """G is the smallest number of groups with AMAD <= this."""
    n_groups: tuple[int, ...] | None = None
    """Which G to train grouped SAEs for; None = every G from 1 to (clustered layers - 1)."""
    sampling: str = "uniform"
    """How a group SAE sees its layers: 'uniform' (each batch row from a random layer of the group) or 'concat'
    (every layer's rows, so len(group) times the data)."""
    distance_max_tokens: int | None = None
    """Tokens used to measure the angular layer distances (None: the whole training split)."""
    fvu_loss_margin: float = 0.05
    """The claims table's "loses little FVU": the chosen G's mean FVU at most this fraction above the per-layer
    SAEs' (relative)."""
    seed: int = 0
    """Seed of the data: text order and train/test split (the first of `seeds`)."""
    seeds: tuple[int, ...] | None = None
    """Seeds of the SAE trainings, each SAE trained once per seed; None = (seed,)."""
    device: str = "cpu"
    """Torch device the model and the SAEs run on."""
    progress: bool = False
    """Progress bars while training."""

    def __post_init__(self) -> None:
        if self.sampling not in ("uniform", "concat"):
            raise ConfigError(f"sampling must be 'uniform' or 'concat', got {self.sampling!r}")
        self.check_seeds()

    @classmethod
    def quick(cls, **changes: Any) -> GroupSAEConfig:
        base = cls(data=LLMDataConfig.preset(True), sae=LayerSAEConfig.preset(True), n_groups=(1, 2))
        return dataclasses.replace(base, **changes)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, device: str = "cpu", **changes: Any) -> GroupSAEConfig:
        c = cls.quick() if quick else cls()
        return dataclasses.replace(c, seed=seed, device=device, **changes)


def _describe(res: dict[str, Any]) -> str:
    model = "all-MiniLM-L6-v2" if res["model"] == "minilm" else res["model"]
    ls = res["layers"]
    return f"{model}, resid_post of blocks {ls[0]}-{ls[-1]}, offline text ({seeds_phrase(res['n_seeds'])})"


def run_group_sae(cfg: GroupSAEConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Distances, groupings with AMAD, grouped and per-layer SAEs over seeds; writes JSON, tables and figures."""
    from splinterp.layers import all_groupings, choose_n_groups, layer_distances, save_groups
    from splinterp.viz.output import save_png

    out_dir = Path(out_dir)
    ctx = LLMContext(out_dir, cfg.data, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    t0 = time.perf_counter()
    dist = layer_distances(ctx.cache, split="train", center=cfg.center, max_tokens=cfg.distance_max_tokens,
                           progress=cfg.progress)
    distance_seconds = time.perf_counter() - t0
    groupings = all_groupings(dist, drop_last=cfg.drop_last)
    layers = next(iter(groupings.values())).layers
    dropped = [v for v in dist.layers if v not in layers]
    chosen = choose_n_groups(groupings, cfg.amad_threshold)
    save_groups(out_dir / "group_sae_groups.json", groupings, dropped_layers=dropped,
                metadata={"model_name": ctx.cache.model_name, "metric": "angular", "centered": cfg.center,
                          "n_tokens": dist.n_tokens, "amad_threshold": cfg.amad_threshold, "chosen_G": chosen,
                          "distances": dist.matrix.tolist(), "distance_layers": dist.layers})
    n = len(layers)
    gs = sorted({g for g in (cfg.n_groups or range(1, n)) if 1 <= g < n} | ({chosen} if chosen < n else set()))
    n_train = ctx.cache.split_size("train")
    active = cfg.sae.k if cfg.sae.architecture.startswith("topk") else None
    seeds = cfg.run_seeds

    def train(group: list[int], seed: int, sae_cfg: LayerSAEConfig = cfg.sae):
        return sae_cfg.train(ctx, group, seed=seed, sampling=cfg.sampling,
                             name="group_sae_" + layer_sae_name(group, sae_cfg.architecture))

    def flops(group: list[int]) -> float:
        rows = n_train * (len(group) if cfg.sampling == "concat" else 1) * cfg.sae.epochs
        return sae_train_flops(ctx.d_model, cfg.sae.d_sae, rows, active)

    train(layers[:1], seeds[0], dataclasses.replace(cfg.sae, epochs=1))  # warm-up (not timed, not reported)
    base_flops = sum(flops([v]) for v in layers)
    per_seed: list[dict[str, Any]] = []
    n_reused = n_trained = 0
    for s in seeds:
        per_layer = {v: train([v], s) for v in layers}
        base_seconds = sum(t.train_seconds for t in per_layer.values())
        rec: dict[str, Any] = {"seed": s, str(n): {"fvu_per_layer": {str(v): per_layer[v].final[str(v)]["fvu"]
                                                                     for v in layers},
                                                    "train_seconds": base_seconds}}
        n_reused += sum(t.reused for t in per_layer.values())
        n_trained += len(per_layer)
        for g in gs:
            fvu, secs = {}, 0.0
            for group in groupings[g].groups:
                t = per_layer[group[0]] if len(group) == 1 else train(group, s)
                if len(group) > 1:
                    n_reused += t.reused
                    n_trained += 1
                secs += t.train_seconds
                fvu.update({str(v): t.final[str(v)]["fvu"] for v in group})
            rec[str(g)] = {"fvu_per_layer": fvu, "train_seconds": secs}
        for g in (*gs, n):
            r = rec[str(g)]
            r["mean_fvu"] = float(np.mean(list(r["fvu_per_layer"].values())))
            r["time_saved"] = 1 - r["train_seconds"] / base_seconds if base_seconds > 0 else None
        per_seed.append(rec)
        log.info("group_sae seed %d: mean FVU %s", s, {g: round(rec[str(g)]["mean_fvu"], 4) for g in (*gs, n)})
    rows = []
    for g in (*gs, n):
        recs = [r[str(g)] for r in per_seed]
        fl = base_flops if g == n else sum(flops(group) for group in groupings[g].groups)
        saved = [r["time_saved"] for r in recs]
        rows.append({"G": g, "label": f"{n} (per layer)" if g == n else str(g), "amad": 0.0 if g == n else
                     groupings[g].amad, "groups": [[v] for v in layers] if g == n else groupings[g].groups,
                     "chosen": g == chosen, "contiguous": True if g == n else groupings[g].contiguous,
                     "fvu_per_layer": {str(v): cell(r["fvu_per_layer"][str(v)] for r in recs) for v in layers},
                     "mean_fvu": cell(r["mean_fvu"] for r in recs),
                     "train_seconds": cell(r["train_seconds"] for r in recs),
                     "time_saved": None if None in saved else cell(saved),
                     "flops": fl, "flops_saved": 1 - fl / base_flops})
    res = {"layers": layers, "dropped_layers": dropped, "distances": dist.matrix.tolist(),
           "distance_layers": dist.layers, "distance_seconds": distance_seconds,
           "amad": {str(g): groupings[g].amad for g in sorted(groupings)}, "chosen_G": chosen, "trained_G": gs,
           "rows": rows, "per_seed": per_seed, "seeds": list(seeds), "n_seeds": len(seeds), "data_seed": cfg.seed,
           "saes_reused_from_store": n_reused, "saes_total": n_trained, "model": cfg.data.model or "minilm",
           "config": dataclasses.asdict(cfg)}
    res["claims"] = group_sae_claims(res)
    save_png(group_sae_figure(res), out_dir / "group_sae.png")
    write_json(out_dir / "group_sae.json", to_jsonable(res))
    write_text(out_dir / "group_sae_table.md",
               tables_markdown(group_sae_tables(out_dir)))
    return res


def group_sae_claims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row: the AMAD-chosen G loses little FVU against the per-layer SAEs (relative increase of the mean
    FVU over layers, paired per seed, below `fvu_loss_margin`)."""
    g, n = res["chosen_G"], len(res["layers"])
    margin = res["config"]["fvu_loss_margin"]
    if g >= n:
        return [{"claim": "Group-SAE's AMAD-chosen G loses little FVU", "measurement": f"AMAD chose G = {g} = one "
                 "SAE per layer: nothing grouped", "value": None, "rule": "-", "verdict": "inconclusive (no grouping)"}]
    rel = [(r[str(g)]["mean_fvu"] - r[str(n)]["mean_fvu"]) / r[str(n)]["mean_fvu"] for r in res["per_seed"]]
    s, verdict = diff_verdict([margin - x for x in rel])
    return [{"claim": f"Group-SAE's AMAD-chosen G (= {g}, threshold {res['config']['amad_threshold']:g}) loses little "
                      "FVU", "measurement": "relative increase of the mean FVU over layers, G groups vs per-layer SAEs",
             "value": cell(rel), "rule": f"holds if the CI is below {margin:g}, does not hold if above, "
                                              "else inconclusive", "verdict": verdict}]


def group_sae_figure(res: dict[str, Any]):
    """Distance matrix | AMAD per G | FVU per layer per G | time and FLOPs saved per G (mean ± 95% CI)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from splinterp.viz.style import bars_from_zero, integer_ticks, metric_label

    layers, chosen, n = res["layers"], res["chosen_G"], len(res["layers"])
    c = res["config"]
    fig = Figure(figsize=(20, 4.8))
    ax = fig.add_subplot(1, 4, 1)
    dl = res["distance_layers"]
    mat = np.asarray(res["distances"])
    im = ax.imshow(mat, cmap="viridis", origin="upper")
    ax.set(xticks=range(len(dl)), yticks=range(len(dl)), xticklabels=dl, yticklabels=dl, xlabel="layer",
           ylabel="layer", title=f"angular distance{' (centred)' if c['center'] else ''}")
    for i in range(len(dl)):
        for j in range(len(dl)):
            ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="w" if mat[i, j] < 0.6 * mat.max() else "k")
    fig.colorbar(im, ax=ax, fraction=0.046, label="angular distance")
    ax = fig.add_subplot(1, 4, 2)
    allg = sorted(int(g) for g in res["amad"])
    ax.plot(allg, [res["amad"][str(g)] for g in allg], marker="o", color="k", label="AMAD")
    ax.axhline(c["amad_threshold"], color="0.5", ls=":", label=f"threshold {c['amad_threshold']:g}")
    ax.plot([chosen], [res["amad"][str(chosen)]], marker="*", ms=14, color="#D55E00", ls="none",
            label=f"chosen G = {chosen}")
    ax.set(xlabel="number of groups G", ylabel="AMAD (mean angular distance within groups)",
           title=f"AMAD per G (layers {layers[0]}-{layers[-1]}; "
           f"left out: {', '.join(map(str, res['dropped_layers'])) or 'none'})", xticks=allg)
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 4, 3)
    cmap = colormaps["viridis"]
    for k, r in enumerate(res["rows"]):
        ss = [r["fvu_per_layer"][str(v)] for v in layers]
        per_layer = r["G"] == n
        kw = dict(color="k", ls="--", marker="s") if per_layer else dict(color=cmap(k / max(len(res["rows"]) - 1, 1)),
                                                                         marker="o")
        lab = "per-layer SAEs" if per_layer else f"G = {r['G']}" + (" (AMAD choice)" if r["chosen"] else "")
        ax.errorbar(layers, [s["mean"] for s in ss], yerr=yerr(ss), capsize=3, lw=2.5 if r["chosen"] else 1.3,
                    label=lab, **kw)
    ax.set(xlabel="layer", ylabel=metric_label("fvu") + ", held-out", xticks=layers,
           title="grouped vs per-layer TopK SAEs, mean ± 95% CI")
    integer_ticks(ax, "x")
    ax.legend(fontsize=8)
    ax = fig.add_subplot(1, 4, 4)
    grouped = [r for r in res["rows"] if r["G"] < n]
    xs = np.arange(len(grouped))
    ts = [r["time_saved"] for r in grouped]
    ax.bar(xs - 0.2, [100 * (t["mean"] if t else 0) for t in ts], width=0.4, color="#0072B2",
           yerr=[100 * e for e in yerr([t or {} for t in ts])], capsize=3, label="training time saved (measured)")
    ax.bar(xs + 0.2, [100 * r["flops_saved"] for r in grouped], width=0.4, color="#7F7F7F",
           label="training FLOPs saved (estimated)")
    ax.set_xticks(xs, [f"G = {r['G']}" for r in grouped])
    ax.set(ylabel="saved vs per-layer SAEs (%)", title="cost saved by grouping")
    bars_from_zero(ax)
    ax.legend(fontsize=8)
    fig.suptitle(f"Group-SAE: {_describe(res)}; TopK d_sae {c['sae']['d_sae']}, k {c['sae']['k']}", fontsize=11)
    fig.tight_layout()
    return fig


def _pct_cell(s: dict[str, Any] | None) -> str:
    if s is None:
        return "-"
    hw = s["half_width"]
    return format_cell({**s, "mean": 100 * s["mean"], "half_width": None if hw is None else 100 * hw}, ".0f", "%")


def group_sae_tables(folder: str | os.PathLike) -> dict[str, str]:
    """The README tables of the Group-SAE job from `folder/group_sae.json`: groups (FVU and cost per G), claims."""
    res = json.loads((Path(folder) / "group_sae.json").read_text("utf-8"))
    c, layers = res["config"], res["layers"]
    head = (f"{_describe(res)}. Angular distance{' (centred)' if c['center'] else ''}; clustered layers {layers} "
            f"(left out: {res['dropped_layers']}); TopK SAEs d_sae {c['sae']['d_sae']}, k {c['sae']['k']}, "
            f"{c['sae']['epochs']} epochs, '{c['sampling']}' layer sampling; AMAD threshold {c['amad_threshold']:g} "
            f"-> G = {res['chosen_G']}. Distance computation: {res['distance_seconds']:.1f} s (one-off). Cells: mean ± "
            "95% CI half-width (n seeds); time measured in this job "
            f"({res['saes_reused_from_store']} of {res['saes_total']} SAEs read back from the store).\n\n")
    cols = ["G", "AMAD", "groups", *[f"FVU L{v}" for v in layers], "mean FVU", "train s", "time saved", "FLOPs saved"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        groups = " ".join("{" + ",".join(map(str, g)) + "}" for g in r["groups"])
        ts = r["time_saved"]
        lines.append(f"| {r['label']}{' (chosen)' if r['chosen'] else ''} | {r['amad']:.3f} | {groups} | "
                     + " | ".join(format_cell(r["fvu_per_layer"][str(v)], ".3f") for v in layers)
                     + f" | {format_cell(r['mean_fvu'], '.3f')} | {format_cell(r['train_seconds'], '.2g')} | "
                     f"{_pct_cell(ts)} | "
                     f"{100 * r['flops_saved']:.0f}% |")
    return {"groups": head + "\n".join(lines) + "\n", "claims": claims_markdown(res["claims"])}


@register("group_sae", "Group-SAE on MiniLM activations: angular layer distances, complete-linkage groups, AMAD "
          "per G, FVU of grouped vs per-layer TopK SAEs and the training time / FLOPs saved; claims",
          outputs=["group_sae.json", "group_sae_groups.json", "group_sae_table.md", "group_sae.png"],
          quick_seconds=20, quick_threads=1, tags=("llm",), tables=group_sae_tables)
def group_sae_job(out_dir: Path, run: RunSettings) -> dict:
    cfg = dataclasses.replace(llm_config(GroupSAEConfig.preset, run), seeds=run.seeds)
    res = run_group_sae(cfg, out_dir)
    return {"chosen_G": res["chosen_G"], "amad": res["amad"], "n_seeds": res["n_seeds"],
            "mean_fvu": {r["label"]: r["mean_fvu"]["mean"] for r in res["rows"]},
            "claims": {r["claim"]: r["verdict"] for r in res["claims"]}}
