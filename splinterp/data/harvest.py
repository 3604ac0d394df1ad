"""Harvest activations of a Hugging Face transformer into an on-disk cache, at hook points named as
TransformerLens / SAELens name them.

Capture is by plain PyTorch forward hooks on the model's modules (no TransformerLens), so any HF model with a
list of blocks works: BERT (`encoder.layer`), GPT-2 (`h`), GPT-NeoX (`layers`), Llama/Gemma/Mistral
(`model.layers`), ... `find_blocks` locates the list generically.

What to capture (`layers=`): block indices (with `site=`), or TransformerLens hook names
``blocks.L.hook_resid_pre``, ``hook_resid_post``, ``hook_mlp_out``, ``hook_attn_out`` (and, for BERT-style
encoders, ``hook_normalized_resid_post``), several in one forward pass. Each is mapped to the Hugging Face module
whose output (or input) TransformerLens's hook sees, per model family (`HOOK_MODULES`: GPT-2, GPT-NeoX/Pythia,
Llama/Mistral/Qwen2, Gemma, Gemma-2/3, BERT/RoBERTa such as MiniLM). The manifest records, for every cached
tensor, the TransformerLens name next to the Hugging Face module path (`hook_points`), and SAEs trained on it
record both in their metadata (`hook_name`, `hf_hook_name`), as SAELens does.

Layer convention (0-based block index l, L blocks):
- the output of block l = HF ``hidden_states[l + 1]``, except for the last block of pre-LN models (GPT-2, NeoX,
  Llama, Gemma), where HF applies the final norm to ``hidden_states[L]``; we keep the raw block output (the
  residual stream proper, as TransformerLens's ``blocks.{L-1}.hook_resid_post``).
- the input of block l = ``hidden_states[l]`` = ``blocks.l.hook_resid_pre``.
- ``site="resid_post"`` (the integer-layer API) is the block output. For pre-LN models that is
  ``blocks.l.hook_resid_post``; for post-LN BERT-style encoders TransformerLens's ``hook_resid_post`` is the sum
  *before* the block's last LayerNorm and the block output is ``blocks.l.hook_normalized_resid_post``, which is
  what the manifest then records (``blocks.l.hook_resid_post`` can be asked for by name too).
So the paper's "Gemma layer 12" (``hidden_states[12]``) is ``resid_post`` of block 11.

Padding: texts are tokenised one by one and padded here on the tokenizer's `padding_side`, with
`position_ids` derived from the attention mask when the model accepts them, so left and right
padding give the same activations for every real token. "last" picks the last real token of each
text from the mask, which is right for both paddings (the paper's E3 script took
`sum(mask) - 1`, wrong under left padding).

Cache layout (design choice): one safetensors shard per chunk of `shard_tokens` tokens, holding all
requested layers (`layer_<l>` [n, d_model]) plus `token_ids`, `text_ids`, `positions` [n]. Every
layer thus holds the same tokens in the same order (what layer-distance metrics such as AMAD need),
and reading one layer of a shard loads only that tensor. A cached tensor's key `l` is its block index, unless
two requested hook points share a block (say ``blocks.3.hook_mlp_out`` and ``blocks.3.hook_resid_post``):
then the keys are 0, 1, ... in the order the points run. `hook_points` in the manifest maps every key to its
hook (`cache_key(cache, "blocks.3.hook_mlp_out")` looks one up). `manifest.json` (shards with sha256) is
written last; the whole folder is built under a temporary name and renamed into place, so an
interrupted harvest leaves no cache at `out`. Sources: `texts.json` (the texts) and `vocab.json`
(token id -> token string for the ids present) support hover text in plots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
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
    validate_manifest,
)
from splinterp.data.hooks import (  # noqa: F401  (re-exported: the harvest API names them)
    POINTS,
    SITES,
    HookCapture,
    HookPoint,
    _StopForward,
    cache_key,
    cache_keys,
    model_family,
    resolve_hook_points,
    sae_metadata,
)
from splinterp.data.models import (  # noqa: F401  (re-exported: the harvest API names them)
    MINILM_NAME,
    TOKEN_SELECTIONS,
    find_blocks,
    load_model,
    model_inputs,
    normalise_layers,
    offline_model_path,
    select_tokens,
    tokenize_batch,
)
from splinterp.errors import ConfigError, EmptyDataError, NonFiniteError, OverwriteError, ShapeError
from splinterp.validation import all_finite, check_data, check_device, check_positive_int

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------ harvest
@dataclass
class HarvestConfig:
    """What `harvest` did, recorded in the manifest so a cache says how it was made."""

    layers: list[int]
    """The cache keys: block indices, or 0, 1, ... when two hook points share a block (see `hook_names`)."""
    site: str = "resid_post"
    """What was captured at integer layers: resid_post, resid_pre, mlp_out or attn_out ('hook_points' when the
    layers were given as hook names)."""
    hook_names: list[str] = field(default_factory=list)
    """The TransformerLens hook name of each key, in the order of `layers`."""
    dataset: str | None = None
    """What the texts are (a data set name), as the caller said; SAEs trained on the cache record it."""
    token_selection: str = "all"
    """'all' real tokens, or the 'last' real token of each text."""
    drop_special_tokens: bool = False
    """Whether [CLS]/[SEP]/<bos> positions were left out."""
    max_length: int = 128
    """Tokens per text (longer texts were truncated)."""
    batch_size: int = 32
    """Texts per forward pass."""
    dtype: str = "float32"
    """Storage dtype of the cached activations (the model ran in its own dtype)."""
    shard_tokens: int = 8192
    """Tokens per shard file."""
    padding_side: str = "right"
    """Side the texts were padded on ('left' or 'right'; activations of real tokens do not depend on it)."""
    sort_by_length: bool = True
    """Texts batched by similar length (less padding); tokens are stored in that order."""
    seed: int = 0
    """Seed of the default texts' shuffle."""
    device: str = "cpu"
    """Device the model ran on."""

    def __post_init__(self) -> None:
        if self.site not in (*SITES, "hook_points"):  # "hook_points": layers named hook by hook
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


