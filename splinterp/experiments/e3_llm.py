"""E3: PAM-SGD vs SGD on real transformer activations, plus the helpers every LLM job shares.

The paper's E3 (paper_splinterp.md 5.3, reference_code.md 4) trains TopK and ReLU SAEs on Gemma-2-2B
activations with SGD and with PAM-SGD, and reports test loss curves, a training-set-size ablation and the
code sparsity (% non-zero latents) of ReLU SAEs. Here the activations are harvested offline from the shipped
text (`splinterp.data.text.offline_texts`) through the shipped all-MiniLM-L6-v2 (6 blocks, d_model 384), or
any Hugging Face model (`LLMDataConfig.model`, e.g. "gpt2", "google/gemma-2-2b" where a hub is reachable).
None of the authors' script bugs is reproduced:

- every real token is kept, taken from the attention mask (their "last token" index was wrong under left
  padding), and the layer convention is explicit (resid_post of block `layer`);
- the test split is held out by text (`split_unit="text"`: no text has tokens on both sides) and the
  per-feature standardisation is fitted on the training split only;
- both methods train an *untied* SAE from the *same* initial weights with the same Adam settings on the same
  batches; no proximal term on one side only, no clipping on one side only;
- the ReLU sparsity penalty is the same for both methods, and reported losses are plain mse (no penalty);
- PAM-SGD alternates the encoder pass and the exact decoder solve in Algorithm C.1 order by default
  (`order="encoder_first"`): the decoder used for evaluation is the exact minimiser for the encoder being
  evaluated. The LLM script's order is available as `order="decoder_first"`.

Shared helpers (used by the shrinkage, group_sae, transfer and llm_geometry jobs):
- `LLMDataConfig`: which model, texts, layers, split; `offline_cache(out_dir, quick)` harvests once into
  `out_dir/llm_cache/<model>-<hash>/` and reuses it (the hash covers everything that decides the content);
- `LLMContext`: the cache with per-layer `Standardizer`s (fitted on the training split) and standardised
  test sets; `SAEStore`: trained SAEs saved under `out_dir/llm_saes/<name>-<hash>/` keyed by everything that
  decides the result, so jobs that need the same SAE train it once per output folder;
- `train_layers_sae`: train (or fetch) one SAE on one layer or a group of layers, with its FVU curve.

Command line (any HF model id or folder; the registered jobs use the offline MiniLM):
    python -m splinterp.experiments.e3_llm --jobs shrinkage group_sae --model gpt2 --out out_gpt2 [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splinterp.atomic import write_json, write_text
from splinterp.errors import ConfigError, CorruptFileError
from splinterp.experiments.registry import register, to_jsonable

log = logging.getLogger(__name__)

STORE_VERSION = 1
"""Bump when a change to the training code should invalidate SAEs already in an output folder's store."""


# =========================================================================================== data
@dataclass
class LLMDataConfig:
    """Which activations the LLM jobs use. Defaults: the full preset on the offline MiniLM."""

    model: str | None = None
    """None = the offline all-MiniLM-L6-v2; else any Hugging Face model id or local folder."""
    n_texts: int = 400
    """Passages of the offline text (shuffled with the seed) to harvest; the next `n_eval_texts` are
    held out for the model-level evals (loss recovered)."""
    n_eval_texts: int = 32
    layers: list[int] | None = None
    """Blocks to harvest (resid_post); None = every block."""
    max_length: int = 128
    drop_special_tokens: bool = False
    """Leave out [CLS]/[SEP]/<bos> positions. Kept by default: the model-level evals splice the SAE into
    every real token, special ones included, so the SAE must have seen them."""
    test_frac: float = 0.1
    split_unit: str = "text"
    """"text": all tokens of a text fall on the same side of the train/test split."""
    max_test_tokens: int | None = 4096
    """Cap on the standardised test tokens kept in memory per layer (evaluation subsample)."""
    harvest_batch_size: int = 32

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


def _hash(obj: Any, n: int = 12) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


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
    folder = Path(out_dir) / "llm_cache" / f"{_slug(data.model)}-{_hash(key)}"

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


