"""Model-level SAE evals: splice the SAE into the residual stream and see what the model loses.

Splicing: a forward hook on block `layer` replaces that block's output hidden state h (the
``resid_post`` site of `splinterp.data.harvest`) by sae(h) on every real (non-padding) token;
zero-ablation replaces it by zeros. If the SAE was trained on standardised activations pass the
`standardizer`: the hook then computes inverse(sae(transform(h))).

Causal LMs (SAELens / SAEBench names and formulas), over next-token predictions t -> t+1 where both
tokens are real:
- ``ce_loss_without_sae``, ``ce_loss_with_sae``, ``ce_loss_with_ablation``: mean next-token cross-entropy;
- ``ce_loss_score`` = (CE_ablation - CE_sae) / (CE_ablation - CE_clean) (1 = lossless, 0 = as bad as
  zero-ablation);
- ``kl_div_with_sae``, ``kl_div_with_ablation``: mean KL(p_clean || p_spliced) of the next-token
  distribution; ``kl_div_score`` = (KL_ablation - KL_sae) / KL_ablation.

Encoders without an LM head (the offline MiniLM): `embedding_loss_score` measures the same thing on
the model's sentence embedding (mean-pooled last hidden state over real tokens, L2-normalised as
sentence-transformers does), with distance "mse" (mean squared difference per embedding coordinate)
or "cos" (1 - cosine), clean vs SAE vs ablation:
``emb_loss_score`` = (D_ablation - D_sae) / D_ablation, D = distance to the clean embedding. It is a
stand-in for loss recovered, not comparable with CE numbers.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from splinterp.data.harvest import find_blocks, load_model, model_inputs, tokenize_batch
from splinterp.errors import ConfigError, EmptyDataError, ShapeError

log = logging.getLogger(__name__)

EMBEDDING_METRICS = ("mse", "cos")


def _is_tokenizer(obj: Any) -> bool:
    return callable(obj) and not isinstance(obj, (torch.Tensor, dict, list, tuple)) and \
        hasattr(obj, "convert_ids_to_tokens")


def _as_batch(b: Any) -> dict[str, torch.Tensor]:
    """A token-id batch: tensor [B, T] (all real) or dict with input_ids (+ attention_mask)."""
    if isinstance(b, torch.Tensor):
        b = {"input_ids": b}
    if not isinstance(b, dict) or "input_ids" not in b:
        raise ConfigError("each batch must be a LongTensor [B, T] of token ids or a dict with 'input_ids'")
    ids = torch.as_tensor(b["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ShapeError(f"input_ids must be an integer tensor [B, T], got {tuple(ids.shape)} {ids.dtype}")
    mask = torch.as_tensor(b.get("attention_mask", torch.ones_like(ids))).reshape(ids.shape).long()
    return {"input_ids": ids.long(), "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def _prepare(
    model: Any, tokenizer_or_batches: Any, texts: Sequence[str] | None, n_texts: int, max_length: int,
    batch_size: int, device: str | torch.device, seed: int, causal_lm: bool,
) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    """Resolve the model (module, HF id/folder, or (model, tokenizer)) and turn the input into batches."""
    tok = None
    if isinstance(model, nn.Module):
        mod = model.to(torch.device(device))
    else:
        mod, tok, _ = load_model(model, device, causal_lm=causal_lm)
    src = tokenizer_or_batches if tokenizer_or_batches is not None else tok
    if src is None:
        raise ConfigError("pass a tokenizer or token-id batches")
    if _is_tokenizer(src):
        if texts is None:
            from splinterp.data.text import offline_texts

            texts = offline_texts(n=n_texts, seed=seed)
        texts = list(texts)
        batches = [tokenize_batch(src, texts[s:s + batch_size], max_length)
                   for s in range(0, len(texts), batch_size)]
    elif isinstance(src, (torch.Tensor, dict)):
        batches = [_as_batch(src)]
    elif isinstance(src, Iterable):
        batches = [_as_batch(b) for b in src]
    else:
        raise ConfigError(f"tokenizer_or_batches must be a tokenizer, a tensor, a dict or batches; got "
                          f"{type(src).__name__}")
    if not batches:
        raise EmptyDataError("no batches to evaluate on")
    return mod, batches


def _replace_hidden(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + output[1:]
    if isinstance(output, list):
        return [new] + output[1:]
    raise ShapeError(f"cannot replace the hidden state in a block output of type {type(output).__name__}")


@contextlib.contextmanager
def splice(block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the context, block's output hidden state h [B, T, d] is replaced by fn(h)."""

    def hook(m: nn.Module, args: Any, output: Any) -> Any:
        h = output if isinstance(output, torch.Tensor) else output[0]
        return _replace_hidden(output, fn(h))

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_replacement(sae: nn.Module, standardizer: Any | None = None,
                    mask: Callable[[], torch.Tensor | None] = lambda: None) -> Callable[[torch.Tensor], torch.Tensor]:
    """fn(h) = h with every real token's vector replaced by its SAE reconstruction (in h's dtype)."""
    d_in = sae.cfg.d_in

    def fn(h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != d_in:
            raise ShapeError(f"the SAE has d_in={d_in} but the spliced hidden state has width {h.shape[-1]}")
        m = mask()
        keep = torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device) if m is None else m.bool().to(h.device)
        x = h[keep].to(device=sae.device, dtype=sae.dtype)
        if standardizer is not None:
            x = standardizer.inverse_transform(sae(standardizer.transform(x)))
        else:
            x = sae(x)
        out = h.clone()
        out[keep] = x.to(device=h.device, dtype=h.dtype)
        return out

    return fn


