"""What every SAE reader shares: JSON and weight files read safely, typed config fields, the checks a state
dict must pass against its config, and building our SAE from it (also from raw matrices: `SAE.from_weights`).

Every reader turns its source into (SAEConfig, {SAELens name: tensor}) and `build_sae` does the rest, so a
weight file is checked the same way whichever library wrote it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from splinterp.errors import (
    ConfigError,
    CorruptFileError,
    OverwriteError,
)
from splinterp.sae import SAE, SAEConfig

CFG_FILE = "cfg.json"
SAE_FOLDER_FILES = frozenset(
    {CFG_FILE, "sae_weights.safetensors", "sae.safetensors", "sparsity.safetensors", "runner_cfg.json",
     "activation_scaler.json", "activation_whitening.safetensors", "trainer_state.pt",
     "activations_store_state.safetensors"}
)
"""Files SAELens or sparsify may keep next to an SAE: `save` replaces a folder holding only these."""


def read_json(path: Path) -> dict:
    """A JSON object from `path`; CorruptFileError for anything else (bad bytes, bad JSON, a list, deep nesting)."""
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptFileError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CorruptFileError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (no code runs: the format holds only data), floating point only."""
    try:
        tensors = load_file(str(path))
    except PermissionError:
        raise
    except Exception as e:  # the parser's own error types vary with the damage: all mean "unreadable"
        raise CorruptFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    check_floating(tensors, path)
    return tensors


def check_floating(tensors: dict[str, torch.Tensor], source: Any, skip: tuple[str, ...] = ()) -> None:
    for name, t in tensors.items():
        if name not in skip and not t.is_floating_point():
            raise CorruptFileError(f"{source}: tensor {name!r} has dtype {t.dtype}; SAE weights are floating point")


def get(d: dict, key: str, types: type | tuple[type, ...], source: Any, default: Any = ...,
        file: str = CFG_FILE) -> Any:
    """d[key], checked against `types`; a missing required key is a CorruptFileError, a bad type a ConfigError."""
    if key not in d or d[key] is None:
        if default is ...:
            raise CorruptFileError(f"{source}: {file} lacks the field {key!r}")
        return default
    v = d[key]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
        want = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{source}: {file} field {key!r} must be {want}, got {v!r}")
    return v


def check_target(folder: Path) -> None:
    """Refuse to replace a file, or a folder holding anything but SAE files (the swap would delete it)."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise OverwriteError(f"{folder} exists and is not a folder; refusing to replace it with an SAE folder")
    if folder.is_dir():
        entries = {p.name for p in folder.iterdir()}
        if entries and CFG_FILE not in entries:
            raise OverwriteError(
                f"{folder} is a non-empty folder that is not an SAE folder (no {CFG_FILE}); saving would replace "
                f"it whole. Save to a new or empty folder."
            )
        foreign = sorted(entries - SAE_FOLDER_FILES)
        if foreign:
            raise OverwriteError(
                f"{folder} holds files that are not part of an SAE folder ({', '.join(foreign[:5])}); saving "
                f"replaces the folder whole and would delete them. Move them or save elsewhere."
            )


def layout_of(W_enc: torch.Tensor | None) -> str | None:
    """'row_major' / 'column_major' for a W_enc [d_in, d_sae] view as an object holds it (None: neither)."""
    if W_enc is None or W_enc.ndim != 2:
        return None
    if W_enc.is_contiguous():
        return "row_major"
    return "column_major" if W_enc.T.is_contiguous() else None


def natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def make_config(source: Any, **fields: Any) -> SAEConfig:
    """SAEConfig(**fields), its errors prefixed with where the values came from."""
    try:
        return SAEConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def build_sae(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: Any, exact_dtype: bool = False,
              *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> SAE:
    """`SAE.from_tensors`: the one place a reader's weights become an SAE."""
    return SAE.from_tensors(cfg, tensors, source, exact_dtype, device=device, dtype=dtype)
