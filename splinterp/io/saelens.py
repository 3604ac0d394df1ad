"""Our folder format, which is a SAELens 6 folder, and SAELens's own folders and objects.

Our folder *is* a SAELens 6 folder: `cfg.json` + `sae_weights.safetensors` with SAELens names, so
`sae_lens.SAE.load_from_disk` reads it. cfg.json carries the SAELens keys, then our full `SAEConfig` under
`splinterp` (which makes the round trip bit-exact, `tied`, `seed` and `score_order` included) and a SHA-256 of
the weights file under `splinterp_checksum` (so a flipped byte is an error, not a silently different SAE).
Writes are atomic: the folder is built under a temporary name and swapped in whole.

SAELens's conventions, as read from its code (6.54):

- Architecture names: ours -> SAELens: relu -> ``standard``, topk -> ``topk``, topk_abs -> ``abstopk``,
  jumprelu -> ``jumprelu``, gated -> ``gated``.
- Scores are ``(x - b_dec) @ W_enc + b_enc`` with a row-major W_enc: our ``score_order="matmul"``; TopK
  takes the latents ``torch.topk`` picks from them (``topk_ties="torch"``, which matters on exact ties).
- ``apply_b_dec_to_input`` defaults to **True** (v6 configs and pre-6 defaulting alike), so a cfg.json
  without the key means "encode x - b_dec".
- Pre-6 configs (no ``sae_lens_version``, or below 6) kept ``hook_point`` / ``model_name`` / ... at the top
  level and TopK's k under ``activation_fn_kwargs``; they are read as SAELens's ``handle_pre_6_0_config`` reads
  them, and the LLM keys (``hook_name``, ``model_name``, ``dataset_path``, ...) go to our metadata.
- SAELens TopK takes the k largest pre-activations, then ReLU: our ``topk``. ``abstopk`` takes the k
  largest |u|, signs kept: our ``topk_abs``.
- ``rescale_acts_by_decoder_norm`` (SAELens topk/abstopk): scores are u * |W_dec_i| and decode divides by
  |W_dec_i|. We fold it on load (W_enc, b_enc times |W_dec_i|, W_dec rows divided by it, in float64), which
  gives the same codes and reconstructions as SAELens up to rounding, the way SAELens folds it when it saves
  an inference model (an SAE with the option on is a training SAE: SAELens saves inference SAEs folded).
- SAELens JumpReLU is relu(u) * [u > theta]; ours is u * [u > theta]. They agree when theta >= 0, so a
  SAELens threshold is clamped at 0 on load (exactly equivalent) and saving a negative threshold warns.
  ``log_threshold`` (older JumpReLU checkpoints) is read as threshold = exp(log_threshold).
- Training checkpoints of ``batchtopk`` / ``matryoshka_batchtopk`` are loaded as the JumpReLU SAE that
  SAELens's own ``save_inference_model`` would write: every threshold = the learned ``topk_threshold``.
- ``normalize_activations``: ``none`` loads as is. ``expected_average_only_in`` (inputs scaled by s) and
  ``covariance_whitening`` (inputs mapped to (s x - mean) @ M, reconstructions mapped back) are affine, so
  they are folded into the weights exactly as SAELens's ``fold_activation_norm_scaling_factor`` /
  ``fold_activation_whitening`` fold them (in float64), from the folder's ``activation_scaler.json`` and
  ``activation_whitening.safetensors``; the folded SAE takes raw activations. Without those files the SAE is
  loaded as SAELens's ``load_from_disk`` loads it (inputs must be normalised first) and a warning says so.
  Run-time normalisations (``layer_norm``, ``constant_norm_rescale``) are not affine: refused.
- ``reshape_activations="hook_z"``: the SAE also takes [..., n_heads, d_head] inputs, as SAELens's does.
- dtype strings ``float32`` and ``torch.float32`` are both accepted; SAELens casts every tensor to the
  cfg dtype on load, and so do we for SAELens folders. Our own folders must match exactly.
- Unknown keys in a SAELens cfg.json are ignored (training configs carry dozens); unknown keys in our
  `splinterp` block are an error.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from splinterp import __version__
from splinterp.atomic import atomic_dir, sha256_file
from splinterp.errors import ChecksumError, ConfigError, CorruptFileError, SplinterpError
from splinterp.io.common import CFG_FILE, check_target, get, layout_of, make_config, read_json, read_safetensors
from splinterp.sae import SAE, SAEConfig
from splinterp.sae_state import DTYPES, dtype_name, param_names
from splinterp.validation import check_dataclass_types

WEIGHTS_FILE = "sae_weights.safetensors"
ACTIVATION_SCALER_FILE = "activation_scaler.json"
WHITENING_FILE = "activation_whitening.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as metadata.sae_lens_version: SAELens picks its cfg parser by it (below 6.0 = legacy keys)."""

