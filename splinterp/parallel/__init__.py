"""Data parallelism with torch.distributed: joining a process group (`group`), exact collectives
(`collectives`), data-parallel SGD / PAM-SGD (`trainers`) and sharded harvesting (`harvest`).

Launch any `splinterp train` or `splinterp harvest` command under torchrun and it runs data parallel::

    # CPU, 2 processes on this machine (gloo)
    torchrun --nproc_per_node 2 -m splinterp train --data acts/ --layer 3 --out sae_l3 --method pam_sgd \\
        --d-sae 4096 --architecture topk --k 32 --epochs 2 --memory-limit-mb 2000
    # 8 GPUs (nccl), harvesting first: each rank runs the model on its share of the texts
    torchrun --nproc_per_node 8 -m splinterp harvest --out acts/ --model gpt2 --layers 6
    torchrun --nproc_per_node 8 -m splinterp train --data acts/ --layer 6 --out sae_l6 --d-sae 16384 --k 64

or from Python, inside a process group (torchrun, or `spawn_local` for a quick local run)::

    from splinterp.data.streaming import CacheBatches
    from splinterp.parallel import init_distributed, train_distributed
    info = init_distributed()                        # reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun
    data = CacheBatches("acts/", layer=3, batch_size=4096, dtype=torch.float32)
    sae = SAE(SAEConfig(d_in=data.d_in, d_sae=4096, architecture="topk", k=32, device=str(info.device)))
    hist = train_distributed(sae, data, PAMConfig(epochs=2))   # same History on every rank

Multi-node runs need a file system that every rank sees (the cache, checkpoints, the harvest output).
An exception on one rank ends that rank; torchrun then stops the others (or they time out at their next
collective after `DistConfig.timeout_s`).
"""

from splinterp.parallel.collectives import (
    allreduce_decoder_statistics,
    allreduce_gradients,
    average_sums,
    fit_standardizer,
    merge_metrics,
)
from splinterp.parallel.group import (
    DistConfig,
    DistInfo,
    free_port,
    init_distributed,
    launched_by_torchrun,
    rank_world,
    spawn_local,
)
from splinterp.parallel.harvest import harvest_distributed
from splinterp.parallel.trainers import (
    DistributedPAMTrainer,
    DistributedSGDTrainer,
    shard_data,
    train_distributed,
)

__all__ = [
    "DistConfig", "DistInfo", "DistributedPAMTrainer", "DistributedSGDTrainer", "allreduce_decoder_statistics",
    "allreduce_gradients", "average_sums", "fit_standardizer", "free_port", "harvest_distributed",
    "init_distributed", "launched_by_torchrun", "merge_metrics", "rank_world", "shard_data", "spawn_local",
    "train_distributed",
]
