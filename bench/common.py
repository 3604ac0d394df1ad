"""Shared benchmark helpers: interleaved timing, ratios within a round, machine description.

Why interleaved: the machine is shared and its load drifts, so a figure is only meaningful as a ratio
against a baseline timed in the same process, alternating with it; each round times every case once
(in rotating order) and a ratio is taken inside the round, then the median over rounds is reported.

The result contract of a `bench/bench_*.py` module: `run(quick: bool) -> dict` with
    {"name": str, "rows": [row(...), ...], "notes": [str, ...]}
where each row is made by `row()` below (figure, ratio, baseline, and optionally the two timings, the
unit and a target). `bench.run` also accepts a flat {figure: ratio} dict.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["interleaved", "machine_info", "median", "round_ratios", "row", "timed"]


def timed(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds one call of fn takes (wall clock by default; `time.thread_time` for this thread's CPU)."""
    t0 = clock()
    fn()
    return clock() - t0


def interleaved(
    cases: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Time every case once per round, rotating the order between rounds; {name: [seconds per round]}.

    `clock=time.thread_time` with torch.set_num_threads(1) measures CPU time, which other users'
    processes on a shared machine cannot inflate (they can only slow the wall clock)."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            out[name].append(timed(cases[name], clock))
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def round_ratios(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of times[num] / times[den] (both timed in the same round)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def row(
    figure: str,
    ratio: float,
    baseline: str,
    *,
    value: float | None = None,
    baseline_value: float | None = None,
    unit: str = "ms",
    target: str | None = None,
    ok: bool | None = None,
    note: str | None = None,
) -> dict:
    """One result line: `figure` took `ratio` times `baseline` (timed side by side in this process)."""
    return {
        "figure": figure,
        "ratio": float(ratio),
        "baseline": baseline,
        "value": value,
        "baseline_value": baseline_value,
        "unit": unit,
        "target": target,
        "ok": ok,
        "note": note,
    }


def machine_info() -> dict[str, str]:
    """What the figures were measured on (CPU model, cores, torch, threads, GPU if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        pass
    return info