# ============================================================================================ store
class SAEStore:
    """Trained SAEs on disk, keyed by a hash of everything that decides them; `enabled=False` never reuses.

    Layout: root/<name>-<hash>/sae/ (splinterp.save) and meta.json (key + results), meta.json last;
    `train_layers_sae` adds standardizers.json ({layer: Standardizer.to_dict()}: how the SAE's inputs were made).
    """

    def __init__(self, root: str | os.PathLike, enabled: bool = True):
        self.root, self.enabled = Path(root), enabled

    def folder(self, name: str, key: dict[str, Any]) -> Path:
        return self.root / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', name)}-{_hash({**key, 'v': STORE_VERSION}, 16)}"

    def get(self, name: str, key: dict[str, Any], device: str = "cpu"):
        """(SAE, meta) if stored, else None."""
        from splinterp.io import load

        f = self.folder(name, key)
        if not self.enabled or not (f / "meta.json").is_file():
            return None
        try:
            meta = json.loads((f / "meta.json").read_text("utf-8"))
            if meta.get("key") != json.loads(json.dumps(key, default=str)):
                return None
            return load(f / "sae", device=device), meta
        except (OSError, ValueError, CorruptFileError) as e:
            log.warning("stored SAE %s is unreadable (%s); training again", f, e)
            return None

    def put(self, name: str, key: dict[str, Any], sae: Any, meta: dict[str, Any],
            extra_json: dict[str, Any] | None = None) -> Path:
        from splinterp.io import save

        f = self.folder(name, key)
        save(sae, f / "sae")
        for fname, obj in (extra_json or {}).items():
            write_json(f / fname, obj)
        write_json(f / "meta.json", to_jsonable({**meta, "key": json.loads(json.dumps(key, default=str))}))
        return f


def _train_key(cfg: Any) -> dict[str, Any]:
    d = cfg.to_dict()
    for k in ("progress", "device", "checkpoint_dir", "resume", "resume_from", "eval_batch_size"):
        d.pop(k, None)
    return d


@dataclass
class TrainedSAE:
    """An SAE trained by `train_layers_sae`, with its test-FVU curve and its training time."""

    sae: Any
    layers: list[int]
    curve: dict[str, Any]
    train_seconds: float
    final: dict[str, float]
    """`metrics.evaluate` on the standardised test tokens of each layer: {"<layer>": {...}}."""
    key: dict[str, Any] = field(default_factory=dict)
    reused: bool = False

    @property
    def key_hash(self) -> str:
        return _hash(self.key, 16)


@torch.no_grad()
def sparse_start(sae: Any, X: torch.Tensor, l0: float) -> float:
    """Shift a fresh relu / gated / jumprelu SAE so that about `l0` latents fire per row of X at the start.

    tau = the (1 - l0 / d_sae) quantile of the initial scores u(x) over X; then relu: b_enc = -tau;
    gated: b_gate = -tau (the gate opens where u > tau, the magnitude path is untouched); jumprelu:
    threshold = tau (b_enc = 0). All three thus start with the same active sets as each other. Short
    training budgets cannot move biases far enough from a zero start (about lr per Adam step), which would
    leave every threshold SAE at L0 ~ d_sae / 2 whatever its penalty. Returns tau.
    """
    arch = sae.cfg.architecture
    if arch not in ("relu", "gated", "jumprelu"):
        raise ConfigError(f"sparse_start is for relu, gated and jumprelu SAEs, not {arch!r}")
    if not 0 < l0 < sae.cfg.d_sae:
        raise ConfigError(f"l0 must lie in (0, d_sae={sae.cfg.d_sae}), got {l0!r}")
    u = sae.pre_acts(X).float().flatten()
    tau = float(torch.quantile(u[torch.randperm(u.numel(), generator=torch.Generator().manual_seed(0))[:1 << 24]],
                               1 - l0 / sae.cfg.d_sae))
    if arch == "relu":
        sae.b_enc.fill_(-tau)
    elif arch == "gated":
        sae.b_gate.fill_(-tau)
    else:
        sae.threshold.fill_(max(tau, 0.0))
    return tau


