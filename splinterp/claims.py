"""Per-seed results -> mean ± 95% CI cells, and a claim's verdict from a confidence interval.

Why one place: every experiment (MNIST and LLM alike) reports its tables the same way ("mean ± half-width
(n seeds)") and judges a paper's claim by one stated rule, so that a reader can compare rows across experiments.

Verdict rule (`verdict`): given per-seed values of a difference whose sign the claim predicts,
"holds" when the Student-t 95% CI of its mean excludes 0 on the claimed side, "does not hold" when it excludes
0 on the other side, "inconclusive" otherwise (and always with a single seed: no spread to judge).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from splinterp.errors import ConfigError
from splinterp.stats import mean_ci

__all__ = ["DIFF_RULE", "RULE", "aggregate_runs", "between_claims_table", "cell", "claims_markdown",
           "combine_verdicts", "diff_verdict", "finite_or_none", "format_cell", "interval_verdict", "markdown_table",
           "paired_differences", "seeds_phrase", "tables_markdown", "verdict", "yerr"]

RULE = ("holds: the 95% CI (Student-t over seeds) of the difference excludes 0 in the claimed direction; "
        "does not hold: it excludes 0 the other way; inconclusive: otherwise (always with 1 seed)")


def cell(values: Iterable[float]) -> dict[str, Any]:
    """{"mean", "low", "high", "half_width", "n", "values"} of per-seed values (CI fields None for 1 seed)."""
    vals = [float(v) for v in values]
    ci = mean_ci(vals)

    def num(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {"mean": ci.mean, "low": num(ci.low), "high": num(ci.high), "half_width": num(ci.half_width),
            "n": ci.n, "values": vals}


def seeds_phrase(n: int) -> str:
    """"1 seed" / "5 seeds"."""
    return f"{n} seed" if n == 1 else f"{n} seeds"


def format_cell(c: dict[str, Any] | None, fmt: str | int = 3, unit: str = "") -> str:
    """"mean ± half-width (n seeds)", or "mean (1 seed)"; "–" for a missing cell. `fmt`: a number of
    significant digits of the mean (the half-width gets 2), or a format spec for both numbers (".4f")."""
    if not c:
        return "–"
    spec, hw_spec = (f".{fmt}g", ".2g") if isinstance(fmt, int) else (fmt, fmt)
    mean = f"{c['mean']:{spec}}{unit}"
    if c.get("half_width") is None:
        return f"{mean} ({seeds_phrase(c['n'])})"
    return f"{mean} ± {c['half_width']:{hw_spec}}{unit} ({seeds_phrase(c['n'])})"


def yerr(cells: Sequence[dict[str, Any]]) -> list[float]:
    """Error-bar half-widths of cells for matplotlib (0 where there is one seed)."""
    return [0.0 if c.get("half_width") is None else float(c["half_width"]) for c in cells]


def finite_or_none(x: float | None) -> float | None:
    """x if it is a finite number, else None (JSON has no inf/nan)."""
    return None if x is None or not math.isfinite(x) else float(x)


def verdict(c: dict[str, Any], direction: Literal["negative", "positive"], margin: float = 0.0) -> str:
    """The verdict of a claim that the mean of the per-seed values in `c` (a `cell`) is < margin ("negative") or
    > margin ("positive"), by the rule `RULE`."""
    if direction not in ("negative", "positive"):
        raise ConfigError(f"direction must be 'negative' or 'positive', got {direction!r}")
    if c.get("half_width") is None:
        return "inconclusive (1 seed)"
    lo, hi = c["low"] - margin, c["high"] - margin
    claimed, other = (hi < 0, lo > 0) if direction == "negative" else (lo > 0, hi < 0)
    return "holds" if claimed else "does not hold" if other else "inconclusive"


DIFF_RULE = ("paired per-seed difference d in the claimed direction: holds if the whole 95% CI of the mean of d "
             "is > 0, does not hold if it is < 0, inconclusive if it contains 0 (or with 1 seed: no CI)")


def diff_verdict(d: Iterable[float], margin: float = 0.0) -> tuple[dict[str, Any], str]:
    """(cell of d, verdict) for per-seed differences d oriented so that d > margin means the claim holds."""
    c = cell(d)
    return c, verdict(c, "positive", margin)


def interval_verdict(c: dict[str, Any], lo: float, hi: float) -> str:
    """Whether a quantity is "near" a value: "holds" if the whole 95% CI of the mean lies in [lo, hi], "does not
    hold" if it lies wholly outside, else "inconclusive" (and "inconclusive (1 seed)" without a CI)."""
    if c["half_width"] is None:
        return "inconclusive (1 seed)"
    if lo <= c["low"] and c["high"] <= hi:
        return "holds"
    if c["high"] < lo or c["low"] > hi:
        return "does not hold"
    return "inconclusive"


