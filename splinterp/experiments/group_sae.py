"""Group-SAE on real transformer activations: AMAD per number of groups G, and grouped vs per-layer SAEs.

Following Ghilardi et al. (EMNLP 2025, `ghidav/group-sae`; see `splinterp.layers.groups`):
1. mean angular distance between the layers' activations on the same training tokens (centred by default,
   as group-sae centres), `splinterp.layers.layer_distances`;
2. complete-linkage clustering of the layers for every G, **the last layer dropped** (group-sae's choice:
   it keeps its own SAE in both set-ups, so it is not compared), AMAD per G, G chosen by an AMAD threshold;
3. one TopK SAE per group, each training token taken at one layer of its group drawn uniformly (group-sae's
   sampling), vs one SAE per layer with the same settings (same epochs over the same training tokens, hence
   the same number of steps per SAE). Activations are standardised per layer first.

Reported per G: AMAD, the groups, the FVU of the group SAE on each layer's held-out tokens next to the
per-layer SAE's, the training time (measured, summed over the SAEs: a singleton group *is* the per-layer SAE
of its layer) and the training FLOPs (estimated, `sae_train_flops`), with the fraction saved relative to
the per-layer SAEs. The distance computation is an extra one-off cost of grouping, reported separately.

API: `GroupSAEConfig` (+ `quick()`, `preset()`), `run_group_sae(cfg, out_dir)`; job `group_sae`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splinterp.atomic import write_json, write_text
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RunSettings, llm_config, register, to_jsonable
from splinterp.llm import LayerSAEConfig, LLMContext, LLMDataConfig, sae_train_flops

log = logging.getLogger(__name__)


@dataclass
class GroupSAEConfig:
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
    seed: int = 0
    """Seed of every random choice (text order, initialisation, batch order, subsets)."""
    device: str = "cpu"
    """Torch device the model and the SAEs run on."""
    progress: bool = False
    """Progress bars while training."""

    def __post_init__(self) -> None:
        if self.sampling not in ("uniform", "concat"):
            raise ConfigError(f"sampling must be 'uniform' or 'concat', got {self.sampling!r}")

    @classmethod
    def quick(cls, **changes: Any) -> GroupSAEConfig:
        base = cls(data=LLMDataConfig.preset(True), sae=LayerSAEConfig.preset(True), n_groups=(1, 2))
        return dataclasses.replace(base, **changes)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, device: str = "cpu", **changes: Any) -> GroupSAEConfig:
        c = cls.quick() if quick else cls()
        return dataclasses.replace(c, seed=seed, device=device, **changes)


def _fvu_table(rows: list[dict[str, Any]], layers: list[int]) -> str:
    head = "| G | AMAD | groups | " + " | ".join(f"FVU L{v}" for v in layers) + \
        " | mean FVU | train s | time saved | FLOPs saved |"
    lines = [head, "|" + "---|" * (7 + len(layers))]
    for r in rows:
        fv = " | ".join(f"{r['fvu_per_layer'][str(v)]:.3f}" for v in layers)
        groups = " ".join("{" + ",".join(map(str, g)) + "}" for g in r["groups"])
        lines.append(f"| {r['label']} | {r['amad']:.3f} | {groups} | {fv} | {r['mean_fvu']:.3f} | "
                     f"{r['train_seconds']:.1f} | {100 * r['time_saved']:.0f}% | {100 * r['flops_saved']:.0f}% |")
    return "\n".join(lines) + "\n"


def run_group_sae(cfg: GroupSAEConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Distances, groupings with AMAD, grouped and per-layer SAEs; writes JSON, tables and figures."""
    from matplotlib.figure import Figure

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
    gs = [g for g in (cfg.n_groups or range(1, n)) if 1 <= g < n]
    n_train = ctx.cache.split_size("train")
    active = cfg.sae.k if cfg.sae.architecture.startswith("topk") else None

    def train(group: list[int]):
        return cfg.sae.train(ctx, group, seed=cfg.seed, sampling=cfg.sampling)

    def flops(group: list[int]) -> float:
        rows = n_train * (len(group) if cfg.sampling == "concat" else 1) * cfg.sae.epochs
        return sae_train_flops(ctx.d_model, cfg.sae.d_sae, rows, active)

    per_layer = {v: train([v]) for v in layers}
    base_seconds = sum(t.train_seconds for t in per_layer.values())
    base_flops = sum(flops([v]) for v in layers)
    rows = []
    base_row = {"G": n, "label": f"{n} (per layer)", "amad": 0.0, "groups": [[v] for v in layers],
                "fvu_per_layer": {str(v): per_layer[v].final[str(v)]["fvu"] for v in layers},
                "l0_per_layer": {str(v): per_layer[v].final[str(v)]["l0"] for v in layers},
                "train_seconds": base_seconds, "flops": base_flops, "time_saved": 0.0, "flops_saved": 0.0}
    base_row["mean_fvu"] = float(np.mean(list(base_row["fvu_per_layer"].values())))
    for g in sorted(gs):
        grouping = groupings[g]
        fvu, l0, secs, fl = {}, {}, 0.0, 0.0
        for group in grouping.groups:
            t = train(group)
            secs += t.train_seconds
            fl += flops(group)
            for v in group:
                fvu[str(v)] = t.final[str(v)]["fvu"]
                l0[str(v)] = t.final[str(v)]["l0"]
        rows.append({"G": g, "label": str(g), "amad": grouping.amad, "groups": grouping.groups, "fvu_per_layer": fvu,
                     "l0_per_layer": l0, "mean_fvu": float(np.mean(list(fvu.values()))), "train_seconds": secs,
                     "flops": fl, "time_saved": 1 - secs / base_seconds if base_seconds > 0 else float("nan"),
                     "flops_saved": 1 - fl / base_flops, "contiguous": grouping.contiguous})
        log.info("G=%d AMAD %.3f groups %s mean FVU %.4f (per layer %.4f), %.1fs vs %.1fs", g, grouping.amad,
                 grouping.groups, rows[-1]["mean_fvu"], base_row["mean_fvu"], secs, base_seconds)
    rows.append(base_row)
    # figures: distance matrix | AMAD per G | FVU per layer
    fig = Figure(figsize=(15, 4.2))
    ax = fig.add_subplot(1, 3, 1)
    im = ax.imshow(dist.matrix, cmap="viridis", origin="upper")
    ax.set(xticks=range(len(dist.layers)), yticks=range(len(dist.layers)), xticklabels=dist.layers,
           yticklabels=dist.layers, xlabel="layer", ylabel="layer",
           title=f"angular distance{' (centred)' if cfg.center else ''}")
    for i in range(len(dist.layers)):
        for j in range(len(dist.layers)):
            ax.text(j, i, f"{dist.matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax = fig.add_subplot(1, 3, 2)
    allg = sorted(groupings)
    ax.plot(allg, [groupings[g].amad for g in allg], marker="o")
    ax.axhline(cfg.amad_threshold, color="0.5", ls=":", label=f"threshold {cfg.amad_threshold:g} -> G={chosen}")
    ax.set(xlabel="number of groups G", ylabel="AMAD", title=f"AMAD per G (layers {layers[0]}..{layers[-1]})",
           xticks=allg)
    ax.legend()
    ax = fig.add_subplot(1, 3, 3)
    for r in rows:
        ax.plot(layers, [r["fvu_per_layer"][str(v)] for v in layers], marker="o",
                ls="-" if r["G"] < n else "--", color="k" if r["G"] == n else None, label=f"G={r['label']}")
    ax.set(xlabel="layer", ylabel="FVU (held-out tokens)", title="grouped vs per-layer SAEs", xticks=layers)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out_dir / "group_sae.png")
    md = (f"Angular distance{' (centred)' if cfg.center else ''} over {dist.n_tokens} training tokens; "
          f"clustered layers {layers} (dropped: {dropped}); TopK SAEs d_sae {cfg.sae.d_sae}, k {cfg.sae.k}, "
          f"{cfg.sae.epochs} epochs, '{cfg.sampling}' layer sampling; AMAD threshold {cfg.amad_threshold:g} -> "
          f"G = {chosen}. Distance computation: {distance_seconds:.1f} s (one-off).\n\n"
          + _fvu_table(rows, layers))
    write_text(out_dir / "group_sae_table.md", md)
    res = {"layers": layers, "dropped_layers": dropped, "distances": dist.matrix.tolist(),
           "distance_seconds": distance_seconds, "amad": {str(g): groupings[g].amad for g in allg},
           "chosen_G": chosen, "rows": rows, "model": cfg.data.model or "minilm", "config": dataclasses.asdict(cfg)}
    write_json(out_dir / "group_sae.json", to_jsonable(res))
    return res


@register("group_sae", "Group-SAE on MiniLM activations: angular layer distances, complete-linkage groups, AMAD "
          "per G, FVU of grouped vs per-layer TopK SAEs and the training time / FLOPs saved",
          outputs=["group_sae.json", "group_sae_groups.json", "group_sae_table.md", "group_sae.png"],
          quick_seconds=20, quick_threads=1, tags=("llm",))
def group_sae_job(out_dir: Path, run: RunSettings) -> dict:
    res = run_group_sae(llm_config(GroupSAEConfig.preset, run), out_dir)
    return {"chosen_G": res["chosen_G"], "amad": res["amad"],
            "mean_fvu": {r["label"]: r["mean_fvu"] for r in res["rows"]},
            "time_saved": {r["label"]: r["time_saved"] for r in res["rows"]}}
