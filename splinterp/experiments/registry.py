"""The figure/experiment registry behind `splinterp reproduce`, `splinterp figure` and `splinterp list`.

Contract for a job (read this before adding one)
------------------------------------------------
A job is a function in a module ``splinterp/experiments/<name>.py``, registered with the decorator::

    from splinterp.experiments.registry import register

    @register("e1_toy", "E1: k-means | TopK SAE | local PCA on the three-cluster toy",
              outputs=["e1_toy.png"], quick_seconds=20)
    def e1_toy(out_dir: Path, quick: bool, seed: int, device: str) -> dict:
        ...
        write_with(out_dir / "e1_toy.png", lambda p: fig.savefig(p, format="png"))
        return {"kmeans_mse": 0.12, "sae_mse": 0.05}

- **Signature**: ``fn(out_dir: Path, quick: bool, seed: int, device: str) -> dict``. ``out_dir`` exists
  and is shared by every job of the run (files are flat in it), so output names must be unique across jobs:
  prefix them with the job name. The runner has already seeded python, numpy and torch with ``seed``;
  pass ``seed`` on to anything that takes one anyway (generators, model configs) so the job is
  reproducible on its own. ``device`` is a valid torch device string ("cpu", "cuda", "cuda:1").
- **Outputs**: ``outputs`` lists every file (relative to ``out_dir``) the job writes, in quick and in
  full mode alike. The runner checks they exist afterwards and fails the job if one is missing. Write
  each file through ``splinterp.atomic`` (``write_with``, ``write_json``, ``write_text``) so that an
  interrupted run never leaves a half-written file. Figures are PNG (``fig.savefig(p, format="png")``,
  then ``plt.close(fig)``) or plotly HTML through ``splinterp.viz.write_html``.
- **Return value**: a dict of results that ``json.dumps`` can write once numpy/torch scalars and arrays
  are turned into Python numbers/lists (``to_jsonable`` does that). Keep it small: final metrics, not
  per-step logs (write those to a file of your own and list it in ``outputs``). The runner stores it in
  ``results.json`` under the job's name.
- **Time budget**: ``quick=True`` must be small settings: **all jobs together must finish in about
  3 minutes on 2 CPU cores**, so aim for ``quick_seconds`` (declared, default 20 s) and never more than
  ~40 s. The full run (``quick=False``) of all jobs together must stay under 30 minutes on 2 cores.
  The runner records each job's wall time and the summary flags jobs that ran over their declared budget.
- **No side effects at import**: modules in ``splinterp/experiments/`` are imported by ``load_all``
  every time the CLI lists or runs jobs; do heavy imports (transformers, ...) inside the job function.
- **Logging, not print**; progress with ``tqdm.auto``; no ``plt.show()``.

``load_all()`` imports every module of the ``splinterp.experiments`` package (except this one), so a new
module's jobs appear without any other registration. A module that fails to import does not hide the
others: its error is kept in ``load_errors()`` and reported by the CLI.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import pkgutil
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splinterp.errors import ConfigError

log = logging.getLogger(__name__)

JobFn = Callable[[Path, bool, int, str], dict]


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

    def __call__(self, out_dir: Path, quick: bool, seed: int, device: str) -> dict:
        return self.fn(out_dir, quick, seed, device)


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


def register(name: str, description: str, outputs: Iterable[str] = (), quick_seconds: float = 20.0
             ) -> Callable[[JobFn], JobFn]:
    """Decorator: register `fn(out_dir, quick, seed, device) -> dict` as job `name`.

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
        _JOBS[name] = Job(name, description, outs, fn, fn.__module__, float(quick_seconds))
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
    try:
        return _JOBS[name]
    except KeyError:
        known = ", ".join(sorted(_JOBS)) or "(none registered)"
        raise ConfigError(f"unknown job {name!r}; known jobs: {known}") from None


def run_job(name: str, out_dir: str | Path, quick: bool = True, seed: int = 0, device: str = "cpu") -> dict:
    """Run one job the way `splinterp reproduce` does (seeded, declared outputs checked, result made JSON-able)
    and return its results; raises whatever the job raises. For notebooks and scripts: the CLI adds the
    output-folder rules, results.json and the summary on top."""
    job = get(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    res = job(out_dir, quick, seed, device)
    if res is None:
        res = {}
    if not isinstance(res, dict):
        raise ConfigError(f"job {name} returned {type(res).__name__}, not a dict")
    res = to_jsonable(res, f"{name} result")
    missing = [o for o in job.outputs if not (out_dir / o).is_file()]
    if missing:
        raise ConfigError(f"job {name} did not write its declared outputs {missing}")
    return res


def seed_everything(seed: int) -> None:
    """Seed python's random, numpy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_jsonable(obj: Any, where: str = "result") -> Any:
    """Turn a job's result into plain JSON types: numpy/torch scalars and arrays become numbers/lists,
    Paths strings, dataclasses dicts; non-finite floats become None. Anything else is a ConfigError."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return to_jsonable(float(obj), where)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist(), where)
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj), where)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool)):
                raise ConfigError(f"{where}: dict key {k!r} is not a JSON key (str/int/float/bool)")
            out[str(k)] = to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise ConfigError(f"{where}: {type(obj).__name__} cannot be written as JSON")
