"""Exact slices and cells, each against a baseline run in the same process.

(a) `slice_2d` of a ReLU SAE (784 -> 1024) and a TopK SAE (784 -> 1024, k 32) on a plane through three
    inputs, against the dense-raster picture of the same box: `geometry.region_ids` on a 512 x 512 grid of
    the plane's own 2-D score map (the cheapest raster there is: 2 inputs per pixel, not 784). Reported:
    regions per second of both, and how many regions the raster misses; for ReLU the exact count
    1 + L + I (lines crossing the box, crossings inside it) is computed by brute force and must equal the
    slice's. The box is chosen (bisection on the exact count) to hold about 28k ReLU regions, the size of
    the 784 -> 1024 slice in the issue that prompted this benchmark.
(b) `cells_2d` time against the number of cells produced, for power diagrams of 256 to 4096 sites at
    orders 5 to 15 (random sites in [-1, 1]^2): time per cell, as a ratio to the smallest case (1 = time
    follows the cells; the order and the number of sites do not add a factor).
(c) Peak memory of a 132k-region slice of a ReLU SAE 784 -> 4096 (float32), in a fresh subprocess: current
    RSS sampled every 2 ms by a thread, peak minus the RSS before the call, against 1.5 GB (the target);
    the boolean masks alone take regions x d_sae bytes.

    python -m bench slice             # full sizes (about 3 minutes on 2 cores)
    python -m bench --quick slice     # small sizes, seconds
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from bench.common import row


def _plane_sae(arch: str, d_in: int, d_sae: int, k: int | None, seed: int = 0):
    import splinterp as sp
    from splinterp.geometry import plane_through

    g = torch.Generator().manual_seed(seed)
    sae = sp.make_sae(d_in, d_sae, arch, k=k, seed=seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.5 * torch.randn(d_sae, generator=g))
    X = torch.randn(3, d_in, generator=g)
    return sae, plane_through(*X)


def _plane_map(sae, plane):
    W, b = sae.encoder_affine()
    W, b = W.detach().double(), b.detach().double()
    return torch.stack([plane.u @ W, plane.v @ W]).numpy(), (plane.origin @ W + b).numpy()


def exact_relu_count(W2: np.ndarray, b2: np.ndarray, bounds) -> int:
    """1 + L + I by plain float64 loops over the lines a x + b y + c = 0 (independent of `cells2d`)."""
    x0, x1, y0, y1 = bounds
    corners = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    a, b, c = W2[0], W2[1], b2
    vals = corners @ np.vstack([a, b]) + c
    cross = np.flatnonzero((vals.min(0) < 0) & (vals.max(0) > 0))
    inside = 0
    for ii, i in enumerate(cross):
        j = cross[ii + 1 :]
        det = a[i] * b[j] - b[i] * a[j]
        with np.errstate(divide="ignore", invalid="ignore"):
            px = (b[i] * c[j] - c[i] * b[j]) / det
            py = (c[i] * a[j] - a[i] * c[j]) / det
        inside += int(((px > x0) & (px < x1) & (py > y0) & (py < y1)).sum())
    return 1 + len(cross) + inside


def box_for(W2, b2, centre, target: int) -> tuple[float, float, float, float]:
    """A square box around `centre` whose ReLU arrangement has about `target` cells (bisection on 1 + L + I)."""
    from splinterp.geometry.cells2d import arrangement_cell_bound, crossing_lines

    def count(h):
        bd = (centre[0] - h, centre[0] + h, centre[1] - h, centre[1] + h)
        cr = crossing_lines(W2.T, b2, bd)
        return arrangement_cell_bound(W2.T[cr], b2[cr], bd)

    lo, hi = 1e-3, 1e3
    for _ in range(50):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    h = hi * 1.001  # the bisection ends where a crossing sits on the box's edge: step off that degenerate box
    return (centre[0] - h, centre[0] + h, centre[1] - h, centre[1] + h)


def _raster(sae, plane, bounds, grid: int):
    """Region ids on a grid of pixel centres, through the plane's 2-D score map (a 2-D SAE with the same rule)."""
    import splinterp as sp
    from splinterp.geometry import region_ids

    W2, b2 = _plane_map(sae, plane)
    flat = sp.make_sae(2, sae.cfg.d_sae, sae.cfg.architecture, k=sae.cfg.k, dtype="float64")
    with torch.no_grad():
        flat.W_enc.copy_(torch.from_numpy(W2))
        flat.b_enc.copy_(torch.from_numpy(b2))
    x0, x1, y0, y1 = bounds
    xs = x0 + (np.arange(grid) + 0.5) / grid * (x1 - x0)
    ys = y0 + (np.arange(grid) + 0.5) / grid * (y1 - y0)
    P = torch.from_numpy(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2))
    return region_ids(flat, P)


