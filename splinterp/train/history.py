"""Per-epoch training record shared by every trainer, so SGD and PAM-SGD curves are comparable.

Each record is a flat dict. Keys written by the trainers:
- ``epoch`` (epochs completed), ``step`` (optimiser steps so far);
- ``train_loss``: mean over the epoch's mini-batches of the optimised loss, penalties included, measured
  while the parameters move; ``train_running_<part>`` the same for each loss part (mse, l1, prox, ...);
- ``train_<metric>``: `splinterp.metrics.evaluate` on the training data after the epoch (no penalties;
  identical definition for SGD and PAM-SGD); ``test_<metric>``: the same on eval_data;
- ``epoch_time`` (training, incl. the decoder solve), ``eval_time`` and ``wall_time`` (cumulative seconds).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splinterp.atomic import write_json
from splinterp.errors import CorruptFileError

TIME_KEYS = frozenset({"epoch_time", "eval_time", "wall_time"})


def _clean(v: Any) -> Any:
    """JSON-safe: non-finite floats become None (JSON has no NaN)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


@dataclass
class History:
    method: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append({k: _clean(v) for k, v in record.items()})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: str) -> list[Any]:
        """The column `key` over epochs (None where an epoch lacks it)."""
        if not any(key in r for r in self.records):
            raise KeyError(f"no history column {key!r}; have {self.keys()}")
        return [r.get(key) for r in self.records]

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.records:
            seen.update(dict.fromkeys(r))
        return list(seen)

    @property
    def last(self) -> dict[str, Any]:
        return self.records[-1] if self.records else {}

    def without_times(self) -> list[dict[str, Any]]:
        """Records with the timing columns removed (for comparing runs)."""
        return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in self.records]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.config, "records": [dict(r) for r in self.records]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        if not isinstance(d, dict) or not isinstance(d.get("records"), list):
            raise CorruptFileError("a History dict needs a 'records' list")
        return cls(method=str(d.get("method", "")), config=dict(d.get("config") or {}),
                   records=[dict(r) for r in d["records"]])

    def to_json(self, path: str | os.PathLike) -> Path:
        write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> History:
        try:
            d = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptFileError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)
