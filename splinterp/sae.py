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

Scores are computed the way the SAE's library computes them (`SAEConfig.score_order`), so that an SAE loaded
from SAELens, sparsify or dictionary_learning has the library's active sets bit for bit in float32, bfloat16
and float16: b_dec is subtracted from the input (never folded into the bias), the bias is added after the
matmul (SAELens) or inside it (`nn.Linear`: sparsify, dictionary_learning), and W_enc is held in the memory
layout the library holds it in (float16 matmuls on CPU round differently for a transposed operand).
`encoder_affine` still gives the folded (W, b) of the same affine map: the geometry's sites and pieces.

TopK ties: when the k-th and (k+1)-th largest scores are exactly equal, splinterp takes the lower latent
index, everywhere (encode, geometry, power diagrams): the same on every device. `torch.topk`, which SAELens,
sparsify and dictionary_learning call, promises no order among equal values (on CPU, ten equal scores with
k=3 give latents 8, 6, 7; a GPU may pick others). Exact ties need equal rounded scores: essentially never in
float32, but common in half precision (bfloat16 keeps 8 significant bits: with d_sae 512 and k 16, one row
in ten). So an SAE loaded from a library takes its library's rule (`SAEConfig.topk_ties`: the tied latents
torch.topk picks from the same scores) and its active sets equal the library's on tied rows too.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from splinterp import kernels, memory
from splinterp.errors import ConfigError, CorruptFileError, NonFiniteError, ShapeError, SplinterpError
from splinterp.sae_state import DTYPES, check_tensors, dtype_name, expected_shapes, state_from_weights
from splinterp.validation import check_batch, check_dataclass_types, check_device, check_finite

