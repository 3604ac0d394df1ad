"""Layer-wise SAE transfer on real transformer activations: steps to a target FVU, transfer vs from scratch.

Following Ghilardi et al. (BlackboxNLP 2024; `splinterp.layers.transfer`): the SAE of layer l starts from the
trained SAE of layer l - 1 (forward) or l + 1 (backward) and is fine-tuned on layer l with exactly the
settings of the from-scratch run (same epochs, batches, optimiser; fresh Adam state). The test FVU on layer
l's held-out tokens is recorded every `eval_every` optimiser steps. The target FVU of layer l is the
from-scratch run's final FVU times (1 + `target_slack`); "steps to target" is the first recorded step at
or below it (scratch reaches it by construction; a transfer run may reach it at step 0, i.e. zero-shot, or
never). Speed-up = scratch steps / transfer steps.

API: `TransferConfig` (+ `quick()`, `preset()`), `run_transfer(cfg, out_dir)`; job `transfer`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splinterp.atomic import write_json, write_text
from splinterp.errors import ConfigError
from splinterp.experiments.registry import RunSettings, llm_config, register, to_jsonable
from splinterp.llm import LayerSAEConfig, LLMContext, LLMDataConfig

log = logging.getLogger(__name__)


@dataclass
class TransferConfig:
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
    """Seed of every random choice (text order, initialisation, batch order, subsets)."""
    device: str = "cpu"
    """Torch device the model and the SAEs run on."""
    progress: bool = False
    """Progress bars while training."""

    def __post_init__(self) -> None:
        if any(d not in ("forward", "backward") for d in self.directions) or not self.directions:
            raise ConfigError(f"directions must be among 'forward', 'backward', got {self.directions!r}")
        if not self.target_slack >= 0:
            raise ConfigError(f"target_slack must be >= 0, got {self.target_slack!r}")

    @classmethod
    def quick(cls, **changes: Any) -> TransferConfig:
        base = cls(data=LLMDataConfig.preset(True), sae=LayerSAEConfig.preset(True), max_targets=1)
        return dataclasses.replace(base, **changes)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, device: str = "cpu", **changes: Any) -> TransferConfig:
        c = cls.quick() if quick else cls()
        return dataclasses.replace(c, seed=seed, device=device, **changes)


def _fmt_steps(s: int | None) -> str:
    return "not reached" if s is None else str(s)


def run_transfer(cfg: TransferConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Scratch and transfer runs with FVU curves; writes JSON, a markdown table and the curves figure."""
    from matplotlib.figure import Figure

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
    needed = sorted({t for t in targets} | {source_layer(t, d) for t in targets for d in cfg.directions})
    scratch = {v: cfg.sae.train(ctx, [v], seed=cfg.seed) for v in needed}
    rows, curves = [], {}
    for t in targets:
        sc = scratch[t]
        final = sc.curve["fvu"][-1]
        target = final * (1 + cfg.target_slack)
        row: dict[str, Any] = {"layer": t, "target_fvu": target, "scratch_final_fvu": final,
                               "scratch_steps": steps_to_target(sc.curve["steps"], sc.curve["fvu"], target),
                               "total_steps": sc.curve["steps"][-1]}
        curves[f"L{t}/scratch"] = sc.curve
        for d in cfg.directions:
            src = source_layer(t, d)
            tr = cfg.sae.train(ctx, [t], seed=cfg.seed, init=scratch[src], init_layer=src,
                               name=f"{arch}_L{t}_from_L{src}")
            steps = steps_to_target(tr.curve["steps"], tr.curve["fvu"], target)
            row[f"{d}_steps"] = steps
            row[f"{d}_zero_shot_fvu"] = tr.curve["fvu"][0]
            row[f"{d}_final_fvu"] = tr.curve["fvu"][-1]
            row[f"{d}_speedup"] = (row["scratch_steps"] / steps) if steps else (float("inf") if steps == 0 else None)
            curves[f"L{t}/{d}"] = tr.curve
        log.info("transfer into layer %d: target %.4f, scratch %s steps, %s", t, target, row["scratch_steps"],
                 ", ".join(f"{d} {_fmt_steps(row[f'{d}_steps'])}" for d in cfg.directions))
        rows.append(row)
    # figure: FVU curves per target layer
    fig = Figure(figsize=(4.5 * len(targets), 3.8))
    for i, t in enumerate(targets):
        ax = fig.add_subplot(1, len(targets), i + 1)
        for name, style in (("scratch", "k-"), ("forward", "C0-"), ("backward", "C3-")):
            c = curves.get(f"L{t}/{name}")
            if c is not None:
                lab = name if name == "scratch" else f"{name} (from L{source_layer(t, name)})"
                ax.plot(c["steps"], c["fvu"], style, label=lab, lw=1.3)
        ax.axhline(rows[i]["target_fvu"], color="0.5", ls=":", label="target")
        ax.set(yscale="log", xlabel="optimiser step", ylabel="test FVU", title=f"layer {t}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out_dir / "transfer_curves.png")
    head = "| layer | target FVU | scratch steps | " + " | ".join(
        f"{d} steps | {d} speed-up | {d} zero-shot FVU | {d} final FVU" for d in cfg.directions) + " |"
    lines = [head, "|" + "---|" * (3 + 4 * len(cfg.directions))]
    for r in rows:
        cells = [str(r["layer"]), f"{r['target_fvu']:.4f}", _fmt_steps(r["scratch_steps"])]
        for d in cfg.directions:
            sp = r[f"{d}_speedup"]
            speed = "-" if sp is None else ("inf" if sp == float("inf") else f"{sp:.2f}x")
            cells += [_fmt_steps(r[f"{d}_steps"]), speed, f"{r[f'{d}_zero_shot_fvu']:.3f}",
                      f"{r[f'{d}_final_fvu']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    md = (f"TopK SAEs d_sae {cfg.sae.d_sae}, k {cfg.sae.k}, {cfg.sae.epochs} epochs ({rows[0]['total_steps']} steps), "
          f"FVU on held-out tokens every {cfg.sae.eval_every} steps; target = scratch final FVU x "
          f"{1 + cfg.target_slack:g}.\n\n" + "\n".join(lines) + "\n")
    write_text(out_dir / "transfer_table.md", md)
    res = {"targets": targets, "rows": rows, "curves": curves, "model": cfg.data.model or "minilm",
           "config": dataclasses.asdict(cfg)}
    write_json(out_dir / "transfer.json", to_jsonable(res))
    return res


@register("transfer", "Layer-wise SAE transfer on MiniLM activations: steps to a target FVU when layer l starts "
          "from the SAE of layer l-1 (forward) or l+1 (backward), vs from scratch",
          outputs=["transfer.json", "transfer_table.md", "transfer_curves.png"], quick_seconds=20, quick_threads=1,
          tags=("llm",))
def transfer_job(out_dir: Path, run: RunSettings) -> dict:
    res = run_transfer(llm_config(TransferConfig.preset, run), out_dir)
    return {"rows": [{k: v for k, v in r.items() if k.endswith("steps") or k in ("layer", "target_fvu")}
                     for r in res["rows"]]}
