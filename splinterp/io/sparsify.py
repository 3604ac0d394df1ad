"""EleutherAI sparsify: its folders (one per hookpoint) and `SparseCoder` objects, read and written.

A sparsify folder is `cfg.json` (SparseCoderConfig fields + `d_in`) + `sae.safetensors` with
``encoder.weight`` [d_sae, d_in], ``encoder.bias``, ``W_dec`` [d_sae, d_in], ``b_dec`` (sparsify 1.3). It encodes
topk(relu(nn.Linear(x - b_dec))): our ``topk`` with ``apply_b_dec_to_input=True`` and
``score_order="linear"`` (the bias added inside the matmul, W_enc.T held as the nn.Linear weight) and
``topk_ties="torch_relu"`` (the latents torch.topk picks from relu(scores)), so active sets match sparsify's
bit for bit. Every tensor is cast to encoder.weight's dtype, as sparsify does. The
folder's name is sparsify's hookpoint (a Hugging Face module path such as ``layers.10``): it is kept as
metadata ``hf_hook_name``. Transcoders, skip connections and ``groupmax`` are refused.

``multi_topk``: such an SAE was trained to reconstruct with its 4k largest latents too, and sparsify's
``forward`` decodes with 4k while ``encode`` selects k. We load it with k (encode's) and warn; pass
``load(path, k=4 * k)`` for the decode sparsify's forward computes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from splinterp.atomic import atomic_dir
from splinterp.errors import ConfigError, CorruptFileError
from splinterp.io.common import CFG_FILE, check_target, get, layout_of, make_config, read_safetensors
from splinterp.sae import DTYPES, SAE, SAEConfig

WEIGHTS_FILE = "sae.safetensors"
CONFIG_KEYS = ("activation", "expansion_factor", "normalize_decoder", "num_latents", "k", "multi_topk",
               "skip_connection", "transcode")
"""SparseCoderConfig's fields (sparsify 1.3), kept as metadata."""


