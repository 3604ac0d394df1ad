"""The figure/experiment registry behind `splinterp reproduce`, `splinterp figure` and `splinterp list`.

Contract for a job (read this before adding one)
------------------------------------------------
A job is a function in a module ``splinterp/experiments/<name>.py``, registered with the decorator::

    from splinterp.experiments.registry import RunSettings, register

    @register("e1_toy", "E1: k-means | TopK SAE | local PCA on the three-cluster toy",
              outputs=["e1_toy.png"], quick_seconds=20)
    def e1_toy(out_dir: Path, run: RunSettings) -> dict:
        ...
        save_png(fig, out_dir / "e1_toy.png")
        return {"kmeans_mse": 0.12, "sae_mse": 0.05}

- **Signature**: ``fn(out_dir: Path, run: RunSettings) -> dict``. ``out_dir`` exists and is shared by every
  job of the run (files are flat in it), so output names must be unique across jobs: prefix them with the
  job name. ``run`` carries the command's settings: ``quick``, ``seeds`` (``run.seed`` is the first),
  ``device`` (a valid torch device string), ``progress`` and the LLM overrides (``model``, ``layer``,
  ``n_texts``). Pass the seed on to everything that takes one (generators, model configs): library code
  never reads global random state, and the runner restores it after every job anyway.
- **Outputs**: ``outputs`` lists every file (relative to ``out_dir``) the job writes, in quick and in
  full mode alike. The runner checks they exist afterwards and fails the job if one is missing. Write
  each file through ``splinterp.atomic`` (``write_with``, ``write_json``, ``write_text``) or
  ``splinterp.viz.output`` (``save_png``, ``write_html``) so that an interrupted run never leaves a
  half-written file.
- **Skipping**: a job that cannot run here (an optional dataset is missing) raises ``JobSkipped`` with the
  reason, before writing anything; the runner records it as ``skipped`` with that reason.
- **Return value**: a dict of results that ``to_jsonable`` can write (numpy/torch scalars and arrays become
  numbers/lists). Keep it small: final metrics, not per-step logs (write those to a file of your own and
  list it in ``outputs``). The runner stores it in ``results.json`` under the job's name.
- **Time budget**: ``quick=True`` must be small settings: **all jobs together must finish in a few minutes
  on 2 CPU cores**, so aim for ``quick_seconds`` (declared, default 20 s) and never more than ~40 s. The
  full run (``quick=False``) of all jobs together must stay under 30 minutes on 2 cores. The runner
  records each job's wall time and the summary flags jobs that ran over their declared budget.
- **Tables**: ``tables=fn`` with ``fn(folder) -> {name: markdown}`` renders the job's tables from its result
  files in ``folder`` (a pure function of those files). The README shows them inside
  ``<!-- results JOB/NAME -->`` blocks that ``splinterp readme`` fills, and a test checks the README
  against the committed results, so no number there is ever copied by hand.
- **Threads**: ``quick_threads`` (default None = torch's default) is the intra-op thread count of the job
  in quick mode (tiny SAEs gain nothing from threads and lose a lot on a busy machine); the command's
  ``--threads`` overrides it for every job. The runner sets it around the job and restores it after.
- **No side effects at import**: modules in ``splinterp/experiments/`` are imported by ``load_all``
  every time the CLI lists or runs jobs; do heavy imports (transformers, ...) inside the job function.
- **Leaves**: an experiment module imports the library, never another experiment module.
- **Logging, not print**; progress with ``tqdm.auto``; no ``plt.show()``.

``load_all()`` imports every module of the ``splinterp.experiments`` package (except this one), so a new
module's jobs appear without any other registration. A module that fails to import does not hide the
others: its error is kept in ``load_errors()`` and reported by the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import pkgutil
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splinterp.errors import ConfigError, SplinterpError
from splinterp.jsonable import to_jsonable

log = logging.getLogger(__name__)

__all__ = ["Job", "JobSkipped", "RunSettings", "get", "jobs", "llm_config", "load_all", "load_errors", "register",
           "run_job", "to_jsonable", "torch_threads"]


class JobSkipped(SplinterpError):
    """Raised by a job that cannot run on this machine (e.g. an optional dataset is not installed); the
    message is the reason shown in results.json and summary.md."""


class RepeatedOverSeeds:
    """Mixin of the experiment configs with a `seed` and an optional `seeds` field: the seeds the trainings are
    repeated over (`seeds`, distinct, or just `seed`), checked in one place."""

    def check_seeds(self) -> None:
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"seeds must be None or distinct seeds, got {self.seeds!r}")

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds the trainings are repeated over."""
        return tuple(self.seeds) if self.seeds is not None else (self.seed,)


