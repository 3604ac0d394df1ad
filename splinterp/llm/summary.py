"""Numbers over seeds for the LLM jobs' tables, figures and claims: per-seed values with their mean and Student-t
95% confidence interval (`splinterp.stats.mean_ci`), the "mean ± half-width (n seeds)" table cell, and the
verdict of a claim from a paired per-seed difference by one stated rule.

Why one place: five jobs report the same kind of cell and judge their claims by the same rule, so a reader
learns the format once and the rule cannot differ between tables.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from splinterp.errors import ConfigError
from splinterp.stats import mean_ci

__all__ = ["DIFF_RULE", "cell", "claims_markdown", "diff_verdict", "finite_or_none", "interval_verdict", "seeds_phrase",
           "summarize", "yerr"]


def seeds_phrase(n: int) -> str:
    """"1 seed" / "5 seeds"."""
    return f"{n} seed" if n == 1 else f"{n} seeds"


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """{"values", "mean", "low", "high", "half_width", "n"} of per-seed values (low/high/half_width are None
    for one value: no spread to estimate). Non-finite values are refused by `mean_ci`."""
    xs = [float(v) for v in values]
    s = mean_ci(xs)
    one = s.n == 1
    return {"values": xs, "mean": s.mean, "low": None if one else s.low, "high": None if one else s.high,
            "half_width": None if one else s.half_width, "n": s.n}


def cell(s: dict[str, Any], fmt: str = ".3g", unit: str = "") -> str:
    """A table cell "mean ± half-width (n seeds)", or "mean (1 seed)"."""
    if s is None:
        return "-"
    hw = s.get("half_width")
    m = f"{s['mean']:{fmt}}{unit}"
    if hw is None:
        return f"{m} ({seeds_phrase(s['n'])})"
    return f"{m} ± {hw:{fmt}}{unit} ({seeds_phrase(s['n'])})"


def yerr(summaries: Sequence[dict[str, Any]]) -> list[float]:
    """Error-bar half-widths of summaries for matplotlib (0 where there is one seed)."""
    return [0.0 if s.get("half_width") is None else float(s["half_width"]) for s in summaries]


DIFF_RULE = ("paired per-seed difference d in the claimed direction: holds if the whole 95% CI of the mean of d "
             "is > 0, does not hold if it is < 0, inconclusive if it contains 0 (or with 1 seed: no CI)")


def diff_verdict(d: Iterable[float], margin: float = 0.0) -> tuple[dict[str, Any], str]:
    """(summary of d, verdict) for per-seed differences d oriented so that d > margin means the claim holds:
    "holds" if the CI lies above `margin`, "does not hold" if below, else "inconclusive"."""
    s = summarize(d)
    if s["half_width"] is None:
        return s, "inconclusive (1 seed)"
    if s["low"] > margin:
        return s, "holds"
    if s["high"] < margin:
        return s, "does not hold"
    return s, "inconclusive"


def interval_verdict(s: dict[str, Any], lo: float, hi: float) -> str:
    """Whether a quantity is "near" a value: "holds" if the whole 95% CI of the mean lies in [lo, hi], "does not
    hold" if it lies wholly outside, else "inconclusive" (and "inconclusive (1 seed)" without a CI)."""
    if s["half_width"] is None:
        return "inconclusive (1 seed)"
    if lo <= s["low"] and s["high"] <= hi:
        return "holds"
    if s["high"] < lo or s["low"] > hi:
        return "does not hold"
    return "inconclusive"


def claims_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The claims table: one row per claim with "claim", "measurement", "value" (a summary), "rule", "verdict"."""
    for r in rows:
        missing = {"claim", "measurement", "value", "rule", "verdict"} - set(r)
        if missing:
            raise ConfigError(f"claim row {r.get('claim')!r} lacks {sorted(missing)}")
    lines = ["| claim | measurement | mean ± 95% CI | rule | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        v = r["value"]
        lo_hi = "" if v is None or v.get("low") is None else f" [{v['low']:.3g}, {v['high']:.3g}]"
        lines.append(f"| {r['claim']} | {r['measurement']} | {cell(v)}{lo_hi} | {r['rule']} | **{r['verdict']}** |")
    return "\n".join(lines) + "\n"


def finite_or_none(x: float | None) -> float | None:
    """x if it is a finite number, else None (JSON has no inf/nan)."""
    return None if x is None or not math.isfinite(x) else float(x)
