"""Real activations projected to 2-D/3-D (PCA), coloured by SAE region, by top latent, or by one latent.

`activation_projection` does the work once (PCA, regions, hover text) and both renderers read it:
`plot_activation_projection` (interactive plotly, hover = token, region id, active latents) and
`plot_activation_projection_static` (matplotlib, for PNGs). Data come from an `ActivationCache`
(`points_from_cache`) or from any array [N, d] plus optional token strings.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from matplotlib.figure import Figure

from splinterp.viz.colors import MAX_DISTINCT, palette, to_hex

OTHER = "other"
COLOR_BY = ("region", "top_latent", "latent", "none")


@dataclass
class Projection:
    """What both renderers draw: coordinates, one category (or value) per point, hover text."""

    coords: np.ndarray  # [n, dims]
    explained: np.ndarray  # explained-variance ratio of each PCA axis
    categories: list[str] | None  # legend group per point (region / top latent), None for continuous
    values: np.ndarray | None  # continuous colour (one latent's activation), None for categorical
    hover: list[str]
    title: str
    order: list[str] = field(default_factory=list)  # legend order of the categories
    detail: list[str] | None = None  # per point its own region / latent, also for points in "other"


def pca(X: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coords [N, n], components [n, d], explained-variance ratios [n]) of centred X, from the eigen-
    decomposition of the d x d scatter matrix in float64 (cheap for N >> d)."""
    Xd = X.double()
    Xc = Xd - Xd.mean(0)
    evals, evecs = torch.linalg.eigh(Xc.T @ Xc)
    order = torch.argsort(evals, descending=True)[:n_components]
    comps = evecs[:, order].T
    # fix the sign so that the largest |entry| of each component is positive: deterministic pictures
    sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * sign
    total = evals.clamp(min=0).sum()
    return (Xc @ comps.T).float(), comps.float(), (evals[order].clamp(min=0) / total).float()


def points_from_cache(cache, layer: int, n: int = 3000, split: str | None = "test", seed: int = 0
                      ) -> tuple[torch.Tensor, list[str], list[str]]:
    """Up to n random tokens of one layer of an `ActivationCache`: (X [n, d], token strings, contexts).

    contexts: the few tokens before each token (from the same text), for the hover text.
    """
    X = cache.load(layer, split=split)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(X.shape[0], generator=g)[: min(n, X.shape[0])].sort().values
    if not (cache.folder / "vocab.json").is_file():  # a cache without token strings still gets a picture
        return X[pick], [f"#{int(i)}" for i in pick], ["" for _ in pick]
    toks_all = cache.token_strings(split)
    text_ids = cache.text_ids(split)
    pos = cache.positions(split)
    toks = [toks_all[i] for i in pick.tolist()]
    ctx = []
    for i in pick.tolist():
        lo = i
        while lo > 0 and i - lo < 6 and text_ids[lo - 1] == text_ids[i] and pos[lo - 1] == pos[lo] - 1:
            lo -= 1
        ctx.append(" ".join(toks_all[lo:i]))
    return X[pick], toks, ctx


def pick_tokens(tokens: list[str], n: int = 3) -> list[int]:
    """Indices of n held-out tokens to build the plane through: whole words (letters only, 3+ characters, not a
    word piece), distinct strings, spread over the list (first, middle, last candidate); deterministic."""
    cand = [i for i, t in enumerate(tokens) if t.isalpha() and len(t) >= 3]
    seen, uniq = set(), []
    for i in cand:
        if tokens[i] not in seen:
            seen.add(tokens[i])
            uniq.append(i)
    if len(uniq) < n:
        uniq = list(dict.fromkeys(uniq + list(range(len(tokens)))))
    pos = np.linspace(0, len(uniq) - 1, n).round().astype(int)
    return [uniq[p] for p in pos]