TO_SAELENS = {"relu": "standard", "topk": "topk", "topk_abs": "abstopk", "jumprelu": "jumprelu", "gated": "gated"}
FROM_SAELENS = {
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
LLM_METADATA_KEYS = (
    "model_name", "hook_name", "model_class_name", "hook_head_index", "model_from_pretrained_kwargs", "prepend_bos",
    "exclude_special_tokens", "neuronpedia_id", "context_size", "seqpos_slice", "dataset_path", "sae_lens_version",
    "sae_lens_training_version", "hook_name_out", "hook_head_index_out", "hf_hook_name", "hf_hook_name_out",
)
"""The config keys SAELens moves into `metadata` when it reads a pre-6 cfg.json (its LLM_METADATA_KEYS)."""
_LEGACY_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index",
                   "activation_fn_str": "activation_fn"}


# ---------------------------------------------------------------------------------------------- writing
def state_tensors(sae: SAE) -> dict[str, torch.Tensor]:
    """The SAE's weights under their SAELens names (W_dec written out even when tied), contiguous, on CPU.

    A tied W_dec is copied: with d_in or d_sae = 1, W_enc.T is already contiguous and would share storage
    with W_enc, which safetensors refuses to write.
    """
    out = {n: getattr(sae, n).detach().contiguous().cpu() for n in param_names(sae.cfg)}
    if sae.cfg.tied:
        out["W_dec"] = out["W_dec"].clone()
    return out


def saelens_cfg(cfg: SAEConfig) -> dict:
    """cfg.json content: the SAELens 6 inference keys first, then our exact config under `splinterp`."""
    d: dict[str, Any] = {
        "architecture": TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": cfg.reshape_activations,
        "metadata": {**cfg.metadata, "sae_lens_version": SAELENS_FORMAT_VERSION, "splinterp_version": __version__},
    }
    if cfg.k is not None:
        d["k"] = cfg.k
        d["rescale_acts_by_decoder_norm"] = False
    d["splinterp"] = cfg.to_dict()
    return d


