"""An SAE's scores as the geometry reads them: checked for overflow, or as float64 affine maps.

Two needs, one place each:
- `checked_scores(sae, x)`: `sae.pre_acts(x)` in the SAE's dtype, refusing scores that are not finite.
  Finite inputs can overflow (3e38 into a float32 SAE, 6e4 into a float16 one); the selection rule on inf or
  NaN scores is meaningless, so every geometry entry point that reads regions from scores goes through here.
- `encoder_f64(sae)`: (W [d_in, d_sae], b [d_sae], theta [d_sae] or None) as float64 numpy, from
  `SAE.encoder_affine` and `SAE.thresholds` (everything folded in), for the exact float64 geometry.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from splinterp.errors import ScoreOverflowError
from splinterp.sae import SAE
from splinterp.validation import all_finite


def check_scores(u: torch.Tensor, dtype, row_offset: int = 0, name: str = "X") -> torch.Tensor:
    """u itself, or ScoreOverflowError naming the first row whose scores are inf or NaN."""
    if all_finite(u):
        return u
    bad = (~torch.isfinite(u)).nonzero()[0].tolist()
    row = bad[0] + row_offset if u.ndim > 1 else 0
    raise ScoreOverflowError(
        f"the encoder scores of {name} row {row} overflow {dtype} (score {u[tuple(bad)].item()} for latent "
        f"{bad[-1]}) although the input is finite: its region is not defined in {dtype}. Scale the input down, "
        "or use a wider dtype (sae.double())"
    )


def check_score_gaps(S: np.ndarray, row_offset: int = 0, name: str = "X") -> np.ndarray:
    """float64 site scores S [B, M] whose differences (what distances and rankings use) are finite too:
    2 S finite implies every S_p - S_q is."""
    check_scores(torch.from_numpy(2.0 * S), "float64 (score differences)", row_offset, name)
    return S


def checked_scores(sae: SAE, x: torch.Tensor, row_offset: int = 0, name: str = "X") -> torch.Tensor:
    """`sae.pre_acts(x)` [..., d_sae], refusing non-finite scores (see the module docstring)."""
    return check_scores(sae.pre_acts(x), sae.dtype, row_offset, name)


class EncoderF64(NamedTuple):
    """The SAE's affine scores u(x) = x @ W + b and thresholds theta (None: 0), float64 numpy."""

    W: np.ndarray
    b: np.ndarray
    theta: np.ndarray | None
    architecture: str
    k: int | None


@torch.no_grad()
def encoder_f64(sae: SAE) -> EncoderF64:
    W, b = sae.encoder_affine()
    th = sae.thresholds()
    return EncoderF64(
        W.detach().cpu().double().numpy(),
        b.detach().cpu().double().numpy(),
        None if th is None else th.detach().cpu().double().numpy(),
        sae.cfg.architecture,
        sae.cfg.k,
    )