def train_layers_sae(ctx: LLMContext, layers: Sequence[int], sae_cfg: Any, train_cfg: Any, *,
                     name: str, sampling: str = "uniform", method: str = "sgd", eval_every: int = 25,
                     init: TrainedSAE | None = None, init_layer: int | None = None,
                     sparse_start_l0: float | None = None) -> TrainedSAE:
    """Train one SAE on `layers` of ctx's cache (one layer, or a Group-SAE group) or fetch it from the store.

    init: start from this trained SAE's weights (layer-wise transfer) instead of sae_cfg's random ones.
    sparse_start_l0: for relu / gated / jumprelu, start with the L0 a TopK SAE would have (`sparse_start`).
    The test FVU (mean over the layers) is recorded every `eval_every` steps and at steps 0 and last.
    """
    from splinterp import metrics
    from splinterp.layers import FVUTracker, train_group_sae, train_seconds, transfer_init

    layers = [int(v) for v in layers]
    sampling = sampling if len(layers) > 1 else "uniform"
    key = {"cache": ctx.cache_id, "layers": layers, "sampling": sampling, "method": method,
           "sae": {k: v for k, v in sae_cfg.to_dict().items() if k not in ("device", "metadata")},
           "train": _train_key(train_cfg), "eval_every": eval_every,
           "init": None if init is None else init.key_hash, "max_test_tokens": ctx.data.max_test_tokens,
           "sparse_start_l0": sparse_start_l0}
    hit = ctx.store.get(name, key, ctx.device)
    if hit is not None:
        sae, meta = hit
        return TrainedSAE(sae, layers, meta["curve"], meta["train_seconds"], meta["final"], key, reused=True)
    eval_sets = {str(v): ctx.test(v) for v in layers}
    stds = ctx.standardizers(layers)
    sae = None
    if init is not None:
        sae = transfer_init(init.sae, target_layer=layers[0] if len(layers) == 1 else None,
                            source_layer=init_layer if init_layer is not None else init.layers[0])
    else:
        from splinterp.layers import group_metadata
        from splinterp.sae import SAE

        meta = {**sae_cfg.metadata, **group_metadata(layers, sampling, ctx.cache), "layer": layers[0]
                if len(layers) == 1 else None, "standardized": True}
        sae = SAE(sae_cfg.replace(metadata=meta, device=ctx.device))
        if sparse_start_l0 is not None:
            sample = next(iter(ctx.cache.iter_batches(layers, 4096, split="train")))
            sample = sample[:, None] if sample.ndim == 2 else sample
            sample = torch.cat([ctx.standardizer(v).transform(sample[:, i]) for i, v in enumerate(layers)])
            sparse_start(sae, sample[:4096].to(device=ctx.device, dtype=sae.dtype), sparse_start_l0)
    tracker = FVUTracker(sae, eval_sets, every=eval_every)
    tracker.record(0)
    _, hist = train_group_sae(ctx.cache, layers, None, train_cfg, standardizers=stds, sampling=sampling,
                              method=method, sae=sae, callback=tracker)
    tracker.record(hist.last.get("step", 0))
    secs = train_seconds(hist, tracker)
    final = {str(v): metrics.evaluate(sae, ctx.test(v)) for v in layers}
    curve = tracker.curve()
    # the SAE reads standardised activations: the per-layer standardisers are kept next to it
    ctx.store.put(name, key, sae, {"curve": curve, "train_seconds": secs, "final": final, "layers": layers,
                                   "history_last": hist.last},
                  extra_json={"standardizers.json": {str(v): stds[v].to_dict() for v in layers}})
    return TrainedSAE(sae, layers, curve, secs, final, key)


