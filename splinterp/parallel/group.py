"""Joining a torch.distributed process group, spawning local ones, and agreeing on failures.

Why a module of its own: every data-parallel piece (trainers, collectives, sharded harvesting) needs "which
rank am I, of how many" and "fail on every rank if one rank failed" and nothing else from the process group.
The rendezvous itself comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).
Nothing here touches global random state: every rank seeds its own generators from the run's seed.
"""

from __future__ import annotations

import datetime
import io
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from splinterp.errors import ConfigError, SplinterpError

log = logging.getLogger(__name__)


@dataclass
class DistConfig:
    """How `init_distributed` joins the process group (the rendezvous itself comes from torchrun's env)."""

    backend: Literal["gloo", "nccl", "mpi"] | None = None
    """"gloo" (CPU), "nccl" (CUDA) or None: nccl when the rank's device is CUDA, else gloo."""
    device: str | None = None
    """None: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    timeout_s: float = 1800.0
    """How long a collective waits for the other ranks before failing."""

    def __post_init__(self) -> None:
        if self.backend not in (None, "gloo", "nccl", "mpi"):
            raise ConfigError(f"backend must be 'gloo', 'nccl', 'mpi' or None, got {self.backend!r}")
        if not isinstance(self.timeout_s, (int, float)) or isinstance(self.timeout_s, bool) or self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be a positive number, got {self.timeout_s!r}")


@dataclass
class DistInfo:
    """This process's place in the group: rank, world size, local rank and the device it computes on."""

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


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher that sets WORLD_SIZE)."""
    return os.environ.get("WORLD_SIZE") is not None


def init_distributed(cfg: DistConfig | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    Without those variables (a plain `python` run) nothing is initialised and a single-process
    `DistInfo(rank=0, world_size=1)` is returned; the data-parallel functions then run on one process.
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


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without a process group."""
    if is_initialized():
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

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size must be an integer >= 1, got {world_size!r}")
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
            results[r] = torch.load(io.BytesIO(v), weights_only=False)  # our own children's return values

    while not procs.join(timeout=0.05):
        drain()
    drain()
    return results


def agree(ok: bool, message: str, group=None) -> None:
    """Collective: raise on every rank if any rank failed (no rank is left waiting in a collective)."""
    _, world = rank_world(group)
    if world == 1:
        return
    status: list[Any] = [None] * world
    dist.all_gather_object(status, (ok, message), group=group)
    bad = [(r, m) for r, (o, m) in enumerate(status) if not o]
    if bad and ok:
        raise SplinterpError("; ".join(f"rank {r} failed: {m}" for r, m in bad))


def run_agreed(fn: Callable[[], Any], group=None) -> Any:
    """Run fn on this rank, then make every rank raise if any rank's fn raised."""
    try:
        out = fn()
    except Exception as e:
        agree(False, f"{type(e).__name__}: {e}", group)
        raise
    agree(True, "", group)
    return out


def broadcast_from_rank0(fn: Callable[[], Any], group=None) -> Any:
    """Run fn on rank 0 only and give its result to every rank; an exception there is raised everywhere."""
    rank, world = rank_world(group)
    if world == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 - re-raised on every rank just below
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0, group=group)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value
