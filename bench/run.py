"""Run every `bench/bench_*.py` that exposes `run(quick)`, print each figure as a ratio, write RESULTS.md.

Why one runner: figures are only comparable as ratios against baselines timed in the same process, and
the file that reports them must say how and where they were measured (command, CPU, threads, torch,
load). A full run rewrites bench/RESULTS.md atomically; `--quick` or a name filter only prints, unless
`--out` names a file.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import logging
import math
import sys
import time
import traceback
from pathlib import Path

from bench.common import machine_info

log = logging.getLogger("bench")
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def discover(names: list[str] | None = None) -> list[str]:
    """Module names `bench.bench_*` in this folder (sorted), filtered by substrings when given."""
    mods = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if names:
        mods = [m for m in mods if any(n in m for n in names)]
    return [f"bench.{m}" for m in mods]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _ratio_of(key: str, value) -> tuple[float, str] | None:
    """(ratio, baseline text) when a flat key names a ratio: speedup_* (baseline / ours) or ratio_a_over_b."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if "speedup" in key:
        return float(value), "speedup: baseline time / ours (higher is better)"
    if key.startswith("ratio_"):
        _, _, over = key.partition("_over_")
        return float(value), over.replace("_", " ") if over else "see figure"
    return None


def _records(obj, label: str):
    """(label, flat dict of scalars) for a result that is not in the rows form: every nested dict and
    every dict in a list is one record."""
    scalars = {k: v for k, v in obj.items() if not isinstance(v, (dict, list))}
    if scalars:
        yield label, scalars
    for k, v in obj.items():
        if isinstance(v, dict):
            yield from _records(v, f"{label}/{k}" if label else k)
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                ident = ", ".join(f"{kk}={_fmt(vv)}" for kk, vv in x.items() if kk in ("data", "name", "k", "sae"))
                yield from _records(x, f"{label}/{k}[{ident or i}]" if label else f"{k}[{ident or i}]")
        elif isinstance(v, list):
            yield (label, {k: v})


def normalise(module: str, result) -> tuple[str, list[dict], list[str]]:
    """(benchmark name, rows, notes) from what a module's run() returned.

    The rows form ({"rows": [bench.common.row(...)]}) is taken as it is; any other dict is read
    generically: keys named speedup_* or ratio_*_over_* become ratio rows, every other scalar a note.
    """
    if not isinstance(result, dict):
        return module, [], [f"run() returned {type(result).__name__}, expected a dict"]
    name = str(result.get("name") or module.rsplit(".", 1)[-1].removeprefix("bench_"))
    notes = [str(n) for n in result.get("notes", []) or []]
    rows: list[dict] = []
    given = result.get("rows")
    if isinstance(given, list) and given and all(isinstance(r, dict) and "figure" in r and "ratio" in r for r in given):
        rows = [{"baseline": "", **r} for r in given]
        rest = {k: v for k, v in result.items() if k not in ("name", "notes", "rows")}
    else:
        rest = {k: v for k, v in result.items() if k not in ("name", "notes")}
    for label, rec in _records(rest, ""):
        plain = []
        for key, value in rec.items():
            ratio = _ratio_of(key, value)
            if ratio is not None:
                rows.append({"figure": f"{label}: {key}" if label else key, "ratio": ratio[0], "baseline": ratio[1]})
            else:
                plain.append(f"{key}={_fmt(value)}")
        if plain:
            notes.append(f"{label}: " + ", ".join(plain) if label else ", ".join(plain))
    return name, rows, notes


def _num(x, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return f"{x:.1f} {unit}".strip() if isinstance(x, float) else f"{x} {unit}".strip()


def _status(r: dict) -> str:
    ok = r.get("ok")
    target = r.get("target") or ""
    if ok is None:
        return target
    return f"{target} ({'met' if ok else 'MISSED'})".strip()


def format_line(bench: str, r: dict) -> str:
    unit = r.get("unit") or "ms"
    times = ""
    if r.get("value") is not None and r.get("baseline_value") is not None:
        times = f"  ({_num(r['value'], unit)} vs {_num(r['baseline_value'], unit)})"
    status = _status(r)
    return f"[{bench}] {r['figure']}: {r['ratio']:.2f}x {r['baseline']}{times}{'  target ' + status if status else ''}"


def render(sections: list[tuple[str, list[dict], list[str], float]], info: dict, command: str, quick: bool) -> str:
    """The Markdown of RESULTS.md."""
    lines = [
        "# splinterp benchmarks",
        "",
        f"Command: `{command}`{' (quick sizes)' if quick else ''}, run {_dt.datetime.now():%Y-%m-%d %H:%M}.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + ".",
        "",
        "Every figure is a ratio against a baseline timed in the same process, interleaved with it (the",
        "median over rounds of the per-round ratio): ratio = figure / baseline (time or memory), except",
        "rows named speedup_*, which are baseline time / ours (higher is better).",
        "",
        "| benchmark | figure | ratio | baseline | figure / baseline time | target |",
        "|---|---|---|---|---|---|",
    ]
    for bench, rows, _notes, _secs in sections:
        for r in rows:
            unit = r.get("unit") or "ms"
            times = ""
            if r.get("value") is not None and r.get("baseline_value") is not None:
                times = f"{_num(r['value'], unit)} / {_num(r['baseline_value'], unit)}"
            lines.append(f"| {bench} | {r['figure']} | {r['ratio']:.2f}x | {r['baseline']} | {times} | {_status(r)} |")
    lines.append("")
    for bench, _rows, notes, secs in sections:
        lines.append(f"## {bench} ({secs:.0f} s)")
        lines.append("")
        lines += [f"- {n}" for n in notes] or ["- (no notes)"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="only the bench_* modules whose name contains one of these")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run); prints only")
    ap.add_argument("--out", type=Path, default=None, help=f"write the Markdown here (full run: {RESULTS})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the figures, not the modules' chatter

    command = "python -m bench" + (" --quick" if args.quick else "") + "".join(f" {n}" for n in args.names)
    out = args.out if args.out is not None else (None if (args.quick or args.names) else RESULTS)
    info = machine_info()
    print(f"{command}\n" + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    sections = []
    failed = 0
    for module in discover(args.names):
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # a broken module must not hide the others' figures
            failed += 1
            sections.append((module, [], [f"FAILED to import: {type(e).__name__}: {e}"], 0.0))
            log.error("%s: import failed\n%s", module, traceback.format_exc())
            continue
        if not callable(getattr(mod, "run", None)):
            print(f"{module}: no run(quick), skipped", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            result = mod.run(quick=args.quick)
        except Exception as e:
            failed += 1
            sections.append((module, [], [f"FAILED: {type(e).__name__}: {e}"], time.perf_counter() - t0))
            log.error("%s: run failed\n%s", module, traceback.format_exc())
            continue
        name, rows, notes = normalise(module, result)
        sections.append((name, rows, notes, time.perf_counter() - t0))
        for r in rows:
            print(format_line(name, r), flush=True)
        for n in notes:
            print(f"[{name}] note: {n}", flush=True)

    info["load_average_after"] = machine_info().get("load_average", "")
    if out is not None:
        from splinterp.atomic import write_text

        write_text(out, render(sections, info, command, args.quick))
        print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
