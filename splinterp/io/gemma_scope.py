"""Gemma Scope's raw format: one `params.npz` per SAE (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec,
threshold), read with `np.load(allow_pickle=False)`: a JumpReLU SAE on raw activations
(``apply_b_dec_to_input=False``), float32, scores x @ W_enc + b_enc, exactly as SAELens's Gemma Scope loader
builds it (it also renames ``w_*`` keys to ``W_*`` and drops an all-ones ``scaling_factor``).

When the path is a Hugging Face download of a Gemma Scope repository (``.../gemma-scope-2b-pt-res/.../
layer_12/width_16k/average_l0_82/params.npz``), the model and TransformerLens hook name are recorded as SAELens
records them: ``res`` -> ``blocks.L.hook_resid_post``, ``mlp`` -> ``blocks.L.hook_mlp_out``, ``att`` ->
``blocks.L.attn.hook_z`` (a hook_z SAE).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splinterp.errors import ConfigError, CorruptFileError
from splinterp.io.common import make_config
from splinterp.sae import SAEConfig

PARAMS_FILE = "params.npz"
_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_MODELS = {"2b-it": "gemma-2-2b-it", "9b-it": "gemma-2-9b-it", "27b-it": "gemma-2-27b-it", "2b": "gemma-2-2b",
           "9b": "gemma-2-9b", "27b": "gemma-2-27b"}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file; object (pickled) arrays are refused, never unpickled."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise CorruptFileError(f"{path} is a single .npy array, not an .npz archive of named arrays")
            return {name: z[name] for name in z.files}
    except CorruptFileError:
        raise
    except PermissionError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise CorruptFileError(f"{path} is not a readable .npz of numeric arrays (truncated, corrupt, or pickled "
                               f"objects?): {e}") from None


def _provenance(path: Path) -> tuple[dict[str, Any], str]:
    """(metadata, reshape_activations) read off a Gemma Scope download path, as SAELens names them."""
    text = path.as_posix()
    meta: dict[str, Any] = {"source": "gemma_scope"}
    m = re.search(r"(layer_\d+/width_\w+/[^/]+)/" + re.escape(path.name) + "$", text)
    if m:
        meta["sae_id"] = m.group(1)
    repo = re.search(r"gemma-scope-(\d+b(?:-it)?)-(?:pt|it)-(res|mlp|att)", text)
    layer = re.search(r"layer_(\d+)", text)
    reshape = "none"
    if repo and layer:
        model_key, site = repo.group(1), repo.group(2)
        model = next((v for k, v in _MODELS.items() if model_key.startswith(k)), None)
        if model is not None:
            meta["model_name"] = model
        L = int(layer.group(1))
        meta["hook_name"] = {"res": f"blocks.{L}.hook_resid_post", "mlp": f"blocks.{L}.hook_mlp_out",
                             "att": f"blocks.{L}.attn.hook_z"}[site]
        reshape = "hook_z" if site == "att" else "none"
    return meta, reshape


def read_gemma_scope(path: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    arrays = read_npz(path)
    t: dict[str, torch.Tensor] = {}
    for key, a in arrays.items():
        name = "W_" + key[2:] if key.startswith("w_") else key
        if a.dtype.kind != "f":
            raise CorruptFileError(f"{path}: array {key!r} has dtype {a.dtype}; SAE weights are floating point")
        t[name] = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32)
    if "scaling_factor" in t:  # as SAELens: an all-ones factor is dropped, any other one is not an SAE we model
        if not torch.all(t["scaling_factor"] == 1):
            raise ConfigError(f"{path}: a non-trivial scaling_factor is not supported")
        del t["scaling_factor"]
    missing = sorted(set(_NAMES) - set(t))
    if missing:
        raise CorruptFileError(f"{path}: a Gemma Scope params.npz needs {list(_NAMES)}; it lacks {missing}")
    extra = sorted(set(t) - set(_NAMES))
    if extra:
        raise CorruptFileError(f"{path}: unexpected arrays {extra} in a Gemma Scope params.npz")
    W = t["W_enc"]
    if W.ndim != 2:
        raise CorruptFileError(f"{path}: W_enc has shape {tuple(W.shape)}, not [d_in, d_sae]")
    t["threshold"] = t["threshold"].clamp(min=0)  # SAELens: relu(u) * [u > t] == u * [u > max(t, 0)]
    meta, reshape = _provenance(path)
    cfg = make_config(path, d_in=int(W.shape[0]), d_sae=int(W.shape[1]), architecture="jumprelu",
                      apply_b_dec_to_input=False, dtype="float32", metadata=meta, score_order="matmul",
                      reshape_activations=reshape)
    return cfg, t
