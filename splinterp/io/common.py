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

import numpy as np
import torch
from safetensors.torch import load_file

from splinterp.errors import (
    ConfigError,
    CorruptFileError,
    DTypeError,
    NonFiniteError,
    OverwriteError,
    ShapeError,
    SplinterpError,
)
from splinterp.sae import DTYPES, SAE, SAEConfig
from splinterp.validation import check_finite

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


def dtype_name(s: Any, source: Any) -> str:
    """'float32' from 'float32', 'torch.float32' or torch.float32; ConfigError for anything else."""
    if isinstance(s, torch.dtype):
        s = str(s)
    name = str(s).removeprefix("torch.")
    if not isinstance(s, str) or name not in DTYPES:
        raise ConfigError(f"{source}: dtype {s!r} is not one of {tuple(DTYPES)}")
    return name


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


# ---------------------------------------------------------------------------------------------- checks and build
def param_names(cfg: SAEConfig) -> list[str]:
    names = ["W_enc", "W_dec", "b_dec"]
    names += ["b_gate", "b_mag", "r_mag"] if cfg.architecture == "gated" else ["b_enc"]
    if cfg.architecture == "jumprelu":
        names.append("threshold")
    return names


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for n in param_names(cfg):
        shapes.setdefault(n, (d_sae,))
    return shapes


