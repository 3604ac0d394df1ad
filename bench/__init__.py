"""splinterp benchmarks: every figure is a ratio against a baseline timed in the same process.

    python -m bench              # every bench/bench_*.py, writes bench/RESULTS.md
    python -m bench --quick      # small sizes, prints only
    python -m bench train_step   # the modules whose name contains "train_step", prints only

A benchmark module `bench/bench_<name>.py` exposes `run(quick: bool) -> dict`, returning
`{"name": ..., "rows": [bench.common.row(...), ...], "notes": [...]}` (see bench/common.py).
"""