@dataclass(frozen=True)
class RunSettings:
    """The settings every job of one run shares (the options of `splinterp reproduce`)."""

    quick: bool = True
    """Small settings (all jobs in a few minutes on 2 cores) instead of the full-size run."""
    seeds: tuple[int, ...] = (0,)
    """Random seeds; jobs that report a mean and confidence interval repeat their runs over these."""
    device: str = "cpu"
    """Torch device every job computes on."""
    progress: bool = False
    """Progress bars inside jobs (the runner has its own)."""
    model: str | None = None
    """LLM jobs: Hugging Face model id or folder (None: the offline all-MiniLM-L6-v2)."""
    layer: int | None = None
    """LLM single-layer jobs: the block whose resid_post they use (None: the middle block)."""
    n_texts: int | None = None
    """LLM jobs: how many text passages to harvest (None: the preset's)."""

    def __post_init__(self) -> None:
        seeds = tuple(self.seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
            raise ConfigError(f"seeds must be a non-empty list of non-negative integers, got {self.seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"seeds must be distinct, got {seeds}")
        object.__setattr__(self, "seeds", seeds)
        for name in ("layer", "n_texts"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "layer" else 1)):
                raise ConfigError(f"{name} must be {'>= 0' if name == 'layer' else '>= 1'}, got {v!r}")

    @property
    def seed(self) -> int:
        """The first seed: what single-seed jobs use."""
        return self.seeds[0]

    def llm_data_changes(self) -> dict[str, Any]:
        """The overrides of an `LLMDataConfig` this run asks for (model, n_texts)."""
        return {k: v for k, v in (("model", self.model), ("n_texts", self.n_texts)) if v is not None}


JobFn = Callable[[Path, RunSettings], dict]


@dataclass(frozen=True)
class Job:
    """One registered job: a named function that writes `outputs` into a folder and returns results."""

    name: str
    description: str
    outputs: tuple[str, ...]
    fn: JobFn
    module: str
    quick_seconds: float = 20.0
    """Declared budget in quick mode (seconds on 2 CPU cores); the summary flags jobs that exceed it."""
    quick_threads: int | None = None
    """Intra-op threads in quick mode (None: torch's default)."""
    tags: tuple[str, ...] = field(default=())
    """Free labels, e.g. "llm" for jobs that read LLM activations (they take the model / layer overrides)."""
    tables: Callable[[Path], dict[str, str]] | None = None
    """Markdown tables rendered from the job's result files in a folder ({table name: markdown}); what
    `splinterp readme` copies into the README, so a number there always comes from a results file."""

    def __call__(self, out_dir: Path, run: RunSettings) -> dict:
        return self.fn(out_dir, run)


_JOBS: dict[str, Job] = {}
_LOAD_ERRORS: dict[str, str] = {}
_NOT_JOB_MODULES = {"registry"}


def _check_output_name(job: str, out: str) -> str:
    if not isinstance(out, str) or not out:
        raise ConfigError(f"job {job!r}: outputs must be non-empty relative paths, got {out!r}")
    p = Path(out)
    if p.is_absolute() or ".." in p.parts:
        raise ConfigError(f"job {job!r}: output {out!r} must be a path inside the output folder")
    return p.as_posix()


def register(name: str, description: str, outputs: Iterable[str] = (), quick_seconds: float = 20.0,
             quick_threads: int | None = None, tags: Iterable[str] = (),
             tables: Callable[[Path], dict[str, str]] | None = None) -> Callable[[JobFn], JobFn]:
    """Decorator: register `fn(out_dir, run) -> dict` as job `name`.

    Names are unique; an output file may belong to one job only. Re-registering the same function (a
    module re-import) replaces the old entry.
    """
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ConfigError(f"job name must be a non-empty string of letters, digits, '_' or '-', got {name!r}")
    outs = tuple(_check_output_name(name, o) for o in outputs)
    if len(set(outs)) != len(outs):
        raise ConfigError(f"job {name!r} lists an output twice: {outs}")
    if "results.json" in outs or "summary.md" in outs:
        raise ConfigError(f"job {name!r}: results.json and summary.md are written by the runner")
    if quick_threads is not None and (isinstance(quick_threads, bool) or not isinstance(quick_threads, int)
                                      or quick_threads < 1):
        raise ConfigError(f"job {name!r}: quick_threads must be a positive integer or None, got {quick_threads!r}")

    def deco(fn: JobFn) -> JobFn:
        qual = f"{fn.__module__}.{fn.__qualname__}"
        old = _JOBS.get(name)
        if old is not None and f"{old.module}.{old.fn.__qualname__}" != qual:
            raise ConfigError(f"job name {name!r} is already registered by {old.module}.{old.fn.__qualname__}")
        for other in _JOBS.values():
            if other.name != name:
                clash = set(other.outputs) & set(outs)
                if clash:
                    raise ConfigError(f"job {name!r}: outputs {sorted(clash)} already belong to job {other.name!r}")
        _JOBS[name] = Job(name, description, outs, fn, fn.__module__, float(quick_seconds), quick_threads,
                          tuple(tags), tables)
        return fn

    return deco


def load_all() -> dict[str, Job]:
    """Import every module of `splinterp.experiments` so that their jobs register; return all jobs.

    Import failures are logged and kept in `load_errors()` (module name -> message); the other modules
    still load.
    """
    import splinterp.experiments as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.name in _NOT_JOB_MODULES or info.name.startswith("_"):
            continue
        modname = f"{pkg.__name__}.{info.name}"
        try:
            importlib.import_module(modname)
            _LOAD_ERRORS.pop(modname, None)
        except Exception as e:  # noqa: BLE001 - a colleague's broken module must not hide the others
            _LOAD_ERRORS[modname] = f"{type(e).__name__}: {e}"
            log.warning("could not import %s (%s: %s); its jobs are not available", modname, type(e).__name__, e)
    return dict(_JOBS)


def load_errors() -> dict[str, str]:
    """Modules that failed to import in the last `load_all`, with the error message."""
    return dict(_LOAD_ERRORS)


def jobs() -> dict[str, Job]:
    """Registered jobs by name, in registration order (call `load_all` first to see every module's)."""
    return dict(_JOBS)


def get(name: str) -> Job:
    """The job called `name`; a ConfigError listing the known names otherwise."""
    if not _JOBS:
        load_all()
    try:
        return _JOBS[name]
    except KeyError:
        known = ", ".join(sorted(_JOBS)) or "(none registered)"
        raise ConfigError(f"unknown job {name!r}; known jobs: {known}") from None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with `torch.set_num_threads(n)` (None: unchanged), then restore the previous count.

    Why: the quick presets train tiny SAEs whose matrix products are too small to gain from intra-op
    threads; on a busy machine those threads cost far more than they save (measured here: 10x slower with 2
    threads than with 1 on 2 loaded cores).
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"threads must be a positive integer, got {n!r}")
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch's global generators for the body (third-party code a job calls may
    read them), then restore their previous states: the caller's random streams are left untouched."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(th)


