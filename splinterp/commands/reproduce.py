"""`splinterp reproduce`, `splinterp figure NAME` and `splinterp list`: run the registered figure and experiment
jobs (`splinterp.experiments.registry`) into one output folder.

The output folder (`--out`, default `out`) must be new, empty, or a folder a previous `splinterp reproduce`
wrote (it has our `results.json`): then the jobs' files are replaced and `results.json` / `summary.md` are
updated, other files stay. Any other non-empty folder is refused unless `--force`. Every job's outputs,
`results.json` (results, timings, settings per job) and `summary.md` are written atomically. The exit status
is 0 when every job succeeded or was skipped, 1 when one failed (the others still run), 2 for bad arguments.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from splinterp.commands import Command
from splinterp.errors import ConfigError, OverwriteError

log = logging.getLogger("splinterp.reproduce")

RESULTS = "results.json"
SUMMARY = "summary.md"
RESULTS_FORMAT = "splinterp.reproduce/1"


@dataclass
class RunOptions:
    """What `reproduce` and `figure` share."""

    out: str = "out"
    """Output folder: new, empty, or one a previous `splinterp reproduce` wrote (its jobs' files are replaced)."""
    quick: bool = False
    """Small settings: all jobs in about 70 s on a 2-core machine (the full-size run: about 16 minutes of CPU per
    seed)."""
    seed: int = 0
    """Random seed of every job (the first seed when --seeds is more than 1)."""
    seeds: int = 1
    """Number of seeds: jobs that report a mean and a 95% confidence interval repeat their runs with seeds
    seed, seed + 1, ..., seed + seeds - 1."""
    device: str = "cpu"
    """Torch device, e.g. cpu, cuda, cuda:1."""
    threads: int | None = None
    """Torch intra-op threads for every job (default: torch's default; 1 for the quick LLM jobs). On a busy
    machine 1 is often fastest."""
    force: bool = False
    """Write into a non-empty folder that `splinterp reproduce` did not make (other files are left alone)."""
    plotlyjs: Literal["directory", "inline", "cdn"] = "directory"
    """How HTML figures get plotly.js: one shared plotly.min.js next to them (offline), inline in every page
    (offline, larger), or from the CDN (small files, needs network to view)."""
    progress: bool = True
    """Show a progress bar over the jobs."""
    model: str | None = None
    """LLM jobs: a Hugging Face model id or folder (default: the offline all-MiniLM-L6-v2)."""
    layer: int | None = None
    """LLM single-layer jobs: the block whose resid_post they use (default: the middle block)."""
    n_texts: int | None = None
    """LLM jobs: how many text passages to harvest (default: the preset's)."""

    def __post_init__(self) -> None:
        from splinterp.validation import check_positive_int

        check_positive_int(self.seeds, "--seeds")
        for name in ("threads", "n_texts"):
            if getattr(self, name) is not None:
                check_positive_int(getattr(self, name), "--" + name.replace("_", "-"))
        if self.layer is not None and self.layer < 0:
            raise ConfigError(f"--layer must be >= 0, got {self.layer}")


@dataclass
class ReproduceOptions(RunOptions):
    only: list[str] = field(default_factory=list)
    """Run only these jobs (see `splinterp list`)."""
    skip: list[str] = field(default_factory=list)
    """Run every job but these."""


@dataclass
class FigureOptions(RunOptions):
    name: str = field(default="", metadata={"positional": True})
    """The job to run (see `splinterp list`)."""


@dataclass
class ListOptions:
    json: bool = False
    """Print JSON instead of text."""


# ---------------------------------------------------------------------------------------------- folder
def read_results(out: Path) -> dict | None:
    """The results.json a previous run wrote into `out`, or None when there is none of ours."""
    path = out / RESULTS
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and d.get("format") == RESULTS_FORMAT else None


def prepare_out(out: Path, force: bool) -> None:
    """Check the output folder rules (module doc) and create the folder."""
    from splinterp.atomic import LOCK_FILE

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if out.is_dir() and read_results(out) is None and any(p.name != LOCK_FILE for p in out.iterdir()) and not force:
        raise OverwriteError(f"--out {out} is not empty and was not written by `splinterp reproduce` "
                             f"(no {RESULTS} of ours); choose a new or empty folder, or pass --force to write into it")
    out.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------- summary
def _scalars(d: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    """Flatten the scalar leaves of a results dict (two levels deep) for the summary."""
    items: list[tuple[str, Any]] = []
    if isinstance(d, dict) and depth < 2:
        for k, v in d.items():
            items += _scalars(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}", depth + 1)
    elif isinstance(d, (int, float, str, bool)):
        items.append((prefix.rstrip("."), d))
    return items


def fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def summary_markdown(results: dict) -> str:
    meta = results.get("meta", {})
    lines = ["# splinterp reproduce: summary", "",
             f"Last run: {meta.get('finished', '?')}, splinterp {meta.get('splinterp_version', '?')}, "
             f"torch {meta.get('torch_version', '?')}, {meta.get('machine', '?')}.", "",
             "| job | status | mode | seed | seconds | CPU seconds | quick budget | outputs |",
             "|---|---|---|---|---|---|---|---|"]
    for name, j in results.get("jobs", {}).items():
        over = " (over budget)" if j.get("quick") and j.get("seconds", 0) > j.get("quick_seconds", 1e9) else ""
        outputs = ", ".join(j.get("outputs", [])) if j.get("status") == "ok" else "-"
        lines.append(f"| {name} | {j.get('status')} | {'quick' if j.get('quick') else 'full'} | {j.get('seed')} | "
                     f"{j.get('seconds', 0):.1f}{over} | {j.get('cpu_seconds', 0):.1f} | "
                     f"{j.get('quick_seconds', '')} | {outputs} |")
    for name, j in results.get("jobs", {}).items():
        lines += ["", f"## {name}", "", j.get("description", "")]
        if j.get("status") == "failed":
            lines += ["", f"**Failed:** `{j.get('error', '')}`"]
        elif j.get("status") == "skipped":
            lines += ["", f"**Skipped:** {j.get('reason', '')}"]
        sc = _scalars(j.get("results", {}))
        if sc:
            lines += [""] + [f"- `{k}`: {fmt(v)}" for k, v in sc[:40]]
            if len(sc) > 40:
                lines.append(f"- ... {len(sc) - 40} more in {RESULTS}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- runner
def run_jobs(names: Sequence[str], out: Path, settings, *, force: bool = False, plotlyjs: str = "directory",
             progress: bool = True, threads: int | None = None, label: str = "splinterp reproduce") -> dict:
    """Run the named registered jobs into `out` with `settings` (a `RunSettings`); write results.json (after
    every job: an interrupted run keeps what finished) and summary.md. Returns the results dict. The folder is
    locked for the run: a second `reproduce` into it is refused (FolderInUseError naming this process)."""
    from splinterp.atomic import hold_folder

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    with hold_folder(out, name="--out", purpose=label):  # one run per folder: a second one is refused
        prepare_out(out, force)
        return _run_locked(names, out, settings, plotlyjs=plotlyjs, progress=progress, threads=threads, label=label)


def _run_locked(names: Sequence[str], out: Path, settings, *, plotlyjs: str, progress: bool, threads: int | None,
                label: str) -> dict:
    import torch
    from tqdm.auto import tqdm

    import splinterp
    from splinterp.atomic import write_json, write_text
    from splinterp.experiments import registry
    from splinterp.experiments.registry import JobSkipped
    from splinterp.viz.output import plotlyjs_mode

    results = read_results(out) or {"format": RESULTS_FORMAT, "meta": {}, "jobs": {}}
    results.setdefault("jobs", {})
    t_all = time.perf_counter()
    bar = tqdm(names, desc=label, unit="job", disable=not progress)
    with plotlyjs_mode(plotlyjs):
        for name in bar:
            job = registry.get(name)
            bar.set_postfix_str(name)
            log.info("job %s: %s", name, job.description)
            entry: dict[str, Any] = {"description": job.description, "module": job.module, "quick": settings.quick,
                                     "seed": settings.seed, "seeds": list(settings.seeds), "device": settings.device,
                                     "threads": threads, "quick_seconds": job.quick_seconds,
                                     "outputs": list(job.outputs)}
            if "llm" in job.tags:
                entry["llm"] = {"model": settings.model, "layer": settings.layer, "n_texts": settings.n_texts}
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                entry["results"] = registry.run_job(name, out, settings, threads=threads)
                entry["status"] = "ok"
            except JobSkipped as e:
                entry.update(status="skipped", reason=str(e), results={})
                log.warning("job %s skipped: %s", name, e)
            except Exception as e:  # noqa: BLE001 - one failing job must not stop the others
                entry.update(status="failed", error=f"{type(e).__name__}: {e}", results={})
                log.error("job %s failed: %s\n%s", name, entry["error"], traceback.format_exc())
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            entry["cpu_seconds"] = round(time.process_time() - c0, 2)  # this process, all threads
            if settings.quick and entry["seconds"] > job.quick_seconds:
                log.warning("job %s took %.1f s in quick mode, over its declared %.0f s", name, entry["seconds"],
                            job.quick_seconds)
            results["jobs"][name] = entry
            results["meta"] = {
                "splinterp_version": splinterp.__version__, "torch_version": torch.__version__,
                "python": platform.python_version(), "machine": f"{platform.system()} {platform.machine()}",
                "finished": _dt.datetime.now().isoformat(timespec="seconds"),
                "last_command": {"jobs": list(names), "quick": settings.quick, "seeds": list(settings.seeds),
                                 "device": settings.device},
                "last_total_seconds": round(time.perf_counter() - t_all, 2),
            }
            write_json(out / RESULTS, results)
    write_text(out / SUMMARY, summary_markdown(results))
    return results


def _all_jobs() -> dict:
    from splinterp.experiments import registry

    jobs = registry.load_all()
    for mod, err in registry.load_errors().items():
        log.warning("module %s failed to import: %s", mod, err)
    return jobs


def select_jobs(jobs: dict, only: Sequence[str], skip: Sequence[str]) -> list[str]:
    known = ", ".join(jobs) or "(none)"
    for name in list(only) + list(skip):
        if name not in jobs:
            raise ConfigError(f"unknown job {name!r}; known jobs: {known} (see `splinterp list`)")
    names = list(dict.fromkeys(only)) if only else list(jobs)
    names = [n for n in names if n not in set(skip)]
    if not names:
        raise ConfigError("no job left to run")
    return names


def _report(results: dict, names: Sequence[str], out: Path) -> int:
    jobs = results["jobs"]
    total = sum(jobs[n]["seconds"] for n in names)
    print(f"splinterp: ran {len(names)} job(s) in {total:.1f} s into {out}/ ({RESULTS}, {SUMMARY})")
    for n in names:
        j = jobs[n]
        status = {"ok": "ok", "skipped": f"skipped ({j.get('reason')})"}.get(j["status"], f"FAILED ({j.get('error')})")
        print(f"  {n:<28} {j['seconds']:7.1f} s wall {j.get('cpu_seconds', 0):7.1f} s CPU  {status}")
    failed = [n for n in names if jobs[n]["status"] == "failed"]
    if failed:
        print(f"splinterp: {len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _settings(o: RunOptions):
    from splinterp.experiments.registry import RunSettings
    from splinterp.validation import check_device

    if o.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {o.seed}")
    seeds = tuple(range(o.seed, o.seed + o.seeds))
    return RunSettings(quick=o.quick, seeds=seeds, device=str(check_device(o.device, "--device")), progress=False,
                       model=o.model, layer=o.layer, n_texts=o.n_texts)


def _run(o: RunOptions, names: list[str], label: str) -> int:
    settings = _settings(o)
    out = Path(o.out)
    results = run_jobs(names, out, settings, force=o.force, plotlyjs=o.plotlyjs, progress=o.progress,
                       threads=o.threads, label=label)
    return _report(results, names, out)


def run_reproduce(o: ReproduceOptions) -> int:
    return _run(o, select_jobs(_all_jobs(), o.only, o.skip), "splinterp reproduce")


def run_figure(o: FigureOptions) -> int:
    return _run(o, select_jobs(_all_jobs(), [o.name], []), "splinterp figure")


def run_list(o: ListOptions) -> int:
    from splinterp.experiments import registry

    jobs = _all_jobs()
    if o.json:
        print(json.dumps({n: {"description": j.description, "outputs": list(j.outputs), "module": j.module,
                              "quick_seconds": j.quick_seconds, "tags": list(j.tags)} for n, j in jobs.items()},
                         indent=2))
        return 0
    if not jobs:
        print("no jobs registered")
    for n, j in jobs.items():
        print(f"{n}  (~{j.quick_seconds:.0f} s quick, {j.module})\n    {j.description}\n    -> {', '.join(j.outputs)}")
    for mod, err in registry.load_errors().items():
        print(f"(module {mod} failed to import: {err})")
    return 0


COMMANDS = (
    Command("reproduce", ReproduceOptions, run_reproduce, "run every registered figure/experiment job",
            f"Run the registered jobs (see `splinterp list`) and write their figures, {RESULTS} and {SUMMARY} into "
            "--out."),
    Command("figure", FigureOptions, run_figure, "run one job", "Run one registered job into --out."),
    Command("list", ListOptions, run_list, "list the registered jobs and their outputs",
            "List the registered jobs, their time budget in quick mode and their output files."),
)