@dataclass
class LayerSAEConfig:
    """The per-layer (and per-group) SAE of the Group-SAE, transfer and geometry jobs. Sharing one config
    means the SAE store trains each per-layer SAE once per output folder."""

    architecture: str = "topk"
    d_sae: int = 512
    k: int | None = 32
    epochs: int = 5
    batch_size: int = 256
    lr: float = 2e-3
    eval_every: int = 25
    """Record the test FVU every this many optimiser steps (the curves behind steps-to-target)."""

    @classmethod
    def preset(cls, quick: bool, **changes: Any) -> LayerSAEConfig:
        base = cls(d_sae=128, k=8, epochs=3, batch_size=128, eval_every=5) if quick else cls()
        return dataclasses.replace(base, **changes)

    def configs(self, d_in: int, seed: int, device: str, progress: bool = False):
        """(SAEConfig, SGDConfig)."""
        from splinterp import SAEConfig
        from splinterp.train import SGDConfig

        k = self.k if self.architecture.startswith("topk") else None
        return (SAEConfig(d_in=d_in, d_sae=self.d_sae, architecture=self.architecture, k=k, seed=seed, device=device),
                SGDConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed, eval_train=False,
                          progress=progress))


    def train(self, ctx: LLMContext, layers: Sequence[int], *, seed: int, sampling: str = "uniform",
              init: TrainedSAE | None = None, init_layer: int | None = None, name: str | None = None) -> TrainedSAE:
        """`train_layers_sae` with these settings (store name `layer_sae_name` unless given)."""
        sae_cfg, train_cfg = self.configs(ctx.d_model, seed, ctx.device)
        return train_layers_sae(ctx, layers, sae_cfg, train_cfg, name=name or layer_sae_name(layers, self.architecture),
                                sampling=sampling, eval_every=self.eval_every, init=init, init_layer=init_layer)


def layer_sae_name(layers: Sequence[int], architecture: str = "topk") -> str:
    """Store name of the SAE of one layer ("topk_L3") or of a group ("topk_G0-1-2")."""
    return f"{architecture}_L{layers[0]}" if len(layers) == 1 else f"{architecture}_G{'-'.join(map(str, layers))}"


def sae_train_flops(d_in: int, d_sae: int, n_rows: int, active: float | None = None) -> float:
    """Estimated FLOPs to train an SAE on `n_rows` rows: 3 x forward (forward + backward ~ 2x forward),
    forward = 2 d_in d_sae (encoder) + 2 d_in a (decoder, a = active latents per row, d_sae if dense)."""
    a = d_sae if active is None else active
    return 3.0 * n_rows * (2.0 * d_in * d_sae + 2.0 * d_in * a)


# ============================================================================================== E3
@dataclass
class E3Config:
    """Settings of E3. Defaults are the full run on this machine; `E3Config.quick()` is the small preset."""

    data: LLMDataConfig = field(default_factory=LLMDataConfig)
    layer: int | None = None
    """Block whose resid_post is used; None = the middle block (3 of MiniLM's 6; the paper used the middle
    of Gemma-2-2B too)."""
    architectures: tuple[str, ...] = ("topk", "relu")
    d_sae: int = 512
    k: int = 40
    """TopK: 40 / 512 = 7.8% active, the paper's 320 / 4096."""
    relu_l1: float = 1e-4
    """L1 coefficient of the ReLU SAE's loss (plain sum |z_i|, as the paper), the same for SGD and PAM-SGD."""
    sparsity_l1s: tuple[float, ...] = (1e-3, 3e-3)
    """Extra ReLU L1 coefficients at which the code sparsity of SGD and PAM-SGD is compared (the main
    runs' relu_l1 is always included): which method gives sparser codes depends on the penalty."""
    epochs: int = 8
    batch_size: int = 256
    lr: float = 1e-3
    order: str = "encoder_first"
    """PAM-SGD order: "encoder_first" (Algorithm C.1) or "decoder_first" (the authors' LLM script)."""
    pam_alpha: float = 1e-6
    """Ridge on W_dec in the decoder solve (sum scale)."""
    fractions: tuple[float, ...] = (0.02, 0.1, 0.3, 1.0)
    """Training-set-size ablation: seeded random subsets of the training split."""
    fraction_epochs: int = 5
    fraction_architectures: tuple[str, ...] = ("topk", "relu")
    fraction_pam_alphas: tuple[float, ...] = (100.0,)
    """Extra PAM-SGD runs of the training-set-size sweep with this decoder ridge (sum scale), stored as method
    "pam_sgd_alpha=<alpha>": with few rows the exact decoder solve with a tiny ridge interpolates the training
    set and generalises badly (as in E2)."""
    seed: int = 0
    device: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.architectures or any(a not in ("topk", "topk_abs", "relu") for a in self.architectures):
            raise ConfigError(f"architectures must be among topk, topk_abs, relu; got {self.architectures!r}")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"fractions must lie in (0, 1], got {self.fractions!r}")

    @classmethod
    def quick(cls, **changes: Any) -> E3Config:
        base = cls(data=LLMDataConfig.preset(True), d_sae=128, k=10, epochs=3, batch_size=128, lr=2e-3,
                   fractions=(0.25, 1.0), fraction_epochs=2, fraction_architectures=("topk",), sparsity_l1s=())
        return dataclasses.replace(base, **changes)

    @classmethod
    def preset(cls, quick: bool, seed: int = 0, device: str = "cpu", **changes: Any) -> E3Config:
        c = cls.quick() if quick else cls()
        return dataclasses.replace(c, seed=seed, device=device, **changes)


