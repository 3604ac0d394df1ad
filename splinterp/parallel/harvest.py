"""Sharded harvesting: every rank runs the model on its slice of the texts, rank 0 merges the shards.

Steps (each a function below, each agreed on by every rank so that no rank waits forever on a failed one):
1. rank 0 checks the output folder and makes a staging folder next to it (`_make_stage`);
2. rank r harvests the r-th contiguous slice of the texts into `stage/rank<r>` (`_harvest_slice`);
3. every rank rewrites its shards under their global names, with `text_ids` into the full text list
   (`_renumber`);
4. rank 0 writes one manifest over all shards, built under a temporary name and renamed into place, so an
   interrupted run leaves no cache at `out` (`_merge`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from splinterp.atomic import atomic_dir, write_bytes, write_json
from splinterp.data.cache import MANIFEST, ActivationCache, validate_manifest
from splinterp.errors import EmptyDataError, OverwriteError
from splinterp.parallel.group import broadcast_from_rank0, is_initialized, rank_world, run_agreed

log = logging.getLogger(__name__)

_NOTHING = {"n_tokens": 0, "shards": [], "manifest": None, "vocab": {}}


def _make_stage(out: Path, overwrite: bool) -> str:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OverwriteError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.harvest-{uuid.uuid4().hex[:12]}.tmp"
    stage.mkdir()
    return str(stage)


def _harvest_slice(model, texts: Sequence[str], layers, folder: Path, *, seed: int, device, progress: bool,
                   **harvest_kwargs) -> dict[str, Any]:
    """Harvest one rank's texts into `folder`; what the merge needs of it (nothing when no token came out)."""
    from splinterp.data.harvest import harvest

    if not texts:
        return dict(_NOTHING)
    try:
        cache = harvest(model, texts, layers, folder, save_texts=False, seed=seed, device=device, progress=progress,
                        **harvest_kwargs)
    except EmptyDataError:  # no tokens selected from this rank's texts
        return dict(_NOTHING)
    vocab_path = folder / "vocab.json"
    vocab = json.loads(vocab_path.read_text("utf-8")) if vocab_path.is_file() else {}
    return {"n_tokens": cache.n_tokens, "shards": cache.shards, "manifest": cache.manifest, "vocab": vocab}


def _renumber(part: dict[str, Any], folder: Path, stage: Path, first_text: int, first_token: int,
              first_shard: int) -> list[dict[str, Any]]:
    """Rewrite one rank's shards as stage/shard_<global index>, token and text indices made global."""
    from safetensors.torch import load_file
    from safetensors.torch import save as st_save

    entries = []
    for j, s in enumerate(part["shards"]):
        t = load_file(str(folder / s["file"]))
        t["text_ids"] = t["text_ids"] + first_text
        start = first_token + s["start"]
        data = st_save(t, metadata={"format": "pt", "start": str(start)})
        name = f"shard_{first_shard + j:05d}.safetensors"
        write_bytes(stage / name, data)
        entries.append({"file": name, "n_tokens": s["n_tokens"], "start": start,
                        "sha256": hashlib.sha256(data).hexdigest()})
        (folder / s["file"]).unlink()
    return entries


def _merge(out: Path, stage: Path, everything: list[dict[str, Any]], texts: list[str], text_source: Any,
           save_texts: bool, bounds: list[int]) -> None:
    """Rank 0: one manifest over every rank's shards, written into `out` atomically (manifest last)."""
    shards = [e for p in everything for e in p["entries"]]
    manifests = [p["manifest"] for p in everything if p["manifest"] is not None]
    vocab: dict[str, str] = {}
    for p in everything:
        vocab.update(p["vocab"])
    manifest = {k: v for k, v in manifests[0].items() if k != "shards"}
    world = len(everything)
    manifest.update(
        n_tokens=sum(s["n_tokens"] for s in shards), n_texts=len(texts), text_source=text_source,
        has_texts=save_texts, has_vocab=bool(vocab), shards=shards,
        elapsed_s=max(m["elapsed_s"] for m in manifests),
        distributed={"world_size": world, "rank_tokens": [p["n_tokens"] for p in everything],
                     "rank_text_ranges": [[bounds[r], bounds[r + 1]] for r in range(world)]})
    validate_manifest(manifest, f"merged manifest of {out}")
    with atomic_dir(out) as tmp:
        for s in shards:
            os.replace(stage / s["file"], tmp / s["file"])
        if save_texts:
            write_json(tmp / "texts.json", texts, indent=None)
        if vocab:
            write_json(tmp / "vocab.json", vocab, indent=None)
        write_json(tmp / MANIFEST, manifest)  # last: its presence marks a complete cache
    log.info("merged %d shards (%d tokens) from %d ranks into %s", len(shards), manifest["n_tokens"], world, out)


def harvest_distributed(model: Any = None, texts: Sequence[str] | None = None,
                        layers: int | Sequence[int] | str = "all", out: str | os.PathLike = "activations", *,
                        overwrite: bool = False, save_texts: bool = True,
                        seed: int = 0, device: str | torch.device = "cpu", progress: bool = True, group=None,
                        **harvest_kwargs) -> ActivationCache:
    """`splinterp.data.harvest` with the texts split between the ranks (see the module docstring).

    Tokens are stored rank by rank (rank 0's texts first); `text_ids` index the full `texts`, vocabularies
    are merged. Other keyword arguments go to `harvest` (site, token_selection, max_length, batch_size,
    dtype, shard_tokens, ...). Every rank must see `out`'s parent folder. Returns the opened cache on every
    rank. Without a process group: plain `harvest`.
    """
    from splinterp.data.harvest import harvest, resolve_texts

    rank, world = rank_world(group)
    if world == 1 and not is_initialized():
        return harvest(model, texts, layers, out, overwrite=overwrite, save_texts=save_texts, seed=seed,
                       device=device, progress=progress, **harvest_kwargs)
    out = Path(out)
    texts, text_source = resolve_texts(texts, seed)
    stage = Path(broadcast_from_rank0(lambda: _make_stage(out, overwrite), group))
    bounds = [r * len(texts) // world for r in range(world + 1)]
    lo, hi = bounds[rank], bounds[rank + 1]
    mine = stage / f"rank{rank:05d}"
    try:
        part = run_agreed(lambda: _harvest_slice(model, texts[lo:hi], layers, mine, seed=seed, device=device,
                                                 progress=progress and rank == 0, **harvest_kwargs), group)
        counts: list[Any] = [None] * world
        dist.all_gather_object(counts, {k: part[k] for k in ("n_tokens", "shards")}, group=group)
        if sum(p["n_tokens"] for p in counts) == 0:
            raise EmptyDataError("no tokens selected from the texts on any rank")
        first_token = sum(p["n_tokens"] for p in counts[:rank])
        first_shard = sum(len(p["shards"]) for p in counts[:rank])
        entries = run_agreed(lambda: _renumber(part, mine, stage, lo, first_token, first_shard), group)
        everything: list[Any] = [None] * world
        dist.all_gather_object(everything, {"entries": entries, "manifest": part["manifest"], "vocab": part["vocab"],
                                            "n_tokens": part["n_tokens"]}, group=group)
        run_agreed(lambda: _merge(out, stage, everything, texts, text_source, save_texts, bounds)
                   if rank == 0 else None, group)
    finally:
        dist.barrier(group=group)
        if rank == 0:
            shutil.rmtree(stage, ignore_errors=True)
    return ActivationCache.open(out)