CACHE_SIDE_FILES = ("texts.json", "vocab.json")


def _check_out(out: str | os.PathLike, overwrite: bool) -> Path:
    """`out` if a cache may be written there: new, empty, or (overwrite=True) a cache of ours and nothing else.

    The cache replaces the folder whole, so a folder that is not a cache, or a cache with other files in it,
    is refused even with overwrite=True: a user's files are never deleted.
    """
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OverwriteError(f"out={str(out)!r} exists and is not a folder; refusing to replace it with a cache")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise OverwriteError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    try:
        manifest = validate_manifest(json.loads((out / MANIFEST).read_text("utf-8")), str(out / MANIFEST))
    except (OSError, ValueError, RecursionError):  # missing, unreadable, not JSON, not a cache manifest
        raise OverwriteError(
            f"out={str(out)!r} is not an activation cache (no valid {MANIFEST}): overwrite=True replaces only a "
            f"cache of splinterp's or an empty folder, never other files. Choose a new folder."
        ) from None
    own = {MANIFEST, *CACHE_SIDE_FILES} | {sh["file"] for sh in manifest["shards"]}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in own)
    if foreign:
        raise OverwriteError(
            f"out={str(out)!r} is a cache but also holds other files ({', '.join(foreign[:5])}); overwrite=True would "
            f"delete them with it. Move them, or choose a new folder."
        )
    return out


def _manifest_head() -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "format_version": CACHE_FORMAT_VERSION, "splinterp_version": __version__}