E3_METHODS = ("sgd", "pam_sgd")
E3_LABELS = {"sgd": "SGD", "pam_sgd": "PAM-SGD"}


def _e3_train(cfg: E3Config, arch: str, method: str, X: torch.Tensor, Xt: torch.Tensor, epochs: int,
              alpha: float | None = None, l1: float | None = None):
    from splinterp import SAE, SAEConfig, metrics
    from splinterp.train import PAMConfig, SGDConfig, train_pam_sgd, train_sgd

    sae = SAE(SAEConfig(d_in=X.shape[1], d_sae=cfg.d_sae, architecture=arch,
                        k=cfg.k if arch.startswith("topk") else None, seed=cfg.seed, device=cfg.device,
                        metadata={"layer": cfg.layer, "model_name": cfg.data.model or "minilm", "standardized": True}))
    common = dict(epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, eval_train=False,
                  l1_coefficient=(cfg.relu_l1 if l1 is None else l1) if arch == "relu" else 0.0,
                  progress=cfg.progress)
    if method == "sgd":
        hist = train_sgd(sae, X, SGDConfig(**common), eval_data=Xt)
    else:
        a = cfg.pam_alpha if alpha is None else alpha
        hist = train_pam_sgd(sae, X, PAMConfig(**common, order=cfg.order, alpha=a), eval_data=Xt)
    final = metrics.evaluate(sae, Xt)
    return sae, hist, final


