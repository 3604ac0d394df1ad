"""The spline geometry of SAEs, in one place: regions, affine pieces, power diagrams, LP checks, slices.

Everything else in splinterp (metrics, figures, experiments, the CLI) calls these functions.
"""

from splinterp.geometry.regions import (
    active_mask,
    affine_map,
    affine_maps,
    piece_rank,
    region_ids,
    region_stats,
)

__all__ = [
    "active_mask",
    "affine_map",
    "affine_maps",
    "piece_rank",
    "region_ids",
    "region_stats",
]
