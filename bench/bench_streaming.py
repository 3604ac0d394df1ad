"""Streaming training from an activation cache four times larger than a memory allowance: peak RSS.

A synthetic cache (`write_cache`, float32) of 4x the data allowance is written to a temporary folder, then a
fresh child process trains a TopK SAE with PAM-SGD on it (one epoch: encoder steps, the exact decoder solve
from streamed statistics, and the per-epoch train metrics, i.e. three full passes over the cache) through
`CacheBatches(memory_limit_bytes=allowance)`.

Measured in the child: after a warm-up on one in-memory batch (imports, SAE, Adam state, solver buffers: what
does not grow with the data) its current RSS is the baseline and the kernel's peak-RSS mark (VmHWM) is reset
(`/proc/self/clear_refs`); the mark is then read after a bare reading pass over the stream and after training.
Figures: the data-attributable peak (peak - baseline) against the allowance (target <= 1), the whole
process's peak (VmHWM, torch included) against the cache size, and `CacheBatches.peak_bytes()` against
the measured peak. With `enforce=True` the child also caps its address space (RLIMIT_AS) at its size after
the warm-up plus `enforce_factor` x the allowance, so that going over fails hard (reported as a note).
The child runs with a fixed glibc mmap threshold (`MMAP_THRESHOLD`; `--glibc-default` to keep glibc's
adaptive one, under which freed buffers linger in the heap and RSS overstates the live data).

    python bench/bench_streaming.py            # 800 MB cache, 200 MB allowance
    python bench/bench_streaming.py --quick    # 80 MB cache, 20 MB allowance
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
MB = 2**20
FULL = dict(allowance_mb=200, d_model=1024, shard_tokens=2048, batch=4096, d_sae=256, k=32)
QUICK = dict(allowance_mb=20, d_model=256, shard_tokens=1024, batch=1024, d_sae=256, k=16)
MMAP_THRESHOLD = 1 << 19
"""glibc serves blocks of at least this size by mmap and returns them to the system on free. Without a fixed
value its threshold adapts up to 32 MB and freed shard and buffer blocks stay in the heap, so RSS measures
the allocator's high-water mark rather than live data."""


def _maxrss_mb() -> float:
    """Whole-process peak RSS since start (ru_maxrss; Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mb(key: str) -> float | None:
    """A field of /proc/self/status in MB (VmRSS: current RSS, VmHWM: peak RSS since the last reset, VmSize)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb(reset_ok: bool) -> float:
    return _status_mb("VmHWM") if reset_ok else _maxrss_mb()


def child(args: dict) -> dict:
    """Runs in the measured process: warm-up, reading pass, training; peak RSS after each."""
    import torch

    from splinterp import SAE, SAEConfig
    from splinterp.data.cache import ActivationCache
    from splinterp.distributed import CacheBatches
    from splinterp.train import PAMConfig, train_pam_sgd

    torch.manual_seed(args["seed"])
    allowance = int(args["allowance_mb"] * MB)
    cache = ActivationCache.open(args["cache"])
    stream = CacheBatches(
        cache, 0, args["batch"], seed=args["seed"], split=None, memory_limit_bytes=allowance, device=args["device"]
    )
    sae = SAE(
        SAEConfig(
            d_in=cache.d_model,
            d_sae=args["d_sae"],
            architecture="topk",
            k=args["k"],
            seed=args["seed"],
            device=args["device"],
        )
    )
    cfg = PAMConfig(
        epochs=1,
        batch_size=args["batch"],
        lr=1e-3,
        progress=False,
        seed=args["seed"],
        eval_batch_size=args["batch"],
        decoder_batch_size=args["batch"],
    )
    # warm-up on one in-memory batch: everything that does not scale with the data set, and one shuffled
    # batch through the reader (pages in the code of the kernels it uses: file-backed RSS, not data)
    warm = next(iter(stream.sequential(args["batch"])))
    train_pam_sgd(sae, warm, cfg)
    next(iter(CacheBatches(cache, 0, args["batch"], split=None, buffer_tokens=args["batch"])))
    del warm
    gc.collect()
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak into ru_maxrss across exec
    out = {
        "warmup_peak_mb": _status_mb("VmHWM") or _maxrss_mb(),
        "baseline_mb": _status_mb("VmRSS") or _maxrss_mb(),
        "buffer_tokens": stream.buffer_tokens,
        "estimate_mb": stream.peak_bytes() / MB,
        "enforced": False,
        "rss_file_start_mb": _status_mb("RssFile"),
        "rss_anon_start_mb": _status_mb("RssAnon"),
    }
    out["hwm_reset"] = _reset_peak()
    if args["enforce"]:
        vm = _status_mb("VmSize")
        if vm is not None:
            limit = int((vm + args["enforce_factor"] * args["allowance_mb"]) * MB)
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
            out.update(enforced=True, as_limit_mb=limit / MB, vm_after_warmup_mb=vm)
    t0 = time.perf_counter()
    rows = sum(x.shape[0] for x in stream)
    out.update(read_s=time.perf_counter() - t0, read_rows=rows, read_peak_mb=_peak_mb(out["hwm_reset"]))
    _reset_peak()
    t0 = time.perf_counter()
    hist = train_pam_sgd(sae, stream, cfg)
    out.update(
        train_s=time.perf_counter() - t0,
        train_peak_mb=_peak_mb(out["hwm_reset"]),
        vm_end_mb=_status_mb("VmSize"),
        rss_file_end_mb=_status_mb("RssFile"),
        rss_anon_end_mb=_status_mb("RssAnon"),
        train_n_tokens=hist.last["train_n_tokens"],
        train_explained_variance=hist.last["train_explained_variance"],
    )
    return out


