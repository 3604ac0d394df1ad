"""Figure 7 done exactly: a power diagram in the plane is the section {h = 0} of a Voronoi diagram one
dimension up.

Lift each site to p_i = (c_i, h_i) with h_i = sqrt(K - alpha_i) (`PowerDiagram.lift`, K >= max alpha).
For x in the plane, |(x, 0) - p_i|^2 = |x - c_i|^2 + K - alpha_i = pow_i(x) + K, so the nearest lifted
site of (x, 0) is the site whose power cell holds x: higher sites have smaller weights and smaller cells.

Drawn here, all exactly: the lifted sites; the true 3-D Voronoi cells of the lifted sites clipped to a box
above the plane (half-space intersections, faces and edges, in the colour of their site); the exact
power diagram on the plane (`cells_2d`), whose cells are those 3-D cells' footprints on {h = 0}; drop lines;
and a few probe points joined to their nearest lifted site. `plot_lift_3d` is matplotlib (static);
`plot_lift_plotly` is the interactive version (write it with `splinterp.viz.write_html`).

The authors' version drew a Delaunay/alpha-shape surface as "3-D Voronoi", used weights linear in height
plus noise (one negative, hence a NaN circle), and transposed the plane's raster; none of that here.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from mpl_toolkits.mplot3d.art3d import Line3DCollection, Poly3DCollection
from scipy.optimize import linprog
from scipy.spatial import HalfspaceIntersection

from splinterp.viz.cells import cell_key, cells_colormap, draw_cells, setup_axes
from splinterp.viz.colors import ColorMap, to_hex
from splinterp.viz.power import draw_sites, site_colors
from splinterp.viz.raster import check_bounds


def fig7_sites(seed: int = 42, n: int = 12, box: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Default inputs of figure 7: n centres in [-0.85 box, 0.85 box]^2 and weights U[0, 1.5]."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-0.85 * box, 0.85 * box, (n, 2)), rng.uniform(0.0, 1.5, n)


def default_K(weights: np.ndarray) -> float:
    """A lifting constant a little above max alpha, so that every lifted site is strictly above the plane."""
    w = np.asarray(weights, dtype=np.float64)
    spread = float(w.max() - w.min())
    return float(w.max() + max(0.25 * spread, 0.1))


def _interior_point(A: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """Chebyshev centre of {x : A x <= b} (None if the set has no interior)."""
    norms = np.linalg.norm(A, axis=1)
    c = np.zeros(A.shape[1] + 1)
    c[-1] = -1.0
    res = linprog(c, A_ub=np.hstack([A, norms[:, None]]), b_ub=b, bounds=[(None, None)] * A.shape[1] + [(0, None)],
                  method="highs")
    if res.status != 0 or res.x[-1] <= 1e-9:
        return None
    return res.x[:-1]


def voronoi_cells_3d(points: np.ndarray, lo, hi, tol: float = 1e-9) -> list[list[np.ndarray]]:
    """The Voronoi cells of `points` [m, 3] clipped to the box [lo, hi], as lists of planar faces
    (each [V, 3], vertices in order around the face). An empty list for a cell that misses the box.

    Each cell is {p : |p - s_i|^2 <= |p - s_j|^2 for all j} = {2 (s_j - s_i) . p <= |s_j|^2 - |s_i|^2},
    intersected with the box, computed as an exact half-space intersection.
    """
    P = np.asarray(points, dtype=np.float64)
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    box_A = np.vstack([np.eye(3), -np.eye(3)])
    box_b = np.concatenate([hi, -lo])
    sq = np.einsum("ij,ij->i", P, P)
    out = []
    for i in range(len(P)):
        others = np.delete(np.arange(len(P)), i)
        A = np.vstack([2.0 * (P[others] - P[i]), box_A])
        b = np.concatenate([sq[others] - sq[i], box_b])
        x0 = _interior_point(A, b)
        if x0 is None:
            out.append([])
            continue
        hs = HalfspaceIntersection(np.hstack([A, -b[:, None]]), x0)
        V = hs.intersections
        faces = []
        scale = np.abs(A).sum(1) * (np.abs(V).max() + 1.0) + np.abs(b)
        for a_row, b_val, s in zip(A, b, scale):
            on = np.abs(V @ a_row - b_val) <= tol * s
            F = V[on]
            if len(F) < 3:
                continue
            F = np.unique(np.round(F, 12), axis=0)
            if len(F) < 3:
                continue
            n = a_row / np.linalg.norm(a_row)
            u = np.cross(n, [1.0, 0, 0] if abs(n[0]) < 0.9 else [0, 1.0, 0])
            u /= np.linalg.norm(u)
            w = np.cross(n, u)
            ctr = F.mean(0)
            ang = np.arctan2((F - ctr) @ w, (F - ctr) @ u)
            faces.append(F[np.argsort(ang)])
        out.append(faces)
    return out


def _probe_points(pd, bounds, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 7)
    xmin, xmax, ymin, ymax = check_bounds(bounds)
    return np.column_stack([rng.uniform(xmin + 0.15 * (xmax - xmin), xmax - 0.15 * (xmax - xmin), n),
                            rng.uniform(ymin + 0.15 * (ymax - ymin), ymax - 0.15 * (ymax - ymin), n)])


def lift_scene(pd, bounds, K: float | None = None, n_probes: int = 3, seed: int = 0, top: float | None = None
               ) -> dict:
    """Everything the lift pictures draw: lifted sites, clipped 3-D Voronoi cells, plane cells, probes."""
    if pd.dim != 2 or pd.order != 1 or pd.null_site:
        raise ValueError("the lifting picture is for first-order 2-D power diagrams without a null site")
    K = default_K(pd.weights) if K is None else float(K)
    lifted = pd.lift(K)
    xmin, xmax, ymin, ymax = check_bounds(bounds)
    hmax = float(lifted[:, 2].max())
    top = 1.25 * hmax if top is None else float(top)
    cells3d = voronoi_cells_3d(lifted, [xmin, ymin, 0.0], [xmax, ymax, top])
    cells = pd.cells_2d(bounds)
    probes = _probe_points(pd, bounds, n_probes, seed)
    d2 = ((probes[:, None, :] - lifted[None, :, :2]) ** 2).sum(-1) + lifted[None, :, 2] ** 2
    nearest = d2.argmin(1)
    # the exactness the picture claims: nearest lifted site == power cell of the probe
    if not np.array_equal(nearest, pd.keys(probes)[:, 0]):  # would draw a false picture: a bug, not bad input
        raise RuntimeError("the lifted nearest site disagrees with the power cell of a probe point")
    return {"K": K, "lifted": lifted, "cells3d": cells3d, "cells": cells, "probes": probes, "nearest": nearest,
            "top": top}


def plot_lift_3d(pd, bounds=(-2, 2, -2, 2), K: float | None = None, n_probes: int = 3, seed: int = 0,
                 elev: float = 22, azim: float = -60, show_cells3d: bool = True) -> Figure:
    """Static figure 7: left, the 3-D scene (lifted sites, their clipped Voronoi cells, the plane with the
    exact power diagram, drop lines, probes); middle, the plane seen from above with sqrt(alpha) circles;
    right, each site's lift height against its cell's area (higher site, smaller weight, smaller cell)."""
    s = lift_scene(pd, bounds, K, n_probes, seed)
    m = pd.n_sites
    cmap = ColorMap([(i,) for i in range(m)])
    xmin, xmax, ymin, ymax = check_bounds(bounds)
    fig = Figure(figsize=(19, 6.6), layout="constrained")
    gs = fig.add_gridspec(1, 3, width_ratios=[1.15, 1.0, 0.8])
    ax = fig.add_subplot(gs[0], projection="3d")
    ax2 = fig.add_subplot(gs[1])
    ax3 = fig.add_subplot(gs[2])
    ax.computed_zorder = False  # draw in the order below: plane, cells, lines, sites (plane is at the bottom)
    plane = [np.column_stack([c.vertices, np.zeros(len(c.vertices))]) for c in s["cells"]]
    ax.add_collection3d(Poly3DCollection(plane, facecolors=[cmap(cell_key(c)) for c in s["cells"]], alpha=0.8,
                                         edgecolors="0.2", linewidths=0.6, zorder=1))
    if show_cells3d:
        for i, faces in enumerate(s["cells3d"]):
            up = [f for f in faces if not np.allclose(f[:, 2], 0.0)]  # the floor face is the plane cell
            if up:
                edges = np.concatenate([np.stack([f, np.roll(f, -1, 0)], 1) for f in up])
                ax.add_collection3d(Poly3DCollection(up, facecolors=cmap((i,)), alpha=0.05, edgecolors="none",
                                                     zorder=2))
                ax.add_collection3d(Line3DCollection(edges, colors=[cmap((i,)) * 0.7], linewidths=0.7, alpha=0.7,
                                                    zorder=3))
    L = s["lifted"]
    for p in L:
        ax.plot([p[0], p[0]], [p[1], p[1]], [0, p[2]], ls="--", lw=0.8, color="0.3", zorder=4)
        ax.scatter([p[0]], [p[1]], [0], s=8, color="k", depthshade=False, zorder=4)
    for q, j in zip(s["probes"], s["nearest"]):
        ax.plot([q[0], L[j, 0]], [q[1], L[j, 1]], [0, L[j, 2]], color="k", lw=1.8, zorder=5)
        ax.scatter([q[0]], [q[1]], [0], marker="x", s=40, color="k", depthshade=False, zorder=5)
    ax.scatter(L[:, 0], L[:, 1], L[:, 2], s=40, c=[cmap((i,)) * 0.7 for i in range(m)], edgecolors="k",
               depthshade=False, zorder=6)
    ax.set_xlim(xmin, xmax)
    ax.set_ylim(ymin, ymax)
    ax.set_zlim(0, s["top"])
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_zlabel("height h = √(K − α)")
    ax.view_init(elev=elev, azim=azim)
    ax.set_box_aspect((xmax - xmin, ymax - ymin, 0.9 * s["top"]))
    ax.set_title("Lifted sites (c, √(K − α)) and their 3-D Voronoi cells;\n"
                 "black: probe x on the plane → its nearest lifted site", fontsize=10)
    draw_cells(ax2, s["cells"], cmap, alpha=0.8)
    handles = draw_sites(ax2, pd, circles=True, weight_labels=True)
    ax2.scatter(s["probes"][:, 0], s["probes"][:, 1], marker="x", s=40, c="k", zorder=6)
    handles.append(Line2D([], [], marker="x", ls="", color="k",
                          label="probe x: its cell's site is its nearest lifted site (black lines, left)"))
    ax2.legend(handles=handles, fontsize=7, loc="lower left", framealpha=0.85)
    setup_axes(ax2, bounds, f"The section h = 0: the power diagram with α = K − h²  (K = {s['K']:.2f})",
               fontsize=10)
    _height_vs_area(ax3, pd, s, cmap, bounds)
    fig.suptitle("A power diagram is a slice of a Voronoi diagram one dimension up (exact)", fontsize=14)
    return fig


def _height_vs_area(ax, pd, s, cmap, bounds) -> None:
    """The paper's message in one panel: a higher lifted site has a smaller weight, hence a smaller cell."""
    L = s["lifted"]
    area = np.zeros(pd.n_sites)
    for c in s["cells"]:
        area[cell_key(c)[0]] += abs(c.area)
    xmin, xmax, ymin, ymax = check_bounds(bounds)
    frac = area / ((xmax - xmin) * (ymax - ymin))
    h = L[:, 2]
    cols = site_colors(pd.n_sites)
    empty = frac <= 0
    ax.scatter(h[~empty], frac[~empty], s=70, c=cols[~empty], edgecolors="k", zorder=3)
    ax.scatter(h[empty], frac[empty], s=70, facecolors="white", edgecolors=cols[empty], linewidths=1.6, zorder=3,
               label="empty cell (site hidden)")
    for i in range(pd.n_sites):
        ax.annotate(f"{i}", (h[i], frac[i]), xytext=(5, 3), textcoords="offset points", fontsize=8, color=cols[i],
                    weight="bold")
    order = np.argsort(h)
    rho = float(np.corrcoef(np.argsort(order), np.argsort(np.argsort(frac)))[0, 1])
    ax.set_xlabel("height of the lifted site  h = √(K − α)   (higher = smaller α)")
    ax.set_ylabel("area of its power cell (fraction of the box)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if empty.any():
        ax.legend(fontsize=8)
    ax.set_title(f"Higher site → smaller weight → smaller cell\n(Spearman rank correlation {rho:+.2f})",
                 fontsize=10)


def plot_lift_plotly(pd, bounds=(-2, 2, -2, 2), K: float | None = None, n_probes: int = 3, seed: int = 0):
    """Interactive figure 7 (plotly): the same scene as `plot_lift_3d`, rotatable, hover on sites."""
    import plotly.graph_objects as go

    s = lift_scene(pd, bounds, K, n_probes, seed)
    m = pd.n_sites
    cmap = ColorMap([(i,) for i in range(m)])
    fig = go.Figure()

    def mesh(faces, color, opacity, name, showlegend=False, group=None):
        xs, ys, zs, I, J, Kk = [], [], [], [], [], []
        for f in faces:
            base = len(xs)
            xs += f[:, 0].tolist()
            ys += f[:, 1].tolist()
            zs += f[:, 2].tolist()
            for t in range(1, len(f) - 1):  # fan triangulation of a convex face
                I.append(base)
                J.append(base + t)
                Kk.append(base + t + 1)
        return go.Mesh3d(x=xs, y=ys, z=zs, i=I, j=J, k=Kk, color=color, opacity=opacity, name=name,
                         showlegend=showlegend, legendgroup=group, hoverinfo="name", flatshading=True)

    def lines(segments, color, width, name, showlegend=False, group=None, dash=None):
        xs, ys, zs = [], [], []
        for a, b in segments:
            xs += [a[0], b[0], None]
            ys += [a[1], b[1], None]
            zs += [a[2], b[2], None]
        return go.Scatter3d(x=xs, y=ys, z=zs, mode="lines", line={"color": color, "width": width, "dash": dash},
                            name=name, showlegend=showlegend, legendgroup=group, hoverinfo="skip")

    for c in s["cells"]:
        i = cell_key(c)[0]
        f = np.column_stack([c.vertices, np.zeros(len(c.vertices))])
        fig.add_trace(mesh([f], to_hex(cmap((i,))), 0.9, f"power cell of site {i}"))
        fig.add_trace(lines([(f[t], f[(t + 1) % len(f)]) for t in range(len(f))], "#333333", 2, "cell edge"))
    for i, faces in enumerate(s["cells3d"]):
        up = [f for f in faces if not np.allclose(f[:, 2], 0.0)]
        if not up:
            continue
        group = f"cell{i}"
        fig.add_trace(mesh(up, to_hex(cmap((i,))), 0.08, f"3-D Voronoi cell {i}", showlegend=False, group=group))
        segs = [(f[t], f[(t + 1) % len(f)]) for f in up for t in range(len(f))]
        fig.add_trace(lines(segs, to_hex(cmap((i,)) * 0.7), 2, f"3-D Voronoi cell {i}", showlegend=True,
                            group=group))
    L = s["lifted"]
    fig.add_trace(lines([((p[0], p[1], 0.0), tuple(p)) for p in L], "#555555", 2, "drop lines", True,
                        dash="dash"))
    hover = [f"site {i}<br>c = ({p[0]:.2f}, {p[1]:.2f})<br>α = {a:.3f}<br>h = √(K−α) = {p[2]:.3f}"
             for i, (p, a) in enumerate(zip(L, pd.weights))]
    fig.add_trace(go.Scatter3d(x=L[:, 0], y=L[:, 1], z=L[:, 2], mode="markers+text", text=[str(i) for i in range(m)],
                               textposition="top center", hovertext=hover, hoverinfo="text",
                               marker={"size": 5, "color": [to_hex(cmap((i,)) * 0.7) for i in range(m)],
                                       "line": {"color": "black", "width": 1}}, name="lifted sites"))
    segs = [((q[0], q[1], 0.0), tuple(L[j])) for q, j in zip(s["probes"], s["nearest"])]
    fig.add_trace(lines(segs, "black", 5, "probe → nearest lifted site", True))
    fig.add_trace(go.Scatter3d(x=s["probes"][:, 0], y=s["probes"][:, 1], z=np.zeros(len(s["probes"])),
                               mode="markers", marker={"symbol": "x", "size": 4, "color": "black"}, name="probes"))
    xmin, xmax, ymin, ymax = check_bounds(bounds)
    fig.update_layout(
        title={"text": f"Power diagram = section h = 0 of the Voronoi diagram of lifted sites (c, √(K−α)), "
                       f"K = {s['K']:.2f}", "font": {"size": 14}},
        scene={"xaxis": {"range": [xmin, xmax], "title": "x"}, "yaxis": {"range": [ymin, ymax], "title": "y"},
               "zaxis": {"range": [0, s["top"]], "title": "h"}, "aspectmode": "manual",
               "aspectratio": {"x": 1, "y": (ymax - ymin) / (xmax - xmin), "z": 0.6}},
        width=950, height=750, margin={"l": 0, "r": 0, "t": 50, "b": 0}, template="plotly_white")
    return fig


def lift_figure_cells(pd, bounds):
    """(cells, ColorMap) of the plane as drawn by the lift pictures (site i -> colour i)."""
    cells = pd.cells_2d(bounds)
    return cells, cells_colormap(cells, [(i,) for i in range(pd.n_sites)])