def check_tensors(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: Any, exact_dtype: bool) -> None:
    """Names, shapes, dtypes and finiteness of the weights against the config, before anything is allocated."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CorruptFileError(f"{source}: weights {missing} are missing for a {cfg.architecture} SAE")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CorruptFileError(f"{source}: unexpected weights {extra} for a {cfg.architecture} SAE")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CorruptFileError(
                f"{source}: {name} has shape {tuple(tensors[name].shape)} but the config "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {shape}"
            )
    if exact_dtype:
        half = cfg.torch_dtype in (torch.float16, torch.bfloat16)
        for name, t in tensors.items():
            want = torch.float32 if (name == "threshold" and half) else cfg.torch_dtype
            if t.dtype != want:
                raise CorruptFileError(f"{source}: {name} is stored as {t.dtype} but cfg.json says {want}")
    for name, t in tensors.items():
        try:
            check_finite(t, name=name)
        except NonFiniteError as e:
            raise CorruptFileError(f"{source}: {e}") from None


def build_sae(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: Any, exact_dtype: bool = False,
              *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> SAE:
    """Our SAE holding `tensors` (SAELens names), checked against `cfg`; optionally on another device / dtype.

    Each weight is copied into a parameter of the SAE's own layout (`SAEConfig.score_order`) and dtype.
    """
    check_tensors(cfg, tensors, source, exact_dtype)
    if cfg.tied and not torch.equal(tensors["W_dec"], tensors["W_enc"].T):
        raise CorruptFileError(f"{source}: the config says tied but W_dec != W_enc.T")
    changes: dict[str, Any] = {}
    if device is not None:
        changes["device"] = str(device)
    if dtype is not None:
        changes["dtype"] = dtype_name(dtype, "dtype=")
    try:
        cfg = cfg.replace(**changes)
    except ConfigError as e:
        raise ConfigError(f"load({', '.join(f'{k}={v!r}' for k, v in changes.items())}): {e}") from None
    try:
        sae = SAE(cfg)
    except SplinterpError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:  # e.g. a threshold that overflows the dtype
        raise ConfigError(f"{source}: cannot build an SAE from its config: {e}") from None
    with torch.no_grad():
        for name in expected_shapes(cfg):
            if name == "W_dec" and cfg.tied:
                continue
            p = getattr(sae, name)
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    if dtype is not None:
        for name in expected_shapes(cfg):  # a cast to a narrower dtype must not overflow
            try:
                check_finite(getattr(sae, name).detach(), name=name)
            except NonFiniteError as e:
                raise ConfigError(f"{source}: cannot cast to {cfg.dtype}: {e}") from None
    return sae


# ---------------------------------------------------------------------------------------------- raw weights
def _as_float_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        if a.dtype == object:
            raise DTypeError(f"{name} is an object array; pass numbers")
        a = torch.from_numpy(np.ascontiguousarray(a))
    if not isinstance(a, torch.Tensor):
        try:
            a = torch.as_tensor(a)
        except (TypeError, ValueError, RuntimeError) as e:
            raise DTypeError(f"{name} must be a tensor or an array, got {type(a).__name__}: {e}") from None
    if not a.is_floating_point():
        raise DTypeError(f"{name} must be floating point, got {a.dtype}")
    return a.detach()


def sae_from_weights(W_enc, b_enc=None, W_dec=None, b_dec=None, *, architecture="relu", k=None, threshold=None,
                     b_gate=None, b_mag=None, r_mag=None, orientation=None, apply_b_dec_to_input=False,
                     score_order=None, dtype=None, device=None, metadata=None) -> SAE:
    """`SAE.from_weights` (documented there)."""
    if orientation not in (None, "saelens", "linear"):
        raise ConfigError(f"orientation must be 'saelens', 'linear' or None, got {orientation!r}")
    W = _as_float_tensor(W_enc, "W_enc")
    if W.ndim != 2:
        raise ShapeError(f"W_enc must be a matrix, got shape {tuple(W.shape)}")
    vecs = {n: _as_float_tensor(v, n) for n, v in (("b_enc", b_enc), ("b_dec", b_dec), ("threshold", threshold),
                                                    ("b_gate", b_gate), ("b_mag", b_mag), ("r_mag", r_mag))
            if v is not None}
    d_in_known = vecs["b_dec"].numel() if "b_dec" in vecs else None
    sae_sized = [n for n in ("b_enc", "b_gate", "b_mag", "r_mag", "threshold") if n in vecs and vecs[n].ndim == 1]
    d_sae_known = vecs[sae_sized[0]].numel() if sae_sized else None
    fits = []
    for o in ("saelens", "linear"):
        d_in, d_sae = W.shape if o == "saelens" else W.shape[::-1]
        if (d_in_known is None or d_in == d_in_known) and (d_sae_known is None or d_sae == d_sae_known):
            fits.append(o)
    if not fits:
        raise ShapeError(
            f"W_enc has shape {tuple(W.shape)}, which fits neither [d_in, d_sae] nor [d_sae, d_in] with "
            f"d_in={d_in_known} (b_dec) and d_sae={d_sae_known} ({sae_sized[0] if sae_sized else '-'})"
        )
    if orientation is None:
        if len(fits) == 2:
            raise ConfigError(
                f"W_enc {tuple(W.shape)} could be [d_in, d_sae] or [d_sae, d_in]"
                + (" (it is square)" if W.shape[0] == W.shape[1] else " (pass b_dec and b_enc to tell)")
                + ": pass orientation='saelens' (W_enc [d_in, d_sae], used as x @ W_enc) or orientation='linear' "
                "(W_enc [d_sae, d_in], an nn.Linear weight)"
            )
        orientation = fits[0]
    elif orientation not in fits:
        raise ShapeError(f"orientation={orientation!r} does not fit W_enc {tuple(W.shape)} with d_in={d_in_known}, "
                         f"d_sae={d_sae_known}")
    W_sl = W if orientation == "saelens" else W.T
    d_in, d_sae = W_sl.shape
    tied = W_dec is None
    if tied:
        Wd = W_sl.T
    else:
        Wd = _as_float_tensor(W_dec, "W_dec")
        if d_in != d_sae and tuple(Wd.shape) == (d_in, d_sae):
            Wd = Wd.T
        elif d_in == d_sae and orientation == "linear":
            Wd = Wd.T
        if tuple(Wd.shape) != (d_sae, d_in):
            raise ShapeError(f"W_dec has shape {tuple(_as_float_tensor(W_dec, 'W_dec').shape)}; with W_enc "
                             f"{tuple(W.shape)} it must be [d_sae={d_sae}, d_in={d_in}] or [d_in, d_sae]")
    dt = dtype_name(dtype if dtype is not None else W.dtype, "from_weights")
    zeros_in, zeros_sae = torch.zeros(d_in, dtype=W.dtype), torch.zeros(d_sae, dtype=W.dtype)
    tensors = {"W_enc": W_sl, "W_dec": Wd, "b_dec": vecs.get("b_dec", zeros_in)}
    if architecture == "gated":
        for n in ("b_gate", "b_mag", "r_mag"):
            tensors[n] = vecs.get(n, zeros_sae)
        unused = sorted({"b_enc", "threshold"} & set(vecs))
    else:
        tensors["b_enc"] = vecs.get("b_enc", zeros_sae)
        unused = sorted({"b_gate", "b_mag", "r_mag"} & set(vecs))
    if architecture == "jumprelu":
        if "threshold" not in vecs:
            raise ConfigError("a jumprelu SAE needs threshold= (one per latent, or one global value)")
        thr = vecs["threshold"]
        tensors["threshold"] = thr.reshape(()).expand(d_sae).clone() if thr.numel() == 1 else thr
    elif architecture != "gated" and "threshold" in vecs:
        unused.append("threshold")
    if unused:
        raise ConfigError(f"{', '.join(unused)} given but a {architecture!r} SAE has no such weights")
    if score_order is None:
        score_order = "linear" if orientation == "linear" else "matmul"
    cfg = make_config("from_weights", d_in=int(d_in), d_sae=int(d_sae), architecture=architecture, k=k,
                      tied=tied, apply_b_dec_to_input=apply_b_dec_to_input, dtype=dt,
                      device=str(device if device is not None else W.device), metadata=dict(metadata or {}),
                      score_order=score_order)
    return build_sae(cfg, tensors, "from_weights")
