"""Data-parallel SGD and PAM-SGD: explicit and exact (no DDP wrapper: the trainers call the loss, not
`module.forward`).

- every rank holds the whole SAE; parameters are broadcast from rank 0 at the start;
- each global mini-batch of `batch_size` rows is split between the ranks; after `backward` the gradients
  are all-reduced, weighted by each rank's row count, i.e. exactly the gradient of the mean loss over the
  global batch (before clipping, so `grad_clip` sees the global gradient), and every rank then takes the
  same optimiser step;
- PAM-SGD: each rank accumulates the decoder's sufficient statistics (sum zz^T, sum zx^T, sum z, sum x,
  N) over its share of the data; they are all-reduced so every rank solves the same system;
- evaluation: each rank evaluates its share; the metric accumulators are gathered and merged, so every
  History column is over the whole data set (same definitions as one process);
- data: a tensor is split per global batch (rank r takes the r-th part of each batch of the same
  permutation a single process would draw, `TensorBatches`); a `CacheBatches` is split by cache shard
  (each rank reads only its own shards, reassigned every epoch when shuffling) with
  `batch_size // world_size` rows per rank and per step, and the same number of steps on every rank;
- checkpoints are written by rank 0 only (with the running sums of all ranks); every rank resumes from it.

Equivalence: with tensor data, `train_distributed` on W processes follows the same trajectory as
`train_sgd` / `train_pam_sgd` on one process, up to floating-point summation order. With a cache, it
equals one process trained on `CacheBatches(..., world_size=W, rank=None)` (the same global batches,
assembled in one process). Caveats: a global batch with fewer rows than ranks (the last, tiny, batch of
an epoch) is skipped; the History's running loss (`train_loss`) is the rank average of the per-rank batch
means (exact when the batches split evenly); a loss that is not a mean over rows would not decompose.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from splinterp import metrics
from splinterp.data.streaming import TensorBatches
from splinterp.errors import ConfigError
from splinterp.metrics import MetricAccumulator
from splinterp.parallel.collectives import (
    allreduce_decoder_statistics,
    allreduce_gradients,
    average_sums,
    merge_metrics,
)
from splinterp.parallel.group import is_initialized, run_agreed
from splinterp.sae import SAE
from splinterp.train.config import PAMConfig, SGDConfig
from splinterp.train.decoder import DecoderAccumulator
from splinterp.train.engine import Callback
from splinterp.train.history import History
from splinterp.train.pam import PAMTrainer, train_pam_sgd
from splinterp.train.sgd import SGDTrainer, train_sgd
from splinterp.validation import check_data

log = logging.getLogger(__name__)


def shard_data(data, rank: int, world_size: int, cfg: SGDConfig, d_in: int | None = None,
               dtype: torch.dtype | None = None):
    """This rank's batch source: `TensorBatches` for a tensor, `data.shard(rank, world_size)` for an object
    that has it (`CacheBatches`), else `data` as is (an iterable already local to this rank: it must give
    the same number of batches on every rank)."""
    if isinstance(data, torch.Tensor) or isinstance(data, np.ndarray):
        X = check_data(data, d_in, name="data", dtype=dtype)
        return TensorBatches(X, cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed, rank=rank, world_size=world_size)
    if hasattr(data, "shard"):
        return data.shard(rank, world_size)
    if world_size > 1 and rank == 0:
        log.warning("data of type %s has no shard(rank, world_size): each rank trains on what it yields; it must "
                    "yield the same number of batches on every rank", type(data).__name__)
    return data



class _DistributedMixin:
    """What makes a Trainer data parallel (see the module docstring). Mixed in before the trainer class."""

    def __init__(self, sae: SAE, data, cfg: SGDConfig, eval_data=None, callback: Callback | None = None,
                 group=None):
        if not is_initialized():
            raise ConfigError("no torch.distributed process group: call init_distributed() under torchrun, or "
                              "use train_sgd / train_pam_sgd on one process")
        if cfg.aux_k:
            raise ConfigError("aux_k is not supported in data-parallel training yet (each rank would count dead "
                              "latents on its own shard); set aux_k=0 or train on one process")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        mine = {"trainer": {k: v for k, v in cfg.to_dict().items() if k not in ("device", "progress")},
                "sae": {k: v for k, v in sae.cfg.to_dict().items() if k != "device"},
                "data": type(data).__name__}
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine, group=group)
        differ = [r for r, o in enumerate(everyone) if o != everyone[0]]
        if differ:
            raise ConfigError(f"ranks {differ} were given other settings than rank 0 (trainer config, SAE config "
                              "or data type); every rank must call train_distributed with the same arguments")
        local = shard_data(data, self.rank, self.world, cfg, sae.cfg.d_in, sae.dtype)
        if self.rank != 0 and cfg.progress:
            cfg = cfg.replace(progress=False)
        super().__init__(sae, local, cfg, eval_data=eval_data, callback=callback)

    # ------------------------------------------------------------------ hooks
    def setup(self) -> None:
        super().setup()
        with torch.no_grad():
            for t in list(self.sae.parameters()) + list(self.sae.buffers()):
                dist.broadcast(t.data, src=0, group=self.group)

    def writes_checkpoints(self) -> bool:
        return self.rank == 0  # only rank 0 saves (see _save), so only rank 0 locks the checkpoint_dir

    def after_backward(self, x: torch.Tensor) -> None:
        allreduce_gradients(self.train_params, x.shape[0], self.group)

    def after_sgd(self) -> None:
        self.run_sums = average_sums(self.run_sums, self.group)
        super().after_sgd()

    def reduce_decoder_statistics(self, acc: DecoderAccumulator) -> None:
        allreduce_decoder_statistics(acc, self.group)

    def _save(self) -> None:
        local = self.run_sums
        self.run_sums = average_sums(local, self.group)  # the checkpoint holds every rank's running sums
        try:
            run_agreed(lambda: super(_DistributedMixin, self)._save() if self.rank == 0 else None, self.group)
        finally:
            self.run_sums = local

    # ------------------------------------------------------------------ evaluation over every rank's share
    def _share_accumulator(self, data, bs: int) -> MetricAccumulator | None:
        """This rank's accumulator over its share of `data`; None when `data` cannot be split."""
        if isinstance(data, torch.Tensor):
            n = data.shape[0]
            lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
            if hi == lo:
                return MetricAccumulator()
            return metrics.accumulate(self.sae, data[lo:hi], bs, self.device)
        if hasattr(data, "shard"):
            view = data.shard(self.rank, self.world)
            rows = view.sequential(bs) if hasattr(view, "sequential") else view
        elif hasattr(data, "sequential"):
            rows = data.sequential(bs)
        else:
            return None
        return metrics.accumulate(self.sae, rows, bs, self.device)

    def _evaluate(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        bs = self.cfg.eval_batch_size
        if self.cfg.eval_train:
            it = self.src.iterable
            rows = it.sequential(bs) if hasattr(it, "sequential") else it
            acc = merge_metrics(metrics.accumulate(self.sae, rows, bs, self.device), self.group)
            out.update({f"train_{k}": v for k, v in acc.compute().items()})
        if self.eval_data is not None:
            acc = self._share_accumulator(self.eval_data, bs)
            if acc is None:  # an iterable that cannot be split: every rank evaluates all of it
                res = metrics.evaluate(self.sae, self.eval_data, batch_size=bs, device=self.device)
            else:
                res = merge_metrics(acc, self.group).compute()
            out.update({f"test_{k}": v for k, v in res.items()})
        return out


class DistributedSGDTrainer(_DistributedMixin, SGDTrainer):
    """`SGDTrainer` made data parallel; construct on every rank with the same arguments."""


class DistributedPAMTrainer(_DistributedMixin, PAMTrainer):
    """`PAMTrainer` made data parallel: encoder steps with averaged gradients, decoder solved from the
    all-reduced statistics on every rank."""


def train_distributed(sae: SAE, data, cfg: SGDConfig | PAMConfig | None = None, *, eval_data=None,
                      callback: Callback | None = None, group=None) -> History:
    """Train `sae` in place, data parallel over the ranks of the process group; returns the History (the
    same on every rank). Call on every rank with the same arguments (the same SAE config and seed, the
    same data object; each rank's `sae` on its own device). `cfg` is a `PAMConfig` (PAM-SGD) or an
    `SGDConfig`. `data`: a tensor [N, d_in] (every rank holds it; each trains on its part of every global
    batch), a `CacheBatches` (each rank reads its own shards), or an iterable already local to the rank.
    Without a process group this is `train_sgd` / `train_pam_sgd` on one process.
    """
    cfg = cfg if cfg is not None else SGDConfig()
    if not isinstance(cfg, SGDConfig):
        raise TypeError(f"cfg must be an SGDConfig or PAMConfig, got {type(cfg).__name__}")
    pam = isinstance(cfg, PAMConfig)
    if not is_initialized():
        train = train_pam_sgd if pam else train_sgd
        return train(sae, data, cfg, eval_data=eval_data, callback=callback)
    cls = DistributedPAMTrainer if pam else DistributedSGDTrainer
    return cls(sae, data, cfg, eval_data=eval_data, callback=callback, group=group).run()