Architecture = Literal["relu", "topk", "topk_abs", "jumprelu", "gated"]
DType = Literal["float32", "float64", "float16", "bfloat16"]
ARCHITECTURES = typing.get_args(Architecture)
SCORE_ORDERS = ("matmul", "linear")
RESHAPES = ("none", "hook_z")
TOPK_ARCHITECTURES = ("topk", "topk_abs")


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE. Field names follow SAELens where SAELens has the field."""

    d_in: int
    """Input width: the activation size the SAE reads (e.g. the model's d_model at the hook)."""
    d_sae: int
    """Dictionary size: the number of latents."""
    architecture: Architecture = "topk"
    """Selection rule: relu, topk (TopK then ReLU), topk_abs (signed top-|u|), jumprelu or gated."""
    k: int | None = None
    """Number of active latents (topk and topk_abs only)."""
    tied: bool = False
    """Decoder is the encoder's transpose (W_dec = W_enc.T); not allowed with a closed-form decoder."""
    apply_b_dec_to_input: bool = False
    """Encode x - b_dec instead of x (SAELens option)."""
    seed: int = 0
    """Seed of the initial weights (a private generator; the global RNG is never touched)."""
    dtype: DType = "float32"
    """Parameter dtype; float16/bfloat16 SAEs train in mixed precision (see SGDConfig)."""
    device: str = "cpu"
    """Device of the parameters ("cpu", "cuda", "cuda:1", "mps")."""
    jumprelu_init_threshold: float = 0.001
    """Initial threshold theta of every latent (jumprelu only)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance: model_name, hook_name, layers, ... (SAELens `metadata`)."""
    score_order: Literal["matmul", "linear"] = "matmul"
    """How the scores are rounded (equal in exact arithmetic): "matmul" computes (x - b_dec) @ W_enc + b_enc with
    W_enc held [d_in, d_sae] row-major, as SAELens; "linear" computes nn.functional.linear(x - b_dec, W_enc.T,
    b_enc) with W_enc.T held row-major (nn.Linear's weight), as sparsify and dictionary_learning. A loaded SAE
    keeps its library's order, so its active sets equal the library's bit for bit in every dtype."""
    w_enc_layout: Literal["row_major", "column_major"] | None = None
    """How W_enc [d_in, d_sae] is held in memory; None = as score_order's library holds it (row-major for
    "matmul", column-major for "linear": W_enc.T is then nn.Linear's row-major weight). float16 matmuls on CPU
    round differently for a transposed operand, and dictionary_learning's modules hold their encoders the other
    way round, so an SAE read from there records the layout its loader builds."""
    topk_ties: Literal["lowest_index", "torch", "torch_relu"] = "lowest_index"
    """Which of several exactly tied k-th scores TopK takes (topk/topk_abs): "lowest_index" (the same on every
    device), "torch" (those torch.topk picks from the scores, as SAELens), "torch_relu" (those torch.topk picks
    from relu(scores), as sparsify and dictionary_learning). Ties are common in half precision."""
    reshape_activations: Literal["none", "hook_z"] = "none"
    """"hook_z": inputs may also be [..., n_heads, d_head] (attention hook_z), flattened to d_in, as SAELens."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.architecture, str) or self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture in TOPK_ARCHITECTURES:
            if self.k is None:
                raise ConfigError(f"architecture {self.architecture!r} needs k (the number of active latents)")
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
                raise ConfigError(f"k must be an integer with 1 <= k <= d_sae={self.d_sae}, got {self.k!r}")
        elif self.k is not None:
            raise ConfigError(f"k={self.k} given but architecture {self.architecture!r} does not use k")
        if self.score_order not in SCORE_ORDERS:
            raise ConfigError(f"score_order must be one of {SCORE_ORDERS}, got {self.score_order!r}")
        if self.w_enc_layout not in (None, "row_major", "column_major"):
            raise ConfigError(f"w_enc_layout must be 'row_major', 'column_major' or None, got {self.w_enc_layout!r}")
        if self.topk_ties not in kernels.TIES:
            raise ConfigError(f"topk_ties must be one of {kernels.TIES}, got {self.topk_ties!r}")
        if self.reshape_activations not in RESHAPES:
            raise ConfigError(f"reshape_activations must be one of {RESHAPES}, got {self.reshape_activations!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"device {self.device!r} is not a valid torch device: {e}") from None
        check_dataclass_types(self, "SAEConfig")  # the remaining fields (tied, seed, metadata, ...)
        if not 0 <= self.seed < 2**64:  # torch.Generator's range
            raise ConfigError(f"seed must be in [0, 2**64), got {self.seed}")
        self.check_fits("cpu")  # refuse a model this machine cannot build before `SAE(cfg)` allocates anything

    def parameter_bytes(self) -> int:
        """Bytes of the SAE's parameters on its device (W_enc, W_dec unless tied, and the vectors)."""
        itemsize = DTYPES[self.dtype].itemsize
        n_vectors = self.d_in + self.d_sae * (3 if self.architecture == "gated" else 1)
        matrices = self.d_in * self.d_sae * (1 if self.tied else 2)
        threshold = self.d_sae * max(itemsize, 4) if self.architecture == "jumprelu" else 0
        return (matrices + n_vectors) * itemsize + threshold

    def init_peak_bytes(self) -> int:
        """Peak host memory of building `SAE(self)`: the initial decoder is drawn and normalised in float64 on the
        CPU (two float64 d_sae x d_in copies at the peak, 16 bytes a weight), then cast to the parameters."""
        matrix = self.d_in * self.d_sae
        host_params = 0
        if torch.device(self.device).type == "cpu":  # a float64 W_dec is the drawn copy itself, not a new one
            host_params = self.parameter_bytes() - (8 * matrix if self.dtype == "float64" and not self.tied else 0)
        return max(16 * matrix, 8 * matrix + host_params)

    def check_fits(self, device: str | torch.device | None = None) -> None:
        """TooLargeError (with the sizes) if this SAE cannot be built on this machine or held on `device`
        (default: its own), checked up front; the CLI calls it before any work."""
        sizes = f"SAEConfig(d_in={self.d_in}, d_sae={self.d_sae})"
        n = self.d_in * self.d_sae
        memory.check_fits(self.init_peak_bytes(), "cpu",
                          f"building SAE({sizes}) ({n:.3g} weights per matrix, drawn in float64)")
        dev = torch.device(self.device if device is None else device)
        if dev.type != "cpu":
            memory.check_fits(self.parameter_bytes(), dev, f"the {self.dtype} parameters of {sizes}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def w_enc_row_major(self) -> bool:
        """Whether W_enc is held row-major ([d_in, d_sae] contiguous): `w_enc_layout`, or its score order's."""
        if self.w_enc_layout is not None:
            return self.w_enc_layout == "row_major"
        return self.score_order == "matmul"

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


def topk_indices(scores: torch.Tensor, k: int, ties: str = "lowest_index") -> torch.Tensor:
    """Indices of the k largest scores along the last dim, in decreasing order, ties towards the lower index
    (or as `ties` says: `splinterp.kernels.TIES`).

    torch.topk promises no order among equal values; this is the canonical selection every TopK code and
    region key uses (`splinterp.kernels.topk_select`, which also makes it cheap on CPU).
    """
    if scores.ndim == 0:
        raise ShapeError("scores must have at least one dimension")
    flat = scores.reshape(-1, scores.shape[-1])
    return kernels.topk_select(flat, k, ties).view(*scores.shape[:-1], k)


def _flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}")
    return value


class SAE(nn.Module):
    """A sparse autoencoder with SAELens parameter names: W_enc [d_in, d_sae], b_enc [d_sae],
    W_dec [d_sae, d_in], b_dec [d_in]; `threshold` (jumprelu); `b_gate`, `b_mag`, `r_mag` (gated, which
    has no b_enc, as in SAELens)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise ConfigError(f"SAE(cfg) takes an SAEConfig, got {type(cfg).__name__}")
        check_device(cfg.device, "SAEConfig.device")  # a device this process has, before allocating
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        gen = torch.Generator().manual_seed(cfg.seed)
        # unit-norm decoder rows, encoder = decoder transpose: the usual SAELens / sparsify initialisation
        w_dec = torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        dt, dev = cfg.torch_dtype, torch.device(cfg.device)

        def param(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.to(device=dev, dtype=dt).contiguous())

        # W_enc [d_in, d_sae] is held in the layout of the library whose scores the SAE reproduces (see
        # SAEConfig.w_enc_layout: float16 matmuls on CPU round differently for a transposed operand). Always its
        # own storage, never W_dec's.
        # Built with one allocation in the target dtype (no transposed temporary: `init_peak_bytes` counts on it).
        if cfg.w_enc_row_major:
            w_enc = torch.empty((d_in, d_sae), dtype=dt, device=dev).copy_(w_dec.T)
        else:
            w_enc = w_dec.to(device=dev, dtype=dt, copy=True).T
        self.W_enc = nn.Parameter(w_enc)
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

    @classmethod
    def from_weights(
        cls,
        W_enc,
        b_enc=None,
        W_dec=None,
        b_dec=None,
        *,
        architecture: str = "relu",
        k: int | None = None,
        threshold=None,
        b_gate=None,
        b_mag=None,
        r_mag=None,
        orientation: Literal["saelens", "linear"] | None = None,
        apply_b_dec_to_input: bool = False,
        score_order: Literal["matmul", "linear"] | None = None,
        dtype: str | None = None,
        device: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> SAE:
        """An SAE from raw weights (tensors or arrays), for SAEs that come as plain matrices.

        orientation: "saelens" (W_enc [d_in, d_sae], as `x @ W_enc`) or "linear" (W_enc [d_sae, d_in], an
        nn.Linear weight). The sizes of b_dec (d_in) and of b_enc / threshold / gate biases (d_sae) tell it;
        when they cannot (d_in == d_sae, or no biases), pass it: a square W_enc is refused rather than guessed.
        W_dec ([d_sae, d_in], or [d_in, d_sae] as an nn.Linear decoder; its orientation follows from its shape,
        or from `orientation` when square) defaults to tied (W_enc's transpose); missing biases are zeros. A
        scalar threshold is one global threshold (BatchTopK at inference). score_order defaults to "linear"
        for nn.Linear weights, else "matmul"; dtype and device default to W_enc's.
        """
        fields, tensors = state_from_weights(
            W_enc, b_enc, W_dec, b_dec, architecture=architecture, k=k, threshold=threshold, b_gate=b_gate,
            b_mag=b_mag, r_mag=r_mag, orientation=orientation, apply_b_dec_to_input=apply_b_dec_to_input,
            score_order=score_order, dtype=dtype, device=device, metadata=metadata,
        )
        try:
            cfg = SAEConfig(**fields)
        except ConfigError as e:
            raise ConfigError(f"from_weights: {e}") from None
        return cls.from_tensors(cfg, tensors, "from_weights")

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: dict[str, torch.Tensor], source: Any = "tensors",
                     exact_dtype: bool = False, *, device: str | torch.device | None = None,
                     dtype: str | torch.dtype | None = None) -> SAE:
        """Our SAE holding `tensors` (SAELens names), checked against `cfg`; optionally on another device / dtype.

        Each weight is copied into a parameter of the SAE's own layout (`SAEConfig.score_order`) and dtype.
        """
        check_tensors(cfg, tensors, source, exact_dtype)
        if cfg.tied and not torch.equal(tensors["W_dec"], tensors["W_enc"].T):
            raise CorruptFileError(f"{source}: the config says tied but W_dec != W_enc.T")
        changes: dict[str, Any] = {}
        if device is not None:
            changes["device"] = str(device)
        if dtype is not None:
            changes["dtype"] = dtype_name(dtype, "dtype=")
        try:
            cfg = cfg.replace(**changes)
        except ConfigError as e:
            raise ConfigError(f"load({', '.join(f'{k}={v!r}' for k, v in changes.items())}): {e}") from None
        try:
            sae = cls(cfg)
        except SplinterpError:
            raise
        except (RuntimeError, ValueError, TypeError, OverflowError) as e:  # e.g. a threshold that overflows the dtype
            raise ConfigError(f"{source}: cannot build an SAE from its config: {e}") from None
        with torch.no_grad():
            for name in expected_shapes(cfg):
                if name == "W_dec" and cfg.tied:
                    continue
                p = getattr(sae, name)
                p.copy_(tensors[name].to(device=p.device, dtype=p.dtype))
        if dtype is not None:
            for name in expected_shapes(cfg):  # a cast to a narrower dtype must not overflow
                try:
                    check_finite(getattr(sae, name).detach(), name=name)
                except NonFiniteError as e:
                    raise ConfigError(f"{source}: cannot cast to {cfg.dtype}: {e}") from None
        return sae

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
        "affine scores + selection rule" and the geometry (sites, pieces) needs no special cases. The same
        map as `pre_acts` in exact arithmetic; `pre_acts` rounds as the SAE's library does.
        """
        W, b = self.encoder_weights()
        if self.cfg.apply_b_dec_to_input:
            b = b - self.b_dec @ W
        return W, b

    def encoder_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) applied to `encoder_input(x)`: (W_enc, b_enc), or for gated the magnitude path
        (W_enc * exp(r_mag), b_mag). Unlike `encoder_affine`, b_dec is not folded in."""
        if self.cfg.architecture == "gated":
            return self.W_enc * torch.exp(self.r_mag), self.b_mag
        return self.W_enc, self.b_enc

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder's matmul sees: x - b_dec with `apply_b_dec_to_input`, else x itself."""
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

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
        """Validate x [..., d_in]; a hook_z SAE also takes [..., n_heads, d_head], flattened as SAELens does."""
        if (
            self.cfg.reshape_activations == "hook_z"
            and isinstance(x, torch.Tensor)
            and x.ndim >= 2
            and x.shape[-1] != self.cfg.d_in
            and x.shape[-2] * x.shape[-1] == self.cfg.d_in
        ):
            x = x.flatten(-2)
        return check_batch(x, self.cfg.d_in, name=name, dtype=self.dtype, device=self.device)

    def _scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(u [..., d_sae], gate) for x [..., d_in]: the scores rounded as the SAE's library computes them, and
        for gated the gate path's bool mask (None otherwise)."""
        x2 = self.encoder_input(x.reshape(-1, self.cfg.d_in))
        if self.cfg.architecture == "gated":
            pi_gate, u = self._gated_paths(x2)
            shape = (*x.shape[:-1], self.cfg.d_sae)
            return u.reshape(shape), (pi_gate > 0).reshape(shape)
        u = kernels.affine_scores(x2, self.W_enc, self.b_enc, linear=self.cfg.score_order == "linear")
        return u.reshape(*x.shape[:-1], self.cfg.d_sae), None

    def _gated_paths(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.score_order == "linear":  # dictionary_learning: one matmul for both paths, biases after it
            xe = x2 @ self.W_enc
            return xe + self.b_gate, torch.exp(self.r_mag) * xe + self.b_mag
        # SAELens: the magnitude path multiplies W_enc by exp(r_mag) first
        return x2 @ self.W_enc + self.b_gate, x2 @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag

    def gated_paths(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated only: (pi_gate, pi_mag) [N, d_sae] of a batch x [N, d_in], with gradients (the gated loss needs
        the gate scores themselves, not only their sign), rounded as the SAE's library computes them."""
        if self.cfg.architecture != "gated":
            raise ConfigError(f"gated_paths is for gated SAEs, not {self.cfg.architecture!r}")
        return self._gated_paths(self.encoder_input(self._check(x)))

    def _pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return self._scores(x)[0]

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Scores u(x) [..., d_sae] (for gated: the magnitude path), rounded as the SAE's library rounds them."""
        return self._pre_acts(self._check(x))

    def select_topk(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK architectures only: (indices [..., k] of the selected latents, bool [..., k] active).

        topk ranks u and keeps a selected latent only if u > 0 (TopK then ReLU); topk_abs ranks |u| and
        keeps every selected latent (signed value). Ties towards the lower index (see the module docstring).
        """
        arch = self.cfg.architecture
        if arch not in TOPK_ARCHITECTURES:
            raise ConfigError(f"select_topk is for topk/topk_abs SAEs, not {arch!r}")
        idx = topk_indices(u.abs() if arch == "topk_abs" else u, self.cfg.k, self.cfg.topk_ties)
        if arch == "topk":
            return idx, u.gather(-1, idx) > 0
        return idx, torch.ones(idx.shape, dtype=torch.bool, device=idx.device)

    def select(self, u: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The selection rule: bool mask of active latents given scores u [..., d_sae].

        Gated SAEs decide on their gate path: pass the input x the scores came from and the gate is computed
        as the SAE's library computes it (bit for bit); without x it is read off u and the folded thresholds
        (`thresholds()`), which is the same rule in exact arithmetic.
        """
        arch = self.cfg.architecture
        if arch == "relu":
            return u > 0
        if arch == "gated" and x is not None:
            return self._scores(self._check(x))[1] & (u > 0)
        if arch in ("jumprelu", "gated"):
            return u > self.thresholds().to(u.dtype)
        idx, active = self.select_topk(u)
        return torch.zeros(u.shape, dtype=torch.bool, device=u.device).scatter_(-1, idx, active)

    def _mask(self, u: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        if gate is not None:
            return gate & (u > 0)
        return self.select(u)

    def active(self, x: torch.Tensor) -> torch.Tensor:
        """bool [..., d_sae]: the latents `encode` makes active on x (non-zero, except a selected score of 0)."""
        x = self._check(x)
        with torch.no_grad():
            u, gate = self._scores(x)
            return self._mask(u, gate)

    def _code(self, x: torch.Tensor, dense: bool = False,
              sparse_out: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The one encoding path. Code of x [N, d_in]: (values, indices) when sparse, (z, None) when dense.

        TopK codes always go sparse (see splinterp.kernels); threshold codes only while sparse enough to pay,
        or always with `sparse_out` (encode_sparse). `dense=True` or `kernels.dense_reference()` computes with
        the plain formulas (and with `sparse_out` reads the active entries off them).
        """
        topk = self.cfg.architecture in TOPK_ARCHITECTURES
        if dense or not kernels.sparse_enabled() or x.shape[0] == 0:  # an empty batch needs no kernel
            u, gate = self._scores(x)
            if not sparse_out:
                return u * self._mask(u.detach(), gate), None
            if topk:
                idx, live = self.select_topk(u.detach())
            else:
                idx, live = kernels.mask_to_padded(self._mask(u.detach(), gate))
            return u.gather(-1, idx) * live, idx
        W, b = self.encoder_weights()
        if topk:
            return kernels.encode_topk(self.encoder_input(x), W, b, self.cfg.k,
                                       absolute=self.cfg.architecture == "topk_abs",
                                       linear=self.cfg.score_order == "linear", ties=self.cfg.topk_ties)
        u, gate = self._scores(x)
        mask = self._mask(u.detach(), gate)
        if sparse_out or kernels.is_sparse_enough(mask):
            return kernels.encode_masked(self.encoder_input(x), W, b, u.detach(), mask)
        return u * mask, None

    def _encode(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        a, idx = self._code(x.reshape(-1, self.cfg.d_in), dense)
        z = a if idx is None else kernels.densify(a, idx, self.cfg.d_sae)
        return z.reshape(*x.shape[:-1], self.cfg.d_sae)

    def encode(self, x: torch.Tensor, dense: bool = False) -> torch.Tensor:
        """Dense code z [..., d_sae]: z_i = u_i on active latents, 0 elsewhere."""
        return self._encode(self._check(x), _flag(dense, "dense"))

    def encode_sparse(self, x: torch.Tensor, dense: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse code (values [..., m], indices [..., m]), differentiable in values.

        TopK: m = k, in decreasing order of the ranking score (ties towards the lower index); for topk
        a selected latent with u <= 0 has value 0. Threshold rules: m = the most active latents in a
        row, shorter rows padded with index 0 and value 0.
        """
        x, dense = self._check(x), _flag(dense, "dense")
        x2 = x.reshape(-1, self.cfg.d_in)
        if x2.shape[0] == 0:  # empty batch: k columns for TopK, none for threshold rules
            m = self.cfg.k if self.cfg.architecture in TOPK_ARCHITECTURES else 0
            vals = (x2 @ self.encoder_weights()[0][:, :m]).reshape(*x.shape[:-1], m)
            return vals, torch.zeros(vals.shape, dtype=torch.int64, device=x.device)
        vals, idx = self._code(x2, dense, sparse_out=True)
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
        """Reconstruction x_hat, shaped as x (sparse end to end for TopK; dense=True: plain formulas)."""
        shape = x.shape if isinstance(x, torch.Tensor) else None
        x = self._check(x)
        # a hook_z input [..., n_heads, d_head] comes back in that shape
        return self._reconstruct(x.reshape(-1, self.cfg.d_in), dense).x_hat.reshape(shape)

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}{k}, tied={c.tied}, dtype={c.dtype}"


def make_sae(d_in: int, d_sae: int, architecture: str = "topk", k: int | None = None, **kwargs) -> SAE:
    """Shorthand for SAE(SAEConfig(...))."""
    return SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, **kwargs))
