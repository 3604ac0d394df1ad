"""Save and load SAE folders: ours (a SAELens folder), SAELens's own, and sparsify's (TopK SAEs can also be
saved in sparsify's format: `save(sae, folder, format="sparsify")`).

Our folder *is* a SAELens 6 folder: `cfg.json` + `sae_weights.safetensors` with SAELens names, so
`sae_lens.SAE.load_from_disk` reads it. cfg.json carries the SAELens keys, then our full `SAEConfig` under
`splinterp` (which makes the round trip bit-exact, `tied` and `seed` included) and a SHA-256 of the weights
file under `splinterp_checksum` (so a flipped byte is an error, not a silently different SAE). Writes are
atomic: the folder is built under a temporary name and swapped in whole.

Conventions of the other libraries, as read from their code (SAELens 6.54, sparsify 1.3):

- Architecture names: ours -> SAELens: relu -> ``standard``, topk -> ``topk``, topk_abs -> ``abstopk``,
  jumprelu -> ``jumprelu``, gated -> ``gated``.
- ``apply_b_dec_to_input`` defaults to **True** in SAELens (v6 configs and pre-6 defaulting alike), so a
  cfg.json without the key means "encode x - b_dec".
- SAELens TopK takes the k largest pre-activations, then ReLU: our ``topk``. ``abstopk`` takes the k
  largest |u|, signs kept: our ``topk_abs``.
- ``rescale_acts_by_decoder_norm`` (SAELens topk/abstopk): scores are u * |W_dec_i| and decode divides by
  |W_dec_i|. We fold it on load (W_enc, b_enc times |W_dec_i|, W_dec rows divided by it), which gives the
  same codes and reconstructions as SAELens, the way SAELens folds it when it saves an inference model.
- SAELens JumpReLU is relu(u) * [u > theta]; ours is u * [u > theta]. They agree when theta >= 0, so a
  SAELens threshold is clamped at 0 on load (exactly equivalent) and saving a negative threshold warns.
- Training checkpoints of ``batchtopk`` / ``matryoshka_batchtopk`` are loaded as the JumpReLU SAE that
  SAELens's own ``save_inference_model`` would write: every threshold = the learned ``topk_threshold``.
- ``normalize_activations``: ``none`` loads as is. ``expected_average_only_in`` (a scale the user applies
  to the inputs) is folded into the weights when the folder's ``activation_scaler.json`` gives the factor;
  without it the SAE is loaded as SAELens's ``load_from_disk`` does (inputs must be pre-scaled) and a
  warning says so. Run-time normalisations (``layer_norm``, ``constant_norm_rescale``) are not affine, so
  they are refused.
- dtype strings ``float32`` and ``torch.float32`` are both accepted; SAELens casts every tensor to the
  cfg dtype on load, and so do we for SAELens folders. Our own folders must match exactly.
- Unknown keys in a SAELens or sparsify cfg.json are ignored (their training configs carry dozens); unknown
  keys in our `splinterp` block are an error.
- sparsify: `cfg.json` (SparseCoderConfig fields + `d_in`) + `sae.safetensors` with ``encoder.weight``
  [d_sae, d_in], ``encoder.bias``, ``W_dec`` [d_sae, d_in], ``b_dec``. It encodes
  topk(relu(encoder(x - b_dec))): our ``topk`` with ``apply_b_dec_to_input=True``. Transcoders, skip
  connections and ``groupmax`` are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from splinterp import __version__
from splinterp.atomic import atomic_dir, sha256_file
from splinterp.errors import (
    ChecksumError,
    ConfigError,
    CorruptFileError,
    NonFiniteError,
    NotAnSAEFolderError,
    OverwriteError,
    SplinterpError,
)
from splinterp.sae import DTYPES, SAE, SAEConfig
from splinterp.validation import check_dataclass_types, check_finite

log = logging.getLogger(__name__)

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"
ACTIVATION_SCALER_FILE = "activation_scaler.json"
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens picks its cfg parser by it (below 6.0 = legacy keys)."""

# files SAELens may keep next to an SAE; `save` replaces a folder holding only these
SAE_FOLDER_FILES = frozenset(
    {CFG_FILE, WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE, "sparsity.safetensors", "runner_cfg.json",
     ACTIVATION_SCALER_FILE, "activation_whitening.safetensors", "trainer_state.pt",
     "activations_store_state.safetensors"}
)