def run_e3(cfg: E3Config, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Run E3 into `out_dir`: curves, training-set size, ReLU code sparsity. Returns the results dict."""
    from matplotlib.figure import Figure

    from splinterp.viz.output import save_png

    out_dir = Path(out_dir)
    ctx = LLMContext(out_dir, cfg.data, seed=cfg.seed, device=cfg.device, progress=cfg.progress)
    layer = ctx.pick_layer(cfg.layer)
    cfg = dataclasses.replace(cfg, layer=layer)
    X = ctx.train(layer).to(cfg.device)
    Xt = ctx.test(layer)
    res: dict[str, Any] = {"layer": layer, "n_train": int(X.shape[0]), "n_test": int(Xt.shape[0]),
                           "d_in": int(X.shape[1]), "d_sae": cfg.d_sae, "k": cfg.k, "model": cfg.data.model or "minilm",
                           "runs": {}, "fractions": {}}
    curves: dict[str, Any] = {}
    for arch in cfg.architectures:
        for method in E3_METHODS:
            t0 = time.perf_counter()
            _, hist, final = _e3_train(cfg, arch, method, X, Xt, cfg.epochs)
            name = f"{arch}/{method}"
            curves[name] = hist
            res["runs"][name] = {"test_mse": final["mse"], "test_fvu": final["fvu"], "test_l0": final["l0"],
                                 "pct_nonzero": 100.0 * final["l0"] / cfg.d_sae,
                                 "dead_features": final["dead_features"], "seconds": time.perf_counter() - t0,
                                 "test_mse_curve": hist["test_mse"]}
            log.info("E3 %s: test mse %.4f fvu %.4f l0 %.1f", name, final["mse"], final["fvu"], final["l0"])
        r = res["runs"]
        ratio = r[f"{arch}/pam_sgd"]["test_mse"] / r[f"{arch}/sgd"]["test_mse"]
        res[f"{arch}_pam_improvement_pct"] = 100.0 * (1 - ratio)
    # training-set size
    n = X.shape[0]
    for arch in cfg.fraction_architectures:
        for f in cfg.fractions:
            m = max(int(round(f * n)), cfg.batch_size // 4, 8)
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 101))[:m]
            runs = [(mt, None) for mt in E3_METHODS] + [("pam_sgd", a) for a in cfg.fraction_pam_alphas]
            for method, alpha in runs:
                _, _, final = _e3_train(cfg, arch, method, X[idx], Xt, cfg.fraction_epochs, alpha)
                key = method if alpha is None else f"pam_sgd_alpha={alpha:g}"
                res["fractions"][f"{arch}/{key}/{f:g}"] = {"n_rows": int(m), "test_mse": final["mse"],
                                                           "test_fvu": final["fvu"], "test_l0": final["l0"]}
    # figures
    fig = Figure(figsize=(5.5 * len(cfg.architectures), 4))
    for i, arch in enumerate(cfg.architectures):
        ax = fig.add_subplot(1, len(cfg.architectures), i + 1)
        for method in E3_METHODS:
            y = curves[f"{arch}/{method}"]["test_mse"]
            ax.plot(range(1, len(y) + 1), y, marker="o", ms=3, label=E3_LABELS[method])
        ax.set(title=f"{arch} (layer {cfg.layer}, d_sae {cfg.d_sae})", xlabel="epoch", ylabel="test mse (standardised)",
               yscale="log")
        ax.legend()
    fig.tight_layout()
    save_png(fig, out_dir / "e3_llm_curves.png")
    fig = Figure(figsize=(5.5 * len(cfg.fraction_architectures), 4))
    for i, arch in enumerate(cfg.fraction_architectures):
        ax = fig.add_subplot(1, len(cfg.fraction_architectures), i + 1)
        for key in list(E3_METHODS) + [f"pam_sgd_alpha={a:g}" for a in cfg.fraction_pam_alphas]:
            ys = [res["fractions"][f"{arch}/{key}/{f:g}"]["test_mse"] for f in cfg.fractions]
            label = E3_LABELS.get(key, key.replace("pam_sgd_alpha=", "PAM-SGD, ridge alpha="))
            ax.plot([100 * f for f in cfg.fractions], ys, marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="% of the training split", ylabel="final test mse",
               title=f"{arch}: training-set size ({cfg.fraction_epochs} epochs)")
        ax.legend()
    fig.tight_layout()
    save_png(fig, out_dir / "e3_llm_training_size.png")
    # ReLU code sparsity under both methods, at several L1 coefficients
    res["sparsity"] = {}
    if "relu" in cfg.architectures:
        res["sparsity"][f"{cfg.relu_l1:g}"] = {m: {k: res["runs"][f"relu/{m}"][k] for k in ("pct_nonzero", "test_mse")}
                                               for m in E3_METHODS}
        for l1 in cfg.sparsity_l1s:
            if f"{l1:g}" in res["sparsity"]:
                continue
            res["sparsity"][f"{l1:g}"] = {}
            for method in E3_METHODS:
                _, _, final = _e3_train(cfg, "relu", method, X, Xt, cfg.epochs, l1=l1)
                res["sparsity"][f"{l1:g}"][method] = {"pct_nonzero": 100.0 * final["l0"] / cfg.d_sae,
                                                      "test_mse": final["mse"]}
    fig = Figure(figsize=(1.8 + 1.6 * max(len(res["sparsity"]), 1), 4))
    ax = fig.add_subplot(1, 1, 1)
    lams = list(res["sparsity"])
    for j, method in enumerate(E3_METHODS):
        vals = [res["sparsity"][lam][method]["pct_nonzero"] for lam in lams]
        xs = [i + (j - 0.5) * 0.38 for i in range(len(lams))]
        ax.bar(xs, vals, width=0.38, label=E3_LABELS[method], color=["#1f77b4", "#d62728"][j])
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(lams)), [f"L1 {lam}" for lam in lams])
    ax.set(ylabel="% non-zero latents (held-out tokens)", title="ReLU SAE code sparsity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, out_dir / "e3_llm_sparsity.png")
    res["relu_pct_nonzero"] = {lam: {m: v[m]["pct_nonzero"] for m in E3_METHODS} for lam, v in res["sparsity"].items()}
    res["config"] = dataclasses.asdict(cfg)
    write_text(out_dir / "e3_llm_table.md", _e3_markdown(cfg, res))
    write_json(out_dir / "e3_llm.json", to_jsonable(res))
    return res


def _e3_markdown(cfg: E3Config, res: dict[str, Any]) -> str:
    lines = [f"Layer {res['layer']}, {res['n_train']} training / {res['n_test']} held-out tokens (standardised), "
             f"d_sae {cfg.d_sae}, k {cfg.k}, ReLU L1 {cfg.relu_l1:g}, {cfg.epochs} epochs, Adam lr {cfg.lr:g}, "
             f"PAM order {cfg.order}, ridge alpha {cfg.pam_alpha:g}.", "",
             "| SAE | method | test mse | test FVU | L0 | % non-zero | dead | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        arch, method = name.split("/")
        lines.append(f"| {arch} | {E3_LABELS[method]} | {r['test_mse']:.4f} | {r['test_fvu']:.4f} | "
                     f"{r['test_l0']:.1f} | {r['pct_nonzero']:.2f} | {r['dead_features']} | {r['seconds']:.1f} |")
    if res.get("sparsity"):
        lines += ["", "ReLU code sparsity, % non-zero latents on held-out tokens (test mse):", "",
                  "| ReLU L1 | SGD | PAM-SGD |", "|---|---|---|"]
        for lam, v in res["sparsity"].items():
            lines.append(f"| {lam} | {v['sgd']['pct_nonzero']:.1f}% ({v['sgd']['test_mse']:.4f}) | "
                         f"{v['pam_sgd']['pct_nonzero']:.1f}% ({v['pam_sgd']['test_mse']:.4f}) |")
    lines += ["", f"Training-set size ({cfg.fraction_epochs} epochs each), final test mse:", ""]
    keys = sorted({k.rsplit("/", 1)[0] for k in res["fractions"]})
    lines += ["| SAE / method | " + " | ".join(f"{100 * f:g}%" for f in cfg.fractions) + " |",
              "|---|" + "---|" * len(cfg.fractions)]
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{res['fractions'][f'{k}/{f:g}']['test_mse']:.4f}"
                                              for f in cfg.fractions) + " |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with `torch.set_num_threads(n)` (None: unchanged), then restore the previous count.

    The quick presets train tiny SAEs (d_sae 128) whose matrix products are too small to gain from intra-op
    threads; on a busy machine those threads cost far more than they save (measured here: 10x slower with 2
    threads than with 1 on 2 loaded cores), so the registered jobs run quick mode single-threaded.
    """
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_THREADS_OVERRIDE: int | None = None  # set by `threads_for_all_jobs` (splinterp reproduce --threads)


def job_threads(quick: bool) -> int | None:
    """Intra-op threads of a registered LLM job: the user's `--threads` if given, else 1 in quick mode and
    torch's default otherwise."""
    if _THREADS_OVERRIDE is not None:
        return _THREADS_OVERRIDE
    return 1 if quick else None


@contextlib.contextmanager
def threads_for_all_jobs(n: int | None) -> Iterator[None]:
    """Every job in the body runs with n intra-op threads (None: each job's default)."""
    global _THREADS_OVERRIDE
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"threads must be a positive integer, got {n!r}")
    old = _THREADS_OVERRIDE
    _THREADS_OVERRIDE = n
    try:
        with torch_threads(n):
            yield
    finally:
        _THREADS_OVERRIDE = old


