"""Where activations are captured: TransformerLens / SAELens hook names (``blocks.L.hook_resid_post``, ...)
mapped to the Hugging Face module whose output (or input) TransformerLens's hook sees, per model family, and
the forward hooks that capture them (`HookCapture`).

Layer convention (0-based block index l, L blocks):
- the output of block l = HF ``hidden_states[l + 1]``, except for the last block of pre-LN models (GPT-2, NeoX,
  Llama, Gemma), where HF applies the final norm to ``hidden_states[L]``; we keep the raw block output (the
  residual stream proper, as TransformerLens's ``blocks.{L-1}.hook_resid_post``).
- the input of block l = ``hidden_states[l]`` = ``blocks.l.hook_resid_pre``.
- ``site="resid_post"`` (the integer-layer API) is the block output. For pre-LN models that is
  ``blocks.l.hook_resid_post``; for post-LN BERT-style encoders TransformerLens's ``hook_resid_post`` is the sum
  *before* the block's last LayerNorm and the block output is ``blocks.l.hook_normalized_resid_post``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splinterp.data.cache import ActivationCache
from splinterp.data.models import normalise_layers
from splinterp.errors import ConfigError, ShapeError

SITES = ("resid_post", "resid_pre", "mlp_out", "attn_out")
"""What `site=` captures at each integer layer: the block output, the block input, or the MLP / attention output
(the additive contribution to the residual stream, as TransformerLens's hook_mlp_out / hook_attn_out)."""
POINTS = ("resid_pre", "attn_out", "mlp_out", "resid_post", "normalized_resid_post")
"""TransformerLens hook points (`blocks.L.hook_<point>`) that `harvest` captures, in the order a block runs them."""


HOOK_MODULES: dict[str, dict[str, tuple[str, str]]] = {
    "gpt2": {"attn_out": ("attn", "output"), "mlp_out": ("mlp", "output")},
    "gpt_neox": {"attn_out": ("attention", "output"), "mlp_out": ("mlp", "output")},
    "llama": {"attn_out": ("self_attn", "output"), "mlp_out": ("mlp", "output")},
    "gemma": {"attn_out": ("self_attn", "output"), "mlp_out": ("mlp", "output")},
    # Gemma-2/3 normalise each sublayer's output before adding it: TransformerLens hooks after that norm
    "gemma2": {"attn_out": ("post_attention_layernorm", "output"), "mlp_out": ("post_feedforward_layernorm", "output")},
    # post-LN encoders: TransformerLens's resid_post is the sum before the block's last LayerNorm
    "bert": {"attn_out": ("attention.output.dense", "output"), "mlp_out": ("output.dense", "output"),
             "resid_post": ("output.LayerNorm", "input"), "normalized_resid_post": ("", "output")},
}
"""Per model family: the module (relative to the block) whose output or input TransformerLens's hook point
sees. resid_pre is the block's input and (pre-LN families) resid_post the block's output everywhere."""
_FAMILIES = {"gpt2": "gpt2", "gpt_neox": "gpt_neox", "llama": "llama", "mistral": "llama", "qwen2": "llama",
             "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma2", "gemma3_text": "gemma2", "bert": "bert",
             "roberta": "bert", "xlm-roberta": "bert", "distilbert": None}
_TL_NAME = re.compile(r"blocks\.(-?\d+)\.hook_([a-z_]+)")


def model_family(model: nn.Module) -> str | None:
    """The family key of HOOK_MODULES for an HF model (its config.model_type), None when not mapped."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _FAMILIES.get(model_type) if isinstance(model_type, str) else None


@dataclass(frozen=True)
class HookPoint:
    """One tensor to capture: TransformerLens's `blocks.{block}.hook_{point}` = the output (or input) of the
    Hugging Face module `module` (a dotted path from the model's root)."""

    block: int
    point: str
    module: str
    io: str

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.block}.hook_{self.point}"

    def record(self) -> dict[str, Any]:
        return {"hook_name": self.hook_name, "hf_hook_name": self.module, "hf_io": self.io, "block": self.block,
                "point": self.point}


def hook_point(model: nn.Module, block_name: str, n_blocks: int, block: int, point: str) -> HookPoint:
    """The HookPoint of `blocks.{block}.hook_{point}` in `model` (ConfigError when the family does not map it)."""
    if point not in POINTS:
        raise ConfigError(f"layers: blocks.{block}.hook_{point} is not a hook point harvest captures (hook_"
                          f"{', hook_'.join(POINTS)})")
    if not -n_blocks <= block < n_blocks:
        raise ConfigError(f"layers: block {block} out of range for a model with {n_blocks} blocks")
    block %= n_blocks
    base = f"{block_name}.{block}"
    fam = model_family(model)
    table = HOOK_MODULES.get(fam or "", {})
    if point == "resid_pre":
        return HookPoint(block, point, base, "input")
    if point in table:
        sub, io = table[point]
        path = f"{base}.{sub}" if sub else base
    elif point == "resid_post" and fam != "bert":
        path, io = base, "output"  # pre-LN blocks: the block's output is the residual stream
    else:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ConfigError(
            f"layers: hook_{point} is not mapped for model type {model_type!r} (mapped: {sorted(HOOK_MODULES)}); "
            f"hook_resid_pre and hook_resid_post of pre-LN models work for any model"
        )
    try:
        model.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"layers: {HookPoint(block, point, path, io).hook_name} should be module {path!r}, "
                          f"which this {type(model).__name__} does not have") from None
    return HookPoint(block, point, path, io)