def make_cache(folder: str, n_tokens: int, d_model: int, shard_tokens: int, seed: int) -> dict:
    """A synthetic float32 cache: low-rank signal plus noise, written with `write_cache` (run in a child, so the
    bench process never holds the data)."""
    import torch

    from splinterp.data import write_cache

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    rank = min(64, d_model)
    basis = torch.randn(rank, d_model, generator=g) / rank**0.5
    X = torch.randn(n_tokens, rank, generator=g) @ basis
    X += 0.1 * torch.randn(n_tokens, d_model, generator=g)
    cache = write_cache(folder, X, shard_tokens=shard_tokens, model_name="synthetic", overwrite=True)
    return {
        "mb": sum((cache.folder / s["file"]).stat().st_size for s in cache.shards) / MB,
        "n_shards": len(cache.shards),
        "seconds": time.perf_counter() - t0,
    }


def _child_run(mode: str, args: dict, env: dict) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "bench.bench_streaming", mode, json.dumps(args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise RuntimeError(f"bench_streaming {mode} child failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(
    quick: bool = False,
    seed: int = 0,
    device: str = "cpu",
    enforce: bool = True,
    enforce_factor: float = 1.0,
    mmap_threshold: int | None = MMAP_THRESHOLD,
    workdir: str | None = None,
) -> dict:
    """Write the cache, train from it in a child process, report peak RSS against the allowance."""
    from bench.common import row

    size = QUICK if quick else FULL
    allowance_mb = size["allowance_mb"]
    n_tokens = int(4 * allowance_mb * MB // (size["d_model"] * 4))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="splinterp-stream-", dir=workdir) as tmp:
        folder = str(Path(tmp) / "cache")
        made = _child_run(
            "--make-cache",
            {
                "folder": folder,
                "n_tokens": n_tokens,
                "d_model": size["d_model"],
                "shard_tokens": size["shard_tokens"],
                "seed": seed,
            },
            env,
        )
        cache_mb = made["mb"]
        args = {
            **size,
            "cache": folder,
            "seed": seed,
            "device": device,
            "enforce": enforce,
            "enforce_factor": enforce_factor,
        }
        if mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
        res = _child_run("--child", args, env)
    peak_mb = max(res["warmup_peak_mb"], res["read_peak_mb"], res["train_peak_mb"])
    data_mb = res["train_peak_mb"] - res["baseline_mb"]
    read_mb = res["read_peak_mb"] - res["baseline_mb"]
    rows = [
        row(
            "data-attributable peak RSS while training (peak - RSS after warm-up)",
            data_mb / allowance_mb,
            "memory allowance",
            value=data_mb,
            baseline_value=float(allowance_mb),
            unit="MB",
            target="<= 1",
            ok=data_mb <= allowance_mb,
        ),
        row(
            "reading pass alone: data-attributable peak RSS",
            read_mb / allowance_mb,
            "memory allowance",
            value=read_mb,
            baseline_value=float(allowance_mb),
            unit="MB",
        ),
        row(
            "whole-process peak RSS (torch, model and data)",
            peak_mb / cache_mb,
            "cache size on disk",
            value=peak_mb,
            baseline_value=cache_mb,
            unit="MB",
        ),
        row(
            "CacheBatches.peak_bytes() estimate",
            res["estimate_mb"] / max(data_mb, 1e-9),
            "measured data-attributable peak",
            value=res["estimate_mb"],
            baseline_value=data_mb,
            unit="MB",
        ),
    ]
    how = (
        "kernel peak-RSS mark VmHWM, reset after the warm-up"
        if res["hwm_reset"]
        else "ru_maxrss: the warm-up peak may hide the data's"
    )
    glibc = (
        f"child run with MALLOC_MMAP_THRESHOLD_={mmap_threshold} (freed blocks >= {mmap_threshold >> 10} kB "
        "go back to the system)"
        if mmap_threshold is not None
        else "glibc's default adaptive mmap threshold (freed blocks up to 32 MB may stay in the heap)"
    )
    notes = [
        glibc,
        f"cache: {n_tokens} tokens x d_model {size['d_model']} float32 = {cache_mb:.0f} MB in "
        f"{made['n_shards']} shards of {size['shard_tokens']} tokens (written in {made['seconds']:.1f} s); "
        f"allowance {allowance_mb} MB -> shuffle buffer {res['buffer_tokens']} tokens",
        f"PAM-SGD, 1 epoch, TopK d_sae {size['d_sae']} k {size['k']}, batch {size['batch']}: three streamed "
        f"passes (encoder steps, decoder statistics, train metrics) in {res['train_s']:.1f} s; one bare reading "
        f"pass {res['read_s']:.1f} s ({res['read_rows'] / res['read_s'] / 1e3:.0f}k rows/s)",
        f"RSS after the warm-up {res['baseline_mb']:.0f} MB (process peak so far {res['warmup_peak_mb']:.0f} MB, "
        f"mostly torch itself); peak during the reading pass {res['read_peak_mb']:.0f} MB, during training "
        f"{res['train_peak_mb']:.0f} MB ({how}); current RSS anonymous {res['rss_anon_start_mb']:.0f} -> "
        f"{res['rss_anon_end_mb']:.0f} MB, file-backed (code, mapped shards) {res['rss_file_start_mb']:.0f} -> "
        f"{res['rss_file_end_mb']:.0f} MB from the warm-up to the end",
        (
            f"address space capped (RLIMIT_AS) at size after warm-up {res['vm_after_warmup_mb']:.0f} MB + "
            f"{enforce_factor:g} x allowance = {res['as_limit_mb']:.0f} MB: training completed under the cap "
            f"(virtual size at the end {res['vm_end_mb']:.0f} MB)"
        )
        if res["enforced"]
        else "address space not capped",
        f"train explained variance after 1 epoch: {res['train_explained_variance']:.3f} over "
        f"{res['train_n_tokens']} tokens",
    ]
    return {"name": "streaming", "rows": rows, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-enforce", action="store_true", help="do not cap the child's address space (RLIMIT_AS)")
    ap.add_argument(
        "--enforce-factor",
        type=float,
        default=1.0,
        help="address-space cap = size after warm-up + this x the allowance",
    )
    ap.add_argument("--glibc-default", action="store_true", help="keep glibc's adaptive mmap threshold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None, help="where to write the temporary cache (default: system temp)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make-cache", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if str(ROOT) not in sys.path:  # run as a script: make `bench` importable
        sys.path.insert(0, str(ROOT))
    logging.basicConfig(level=logging.WARNING)
    if a.child is not None:
        print(json.dumps(child(json.loads(a.child))), flush=True)
        return 0
    if a.make_cache is not None:
        print(json.dumps(make_cache(**json.loads(a.make_cache))), flush=True)
        return 0
    res = run(
        quick=a.quick,
        seed=a.seed,
        device=a.device,
        enforce=not a.no_enforce,
        enforce_factor=a.enforce_factor,
        mmap_threshold=None if a.glibc_default else MMAP_THRESHOLD,
        workdir=a.workdir,
    )
    logging.getLogger().setLevel(logging.INFO)
    for r in res["rows"]:
        log.info(
            "%s: %.2fx %s (%.1f vs %.1f %s)",
            r["figure"],
            r["ratio"],
            r["baseline"],
            r["value"],
            r["baseline_value"],
            r["unit"],
        )
    for n in res["notes"]:
        log.info("note: %s", n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
