"""`splinterp slice SAE --data X --through I J K` (or `--pca`): the exact partition of a plane through your data
by any SAE `splinterp.load` reads, as a PNG and an interactive HTML page (hover a region: its active latents;
hover a point: its row, region and reconstruction error)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from splinterp.commands import Command
from splinterp.commands.geometry import SAEDataOptions
from splinterp.errors import ConfigError

log = logging.getLogger("splinterp.slice")


@dataclass
class SliceOptions(SAEDataOptions):
    through: list[int] = field(default_factory=list)
    """Three row indices of --data: the plane passes through these rows (give this or --pca)."""
    pca: bool = False
    """The plane through the mean of the rows along their top-2 principal directions (instead of --through)."""
    margin: float = 0.25
    """--through: the box is the three points' bounding box widened by this fraction of its larger side."""
    max_points: int = 1000
    """Rows drawn projected onto the plane (a random subset when --data has more; --through rows always kept)."""
    max_cells: int = 250_000
    """Refuse (before the work) a slice predicted to have more regions than this."""
    out: str = "slice"
    """Output path without extension: writes OUT.png and OUT.html."""
    plotlyjs: Literal["directory", "inline", "cdn"] = "directory"
    """How the HTML page gets plotly.js: one plotly.min.js next to it (offline), inlined (one offline file of
    ~5 MB), or from the CDN (needs network to view)."""
    seed: int = 0
    """Seed of the row subset."""

    def __post_init__(self) -> None:
        import math

        from splinterp.validation import check_positive_int

        if self.pca == bool(self.through):
            raise ConfigError("give the plane either as --through I J K (three row indices of --data) or as --pca, "
                              f"not {'both' if self.pca else 'neither'}")
        if self.through:
            if len(self.through) != 3 or len(set(self.through)) != 3 or min(self.through) < 0:
                raise ConfigError(f"--through takes three distinct row indices >= 0, got {self.through}")
        if isinstance(self.margin, bool) or not math.isfinite(self.margin) or self.margin < 0:
            raise ConfigError(f"--margin must be a finite number >= 0, got {self.margin!r}")
        check_positive_int(self.max_points, "--max-points")
        check_positive_int(self.max_cells, "--max-cells")
        if not self.out or Path(self.out).suffix in (".png", ".html"):
            raise ConfigError(f"--out is a path without extension (OUT.png and OUT.html are written), got {self.out!r}")


def run_slice(o: SliceOptions) -> int:
    import torch

    from splinterp.geometry import plane_through
    from splinterp.viz.output import save_png, write_html
    from splinterp.viz.slices import (
        data_bounds,
        pca_plane,
        plot_slices,
        plot_slices_plotly,
        project_points,
        slice_views,
    )

    sae, X = o.load()
    n = int(X.shape[0])
    if o.through and max(o.through) >= n:
        raise ConfigError(f"--through {' '.join(map(str, o.through))}: --data {o.data} has only {n} rows")
    X = o.prepare(X, sae).cpu()
    g = torch.Generator().manual_seed(o.seed)
    rows = torch.randperm(n, generator=g)[: o.max_points].sort().values if n > o.max_points else torch.arange(n)
    if o.through:
        rows = torch.unique(torch.cat([rows, torch.tensor(o.through)]))
    if o.pca:
        if n < 3:
            raise ConfigError(f"--pca needs at least 3 rows of --data, got {n}")
        plane, explained = pca_plane(X)
        ab, _ = project_points(plane, X[rows])
        bounds = data_bounds(ab)
        anchors = ["mean"]
        axis = (f"PC1 ({100 * explained[0]:.1f}% of variance)", f"PC2 ({100 * explained[1]:.1f}% of variance)")
        what = "the plane through the mean along the top-2 principal directions"
    else:
        i, j, k = o.through
        plane = plane_through(X[i], X[j], X[k])
        bounds = plane.bounds(o.margin)
        anchors = [f"row {i}", f"row {j}", f"row {k}"]
        axis = (f"a: along row {i} → row {j}", f"b: orthogonal, towards row {k}")
        what = f"the plane through rows {i}, {j}, {k}"
    arch = sae.cfg.architecture + (f", k={sae.cfg.k}" if sae.cfg.k else "")
    name = f"{Path(o.folder).name or o.folder} ({arch}, d_sae={sae.cfg.d_sae})"
    views = slice_views({name: sae.cpu()}, plane, bounds, X[rows], [f"row {int(r)}" for r in rows],
                        anchor_labels=anchors, max_cells=o.max_cells)
    title = f"Exact regions of {name} on {what} of {Path(o.data).name}"
    png, page = Path(f"{o.out}.png"), Path(f"{o.out}.html")
    png.parent.mkdir(parents=True, exist_ok=True)
    save_png(plot_slices(views, axis_labels=axis, suptitle=title, points_label=f"rows of {Path(o.data).name}"), png)
    write_html(plot_slices_plotly(views, axis_labels=axis, title=title + "; hover a region or a point"), page,
               plotlyjs=o.plotlyjs)
    print(f"{views[0].n_regions} regions (exact) on {what}; {len(rows)} rows projected; wrote {png} and {page}")
    return 0


COMMAND = Command("slice", SliceOptions, run_slice, "exact slice figure of an SAE on a plane through your data",
                  "Load an SAE (any format splinterp.load reads), cut the plane through three rows of --data "
                  "(--through I J K) or through their mean along the top-2 principal directions (--pca) into its "
                  "exact regions (geometry.slice_2d), and write OUT.png and OUT.html (hover: a region's active "
                  "latents and values; a row's region and reconstruction error).")