def _job(*args: Any, **kwargs: Any) -> Callable[[Any], Any]:
    """`register`, except when this file runs as `__main__` (the imported copy registers the job instead)."""
    return register(*args, **kwargs) if __name__ != "__main__" else (lambda fn: fn)


@_job("e3_llm", "E3: PAM-SGD vs SGD on real MiniLM activations (offline text): TopK and ReLU test curves, "
          "training-set size, ReLU code sparsity",
          outputs=["e3_llm.json", "e3_llm_table.md", "e3_llm_curves.png", "e3_llm_training_size.png",
                   "e3_llm_sparsity.png"],
          quick_seconds=30)
def e3_llm_job(out_dir: Path, quick: bool, seed: int, device: str) -> dict:
    with torch_threads(job_threads(quick)):
        res = run_e3(E3Config.preset(quick, seed, device), out_dir)
    keep = ("layer", "n_train", "n_test", "topk_pam_improvement_pct", "relu_pam_improvement_pct", "relu_pct_nonzero")
    out = {k: res[k] for k in keep if k in res}
    out["final_test_mse"] = {k: v["test_mse"] for k, v in res["runs"].items()}
    return out


# ============================================================================================= CLI
def _jobs_table() -> dict[str, tuple[Callable[..., Any], Callable[..., Any]]]:
    """job name -> (config preset builder, runner)."""
    from splinterp.experiments import group_sae, llm_geometry, shrinkage, transfer

    return {
        "e3_llm": (E3Config.preset, run_e3),
        "shrinkage": (shrinkage.ShrinkageConfig.preset, shrinkage.run_shrinkage),
        "group_sae": (group_sae.GroupSAEConfig.preset, group_sae.run_group_sae),
        "transfer": (transfer.TransferConfig.preset, transfer.run_transfer),
        "llm_geometry": (llm_geometry.GeometryConfig.preset, llm_geometry.run_llm_geometry),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m splinterp.experiments.e3_llm`: the LLM jobs on any Hugging Face model."""
    table = _jobs_table()
    p = argparse.ArgumentParser(prog="python -m splinterp.experiments.e3_llm",
                                description="LLM-activation experiments (E3, shrinkage, Group-SAE, transfer, "
                                            "geometry) on any Hugging Face model")
    p.add_argument("--jobs", nargs="+", choices=sorted(table), default=sorted(table))
    p.add_argument("--model", default=None, help="HF model id or folder (default: the offline MiniLM)")
    p.add_argument("--n-texts", type=int, default=None, help="texts to harvest (default: the preset's)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="blocks to harvest (default: all)")
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--layer", type=int, default=None, help="block of the single-layer jobs (default: the middle)")
    p.add_argument("--out", default="out_llm")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    changes = {k: v for k, v in (("model", a.model), ("n_texts", a.n_texts), ("layers", a.layers),
                                 ("max_length", a.max_length)) if v is not None}
    results = {}
    for name in a.jobs:
        preset, runner = table[name]
        cfg = preset(a.quick, a.seed, a.device)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))
        if a.layer is not None:
            for f in ("layer", "arch_layer"):
                if hasattr(cfg, f):
                    cfg = dataclasses.replace(cfg, **{f: a.layer})
        t0 = time.perf_counter()
        results[name] = {"results": runner(cfg, out), "seconds": round(time.perf_counter() - t0, 2)}
        log.warning("%s done in %.1fs", name, results[name]["seconds"])
    write_json(out / "llm_results.json", to_jsonable(results))
    return 0


if __name__ == "__main__":  # run the importable copy's CLI, so every job module sees one set of helpers
    import sys

    from splinterp.experiments.e3_llm import main as _main

    sys.exit(_main())
