"""Layers: distances between a model's layers, Group-SAE layer grouping with AMAD, layer-wise transfer.

    from splinterp.layers import layer_distances, all_groupings, choose_n_groups, train_group_sae
    D = layer_distances(cache, split="train")                 # mean angular distance, streamed
    groupings = all_groupings(D)                              # complete linkage, every G (last layer dropped)
    G = choose_n_groups(groupings, threshold=0.2)             # smallest G with AMAD <= threshold
    sae, hist = train_group_sae(cache, groupings[G].groups[0], sae_cfg, SGDConfig(...), standardizers=stds)

    from splinterp.layers import transfer_init
    sae_l = transfer_init(sae_of_layer_l_plus_1, target_layer=l)   # backward transfer, then fine-tune
"""

from splinterp.layers.distance import AngularDistanceMatrix, LayerDistances, angular_distance, layer_distances
from splinterp.layers.groups import (
    SAMPLINGS,
    GroupBatches,
    Grouping,
    all_groupings,
    amad,
    amd_per_group,
    canonical_labels,
    check_distance_matrix,
    choose_n_groups,
    cluster_layers,
    complete_linkage,
    group_metadata,
    groups_to_dict,
    load_groups,
    save_groups,
    train_group_sae,
)
from splinterp.layers.transfer import (
    DIRECTIONS,
    FVUTracker,
    source_layer,
    steps_to_target,
    train_seconds,
    transfer_direction,
    transfer_init,
)

__all__ = [
    "DIRECTIONS", "SAMPLINGS", "AngularDistanceMatrix", "FVUTracker", "GroupBatches", "Grouping", "LayerDistances",
    "all_groupings", "amad", "amd_per_group", "angular_distance", "canonical_labels", "check_distance_matrix",
    "choose_n_groups", "cluster_layers", "complete_linkage", "group_metadata", "groups_to_dict", "layer_distances",
    "load_groups", "save_groups", "source_layer", "steps_to_target", "train_group_sae", "train_seconds",
    "transfer_direction", "transfer_init",
]
