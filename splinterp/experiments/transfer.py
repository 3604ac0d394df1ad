"""Layer-wise SAE transfer on real transformer activations: steps to a target FVU, transfer vs from scratch.

Following Ghilardi et al. (BlackboxNLP 2024; `splinterp.layers.transfer`): the SAE of layer l starts from the
trained SAE of layer l - 1 (forward) or l + 1 (backward) and is fine-tuned on layer l with exactly the
settings of the from-scratch run (same epochs, batches, optimiser; fresh Adam state). The test FVU on layer
l's held-out tokens is recorded every `eval_every` optimiser steps. The target FVU of layer l is the
from-scratch run's final FVU times (1 + `target_slack`); "steps to target" is the first recorded step at
or below it (scratch reaches it by construction; a transfer run may reach it at step 0, i.e. zero-shot, or
never). Speed-up = scratch steps / transfer steps. A run that never reaches the target counts as its total steps
(no saving), and the JSON counts such runs.

Seeds: every SAE (scratch and transfer) is trained once per seed (initialisation of the scratch runs, batch
order); the activations and the split are those of the first seed. The claims pool the target layers: per seed,
the mean over targets of the fraction of steps saved, 1 - transfer steps / scratch steps.

API: `TransferConfig` (+ `quick()`, `preset()`), `run_transfer(cfg, out_dir)`; job `transfer`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splinterp.atomic import write_json, write_text
from splinterp.claims import cell, claims_markdown, diff_verdict, format_cell, seeds_phrase, tables_markdown
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RepeatedOverSeeds, RunSettings, llm_config, register, to_jsonable
from splinterp.llm import LayerSAEConfig, LLMContext, LLMDataConfig

log = logging.getLogger(__name__)


@dataclass
class TransferConfig(RepeatedOverSeeds):
    """Settings of the transfer job. Defaults are the full run; `quick()` is the small preset."""

    data: LLMDataConfig = field(default_factory=LLMDataConfig)
    """Which model, texts, layers and split the activations come from (see `splinterp.llm.LLMDataConfig`)."""
    sae: LayerSAEConfig = field(default_factory=LayerSAEConfig)
    """How each per-layer or per-group SAE is trained (shared with the other LLM jobs, so the store trains it
    once)."""
    targets: tuple[int, ...] | None = None
    """Layers to transfer into; None = the layers with both neighbours in the cache (see max_targets)."""
    max_targets: int | None = None
    """With targets=None, keep at most this many of them, the most central ones."""
    directions: tuple[str, ...] = ("forward", "backward")
    """Transfer directions measured: 'forward' (layer l starts from the SAE of l-1) and/or 'backward' (from l+1)."""
    target_slack: float = 0.05
    """Target FVU = scratch final FVU * (1 + target_slack)."""
    seed: int = 0
    """Seed of the data: text order and train/test split (the first of `seeds`)."""
    seeds: tuple[int, ...] | None = None
    """Seeds of the SAE trainings, each SAE trained once per seed; None = (seed,)."""
    device: str = "cpu"
    """Torch device the model and the SAEs run on."""
    progress: bool = False
    """Progress bars while training."""

    def __post_init__(self) -> None:
        if any(d not in ("forward", "backward") for d in self.directions) or not self.directions:
            raise ConfigError(f"directions must be among 'forward', 'backward', got {self.directions!r}")
        if not self.target_slack >= 0:
            raise ConfigError(f"target_slack must be >= 0, got {self.target_slack!r}")
        self.check_seeds()

    @classmethod
    def quick(cls, **changes: Any) -> TransferConfig:
        base = cls(data=LLMDataConfig.preset(True), sae=LayerSAEConfig.preset(True), max_targets=1)
        return dataclasses.replace(base, **changes)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, device: str = "cpu", **changes: Any) -> TransferConfig:
        c = cls.quick() if quick else cls()
        return dataclasses.replace(c, seed=seed, device=device, **changes)


def _describe(res: dict[str, Any]) -> str:
    model = "all-MiniLM-L6-v2" if res["model"] == "minilm" else res["model"]
    return f"{model}, resid_post, offline text ({seeds_phrase(res['n_seeds'])})"


def run_transfer(cfg: TransferConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Scratch and transfer runs over seeds with FVU curves; writes JSON, a markdown table and the curves figure."""
    from splinterp.layers import source_layer, steps_to_target
    from splinterp.viz.output import save_png

    out_dir = Path(out_dir)
    ctx = LLMContext(out_dir, cfg.data, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    layers = ctx.layers
    if cfg.targets is not None:
        targets = list(cfg.targets)
    else:
        targets = [v for v in layers if v - 1 in layers and v + 1 in layers]
        if cfg.max_targets is not None and len(targets) > cfg.max_targets:
            s = (len(targets) - cfg.max_targets + 1) // 2
            targets = targets[s:s + cfg.max_targets]
    if not targets:
        raise ConfigError(f"no layer to transfer into: layers {layers} have no interior layer")
    for t in targets:
        for d in cfg.directions:
            if source_layer(t, d) not in layers:
                raise ConfigError(f"{d} transfer into layer {t} needs layer {source_layer(t, d)}, not in {layers}")
    arch = cfg.sae.architecture
    seeds = cfg.run_seeds
    needed = sorted(set(targets) | {source_layer(t, d) for t in targets for d in cfg.directions})
    rows, curves = [], {}
    for t in targets:
        per_seed = []
        for s in seeds:
            scratch = {v: cfg.sae.train(ctx, [v], seed=s) for v in needed if v == t or
                       any(source_layer(t, d) == v for d in cfg.directions)}
            sc = scratch[t]
            final = sc.curve["fvu"][-1]
            target = final * (1 + cfg.target_slack)
            total = sc.curve["steps"][-1]
            rec: dict[str, Any] = {"seed": s, "target_fvu": target, "scratch_final_fvu": final, "total_steps": total,
                                   "scratch_steps": steps_to_target(sc.curve["steps"], sc.curve["fvu"], target)}
            curves.setdefault(f"L{t}/scratch", []).append(sc.curve)
            for d in cfg.directions:
                src = source_layer(t, d)
                tr = cfg.sae.train(ctx, [t], seed=s, init=scratch[src], init_layer=src, name=f"{arch}_L{t}_from_L{src}")
                steps = steps_to_target(tr.curve["steps"], tr.curve["fvu"], target)
                rec[f"{d}_steps"] = steps
                rec[f"{d}_zero_shot_fvu"] = tr.curve["fvu"][0]
                rec[f"{d}_final_fvu"] = tr.curve["fvu"][-1]
                # fraction of the scratch run's steps saved; never reached = total steps (nothing saved)
                rec[f"{d}_saved"] = 1 - (total if steps is None else steps) / max(rec["scratch_steps"] or total, 1)
                curves.setdefault(f"L{t}/{d}", []).append(tr.curve)
            per_seed.append(rec)
        row: dict[str, Any] = {"layer": t, "per_seed": per_seed, "total_steps": per_seed[0]["total_steps"],
                               "target_fvu": cell(r["target_fvu"] for r in per_seed),
                               "scratch_steps": cell(r["scratch_steps"] for r in per_seed)}
        for d in cfg.directions:
            reached = [r[f"{d}_steps"] for r in per_seed if r[f"{d}_steps"] is not None]
            row[f"{d}_steps"] = cell(reached) if reached else None
            row[f"{d}_not_reached"] = len(per_seed) - len(reached)
            row[f"{d}_saved"] = cell(r[f"{d}_saved"] for r in per_seed)
            for k in ("zero_shot_fvu", "final_fvu"):
                row[f"{d}_{k}"] = cell(r[f"{d}_{k}"] for r in per_seed)
        log.info("transfer into layer %d: %s", t, {d: row[f"{d}_saved"]["mean"] for d in cfg.directions})
        rows.append(row)
    curve_summary = {}
    for name, cs in curves.items():
        fv = [cell(v) for v in zip(*[c["fvu"] for c in cs])]
        curve_summary[name] = {"steps": cs[0]["steps"], "mean": [x["mean"] for x in fv],
                               "low": [x["mean"] if x["low"] is None else x["low"] for x in fv],
                               "high": [x["mean"] if x["high"] is None else x["high"] for x in fv]}
    res = {"targets": targets, "directions": list(cfg.directions), "rows": rows, "curves": curve_summary,
           "model": cfg.data.model or "minilm", "seeds": list(seeds), "n_seeds": len(seeds), "data_seed": cfg.seed,
           "config": dataclasses.asdict(cfg)}
    res["claims"] = transfer_claims(res)
    save_png(transfer_figure(res), out_dir / "transfer_curves.png")
    write_json(out_dir / "transfer.json", to_jsonable(res))
    write_text(out_dir / "transfer_table.md",
               tables_markdown(transfer_tables(out_dir)))
    return res


def transfer_claims(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows: each direction speeds convergence (steps saved > 0), and forward vs backward (difference of the
    steps saved); per seed the mean over target layers."""
    n = res["n_seeds"]
    saved = {d: [sum(r["per_seed"][i][f"{d}_saved"] for r in res["rows"]) / len(res["rows"]) for i in range(n)]
             for d in res["directions"]}
    layers = ", ".join(str(t) for t in res["targets"])
    rule = "holds if the CI is above 0, does not hold if below, else inconclusive"
    rows = []
    for d in res["directions"]:
        s, verdict = diff_verdict(saved[d])
        rows.append({"claim": f"{d} layer-wise transfer speeds convergence",
                     "measurement": f"fraction of the scratch run's steps to the target FVU saved (layers {layers})",
                     "value": s, "rule": rule, "verdict": verdict})
    if {"forward", "backward"} <= set(saved):
        s, verdict = diff_verdict([f - b for f, b in zip(saved["forward"], saved["backward"])])
        rows.append({"claim": "forward transfer saves more steps than backward",
                     "measurement": "steps saved forward minus backward", "value": s, "rule": rule,
                     "verdict": verdict})
    return rows


def transfer_figure(res: dict[str, Any]):
    """Held-out FVU per optimiser step per target layer: scratch, forward, backward (mean and 95% CI band)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator

    from splinterp.layers import source_layer
    from splinterp.viz.style import integer_ticks, plain_log_ticks, style

    targets = res["targets"]
    fig = Figure(figsize=(4.8 * len(targets) + 0.5, 4.3))
    for i, t in enumerate(targets):
        ax = fig.add_subplot(1, len(targets), i + 1)
        for name in ("scratch", *res["directions"]):
            c = res["curves"].get(f"L{t}/{name}")
            if c is None:
                continue
            lab = "from scratch" if name == "scratch" else f"{name} (from layer {source_layer(t, name)})"
            st = style(name, label=lab, marker=None)
            ax.plot(c["steps"], c["mean"], lw=1.5, **st)
            ax.fill_between(c["steps"], c["low"], c["high"], color=st["color"], alpha=0.2, linewidth=0)
        ax.axhline(res["rows"][i]["target_fvu"]["mean"], color="0.4", ls=":",
                   label=f"target (scratch final x {1 + res['config']['target_slack']:g})")
        ax.set(xlabel="optimiser step", ylabel="held-out FVU (log scale)",
               title=f"SAE of layer {t}", yscale="log")
        integer_ticks(ax, "x")
        plain_log_ticks(ax, "y")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)))
        ax.legend(fontsize=8)
    sae = res["config"]["sae"]
    fig.suptitle(f"Layer-wise transfer, TopK d_sae {sae['d_sae']}, k {sae['k']}:\n"
                 "held-out FVU per step, mean and 95% CI band\n"
                 f"{_describe(res)}", fontsize=10)
    fig.tight_layout()
    return fig


