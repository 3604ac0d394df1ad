"""Exact region partitions of planes through real LLM activations: a TopK SAE and a ReLU SAE side by side.

Two planes through the standardised MiniLM activations of the middle block (the LLM jobs' shared harvest):
the plane through three chosen held-out tokens, and the plane through the mean of the held-out tokens along
their top-2 principal directions. Each is cut exactly by `geometry.slice_2d`; the held-out tokens are
projected onto the plane. The interactive pages show, on hover over a region, its active latents with their
values, and over a token its text, context, region and reconstruction error. See `registry` for the job
contract.

The SAEs come from the store of `splinterp.llm` with the llm_geometry job's training settings
(`SweepPointConfig`, TopK k=8 / ReLU L1 0.003 in quick mode), so one output folder trains each once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from splinterp.experiments.registry import RunSettings, register
from splinterp.viz.output import save_png, write_html

log = logging.getLogger(__name__)

# the llm_geometry job's per-architecture knobs (quick, full), so the SAE store trains each SAE once per folder
_KNOBS = {True: {"topk": 8, "relu": 0.003}, False: {"topk": 32, "relu": 0.004}}


@register("llm_partitions", "Exact region partitions (slice_2d) of planes through real MiniLM token activations "
          "(through three held-out tokens; through the mean along the top-2 principal directions), TopK vs ReLU SAE, "
          "held-out tokens projected; interactive pages hover regions (active latents) and tokens",
          outputs=["llm_slice_partitions.png", "llm_slice_tokens.html", "llm_slice_pca.html"], quick_seconds=25,
          quick_threads=1, tags=("llm",))
def llm_partitions(out_dir: Path, run: RunSettings) -> dict:
    from matplotlib.figure import Figure

    from splinterp.geometry import plane_through
    from splinterp.llm import LLMContext, LLMDataConfig, SweepPointConfig
    from splinterp.viz.llm import pick_tokens, points_from_cache
    from splinterp.viz.slices import (
        data_bounds,
        pca_plane,
        plot_slices,
        plot_slices_plotly,
        project_points,
        slice_legend_handles,
        slice_views,
    )

    quick, seed = run.quick, run.seed
    data = LLMDataConfig.preset(quick, **run.llm_data_changes())
    ctx = LLMContext(out_dir, data, seed=seed, device=run.device, progress=run.progress)
    layer = ctx.pick_layer(run.layer)
    training = SweepPointConfig.preset(quick)
    knobs = _KNOBS[quick]
    saes = {}
    for arch in ("topk", "relu"):
        t = training.train(ctx, arch, knobs[arch], layer, seed=seed, progress=run.progress)
        sae = t.sae.cpu().eval()
        knob = f"k={sae.cfg.k}" if arch == "topk" else f"L1 {knobs[arch]:g}"
        saes[f"{'TopK' if arch == 'topk' else 'ReLU'} SAE (d_sae={sae.cfg.d_sae}, {knob})"] = sae
    X, toks, contexts = points_from_cache(ctx.cache, layer, n=600 if quick else 2000, split="test", seed=seed)
    Xs = ctx.standardizer(layer).transform(X).float()
    model = data.model or "all-MiniLM-L6-v2"
    where = f"{model.split('/')[-1]}, block {layer} resid_post, {len(toks)} held-out tokens"
    res: dict = {"layer": layer, "n_tokens": len(toks)}

    # plane 1: through three chosen held-out tokens
    picks = pick_tokens(toks)
    plane = plane_through(*(Xs[i] for i in picks))
    labels = [repr(toks[i]) for i in picks]
    box_tok = plane.bounds(0.3 if quick else 0.2)
    v_tok = slice_views(saes, plane, box_tok, Xs, toks, contexts, anchor_labels=labels)
    axis_tok = (f"a: along {labels[0]} → {labels[1]}", f"b: orthogonal, towards {labels[2]}")
    # plane 2: data mean, top-2 principal directions
    pplane, explained = pca_plane(Xs)
    ab, _ = project_points(pplane, Xs)
    box_pca = data_bounds(ab)
    v_pca = slice_views(saes, pplane, box_pca, Xs, toks, contexts, anchor_labels=["mean"])
    axis_pca = (f"PC1 ({100 * explained[0]:.1f}% of variance)", f"PC2 ({100 * explained[1]:.1f}% of variance)")

    fig = Figure(figsize=(13.5, 12.5), layout="constrained")
    sub = fig.subfigures(2, 1)
    for sf, views, axis, what in ((sub[0], v_tok, axis_tok, f"plane through the tokens {', '.join(labels)}"),
                                  (sub[1], v_pca, axis_pca, "plane through the mean along the top-2 principal "
                                                            "directions")):
        axes = sf.subplots(1, len(views))
        plot_slices(views, axis_labels=axis, ax_row=axes)
        sf.suptitle(what, fontsize=11)
    fig.suptitle(f"Exact SAE regions on planes through real LLM activations ({where})", fontsize=13)
    fig.legend(handles=slice_legend_handles(), loc="outside lower center", ncols=3, fontsize=9)
    save_png(fig, out_dir / "llm_slice_partitions.png")
    write_html(plot_slices_plotly(v_tok, axis_labels=axis_tok,
                                  title=f"Exact SAE regions on the plane through {', '.join(labels)} ({where}); "
                                        "hover a region or a token"), out_dir / "llm_slice_tokens.html")
    write_html(plot_slices_plotly(v_pca, axis_labels=axis_pca,
                                  title=f"Exact SAE regions on the top-2 PCA plane ({where}); hover a region or a "
                                        "token"), out_dir / "llm_slice_pca.html")
    for plane_name, views in (("tokens", v_tok), ("pca", v_pca)):
        for key, v in zip(("topk", "relu"), views):
            res[f"{plane_name}_{key}_regions"] = v.n_regions
            res[f"{plane_name}_{key}_area_error"] = v.slice.area_error()
            res[f"{plane_name}_{key}_tokens_in_view"] = int((v.point_region >= 0).sum())
    res["anchor_tokens"] = labels
    res["pca_explained"] = explained.round(4).tolist()
    return res
