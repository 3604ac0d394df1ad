"""Training from activation caches larger than memory, and data-parallel training and harvesting with
torch.distributed.

Streaming
---------
`CacheBatches(cache, layer, batch_size, shuffle=True, seed=0, split="train")` is a re-iterable batch
source over an `ActivationCache` for `train_sgd` / `train_pam_sgd` (and `train_distributed`). Each
iteration streams the cache shard by shard (safetensors' lazy, memory-mapped `safe_open`; one shard
read at a time) through a shuffling buffer of `buffer_tokens` rows, re-seeded per epoch
(`set_epoch`, called by the trainers), so runs are deterministic and resumable. `sequential()` is an
unshuffled pass over every row, used by the trainers for evaluation and the PAM decoder statistics.
Nothing materialises the data set: memory is bounded by the buffer and the shard size
(`CacheBatches.peak_bytes()`; `memory_limit_bytes=` sizes the buffer for you).

Distributed training
--------------------
Data parallel, explicit and exact (no DDP wrapper: the trainers call the loss, not `module.forward`):

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
  permutation a single process would draw); a `CacheBatches` is split by cache shard (each rank reads only
  its own shards, reassigned every epoch when shuffling) with `batch_size // world_size` rows per rank and
  per step, and the same number of steps on every rank;
- checkpoints are written by rank 0 only (with the running sums of all ranks); every rank resumes from it.

Equivalence: with tensor data, `train_distributed` on W processes follows the same trajectory as
`train_sgd` / `train_pam_sgd` on one process, up to floating-point summation order. With a cache, it
equals one process trained on `CacheBatches(..., world_size=W, rank=None)` (the same global batches,
assembled in one process). Caveats: a global batch with fewer rows than ranks (the last, tiny, batch of
an epoch) is skipped; the History's running loss (`train_loss`) is the rank average of the per-rank batch
means (exact when the batches split evenly); a loss that is not a mean over rows would not decompose.

Launch (one process per GPU, or per CPU socket with gloo)::

    # CPU, 2 processes on this machine (gloo)
    python -m torch.distributed.run --nproc_per_node 2 -m splinterp.distributed train \\
        --cache acts/ --layer 3 --out sae_l3 --method pam_sgd --d-sae 4096 --k 32 --epochs 2
    # 8 GPUs (nccl), harvesting first: each rank runs the model on its share of the texts
    torchrun --nproc_per_node 8 -m splinterp.distributed harvest --out acts/ --model gpt2 --layers 6
    torchrun --nproc_per_node 8 -m splinterp.distributed train --cache acts/ --layer 6 --out sae_l6

or from Python, inside a process group (torchrun, or `spawn_local` for a quick local run)::

    from splinterp.distributed import CacheBatches, init_distributed, train_distributed
    info = init_distributed()                        # reads RANK / WORLD_SIZE / LOCAL_RANK from torchrun
    data = CacheBatches("acts/", layer=3, batch_size=4096, dtype=torch.float32)
    sae = SAE(SAEConfig(d_in=data.d_in, d_sae=4096, architecture="topk", k=32, device=str(info.device)))
    hist = train_distributed(sae, data, PAMConfig(epochs=2))   # same History on every rank

Multi-node runs need a file system that every rank sees (the cache, checkpoints, the harvest output).
An exception on one rank ends that rank; torchrun then stops the others (or they time out at their next
collective after `DistConfig.timeout_s`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from splinterp import metrics
from splinterp.atomic import atomic_dir, write_bytes, write_json
from splinterp.data.cache import MANIFEST, ActivationCache, validate_manifest
from splinterp.errors import ConfigError, DTypeError, EmptyDataError, OverwriteError, SplinterpError
from splinterp.metrics import MetricAccumulator
from splinterp.sae import SAE
from splinterp.train.config import PAMConfig, SGDConfig
from splinterp.train.decoder import DecoderAccumulator
from splinterp.train.engine import Callback
from splinterp.train.history import History
from splinterp.train.pam import PAMTrainer, train_pam_sgd
from splinterp.train.sgd import SGDTrainer, train_sgd
from splinterp.validation import check_data

log = logging.getLogger(__name__)

__all__ = [
    "CacheBatches", "DistConfig", "DistInfo", "DistributedPAMTrainer", "DistributedSGDTrainer", "TensorBatches",
    "allreduce_decoder_statistics", "allreduce_gradients", "harvest_distributed", "init_distributed",
    "merge_metrics", "spawn_local", "train_distributed",
]


# =============================================================================================== process group
@dataclass
class DistConfig:
    """How `init_distributed` joins the process group (the rendezvous itself comes from torchrun's env)."""

    backend: str | None = None
    """"gloo" (CPU), "nccl" (CUDA) or None: nccl when the rank's device is CUDA, else gloo."""
    device: str | None = None
    """None: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    timeout_s: float = 1800.0
    """How long a collective waits for the other ranks before failing."""
    seed: int = 0
    """Seeds torch's global RNG on every rank (the same seed everywhere)."""

    def __post_init__(self) -> None:
        if self.backend not in (None, "gloo", "nccl", "mpi"):
            raise ConfigError(f"backend must be 'gloo', 'nccl', 'mpi' or None, got {self.backend!r}")
        if not isinstance(self.timeout_s, (int, float)) or isinstance(self.timeout_s, bool) or self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be a positive number, got {self.timeout_s!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialised_here: bool = False


def _env_int(name: str, default: int | None = None) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment variable {name}={v!r} is not an integer") from None


def init_distributed(cfg: DistConfig | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain `python` run) nothing is initialised and a single-process
    `DistInfo(rank=0, world_size=1)` is returned; the functions of this module then run on one process.
    If a group is already initialised it is used as is.
    """
    cfg = cfg or DistConfig()
    local_rank = _env_int("LOCAL_RANK", 0) or 0
    if cfg.device is not None:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)
    world = _env_int("WORLD_SIZE")
    if world is None:
        return DistInfo(0, 1, 0, device)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE is set but this torch build has no torch.distributed")
    backend = cfg.backend or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=cfg.timeout_s),
                            device_id=device if backend == "nccl" else None)
    rank = dist.get_rank()
    log.info("rank %d of %d joined (%s, device %s)", rank, dist.get_world_size(), backend, device)
    return DistInfo(rank, dist.get_world_size(), local_rank, device, initialised_here=True)


def _rank_world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn_entry(rank: int, world_size: int, backend: str, port: int, threads: int, timeout_s: float,
                 fn: Callable, args: tuple, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        out = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory handles: the child may exit before they are read
        queue.put((rank, buf.getvalue()))
    finally:
        dist.destroy_process_group()


def spawn_local(fn: Callable, world_size: int, *args, backend: str = "gloo", port: int | None = None,
                threads: int | None = None, timeout_s: float = 300.0) -> dict[int, Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` fresh processes joined in a process group on
    127.0.0.1 (loopback only); returns {rank: return value}. For tests, notebooks and quick local runs;
    `fn` must be importable (a module-level function). An exception in a rank is re-raised here."""
    import torch.multiprocessing as mp

    world_size = int(world_size)
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    port = port or free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.spawn(_spawn_entry, args=(world_size, backend, port, threads, timeout_s, fn, args, queue),
                     nprocs=world_size, join=False)
    results: dict[int, Any] = {}

    def drain() -> None:
        while not queue.empty():
            r, v = queue.get()
            results[r] = torch.load(io.BytesIO(v), weights_only=False)

    while not procs.join(timeout=0.05):
        drain()
    drain()
    return results


def _agree(ok: bool, message: str, group=None) -> None:
    """Collective: raise on every rank if any rank failed (no rank is left waiting in a collective)."""
    rank, world = _rank_world(group)
    if world == 1:
        return
    status: list[Any] = [None] * world
    dist.all_gather_object(status, (ok, message), group=group)
    bad = [(r, m) for r, (o, m) in enumerate(status) if not o]
    if bad and ok:
        raise SplinterpError("; ".join(f"rank {r} failed: {m}" for r, m in bad))


def _run_agreed(fn: Callable[[], Any], group=None) -> Any:
    """Run fn on this rank, then make every rank raise if any rank's fn raised."""
    try:
        out = fn()
    except Exception as e:
        _agree(False, f"{type(e).__name__}: {e}", group)
        raise
    _agree(True, "", group)
    return out


# =============================================================================================== data sources
TRAIN_BATCHES = 5
"""Batch-sized tensors a training step holds at once, counted by `CacheBatches.peak_bytes`."""


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A 63-bit seed per (seed, epoch, rank), well mixed (no correlation between neighbouring epochs)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF, epoch, rank])
    hi, lo = (int(v) for v in state.generate_state(2, dtype=np.uint32))
    return (hi << 31) ^ lo