def read_sparsify(d: dict, raw: dict[str, torch.Tensor], source: Any, hookpoint: str | None = None,
                  stacklevel: int = 4) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a sparsify cfg dict (with d_in) and state dict."""
    if get(d, "transcode", bool, source, default=False):
        raise ConfigError(f"{source}: sparsify transcoders are not SAEs and are not supported")
    if get(d, "skip_connection", bool, source, default=False) or raw.get("W_skip") is not None:
        raise ConfigError(f"{source}: sparsify skip connections are not supported")
    activation = get(d, "activation", str, source, default="topk")
    if activation != "topk":
        raise ConfigError(f"{source}: sparsify activation {activation!r} is not supported (only topk)")
    k = get(d, "k", int, source)
    d_in = get(d, "d_in", int, source)
    raw = {n: t for n, t in raw.items() if t is not None}
    need = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    missing = sorted(need - set(raw))
    if missing:
        raise CorruptFileError(f"{source}: sparsify weights lack {missing}")
    extra = sorted(set(raw) - need)
    if extra:
        raise CorruptFileError(f"{source}: unexpected sparsify weights {extra}")
    enc = raw["encoder.weight"]
    if enc.ndim != 2 or enc.shape[1] != d_in:
        raise CorruptFileError(f"{source}: encoder.weight has shape {tuple(enc.shape)} but cfg.json says d_in={d_in}")
    d_sae = int(enc.shape[0])
    num_latents = get(d, "num_latents", int, source, default=0)
    factor = get(d, "expansion_factor", int, source, default=None)
    implied = num_latents or (factor * d_in if factor else d_sae)
    if implied != d_sae:
        raise CorruptFileError(f"{source}: encoder.weight has {d_sae} latents but cfg.json implies {implied}")
    dtype = str(enc.dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise CorruptFileError(f"{source}: sparsify weights have unsupported dtype {enc.dtype}")
    meta: dict[str, Any] = {"source": "sparsify", **{key: d[key] for key in CONFIG_KEYS if key in d}}
    if hookpoint:
        meta["hf_hook_name"] = hookpoint
    cfg = make_config(source, d_in=d_in, d_sae=d_sae, architecture="topk", k=k, apply_b_dec_to_input=True,
                      dtype=dtype, metadata=meta, score_order="linear", topk_ties="torch_relu")
    if d.get("multi_topk"):
        warnings.warn(
            f"{source}: a multi_topk sparsify SAE: sparsify's forward() decodes with the 4k={4 * k} largest latents, "
            f"its encode() selects k={k}; loaded with k={k} (encode's). For sparsify's forward, load it with "
            f"k={4 * k}.",
            UserWarning,
            stacklevel=stacklevel,
        )
    # sparsify casts every tensor to encoder.weight's dtype on load; so do we
    tensors = {"W_enc": enc.T, "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
    return cfg, {n: t.detach().to(enc.dtype) for n, t in tensors.items()}


def read_sparsify_folder(d: dict, folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    return read_sparsify(d, read_safetensors(folder / WEIGHTS_FILE), folder, hookpoint=folder.name, stacklevel=5)


def from_sparsify_object(obj: Any) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """A sparsify `SparseCoder` in memory: its cfg.to_dict() (+ d_in) and state dict."""
    try:
        d = {**obj.cfg.to_dict(), "d_in": int(obj.d_in)}
        state = dict(obj.state_dict())
    except Exception as e:  # a duck-typed object we cannot read
        raise ConfigError(f"cannot read the config and weights of {type(obj).__name__}: {e}") from None
    cfg, tensors = read_sparsify(d, state, f"{type(obj).__name__} object", stacklevel=5)
    enc = state.get("encoder.weight")
    return cfg.replace(w_enc_layout=layout_of(None if enc is None else enc.T)), tensors


def save_sparsify(sae: SAE, tensors: dict[str, torch.Tensor], folder: Path, stacklevel: int = 3) -> Path:
    """sparsify's folder: it encodes topk(relu((x - b_dec) @ encoder.weight.T + encoder.bias)), our topk with b_dec
    applied to the input; what sparsify's format cannot hold is named in a warning (or refused). sparsify adds
    the bias inside the matmul: an SAE with score_order="matmul" may round half-precision scores differently
    there (the same function; reloaded, it follows sparsify's order)."""
    cfg = sae.cfg
    if cfg.architecture != "topk":
        raise ConfigError(
            f"sparsify only has TopK-then-ReLU SAEs; a {cfg.architecture!r} SAE cannot be saved in its format "
            "(save it with format='splinterp', which SAELens reads)"
        )
    lost = []
    if cfg.tied:
        lost.append("tied (sparsify stores W_dec separately: it comes back untied)")
    if not cfg.apply_b_dec_to_input:
        lost.append("apply_b_dec_to_input=False (b_dec @ W_enc is folded into encoder.bias: the same function, "
                    "but b_dec no longer moves the encoder when trained)")
    if cfg.reshape_activations != "none":
        lost.append(f"reshape_activations={cfg.reshape_activations!r}")
    hook = cfg.metadata.get("hook_name") or cfg.metadata.get("hf_hook_name")
    dropped = sorted(set(cfg.metadata) - set(CONFIG_KEYS) - {"source"})
    if dropped:
        where = f" (sparsify names the hookpoint by the folder: save to <root>/{hook})" if hook else ""
        lost.append(f"metadata {dropped}{where}")
    if lost:
        warnings.warn("saving in sparsify's format loses: " + "; ".join(lost), UserWarning, stacklevel=stacklevel)
    W, b = tensors["W_enc"], tensors["b_enc"]
    if not cfg.apply_b_dec_to_input:
        b = (b.double() + tensors["b_dec"].double() @ W.double()).to(b.dtype)
    weights = {"encoder.weight": W.T.contiguous(), "encoder.bias": b.contiguous(),
               "W_dec": tensors["W_dec"].contiguous(), "b_dec": tensors["b_dec"].contiguous()}
    cfg_dict = {"activation": "topk", "expansion_factor": max(1, cfg.d_sae // cfg.d_in),
                "normalize_decoder": False, "num_latents": cfg.d_sae, "k": cfg.k, "multi_topk": False,
                "skip_connection": False, "transcode": False, "d_in": cfg.d_in}
    blob = safetensors_bytes(weights, metadata={"format": "pt"})
    check_target(folder)
    with atomic_dir(folder) as tmp:
        (tmp / WEIGHTS_FILE).write_bytes(blob)
        (tmp / CFG_FILE).write_text(json.dumps(cfg_dict, indent=2) + "\n")
    return folder
