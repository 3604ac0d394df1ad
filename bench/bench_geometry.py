"""Geometry benchmarks, each a ratio against a baseline run in the same process.

(a) exact 2-D cells of a 256-site order-15 power diagram vs rasterising the same diagram on a 512x512 grid
    (the brute-force picture, which also misses small cells);
(b) region_ids on 100k inputs of a TopK SAE (784 -> 4096, k = 32) vs one encode of the same inputs
    (encode is run in the chunks region_ids uses: a dense 100k x 4096 code plus its pre-activations
    would need several GB at once), and region_ids on 1e6 inputs of a small SAE (64 -> 512, k = 8) with
    its peak memory measured in a fresh subprocess (current RSS sampled every 2 ms, peak minus the RSS
    before the call).

    python bench/bench_geometry.py            # full sizes
    python bench/bench_geometry.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import torch

from splinterp import SAE, SAEConfig
from splinterp.geometry import PowerDiagram, region_ids
from splinterp.geometry.regions import DEFAULT_BATCH


def _timed(fn, repeat: int = 1):
    """(result, best wall seconds, cpu seconds of that run)."""
    best = (None, float("inf"), 0.0)
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        dw, dc = time.perf_counter() - w, time.process_time() - c
        if dw < best[1]:
            best = (out, dw, dc)
    return best


def bench_cells(m: int, k: int, grid: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    pd = PowerDiagram(rng.uniform(-1, 1, (m, 2)), rng.uniform(0, 0.05, m), order=k)
    bounds = (-1.0, 1.0, -1.0, 1.0)
    cells, t_cells, c_cells = _timed(lambda: pd.cells_2d(bounds))
    xs = (np.arange(grid) + 0.5) / grid * 2 - 1
    P = np.stack(np.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    keys, t_grid, c_grid = _timed(lambda: pd.keys(P))
    hit = {tuple(r) for r in keys.tolist()}
    area_err = abs(sum(c.area for c in cells) - 4.0) / 4.0
    return {
        "sites": m,
        "order": k,
        "cells": len(cells),
        "cells_2d_s": t_cells,
        "cells_2d_cpu_s": c_cells,
        "grid": f"{grid}x{grid}",
        "grid_s": t_grid,
        "grid_cpu_s": c_grid,
        "ratio_cells_over_grid": t_cells / t_grid,
        "cells_missed_by_grid": len(cells) - len(hit & {c.key for c in cells}),
        "area_rel_error": area_err,
    }


def _topk_sae(d_in: int, d_sae: int, k: int, seed: int = 0) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, seed=seed))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return sae


def bench_region_ids(n: int, d_in: int, d_sae: int, k: int, repeat: int) -> dict:
    sae = _topk_sae(d_in, d_sae, k)
    X = torch.randn(n, d_in, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def encode_chunked():
        for s in range(0, n, DEFAULT_BATCH):
            sae.encode(X[s : s + DEFAULT_BATCH])

    _, t_enc, c_enc = _timed(encode_chunked, repeat)
    ids, t_ids, c_ids = _timed(lambda: region_ids(sae, X), repeat)
    return {
        "inputs": n,
        "sae": f"topk {d_in}->{d_sae} k={k} float32",
        "encode_s": t_enc,
        "encode_cpu_s": c_enc,
        "encode_mode": f"chunks of {DEFAULT_BATCH} (the chunking region_ids uses)",
        "region_ids_s": t_ids,
        "region_ids_cpu_s": c_ids,
        "ratio_region_ids_over_encode": t_ids / t_enc,
        "n_regions": int(ids.max()) + 1,
    }


_MEM_CHILD = r"""
import json, os, resource, sys, threading, time, torch
sys.path.insert(0, {here!r})
from bench_geometry import _topk_sae
from splinterp.geometry import region_ids
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
n, d_in, d_sae, k = {args}
sae = _topk_sae(d_in, d_sae, k)
X = torch.randn(n, d_in, generator=torch.Generator().manual_seed(2))
base = rss()
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
th = threading.Thread(target=sample, daemon=True)
th.start()
t, c = time.perf_counter(), time.process_time()
ids = region_ids(sae, X)
dt, dc = time.perf_counter() - t, time.process_time() - c
done.set()
th.join()
peak[0] = max(peak[0], rss())
print(json.dumps(dict(inputs=n, sae=f"topk {{d_in}}->{{d_sae}} k={{k}} float32", region_ids_s=dt,
                      region_ids_cpu_s=dc, n_regions=int(ids.max()) + 1, input_mb=X.numel() * 4 / 2**20,
                      ids_mb=ids.numel() * 8 / 2**20, rss_before_mb=base / 2**20,
                      peak_rss_increase_mb=(peak[0] - base) / 2**20,
                      memory_method="current RSS sampled every 2 ms by a thread, peak minus RSS before")))
"""


def bench_region_ids_memory(n: int, d_in: int, d_sae: int, k: int) -> dict:
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    code = _MEM_CHILD.format(here=here, args=(n, d_in, d_sae, k))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    """All geometry benchmarks; quick uses small sizes (seconds)."""
    if quick:
        return {
            "cells_2d": bench_cells(64, 6, 128),
            "region_ids_vs_encode": bench_region_ids(10_000, 128, 512, 16, repeat=2),
            "region_ids_memory": bench_region_ids_memory(100_000, 64, 512, 8),
        }
    return {
        "cells_2d": bench_cells(256, 15, 512),
        "region_ids_vs_encode": bench_region_ids(100_000, 784, 4096, 32, repeat=2),
        "region_ids_memory": bench_region_ids_memory(1_000_000, 64, 512, 8),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes")
    res = run(quick=ap.parse_args().quick)
    print(json.dumps(res, indent=2))