def save_splinterp(sae: SAE, folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write our folder (cfg.json + sae_weights.safetensors) at `folder`, atomically; the target is checked."""
    cfg = sae.cfg
    if cfg.architecture == "jumprelu" and bool((tensors["threshold"] < 0).any()):
        warnings.warn(
            "this JumpReLU SAE has negative thresholds: splinterp computes u * [u > theta], SAELens "
            "relu(u) * [u > theta], so SAELens will read it as if those thresholds were 0",
            UserWarning,
            stacklevel=3,
        )
    if cfg.reshape_activations == "hook_z" and not str(cfg.metadata.get("hook_name") or "_z").endswith("_z"):
        raise ConfigError(f"a hook_z SAE's metadata hook_name must end in '_z' (SAELens refuses "
                          f"{cfg.metadata.get('hook_name')!r})")
    cfg_dict = saelens_cfg(cfg)
    blob = safetensors_bytes(tensors, metadata={"format": "pt"})
    cfg_dict["splinterp_checksum"] = {WEIGHTS_FILE: "sha256:" + hashlib.sha256(blob).hexdigest()}
    try:
        cfg_text = json.dumps(cfg_dict, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot save the SAE: its config (metadata?) is not plain JSON: {e}") from None
    check_target(folder)
    with atomic_dir(folder) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(blob)
        (tmp / CFG_FILE).write_text(cfg_text)
    return folder


# ---------------------------------------------------------------------------------------------- our format
_SAELENS_MIRROR = ("architecture", "d_in", "d_sae", "dtype", "apply_b_dec_to_input", "k")


def read_ours(d: dict, folder: Path, verify: bool) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
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
    for key, ok in (("normalize_activations", ("none", None)), ("rescale_acts_by_decoder_norm", (False, None)),
                    ("reshape_activations", (cfg.reshape_activations, None))):
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
    return cfg, read_safetensors(folder / WEIGHTS_FILE)


# ---------------------------------------------------------------------------------------------- SAELens
def _version_major(v: Any) -> int | None:
    m = re.match(r"\s*(\d+)", v) if isinstance(v, str) else None
    return int(m.group(1)) if m else None


def is_pre_6(d: dict) -> bool:
    """Whether SAELens would read this cfg.json with its pre-6 parser (no version, or a version below 6)."""
    v = d.get("sae_lens_version")
    if not v and isinstance(d.get("metadata"), dict):
        v = d["metadata"].get("sae_lens_version")
    major = _version_major(v)
    return major is None or major < 6


def _saelens_k(d: dict, source: Any) -> int:
    if "k" not in d and isinstance(d.get("activation_fn_kwargs"), dict):  # SAELens < 6 kept k there
        d = d["activation_fn_kwargs"]
    return get(d, "k", int, source)


def read_activation_scaler(folder: Path) -> tuple[float | None, tuple[torch.Tensor, ...] | None]:
    """(scaling_factor, (mean, matrix, inverse_matrix) in float64) from SAELens's activation scaler files."""
    path = folder / ACTIVATION_SCALER_FILE
    if not path.exists():
        return None, None
    s = read_json(path)
    f = s.get("scaling_factor")
    if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or f <= 0):
        raise CorruptFileError(f"{path}: scaling_factor must be a positive number, got {f!r}")
    whitening = None
    wpath = folder / WHITENING_FILE
    if s.get("has_whitening", True) and wpath.exists():  # as SAELens's ActivationScaler.load decides
        t = read_safetensors(wpath)
        missing = sorted({"mean", "matrix", "inverse_matrix"} - set(t))
        if missing:
            raise CorruptFileError(f"{wpath}: lacks {missing}")
        whitening = tuple(t[n].to(torch.float64) for n in ("mean", "matrix", "inverse_matrix"))
    elif s.get("has_whitening") and not wpath.exists():
        raise CorruptFileError(f"{path} says has_whitening but {WHITENING_FILE} is missing")
    return (None if f is None else float(f)), whitening


def _fold_whitening(t: dict[str, torch.Tensor], mean: torch.Tensor, M: torch.Tensor, M_inv: torch.Tensor,
                    apply_b_dec: bool, source: Any) -> None:
    """Inputs z = (x - mean) @ M, outputs x = z @ M_inv + mean, folded into the weights (SAELens's rule)."""
    d_in = t["W_enc"].shape[0]
    if mean.shape != (d_in,) or M.shape != (d_in, d_in) or M_inv.shape != (d_in, d_in):
        raise CorruptFileError(f"{source}: whitening shapes {tuple(mean.shape)}, {tuple(M.shape)}, "
                               f"{tuple(M_inv.shape)} do not fit d_in={d_in}")
    t["W_enc"] = M @ t["W_enc"]
    if not apply_b_dec:  # with b_dec applied, the folded b_dec below already subtracts the mean
        shift = mean @ t["W_enc"]
        if "b_enc" in t:
            t["b_enc"] = t["b_enc"] - shift
        if "b_gate" in t:
            t["b_gate"] = t["b_gate"] - shift
            t["b_mag"] = t["b_mag"] - shift * torch.exp(t["r_mag"])
    t["W_dec"] = t["W_dec"] @ M_inv
    t["b_dec"] = t["b_dec"] @ M_inv + mean


