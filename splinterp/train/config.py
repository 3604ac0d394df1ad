"""Typed configs of the SGD and PAM-SGD trainers.

Scales: the SGD losses are per-batch means (mse over elements, see `losses`), and the encoder proximal
weights mu_enc / nu_enc are added to that per-batch loss as is. The decoder weights alpha, beta, mu_dec,
nu_dec belong to the closed-form solve, whose data term is a *sum* over the training rows
(paper_splinterp.md section 4.1). By default (`decoder_scale="relative"`) they are read relative to that
sum: alpha and mu_dec in units of the data weight of an average latent, trace(Z^T Z) / d_sae, beta and
nu_dec in units of N (see `splinterp.train.decoder`); `decoder_scale="absolute"` takes them as the raw
numbers of the sum (the authors' convention, `PAMConfig.authors()`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from splinterp.errors import ConfigError
from splinterp.train.decoder import SCALES
from splinterp.validation import check_dataclass_types, check_device

Optimizer = Literal["adam", "adamw", "sgd"]
Order = Literal["encoder_first", "decoder_first"]
ClipScope = Literal["encoder", "all"]
DecoderMethod = Literal["auto", "sparse", "dense"]
OPTIMIZERS = typing.get_args(Optimizer)
ORDERS = typing.get_args(Order)

# fields that may change between a checkpoint and its resumption without changing the trajectory
RESUME_MUTABLE = frozenset({
    "epochs", "checkpoint_dir", "checkpoint_every", "checkpoint_every_steps", "keep_checkpoints", "resume",
    "resume_from", "progress", "device", "eval_batch_size",
})


def _pos_int(v, name: str, allow_zero: bool = False) -> None:
    lo = 0 if allow_zero else 1
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{name} must be an integer >= {lo}, got {v!r}")


def _nonneg(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")


@dataclass
class SGDConfig:
    """Plain (stochastic) gradient training of every SAE parameter on the architecture's loss.

    A float16 / bfloat16 SAE trains in mixed precision: forward and backward in its dtype, the optimiser on
    float32 copies of the weights (and its state in float32), float16 with a dynamic loss scale
    (`splinterp.train.precision`); the copies are checkpointed with the run.
    """

    epochs: int = 10
    """Passes over the training data (0: only evaluate)."""
    batch_size: int = 128
    """Rows per mini-batch."""
    lr: float = 1e-3
    """Learning rate of the optimiser."""
    optimizer: Optimizer = "adam"
    """"adam" (coupled L2 weight decay, as torch.optim.Adam), "adamw" (decoupled) or "sgd"; torch's fused
    implementation where it has one for the device (the same update, fewer passes over memory)."""
    weight_decay: float = 0.0
    """Weight decay of the optimiser (L2 for adam and sgd, decoupled for adamw)."""
    l1_coefficient: float = 0.0
    """Sparsity penalty weight of the relu loss (ignored by TopK losses)."""
    sgd_updates_per_batch: int = 1
    """Optimiser steps taken on each mini-batch before moving to the next."""
    grad_clip: float | None = None
    """Clip the gradient norm of the clipped parameters (see grad_clip_scope) to this value."""
    grad_clip_scope: ClipScope = "encoder"
    """"encoder": clip the encoder parameters' gradient only; "all": every parameter being optimised."""
    shuffle: bool = True
    """Reshuffle the rows every epoch (from `seed`); False keeps the data order."""
    eval_train: bool = True
    """Recompute train metrics in a full pass at each epoch end (same definition for every trainer)."""
    eval_batch_size: int = 4096
    """Rows per batch of the metric passes (memory only; the numbers do not depend on it)."""
    seed: int = 0
    """Seed of the batch order (a private generator; the global RNG is never touched)."""
    device: str | None = None
    """None: the SAE's device. Tensor data stay where they are and batches are moved here."""
    checkpoint_dir: str | None = None
    """Folder for resumable checkpoints (weights, optimiser, RNG, history); None: no checkpoints."""
    checkpoint_every: int = 1
    """Write a checkpoint every this many epochs (and after the last); 0 = only after the last."""
    checkpoint_every_steps: int | None = None
    """Also write one every this many mini-batches inside an epoch."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep in checkpoint_dir."""
    resume: bool = False
    """Continue from the newest checkpoint in checkpoint_dir if there is one (else start fresh)."""
    resume_from: str | None = None
    """Continue from this checkpoint folder (or a checkpoint_dir holding latest.json); it must exist."""
    progress: bool = True
    """Show a tqdm bar over epochs and batches."""
    aux_k: int = 0
    """TopK only: the AuxK loss (Gao et al. 2024) lets the aux_k highest-scoring *dead* latents reconstruct
    the residual x - x_hat, which gives dead latents a gradient back into use. 0 = off; d_in // 2 is usual."""
    aux_k_coefficient: float = 1 / 32
    """Weight of the AuxK loss (normalised: residual error over the batch's total variance)."""
    dead_after_samples: int = 10_000_000
    """A latent is dead for AuxK once it has not fired on this many consecutive training samples."""
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    """Free settings for the registered loss of the architecture (e.g. {"l1_decoder_norm": True})."""

    def __post_init__(self) -> None:
        for name in ("checkpoint_dir", "resume_from"):  # a path object is a path: kept as its string
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        check_dataclass_types(self, type(self).__name__)  # shuffle="no", checkpoint_dir=3, ... named up front
        if self.device is not None:
            check_device(self.device, f"{type(self).__name__}.device")
        _pos_int(self.epochs, "epochs", allow_zero=True)
        _pos_int(self.batch_size, "batch_size")
        _pos_int(self.sgd_updates_per_batch, "sgd_updates_per_batch")
        _pos_int(self.eval_batch_size, "eval_batch_size")
        _pos_int(self.checkpoint_every, "checkpoint_every", allow_zero=True)
        _pos_int(self.keep_checkpoints, "keep_checkpoints")
        if self.checkpoint_every_steps is not None:
            _pos_int(self.checkpoint_every_steps, "checkpoint_every_steps")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        _nonneg(self.lr, "lr")
        if self.lr == 0:
            raise ConfigError("lr must be > 0")
        _nonneg(self.weight_decay, "weight_decay")
        _nonneg(self.l1_coefficient, "l1_coefficient")
        _pos_int(self.aux_k, "aux_k", allow_zero=True)
        _nonneg(self.aux_k_coefficient, "aux_k_coefficient")
        _pos_int(self.dead_after_samples, "dead_after_samples")
        if self.grad_clip is not None:
            _nonneg(self.grad_clip, "grad_clip")
            if self.grad_clip == 0:
                raise ConfigError("grad_clip must be > 0 (or None for no clipping)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.grad_clip_scope not in ("encoder", "all"):
            raise ConfigError(f"grad_clip_scope must be 'encoder' or 'all', got {self.grad_clip_scope!r}")
        if not isinstance(self.loss_kwargs, dict):
            raise ConfigError(f"loss_kwargs must be a dict, got {type(self.loss_kwargs).__name__}")
        if (self.resume or self.resume_from) and self.checkpoint_dir is None and self.resume_from is None:
            raise ConfigError("resume=True needs checkpoint_dir (where to look for checkpoints)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass
class PAMConfig(SGDConfig):
    """PAM-SGD: SGD epochs on the encoder (decoder frozen), alternated with the exact decoder solve.

    The decoder step minimises, over (W_dec, b_dec) with the codes Z of the current encoder fixed,
        sum_r |x_r - z_r W_dec - b_dec|^2 + alpha |W_dec|^2 + beta |b_dec|^2
                                          + mu_dec |W_dec - W_dec^t|^2 + nu_dec |b_dec - b_dec^t|^2
    (W_dec^t, b_dec^t: the decoder before the step). The default is the paper's *proximal* step with its
    weights relative to the problem (decoder_scale="relative"): the proximal terms keep the decoder where
    the codes carry no information (fewer rows than latents, dead or rarely firing latents), where the
    plain least-squares step of the authors' scripts (`authors()`: ridge 1e-6, no proximal term) fits
    the training rows exactly and extrapolates wildly on new data. Directions of W_dec along which the
    codes have energy well above mu_dec * trace(Z^T Z)/d_sae move almost all the way to least squares in
    one step, the rest stay near the previous decoder; the step is still the exact block minimiser of the
    objective above (and never increases it), so PAM stays a descent method. The values were chosen on a
    validation split of the training digits, never on test data (bench/bench_pam_default.py).
    """

    mu_enc: float = 0.0
    """Proximal pull mu_enc |W_enc - W_enc^prev|^2 towards the encoder of the previous outer iteration."""
    nu_enc: float = 0.0
    """Same for the encoder's vector parameters (b_enc; b_gate, b_mag, r_mag; threshold)."""
    alpha: float = 0.03
    """Ridge alpha |W_dec|^2 in the decoder solve (pulls towards 0; decoder_scale units: by default 0.03 x
    the data weight of an average latent). A little shrinkage helps held-out error at every training-set
    size tried; much more (0.1) biases dense ReLU codes on plentiful data."""
    beta: float = 0.0
    """Ridge beta |b_dec|^2 in the decoder solve (in decoder_scale units)."""
    mu_dec: float = 1.0
    """Proximal pull mu_dec |W_dec - W_dec^t|^2 towards the decoder before the step (decoder_scale units:
    by default 1 x the data weight of an average latent, so such a latent's row moves half-way to its
    least-squares value per step, a rarely firing one much less, a frequent one almost all the way)."""
    nu_dec: float = 1.0
    """Proximal pull nu_dec |b_dec - b_dec^t|^2 towards the bias before the step (decoder_scale units:
    by default 1 x N, the data weight of the bias: half-way per step)."""
    decoder_scale: Literal["relative", "absolute"] = "relative"
    """"relative": alpha and mu_dec are multiplied by trace(Z^T Z) / d_sae and beta and nu_dec by N at each
    step, so codes and data multiplied by a constant c (and the previous b_dec with them) give the same
    W_dec and c * b_dec: the step does not depend on the units of the data. "absolute": the raw weights
    of the sum (the authors')."""
    order: Order = "encoder_first"
    """"encoder_first" (Algorithm C.1, the MNIST script) or "decoder_first" (the LLM script)."""
    decoder_batch_size: int = 8192
    """Rows per batch when accumulating the decoder statistics (tensor data); the solve stays exact."""
    decoder_method: DecoderMethod = "auto"
    """"sparse", "dense" or "auto" (see `solve_decoder`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for n in ("mu_enc", "nu_enc", "alpha", "beta", "mu_dec", "nu_dec"):
            _nonneg(getattr(self, n), n)
        if self.order not in ORDERS:
            raise ConfigError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.decoder_scale not in SCALES:
            raise ConfigError(f"decoder_scale must be one of {SCALES}, got {self.decoder_scale!r}")
        _pos_int(self.decoder_batch_size, "decoder_batch_size")
        if self.decoder_method not in ("auto", "sparse", "dense"):
            raise ConfigError(f"decoder_method must be 'auto', 'sparse' or 'dense', got {self.decoder_method!r}")

    @classmethod
    def authors(cls, **overrides) -> PAMConfig:
        """The decoder step of the authors' MNIST script (reference_code.md section 3.5): ridge 1e-6 in
        absolute units, no ridge on the bias, no proximal terms, encoder first, Adam lr 3e-3, batch 128.
        (Their two-stage bias and float32 normal equations are not reproduced: the solve here is joint and
        in float64.) Fragile where the codes are rank-deficient; kept to reproduce their numbers."""
        base = dict(alpha=1e-6, beta=0.0, mu_dec=0.0, nu_dec=0.0, decoder_scale="absolute", order="encoder_first",
                    lr=3e-3, batch_size=128)
        base.update(overrides)
        return cls(**base)