def transfer_tables(folder: str | os.PathLike) -> dict[str, str]:
    """The README tables of the transfer job from `folder/transfer.json`: steps, claims."""
    res = json.loads((Path(folder) / "transfer.json").read_text("utf-8"))
    c = res["config"]
    dirs = res["directions"]
    head = (f"{_describe(res)}. TopK SAEs d_sae {c['sae']['d_sae']}, k {c['sae']['k']}, {c['sae']['epochs']} epochs "
            f"({res['rows'][0]['total_steps']} steps), FVU on held-out tokens every {c['sae']['eval_every']} steps; "
            f"target = scratch final FVU x {1 + c['target_slack']:g}. Cells: mean ± 95% CI half-width (n seeds); "
            "steps over the seeds that reached the target, 'saved' = 1 - transfer steps / scratch steps (never "
            "reached: 0).\n\n")
    cols = ["layer", "target FVU", "scratch steps"] + [f"{d} {x}" for d in dirs for x in
                                                       ("steps", "saved", "zero-shot FVU", "final FVU")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in res["rows"]:
        cells = [str(r["layer"]), format_cell(r["target_fvu"], ".4f"), format_cell(r["scratch_steps"], ".0f")]
        for d in dirs:
            nr = r[f"{d}_not_reached"]
            steps = format_cell(r[f"{d}_steps"], ".0f") + (f", {nr} not reached" if nr else "")
            cells += [steps, format_cell(r[f"{d}_saved"], ".2f"), format_cell(r[f"{d}_zero_shot_fvu"], ".3f"),
                      format_cell(r[f"{d}_final_fvu"], ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return {"steps": head + "\n".join(lines) + "\n", "claims": claims_markdown(res["claims"])}


@register("transfer", "Layer-wise SAE transfer on MiniLM activations: steps to a target FVU when layer l starts "
          "from the SAE of layer l-1 (forward) or l+1 (backward), vs from scratch; claims",
          outputs=["transfer.json", "transfer_table.md", "transfer_curves.png"], quick_seconds=20, quick_threads=1,
          tags=("llm",), tables=transfer_tables)
def transfer_job(out_dir: Path, run: RunSettings) -> dict:
    cfg = dataclasses.replace(llm_config(TransferConfig.preset, run), seeds=run.seeds)
    res = run_transfer(cfg, out_dir)
    return {"n_seeds": res["n_seeds"], "targets": res["targets"],
            "saved": {f"L{r['layer']}/{d}": r[f"{d}_saved"]["mean"] for r in res["rows"] for d in res["directions"]},
            "claims": {r["claim"]: r["verdict"] for r in res["claims"]}}
