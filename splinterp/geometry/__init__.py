"""The spline geometry of SAEs, in one place: regions, affine pieces, power diagrams, LP checks, slices.

Everything else in splinterp (metrics, figures, experiments, the CLI) calls these functions.
"""

from splinterp.geometry.lp import region_is_nonempty
from splinterp.geometry.power import (
    Cell2D,
    PowerDiagram,
    diagram_from_affine,
    power_diagram,
    section_weights,
)
from splinterp.geometry.regions import (
    active_mask,
    affine_map,
    affine_maps,
    piece_rank,
    region_ids,
    region_stats,
)
from splinterp.geometry.report import geometry_report, order_cell_stats
from splinterp.geometry.slice import Plane, Slice2D, plane_through, slice_2d

__all__ = [
    "Cell2D",
    "Plane",
    "PowerDiagram",
    "Slice2D",
    "diagram_from_affine",
    "geometry_report",
    "order_cell_stats",
    "plane_through",
    "power_diagram",
    "region_is_nonempty",
    "section_weights",
    "slice_2d",
    "active_mask",
    "affine_map",
    "affine_maps",
    "piece_rank",
    "region_ids",
    "region_stats",
]
