"""Former home of streaming and data parallelism, kept so that existing imports keep working.

The streams are now `splinterp.data.streaming` (`CacheBatches`, `TensorBatches`) and data parallelism is
`splinterp.parallel`; the command line is `torchrun ... -m splinterp train|harvest ...`.
"""

from splinterp.data.streaming import CacheBatches, TensorBatches
from splinterp.parallel import (
    DistConfig,
    DistInfo,
    DistributedPAMTrainer,
    DistributedSGDTrainer,
    allreduce_decoder_statistics,
    allreduce_gradients,
    free_port,
    harvest_distributed,
    init_distributed,
    merge_metrics,
    shard_data,
    spawn_local,
    train_distributed,
)

__all__ = [
    "CacheBatches", "DistConfig", "DistInfo", "DistributedPAMTrainer", "DistributedSGDTrainer", "TensorBatches",
    "allreduce_decoder_statistics", "allreduce_gradients", "free_port", "harvest_distributed", "init_distributed",
    "merge_metrics", "shard_data", "spawn_local", "train_distributed",
]
