"""Training SAEs on one layer or a group of layers of an LLM job's activations, fetched from the store
when an identical one was trained before; the sparse start of threshold SAEs; the shared per-layer and
sparsity-sweep settings of the LLM jobs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splinterp.errors import ConfigError
from splinterp.llm.data import LLMContext
from splinterp.llm.store import key_hash


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
        return key_hash(self.key, 16)


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
    """SAE architecture (topk, topk_abs, relu, jumprelu or gated)."""
    d_sae: int = 512
    """Latents."""
    k: int | None = 32
    """Active latents (TopK architectures only)."""
    epochs: int = 5
    """Epochs over the layer's (or group's) training tokens."""
    batch_size: int = 256
    """Mini-batch rows."""
    lr: float = 2e-3
    """Adam learning rate."""
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


SWEEP_ARCHITECTURES = ("relu", "gated", "jumprelu", "topk", "topk_abs")


def knob_name(architecture: str) -> str:
    """The sparsity knob of an architecture's sweep: k (TopK), the L0 coefficient (JumpReLU), else L1."""
    if architecture.startswith("topk"):
        return "k"
    return "l0_coefficient" if architecture == "jumprelu" else "l1_coefficient"


@dataclass
class SweepPointConfig:
    """How the SAE of one point of a sparsity sweep is trained on one layer (relu / gated / jumprelu / topk at
    a knob value). The shrinkage and geometry jobs share it, so the store trains each point once per folder."""

    d_sae: int = 512
    """Latents."""
    epochs: int = 5
    """Epochs over the layer's training tokens."""
    batch_size: int = 256
    """Mini-batch rows."""
    lr: float = 2e-3
    """Adam learning rate."""
    sparse_start_l0: float | None = 32.0
    """Start relu / gated / jumprelu SAEs at this L0 (`sparse_start`); None: start from zero biases (about half
    the latents active, which a short run cannot bring down: biases move ~lr per step)."""
    jumprelu_bandwidth: float = 0.05
    """STE kernel width, on the scale of the pre-activations of standardised inputs (see train.jumprelu)."""
    jumprelu_init_threshold: float = 0.001
    """Initial JumpReLU threshold when there is no sparse start (Gemma Scope's 0.001)."""
    eval_every: int = 50
    """Record the test FVU every this many optimiser steps."""

    @classmethod
    def preset(cls, quick: bool, **changes: Any) -> SweepPointConfig:
        base = cls(d_sae=128, epochs=3, batch_size=128, sparse_start_l0=8.0, eval_every=5) if quick else cls()
        return dataclasses.replace(base, **changes)

    def configs(self, architecture: str, value: float, d_in: int, seed: int, device: str, progress: bool = False):
        """(SAEConfig, SGDConfig) of the point: `value` is k for TopK, the sparsity coefficient otherwise."""
        from splinterp import SAEConfig
        from splinterp.train import SGDConfig

        if architecture not in SWEEP_ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {SWEEP_ARCHITECTURES}, got {architecture!r}")
        kw: dict[str, Any] = {}
        coef = 0.0
        loss_kwargs: dict[str, Any] = {}
        if architecture.startswith("topk"):
            kw["k"] = int(value)
        else:
            coef = float(value)
            if architecture == "relu":
                loss_kwargs = {"l1_decoder_norm": True}
            elif architecture == "jumprelu":
                kw["jumprelu_init_threshold"] = float(self.jumprelu_init_threshold)
                loss_kwargs = {"bandwidth": float(self.jumprelu_bandwidth), "l0_coefficient": coef}
        sae_cfg = SAEConfig(d_in=d_in, d_sae=self.d_sae, architecture=architecture, seed=seed, device=device, **kw)
        train_cfg = SGDConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed, eval_train=False,
                              l1_coefficient=coef, loss_kwargs=loss_kwargs, progress=progress)
        return sae_cfg, train_cfg

    def train(self, ctx: LLMContext, architecture: str, value: float, layer: int, *, seed: int,
              progress: bool = False) -> TrainedSAE:
        """Train (or fetch from the store) the SAE of one sweep point on `layer`."""
        sae_cfg, train_cfg = self.configs(architecture, value, ctx.d_model, seed, ctx.device, progress)
        start = self.sparse_start_l0 if architecture in ("relu", "gated", "jumprelu") else None
        return train_layers_sae(ctx, [layer], sae_cfg, train_cfg, name=f"{architecture}_L{layer}_{value:g}",
                                eval_every=self.eval_every, sparse_start_l0=start)
