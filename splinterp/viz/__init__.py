"""Pictures of SAE geometry. Every function returns a figure and shows nothing.

Matplotlib figures are built with ``matplotlib.figure.Figure`` (not pyplot): nothing is shown, nothing is
kept in pyplot's registry, and in Jupyter a returned figure displays as the cell's value. Save with
``save_png(fig, path)`` (atomic). Plotly figures (interactive HTML) are saved with ``write_html``.

One orientation everywhere (`splinterp.viz.raster`): x to the right, y up, rasters drawn with
``origin="lower"`` from pixel centres laid out with meshgrid 'xy' indexing. Exact partitions are drawn as
polygons (`PowerDiagram.cells_2d`, `slice_2d`); rasters are used only where no exact cells exist.

Modules:
- `power`: power diagrams of any order with sqrt(alpha) circles; figures 5 and 6; SAE cells vs encode.
- `lift`: figure 7, the lifting picture (matplotlib 3-D and plotly).
- `partition`: an SAE's (or reference AE's) partition of a 2-D slice of input space, shaded by
  reconstruction error; the E1 three-panel picture (k-means | TopK SAE | local PCA).
- `llm`: PCA projections of real activations coloured by SAE region or latent (plotly, hover text).
- `slices`: exact slices of SAEs with data projected onto the plane (PNG, and plotly with hover on regions
  and points); what `splinterp slice` and the llm_partitions job draw.
- `tools`: the exact region tools drawn: regions and error along a segment, boundary-distance histograms,
  local-complexity maps.
- `training`: training curves (SGD vs PAM-SGD) and final-metric bars.
- `mnist`: encoder/decoder filters as 28x28 images, reconstructions.
- `colors`: the distinct palette and neighbour-distinct cell colourings.
"""

from splinterp.viz.cells import cell_adjacency, cells_colormap, draw_cells, locate, rasterize_cells, setup_axes
from splinterp.viz.colors import ColorMap, palette
from splinterp.viz.lift import plot_lift_3d, plot_lift_plotly
from splinterp.viz.llm import activation_projection, plot_activation_projection, plot_activation_projection_static
from splinterp.viz.mnist import plot_encoder_decoder_filters, plot_filters, plot_reconstructions
from splinterp.viz.output import save_png, write_html
from splinterp.viz.partition import SlicePartition, plot_e1_panels, plot_slice_comparison, plot_slice_partition
from splinterp.viz.power import (
    fig5_voronoi_to_power,
    fig6_voronoi_power_order2,
    plot_power_diagram,
    plot_power_raster,
    plot_sae_power_cells,
)
from splinterp.viz.raster import pixel_centers, raster_shape, show_raster
from splinterp.viz.slices import SliceView, plot_slices, plot_slices_plotly, slice_views
from splinterp.viz.tools import plot_boundary_histograms, plot_complexity_maps, plot_segments
from splinterp.viz.training import plot_metric_bars, plot_training_curves

__all__ = [
    "ColorMap",
    "SlicePartition",
    "SliceView",
    "activation_projection",
    "cell_adjacency",
    "cells_colormap",
    "draw_cells",
    "fig5_voronoi_to_power",
    "fig6_voronoi_power_order2",
    "plot_e1_panels",
    "plot_slice_comparison",
    "plot_slice_partition",
    "locate",
    "palette",
    "pixel_centers",
    "plot_activation_projection",
    "plot_activation_projection_static",
    "plot_boundary_histograms",
    "plot_complexity_maps",
    "plot_encoder_decoder_filters",
    "plot_filters",
    "plot_lift_3d",
    "plot_lift_plotly",
    "plot_metric_bars",
    "plot_power_diagram",
    "plot_power_raster",
    "plot_reconstructions",
    "plot_sae_power_cells",
    "plot_segments",
    "plot_slices",
    "plot_slices_plotly",
    "plot_training_curves",
    "raster_shape",
    "rasterize_cells",
    "save_png",
    "setup_axes",
    "show_raster",
    "slice_views",
    "write_html",
]
