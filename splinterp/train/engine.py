"""The epoch loop shared by the SGD and PAM-SGD trainers: batches, optimiser steps, evaluation, History,
checkpoints and resume. A trainer subclass says which parameters the optimiser owns and what happens
before and after the SGD pass of each epoch (PAM: the closed-form decoder solve).

Resume is exact on CPU: the model, the optimiser state, every RNG (torch, CUDA, numpy, python and the
shuffle generator), the data position (shuffle-generator state at the start of the epoch + batches done),
the running loss sums and the History are restored, so a run stopped after any checkpoint and resumed
ends with the same bits as a run that never stopped.

Speed: the optimiser is torch's fastest exact implementation for the device (`fused=True` where torch has
it, else `foreach=True`, else the plain loop): the same update, with the per-parameter elementwise passes
fused into one kernel. Half-precision SAEs train with float32 master weights (`splinterp.train.precision`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from splinterp import metrics
from splinterp.errors import ConfigError, DeviceError, NonFiniteError, NotAModelError
from splinterp.sae import SAE
from splinterp.train import checkpoint as ckpt
from splinterp.train import losses
from splinterp.train.config import RESUME_MUTABLE, SGDConfig
from splinterp.train.data import BatchSource
from splinterp.train.history import History
from splinterp.train.loss_registry import get_loss
from splinterp.train.precision import MasterWeights, needs_masters
from splinterp.validation import check_data

log = logging.getLogger(__name__)

DECODER_PARAMS = ("W_dec", "b_dec")


@dataclass
class TrainEvent:
    """Passed to the trainer's callback after each mini-batch ("step") and each epoch ("epoch")."""

    kind: str
    epoch: int
    """Epochs completed."""
    batch: int
    """Batches done in the current epoch (0 at an epoch end)."""
    step: int
    """Optimiser steps so far."""
    record: dict[str, Any] | None = None
    """The epoch's History record (epoch events)."""


Callback = Callable[[TrainEvent], None]


def encoder_parameter_names(sae: SAE) -> list[str]:
    """Every trainable parameter of the SAE except the decoder (W_dec, b_dec)."""
    return [n for n, _ in sae.named_parameters() if n not in DECODER_PARAMS]


def fastest_optimizer(cls: type[torch.optim.Optimizer], params, **kwargs) -> torch.optim.Optimizer:
    """`cls(params, **kwargs)` with torch's fastest implementation of the same update that accepts these
    parameters: fused, else foreach, else the plain per-parameter loop."""
    params = list(params)
    for impl in ({"fused": True}, {"foreach": True}):
        try:
            return cls(params, **kwargs, **impl)
        except (RuntimeError, ValueError, TypeError):  # this torch has no such kernel for the device / dtype
            continue
    return cls(params, **kwargs)


def is_fused(opt: torch.optim.Optimizer) -> bool:
    return bool(opt.defaults.get("fused"))


@torch.no_grad()
def match_grad_strides(params) -> None:
    """Give every gradient its parameter's memory layout. Why: torch's fused CPU Adam (2.13) walks a
    parameter and its gradient as if they had the same strides, so a row-major gradient of the column-major
    W_enc gets a wrong update (measured: 0.09 off after 5 steps). Autograd already hands out gradients in
    their parameter's layout; this guards gradients written by other code (e.g. a gradient hook)."""
    for p in params:
        g = p.grad
        if g is not None and g.stride() != p.stride():
            p.grad = torch.empty_strided(p.shape, p.stride(), dtype=g.dtype, device=g.device).copy_(g)


def _resolve_device(sae: SAE, device: str | None) -> torch.device:
    if device is None:
        return sae.device
    want = torch.device(device)
    have = sae.device
    if want.type != have.type or (want.index is not None and want.index != have.index):
        raise DeviceError(f"config device is {want} but the SAE is on {have}; move the SAE first "
                          f"(SAE(cfg.replace(device=...)) or splinterp.load(..., device=...))")
    return have