def max_positions(model: Any) -> int | None:
    """The longest input the model embeds (learned absolute positions), None when its config sets no limit."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


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

    if model_name is not None and not isinstance(model_name, str):
        raise ConfigError(f"model_name must be a string or None, got {model_name!r}")
    if not isinstance(site, str):
        raise ConfigError(f"site must be a string, got {site!r}")
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
            raise ConfigError(f"metadata must be a dict with string keys, got {type(metadata).__name__}")
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"metadata must hold JSON values (finite numbers, strings, lists, dicts): {e}") from None

    def index(t: torch.Tensor | None, default: torch.Tensor, name: str) -> torch.Tensor:
        if t is None:
            return default
        try:
            t = torch.as_tensor(t)
        except (TypeError, ValueError, RuntimeError):
            raise ShapeError(f"{name} must be an integer tensor [N={n}], got {type(t).__name__}") from None
        if t.shape != (n,) or t.is_floating_point():
            raise ShapeError(f"{name} must be an integer tensor [N={n}], got {tuple(t.shape)} {t.dtype}")
        return t.long()

    rows, storages = {}, set()
    for v in layer_ids:
        t = to_storage(acts[v], dtype, f"acts[{v}]")
        ptr = t.untyped_storage().data_ptr()
        rows[f"layer_{v}"] = t.clone() if ptr in storages else t  # one tensor given for two layers: own copies
        storages.add(ptr)
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
    layers: int | Sequence[int | str] | str = "all",
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
    dataset: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
):
    """Run `model` over `texts` and cache the activations `layers` names at `out`, all in one forward pass.

    model: None (offline all-MiniLM-L6-v2), an HF id or folder, or a loaded (model, tokenizer) pair
    (moved to `device`). texts: list of strings, or None = `offline_texts()` (CPython docs).
    layers: block indices (captured at `site`: resid_post, resid_pre, mlp_out, attn_out), "all", or
    TransformerLens hook names ("blocks.3.hook_resid_post", "blocks.3.hook_mlp_out", ...), or a list mixing them
    (see the module docstring for the mapping and the layer convention; `cache_key` finds a name's key).
    token_selection: "all" real tokens (padding dropped; also special tokens such as [CLS]/[SEP]/<bos>
    if `drop_special_tokens`) or "last" real token of each text. dtype: storage dtype of the cache
    (the model runs in its own dtype). sort_by_length: batch texts of similar token length together
    (less padding, faster); tokens are then stored in that order, and `text_ids` still index `texts`.
    dataset: a name for the texts, recorded (SAEs trained on the cache keep it as `dataset_path`).
    overwrite: replace `out` if it is a cache of ours (never a folder holding anything else).
    Returns the opened `ActivationCache`.
    """
    dev = torch.device(check_device(device))
    out = _check_out(out, overwrite)
    if dataset is not None and not isinstance(dataset, str):
        raise ConfigError(f"dataset must be a string (a name for the texts), got {dataset!r}")
    # a checkpoint without some weights (a pooler, a head) gets them initialised from torch's global generator:
    # seeded for reproducible runs, and the caller's random stream restored afterwards
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        mod, tok, name = load_model(model, dev)
    positions = max_positions(mod)  # texts longer than this would fail inside the model with an index error
    block_name, block_list = find_blocks(mod, blocks)
    points = resolve_hook_points(mod, block_name, len(block_list), layers, site)
    keys = cache_keys(points)
    by_name = not all(isinstance(v, int) for v in (layers if isinstance(layers, (list, tuple)) else [layers])) \
        and layers != "all"
    cfg = HarvestConfig(layers=keys, site="hook_points" if by_name else site,
                        hook_names=[h.hook_name for h in points], dataset=dataset, token_selection=token_selection,
                        drop_special_tokens=drop_special_tokens, max_length=max_length, batch_size=batch_size,
                        dtype=dtype, shard_tokens=shard_tokens, sort_by_length=sort_by_length,
                        padding_side=padding_side or getattr(tok, "padding_side", "right"), seed=seed,
                        device=str(dev))
    texts, text_source = resolve_texts(texts, seed)

    t0 = time.perf_counter()
    d_model = None
    vocab_ids: set[int] = set()
    with atomic_dir(out) as tmp:
        writer = _ShardWriter(tmp, keys, shard_tokens)
        order = _length_order(tok, texts, max_length) if sort_by_length else list(range(len(texts)))
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        bar = tqdm(batches, desc=f"harvest {Path(str(name)).name}", unit="batch", disable=not progress)
        with torch.no_grad(), HookCapture(mod, points, keys, stop_early=True) as cap:
            for batch_idx in bar:
                chunk = [texts[i] for i in batch_idx]
                text_index = torch.tensor(batch_idx, dtype=torch.long)
                batch = tokenize_batch(tok, chunk, max_length, drop_special_tokens, cfg.padding_side)
                if positions is not None and batch["input_ids"].shape[1] > positions:
                    lengths = batch["attention_mask"].sum(1)
                    i = int(lengths.argmax())
                    raise ConfigError(f"text {batch_idx[i]} has {int(lengths[i])} tokens (max_length={max_length}), "
                                      f"more than the {positions} positions model {name!r} has; use max_length <= "
                                      f"{positions}")
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
                for key, hp in zip(keys, points):
                    h = cap.acts[key][keep.to(cap.acts[key].device)].float().cpu()
                    if not all_finite(h):
                        bad = int((~torch.isfinite(h)).any(-1).nonzero()[0, 0])
                        text_i = int(text_index[keep.nonzero()[bad, 0]])
                        raise NonFiniteError(f"non-finite activation at {hp.hook_name}, text {text_i}")
                    if d_model is not None and h.shape[-1] != d_model:
                        raise ShapeError(f"{hp.hook_name} has width {h.shape[-1]}, the other hook points "
                                         f"{d_model}: harvest them into separate caches")
                    d_model = h.shape[-1]
                    rows[f"layer_{key}"] = to_storage(h, dtype, f"the activations at {hp.hook_name}")
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
            "model_family": model_family(mod),
            "block_list": block_name,
            "n_blocks": len(block_list),
            "layers": keys,
            "site": cfg.site,
            "site_convention": "blocks.l.hook_resid_post = output of block l = HF hidden_states[l+1] (raw block "
                               "output, before any final norm; for post-LN BERT-style encoders TransformerLens calls "
                               "the block output hook_normalized_resid_post); blocks.l.hook_resid_pre = input of "
                               "block l = hidden_states[l]",
            "hook_names": {str(k): h.hook_name for k, h in zip(keys, points)},
            "hf_hook_names": {str(k): h.module for k, h in zip(keys, points)},
            "hook_points": {str(k): h.record() for k, h in zip(keys, points)},
            "dataset": dataset,
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
    log.info("harvested %d tokens x %d hook points (d_model=%s) from %d texts in %.1fs into %s",
             writer.n_written, len(keys), d_model, len(texts), elapsed, out)
    return ActivationCache.open(out)
