"""Results as plain JSON: what every results file (reproduce, LLM store, reports) goes through, so that a
numpy or torch scalar, a Path or a NaN never reaches `json.dumps`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splinterp.errors import ConfigError


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
