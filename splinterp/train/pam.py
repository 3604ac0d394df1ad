"""PAM-SGD (paper_splinterp.md section 4): alternate
(1) an SGD / Adam pass over the data on the encoder parameters with the decoder frozen, plus optional
    proximal terms mu_enc |W_enc - W_enc^t|^2 + nu_enc |b - b^t|^2 towards the previous outer iterate, and
(2) the exact closed-form joint solve of (W_dec, b_dec) over the whole training set, accumulated over
    batches (`DecoderAccumulator`), with ridge (alpha, beta) and proximal (mu_dec, nu_dec) terms.
The decoder is an ordinary parameter of the SAE (saved and checkpointed with it). It is frozen with
requires_grad=False during the encoder pass, so it never collects gradients (no stale gradient can leak
into clipping), and the optimiser only ever holds encoder parameters.
"""

from __future__ import annotations

from typing import Any

import torch

from splinterp.errors import ConfigError
from splinterp.sae import SAE
from splinterp.train.config import PAMConfig
from splinterp.train.decoder import DecoderAccumulator, SparseCodes
from splinterp.train.engine import DECODER_PARAMS, Callback, Trainer, encoder_parameter_names
from splinterp.train.history import History


class PAMTrainer(Trainer):
    method = "pam_sgd"
    cfg: PAMConfig

    def check_config(self) -> None:
        sc = self.sae.cfg
        if sc.tied:
            raise ConfigError("PAM-SGD solves the decoder in closed form and needs an untied SAE (tied=False)")
        if sc.apply_b_dec_to_input:
            raise ConfigError("PAM-SGD needs apply_b_dec_to_input=False: with it b_dec also moves the codes, so "
                              "the closed-form decoder step would no longer be an exact block minimisation")
        self.anchor: dict[str, torch.Tensor] = {}

    def trainable_names(self) -> list[str]:
        return encoder_parameter_names(self.sae)

    def setup(self) -> None:
        self._frozen = []
        for n in DECODER_PARAMS:
            p = getattr(self.sae, n)
            if p.requires_grad:
                p.requires_grad_(False)
                p.grad = None
                self._frozen.append(p)

    def teardown(self) -> None:
        for p in self._frozen:
            p.requires_grad_(True)

    @torch.no_grad()
    def solve_decoder(self) -> None:
        c, sae = self.cfg, self.sae
        acc = DecoderAccumulator(sae.cfg.d_sae, sae.cfg.d_in, device=self.device, method=c.decoder_method)
        for x in self.src.sequential(c.decoder_batch_size):
            vals, idx = sae.encode_sparse(x)  # TopK: k (value, index) pairs per row, never the dense code
            acc.update(SparseCodes(vals, idx, sae.cfg.d_sae), x, check=False)  # data validated up front
        self.reduce_decoder_statistics(acc)
        W, b = acc.solve(c.alpha, c.beta, c.mu_dec, c.nu_dec, W_prev=sae.W_dec, b_prev=sae.b_dec,
                         out_dtype=sae.dtype, scale=c.decoder_scale)
        sae.W_dec.copy_(W)
        sae.b_dec.copy_(b)

    def reduce_decoder_statistics(self, acc: DecoderAccumulator) -> None:
        """Hook before the solve: combine the statistics of every process (splinterp.distributed)."""

    def before_sgd(self, resumed_mid_epoch: bool) -> None:
        if resumed_mid_epoch:
            return  # decoder (decoder_first) and anchor were restored from the checkpoint
        if self.cfg.order == "decoder_first":
            self.solve_decoder()
        if self.cfg.mu_enc > 0 or self.cfg.nu_enc > 0:
            self.anchor = {n: p.detach().clone() for n, p in zip(self.train_names, self.train_params)}

    def after_sgd(self) -> None:
        if self.cfg.order == "encoder_first":
            self.solve_decoder()

    def extra_loss(self) -> torch.Tensor | None:
        c = self.cfg
        if not self.anchor:
            return None
        total = None
        for n, p in zip(self.train_names, self.train_params):
            w = c.mu_enc if p.ndim >= 2 else c.nu_enc
            if w == 0:
                continue
            term = w * (p - self.anchor[n]).pow(2).sum()
            total = term if total is None else total + term
        return total

    def extra_tensors(self) -> dict[str, Any]:
        return {"anchor": {n: t.cpu() for n, t in self.anchor.items()}}

    def load_extra_tensors(self, tensors: dict[str, Any]) -> None:
        self.anchor = {n: t.to(self.device) for n, t in tensors.get("anchor", {}).items()}


def train_pam_sgd(sae: SAE, data, cfg: PAMConfig | None = None, *, eval_data=None,
                  callback: Callback | None = None) -> History:
    """Train an untied `sae` in place with PAM-SGD; same inputs and History as `train_sgd`."""
    cfg = cfg if cfg is not None else PAMConfig()
    if not isinstance(cfg, PAMConfig):
        raise ConfigError(f"cfg must be a PAMConfig, got {type(cfg).__name__}")
    return PAMTrainer(sae, data, cfg, eval_data=eval_data, callback=callback).run()
