"""Save and load SAE folders: ours (SAELens layout), SAELens's own, and sparsify's.

Our folder is a SAELens folder: `cfg.json` + `sae_weights.safetensors` with SAELens names. cfg.json
carries the SAELens keys (so `sae_lens` can read it) plus a `splinterp` block with our full `SAEConfig`,
which makes the round trip exact. Writes are atomic: a folder is built under a temporary name and
swapped in whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from splinterp import __version__
from splinterp.atomic import atomic_dir
from splinterp.errors import ConfigError, CorruptFileError, NotAnSAEFolderError
from splinterp.sae import SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSIFY_WEIGHTS_FILE = "sae.safetensors"

# our architecture name -> SAELens's
_TO_SAELENS = {"relu": "standard", "topk": "topk", "topk_abs": "topk_abs", "jumprelu": "jumprelu", "gated": "gated"}
_FROM_SAELENS = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated",
                 "topk_abs": "topk_abs"}


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
    """The SAE's weights under their SAELens names (W_dec written out even when tied)."""
    return {n: getattr(sae, n).detach().contiguous().cpu() for n in _param_names(sae.cfg)}


def saelens_cfg(cfg: SAEConfig) -> dict:
    """cfg.json content: SAELens keys first, then our exact config under `splinterp`."""
    d = {
        "architecture": _TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": cfg.device,
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {**cfg.metadata, "splinterp_version": __version__},
    }
    if cfg.k is not None:
        d["k"] = cfg.k
    d["splinterp"] = cfg.to_dict()
    return d


def save(sae: SAE, folder: str | os.PathLike) -> Path:
    """Write `sae` to `folder` (cfg.json + sae_weights.safetensors), atomically. Returns the folder."""
    if not isinstance(sae, SAE):
        raise TypeError(f"save expects a splinterp SAE, got {type(sae).__name__}")
    folder = Path(folder)
    tensors = state_tensors(sae)
    with atomic_dir(folder) as tmp:
        (tmp / CFG_FILE).write_text(json.dumps(saelens_cfg(sae.cfg), indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CorruptFileError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _build(cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: Path) -> SAE:
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CorruptFileError(f"{source}: weights {missing} are missing for a {cfg.architecture} SAE")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CorruptFileError(
                f"{source}: {name} has shape {tuple(tensors[name].shape)} but cfg.json "
                f"(d_in={cfg.d_in}, d_sae={cfg.d_sae}) implies {shape}"
            )
    sae = SAE(cfg)
    with torch.no_grad():
        for name in expected:
            if name == "W_dec" and cfg.tied:
                if not torch.equal(tensors["W_dec"], tensors["W_enc"].T):
                    raise CorruptFileError(f"{source}: cfg says tied but W_dec != W_enc.T")
                continue
            p = getattr(sae, name)
            p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
    return sae


def _sae_from_saelens_cfg(d: dict, source: Path) -> SAEConfig:
    arch = d.get("architecture", "standard")
    if arch not in _FROM_SAELENS:
        raise ConfigError(f"{source}: SAELens architecture {arch!r} is not supported (supported: {sorted(_FROM_SAELENS)})")
    if d.get("normalize_activations", "none") not in ("none", None):
        raise ConfigError(
            f"{source}: normalize_activations={d['normalize_activations']!r}; fold the scaling into the weights first"
        )
    if d.get("rescale_acts_by_decoder_norm"):
        raise ConfigError(f"{source}: rescale_acts_by_decoder_norm=True is not supported; fold decoder norms first")
    try:
        return SAEConfig(
            d_in=int(d["d_in"]),
            d_sae=int(d["d_sae"]),
            architecture=_FROM_SAELENS[arch],
            k=int(d["k"]) if arch == "topk" else None,
            apply_b_dec_to_input=bool(d.get("apply_b_dec_to_input", False)),
            dtype=str(d.get("dtype", "float32")).replace("torch.", ""),
            device="cpu",
            metadata=dict(d.get("metadata") or {}),
        )
    except KeyError as e:
        raise CorruptFileError(f"{source}: cfg.json lacks the field {e}") from None


def _sparsify_cfg(d: dict, tensors: dict[str, torch.Tensor], source: Path) -> SAEConfig:
    if "encoder.weight" not in tensors:
        raise CorruptFileError(f"{source}: sparsify weights lack encoder.weight")
    d_sae, d_in = tensors["encoder.weight"].shape
    if d.get("transcode") or "W_skip" in tensors:
        raise ConfigError(f"{source}: sparsify transcoders / skip connections are not supported")
    if d.get("activation", "topk") != "topk":
        raise ConfigError(f"{source}: sparsify activation {d.get('activation')!r} is not supported (only topk)")
    if "k" not in d:
        raise CorruptFileError(f"{source}: sparsify cfg.json lacks k")
    dtype = str(tensors["encoder.weight"].dtype).replace("torch.", "")
    # sparsify encodes relu(encoder(x - b_dec)) then keeps the top k: our topk with b_dec pre-subtracted
    return SAEConfig(d_in=int(d_in), d_sae=int(d_sae), architecture="topk", k=int(d["k"]),
                     apply_b_dec_to_input=True, dtype=dtype, metadata={"source": "sparsify"})


def load(folder: str | os.PathLike, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder written by splinterp, SAELens or sparsify (detected from its files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotAnSAEFolderError(f"{folder} is not a folder")
    cfg_path = folder / CFG_FILE
    if not cfg_path.exists():
        raise NotAnSAEFolderError(f"{folder} has no {CFG_FILE}: not an SAE folder (expected {CFG_FILE} + {WEIGHTS_FILE})")
    d = _read_json(cfg_path)
    if (folder / WEIGHTS_FILE).exists():
        tensors = _read_weights(folder / WEIGHTS_FILE)
        if "splinterp" in d:
            try:
                cfg = SAEConfig.from_dict(d["splinterp"])
            except TypeError as e:
                raise CorruptFileError(f"{cfg_path}: bad splinterp block: {e}") from None
        else:
            cfg = _sae_from_saelens_cfg(d, folder)
    elif (folder / SPARSIFY_WEIGHTS_FILE).exists():
        raw = _read_weights(folder / SPARSIFY_WEIGHTS_FILE)
        cfg = _sparsify_cfg(d, raw, folder)
        tensors = {"W_enc": raw["encoder.weight"].T, "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"],
                   "b_dec": raw["b_dec"]}
    else:
        raise NotAnSAEFolderError(f"{folder} has {CFG_FILE} but neither {WEIGHTS_FILE} nor {SPARSIFY_WEIGHTS_FILE}")
    cfg = cfg.replace(device=str(device))
    return _build(cfg, tensors, folder)
