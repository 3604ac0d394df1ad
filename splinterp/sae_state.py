"""The weights of an SAE, before there is an SAE: which tensors a config needs, the checks a set of tensors
must pass against it, and raw matrices sorted into SAELens names and orientation.

Why apart from `splinterp.sae`: every reader (`splinterp.io`) and `SAE.from_weights` check weights the same
way, and none of it needs the model class, so the model module imports this and nothing imports back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from splinterp.errors import ConfigError, CorruptFileError, DTypeError, NonFiniteError, ShapeError
from splinterp.validation import check_finite

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(s: Any, source: Any) -> str:
    """'float32' from 'float32', 'torch.float32' or torch.float32; ConfigError for anything else."""
    if isinstance(s, torch.dtype):
        s = str(s)
    name = str(s).removeprefix("torch.")
    if not isinstance(s, str) or name not in DTYPES:
        raise ConfigError(f"{source}: dtype {s!r} is not one of {tuple(DTYPES)}")
    return name


def param_names(cfg) -> list[str]:
    """The weights an SAE of config `cfg` (an SAEConfig) holds, by SAELens name."""
    names = ["W_enc", "W_dec", "b_dec"]
    names += ["b_gate", "b_mag", "r_mag"] if cfg.architecture == "gated" else ["b_enc"]
    if cfg.architecture == "jumprelu":
        names.append("threshold")
    return names


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for n in param_names(cfg):
        shapes.setdefault(n, (d_sae,))
    return shapes


def check_tensors(cfg, tensors: dict[str, torch.Tensor], source: Any, exact_dtype: bool) -> None:
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


def as_float_tensor(a: Any, name: str) -> torch.Tensor:
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


def state_from_weights(W_enc, b_enc=None, W_dec=None, b_dec=None, *, architecture="relu", k=None, threshold=None,
                       b_gate=None, b_mag=None, r_mag=None, orientation=None, apply_b_dec_to_input=False,
                       score_order=None, dtype=None, device=None,
                       metadata=None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(SAEConfig fields, {SAELens name: tensor}) of raw matrices: the work of `SAE.from_weights` (documented
    there) that needs no SAE."""
    if orientation not in (None, "saelens", "linear"):
        raise ConfigError(f"orientation must be 'saelens', 'linear' or None, got {orientation!r}")
    W = as_float_tensor(W_enc, "W_enc")
    if W.ndim != 2:
        raise ShapeError(f"W_enc must be a matrix, got shape {tuple(W.shape)}")
    vecs = {n: as_float_tensor(v, n) for n, v in (("b_enc", b_enc), ("b_dec", b_dec), ("threshold", threshold),
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
        Wd = as_float_tensor(W_dec, "W_dec")
        if d_in != d_sae and tuple(Wd.shape) == (d_in, d_sae):
            Wd = Wd.T
        elif d_in == d_sae and orientation == "linear":
            Wd = Wd.T
        if tuple(Wd.shape) != (d_sae, d_in):
            raise ShapeError(f"W_dec has shape {tuple(as_float_tensor(W_dec, 'W_dec').shape)}; with W_enc "
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
    fields = dict(d_in=int(d_in), d_sae=int(d_sae), architecture=architecture, k=k, tied=tied,
                  apply_b_dec_to_input=apply_b_dec_to_input, dtype=dt,
                  device=str(device if device is not None else W.device), metadata=dict(metadata or {}),
                  score_order=score_order)
    return fields, tensors
