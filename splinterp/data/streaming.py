"""Streams of training batches: `CacheBatches` over an activation cache larger than memory, `TensorBatches`
over a tensor, both with the trainers' batch-source protocol (iterate once per epoch after `set_epoch`,
`sequential(batch_size)` for full passes) and a rank's view for data-parallel training.

`CacheBatches(cache, layer, batch_size, shuffle=True, seed=0, split="train")` streams the cache shard by
shard (safetensors' lazy, memory-mapped `safe_open`; one shard read at a time) through a shuffling buffer of
`buffer_tokens` rows, re-seeded per epoch (`set_epoch`, called by the trainers), so runs are deterministic
and resumable. `sequential()` is an unshuffled pass over every row, used by the trainers for evaluation and
the PAM decoder statistics. Nothing materialises the data set: memory is bounded by the buffer and the shard
size (`CacheBatches.peak_bytes()`; `memory_limit_bytes=` sizes the buffer for you).

Why here and not in `splinterp.parallel`: single-process training from a cache (`splinterp train
--memory-limit-mb`) uses the same streams; data parallelism only adds the rank's view (`shard`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from splinterp.data.cache import ActivationCache, Standardizer
from splinterp.errors import ConfigError, DTypeError, EmptyDataError
from splinterp.validation import check_data

log = logging.getLogger(__name__)

__all__ = ["CacheBatches", "TensorBatches", "epoch_order", "epoch_seed"]

TRAIN_BATCHES = 5
"""Batch-sized tensors a training step holds at once, counted by `CacheBatches.peak_bytes`."""


def epoch_order(n: int, generator: torch.Generator | None) -> torch.Tensor | None:
    """The order of the rows in one epoch: one randperm(n) drawn from `generator` (None: in order).

    The one shuffle rule of the trainers (`BatchSource.epoch`, a generator seeded once from the config's seed)
    and of `TensorBatches`, whose ranks cut the batches of this same order: why data-parallel training
    equals one process."""
    return None if generator is None else torch.randperm(n, generator=generator)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
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
        self._buffer_arg = buffer_tokens
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

    VIEW_FIELDS = ("batch_size", "shuffle", "seed", "split", "test_frac", "buffer_tokens", "memory_limit_bytes",
                   "drop_last", "dtype", "device", "transform", "rank", "world_size")

    def view(self, **changes) -> CacheBatches:
        """A new stream over the same cache and layer with some settings changed (any of `VIEW_FIELDS`), e.g.
        `stream.view(split="test", shuffle=False)` for the held-out rows. Built through the constructor, so
        every setting is validated again and the row counts are those of the new split."""
        unknown = set(changes) - set(self.VIEW_FIELDS)
        if unknown:
            raise ConfigError(f"CacheBatches.view: unknown settings {sorted(unknown)}; allowed: {self.VIEW_FIELDS}")
        kw = {"batch_size": self.batch_size, "shuffle": self.shuffle, "seed": self.seed, "split": self.split,
              "test_frac": self.test_frac, "buffer_tokens": self._buffer_arg,
              "memory_limit_bytes": self.memory_limit_bytes, "drop_last": self.drop_last, "dtype": self.dtype,
              "device": self.device, "transform": self.transform, "rank": self.rank, "world_size": self.world_size}
        if "memory_limit_bytes" in changes and "buffer_tokens" not in changes:
            kw["buffer_tokens"] = None
        if "buffer_tokens" in changes and "memory_limit_bytes" not in changes:
            kw["memory_limit_bytes"] = None
        kw.update(changes)
        return CacheBatches(self.cache, self.layer, **kw)

    def shard(self, rank: int, world_size: int) -> CacheBatches:
        """Rank `rank`'s view in a `world_size`-rank run (see the class docstring)."""
        if world_size == self.world_size and rank == self.rank:
            return self
        if self.world_size != 1 or self.rank not in (0, None):
            raise ConfigError(f"this CacheBatches is already the view of rank {self.rank} of {self.world_size}")
        same_buffer = {} if self.memory_limit_bytes is not None else {"buffer_tokens": self.buffer_tokens}
        return self.view(rank=rank, world_size=world_size, **same_buffer)

    def fit_standardizer(self) -> Standardizer:
        """Per-feature mean/std of this view's rows (its `sequential` pass, before `transform`), in float64."""
        raw = self.view(transform=None, dtype=torch.float64, shuffle=False)
        if raw.n_rows() == 0:
            raise EmptyDataError(f"split {self.split!r} of layer {self.layer} has no rows to fit a standardiser on")
        return Standardizer.fit(raw.sequential(), layer=self.layer)

    def set_epoch(self, epoch: int) -> None:
        """Fix the order of the next pass (the DistributedSampler convention; the trainers call it)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = epoch

    def assignment(self, epoch: int) -> list[list[int]]:
        """Shard indices each rank reads in `epoch`: the (per-epoch permuted) shard list, dealt round-robin."""
        n = len(self.cache.shards)
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 1 << 20))
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
        stream = self._stream(shards, b, epoch_seed(self.seed, epoch, rank), self.shuffle, drop_last=True)
        for _, x in zip(range(self.steps(epoch)), stream):
            yield x

    def __iter__(self) -> Iterator[torch.Tensor]:
        epoch = self.epoch
        if self.world_size == 1:
            yield from self._stream(range(len(self.cache.shards)), self.batch_size, epoch_seed(self.seed, epoch),
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
            epoch_order(n, self._gen)
            self._next_draw += 1
        self._next_draw += 1
        return epoch_order(n, self._gen)

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