def resolve_hook_points(model: nn.Module, block_name: str, n_blocks: int, layers: Any, site: str) -> list[HookPoint]:
    """The hook points `layers` asks for: block indices (captured at `site`), 'all', TransformerLens hook names
    (`blocks.L.hook_resid_post`, ...), or a list mixing them; unique, in the order the forward pass runs them."""
    if site not in SITES:
        raise ConfigError(f"site must be one of {SITES}, got {site!r}")
    items = layers if isinstance(layers, (list, tuple)) else [layers]
    if isinstance(layers, str) and layers == "all":
        items = list(range(n_blocks))
    if not items:
        raise ConfigError("layers is empty")
    # site="resid_post" is the block output: for post-LN encoders that is TransformerLens's normalized_resid_post
    site_point = "normalized_resid_post" if site == "resid_post" and model_family(model) == "bert" else site
    points: dict[str, HookPoint] = {}
    for item in items:
        if isinstance(item, str):
            m = _TL_NAME.fullmatch(item)
            if not m:
                raise ConfigError(f"layers: {item!r} is not a TransformerLens hook name like "
                                  f"'blocks.3.hook_resid_post' (nor 'all')")
            hp = hook_point(model, block_name, n_blocks, int(m.group(1)), m.group(2))
        else:
            (block,) = normalise_layers([item], n_blocks)
            hp = hook_point(model, block_name, n_blocks, block, site_point)
        points.setdefault(hp.hook_name, hp)
    return sorted(points.values(), key=lambda h: (h.block, POINTS.index(h.point)))


def cache_keys(points: Sequence[HookPoint]) -> list[int]:
    """The cache key of each hook point: its block index, or 0, 1, ... when two points share a block."""
    blocks = [h.block for h in points]
    return blocks if len(set(blocks)) == len(blocks) else list(range(len(points)))


def cache_key(cache: ActivationCache, hook_name: str) -> int:
    """The cache key (`cache.load(key)`) of a TransformerLens hook name in a harvested cache."""
    points = cache.manifest.get("hook_points") or {}
    for key, rec in points.items():
        if isinstance(rec, dict) and rec.get("hook_name") == hook_name:
            return int(key)
    names = sorted(rec.get("hook_name") for rec in points.values() if isinstance(rec, dict))
    raise ConfigError(f"{hook_name!r} is not in this cache (it holds {names})")


def sae_metadata(cache: ActivationCache, key: int) -> dict[str, Any]:
    """What an SAE trained on `cache.load(key)` should record, under SAELens's metadata keys: `model_name`,
    `hook_name` (TransformerLens's name: what HookedSAETransformer splices on), `hf_hook_name` (the Hugging Face
    module), `dataset_path` (the harvest's `dataset`, else its text source) and `context_size` (max tokens per
    text). Caches written by `write_cache` know only what their caller gave."""
    m = cache.manifest
    if key not in cache.layers:
        raise ConfigError(f"key {key!r} is not in this cache (it holds {cache.layers})")
    meta = {"model_name": m.get("model_name"), "hook_name": (m.get("hook_names") or {}).get(str(key)),
            "hf_hook_name": (m.get("hf_hook_names") or {}).get(str(key)),
            "dataset_path": m.get("dataset") or m.get("text_source"), "context_size": m.get("max_length")}
    return {k: v for k, v in meta.items() if v is not None}


def _hidden_of(output: Any) -> torch.Tensor:
    """The hidden state in a module's output (a tensor, or the first item of a tuple / ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ShapeError(f"cannot find the hidden state in a module output of type {type(output).__name__}")


class _StopForward(Exception):
    """Raised by the hook that completes the capture: the rest of the model is not run."""


class HookCapture:
    """Context manager: record each hook point's tensor [B, T, d] on every forward (keys as given)."""

    def __init__(self, model: nn.Module, points: Sequence[HookPoint], keys: Sequence[int], stop_early: bool = False):
        self.model, self.points, self.keys, self.stop_early = model, list(points), list(keys), stop_early
        self.acts: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _record(self, key: int, hidden: torch.Tensor) -> None:
        self.acts[key] = hidden.detach()
        if self.stop_early and len(self.acts) == len(self.keys):
            raise _StopForward

    def __enter__(self) -> HookCapture:
        for key, hp in zip(self.keys, self.points):
            mod = self.model.get_submodule(hp.module)
            if hp.io == "output":
                h = mod.register_forward_hook(lambda m, a, o, key=key: self._record(key, _hidden_of(o)))
            else:
                def pre(m, args, kwargs, key=key):
                    hs = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
                    if not isinstance(hs, torch.Tensor):
                        raise ShapeError("cannot find the hidden state in the module's inputs")
                    self._record(key, hs)
                h = mod.register_forward_pre_hook(pre, with_kwargs=True)
            self._handles.append(h)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