def claims_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The claims table: one row per claim with "claim", "measurement", "value" (a cell), "rule", "verdict"."""
    for r in rows:
        missing = {"claim", "measurement", "value", "rule", "verdict"} - set(r)
        if missing:
            raise ConfigError(f"claim row {r.get('claim')!r} lacks {sorted(missing)}")
    lines = ["| claim | measurement | mean ± 95% CI | rule | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        v = r["value"]
        lo_hi = "" if v is None or v.get("low") is None else f" [{v['low']:.3g}, {v['high']:.3g}]"
        lines.append(f"| {r['claim']} | {r['measurement']} | {format_cell(v)}{lo_hi} | {r['rule']} | "
                     f"**{r['verdict']}** |")
    return "\n".join(lines) + "\n"


def combine_verdicts(by_setting: dict[str, str]) -> str:
    """One verdict of a claim tested under several settings: "holds" if it holds under all, "holds only with
    X" if under some, "does not hold" if it fails under all, "inconclusive" otherwise."""
    if not by_setting:
        raise ConfigError("combine_verdicts needs at least one setting")
    held = [s for s, v in by_setting.items() if v == "holds"]
    if len(held) == len(by_setting):
        return "holds"
    if held:
        return "holds only with " + " and ".join(held)
    if all(v == "does not hold" for v in by_setting.values()):
        return "does not hold"
    return "inconclusive"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells are str()-ed; '|' escaped)."""
    def esc(x: Any) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def aggregate_runs(runs: Sequence[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str],
                   curves: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Group per-seed records (dicts with a "seed") by the values of `keys` (absent keys are None) and give each
    group a cell: the group's key values, its "seeds", a `cell` per metric every record has, and for records
    with "curves" the per-epoch {"mean", "low", "high"} of each name in `curves` (same length in every seed)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    cells = []
    for key, recs in groups.items():
        c: dict[str, Any] = {k: v for k, v in zip(keys, key) if v is not None}
        c["seeds"] = [r["seed"] for r in recs]
        for m in metrics:
            if all(r.get(m) is not None for r in recs):
                c[m] = cell(r[m] for r in recs)
        if curves and all("curves" in r for r in recs):
            c["curves"] = {}
            for name in curves:
                series = [r["curves"].get(name) for r in recs]
                if all(series) and len({len(x) for x in series}) == 1:
                    per_epoch = [cell(v) for v in zip(*series)]
                    c["curves"][name] = {f: [e[f] for e in per_epoch] for f in ("mean", "low", "high")}
        cells.append(c)
    return cells


def paired_differences(runs: Sequence[dict[str, Any]], method: str, baseline: str, metric: str = "test_mse",
                       by: str = "method", **where: Any) -> dict[str, Any] | None:
    """`cell` of the per-seed differences metric(method) - metric(baseline), paired by seed (records whose
    `by` field is method resp. baseline and that match every `where` field); None when no seed has both."""
    def by_seed(m):
        return {r["seed"]: r[metric] for r in runs if r.get(by) == m and all(r.get(k) == v for k, v in where.items())}

    a, b = by_seed(method), by_seed(baseline)
    seeds = sorted(set(a) & set(b))
    return dict(cell(a[s] - b[s] for s in seeds), seeds=seeds) if seeds else None


def between_claims_table(claims: Sequence[dict[str, Any]], rule: str, metric: str) -> str:
    """The table of the claim "the SAE lies between the k-means AE and the local-PCA AE" (E1 at matched regions,
    capacity at matched parameters): per setting both paired differences of `metric`, each with its verdict."""
    return markdown_table(
        ["claim", "setting", f"k-means - SAE ({metric})", f"SAE - local PCA ({metric})", "verdict"],
        [[r["claim"], r["setting"], f"{format_cell(r['kmeans_minus_sae'], 2)}: {r['kmeans_minus_sae']['verdict']}",
          f"{format_cell(r['sae_minus_local_pca'], 2)}: {r['sae_minus_local_pca']['verdict']}", r["verdict"]]
         for r in claims]) + f"\nRule: each difference by: {rule}; the claim holds when both do.\n"


def tables_markdown(tables: dict[str, str]) -> str:
    """A job's rendered tables ({name: markdown}) as one markdown file, a heading per table."""
    return "\n".join(f"### {name}\n\n{md}" for name, md in tables.items())
