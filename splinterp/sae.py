"""SAE models: one torch module, five activation rules, SAELens parameter names and shapes.

Every architecture is "affine scores, then a selection rule": on the region where the active set is S the
code is z_S = u_S(x) with u(x) = x @ W + b affine, so the SAE is a piecewise-affine spline. `encoder_affine`
gives that (W, b) with everything folded in (b_dec pre-subtraction, the Gated magnitude path), and
`select` gives the rule. The geometry module relies on exactly these two functions, so the regions it
reports are the regions `encode` uses.

Architectures (`SAEConfig.architecture`):
- ``relu``      z = max(u, 0)
- ``topk``      the k largest u_i, then ReLU (SAELens / sparsify convention)
- ``topk_abs``  the k largest |u_i|, signed values kept (the SplInterp paper's scripts)
- ``jumprelu``  z = u * [u > threshold]
- ``gated``     gate path x @ W_enc + b_gate decides, magnitude path x @ (W_enc * exp(r_mag)) + b_mag
                gives the value, through a ReLU (Rajamanoharan et al. 2024). Exactly a JumpReLU SAE with
                W = W_enc * exp(r_mag), b = b_mag, threshold = max(b_mag - exp(r_mag) * b_gate, 0).

Ties in TopK are broken towards the lower latent index, everywhere (encode, geometry, power diagrams).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from splinterp import kernels
from splinterp.errors import ConfigError, ShapeError
from splinterp.validation import check_batch, check_dataclass_types

ARCHITECTURES = ("relu", "topk", "topk_abs", "jumprelu", "gated")
TOPK_ARCHITECTURES = ("topk", "topk_abs")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE. Field names follow SAELens where SAELens has the field."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None
    """Number of active latents (topk and topk_abs only)."""
    tied: bool = False
    """Decoder is the encoder's transpose (W_dec = W_enc.T); not allowed with a closed-form decoder."""
    apply_b_dec_to_input: bool = False
    """Encode x - b_dec instead of x (SAELens option)."""
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    jumprelu_init_threshold: float = 0.001
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: model_name, hook_name, layers, ... (SAELens `metadata`)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture in TOPK_ARCHITECTURES:
            if self.k is None:
                raise ConfigError(f"architecture {self.architecture!r} needs k (the number of active latents)")
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
                raise ConfigError(f"k must be an integer with 1 <= k <= d_sae={self.d_sae}, got {self.k!r}")
        elif self.k is not None:
            raise ConfigError(f"k={self.k} given but architecture {self.architecture!r} does not use k")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {self.device!r} is not a valid torch device: {e}") from None
        check_dataclass_types(self, "SAEConfig")  # the remaining fields (tied, seed, metadata, ...)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown SAEConfig fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> SAEConfig:
        return dataclasses.replace(self, **changes)


