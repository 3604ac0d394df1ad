"""Collectives of data-parallel training: averaged gradients, summed PAM decoder statistics, merged
metrics and standardisers. Each is exact: the result equals what one process computes on the union of the
ranks' rows, up to floating-point summation order.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from splinterp.data.cache import Standardizer
from splinterp.metrics import MetricAccumulator
from splinterp.moments import Moments
from splinterp.parallel.group import rank_world
from splinterp.train.decoder import DecoderAccumulator


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
    _, world = rank_world(group)
    if world == 1:
        return acc
    cpu = copy.copy(acc)
    for k, v in vars(cpu).items():
        if isinstance(v, torch.Tensor):
            setattr(cpu, k, v.detach().cpu())
        elif isinstance(v, Moments):
            setattr(cpu, k, Moments(v.n, v.mean.cpu(), v.m2.cpu()))
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, cpu, group=group)
    out = MetricAccumulator()
    for p in parts:
        out.merge(p)
    return out


def average_sums(sums: dict[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    """Rank average of scalar running sums (the trainers' running loss), the same dict on every rank."""
    _, world = rank_world(group)
    if world == 1 or not sums:
        return dict(sums)
    keys = sorted(sums)
    dev = sums[keys[0]].device
    v = torch.stack([sums[k].to(device=dev, dtype=torch.float64).reshape(()) for k in keys])
    dist.all_reduce(v, group=group)
    v /= world
    return {k: v[i] for i, k in enumerate(keys)}



def fit_standardizer(data, group=None) -> Standardizer:
    """Train-split mean/std of a `CacheBatches` stream from every rank's share, merged exactly: the same
    standardiser on every rank, equal to the one a single process fits on all rows."""
    rank, world = rank_world(group)
    view = data.shard(rank, world) if world > 1 else data
    part = view.fit_standardizer() if view.n_rows() > 0 else None
    parts: list[Any] = [part]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, part, group=group)
    return Standardizer.merge(parts)
