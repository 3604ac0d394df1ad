"""PAM decoder solve: sparse sufficient statistics vs dense normal equations, in the same process.

Both paths solve the same exact problem (alpha = 1e-3 ridge, float64 statistics, the same Cholesky
solve of the (d_sae + 1) block system); they differ only in how G = Z^T Z, Z^T X and sum z are formed:
- sparse: scatter of the k x k outer products per row, Z^T X as a CSR product: O(N k^2 + N k d_in);
- dense:  Z held dense, G by BLAS matmul (Z^T Z) in row chunks: O(N d_sae^2 + N d_sae d_in).
Reported: wall times, the speed-up (total and statistics only) and the relative Frobenius difference
of the two solutions. Target at N 100k, d_sae 4096, k 32, d_in 784: >= 10x, same solution to 1e-4.

    python bench/bench_decoder.py            # full size
    python bench/bench_decoder.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from splinterp.train.decoder import DecoderAccumulator, SparseCodes

log = logging.getLogger(__name__)

FULL = dict(n=100_000, d_sae=4096, k=32, d_in=784)
QUICK = dict(n=20_000, d_sae=2048, k=32, d_in=256)


def _codes(n: int, d_sae: int, k: int, gen: torch.Generator, chunk: int = 8192) -> SparseCodes:
    """k distinct random latents per row with positive values (TopK-like codes)."""
    idx = torch.empty(n, k, dtype=torch.int64)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        idx[s : s + m] = torch.rand(m, d_sae, generator=gen).topk(k, dim=1).indices
    vals = torch.randn(n, k, generator=gen).abs() + 0.1
    return SparseCodes(vals, idx, d_sae)


_CPU: list[float] = []


def _timed(fn):
    """Wall seconds of fn(); the process CPU seconds are appended to _CPU (a shared machine inflates wall
    time unevenly: a 2-thread BLAS call competes for two cores' share, a serial scatter for one)."""
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    _CPU.append(time.process_time() - c)
    return out, time.perf_counter() - t


def run(quick: bool = False, seed: int = 0, device: str = "cpu", alpha: float = 1e-3, chunk: int = 8192) -> dict:
    """Time both decoder solves on one synthetic problem; returns the numbers as a dict."""
    size = QUICK if quick else FULL
    n, d_sae, k, d_in = size["n"], size["d_sae"], size["k"], size["d_in"]
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=gen).to(device)
    codes = _codes(n, d_sae, k, gen)
    codes = SparseCodes(codes.values.to(device), codes.indices.to(device), d_sae)

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    def stats(method, Z):
        acc = DecoderAccumulator(d_sae, d_in, device=device, method=method)
        for s in range(0, n, chunk):
            acc.update(Z[s : s + chunk], X[s : s + chunk], check=False)  # the arithmetic, not the scans
        acc.G  # noqa: B018  (assemble G inside the timed region for both paths)
        sync()
        return acc

    _CPU.clear()

    def solve(acc):
        out = acc.solve(alpha=alpha, out_dtype=torch.float64)
        sync()
        return out

    # sparse path
    acc, t_stats_s = _timed(lambda: stats("sparse", codes))
    (W_s, b_s), t_solve_s = _timed(lambda: solve(acc))
    # dense path: Z materialised (not timed), then Z^T Z by matmul
    Z = torch.zeros(n, d_sae, dtype=torch.float32, device=device)
    for s in range(0, n, chunk):
        Z[s : s + chunk] = codes[s : s + chunk].to_dense()
    acc, t_stats_d = _timed(lambda: stats("dense", Z))
    (W_d, b_d), t_solve_d = _timed(lambda: solve(acc))
    acc = Z = None  # free the dense codes and statistics before returning

    rel_W = float((W_s - W_d).norm() / W_d.norm())
    rel_b = float((b_s - b_d).norm() / b_d.norm())
    t_s, t_d = t_stats_s + t_solve_s, t_stats_d + t_solve_d
    cpu_s, cpu_d = _CPU[0] + _CPU[1], _CPU[2] + _CPU[3]
    return {
        **size,
        "alpha": alpha,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "sparse_stats_s": t_stats_s,
        "sparse_solve_s": t_solve_s,
        "sparse_total_s": t_s,
        "dense_stats_s": t_stats_d,
        "dense_solve_s": t_solve_d,
        "dense_total_s": t_d,
        "sparse_cpu_s": cpu_s,
        "dense_cpu_s": cpu_d,
        "speedup_total": t_d / t_s,
        "speedup_stats": t_stats_d / t_stats_s,
        "speedup_cpu": cpu_d / cpu_s,
        "speedup_cpu_stats": _CPU[2] / _CPU[0],
        "rel_diff_W": rel_W,
        "rel_diff_b": rel_b,
        "pass": t_d / t_s >= 10 and max(rel_W, rel_b) <= 1e-4,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print the result dict as JSON")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    r = run(quick=a.quick, seed=a.seed, device=a.device)
    if a.json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"PAM decoder solve, N={r['n']} d_sae={r['d_sae']} k={r['k']} d_in={r['d_in']} "
        f"({r['device']}, {r['threads']} threads, float64 statistics)"
    )
    print(
        f"  sparse: statistics {r['sparse_stats_s']:.2f} s + solve {r['sparse_solve_s']:.2f} s = "
        f"{r['sparse_total_s']:.2f} s"
    )
    print(
        f"  dense : statistics {r['dense_stats_s']:.2f} s + solve {r['dense_solve_s']:.2f} s = "
        f"{r['dense_total_s']:.2f} s"
    )
    print(
        f"  process CPU time: sparse {r['sparse_cpu_s']:.1f} s, dense {r['dense_cpu_s']:.1f} s "
        f"({r['speedup_cpu']:.1f}x; {r['speedup_cpu_stats']:.1f}x on the statistics)"
    )
    print(
        f"  speed-up {r['speedup_total']:.1f}x end to end ({r['speedup_stats']:.1f}x on the statistics); "
        f"relative difference W {r['rel_diff_W']:.1e}, b {r['rel_diff_b']:.1e}; "
        f"target >= 10x and <= 1e-4: {'PASS' if r['pass'] else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