class CacheBatches:
    """A re-iterable stream of training batches [B, d_model] of one layer of an `ActivationCache`.

    Pass it where the trainers take data: `train_sgd(sae, CacheBatches(cache, 3), cfg)`. Each pass
    (`iter`) streams the cache: shards opened lazily one at a time, rows of `split` mixed through a
    shuffling buffer of `buffer_tokens` rows, in an order fixed by (`seed`, epoch); the trainers call
    `set_epoch` before each epoch. `sequential(batch_size)` yields every row once, unshuffled
    (evaluation, PAM decoder statistics). The batch size of the stream is this object's `batch_size`
    (the trainer's `cfg.batch_size` applies to tensor data only).

    Memory: about `peak_bytes()` of data at a time (buffer + a few shards + the batches in flight),
    whatever the cache size. `memory_limit_bytes` sizes the buffer to fit (ConfigError if even one shard
    does not). With glibc, freed blocks below its adaptive mmap threshold (up to 32 MB) stay in the heap,
    so RSS can exceed the live data; `MALLOC_MMAP_THRESHOLD_=524288` in the environment returns them.

    Data parallel: `shard(rank, world_size)` (what `train_distributed` calls) gives rank `rank`'s view:
    it reads only its own shards (the shard list, permuted per epoch when shuffling, dealt round-robin),
    yields `batch_size // world_size` rows per step and exactly `steps(epoch)` steps, the same on every
    rank (rows beyond that are left out of that epoch). `rank=None` with `world_size=W` assembles the same
    global batches in one process (the single-process twin of a W-rank run).
    """

    def __init__(self, cache: ActivationCache | str | os.PathLike, layer: int, batch_size: int = 4096, *,
                 shuffle: bool = True, seed: int = 0, split: str | None = "train", test_frac: float | None = None,
                 buffer_tokens: int | None = None, memory_limit_bytes: int | None = None,
                 drop_last: bool = False, dtype: torch.dtype | None = torch.float32,
                 device: str | torch.device = "cpu", transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 rank: int | None = 0, world_size: int = 1):
        if not isinstance(cache, ActivationCache):
            cache = ActivationCache.open(cache)
        self.cache = cache
        if isinstance(layer, bool) or not isinstance(layer, int) or layer not in cache.layers:
            raise ConfigError(f"layer must be one of the cache's layers {cache.layers}, got {layer!r}")
        for name, v in (("batch_size", batch_size), ("world_size", world_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size):
            raise ConfigError(f"rank must be an integer in [0, {world_size}) or None, got {rank!r}")
        if world_size > 1 and batch_size % world_size:
            raise ConfigError(f"batch_size={batch_size} must be divisible by world_size={world_size} (each rank "
                              "takes an equal part of every global batch)")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        if split not in ("train", "test", None):
            raise ConfigError(f"split must be 'train', 'test' or None, got {split!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise DTypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        if transform is not None and not callable(transform):
            raise ConfigError(f"transform must be callable, got {type(transform).__name__}")
        self.layer, self.batch_size, self.shuffle, self.seed = layer, batch_size, bool(shuffle), seed
        self.split, self.test_frac, self.drop_last = split, test_frac, bool(drop_last)
        self.dtype, self.device, self.transform = dtype, torch.device(device), transform
        self.rank, self.world_size = rank, world_size
        self.memory_limit_bytes = memory_limit_bytes
        self._counts: list[int] | None = None
        self.epoch = 0
        self.buffer_tokens = self._buffer_for(buffer_tokens, memory_limit_bytes)

    # ------------------------------------------------------------------ sizes
    @property
    def d_in(self) -> int:
        return self.cache.d_model

    @property
    def local_batch_size(self) -> int:
        """Rows per batch yielded by one rank's view (the global batch size for rank=None)."""
        return self.batch_size if self.rank is None else self.batch_size // self.world_size

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored row of the layer."""
        return self.cache.d_model * torch.empty((), dtype=self.cache.dtype).element_size()

    @property
    def max_shard_tokens(self) -> int:
        return max(s["n_tokens"] for s in self.cache.shards)

    @property
    def out_row_bytes(self) -> int:
        """Bytes of one row as yielded (after the dtype conversion)."""
        dt = self.dtype or self.cache.dtype
        return self.cache.d_model * torch.empty((), dtype=dt).element_size()

    def peak_bytes(self, buffer_tokens: int | None = None) -> int:
        """Estimate of the data memory of training on this stream (checked in bench/bench_streaming.py).

        Reader: a shuffle pass concatenates and permutes its buffer plus the shard being read (3 copies of
        buffer + shard) next to the shard's read and split-filtered copies (2 shards); an unshuffled pass
        about 3 shards. Trainer: `TRAIN_BATCHES` batch-sized tensors in flight (the batch, reconstruction,
        residual, gradients). Not included: model-sized temporaries such as [batch, d_sae] pre-activations.
        `rank=None` runs world_size reader streams at once.
        """
        b = self.buffer_tokens if buffer_tokens is None else buffer_tokens
        s = self.max_shard_tokens
        streams = self.world_size if self.rank is None else 1
        reader = (3 * (b + s) + 2 * s if self.shuffle else 3 * s) * self.row_bytes * streams
        return reader + TRAIN_BATCHES * self.local_batch_size * self.out_row_bytes

    def _buffer_for(self, buffer_tokens: int | None, limit: int | None) -> int:
        s = self.max_shard_tokens
        if buffer_tokens is not None and limit is not None:
            raise ConfigError("give buffer_tokens or memory_limit_bytes, not both")
        if buffer_tokens is not None:
            if isinstance(buffer_tokens, bool) or not isinstance(buffer_tokens, int) or buffer_tokens < 1:
                raise ConfigError(f"buffer_tokens must be a positive integer, got {buffer_tokens!r}")
            return max(buffer_tokens, self.local_batch_size)
        if limit is None:
            return max(4 * s, self.local_batch_size)  # iter_batches' default
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"memory_limit_bytes must be a positive integer, got {limit!r}")
        streams = self.world_size if self.rank is None else 1
        free = limit - TRAIN_BATCHES * self.local_batch_size * self.out_row_bytes
        b = (free // (self.row_bytes * streams) - 5 * s) // 3 if self.shuffle else self.local_batch_size
        floor = self.peak_bytes(self.local_batch_size)
        if b < self.local_batch_size or floor > limit:
            raise ConfigError(
                f"memory_limit_bytes={limit} is too small for this cache: shards of up to {s} rows x "
                f"{self.row_bytes} bytes and batches of {self.local_batch_size} rows need about {floor} bytes; "
                "re-harvest with a smaller shard_tokens, use smaller batches or raise the limit")
        return b

    def shard_counts(self) -> list[int]:
        """Rows of `split` in each cache shard (computed once; the token split needs no reading)."""
        if self._counts is None:
            self._counts = [self._view([i]).split_size(self.split, self.test_frac)
                            for i in range(len(self.cache.shards))]
        return self._counts

    def n_batches(self) -> int:
        """Batches in the current epoch's pass (this view's)."""
        if self.world_size > 1:
            return self.steps(self.epoch)
        n = sum(self.shard_counts())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def n_rows(self) -> int:
        """Rows of `split` in this view's sequential pass."""
        return sum(self.shard_counts()[i] for i in self._sequential_shards())

    # ------------------------------------------------------------------ views
    def _view(self, shard_ids: Sequence[int]) -> ActivationCache:
        """The cache restricted to some shards (global token indices, hence the split, unchanged)."""
        c = self.cache
        shards = [c.shards[i] for i in shard_ids]
        m = dict(c.manifest, shards=shards, n_tokens=sum(s["n_tokens"] for s in shards))
        return ActivationCache(c.folder, m, c.test_frac, c.split_seed, c.split_unit)

    def _copy(self, **changes) -> CacheBatches:
        new = copy.copy(self)
        for k, v in changes.items():
            setattr(new, k, v)
        return new

    def shard(self, rank: int, world_size: int) -> CacheBatches:
        """Rank `rank`'s view in a `world_size`-rank run (see the class docstring)."""
        if world_size == self.world_size and rank == self.rank:
            return self
        if self.world_size != 1 or self.rank not in (0, None):
            raise ConfigError(f"this CacheBatches is already the view of rank {self.rank} of {self.world_size}")
        return CacheBatches(self.cache, self.layer, self.batch_size, shuffle=self.shuffle, seed=self.seed,
                            split=self.split, test_frac=self.test_frac,
                            buffer_tokens=None if self.memory_limit_bytes is not None else self.buffer_tokens,
                            memory_limit_bytes=self.memory_limit_bytes, drop_last=self.drop_last,
                            dtype=self.dtype, device=self.device, transform=self.transform, rank=rank,
                            world_size=world_size)

    def set_epoch(self, epoch: int) -> None:
        """Fix the order of the next pass (the DistributedSampler convention; the trainers call it)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch

    def assignment(self, epoch: int) -> list[list[int]]:
        """Shard indices each rank reads in `epoch`: the (per-epoch permuted) shard list, dealt round-robin."""
        n = len(self.cache.shards)
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch, 1 << 20))
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        return [order[r::self.world_size] for r in range(self.world_size)]

    def steps(self, epoch: int) -> int:
        """Steps every rank takes in `epoch` (world_size > 1): the fewest full local batches of any rank."""
        counts = self.shard_counts()
        rows = [sum(counts[i] for i in shards) for shards in self.assignment(epoch)]
        steps = min(rows) // (self.batch_size // self.world_size)
        if steps == 0:
            raise EmptyDataError(
                f"epoch {epoch}: some rank's shards hold only {min(rows)} rows of split {self.split!r}, less than one "
                f"batch of {self.batch_size // self.world_size}; use more (smaller) shards, fewer ranks or a "
                "smaller batch_size")
        return steps

    # ------------------------------------------------------------------ streams
    def _stream(self, shard_ids: Sequence[int], batch_size: int, seed: int, shuffle: bool,
                drop_last: bool) -> Iterator[torch.Tensor]:
        if not shard_ids:
            return
        for x in self._view(shard_ids).iter_batches(
                self.layer, batch_size, shuffle=shuffle, seed=seed, split=self.split, test_frac=self.test_frac,
                buffer_tokens=self.buffer_tokens, drop_last=drop_last, dtype=self.dtype, device=self.device):
            yield self.transform(x) if self.transform is not None else x

    def _rank_stream(self, rank: int, epoch: int) -> Iterator[torch.Tensor]:
        shards = self.assignment(epoch)[rank]
        b = self.batch_size // self.world_size
        stream = self._stream(shards, b, _epoch_seed(self.seed, epoch, rank), self.shuffle, drop_last=True)
        for _, x in zip(range(self.steps(epoch)), stream):
            yield x

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = self.epoch
        if self.world_size == 1:
            yield from self._stream(range(len(self.cache.shards)), self.batch_size, _epoch_seed(self.seed, epoch),
                                    self.shuffle, self.drop_last)
        elif self.rank is not None:
            yield from self._rank_stream(self.rank, epoch)
        else:  # every rank's stream in lockstep: the global batches of a world_size-rank run
            streams = [self._rank_stream(r, epoch) for r in range(self.world_size)]
            for parts in zip(*streams):
                yield torch.cat(parts)

    def _sequential_shards(self) -> list[int]:
        n = len(self.cache.shards)
        if self.rank is None or self.world_size == 1:
            return list(range(n))
        return list(range(n))[self.rank::self.world_size]

    def sequential(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        """Every row of this view's share once, in cache order (all rows for world_size 1 or rank=None)."""
        bs = batch_size or self.batch_size
        yield from self._stream(self._sequential_shards(), bs, 0, shuffle=False, drop_last=False)

    def __repr__(self) -> str:
        who = "all ranks" if self.rank is None else f"rank {self.rank}/{self.world_size}"
        return (f"CacheBatches({str(self.cache.folder)!r}, layer={self.layer}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, split={self.split!r}, buffer_tokens={self.buffer_tokens}, {who})")


class TensorBatches:
    """Rank `rank`'s part of the mini-batches a single process would draw from a tensor [N, d].

    Per epoch the permutation is the one `train_sgd(sae, X, cfg)` draws (a torch.Generator seeded with
    `seed`, one `randperm(N)` per epoch); each global batch of `batch_size` rows is cut into
    `world_size` near-equal consecutive parts and this rank yields part `rank`. Global batches with
    fewer rows than ranks are skipped on every rank. `sequential` yields this rank's contiguous share.
    """

    def __init__(self, X: torch.Tensor, batch_size: int, *, shuffle: bool = True, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.X = check_data(X, name="data")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < world_size:
            raise ConfigError(f"batch_size must be an integer >= world_size={world_size}, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        if self.X.shape[0] < world_size:
            raise EmptyDataError(f"data has {self.X.shape[0]} rows, fewer than the {world_size} ranks")
        self.batch_size, self.shuffle, self.seed = batch_size, bool(shuffle), int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._gen = torch.Generator().manual_seed(self.seed)
        self._next_draw = 0  # epoch whose permutation the generator draws next
        self._warned = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _perm(self, epoch: int) -> torch.Tensor | None:
        if not self.shuffle:
            return None
        if epoch < self._next_draw:  # replay (a resumed run, or a pass repeated)
            self._gen = torch.Generator().manual_seed(self.seed)
            self._next_draw = 0
        n = self.X.shape[0]
        while self._next_draw < epoch:
            torch.randperm(n, generator=self._gen)
            self._next_draw += 1
        self._next_draw += 1
        return torch.randperm(n, generator=self._gen)

    def n_batches(self) -> int:
        n, b = self.X.shape[0], self.batch_size
        return n // b + (n % b >= self.world_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        perm = self._perm(self.epoch)
        n = self.X.shape[0]
        for s in range(0, n, self.batch_size):
            rows = perm[s:s + self.batch_size] if perm is not None else torch.arange(s, min(s + self.batch_size, n))
            if rows.numel() < self.world_size:
                if not self._warned:
                    log.warning("the last global batch (%d rows) has fewer rows than the %d ranks: skipped",
                                rows.numel(), self.world_size)
                    self._warned = True
                continue
            yield self.X[torch.tensor_split(rows, self.world_size)[self.rank]]

    def _share(self) -> tuple[int, int]:
        bounds = [r * self.X.shape[0] // self.world_size for r in range(self.world_size + 1)]
        return bounds[self.rank], bounds[self.rank + 1]

    def sequential(self, batch_size: int | None = None) -> Iterator[torch.Tensor]:
        lo, hi = self._share()
        bs = batch_size or self.batch_size
        for s in range(lo, hi, bs):
            yield self.X[s:min(s + bs, hi)]


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


# =============================================================================================== collectives
def allreduce_gradients(params: Sequence[torch.Tensor], n_rows: int, group=None,
                        bucket_elems: int = 1 << 25) -> int:
    """Replace each parameter's gradient by the row-weighted mean over the ranks,
    sum_r n_r grad_r / sum_r n_r: the gradient of the mean loss over the union of the ranks' batches.
    A parameter with no gradient on any rank keeps none. Returns the global row count."""
    params = list(params)
    if not params:
        return n_rows
    dev = params[0].device
    dt = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    head = torch.tensor([float(p.grad is not None) for p in params] + [float(n_rows)], dtype=dt, device=dev)
    buckets: list[list[int]] = [[]]
    size = 0
    for i, p in enumerate(params):
        if size and size + p.numel() > bucket_elems:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += p.numel()
    total = None
    has_grad = None
    for bi, idx in enumerate(buckets):
        pieces = []
        for i in idx:
            g = params[i].grad
            g = torch.zeros_like(params[i]) if g is None else (g.to_dense() if g.is_sparse else g)
            pieces.append(g.reshape(-1).to(dt) * float(n_rows))
        flat = torch.cat(([head] if bi == 0 else []) + pieces)
        dist.all_reduce(flat, group=group)
        if bi == 0:
            has_grad = flat[:len(params)] > 0
            total = float(flat[len(params)])
            flat = flat[len(params) + 1:]
        off = 0
        for i in idx:
            p = params[i]
            piece = flat[off:off + p.numel()].view_as(p)
            off += p.numel()
            if not bool(has_grad[i]):
                p.grad = None
                continue
            g = (piece / total).to(p.dtype)
            if p.grad is None or p.grad.is_sparse:
                p.grad = g
            else:
                p.grad.copy_(g)
    return int(total)


def allreduce_decoder_statistics(acc: DecoderAccumulator, group=None) -> DecoderAccumulator:
    """Sum the PAM decoder statistics (Gram, cross-covariance, sums, N) over the ranks, in place."""
    for t in acc.sum_tensors():
        dist.all_reduce(t, group=group)
    n = torch.tensor([acc.n], dtype=torch.int64, device=acc.device)
    dist.all_reduce(n, group=group)
    acc.n = int(n)
    return acc


def merge_metrics(acc: MetricAccumulator, group=None) -> MetricAccumulator:
    """Gather every rank's `MetricAccumulator` and merge them in rank order (the same on every rank)."""
    _, world = _rank_world(group)
    if world == 1:
        return acc
    cpu = copy.copy(acc)
    for k, v in vars(cpu).items():
        if isinstance(v, torch.Tensor):
            setattr(cpu, k, v.detach().cpu())
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, cpu, group=group)
    out = MetricAccumulator()
    for p in parts:
        out.merge(p)
    return out


def _average_sums(sums: dict[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    _, world = _rank_world(group)
    if world == 1 or not sums:
        return dict(sums)
    keys = sorted(sums)
    dev = sums[keys[0]].device
    v = torch.stack([sums[k].to(device=dev, dtype=torch.float64).reshape(()) for k in keys])
    dist.all_reduce(v, group=group)
    v /= world
    return {k: v[i] for i, k in enumerate(keys)}


# =============================================================================================== trainers
class _DistributedMixin:
    """What makes a Trainer data parallel (see the module docstring). Mixed in before the trainer class."""

    def __init__(self, sae: SAE, data, cfg: SGDConfig, eval_data=None, callback: Callback | None = None,
                 group=None):
        if not (dist.is_available() and dist.is_initialized()):
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
        self.run_sums = _average_sums(self.run_sums, self.group)
        super().after_sgd()

    def reduce_decoder_statistics(self, acc: DecoderAccumulator) -> None:
        allreduce_decoder_statistics(acc, self.group)

    def _save(self) -> None:
        local = self.run_sums
        self.run_sums = _average_sums(local, self.group)  # the checkpoint holds every rank's running sums
        try:
            _run_agreed(lambda: super(_DistributedMixin, self)._save() if self.rank == 0 else None, self.group)
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
    if not (dist.is_available() and dist.is_initialized()):
        train = train_pam_sgd if pam else train_sgd
        return train(sae, data, cfg, eval_data=eval_data, callback=callback)
    cls = DistributedPAMTrainer if pam else DistributedSGDTrainer
    return cls(sae, data, cfg, eval_data=eval_data, callback=callback, group=group).run()


# =============================================================================================== harvesting
def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def harvest_distributed(model: Any = None, texts: Sequence[str] | None = None,
                        layers: int | Sequence[int] | str = "all", out: str | os.PathLike = "activations", *,
                        overwrite: bool = False, save_texts: bool = True,
                        seed: int = 0, device: str | torch.device = "cpu", progress: bool = True, group=None,
                        **harvest_kwargs) -> ActivationCache:
    """`splinterp.data.harvest` with the texts split between the ranks: rank r runs the model on the r-th
    contiguous slice of `texts` and writes its own shards; rank 0 then merges them into one cache at `out`
    (one manifest, shards renumbered, `text_ids` indexing the full `texts`, vocabularies merged), built
    under a temporary name and renamed into place, so an interrupted run leaves no cache at `out`.

    Tokens are stored rank by rank (rank 0's texts first). Other keyword arguments go to `harvest`
    (site, token_selection, max_length, batch_size, dtype, shard_tokens, ...). Every rank must see `out`'s
    parent folder. Returns the opened cache on every rank. Without a process group: plain `harvest`.
    """
    from splinterp.data.harvest import harvest, resolve_texts

    rank, world = _rank_world(group)
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        return harvest(model, texts, layers, out, overwrite=overwrite, save_texts=save_texts, seed=seed,
                          device=device, progress=progress, **harvest_kwargs)
    out = Path(out)
    texts, text_source = resolve_texts(texts, seed)

    def check_out() -> str:
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            raise OverwriteError(f"{out} exists and is not empty; pass overwrite=True to replace it")
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.harvest-{uuid.uuid4().hex[:12]}.tmp"
        stage.mkdir()
        return str(stage)

    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = check_out()
        except Exception as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0, group=group)
    if isinstance(box[0], Exception):
        raise box[0]
    stage = Path(box[0])
    bounds = [r * len(texts) // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    mine = stage / f"rank{rank:05d}"

    def run_rank() -> dict[str, Any]:
        if hi == lo:
            return {"n_tokens": 0, "shards": [], "manifest": None, "vocab": {}}
        try:
            cache = harvest(model, texts[lo:hi], layers, mine, save_texts=False, seed=seed, device=device,
                               progress=progress and rank == 0, **harvest_kwargs)
        except EmptyDataError:  # no tokens selected from this rank's texts
            return {"n_tokens": 0, "shards": [], "manifest": None, "vocab": {}}
        vocab_path = mine / "vocab.json"
        vocab = json.loads(vocab_path.read_text("utf-8")) if vocab_path.is_file() else {}
        return {"n_tokens": cache.n_tokens, "shards": cache.shards, "manifest": cache.manifest, "vocab": vocab}

    try:
        part = _run_agreed(run_rank, group)
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, {k: part[k] for k in ("n_tokens", "shards")}, group=group)
        if sum(p["n_tokens"] for p in parts) == 0:
            raise EmptyDataError("no tokens selected from the texts on any rank")
        tok0 = sum(p["n_tokens"] for p in parts[:rank])
        shard0 = sum(len(p["shards"]) for p in parts[:rank])

        def renumber() -> list[dict[str, Any]]:
            """Rewrite this rank's shards under their global names, with text_ids into the full `texts`."""
            from safetensors.torch import load_file
            from safetensors.torch import save as st_save

            entries = []
            for j, s in enumerate(part["shards"]):
                t = load_file(str(mine / s["file"]))
                t["text_ids"] = t["text_ids"] + lo
                start = tok0 + s["start"]
                data = st_save(t, metadata={"format": "pt", "start": str(start)})
                name = f"shard_{shard0 + j:05d}.safetensors"
                write_bytes(stage / name, data)
                entries.append({"file": name, "n_tokens": s["n_tokens"], "start": start,
                                "sha256": _sha256_bytes(data)})
                (mine / s["file"]).unlink()
            return entries

        entries = _run_agreed(renumber, group)
        everything: list[Any] = [None] * world
        dist.all_gather_object(everything, {"entries": entries, "manifest": part["manifest"],
                                            "vocab": part["vocab"]}, group=group)

        def merge() -> None:
            shards = [e for p in everything for e in p["entries"]]
            base = next(p["manifest"] for p in everything if p["manifest"] is not None)
            vocab: dict[str, str] = {}
            for p in everything:
                vocab.update(p["vocab"])
            manifest = {k: v for k, v in base.items() if k != "shards"}
            manifest.update(
                n_tokens=sum(s["n_tokens"] for s in shards), n_texts=len(texts), text_source=text_source,
                has_texts=save_texts, has_vocab=bool(vocab), shards=shards,
                elapsed_s=max(p["manifest"]["elapsed_s"] for p in everything if p["manifest"] is not None),
                distributed={"world_size": world, "rank_tokens": [p["n_tokens"] for p in parts],
                             "rank_text_ranges": [[bounds[r], bounds[r + 1]] for r in range(world)]})
            validate_manifest(manifest, f"merged manifest of {out}")
            with atomic_dir(out) as tmp:
                for s in shards:
                    os.replace(stage / s["file"], tmp / s["file"])
                if save_texts:
                    write_json(tmp / "texts.json", texts, indent=None)
                if vocab:
                    write_json(tmp / "vocab.json", vocab, indent=None)
                write_json(tmp / MANIFEST, manifest)  # last: its presence marks a complete cache
            log.info("merged %d shards (%d tokens) from %d ranks into %s", len(shards), manifest["n_tokens"],
                     world, out)

        _run_agreed(merge if rank == 0 else (lambda: None), group)
    finally:
        dist.barrier(group=group)
        if rank == 0:
            shutil.rmtree(stage, ignore_errors=True)
    return ActivationCache.open(out)


# =============================================================================================== command line
def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m splinterp.distributed",
                                 description="Streamed and data-parallel SAE training and harvesting "
                                             "(run under torchrun for several processes).")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an SAE from an activation cache, streamed")
    t.add_argument("--cache", required=True, help="activation cache folder (splinterp.data.harvest)")
    t.add_argument("--layer", type=int, default=None, help="cached layer (default: the only one)")
    t.add_argument("--out", required=True, help="SAE folder to write (rank 0)")
    t.add_argument("--method", choices=("sgd", "pam_sgd"), default="sgd")
    t.add_argument("--architecture", default="topk")
    t.add_argument("--d-sae", type=int, default=4096)
    t.add_argument("--k", type=int, default=32, help="active latents (topk architectures)")
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--batch-size", type=int, default=4096, help="global batch size (split between ranks)")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--l1-coefficient", type=float, default=0.0)
    t.add_argument("--split", choices=("train", "all"), default="train")
    t.add_argument("--test-frac", type=float, default=None)
    t.add_argument("--eval", action="store_true", help="also evaluate on the cache's test split each epoch")
    t.add_argument("--no-eval-train", action="store_true", help="skip the full pass of train metrics per epoch")
    t.add_argument("--buffer-tokens", type=int, default=None, help="shuffle buffer rows per rank")
    t.add_argument("--memory-limit-mb", type=float, default=None, help="size the shuffle buffer for this data budget")
    t.add_argument("--standardize", action="store_true", help="standardise with train-split mean/std (fitted first)")
    t.add_argument("--no-shuffle", action="store_true")
    t.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32")
    t.add_argument("--checkpoint-dir", default=None)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--history", default=None, help="History JSON (default: OUT/history.json)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    t.add_argument("--progress", action="store_true", help="progress bars (rank 0)")
    h = sub.add_parser("harvest", help="harvest activations with the texts split between the ranks")
    h.add_argument("--out", required=True)
    h.add_argument("--model", default=None, help="HF id or folder (default: offline all-MiniLM-L6-v2)")
    h.add_argument("--texts", default=None, help=".txt (one text per line) or .json list (default: offline texts)")
    h.add_argument("--layers", default="all", help="'all' or comma-separated block indices")
    h.add_argument("--site", default="resid_post")
    h.add_argument("--max-length", type=int, default=128)
    h.add_argument("--batch-size", type=int, default=32)
    h.add_argument("--shard-tokens", type=int, default=8192)
    h.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    h.add_argument("--overwrite", action="store_true")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--device", default=None)
    h.add_argument("--progress", action="store_true")
    return ap.parse_args(argv)


def _fit_standardizer(data: CacheBatches, group=None):
    """Train-split mean/std from every rank's share, merged (Chan's update): the same on every rank."""
    from splinterp.data.cache import Standardizer

    rank, world = _rank_world(group)
    view = data.shard(rank, world) if world > 1 else data
    part = None
    if view.n_rows() > 0:
        part = Standardizer.fit(view._copy(transform=None, dtype=torch.float64).sequential(), layer=data.layer)
    parts: list[Any] = [part] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(parts, part, group=group)
    n, mean, m2 = 0, None, None
    for p in parts:
        if p is None:
            continue
        if mean is None:
            n, mean, m2 = p.n, p.mean, p.std ** 2 * p.n
            continue
        tot = n + p.n
        delta = p.mean - mean
        m2 = m2 + p.std ** 2 * p.n + delta ** 2 * (n * p.n / tot)
        mean = mean + delta * (p.n / tot)
        n = tot
    if mean is None:
        raise EmptyDataError("no training rows to fit the standardiser on")
    return Standardizer(mean=mean, std=torch.sqrt(m2 / n), n=n, layer=data.layer)


def _cmd_train(a: argparse.Namespace) -> int:
    from splinterp.io import save
    from splinterp.sae import SAEConfig

    info = init_distributed(DistConfig(device=a.device, seed=a.seed))
    cache = ActivationCache.open(a.cache)
    layer = a.layer if a.layer is not None else cache.layers[0]
    if a.layer is None and len(cache.layers) != 1:
        raise ConfigError(f"the cache holds layers {cache.layers}; choose one with --layer")
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[a.dtype]
    limit = None if a.memory_limit_mb is None else int(a.memory_limit_mb * 2**20)
    split = None if a.split == "all" else "train"
    data = CacheBatches(cache, layer, a.batch_size, shuffle=not a.no_shuffle, seed=a.seed, split=split,
                        test_frac=a.test_frac, buffer_tokens=a.buffer_tokens, memory_limit_bytes=limit, dtype=dtype)
    if a.standardize:
        std = _fit_standardizer(data)
        data.transform = std
    eval_data = None
    if a.eval:
        eval_data = data._copy(split="test", shuffle=False, _counts=None)
    arch = a.architecture
    sae = SAE(SAEConfig(d_in=cache.d_model, d_sae=a.d_sae, architecture=arch,
                        k=a.k if arch in ("topk", "topk_abs") else None, seed=a.seed, dtype=a.dtype,
                        device=str(info.device),
                        metadata={"cache": str(Path(a.cache).resolve()), "layer": layer,
                                  "model_name": cache.model_name}))
    kw = dict(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, l1_coefficient=a.l1_coefficient, seed=a.seed,
              shuffle=not a.no_shuffle, eval_train=not a.no_eval_train, checkpoint_dir=a.checkpoint_dir,
              resume=a.resume, progress=a.progress and info.rank == 0)
    cfg = PAMConfig(**kw) if a.method == "pam_sgd" else SGDConfig(**kw)
    hist = train_distributed(sae, data, cfg, eval_data=eval_data)
    if info.rank == 0:
        folder = save(sae, a.out)
        if a.standardize:
            data.transform.save(folder / "standardizer.json")
        hist.to_json(a.history or folder / "history.json")
        log.info("wrote %s (%s)", folder, ", ".join(f"{k}={v:.5g}" for k, v in hist.last.items()
                                                  if isinstance(v, float) and not k.endswith("time")))
    if info.world_size > 1:
        dist.barrier()
    return 0


def _cmd_harvest(a: argparse.Namespace) -> int:
    info = init_distributed(DistConfig(device=a.device, seed=a.seed))
    texts = None
    if a.texts is not None:
        p = Path(a.texts)
        if p.suffix == ".json":
            texts = json.loads(p.read_text("utf-8"))
        else:
            texts = [line for line in p.read_text("utf-8").splitlines() if line.strip()]
    layers: Any = a.layers if a.layers == "all" else [int(v) for v in a.layers.split(",")]
    cache = harvest_distributed(a.model, texts, layers, a.out, overwrite=a.overwrite, seed=a.seed,
                                device=info.device, progress=a.progress, site=a.site, max_length=a.max_length,
                                batch_size=a.batch_size, shard_tokens=a.shard_tokens, dtype=a.dtype)
    if info.rank == 0:
        log.info("%r", cache)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = _parse(argv)
    logging.basicConfig(level=logging.INFO, format=f"[rank {os.environ.get('RANK', '0')}] %(message)s")
    try:
        return _cmd_train(a) if a.command == "train" else _cmd_harvest(a)
    except SplinterpError as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
