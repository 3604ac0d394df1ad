"""How much memory a device has, so that a setting that cannot fit is refused up front with its size, instead
of an allocation that fails after minutes of swapping, or a process the kernel kills.

Capacities are totals, not what is free right now: a refusal means "this can never fit here", which is
deterministic; something that fits the total may still fail later if other programs hold the memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from splinterp.errors import TooLargeError

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (powers of 1024, as `free -h` and nvidia-smi count)."""
    n = float(n)
    for unit in _UNITS[:-1]:
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} {_UNITS[-1]}"


def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit() -> int | None:
    """This process's cgroup v2 memory limit (memory.max + memory.swap.max), None where there is none."""
    try:
        rel = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if line.startswith("0::"))
        folder = Path("/sys/fs/cgroup") / rel.strip().lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        swap = (folder / "memory.swap.max").read_text().strip() if (folder / "memory.swap.max").exists() else "0"
        return int(limit) + (0 if swap == "max" else int(swap))
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def host_memory() -> int | None:
    """Bytes this process could ever hold in RAM and swap: the machine's total, capped by its cgroup limit."""
    ram = _meminfo_bytes("MemTotal")
    if ram is None:
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    total = ram + (_meminfo_bytes("SwapTotal") or 0)
    limit = _cgroup_limit()
    return total if limit is None else min(total, limit)


def device_memory(device: str | torch.device) -> int | None:
    """Total bytes of `device`: host memory for the CPU, the GPU's memory for an available CUDA device; None
    where it cannot be known (another device type, or CUDA not available in this process)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return host_memory()
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index < torch.cuda.device_count():
            return int(torch.cuda.get_device_properties(index).total_memory)
    return None


def check_fits(need: int, device: str | torch.device, what: str) -> None:
    """TooLargeError if `need` bytes exceed the total memory of `device` (nothing is checked where it is unknown).
    `what` says what needs the memory and why, e.g. "SAEConfig(d_in=.., d_sae=..): W_enc and W_dec"."""
    have = device_memory(device)
    if have is not None and need > have:
        where = "this machine's memory (RAM + swap)" if torch.device(device).type == "cpu" else f"{device}'s memory"
        raise TooLargeError(f"{what} needs about {format_bytes(need)}, more than {where}: {format_bytes(have)}. "
                            "Nothing was allocated; choose smaller sizes")