def activation_projection(
    X,
    sae=None,
    *,
    tokens: Sequence[str] | None = None,
    contexts: Sequence[str] | None = None,
    color_by: str | Sequence = "region",
    latent: int | None = None,
    dims: int = 2,
    max_points: int = 5000,
    top_categories: int = 12,
    n_hover_latents: int = 6,
    seed: int = 0,
) -> Projection:
    """Project X [N, d] on its top `dims` principal axes and work out colours and hover text.

    color_by: "region" (the `top_categories` most visited SAE regions get their own colour, the rest are
    "other"), "top_latent" (the latent with the largest activation), "latent" (the value of latent
    `latent`, continuous), "none", or a sequence of N labels of your own.
    """
    from splinterp.geometry import active_mask, region_ids

    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, torch.Tensor) or X.ndim != 2 or X.shape[0] < dims + 1:
        raise ValueError(f"X must be an array [N, d] with N > dims={dims}, got "
                         f"{tuple(X.shape) if hasattr(X, 'shape') else type(X).__name__}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if X.shape[1] < dims:
        raise ValueError(f"X has {X.shape[1]} features, fewer than dims={dims}")
    custom = None
    if not isinstance(color_by, str):
        custom = [str(c) for c in color_by]
        if len(custom) != X.shape[0]:
            raise ValueError(f"color_by has {len(custom)} labels for {X.shape[0]} points")
    elif color_by not in COLOR_BY:
        raise ValueError(f"color_by must be one of {COLOR_BY} or a sequence of labels, got {color_by!r}")
    if isinstance(color_by, str) and color_by in ("region", "top_latent", "latent") and sae is None:
        raise ValueError(f"color_by={color_by!r} needs an sae")
    if color_by == "latent" and (latent is None or sae is None or not 0 <= latent < sae.cfg.d_sae):
        raise ValueError(f"color_by='latent' needs latent in [0, d_sae), got {latent!r}")
    for name, seq in (("tokens", tokens), ("contexts", contexts)):
        if seq is not None and len(seq) != X.shape[0]:
            raise ValueError(f"{name} has {len(seq)} entries for {X.shape[0]} points")

    n = X.shape[0]
    keep = np.arange(n)
    if n > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    Xk = X[torch.from_numpy(keep)]
    coords, _, explained = pca(Xk.float(), dims)

    hover = [f"point {int(i)}" for i in keep]
    if tokens is not None:
        hover = [f"token: <b>{html.escape(repr(tokens[i]))}</b>" for i in keep]
        if contexts is not None:
            hover = [h + f"<br>context: …{html.escape(contexts[i][-60:])}" for h, i in zip(hover, keep)]
    categories = values = detail = None
    title = "PCA of activations"
    if sae is not None:
        Xs = Xk.to(sae.dtype)
        with torch.no_grad():
            z = sae.encode(Xs.to(sae.device)).float().cpu()
        mask = active_mask(sae, Xs)
        rid = region_ids(sae, Xs).numpy()
        sizes = np.bincount(rid)
        for j in range(len(hover)):
            act = mask[j].nonzero().ravel()
            top = act[torch.argsort(z[j, act].abs(), descending=True)][:n_hover_latents]
            lat = ", ".join(f"{int(t)} ({float(z[j, t]):.2f})" for t in top)
            more = f" +{len(act) - len(top)} more" if len(act) > len(top) else ""
            hover[j] += (f"<br>region: {int(rid[j])} ({int(sizes[rid[j]])} of {len(rid)} points)"
                         f"<br>active latents ({len(act)}): {lat}{more}")
        if color_by == "region":
            top_r = [r for r in np.argsort(-sizes, kind="stable")[:top_categories] if sizes[r] > 1]
            categories = [f"region {r}" if r in top_r else OTHER for r in rid]
            detail = [f"region {r}" for r in rid]
            n_single = int((sizes[rid] == 1).sum())
            title = (f"PCA of activations, colour: SAE region ({len(sizes)} regions among {len(rid)} points, "
                     f"{n_single} points alone in theirs; one colour each)")
        elif color_by == "top_latent":
            any_active = mask.any(1).numpy()
            best = z.abs().argmax(1).numpy()
            lab = np.where(any_active, best, -1)
            counts = {int(v): int((lab == v).sum()) for v in np.unique(lab) if v >= 0}
            top_l = sorted(counts, key=lambda v: (-counts[v], v))[:top_categories]
            categories = [f"latent {v}" if v in top_l else ("no latent" if v < 0 else OTHER) for v in lab]
            detail = [f"latent {v}" if v >= 0 else "no latent" for v in lab]
            title = f"PCA of activations, colour: most active latent ({len(counts)} latents, one colour each)"
        elif color_by == "latent":
            values = z[:, latent].numpy()
            title = f"PCA of activations, coloured by latent {latent}"
    if custom is not None:
        categories = [custom[i] for i in keep]
        title = "PCA of activations"
    order: list[str] = []
    if categories is not None:
        uniq = list(dict.fromkeys(categories))
        order = sorted((c for c in uniq if c not in (OTHER, "no latent")),
                       key=lambda c: (-categories.count(c), c)) + [c for c in (OTHER, "no latent") if c in uniq]
    return Projection(coords.numpy(), explained.numpy(), categories, values, hover, title, order, detail)


def _point_colors(p: Projection) -> list[str]:
    """A colour per point: its category's colour; points in "other" get their own region's / latent's colour
    (distinct from the named ones as far as the palette allows), so no large group is a uniform grey."""
    cols = _category_colors(p.order)
    named = [c for c in p.order if c not in (OTHER, "no latent")]
    rest = [d for d in dict.fromkeys(p.detail or []) if d not in named and d != "no latent"]
    pal = palette(MAX_DISTINCT)
    own = {d: to_hex(pal[(len(named) + i) % MAX_DISTINCT] * 0.85) for i, d in enumerate(rest)}
    out = []
    for i, c in enumerate(p.categories):
        out.append(own.get(p.detail[i], cols[c]) if c == OTHER and p.detail is not None else cols[c])
    return out


def _other_label(p: Projection, n_points: int) -> str:
    kinds = {d for d, c in zip(p.detail or [], p.categories) if c == OTHER}
    what = "regions" if any(k.startswith("region") for k in kinds) else "latents"
    return f"other {what} ({len(kinds)}, one colour each; {n_points} points)"


def _category_colors(order: list[str]) -> dict[str, str]:
    named = [c for c in order if c not in (OTHER, "no latent")]
    cols = {c: to_hex(rgb * 0.85) for c, rgb in zip(named, palette(len(named)))}
    cols[OTHER] = "#b4b4b4"
    cols["no latent"] = "#505050"
    return cols


def plot_activation_projection(X, sae=None, **kwargs):
    """Interactive plotly scatter (2-D or 3-D) of `activation_projection(X, sae, **kwargs)`.

    Hover shows the token (and its context), the region id and size, and the active latents with values.
    Returns a `plotly.graph_objects.Figure`; write it with `splinterp.viz.write_html`.
    """
    import plotly.graph_objects as go

    p = kwargs.pop("projection", None) or activation_projection(X, sae, **kwargs)
    dims = p.coords.shape[1]
    axis = [f"PC{i + 1} ({100 * e:.1f}% var)" for i, e in enumerate(p.explained)]
    scatter = go.Scatter3d if dims == 3 else go.Scattergl
    msize = 3 if dims == 3 else 6
    fig = go.Figure()

    def trace(idx, name, marker):
        xyz = {"x": p.coords[idx, 0], "y": p.coords[idx, 1]}
        if dims == 3:
            xyz["z"] = p.coords[idx, 2]
        return scatter(mode="markers", name=name, marker=marker, text=[p.hover[i] for i in idx],
                       hovertemplate="%{text}<extra></extra>", **xyz)

    if p.categories is not None:
        pcols = np.asarray(_point_colors(p))
        cats = np.asarray(p.categories)
        for c in p.order:
            idx = np.flatnonzero(cats == c)
            name = _other_label(p, len(idx)) if c == OTHER else f"{c} ({len(idx)})"
            fig.add_trace(trace(idx, name, {"size": msize, "color": pcols[idx].tolist(), "line": {"width": 0},
                                            "opacity": 0.85}))
    else:
        marker = {"size": msize, "opacity": 0.85}
        if p.values is not None:
            marker.update(color=p.values, colorscale="Viridis", showscale=True, colorbar={"title": "activation"})
        fig.add_trace(trace(np.arange(len(p.coords)), "points", marker))
    layout = {"title": {"text": p.title, "font": {"size": 14}}, "legend": {"itemsizing": "constant"},
              "template": "plotly_white", "width": 900, "height": 650, "margin": {"l": 10, "r": 10, "t": 50, "b": 10}}
    if dims == 3:
        layout["scene"] = {"xaxis_title": axis[0], "yaxis_title": axis[1], "zaxis_title": axis[2]}
    else:
        layout.update(xaxis_title=axis[0], yaxis_title=axis[1])
        layout["yaxis"] = {"scaleanchor": "x", "scaleratio": 1}
    fig.update_layout(**layout)
    return fig


def plot_activation_projection_static(X, sae=None, **kwargs) -> Figure:
    """The same picture as `plot_activation_projection`, as a matplotlib Figure (for PNGs; no hover)."""
    p = kwargs.pop("projection", None) or activation_projection(X, sae, **kwargs)
    dims = p.coords.shape[1]
    fig = Figure(figsize=(7.5, 6), layout="constrained")
    ax = fig.add_subplot(projection="3d" if dims == 3 else None)
    axis = [f"PC{i + 1} ({100 * e:.1f}% var)" for i, e in enumerate(p.explained)]
    s = 6 if dims == 3 else 9
    if p.categories is not None:
        pcols = np.asarray(_point_colors(p))
        cats = np.asarray(p.categories)
        for c in reversed(p.order):  # "other" first, so named categories are drawn on top
            idx = np.flatnonzero(cats == c)
            name = _other_label(p, len(idx)) if c == OTHER else f"{c} ({len(idx)})"
            ax.scatter(*p.coords[idx].T, s=s, c=pcols[idx].tolist(), label=name, linewidths=0)
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[::-1], labels[::-1], fontsize=7, markerscale=2, loc="best")
    else:
        sc = ax.scatter(*p.coords.T, s=s, c=p.values if p.values is not None else "0.3", cmap="viridis",
                        linewidths=0)
        if p.values is not None:
            fig.colorbar(sc, ax=ax, label="activation")
    ax.set_xlabel(axis[0])
    ax.set_ylabel(axis[1])
    if dims == 3:
        ax.set_zlabel(axis[2])
    else:
        ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(p.title, fontsize=10)
    return fig
