"""The spline geometry of SAEs, in one place: regions, affine pieces, power diagrams, LP checks, slices,
segments, boundary distances, local complexity, adjacency and region enumeration.

Everything else in splinterp (metrics, figures, experiments, the CLI) calls these functions.
"""

from splinterp.geometry.adjacency import SliceAdjacency
from splinterp.geometry.boundary import BoundaryDistance, boundary_distance
from splinterp.geometry.complexity import LocalComplexity, local_complexity
from splinterp.geometry.enumerate import RegionEnumeration, enumerate_regions
from splinterp.geometry.lp import RegionCheck, RegionCheckWithMargin, region_is_nonempty
from splinterp.geometry.power import (
    Cell2D,
    PowerDiagram,
    diagram_from_affine,
    power_diagram,
    section_weights,
)
from splinterp.geometry.regions import (
    RegionIndex,
    active_mask,
    affine_map,
    affine_maps,
    piece_rank,
    region_ids,
    region_index,
    region_stats,
)
from splinterp.geometry.report import geometry_report, order_cell_stats
from splinterp.geometry.segments import Segment, segment_regions
from splinterp.geometry.slice import Plane, Slice2D, plane_through, slice_2d

__all__ = [
    "BoundaryDistance",
    "Cell2D",
    "LocalComplexity",
    "Plane",
    "PowerDiagram",
    "RegionCheck",
    "RegionCheckWithMargin",
    "RegionEnumeration",
    "RegionIndex",
    "Segment",
    "Slice2D",
    "SliceAdjacency",
    "active_mask",
    "affine_map",
    "affine_maps",
    "boundary_distance",
    "diagram_from_affine",
    "enumerate_regions",
    "geometry_report",
    "local_complexity",
    "order_cell_stats",
    "piece_rank",
    "plane_through",
    "power_diagram",
    "region_ids",
    "region_index",
    "region_is_nonempty",
    "region_stats",
    "section_weights",
    "segment_regions",
    "slice_2d",
]