def run_job(name: str, out_dir: str | Path, run: RunSettings | None = None, *, threads: int | None = None,
            **settings) -> dict:
    """Run one job the way `splinterp reproduce` does (threads and seed set for the job and restored after,
    declared outputs checked, result made JSON-able) and return its results; raises whatever the job raises
    (`JobSkipped` included). For notebooks and scripts: the CLI adds the output-folder rules, results.json
    and the summary on top.

    `run` or keyword settings (`quick=True, seeds=(0,), device="cpu"`, ...; `seed=s` means `seeds=(s,)`).
    `threads`: intra-op threads (None: the job's `quick_threads` in quick mode, else torch's default).
    """
    if run is None:
        if "seed" in settings:
            settings["seeds"] = (settings.pop("seed"),)
        run = RunSettings(**settings)
    elif settings:
        raise ConfigError(f"give run= or keyword settings, not both (got {sorted(settings)})")
    job = get(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_threads = threads if threads is not None else (job.quick_threads if run.quick else None)
    with torch_threads(n_threads), _seeded_global_rng(run.seed):
        res = job(out_dir, run)
    if res is None:
        res = {}
    if not isinstance(res, dict):
        raise ConfigError(f"job {name} returned {type(res).__name__}, not a dict")
    res = to_jsonable(res, f"{name} result")
    missing = [o for o in job.outputs if not (out_dir / o).is_file()]
    if missing:
        raise ConfigError(f"job {name} did not write its declared outputs {missing}")
    return res


def llm_config(preset: Callable[..., Any], run: RunSettings, layer_fields: tuple[str, ...] = ("layer", "arch_layer")):
    """`preset(quick, seed, device)` of an LLM job's config with the run's LLM overrides applied: `model` and
    `n_texts` on its `data` (an `LLMDataConfig`), `layer` on whichever of `layer_fields` the config has."""
    cfg = preset(run.quick, run.seed, run.device)
    data_changes = run.llm_data_changes()
    changes: dict[str, Any] = {"progress": run.progress} if any(f.name == "progress" for f in
                                                                 dataclasses.fields(cfg)) else {}
    if data_changes:
        changes["data"] = dataclasses.replace(cfg.data, **data_changes)
    if run.layer is not None:
        for f in layer_fields:
            if any(x.name == f for x in dataclasses.fields(cfg)):
                changes[f] = run.layer
    return dataclasses.replace(cfg, **changes) if changes else cfg