class Reconstruction(NamedTuple):
    """One encode-decode pass: the reconstruction and the code that made it (what a training loss or an
    evaluation needs, from the model's own kernels).

    The code is sparse, `values[r, j]` belonging to latent `indices[r, j]` (padding: value 0), unless
    `indices` is None: then `values` is the dense code [N, d_sae] (threshold codes too busy for the
    sparse kernels to pay)."""

    x_hat: torch.Tensor
    """[N, d_in]"""
    values: torch.Tensor
    """[N, m] code values (differentiable), or the dense code [N, d_sae] when `indices` is None."""
    indices: torch.Tensor | None
    """[N, m] latent index of each value, or None for a dense `values`."""

    @property
    def is_sparse(self) -> bool:
        return self.indices is not None


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores along the last dim, in decreasing order, ties towards the lower index.

    torch.topk promises no order among equal values; this is the canonical selection every TopK code and
    region key uses (`splinterp.kernels.topk_select`, which also makes it cheap on CPU).
    """
    if scores.ndim == 0:
        raise ShapeError("scores must have at least one dimension")
    flat = scores.reshape(-1, scores.shape[-1])
    return kernels.topk_select(flat, k).view(*scores.shape[:-1], k)


class SAE(nn.Module):
    """A sparse autoencoder with SAELens parameter names: W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_in], b_dec [d_in]; `threshold` (jumprelu); `b_gate`, `b_mag`, `r_mag` (gated, which
    has no b_enc, as in SAELens)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        gen = torch.Generator().manual_seed(cfg.seed)
        # unit-norm decoder rows, encoder = decoder transpose: the usual SAELens / sparsify initialisation
        w_dec = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        dt, dev = cfg.torch_dtype, torch.device(cfg.device)

        def param(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.to(device=dev, dtype=dt).contiguous())

        # W_enc [d_in, d_sae] is stored column-major (its transpose is contiguous). Why: the sparse backward
        # (splinterp.kernels) produces the encoder gradient as [d_sae, d_in] rows, and a gradient must match
        # its parameter's strides, so a row-major W_enc would cost a full transposed copy every step.
        self.W_enc = nn.Parameter(w_dec.to(device=dev, dtype=dt, copy=True).T)  # own storage, never W_dec's
        if not cfg.tied:
            self.W_dec = param(w_dec)
        self.b_dec = param(torch.zeros(d_in))
        if cfg.architecture == "gated":
            self.b_gate = param(torch.zeros(d_sae))
            self.b_mag = param(torch.zeros(d_sae))
            self.r_mag = param(torch.zeros(d_sae))
        else:
            self.b_enc = param(torch.zeros(d_sae))
        if cfg.architecture == "jumprelu":
            # thresholds stay in float32 even in a half-precision SAE (JumpReLU training is fragile otherwise)
            thr_dtype = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
            init = torch.full((d_sae,), cfg.jumprelu_init_threshold, dtype=thr_dtype, device=dev)
            self.threshold = nn.Parameter(init)

    # ------------------------------------------------------------------ parameters
    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802 (SAELens name)
        if self.cfg.tied:
            return self.W_enc.T
        w = self._parameters.get("W_dec")
        if w is None:  # during __init__, before registration (nn.Module probes with hasattr)
            raise AttributeError("W_dec")
        return w

    @property
    def architecture(self) -> str:
        return self.cfg.architecture

    @property
    def k(self) -> int | None:
        return self.cfg.k

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def encoder_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [d_in, d_sae], b [d_sae]) with u(x) = x @ W + b the scores whose selection gives the code.

        b_dec pre-subtraction and the Gated magnitude path are folded in, so that every architecture is
        "affine scores + selection rule" and the geometry needs no special cases.
        """
        if self.cfg.architecture == "gated":
            W = self.W_enc * torch.exp(self.r_mag)
            b = self.b_mag
        else:
            W, b = self.W_enc, self.b_enc
        if self.cfg.apply_b_dec_to_input:
            b = b - self.b_dec @ W
        return W, b

    def thresholds(self) -> torch.Tensor | None:
        """Per-latent thresholds of the selection rule u_i > theta_i (None for relu/topk/topk_abs: 0)."""
        if self.cfg.architecture == "jumprelu":
            return self.threshold
        if self.cfg.architecture == "gated":
            # gate fires iff x.W_enc + b_gate > 0 iff u > b_mag - exp(r_mag) * b_gate; the ReLU adds u > 0
            return torch.clamp(self.b_mag - torch.exp(self.r_mag) * self.b_gate, min=0)
        return None

    # ------------------------------------------------------------------ forward pieces
    def _check(self, x: torch.Tensor, name: str = "x") -> torch.Tensor:
        return check_batch(x, self.cfg.d_in, name=name, dtype=self.dtype, device=self.device)

    def _pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        W, b = self.encoder_affine()
        return x @ W + b

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Scores u(x) [..., d_sae] (for gated: the magnitude path)."""
        return self._pre_acts(self._check(x))

    def select_topk(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK architectures only: (indices [..., k] of the selected latents, bool [..., k] active).

        topk ranks u and keeps a selected latent only if u > 0 (TopK then ReLU); topk_abs ranks |u| and
        keeps every selected latent (signed value).
        """
        arch = self.cfg.architecture
        if arch not in TOPK_ARCHITECTURES:
            raise ConfigError(f"select_topk is for topk/topk_abs SAEs, not {arch!r}")
        idx = topk_indices(u.abs() if arch == "topk_abs" else u, self.cfg.k)
        if arch == "topk":
            return idx, u.gather(-1, idx) > 0
        return idx, torch.ones(idx.shape, dtype=torch.bool, device=idx.device)

    def select(self, u: torch.Tensor) -> torch.Tensor:
        """The selection rule: bool mask of active latents given scores u [..., d_sae]."""
        arch = self.cfg.architecture
        if arch == "relu":
            return u > 0
        if arch in ("jumprelu", "gated"):
            return u > self.thresholds().to(u.dtype)
        idx, active = self.select_topk(u)
        return torch.zeros(u.shape, dtype=torch.bool, device=u.device).scatter_(-1, idx, active)

    def _encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        u = self._pre_acts(x)
        return u * self.select(u.detach())

    def _code(self, x: torch.Tensor, dense: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Code of x [N, d_in]: (values, indices) when sparse, (z, None) when dense.

        TopK codes always go sparse (see splinterp.kernels); threshold codes only while sparse enough
        to pay. `dense=True` or `kernels.dense_reference()` gives the plain formulas.
        """
        if dense or not kernels.sparse_enabled() or x.shape[0] == 0:  # an empty batch needs no kernel
            return self._encode_dense(x), None
        arch = self.cfg.architecture
        W, b = self.encoder_affine()
        if arch in TOPK_ARCHITECTURES:
            return kernels.encode_topk(x, W, b, self.cfg.k, absolute=arch == "topk_abs")
        u = x @ W + b
        mask = self.select(u.detach())
        if kernels.is_sparse_enough(mask):
            return kernels.encode_masked(x, W, b, u.detach(), mask)
        return u * mask, None

    def _encode(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        a, idx = self._code(x.reshape(-1, self.cfg.d_in), dense)
        z = a if idx is None else kernels.densify(a, idx, self.cfg.d_sae)
        return z.reshape(*x.shape[:-1], self.cfg.d_sae)

    def encode(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """Dense code z [..., d_sae]: z_i = u_i on active latents, 0 elsewhere."""
        return self._encode(self._check(x), dense)

    def encode_sparse(self, x: torch.Tensor, dense: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse code (values [..., m], indices [..., m]), differentiable in values.

        TopK: m = k, in decreasing order of the ranking score (ties towards the lower index); for topk
        a selected latent with u <= 0 has value 0. Threshold rules: m = the most active latents in a
        row, shorter rows padded with index 0 and value 0.
        """
        x = self._check(x)
        x2 = x.reshape(-1, self.cfg.d_in)
        W, b = self.encoder_affine()
        if x2.shape[0] == 0:  # empty batch: k columns for TopK, none for threshold rules
            m = self.cfg.k if self.cfg.architecture in TOPK_ARCHITECTURES else 0
            vals = (x2 @ W[:, :m]).reshape(*x.shape[:-1], m)
            return vals, torch.zeros(vals.shape, dtype=torch.int64, device=x.device)
        if self.cfg.architecture in TOPK_ARCHITECTURES:
            if dense or not kernels.sparse_enabled():
                u = x2 @ W + b
                idx, active = self.select_topk(u.detach())
                vals = u.gather(-1, idx) * active
            else:
                vals, idx = kernels.encode_topk(x2, W, b, self.cfg.k, absolute=self.cfg.architecture == "topk_abs")
        else:
            u = x2 @ W + b
            mask = self.select(u.detach())
            if dense or not kernels.sparse_enabled():
                idx, live = kernels.mask_to_padded(mask)
                vals = u.gather(-1, idx) * live
            else:
                vals, idx = kernels.encode_masked(x2, W, b, u.detach(), mask)
        if x.ndim == 2:  # the very indices tensor, so a later kernels.decode shares its sorted pattern
            return vals, idx
        return vals.reshape(*x.shape[:-1], vals.shape[-1]), idx.reshape(*x.shape[:-1], idx.shape[-1])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x_hat = z @ W_dec + b_dec."""
        z = check_batch(z, self.cfg.d_sae, name="z", dim_name="d_sae", dtype=self.dtype, device=self.device)
        return z @ self.W_dec + self.b_dec

    def _reconstruct(self, x: torch.Tensor, dense: bool = False) -> Reconstruction:
        a, idx = self._code(x, dense)
        x_hat = a @ self.W_dec + self.b_dec if idx is None else kernels.decode(a, idx, self.W_dec, self.b_dec)
        return Reconstruction(x_hat, a, idx)

    def reconstruct(self, x: torch.Tensor, dense: bool = False) -> Reconstruction:
        """x_hat and the code of a batch x [N, d_in] from one pass (sparse kernels where they pay)."""
        x = self._check(x)
        if x.ndim != 2:
            raise ShapeError(f"reconstruct takes a batch [N, d_in={self.cfg.d_in}], got {tuple(x.shape)}")
        return self._reconstruct(x, dense)

    def forward(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """Reconstruction x_hat [..., d_in]; sparse end to end for TopK (dense=True: plain formulas)."""
        x = self._check(x)
        return self._reconstruct(x.reshape(-1, self.cfg.d_in), dense).x_hat.reshape(x.shape)

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{k}, tied={c.tied}, dtype={c.dtype}"


def make_sae(d_in: int, d_sae: int, architecture: str = "topk", k: int | None = None, **kwargs) -> SAE:
    """Shorthand for SAE(SAEConfig(...))."""
    return SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, **kwargs))
