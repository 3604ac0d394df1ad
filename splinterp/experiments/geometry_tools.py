"""Figures of the exact region tools (see `splinterp.viz.tools`): regions and reconstruction error along a segment
between two MNIST digits and between two held-out tokens, boundary-distance histograms per architecture, and a
local-complexity map over a slice. See `registry` for the job contract.

Each job also checks the exactness its picture claims and returns it (the fraction of dense samples along a
segment whose `encode` active set is the exact piece's; must be 1.0 up to samples on a breakpoint).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from splinterp.experiments.registry import RunSettings, register
from splinterp.viz.output import save_png

log = logging.getLogger(__name__)

ARCHITECTURES = ("relu", "topk", "topk_abs", "jumprelu", "gated")
# sparsity knobs (k for topk / topk_abs, the sparsity coefficient otherwise) that give MNIST SAEs of comparable L0
MNIST_KNOBS = {"relu": 3e-3, "topk": 8, "topk_abs": 8, "jumprelu": 1e-3, "gated": 3e-3}


def _train_mnist_saes(X: torch.Tensor, quick: bool, seed: int, device: str) -> dict:
    from splinterp.llm import SweepPointConfig
    from splinterp.train import train_sgd

    point = SweepPointConfig.preset(quick, d_sae=64 if quick else 256, epochs=2 if quick else 10, batch_size=128)
    saes = {}
    for arch in ARCHITECTURES:
        sae_cfg, train_cfg = point.configs(arch, MNIST_KNOBS[arch], X.shape[1], seed, device)
        from splinterp import SAE

        sae = SAE(sae_cfg)
        train_sgd(sae, X, train_cfg)
        saes[arch] = sae.cpu().eval()
    return saes


def _segment_check(sae, seg) -> float:
    """Fraction of 1000 uniform samples whose encode active set equals the exact piece's (samples within 1e-9
    of a breakpoint excluded: there the piece is decided by rounding)."""
    from splinterp.viz.tools import segment_errors

    t, _, same = segment_errors(sae, seg)
    near = np.min(np.abs(t[:, None] - seg.breaks[None, :]), axis=1) < 1e-9 if len(seg.breaks) else np.zeros(len(t),
                                                                                                            bool)
    return float(same[~near].mean())


@register("mnist_geometry_tools", "Exact region tools on MNIST SAEs of five architectures: the regions and the "
          "error along a segment between two test digits, boundary-distance histograms per architecture, and a "
          "local-complexity map over the plane through digits 0, 1, 7",
          outputs=["segments_mnist.png", "boundary_distance_hist.png", "local_complexity_map.png"], quick_seconds=30)
def mnist_geometry_tools(out_dir: Path, run: RunSettings) -> dict:
    from splinterp.data.mnist import load_mnist
    from splinterp.geometry import boundary_distance, plane_through, segment_regions, slice_2d
    from splinterp.viz.tools import complexity_grid, plot_boundary_histograms, plot_complexity_maps, plot_segments

    quick, seed, device = run.quick, run.seed, run.device
    n = 1500 if quick else 4000
    X, y = load_mnist("train", n=n, seed=seed, device=device)
    saes = _train_mnist_saes(X, quick, seed, device)
    d_sae = saes["topk"].cfg.d_sae
    Xt, yt = load_mnist("test", n=300 if quick else 2000, seed=seed)
    res: dict = {"n_train": n, "d_sae": d_sae, "n_test": int(Xt.shape[0])}

    # 1. segment between a test 3 and a test 8
    i3, i8 = (int(torch.nonzero(yt == d)[0]) for d in (3, 8))
    segs = {}
    for arch, title in (("topk", f"TopK SAE (d_sae={d_sae}, k=8)"), ("relu", f"ReLU SAE (d_sae={d_sae})")):
        seg = segment_regions(saes[arch], Xt[i3], Xt[i8])
        segs[title] = (saes[arch], seg, arch)
        res[f"segment_{arch}_pieces"] = len(seg)
        res[f"segment_{arch}_encode_agreement"] = _segment_check(saes[arch], seg)
    save_png(plot_segments(segs, endpoints=("digit 3", "digit 8"), images=[Xt[i3].numpy(), Xt[i8].numpy()],
                           suptitle=f"Regions and reconstruction error along the segment between two MNIST test "
                                    f"digits (SAEs trained on {n} digits)"), out_dir / "segments_mnist.png")

    # 2. boundary distance per architecture, on the test digits
    dists = {}
    for arch, sae in saes.items():
        d = boundary_distance(sae, Xt.to(sae.dtype)).distance.numpy()
        dists[arch] = d
        res[f"boundary_distance_median[{arch}]"] = float(np.median(d[np.isfinite(d)]))
    save_png(plot_boundary_histograms(dists, suptitle=f"Distance from each of {Xt.shape[0]} MNIST test digits to the "
                                                      f"boundary of its SAE region (d_sae={d_sae}, exact)",
                                      xlabel="Euclidean distance to the region's boundary (input units)"),
             out_dir / "boundary_distance_hist.png")

    # 3. local complexity over the plane through training digits 0, 1, 7
    picks = [int(torch.nonzero(y == dgt)[0]) for dgt in (0, 1, 7)]
    plane = plane_through(*(X[i].cpu() for i in picks))
    bounds = plane.bounds(0.3)
    side = bounds[1] - bounds[0]
    radius = 0.05 * side
    maps = {}
    for arch, title in (("topk", f"TopK SAE (d_sae={d_sae}, k=8)"), ("relu", f"ReLU SAE (d_sae={d_sae})")):
        sl = slice_2d(saes[arch], plane, bounds=bounds)
        grid = complexity_grid(saes[arch], sl, radius, resolution=70 if quick else 200)
        maps[title] = (sl, grid)
        res[f"local_complexity_mean[{arch}]"] = float(grid.mean())
    save_png(plot_complexity_maps(maps, radius=radius, anchors_ab=plane.coords, anchor_labels=["0", "1", "7"],
                                  axis_labels=("a: along digit 0 → digit 1", "b: orthogonal, towards digit 7"),
                                  suptitle="Local complexity (boundaries within a ball in input space) over the plane "
                                           "through three MNIST digits"), out_dir / "local_complexity_map.png")
    res["local_complexity_radius"] = radius
    return res


@register("llm_segments", "The exact regions and the reconstruction error along the segment between two held-out "
          "MiniLM tokens, TopK vs ReLU SAE", outputs=["segments_tokens.png"], quick_seconds=20, quick_threads=1,
          tags=("llm",))
def llm_segments(out_dir: Path, run: RunSettings) -> dict:
    """The SAEs are the llm_partitions job's (the `splinterp.llm` store trains each once per output folder)."""
    from splinterp.geometry import segment_regions
    from splinterp.llm import LLMContext, LLMDataConfig, SweepPointConfig
    from splinterp.viz.llm import pick_tokens, points_from_cache
    from splinterp.viz.tools import plot_segments

    quick, seed = run.quick, run.seed
    data = LLMDataConfig.preset(quick, **run.llm_data_changes())
    ctx = LLMContext(out_dir, data, seed=seed, device=run.device, progress=run.progress)
    layer = ctx.pick_layer(run.layer)
    training = SweepPointConfig.preset(quick)
    knobs = {"topk": 8, "relu": 0.003} if quick else {"topk": 32, "relu": 0.004}  # llm_geometry's knobs
    X, toks, _ = points_from_cache(ctx.cache, layer, n=600 if quick else 2000, split="test", seed=seed)
    Xs = ctx.standardizer(layer).transform(X).float()
    a, b = pick_tokens(toks, 2)
    segs, res = {}, {"layer": layer, "tokens": [toks[a], toks[b]]}
    for arch in ("topk", "relu"):
        sae = training.train(ctx, arch, knobs[arch], layer, seed=seed, progress=run.progress).sae.cpu().eval()
        seg = segment_regions(sae, Xs[a], Xs[b])
        title = f"{'TopK' if arch == 'topk' else 'ReLU'} SAE (d_sae={sae.cfg.d_sae})"
        segs[title] = (sae, seg, arch)
        res[f"segment_{arch}_pieces"] = len(seg)
        res[f"segment_{arch}_encode_agreement"] = _segment_check(sae, seg)
    model = data.model or "all-MiniLM-L6-v2"
    save_png(plot_segments(segs, endpoints=(repr(toks[a]), repr(toks[b])),
                           suptitle=f"Regions and reconstruction error between two held-out tokens "
                                    f"({model.split('/')[-1]}, block {layer} resid_post, standardised)"),
             out_dir / "segments_tokens.png")
    return res