def read_saelens(d: dict, tensors: dict[str, torch.Tensor], source: Any, *, scale: float | None = None,
                 whitening: tuple[torch.Tensor, ...] | None = None, stacklevel: int = 4
                 ) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a SAELens cfg dict and state dict (a folder's, or an SAE object's)."""
    legacy = is_pre_6(d)
    if legacy:
        d = {_LEGACY_RENAMES.get(k, k): v for k, v in d.items()}
    arch = get(d, "architecture", str, source, default="standard")
    if arch not in FROM_SAELENS:
        raise ConfigError(
            f"{source}: SAELens architecture {arch!r} is not supported (supported: {sorted(FROM_SAELENS)})"
        )
    if arch == "standard":
        act = d.get("activation_fn", d.get("activation_fn_str", "relu"))
        if act == "topk":  # SAELens < 6 wrote TopK SAEs as standard + activation_fn
            arch = "topk"
        elif act not in ("relu", None):
            raise ConfigError(f"{source}: SAELens activation_fn {act!r} is not supported (relu or topk)")
    ours = FROM_SAELENS[arch]
    d_in = get(d, "d_in", int, source)
    d_sae = get(d, "d_sae", int, source)
    dtype = dtype_name(d.get("dtype", "float32"), source)
    apply_b_dec = get(d, "apply_b_dec_to_input", bool, source, default=True)
    metadata: dict[str, Any] = {}
    if legacy:  # SAELens < 6 kept the LLM keys at the top level
        metadata.update({k: d[k] for k in LLM_METADATA_KEYS if d.get(k) is not None})
    metadata.update(get(d, "metadata", dict, source, default={}))
    norm = d.get("normalize_activations", "none")
    if norm is False:
        norm = "none"
    elif norm is True:
        norm = "expected_average_only_in"
    if norm not in ("none", None, "expected_average_only_in", "covariance_whitening"):
        raise ConfigError(
            f"{source}: normalize_activations={norm!r} is a run-time, non-affine normalisation; splinterp SAEs "
            f"are piecewise affine in their input, so it cannot be represented"
        )
    fold_scale = scale if norm in ("expected_average_only_in", "covariance_whitening") else None
    fold_whitening = whitening if norm == "covariance_whitening" else None
    if norm == "expected_average_only_in" and fold_scale is None:
        missing = f"no scaling factor ({ACTIVATION_SCALER_FILE})"
    elif norm == "covariance_whitening" and fold_whitening is None:
        missing = f"no whitening ({WHITENING_FILE})"
    else:
        missing = None
    if missing:
        warnings.warn(
            f"{source}: normalize_activations={norm!r} and {missing} to fold: loaded as SAELens's load_from_disk "
            f"loads it, so inputs must be normalised the same way before encode",
            UserWarning,
            stacklevel=stacklevel,
        )
        metadata["normalize_activations"] = norm
    reshape = d.get("reshape_activations")
    if reshape is None:
        reshape = "hook_z" if legacy and "hook_z" in str(metadata.get("hook_name") or "") else "none"
    if reshape not in ("none", "hook_z"):
        raise ConfigError(f"{source}: reshape_activations={reshape!r} is not supported (none or hook_z)")
    if d.get("finetuning_scaling_factor"):
        raise ConfigError(f"{source}: finetuning_scaling_factor is not supported")

    tensors = dict(tensors)
    if "scaling_factor" in tensors:  # SAELens drops an all-ones one; anything else rescales the codes
        if not torch.all(tensors["scaling_factor"] == 1):
            raise ConfigError(f"{source}: a non-trivial scaling_factor tensor is not supported")
        del tensors["scaling_factor"]
    dt = DTYPES[dtype]
    tensors = {n: t.detach().to(torch.float64) for n, t in tensors.items()}  # do the folding in float64
    if "log_threshold" in tensors and "threshold" not in tensors:  # older JumpReLU checkpoints
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold"))

    k = None
    if ours in ("topk", "topk_abs"):
        k = _saelens_k(d, source)
    if arch in _BATCHTOPK:
        if "topk_threshold" not in tensors:
            raise CorruptFileError(f"{source}: a {arch} checkpoint needs the topk_threshold tensor")
        thr = tensors.pop("topk_threshold")
        if thr.numel() != 1:
            raise CorruptFileError(f"{source}: topk_threshold must be a scalar, has shape {tuple(thr.shape)}")
        if "b_enc" in tensors:
            tensors["threshold"] = thr.reshape(()).expand(tensors["b_enc"].shape).clone()
    if d.get("rescale_acts_by_decoder_norm") and ours in ("topk", "topk_abs", "jumprelu"):
        if "W_dec" in tensors and "W_enc" in tensors and "b_enc" in tensors:
            n = tensors["W_dec"].norm(dim=-1)
            if bool((n == 0).any()) or tuple(n.shape) != (d_sae,):
                raise CorruptFileError(f"{source}: rescale_acts_by_decoder_norm needs non-zero decoder rows")
            # codes are u * |W_dec_i| and decode divides by |W_dec_i|: fold both into the weights
            tensors["W_enc"] = tensors["W_enc"] * n
            tensors["b_enc"] = tensors["b_enc"] * n
            tensors["W_dec"] = tensors["W_dec"] / n[:, None]
    have = {"W_enc", "W_dec", "b_dec"} <= set(tensors) and tensors["W_enc"].ndim == 2
    if fold_whitening is not None and have:
        mean, M, M_inv = fold_whitening
        s = 1.0 if fold_scale is None else fold_scale
        # inputs were scaled by s, then whitened: (s x - mean) @ M = (x - mean / s) @ (s M)
        _fold_whitening(tensors, mean / s, M * s, M_inv / s, apply_b_dec, source)
        metadata["folded_whitening"] = True
        if fold_scale is not None:
            metadata["norm_scaling_factor"] = fold_scale
    elif fold_scale is not None and have:
        # inputs were scaled by `scale` before the SAE: fold it so the SAE takes raw activations
        tensors["W_enc"] = tensors["W_enc"] * fold_scale
        tensors["W_dec"] = tensors["W_dec"] / fold_scale
        tensors["b_dec"] = tensors["b_dec"] / fold_scale
        metadata["norm_scaling_factor"] = fold_scale
    if ours == "jumprelu" and "threshold" in tensors:
        tensors["threshold"] = tensors["threshold"].clamp(min=0)  # relu(u)*[u>t] == u*[u>max(t,0)]
    tensors = {n: t.to(dt) for n, t in tensors.items()}
    cfg = make_config(source, d_in=d_in, d_sae=d_sae, architecture=ours, k=k, apply_b_dec_to_input=apply_b_dec,
                      dtype=dtype, metadata=metadata, score_order="matmul", reshape_activations=reshape,
                      topk_ties="torch" if k is not None else "lowest_index")
    return cfg, tensors


def read_saelens_folder(d: dict, folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    scale, whitening = read_activation_scaler(folder)
    return read_saelens(d, read_safetensors(folder / WEIGHTS_FILE), folder, scale=scale, whitening=whitening,
                        stacklevel=5)


def from_saelens_object(obj: Any) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """A SAELens `SAE` or `TrainingSAE` in memory: its cfg.to_dict() and state dict, read as a folder would be."""
    try:
        d = obj.cfg.to_dict()
        state = obj.state_dict()
    except Exception as e:  # a duck-typed object we cannot read
        raise ConfigError(f"cannot read the config and weights of {type(obj).__name__}: {e}") from None
    meta = d.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        d["metadata"] = meta.to_dict() if hasattr(meta, "to_dict") else dict(vars(meta))
    d["metadata"] = {k: v for k, v in (d.get("metadata") or {}).items() if _plain_json(v)}
    d["dtype"] = dtype_name(next(iter(state.values())).dtype if state else d.get("dtype"), type(obj).__name__)
    cfg, tensors = read_saelens(d, state, f"{type(obj).__name__} object", stacklevel=5)
    return cfg.replace(w_enc_layout=layout_of(state.get("W_enc"))), tensors


def _plain_json(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
