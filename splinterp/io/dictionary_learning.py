"""saprmarks/dictionary_learning: its run folders (`ae.pt` + `config.json`) and dictionary objects.

A run folder holds `ae.pt`, a `torch.save`d state dict (read with `torch.load(weights_only=True)`: tensors
only, no code runs), and `config.json` = {"trainer": {"dict_class": ..., "k": ..., "lm_name": ...,
"layer": ..., "submodule_name": ...}, "buffer": {...}} (dictionary-learning 0.1.0). What each class
computes, from its `encode` (x_in = x - b_dec unless said otherwise):

- ``AutoEncoder``: relu(Linear(x - bias)), decoder Linear + bias. Its loader (`load_dictionary`) first
  normalises the decoder columns to unit norm, folding the norms into the encoder (unless they are already
  1 to allclose's tolerance); we do the same, in float32 as it does.
- ``AutoEncoderNew``: relu(Linear(x)) (no centring), decoder Linear with its own bias.
- ``AutoEncoderTopK``: top-k of relu(Linear(x - b_dec)) per row (its default `encode`; tied scores as
  torch.topk picks them from the relu'd scores, ``topk_ties="torch_relu"``).
- ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE``: at inference (their default `encode`), relu(u) kept where
  relu(u) > threshold, one global threshold: a JumpReLU SAE with every threshold = max(threshold, 0).
  Matryoshka computes u = (x - b_dec) @ W_enc + b_enc with its own W_enc [d_in, d_sae].
- ``JumpReluAutoEncoder``: relu(u * [u > threshold]) with u = x @ W_enc + b_enc; it subtracts b_dec only when
  its `apply_b_dec_to_input` attribute is set (not saved in ae.pt; False after training).
- ``GatedAutoEncoder``: one matmul x_enc = Linear(x - decoder_bias) (no bias); gate x_enc + gate_bias > 0,
  magnitude relu(exp(r_mag) * x_enc + mag_bias).

Classes built on nn.Linear compute their scores as nn.Linear does (`score_order="linear"`), the others as
x @ W + b ("matmul"), with W_enc laid out as the class's constructor lays it out (`w_enc_layout`; an object's
own layout when converting an object), so active sets equal the library's bit for bit. Its loader always builds float32
models; so does ours (pass `dtype=` to load for another). The trainer config's model, layer and submodule
are kept as metadata.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from splinterp.errors import ConfigError, CorruptFileError
from splinterp.io.common import check_floating, get, layout_of, make_config, read_json
from splinterp.sae import SAEConfig

WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
CLASSES = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
           "JumpReluAutoEncoder", "GatedAutoEncoder")
_INT_BUFFERS = ("k", "group_sizes")
_LOADER_LAYOUT = {"AutoEncoder": "row_major", "AutoEncoderNew": "row_major", "AutoEncoderTopK": "row_major",
                  "BatchTopKSAE": "row_major", "GatedAutoEncoder": "row_major", "JumpReluAutoEncoder": "column_major",
                  "MatryoshkaBatchTopKSAE": "column_major"}
"""How each class's constructor lays out its encoder (as W_enc [d_in, d_sae]); its loader copies the state dict
into that module, so a loaded dictionary keeps it: its nn.Linear encoders are built from a transpose (W_enc
row-major, the opposite of a fresh nn.Linear), its W_enc parameters as one (column-major)."""
_TRAINER_META = {"lm_name": "model_name", "layer": "layer", "submodule_name": "submodule_name",
                 "trainer_class": "trainer_class", "norm_factor": "norm_factor"}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A torch.save'd state dict, read with weights_only=True (tensors and plain containers only)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError, KeyError,
            IndexError, TypeError, OSError) as e:
        raise CorruptFileError(
            f"{path} is not a readable weights-only state dict (truncated, corrupt, or holding code?): {e}"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CorruptFileError(f"{path} must hold a state dict (names -> tensors), got {type(sd).__name__}")
    return sd


def _int_buffer(sd: dict[str, torch.Tensor], name: str, source: Any) -> int | None:
    t = sd.get(name)
    if t is None:
        return None
    if t.is_floating_point() or t.numel() != 1:
        raise CorruptFileError(f"{source}: buffer {name!r} must be one integer, got {t.dtype} {tuple(t.shape)}")
    return int(t.item())


def _need(sd: dict[str, torch.Tensor], names: tuple[str, ...], dict_class: str, source: Any) -> None:
    missing = sorted(set(names) - set(sd))
    if missing:
        raise CorruptFileError(f"{source}: a {dict_class} state dict lacks {missing}")
    extra = sorted(set(sd) - set(names) - set(_INT_BUFFERS) - {"threshold"})
    if extra:
        raise CorruptFileError(f"{source}: unexpected weights {extra} in a {dict_class} state dict")


def read_dictionary(dict_class: str, sd: dict[str, torch.Tensor], source: Any, *, k: int | None = None,
                    apply_b_dec_to_input: bool | None = None, normalize_decoder: bool = False,
                    metadata: dict[str, Any] | None = None, layout: str | None = None
                    ) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of a dictionary_learning state dict of class `dict_class`; `layout` of W_enc (default:
    the one its constructor builds)."""
    if dict_class not in CLASSES:
        raise ConfigError(f"{source}: dictionary_learning class {dict_class!r} is not supported (supported: "
                          f"{', '.join(CLASSES)})")
    check_floating(sd, source, skip=_INT_BUFFERS)
    meta = {"source": "dictionary_learning", "dict_class": dict_class, **(metadata or {})}
    sd_k = _int_buffer(sd, "k", source)
    if k is not None and sd_k is not None and k != sd_k:
        raise CorruptFileError(f"{source}: config k={k} but the state dict's k buffer is {sd_k}")
    k = sd_k if k is None else k
    order, apply, arch, k_arch = "linear", True, "relu", None
    if dict_class in ("AutoEncoder", "AutoEncoderNew"):
        bias = "bias" if dict_class == "AutoEncoder" else "decoder.bias"
        _need(sd, ("encoder.weight", "encoder.bias", "decoder.weight", bias), dict_class, source)
        enc_w, enc_b, dec_w = sd["encoder.weight"], sd["encoder.bias"], sd["decoder.weight"]
        if normalize_decoder and dict_class == "AutoEncoder":  # what load_dictionary does, in float32
            enc_w, enc_b, dec_w = enc_w.float(), enc_b.float(), dec_w.float()
            norms = torch.norm(dec_w, dim=0)
            if not torch.allclose(norms, torch.ones_like(norms)):
                dec_w, enc_w, enc_b = dec_w / norms, enc_w * norms[:, None], enc_b * norms
                meta["decoder_normalized_on_load"] = True
        t = {"W_enc": enc_w.T, "b_enc": enc_b, "W_dec": dec_w.T, "b_dec": sd[bias]}
        apply = dict_class == "AutoEncoder"
    elif dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        _need(sd, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), dict_class, source)
        t = {"W_enc": sd["encoder.weight"].T, "b_enc": sd["encoder.bias"], "W_dec": sd["decoder.weight"].T,
             "b_dec": sd["b_dec"]}
        if dict_class == "AutoEncoderTopK":
            if k is None:
                raise CorruptFileError(f"{source}: an AutoEncoderTopK needs k (config.json trainer.k or the k buffer)")
            arch, k_arch = "topk", k
        else:
            arch = "jumprelu"
    elif dict_class == "MatryoshkaBatchTopKSAE":
        _need(sd, ("W_enc", "b_enc", "W_dec", "b_dec"), dict_class, source)
        t = {n: sd[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        order, arch = "matmul", "jumprelu"
        if "group_sizes" in sd:
            meta["group_sizes"] = [int(v) for v in sd["group_sizes"].reshape(-1).tolist()]
    elif dict_class == "JumpReluAutoEncoder":
        _need(sd, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), dict_class, source)
        t = {n: sd[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
        order, arch = "matmul", "jumprelu"
        apply = bool(apply_b_dec_to_input)
    else:  # GatedAutoEncoder
        _need(sd, ("encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"), dict_class,
              source)
        t = {"W_enc": sd["encoder.weight"].T, "W_dec": sd["decoder.weight"].T, "b_dec": sd["decoder_bias"],
             "b_gate": sd["gate_bias"], "b_mag": sd["mag_bias"], "r_mag": sd["r_mag"]}
        arch = "gated"
    if arch == "jumprelu":
        thr = sd.get("threshold")
        if thr is None:
            raise CorruptFileError(f"{source}: a {dict_class} state dict lacks its threshold")
        d_sae = t["b_enc"].shape[0]
        thr = thr.reshape(()).expand(d_sae) if thr.numel() == 1 else thr
        # relu(u) * [relu(u) > t] (or relu(u * [u > t])) is u * [u > max(t, 0)]
        t["threshold"] = thr.clamp(min=0)
        if dict_class in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
            meta["k"] = k  # the batch k it was trained with; inference uses the threshold
    dt = t["W_enc"].dtype
    dtype = str(dt).removeprefix("torch.")
    W = t["W_enc"]
    if W.ndim != 2:
        raise CorruptFileError(f"{source}: the encoder weight has shape {tuple(W.shape)}, not a matrix")
    cfg = make_config(source, d_in=int(W.shape[0]), d_sae=int(W.shape[1]), architecture=arch, k=k_arch,
                      apply_b_dec_to_input=apply, dtype=dtype, metadata=meta, score_order=order,
                      w_enc_layout=layout or _LOADER_LAYOUT[dict_class],
                      topk_ties="torch_relu" if arch == "topk" else "lowest_index")
    return cfg, {n: v.detach().to(dt) for n, v in t.items()}


def read_dictionary_folder(folder: Path) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """A run folder as `dictionary_learning.utils.load_dictionary` reads it (float32, AutoEncoder normalised)."""
    config = read_json(folder / CONFIG_FILE)
    trainer = get(config, "trainer", dict, folder, file=CONFIG_FILE)
    dict_class = get(trainer, "dict_class", str, folder, file=f"{CONFIG_FILE} trainer")
    k = get(trainer, "k", int, folder, default=None, file=f"{CONFIG_FILE} trainer")
    meta = {ours: trainer[key] for key, ours in _TRAINER_META.items() if trainer.get(key) is not None}
    buffer = config.get("buffer")
    if isinstance(buffer, dict):
        if isinstance(buffer.get("ctx_len"), int):
            meta["context_size"] = buffer["ctx_len"]
        if isinstance(buffer.get("io"), str):
            meta["io"] = buffer["io"]
    sd = read_state_dict(folder / WEIGHTS_FILE)
    # its loader builds float32 modules and copies the state dict in
    sd = {n: v.float() if v.is_floating_point() else v for n, v in sd.items()}
    return read_dictionary(dict_class, sd, folder, k=k, normalize_decoder=True, metadata=meta)


def from_dictionary_object(obj: Any) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """A dictionary_learning dictionary in memory, as it is (no decoder normalisation: that is its loader's)."""
    dict_class = type(obj).__name__
    try:
        sd = dict(obj.state_dict())
    except Exception as e:  # a duck-typed object we cannot read
        raise ConfigError(f"cannot read the weights of {dict_class}: {e}") from None
    apply = getattr(obj, "apply_b_dec_to_input", None) if dict_class == "JumpReluAutoEncoder" else None
    w = sd.get("W_enc")
    if w is None and sd.get("encoder.weight") is not None:
        w = sd["encoder.weight"].T
    return read_dictionary(dict_class, sd, f"{dict_class} object", apply_b_dec_to_input=apply,
                           layout=layout_of(w))