_TO_SAELENS = {"relu": "standard", "topk": "topk", "topk_abs": "abstopk", "jumprelu": "jumprelu", "gated": "gated"}
_FROM_SAELENS = {
    "standard": "relu",
    "topk": "topk",
    "abstopk": "topk_abs",
    "topk_abs": "topk_abs",  # what splinterp 0.1.0 wrote before SAELens had a name for it
    "jumprelu": "jumprelu",
    "gated": "gated",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
}
_BATCHTOPK = ("batchtopk", "matryoshka_batchtopk")
_SPARSIFY_KEYS = {"expansion_factor", "num_latents", "normalize_decoder", "multi_topk", "skip_connection",
                  "transcode"}


# ---------------------------------------------------------------------------------------------- helpers
def _param_names(cfg: SAEConfig) -> list[str]:
    names = ["W_enc", "W_dec", "b_dec"]
    names += ["b_gate", "b_mag", "r_mag"] if cfg.architecture == "gated" else ["b_enc"]
    if cfg.architecture == "jumprelu":
        names.append("threshold")
    return names


def _expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for n in _param_names(cfg):
        shapes.setdefault(n, (d_sae,))
    return shapes



def state_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The SAE's weights under their SAELens names (W_dec written out even when tied).

    A tied W_dec is copied: with d_in or d_sae = 1, W_enc.T is already contiguous and would share storage
    with W_enc, which safetensors refuses to write.
    """
    out = {n: getattr(sae, n).detach().contiguous().cpu() for n in _param_names(sae.cfg)}
    if sae.cfg.tied:
        out["W_dec"] = out["W_dec"].clone()
    return out


def saelens_cfg(cfg: SAEConfig) -> dict:
    """cfg.json content: the SAELens 6 inference keys first, then our exact config under `splinterp`."""
    d: dict[str, Any] = {
        "architecture": _TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {**cfg.metadata, "sae_lens_version": SAELENS_FORMAT_VERSION, "splinterp_version": __version__},
    }
    if cfg.k is not None:
        d["k"] = cfg.k
        d["rescale_acts_by_decoder_norm"] = False
    d["splinterp"] = cfg.to_dict()
    return d


# ---------------------------------------------------------------------------------------------- save
def _check_target(folder: Path) -> None:
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


SAVE_FORMATS = ("splinterp", "sparsify")


def save(sae: SAE, folder: str | os.PathLike, *, format: str = "splinterp") -> Path:  # noqa: A002
    """Write `sae` to `folder`, atomically. Returns the folder.

    format="splinterp" (default): cfg.json + sae_weights.safetensors, a SAELens 6 folder that round-trips
    exactly. format="sparsify": cfg.json + sae.safetensors as EleutherAI sparsify writes them
    (`SparseCoder.load_from_disk` reads it); TopK SAEs only, since sparsify has no other architecture.
    An existing SAE folder there is replaced whole; anything else there is refused (OverwriteError).
    Non-finite weights are refused (NonFiniteError): `load` would reject the folder.
    """
    if not isinstance(sae, SAE):
        raise TypeError(f"save expects a splinterp SAE, got {type(sae).__name__}")
    if format not in SAVE_FORMATS:
        raise ConfigError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
    folder = Path(folder)
    cfg = sae.cfg
    check_dataclass_types(cfg)
    tensors = state_tensors(sae)
    for name, t in tensors.items():
        try:
            check_finite(t, name=name)
        except NonFiniteError as e:
            raise NonFiniteError(f"cannot save the SAE: {e}") from None
    if format == "sparsify":
        return _save_sparsify(cfg, tensors, folder)
    if cfg.architecture == "jumprelu" and bool((tensors["threshold"] < 0).any()):
        warnings.warn(
            "this JumpReLU SAE has negative thresholds: splinterp computes u * [u > theta], SAELens "
            "relu(u) * [u > theta], so SAELens will read it as if those thresholds were 0",
            UserWarning,
            stacklevel=2,
        )
    cfg_dict = saelens_cfg(cfg)
    blob = safetensors_bytes(tensors, metadata={"format": "pt"})
    cfg_dict["splinterp_checksum"] = {WEIGHTS_FILE: "sha256:" + hashlib.sha256(blob).hexdigest()}
    try:
        cfg_text = json.dumps(cfg_dict, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot save the SAE: its config (metadata?) is not plain JSON: {e}") from None
    _check_target(folder)
    with atomic_dir(folder) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(blob)
        (tmp / CFG_FILE).write_text(cfg_text)
    return folder


def _save_sparsify(cfg: SAEConfig, tensors: dict[str, torch.Tensor], folder: Path) -> Path:
    """sparsify's folder: it encodes topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias)), which is our
    topk with b_dec applied to the input; without that, b_dec @ W_enc is folded into the encoder bias."""
    if cfg.architecture != "topk":
        raise ConfigError(
            f"sparsify only has TopK-then-ReLU SAEs; a {cfg.architecture!r} SAE cannot be saved in its format "
            "(save it with format='splinterp', which SAELens reads)"
        )
    W, b = tensors["W_enc"], tensors["b_enc"]
    if not cfg.apply_b_dec_to_input:
        b = (b.double() + tensors["b_dec"].double() @ W.double()).to(b.dtype)
    weights = {"encoder.weight": W.T.contiguous(), "encoder.bias": b.contiguous(),
               "W_dec": tensors["W_dec"].contiguous(), "b_dec": tensors["b_dec"].contiguous()}
    cfg_dict = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
                "normalize_decoder": False, "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False,
                "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
    blob = safetensors_bytes(weights, metadata={"format": "pt"})
    _check_target(folder)
    with atomic_dir(folder) as tmp:
        (tmp / SPARSIFY_WEIGHTS_FILE).write_bytes(blob)
        (tmp / CFG_FILE).write_text(json.dumps(cfg_dict, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CorruptFileError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CorruptFileError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except PermissionError:
        raise
    except Exception as e:  # the parser's own error types vary with the damage: all mean "unreadable"
        raise CorruptFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise CorruptFileError(f"{path}: tensor {name!r} has dtype {t.dtype}; SAE weights are floating point")
    return tensors


def _get(d: dict, key: str, types: type | tuple[type, ...], source: Path, default: Any = ...) -> Any:
    """d[key], checked against `types`; a missing required key is a CorruptFileError, a bad type a ConfigError."""
    if key not in d or d[key] is None:
        if default is ...:
            raise CorruptFileError(f"{source}: cfg.json lacks the field {key!r}")
        return default
    v = d[key]
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(v, types) or (bool not in types and isinstance(v, bool)):
        want = " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{source}: cfg.json field {key!r} must be {want}, got {v!r}")
    return v


def _dtype_name(s: Any, source: Path) -> str:
    name = str(s).removeprefix("torch.")
    if not isinstance(s, str) or name not in DTYPES:
        raise ConfigError(f"{source}: cfg.json dtype {s!r} is not one of {tuple(DTYPES)}")
    return name


def _check_tensors(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: Path, exact_dtype: bool) -> None:
    """Names, shapes, dtypes and finiteness of the weights against the config, before anything is allocated."""
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CorruptFileError(f"{source}: weights {missing} are missing for a {cfg.architecture} SAE")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CorruptFileError(f"{source}: unexpected weights {extra} for a {cfg.architecture} SAE")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CorruptFileError(
                f"{source}: {name} has shape {tuple(tensors[name].shape)} but cfg.json "
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


def _build(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: Path, exact_dtype: bool) -> SAE:
    _check_tensors(cfg, tensors, source, exact_dtype)
    if cfg.tied and not torch.equal(tensors["W_dec"], tensors["W_enc"].T):
        raise CorruptFileError(f"{source}: cfg says tied but W_dec != W_enc.T")
    try:
        sae = SAE(cfg)
    except SplinterpError:
        raise
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:  # e.g. a threshold that overflows the dtype
        raise ConfigError(f"{source}: cannot build an SAE from cfg.json: {e}") from None
    with torch.no_grad():
        for name in _expected_shapes(cfg):
            if name == "W_dec" and cfg.tied:
                continue
            p = getattr(sae, name)
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    return sae


# ---------------------------------------------------------------------------------------------- our format
_SAELENS_MIRROR = ("architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "k")


def _ours(d: dict, folder: Path, verify: bool) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    block = d["splinterp"]
    if not isinstance(block, dict):
        raise CorruptFileError(f"{folder}: cfg.json 'splinterp' must be an object, got {type(block).__name__}")
    try:
        cfg = SAEConfig.from_dict(block)
    except SplinterpError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{folder}: bad splinterp block in cfg.json: {e}") from None
    check_dataclass_types(cfg, name=f"{folder}/{CFG_FILE} splinterp")
    # the SAELens keys are what other tools read: they must say the same as our block
    mirror = saelens_cfg(cfg)
    for key in _SAELENS_MIRROR:
        if d.get(key) != mirror.get(key):
            raise CorruptFileError(
                f"{folder}: cfg.json disagrees with itself: {key}={d.get(key)!r} but the splinterp block implies "
                f"{mirror.get(key)!r} (edited by hand? edit both, or delete the splinterp block to load it as a "
                f"SAELens folder)"
            )
    for key, ok in (("normalize_activations", ("none", None)), ("rescale_acts_by_decoder_norm", (False, None))):
        if d.get(key) not in ok:
            raise CorruptFileError(f"{folder}: cfg.json {key}={d.get(key)!r} contradicts the splinterp block")
    checksum = d.get("splinterp_checksum")
    if verify and checksum is not None:
        want = checksum.get(WEIGHTS_FILE) if isinstance(checksum, dict) else None
        if not isinstance(want, str) or not want.startswith("sha256:"):
            raise CorruptFileError(f"{folder}: cfg.json splinterp_checksum is malformed: {checksum!r}")
        got = "sha256:" + sha256_file(folder / WEIGHTS_FILE)
        if got != want:
            raise ChecksumError(
                f"{folder}/{WEIGHTS_FILE} does not match the checksum in cfg.json (corrupt or truncated copy?). If "
                f"you changed the weights on purpose, delete 'splinterp_checksum' from cfg.json."
            )
    return cfg, _read_weights(folder / WEIGHTS_FILE)


# ---------------------------------------------------------------------------------------------- SAELens
def _saelens_k(d: dict, source: Path) -> int:
    if "k" not in d and isinstance(d.get("activation_fn_kwargs"), dict):  # SAELens < 6 kept k there
        d = d["activation_fn_kwargs"]
    return _get(d, "k", int, source)


def _read_scaling_factor(folder: Path) -> float | None:
    path = folder / ACTIVATION_SCALER_FILE
    if not path.exists():
        return None
    s = _read_json(path)
    if s.get("has_whitening"):
        raise ConfigError(f"{folder}: {ACTIVATION_SCALER_FILE} has a whitening transform, which is not supported")
    f = s.get("scaling_factor")
    if f is None:
        return None
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0:
        raise CorruptFileError(
            f"{folder}/{ACTIVATION_SCALER_FILE}: scaling_factor must be a positive number, got {f!r}"
        )
    return float(f)


def _saelens(d: dict, folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    arch = _get(d, "architecture", str, folder, default="standard")
    if arch not in _FROM_SAELENS:
        raise ConfigError(
            f"{folder}: SAELens architecture {arch!r} is not supported (supported: {sorted(_FROM_SAELENS)})"
        )
    if arch == "standard":
        act = d.get("activation_fn", d.get("activation_fn_str", "relu"))
        if act == "topk":  # SAELens < 6 wrote TopK SAEs as standard + activation_fn
            arch = "topk"
        elif act not in ("relu", None):
            raise ConfigError(f"{folder}: SAELens activation_fn {act!r} is not supported (relu or topk)")
    ours = _FROM_SAELENS[arch]
    d_in = _get(d, "d_in", int, folder)
    d_sae = _get(d, "d_sae", int, folder)
    dtype = _dtype_name(d.get("dtype", "float32"), folder)
    apply_b_dec = _get(d, "apply_b_dec_to_input", bool, folder, default=True)
    metadata = _get(d, "metadata", dict, folder, default={})
    metadata = dict(metadata)
    norm = d.get("normalize_activations", "none")
    if norm is False:
        norm = "none"
    elif norm is True:
        norm = "expected_average_only_in"
    scale = None
    if norm not in ("none", None):
        if norm in ("expected_average_only_in", "covariance_whitening"):
            scale = _read_scaling_factor(folder) if norm == "expected_average_only_in" else None
            if scale is None:
                warnings.warn(
                    f"{folder}: normalize_activations={norm!r} and no scaling factor to fold: loaded as SAELens's "
                    f"load_from_disk does, so inputs must be normalised the same way before encode",
                    UserWarning,
                    stacklevel=3,
                )
                metadata["normalize_activations"] = norm
            else:
                metadata["norm_scaling_factor"] = scale
        else:
            raise ConfigError(
                f"{folder}: normalize_activations={norm!r} is a run-time, non-affine normalisation; splinterp SAEs "
                f"are piecewise affine in their input, so it cannot be represented"
            )
    reshape = d.get("reshape_activations", "none")
    if reshape not in ("none", None):
        metadata["reshape_activations"] = reshape  # hook_z: flattened [n_heads * d_head] inputs, same SAE
    if d.get("finetuning_scaling_factor"):
        raise ConfigError(f"{folder}: finetuning_scaling_factor is not supported")

    tensors = dict(_read_weights(folder / WEIGHTS_FILE))
    if "scaling_factor" in tensors:  # SAELens drops an all-ones one; anything else rescales the codes
        if not torch.all(tensors["scaling_factor"] == 1):
            raise ConfigError(f"{folder}: a non-trivial scaling_factor tensor is not supported")
        del tensors["scaling_factor"]
    dt = DTYPES[dtype]
    tensors = {n: t.to(torch.float64) for n, t in tensors.items()}  # do the folding in float64

    k = None
    if ours in ("topk", "topk_abs"):
        k = _saelens_k(d, folder)
    if arch in _BATCHTOPK:
        if "topk_threshold" not in tensors:
            raise CorruptFileError(f"{folder}: a {arch} checkpoint needs the topk_threshold tensor")
        thr = tensors.pop("topk_threshold")
        if thr.numel() != 1:
            raise CorruptFileError(f"{folder}: topk_threshold must be a scalar, has shape {tuple(thr.shape)}")
        if "b_enc" in tensors:
            tensors["threshold"] = thr.reshape(()).expand(tensors["b_enc"].shape).clone()
    if d.get("rescale_acts_by_decoder_norm") and ours in ("topk", "topk_abs", "jumprelu"):
        if "W_dec" in tensors and "W_enc" in tensors and "b_enc" in tensors:
            n = tensors["W_dec"].norm(dim=-1)
            if bool((n == 0).any()) or tuple(n.shape) != (d_sae,):
                raise CorruptFileError(f"{folder}: rescale_acts_by_decoder_norm needs non-zero decoder rows")
            # codes are u * |W_dec_i| and decode divides by |W_dec_i|: fold both into the weights
            tensors["W_enc"] = tensors["W_enc"] * n
            tensors["b_enc"] = tensors["b_enc"] * n
            tensors["W_dec"] = tensors["W_dec"] / n[:, None]
    if scale is not None and {"W_enc", "W_dec", "b_dec"} <= set(tensors):
        # inputs were scaled by `scale` before the SAE: fold it so the SAE takes raw activations
        tensors["W_enc"] = tensors["W_enc"] * scale
        tensors["W_dec"] = tensors["W_dec"] / scale
        tensors["b_dec"] = tensors["b_dec"] / scale
    if ours == "jumprelu" and "threshold" in tensors:
        tensors["threshold"] = tensors["threshold"].clamp(min=0)  # relu(u)*[u>t] == u*[u>max(t,0)]
    tensors = {n: t.to(dt) for n, t in tensors.items()}

    try:
        cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=ours, k=k, apply_b_dec_to_input=apply_b_dec,
                        dtype=dtype, metadata=metadata)
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from None
    return cfg, tensors


# ---------------------------------------------------------------------------------------------- sparsify
def _sparsify(d: dict, folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    raw = _read_weights(folder / SPARSIFY_WEIGHTS_FILE)
    if _get(d, "transcode", bool, folder, default=False):
        raise ConfigError(f"{folder}: sparsify transcoders are not SAEs and are not supported")
    if _get(d, "skip_connection", bool, folder, default=False) or "W_skip" in raw:
        raise ConfigError(f"{folder}: sparsify skip connections are not supported")
    activation = _get(d, "activation", str, folder, default="topk")
    if activation != "topk":
        raise ConfigError(f"{folder}: sparsify activation {activation!r} is not supported (only topk)")
    k = _get(d, "k", int, folder)
    d_in = _get(d, "d_in", int, folder)
    need = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    missing = sorted(need - set(raw))
    if missing:
        raise CorruptFileError(f"{folder}: sparsify weights lack {missing}")
    extra = sorted(set(raw) - need)
    if extra:
        raise CorruptFileError(f"{folder}: unexpected sparsify weights {extra}")
    enc = raw["encoder.weight"]
    if enc.ndim != 2 or enc.shape[1] != d_in:
        raise CorruptFileError(f"{folder}: encoder.weight has shape {tuple(enc.shape)} but cfg.json says d_in={d_in}")
    d_sae = int(enc.shape[0])
    num_latents = _get(d, "num_latents", int, folder, default=0)
    factor = _get(d, "expansion_factor", int, folder, default=None)
    implied = num_latents or (factor * d_in if factor else d_sae)
    if implied != d_sae:
        raise CorruptFileError(f"{folder}: encoder.weight has {d_sae} latents but cfg.json implies {implied}")
    dtype = str(enc.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise CorruptFileError(f"{folder}: sparsify weights have unsupported dtype {enc.dtype}")
    try:
        cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, apply_b_dec_to_input=True, dtype=dtype,
                        metadata={"source": "sparsify", **{key: d[key] for key in sorted(_SPARSIFY_KEYS & set(d))}})
    except ConfigError as e:
        raise ConfigError(f"{folder}: {e}") from None
    # sparsify casts every tensor to encoder.weight's dtype on load; so do we
    tensors = {"W_enc": raw["encoder.weight"].T.contiguous(), "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"],
               "b_dec": raw["b_dec"]}
    tensors = {n: t.to(enc.dtype) for n, t in tensors.items()}
    return cfg, tensors


# ---------------------------------------------------------------------------------------------- load
def detect_format(folder: str | os.PathLike) -> str:
    """'splinterp', 'saelens' or 'sparsify', from the files in `folder` (NotAnSAEFolderError otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = ""
        if folder.name in (CFG_FILE, WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE):
            hint = f"; pass the folder that holds {folder.name} ({folder.parent})"
        raise NotAnSAEFolderError(f"{folder} is not a folder{hint}")
    cfg_path = folder / CFG_FILE
    if not cfg_path.is_file():
        subs = [p.name for p in sorted(folder.iterdir()) if (p / CFG_FILE).is_file()]
        hint = f"; it holds SAE sub-folders ({', '.join(subs[:3])}...): use splinterp.io.load_many" if subs else ""
        raise NotAnSAEFolderError(
            f"{folder} has no {CFG_FILE}: not an SAE folder (expected {CFG_FILE} + {WEIGHTS_FILE}){hint}"
        )
    if (folder / WEIGHTS_FILE).is_file():
        return "splinterp" if "splinterp" in _read_json(cfg_path) else "saelens"
    if (folder / SPARSIFY_WEIGHTS_FILE).is_file():
        return "sparsify"
    raise NotAnSAEFolderError(f"{folder} has {CFG_FILE} but neither {WEIGHTS_FILE} nor {SPARSIFY_WEIGHTS_FILE}")


def load(folder: str | os.PathLike, device: str | torch.device = "cpu", *, verify: bool = True) -> SAE:
    """Load an SAE folder written by splinterp, SAELens or sparsify (detected from its files).

    Every problem is a `SplinterpError` naming the file and the field: NotAnSAEFolderError, CorruptFileError
    (unparsable, truncated, weights disagreeing with cfg.json), ChecksumError (weights changed since
    splinterp saved them; `verify=False` skips the check), ConfigError (unsupported or invalid settings).
    """
    folder = Path(folder)
    fmt = detect_format(folder)
    d = _read_json(folder / CFG_FILE)
    if fmt == "splinterp":
        cfg, tensors = _ours(d, folder, verify)
    elif fmt == "saelens":
        cfg, tensors = _saelens(d, folder)
    else:
        cfg, tensors = _sparsify(d, folder)
    try:
        cfg = cfg.replace(device=str(device))
    except ConfigError as e:
        raise ConfigError(f"load(device={device!r}): {e}") from None
    return _build(cfg, tensors, folder, exact_dtype=fmt == "splinterp")


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def load_many(root: str | os.PathLike, device: str | torch.device = "cpu", *, verify: bool = True) -> dict[str, SAE]:
    """Every SAE sub-folder of `root` (e.g. sparsify's one per hookpoint), naturally sorted by name.

    `layers.2` comes before `layers.10`, as in sparsify's `load_many`.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotAnSAEFolderError(f"{root} is not a folder")
    subs = sorted((p for p in root.iterdir() if p.is_dir() and (p / CFG_FILE).is_file()),
                  key=lambda p: _natural_key(p.name))
    if not subs:
        raise NotAnSAEFolderError(f"{root} holds no SAE sub-folders (folders with a {CFG_FILE})")
    return {p.name: load(p, device, verify=verify) for p in subs}
