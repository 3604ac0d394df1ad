"""Mixed precision for half-precision SAEs: float32 master weights and optimiser state, and for float16 a
dynamic loss scale.

Why: an optimiser stepping float16 / bfloat16 parameters directly loses the update (a step of lr = 1e-3
relative to a weight is below bfloat16's 8-bit mantissa), and Adam in float16 divides by sqrt(v) + eps
with eps = 1e-8 rounded to 0 and v = g^2 underflowing to 0, which gives 0/0 = nan on the first step. So
the optimiser owns float32 copies ("masters") of the trained parameters: the forward and backward passes
run in the SAE's dtype, the gradients are moved to the masters in float32, the optimiser steps there, and
the result is rounded back into the SAE's parameters.

float16 gradients also underflow (a mean-squared-error gradient is 2 (x_hat - x) / (B d_in), about 1e-6 for
a batch of 4096 x 784, under float16's smallest normal number 6e-5), so for float16 the loss is multiplied
by a scale S before backward and the gradients divided by S in float32. S starts at 2^15 (2^16 would
overflow float16 itself), halves whenever a gradient comes back non-finite (that step is skipped: the
masters and the optimiser state do not move) and doubles after `GROWTH_INTERVAL` finite steps in a row,
as torch.amp.GradScaler does. bfloat16 has float32's exponent range and needs no scale.

Parameters that are float32 already (JumpReLU thresholds in a half SAE) are their own masters.
"""

from __future__ import annotations

from typing import Any

import torch

from splinterp.errors import NonFiniteError
from splinterp.validation import all_finite

HALF_DTYPES = (torch.float16, torch.bfloat16)
INIT_SCALE = 2.0 ** 15
MAX_SCALE = 2.0 ** 15
GROWTH_INTERVAL = 2000


def needs_masters(params: list[torch.nn.Parameter]) -> bool:
    """Whether any trained parameter is half precision (then the trainer keeps float32 masters)."""
    return any(p.dtype in HALF_DTYPES for p in params)


class MasterWeights:
    """float32 masters of `params` (the SAE's trained parameters) and, for float16, the loss scale."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = list(params)
        self.masters = [p if p.dtype == torch.float32 else _master(p) for p in self.params]
        self.scaled = any(p.dtype == torch.float16 for p in self.params)
        self.scale = INIT_SCALE if self.scaled else 1.0
        self.good_steps = 0

    def master_of(self, p: torch.nn.Parameter) -> torch.Tensor:
        for q, m in zip(self.params, self.masters):
            if q is p:
                return m
        raise KeyError("not a trained parameter")

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate loss (times the loss scale for float16) into the SAE's parameters."""
        if self.scaled:
            (loss.float() * self.scale).backward()
        else:
            loss.backward()

    @torch.no_grad()
    def grads_to_masters(self) -> bool:
        """Move the gradients onto the masters in float32 (unscaled). For float16, False if any is not
        finite: that step must be skipped (a too large loss scale). bfloat16 steps whatever it gets, so a
        diverging run shows up in its loss as in float32."""
        inv = 1.0 / self.scale
        total = None
        for p, m in zip(self.params, self.masters):
            g = p.grad
            if g is None:
                if m is not p:
                    m.grad = None
                continue
            if m is p:
                if self.scaled:
                    g.mul_(inv)
            else:
                g32 = g.float()  # a new float32 tensor with the parameter's strides
                m.grad = g32.mul_(inv) if self.scaled else g32
                p.grad = None
            if self.scaled:
                s = m.grad.sum()
                total = s if total is None else total + s
        return total is None or all_finite(total)

    @torch.no_grad()
    def update_scale(self, finite: bool) -> None:
        if not self.scaled:
            return
        if not finite:
            if self.scale <= 1.0:
                raise NonFiniteError("float16 gradients are not finite even without loss scaling; train this SAE "
                                     "in bfloat16 or float32")
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= GROWTH_INTERVAL:
            self.scale = min(self.scale * 2.0, MAX_SCALE)
            self.good_steps = 0

    @torch.no_grad()
    def masters_to_params(self) -> None:
        """Round the stepped masters back into the SAE's parameters."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)

    def state_dict(self) -> dict[str, Any]:
        return {"masters": [m.detach().cpu().clone() for m in self.masters],
                "scale": torch.tensor(self.scale, dtype=torch.float64),
                "good_steps": torch.tensor(self.good_steps, dtype=torch.int64)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m, saved in zip(self.masters, state["masters"], strict=True):
            m.copy_(saved.to(device=m.device, dtype=m.dtype))
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])


def _master(p: torch.nn.Parameter) -> torch.Tensor:
    """A float32 leaf copy of p with p's strides (W_enc is column-major, see splinterp.sae)."""
    m = torch.empty_strided(p.shape, p.stride(), dtype=torch.float32, device=p.device)
    m.copy_(p.detach())
    return m.requires_grad_(True)