class Trainer:
    method = "base"

    def __init__(self, sae: SAE, data, cfg: SGDConfig, eval_data=None, callback: Callback | None = None):
        if not isinstance(sae, SAE):
            raise NotAModelError(f"sae: the trainers train a splinterp SAE, got {type(sae).__name__} (an SAE from "
                                 "SAELens, sparsify or dictionary_learning: convert it with splinterp.as_sae)")
        self.sae, self.cfg, self.callback = sae, cfg, callback
        self.device = _resolve_device(sae, cfg.device)
        self.loss_fn = get_loss(sae.architecture)
        self.src = BatchSource(data, sae.cfg.d_in, sae.dtype, self.device, name="data")
        if eval_data is not None and (isinstance(eval_data, torch.Tensor) or hasattr(eval_data, "__array__")):
            eval_data = check_data(eval_data, sae.cfg.d_in, name="eval_data", dtype=sae.dtype)
        self.eval_data = eval_data
        self.check_config()
        self._check_aux_k()
        named = dict(sae.named_parameters())
        self.train_names = self.trainable_names()
        self.train_params = [named[n] for n in self.train_names]
        # half-precision SAEs: the optimiser steps float32 masters (None: it steps the parameters themselves)
        self.mixed = MasterWeights(self.train_params) if needs_masters(self.train_params) else None
        self.opt_params = self.train_params if self.mixed is None else self.mixed.masters
        enc = set(encoder_parameter_names(sae))
        clip = (self.train_params if cfg.grad_clip_scope == "all"
                else [named[n] for n in self.train_names if n in enc])
        self.clip_params = clip if self.mixed is None else [self.mixed.master_of(p) for p in clip]
        self.opt = self.make_optimizer()
        self.fused = is_fused(self.opt)
        # AuxK: samples since each latent last fired (a latent is dead after cfg.dead_after_samples)
        self.since_fired = (torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=self.device)
                            if cfg.aux_k > 0 else None)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.epoch = 0
        self.batch = 0
        self.step = 0
        self.epoch_gen_state = self.gen.get_state()
        self.run_sums: dict[str, torch.Tensor] = {}
        self.run_count = 0
        self.wall_time = 0.0
        self.epoch_time_acc = 0.0
        self.history = History(method=self.method, config={"trainer": cfg.to_dict(), "sae": sae.cfg.to_dict()})

    # ------------------------------------------------------------------ hooks for subclasses
    def check_config(self) -> None:
        pass

    def _check_aux_k(self) -> None:
        c, arch = self.cfg, self.sae.architecture
        if c.aux_k == 0:
            return
        if arch not in ("topk", "topk_abs"):
            raise ConfigError(f"aux_k is for TopK SAEs (topk, topk_abs), not {arch!r}; set aux_k=0")
        if self.loss_fn is not losses.mse_loss:
            raise ConfigError(f"aux_k adds to the built-in TopK loss, but a custom loss is registered for {arch!r}")

    def trainable_names(self) -> list[str]:
        return [n for n, _ in self.sae.named_parameters()]

    def before_sgd(self, resumed_mid_epoch: bool) -> None:
        pass

    def after_sgd(self) -> None:
        pass

    def extra_loss(self) -> torch.Tensor | None:
        return None

    def after_backward(self, x: torch.Tensor) -> None:
        """Hook between backward and gradient clipping (splinterp.distributed averages gradients here)."""

    def extra_tensors(self) -> dict[str, Any]:
        return {}

    def load_extra_tensors(self, tensors: dict[str, Any]) -> None:
        pass

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    # ------------------------------------------------------------------ pieces
    def make_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[c.optimizer]
        return fastest_optimizer(cls, self.opt_params, lr=c.lr, weight_decay=c.weight_decay)

    def _sgd_step(self, x: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        if self.since_fired is None:
            loss, parts = self.loss_fn(self.sae, x, self.cfg)
        else:
            loss, parts = self._topk_loss_with_aux(x)
        extra = self.extra_loss()
        if extra is not None:
            loss = loss + extra
            parts = {**parts, "prox": extra.detach()}
        if self.mixed is None:
            loss.backward()
            self.after_backward(x)
            stepped = True
        else:
            self.mixed.backward(loss)
            self.after_backward(x)
            stepped = self.mixed.grads_to_masters()
            self.mixed.update_scale(stepped)
            if self.mixed.scaled:
                parts = {**parts, "skipped_steps": 0.0 if stepped else 1.0}
        if stepped:
            if self.cfg.grad_clip is not None and self.clip_params:
                torch.nn.utils.clip_grad_norm_(self.clip_params, self.cfg.grad_clip)
            if self.fused:
                match_grad_strides(self.opt_params)
            self.opt.step()
            if self.mixed is not None:
                self.mixed.masters_to_params()
        self.step += 1
        self.run_count += 1
        with torch.no_grad():
            for k, v in (("loss", loss), *parts.items()):
                v = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else float(v), dtype=torch.float64)
                self.run_sums[k] = self.run_sums[k] + v.to(self.device) if k in self.run_sums else v.to(self.device)

    def _topk_loss_with_aux(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The TopK reconstruction loss plus aux_k_coefficient * AuxK; updates the dead-latent counters."""
        c = self.cfg
        mse, rec = losses.reconstruction_loss(self.sae, x)
        dead = self.since_fired >= c.dead_after_samples
        aux = losses.auxk_loss(self.sae, x, rec.x_hat, dead, c.aux_k)
        with torch.no_grad():
            self.since_fired += x.shape[0]
            self.since_fired[rec.indices[rec.values.detach() != 0]] = 0
        loss = mse + c.aux_k_coefficient * aux if c.aux_k_coefficient else mse
        return loss, {"mse": mse.detach(), "auxk": aux.detach(), "dead": dead.sum().to(torch.float64)}

    def _evaluate(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        bs = self.cfg.eval_batch_size
        if self.cfg.eval_train:
            data = self.src.tensor if self.src.tensor is not None else self.src.sequential(bs)
            for k, v in metrics.evaluate(self.sae, data, batch_size=bs, device=self.device).items():
                out[f"train_{k}"] = v
        if self.eval_data is not None:
            for k, v in metrics.evaluate(self.sae, self.eval_data, batch_size=bs, device=self.device).items():
                out[f"test_{k}"] = v
        return out

    def _due(self, epoch: int) -> bool:
        c = self.cfg
        return c.checkpoint_dir is not None and (
            epoch == c.epochs or (c.checkpoint_every > 0 and epoch % c.checkpoint_every == 0))

    def _save(self) -> None:
        rng_t, rng_meta = ckpt.capture_rng()
        tensors = {
            **rng_t,
            "optimizer": self.opt.state_dict(),
            "shuffle_gen": self.gen.get_state(),
            "epoch_gen_state": self.epoch_gen_state,
            "run_sums": {k: v.cpu() for k, v in self.run_sums.items()},
            **({} if self.since_fired is None else {"aux_since_fired": self.since_fired.cpu()}),
            **({} if self.mixed is None else {"mixed_precision": self.mixed.state_dict()}),
            **self.extra_tensors(),
        }
        state = {
            "method": self.method, "epoch": self.epoch, "batch": self.batch, "step": self.step,
            "run_count": self.run_count, "wall_time": self.wall_time, "epoch_time_acc": self.epoch_time_acc,
            "trainer_config": self.cfg.to_dict(), "sae_config": self.sae.cfg.to_dict(),
            "data_fingerprint": self.src.fingerprint(), "history": self.history.to_dict(), "rng": rng_meta,
        }
        ckpt.save_checkpoint(self.cfg.checkpoint_dir, self.sae, tensors, state, keep=self.cfg.keep_checkpoints)

    # ------------------------------------------------------------------ resume
    def _resume_path(self):
        c = self.cfg
        if c.resume_from is not None:
            return ckpt.resolve_checkpoint(c.resume_from)
        if c.resume:
            p = ckpt.latest_checkpoint(c.checkpoint_dir)
            if p is None:
                log.info("resume=True but %s holds no checkpoint yet: starting from scratch", c.checkpoint_dir)
            return p
        return None

    def _restore(self, path) -> None:
        cp = ckpt.load_checkpoint(path)
        st = cp.state
        if st.get("method") != self.method:
            raise ConfigError(f"{cp.path} is a {st.get('method')!r} checkpoint, not {self.method!r}")
        self._check_same(st["trainer_config"], self.cfg.to_dict(), RESUME_MUTABLE, "trainer config", cp.path)
        # the SAE's seed only chose its initial weights, which the checkpoint overwrites
        self._check_same(st["sae_config"], self.sae.cfg.to_dict(), {"device", "seed", "metadata"}, "SAE config",
                         cp.path)
        fp = self.src.fingerprint()
        if st.get("data_fingerprint") is not None and fp is not None and fp != st["data_fingerprint"]:
            raise ConfigError(f"{cp.path} was written while training on different data "
                              f"(rows / checksums {st['data_fingerprint']} vs {fp})")
        named = dict(self.sae.named_parameters())
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(cp.sae_tensors[n].to(device=p.device, dtype=p.dtype))
        t = cp.tensors
        if self.mixed is not None:
            if "mixed_precision" not in t:
                raise ConfigError(f"{cp.path} holds no float32 master weights, which training a half-precision "
                                  "SAE needs; it was not written by this version's trainer")
            self.mixed.load_state_dict(t["mixed_precision"])
        self.opt.load_state_dict(t["optimizer"])
        self.gen.set_state(t["shuffle_gen"])
        self.epoch_gen_state = t["epoch_gen_state"]
        self.run_sums = {k: v.to(self.device) for k, v in t["run_sums"].items()}
        if self.since_fired is not None:
            self.since_fired = t["aux_since_fired"].to(self.device)
        self.load_extra_tensors(t)
        ckpt.restore_rng(t, st["rng"])
        self.epoch, self.batch, self.step = int(st["epoch"]), int(st["batch"]), int(st["step"])
        self.run_count = int(st["run_count"])
        self.wall_time, self.epoch_time_acc = float(st["wall_time"]), float(st["epoch_time_acc"])
        self.history = History.from_dict(st["history"])
        self.history.config = {"trainer": self.cfg.to_dict(), "sae": self.sae.cfg.to_dict()}  # e.g. new epochs
        log.info("resumed from %s (epoch %d, batch %d, step %d)", cp.path, self.epoch, self.batch, self.step)

    @staticmethod
    def _check_same(saved: dict, now: dict, mutable, what: str, path) -> None:
        diff = sorted(k for k in set(saved) | set(now) if k not in mutable and saved.get(k) != now.get(k))
        if diff:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
            raise ConfigError(f"cannot resume from {path}: the {what} differs ({detail})")

    # ------------------------------------------------------------------ main loop
    def run(self) -> History:
        with ckpt.hold_checkpoint_dir(self.cfg.checkpoint_dir if self.writes_checkpoints() else None):
            return self._run()

    def writes_checkpoints(self) -> bool:
        """Whether this process writes the checkpoints and so holds the checkpoint_dir lock for the run."""
        return True

    def _run(self) -> History:
        path = self._resume_path()
        if path is not None:
            self._restore(path)
        self.setup()
        try:
            bar = tqdm(total=self.cfg.epochs, initial=min(self.epoch, self.cfg.epochs), desc=self.method,
                       disable=not self.cfg.progress, unit="epoch")
            with bar:
                while self.epoch < self.cfg.epochs:
                    self._run_epoch()
                    bar.update(1)
                    last = self.history.last
                    bar.set_postfix({k: f"{last[k]:.4g}" for k in ("train_loss", "test_mse")
                                     if isinstance(last.get(k), float)})
        finally:
            self.teardown()
        return self.history

    def _run_epoch(self) -> None:
        c = self.cfg
        t0 = time.perf_counter()
        mid = self.batch > 0
        if mid:
            self.gen.set_state(self.epoch_gen_state)  # redraw this epoch's permutation, then skip ahead
        else:
            self.epoch_gen_state = self.gen.get_state()
            self.run_sums, self.run_count, self.epoch_time_acc = {}, 0, 0.0
        self.before_sgd(mid)
        n_batches = None if self.src.n_rows is None else math.ceil(self.src.n_rows / c.batch_size)
        batches = self.src.epoch(self.epoch, c.batch_size, self.gen if c.shuffle else None, start_batch=self.batch)
        inner = tqdm(batches, total=None if n_batches is None else n_batches - self.batch, leave=False,
                     disable=not c.progress, desc=f"epoch {self.epoch + 1}", unit="batch")
        for x in inner:
            for _ in range(c.sgd_updates_per_batch):
                self._sgd_step(x)
            self.batch += 1
            if c.checkpoint_dir is not None and c.checkpoint_every_steps and self.batch % c.checkpoint_every_steps == 0:
                now = time.perf_counter()
                self.epoch_time_acc += now - t0
                t0 = now
                self._save()
            if self.callback is not None:
                self.callback(TrainEvent("step", self.epoch, self.batch, self.step))
        if self.run_count == 0:
            raise ConfigError("an epoch had no mini-batches: the training data are empty")
        self.after_sgd()
        epoch_time = self.epoch_time_acc + time.perf_counter() - t0
        means = {k: float(v) / self.run_count for k, v in self.run_sums.items()}
        if not math.isfinite(means["loss"]):
            hint = "lower lr or set grad_clip"
            if self.sae.dtype == torch.float16:
                hint = ("a float16 forward pass overflows beyond 65504: train in bfloat16 or float32, or "
                        "standardise the data (splinterp.data.cache.Standardizer); else " + hint)
            raise NonFiniteError(f"the training loss became {means['loss']} in epoch {self.epoch + 1}; {hint}")
        self.epoch += 1
        self.batch = 0
        t1 = time.perf_counter()
        ev = self._evaluate()
        eval_time = time.perf_counter() - t1
        self.wall_time += epoch_time + eval_time
        record = {"epoch": self.epoch, "step": self.step, "train_loss": means.pop("loss"),
                  **{f"train_running_{k}": v for k, v in means.items()}, **ev,
                  "epoch_time": epoch_time, "eval_time": eval_time, "wall_time": self.wall_time}
        self.history.append(record)
        log.info("%s epoch %d/%d: %s", self.method, self.epoch, c.epochs, ", ".join(
            f"{k}={record[k]:.5g}" for k in ("train_loss", "train_mse", "test_mse", "test_l0",
                                              "test_explained_variance") if isinstance(record.get(k), float)))
        self.run_sums, self.run_count, self.epoch_time_acc = {}, 0, 0.0
        if self._due(self.epoch):
            self._save()
        if self.callback is not None:
            self.callback(TrainEvent("epoch", self.epoch, 0, self.step, self.history.last))
