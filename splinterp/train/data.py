"""Training data as a tensor or as a re-iterable stream of batches, with a resumable position.

Tensor data [N, d_in] are shuffled by a torch.Generator owned by the trainer, so the (generator state at
the start of the epoch, batches done) pair pins the data position exactly. An iterable of batches (a list
of tensors, a DataLoader, a streamed activation cache) is iterated once per epoch; if it has
``set_epoch(epoch)`` that is called first (the DistributedSampler convention), and a resumed epoch skips
the batches already done. Its order must then be a function of the epoch for a bit-identical resume.
If it also has ``sequential(batch_size)`` (e.g. `splinterp.distributed.CacheBatches`), full passes
(decoder statistics, evaluation) use that: every row once, unshuffled.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from splinterp.data.streaming import epoch_order
from splinterp.errors import ConfigError, EmptyDataError
from splinterp.validation import check_data


class BatchSource:
    def __init__(self, data, d_in: int, dtype: torch.dtype, device: torch.device, name: str = "data"):
        self.d_in, self.dtype, self.device, self.name = d_in, dtype, torch.device(device), name
        if isinstance(data, torch.Tensor) or hasattr(data, "__array__"):
            self.tensor: torch.Tensor | None = check_data(data, d_in, name=name, dtype=dtype)
            self.iterable = None
        elif isinstance(data, Iterable):
            if iter(data) is data:
                raise ConfigError(f"{name} is a one-shot iterator; pass a tensor, a list of batches or an "
                                  "object that can be iterated once per epoch (e.g. a DataLoader)")
            self.tensor, self.iterable = None, data
        else:
            raise ConfigError(f"{name} must be a tensor [N, d_in] or an iterable of batches, "
                              f"got {type(data).__name__}")

    @property
    def n_rows(self) -> int | None:
        return None if self.tensor is None else self.tensor.shape[0]

    def fingerprint(self) -> list[float] | None:
        """A cheap identity check for resuming on the same tensor data: N and sums of the first rows."""
        if self.tensor is None:
            return None
        head = self.tensor[:1024].to(torch.float64)
        return [float(self.tensor.shape[0]), float(head.sum()), float((head * head).sum())]

    def _check(self, x, i: int) -> torch.Tensor:
        x = check_data(x, self.d_in, name=f"{self.name} batch {i}", dtype=self.dtype)
        return x.to(self.device, non_blocking=True)

    def epoch(self, epoch: int, batch_size: int, generator: torch.Generator | None,
              start_batch: int = 0) -> Iterator[torch.Tensor]:
        """Training batches of one epoch (shuffled by `generator` if given), from batch `start_batch` on."""
        if self.tensor is not None:
            n = self.tensor.shape[0]
            order = epoch_order(n, generator)
            for b, s in enumerate(range(0, n, batch_size)):
                if b < start_batch:
                    continue
                rows = order[s:s + batch_size] if order is not None else slice(s, s + batch_size)
                yield self.tensor[rows].to(self.device, non_blocking=True)
            return
        if hasattr(self.iterable, "set_epoch"):
            self.iterable.set_epoch(epoch)
        seen = 0
        for i, x in enumerate(self.iterable):
            seen += 1
            if i < start_batch:
                continue
            yield self._check(x, i)
        if seen == 0:
            raise EmptyDataError(f"{self.name} yielded no batches")

    def sequential(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every row once, in order (decoder statistics, evaluation)."""
        if self.tensor is not None:
            for s in range(0, self.tensor.shape[0], batch_size):
                yield self.tensor[s:s + batch_size].to(self.device, non_blocking=True)
            return
        seen = 0
        rows = self.iterable.sequential(batch_size) if hasattr(self.iterable, "sequential") else self.iterable
        for i, x in enumerate(rows):
            seen += 1
            yield self._check(x, i)
        if seen == 0:
            raise EmptyDataError(f"{self.name} yielded no batches")