def bench_slice(arch: str, d_in: int, d_sae: int, k, target: int, grid: int) -> tuple[dict, dict]:
    from splinterp.geometry import slice_2d

    sae, plane = _plane_sae(arch, d_in, d_sae, k)
    relu, _ = _plane_sae("relu", d_in, d_sae, None)  # the box is sized on the ReLU SAE's lines
    W2, b2 = _plane_map(relu, plane)
    bounds = box_for(W2, b2, plane.coords.mean(0), target)
    t = time.perf_counter()
    sl = slice_2d(sae, plane.origin, plane.u, plane.v, bounds, max_cells=10 * target)
    t_slice = time.perf_counter() - t
    t = time.perf_counter()
    ids = _raster(sae, plane, bounds, grid)
    t_raster = time.perf_counter() - t
    found = int(ids.max()) + 1
    name = f"{arch} {d_in}->{d_sae}" + (f" k={k}" if k else "")
    info = {"sae": name, "regions": len(sl), "slice_s": t_slice, "regions_per_s": len(sl) / t_slice,
            "raster": f"{grid}x{grid}", "raster_s": t_raster, "raster_regions_found": found,
            "raster_regions_per_s": found / t_raster, "raster_missed": len(sl) - found,
            "area_error": sl.area_error()}
    if arch == "relu":
        info["exact_count_1_plus_L_plus_I"] = exact_relu_count(*_plane_map(sae, plane), sl.bounds)
    r = row(f"slice_2d {name}, {len(sl):,} regions: time", t_slice / t_raster,
            f"{grid}x{grid} raster (region_ids on the plane's 2-D map), which finds {found:,}",
            value=t_slice, baseline_value=t_raster, unit="s")
    return r, info


def bench_cells(cases) -> tuple[list[dict], list[str]]:
    from splinterp.geometry import PowerDiagram

    per_cell, rows, notes = [], [], []
    for m, k in cases:
        rng = np.random.default_rng(0)
        pd = PowerDiagram(rng.uniform(-1, 1, (m, 2)), rng.uniform(0, 0.05, m), order=k)
        t = time.process_time()
        cells = pd.cell_masks((-1.0, 1.0, -1.0, 1.0), max_cells=20_000_000)
        dt = time.process_time() - t
        per_cell.append(dt / len(cells.polygons))
        notes.append(f"cells_2d {m} sites, order {k}: {len(cells.polygons):,} cells in {dt:.2f} s CPU "
                     f"({1e6 * per_cell[-1]:.0f} us per cell)")
    for (m, k), pc in zip(cases[1:], per_cell[1:]):
        rows.append(row(f"cells_2d {m} sites, order {k}: CPU time per cell produced", pc / per_cell[0],
                        f"time per cell at {cases[0][0]} sites, order {cases[0][1]}", value=1e6 * pc,
                        baseline_value=1e6 * per_cell[0], unit="us"))
    return rows, notes


_MEM_CHILD = r"""
import json, os, sys, threading, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads(1)
from bench.bench_slice import _plane_sae, _plane_map, box_for
from splinterp.geometry import slice_2d
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
sae, plane = _plane_sae("relu", 784, {d_sae}, None)
W2, b2 = _plane_map(sae, plane)
bounds = box_for(W2, b2, plane.coords.mean(0), {target})
base = rss()
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
th = threading.Thread(target=sample, daemon=True)
th.start()
t = time.perf_counter()
sl = slice_2d(sae, plane.origin, plane.u, plane.v, bounds, max_cells=10 * {target})
dt = time.perf_counter() - t
done.set()
th.join()
peak[0] = max(peak[0], rss())
print(json.dumps(dict(regions=len(sl), d_sae={d_sae}, slice_s=dt, rss_before_mb=base / 2**20,
                      peak_increase_mb=(peak[0] - base) / 2**20, masks_mb=sl.masks.numel() / 2**20)))
"""


def bench_memory(d_sae: int, target: int) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _MEM_CHILD.format(root=root, d_sae=d_sae, target=target)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    rows, notes = [], [f"torch threads {torch.get_num_threads()}; slice and raster timed once each (seconds-long "
                       "runs), CPU-time per cell for cells_2d"]
    if quick:
        cases = [("relu", 64, 256, None, 3000, 256), ("topk", 64, 256, 8, 3000, 256)]
        cell_cases = [(128, 4), (256, 6)]
        mem = (512, 5000)
    else:
        cases = [("relu", 784, 1024, None, 28_000, 512), ("topk", 784, 1024, 32, 28_000, 512)]
        cell_cases = [(256, 15), (1024, 8), (4096, 5), (4096, 12)]
        mem = (4096, 132_000)
    for arch, d_in, d_sae, k, target, grid in cases:
        r, info = bench_slice(arch, d_in, d_sae, k, target, grid)
        rows.append(r)
        notes.append(", ".join(f"{key}={v:.4g}" if isinstance(v, float) else f"{key}={v}" for key, v in info.items()))
    cell_rows, cell_notes = bench_cells(cell_cases)
    rows += cell_rows
    notes += cell_notes
    m = bench_memory(*mem)
    rows.append(row(f"slice_2d relu 784->{m['d_sae']} float32, {m['regions']:,} regions: peak RSS increase",
                    m["peak_increase_mb"] / 1536.0, "1.5 GB (1536 MB)", value=m["peak_increase_mb"],
                    baseline_value=1536.0, unit="MB", target="<= 1", ok=m["peak_increase_mb"] <= 1536.0))
    notes.append(f"memory child: {m['regions']:,} regions in {m['slice_s']:.1f} s, masks alone {m['masks_mb']:.0f} MB, "
                 f"RSS before {m['rss_before_mb']:.0f} MB; current RSS sampled every 2 ms, peak minus RSS before")
    return {"name": "slice", "rows": rows, "notes": notes}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    print(json.dumps(run(quick=ap.parse_args().quick), indent=2, default=str))