def _logits(out: Any) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ConfigError("the model returns no logits (no LM head): load it with AutoModelForCausalLM, or use "
                          "embedding_loss_score for encoders such as MiniLM")
    return logits


def _run_three(model: nn.Module, batches: list[dict[str, torch.Tensor]], sae: nn.Module, layer: int,
               standardizer: Any, blocks: str | None, progress: bool, desc: str,
               per_batch: Callable[[dict[str, torch.Tensor], Any, Any, Any], None]) -> None:
    """For each batch run the model clean, with the SAE spliced in, and zero-ablated; hand the outputs on."""
    _, block_list = find_blocks(model, blocks)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(block_list):
        raise ConfigError(f"layer must be a block index in [0, {len(block_list)}), got {layer!r}")
    block = block_list[layer]
    dev = next(model.parameters()).device
    current: dict[str, torch.Tensor] = {}
    sae_fn = sae_replacement(sae, standardizer, mask=lambda: current.get("attention_mask"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in tqdm(batches, desc=desc, unit="batch", disable=not progress):
                current["attention_mask"] = b["attention_mask"]
                inputs = model_inputs(model, b, dev)
                clean = model(**inputs)
                with splice(block, sae_fn):
                    spliced = model(**inputs)
                with splice(block, torch.zeros_like):
                    ablated = model(**inputs)
                per_batch(b, clean, spliced, ablated)
    finally:
        model.train(was_training)


def _score(worst: float, got: float, best: float) -> float:
    den = worst - best
    if den == 0 or not math.isfinite(den):
        log.warning("score undefined: ablation and clean values are equal (%s)", worst)
        return float("nan")
    return (worst - got) / den


def ce_loss_score(
    model: Any,
    tokenizer_or_batches: Any,
    sae: nn.Module,
    layer: int,
    *,
    texts: Sequence[str] | None = None,
    n_texts: int = 64,
    max_length: int = 128,
    batch_size: int = 8,
    standardizer: Any | None = None,
    blocks: str | None = None,
    include_kl: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Loss recovered of a causal LM with `sae` spliced after block `layer` (see the module docstring).

    model: a causal-LM module (with `.logits`), an HF id/folder or a (model, tokenizer) pair.
    tokenizer_or_batches: a tokenizer (then `texts`, default `offline_texts(n_texts)`), a LongTensor
    [B, T] of token ids, a dict with input_ids/attention_mask, or an iterable of those.
    Returns ce_loss_without_sae / with_sae / with_ablation / score (and the kl_div_* keys if include_kl),
    plus n_tokens (number of predictions averaged over).
    """
    if model is None:
        raise ConfigError("the offline model (MiniLM) has no LM head: use embedding_loss_score, or pass a causal LM")
    mod, batches = _prepare(model, tokenizer_or_batches, texts, n_texts, max_length, batch_size, device,
                            seed, causal_lm=True)
    tot = {"clean": 0.0, "sae": 0.0, "abl": 0.0, "kl_sae": 0.0, "kl_abl": 0.0}
    count = 0

    def per_batch(b: dict[str, torch.Tensor], clean: Any, spliced: Any, ablated: Any) -> None:
        nonlocal count
        ids = b["input_ids"]
        valid = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()
        targets = ids[:, 1:][valid]
        lp = {}
        for name, out in (("clean", clean), ("sae", spliced), ("abl", ablated)):
            logits = _logits(out)[:, :-1].float().cpu()[valid]
            lp[name] = F.log_softmax(logits, -1)
            tot[name] += float(F.nll_loss(lp[name], targets, reduction="sum"))
        if include_kl:
            p = lp["clean"].exp()
            for name in ("sae", "abl"):
                tot[f"kl_{name}"] += float((p * (lp["clean"] - lp[name])).sum())
        count += int(valid.sum())

    _run_three(mod, batches, sae, layer, standardizer, blocks, progress, "ce_loss_score", per_batch)
    if count == 0:
        raise EmptyDataError("no next-token predictions (every sequence shorter than 2 real tokens)")
    ce = {k: tot[k] / count for k in ("clean", "sae", "abl")}
    res = {
        "ce_loss_without_sae": ce["clean"],
        "ce_loss_with_sae": ce["sae"],
        "ce_loss_with_ablation": ce["abl"],
        "ce_loss_score": _score(ce["abl"], ce["sae"], ce["clean"]),
    }
    if include_kl:
        kl_sae, kl_abl = tot["kl_sae"] / count, tot["kl_abl"] / count
        res.update({"kl_div_with_sae": kl_sae, "kl_div_with_ablation": kl_abl,
                    "kl_div_score": _score(kl_abl, kl_sae, 0.0)})
    res["n_tokens"] = count
    return res


def kl_div_score(model: Any, tokenizer_or_batches: Any, sae: nn.Module, layer: int, **kwargs: Any) -> dict[str, float]:
    """The KL keys of `ce_loss_score` (kl_div_with_sae, kl_div_with_ablation, kl_div_score, n_tokens)."""
    res = ce_loss_score(model, tokenizer_or_batches, sae, layer, include_kl=True, **kwargs)
    return {k: v for k, v in res.items() if k.startswith("kl_div") or k == "n_tokens"}


def sentence_embedding(last_hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Mean over real tokens of the last hidden state, L2-normalised (sentence-transformers pooling)."""
    m = attention_mask.to(last_hidden.device, last_hidden.dtype)[..., None]
    emb = (last_hidden * m).sum(1) / m.sum(1).clamp(min=1)
    return F.normalize(emb, dim=-1) if normalize else emb


def embedding_loss_score(
    model: Any,
    tokenizer_or_batches: Any,
    sae: nn.Module,
    layer: int,
    *,
    metric: str = "mse",
    normalize: bool = True,
    texts: Sequence[str] | None = None,
    n_texts: int = 64,
    max_length: int = 128,
    batch_size: int = 16,
    standardizer: Any | None = None,
    blocks: str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float | str]:
    """Embedding analogue of loss recovered, for encoders without an LM head (MiniLM; model=None loads it).

    Returns emb_loss_without_sae (0 by definition), emb_loss_with_sae, emb_loss_with_ablation,
    emb_loss_score = (D_abl - D_sae) / D_abl, metric, n_texts.
    """
    if metric not in EMBEDDING_METRICS:
        raise ConfigError(f"metric must be one of {EMBEDDING_METRICS}, got {metric!r}")
    mod, batches = _prepare(model, tokenizer_or_batches, texts, n_texts, max_length, batch_size, device,
                            seed, causal_lm=False)
    tot = {"sae": 0.0, "abl": 0.0}
    count = 0

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if metric == "mse":
            return ((a - b) ** 2).mean(-1)
        return 1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)

    def per_batch(b: dict[str, torch.Tensor], clean: Any, spliced: Any, ablated: Any) -> None:
        nonlocal count
        emb = {}
        for name, out in (("clean", clean), ("sae", spliced), ("abl", ablated)):
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            emb[name] = sentence_embedding(hidden.float().cpu(), b["attention_mask"], normalize)
        for name in ("sae", "abl"):
            tot[name] += float(dist(emb["clean"], emb[name]).sum())
        count += emb["clean"].shape[0]

    _run_three(mod, batches, sae, layer, standardizer, blocks, progress, "embedding_loss_score", per_batch)
    d_sae, d_abl = tot["sae"] / count, tot["abl"] / count
    return {
        "emb_loss_without_sae": 0.0,
        "emb_loss_with_sae": d_sae,
        "emb_loss_with_ablation": d_abl,
        "emb_loss_score": _score(d_abl, d_sae, 0.0),
        "metric": metric,
        "n_texts": count,
    }
