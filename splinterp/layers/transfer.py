"""Layer-wise SAE transfer (Ghilardi et al., BlackboxNLP 2024): start layer l's SAE from a trained SAE of an
adjacent layer and fine-tune it, instead of training from a random initialisation.

- forward transfer: layer l starts from the SAE of layer l - 1; backward: from the SAE of layer l + 1
  (the paper found backward to work better). `transfer_direction` names it, `transfer_init` makes the copy.
- The copy is exact (every parameter, same architecture and sizes); fine-tuning starts with a fresh
  optimiser state (the source run's Adam moments belong to the source layer's data).
- Both layers' activations must be in the same coordinates the SAE was trained in: with per-layer
  standardisation (what the experiments do) each layer is standardised with its own statistics and the
  weights are copied as they are.

"Steps to target": `FVUTracker` records the test FVU every `every` optimiser steps (a trainer callback,
the time it spends is kept apart so training time stays honest), and `steps_to_target` returns the first
recorded step whose FVU is at most the target (None if never reached).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splinterp import metrics
from splinterp.errors import ConfigError

log = logging.getLogger(__name__)

DIRECTIONS = ("forward", "backward")


def transfer_direction(source_layer: int, target_layer: int) -> str:
    """"forward" when the source is an earlier layer (l - 1 -> l), "backward" when it is a later one."""
    if source_layer == target_layer:
        raise ConfigError(f"source and target layer are both {source_layer}: nothing to transfer")
    return "forward" if source_layer < target_layer else "backward"


def source_layer(target_layer: int, direction: str) -> int:
    """The adjacent layer a `direction` transfer into `target_layer` starts from."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return target_layer - 1 if direction == "forward" else target_layer + 1


def transfer_init(source: Any, target_layer: int | None = None, source_layer: int | None = None) -> Any:
    """A new SAE with exactly the weights of `source` (an independent copy), ready to fine-tune on
    `target_layer`. Its metadata records the initialisation (init="transfer", transfer_from_layer,
    transfer_direction) and, if given, the new layer."""
    from splinterp.sae import SAE

    if not isinstance(source, SAE):
        raise TypeError(f"transfer_init copies a splinterp SAE, got {type(source).__name__}")
    src_layer = source_layer
    if src_layer is None:
        layers = source.cfg.metadata.get("layers")
        src_layer = layers[0] if isinstance(layers, list) and len(layers) == 1 else source.cfg.metadata.get("layer")
    meta = copy.deepcopy(source.cfg.metadata)
    meta["init"] = "transfer"
    meta["transfer_from_layer"] = src_layer
    if target_layer is not None:
        meta["layer"] = int(target_layer)
        meta["layers"] = [int(target_layer)]
        if src_layer is not None:
            meta["transfer_direction"] = transfer_direction(int(src_layer), int(target_layer))
    out = SAE(source.cfg.replace(metadata=meta))
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(dict(source.named_parameters())[name].detach())
    return out.train(source.training)


@dataclass
class FVUTracker:
    """Trainer callback: test FVU (and L0) of `sae` on each eval set every `every` optimiser steps.

    eval_sets: {name: tensor [N, d_in]} (e.g. one per layer of a group). `fvu` is the mean over the
    sets. `seconds` is the time spent evaluating, to subtract from the training time.
    """

    sae: Any
    eval_sets: Mapping[str, torch.Tensor]
    every: int = 20
    batch_size: int = 8192
    steps: list[int] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    per_set: dict[str, list[float]] = field(default_factory=dict)
    l0: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"every must be a positive integer, got {self.every!r}")
        if not self.eval_sets:
            raise ConfigError("eval_sets is empty")

    def record(self, step: int) -> None:
        """Evaluate now and record it at `step` (not counted in `seconds`: call it outside training)."""
        if self.steps and self.steps[-1] == step:
            return
        was = self.sae.training
        self.sae.eval()
        vals, l0s = [], []
        for name, X in self.eval_sets.items():
            m = metrics.evaluate(self.sae, X, batch_size=self.batch_size)
            self.per_set.setdefault(name, []).append(float(m["fvu"]))
            vals.append(float(m["fvu"]))
            l0s.append(float(m["l0"]))
        self.sae.train(was)
        self.steps.append(int(step))
        self.fvu.append(sum(vals) / len(vals))
        self.l0.append(sum(l0s) / len(l0s))

    def __call__(self, event: Any) -> None:
        if event.kind == "step" and event.step % self.every == 0:
            t0 = time.perf_counter()
            self.record(event.step)
            self.seconds += time.perf_counter() - t0

    def curve(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "fvu": list(self.fvu), "l0": list(self.l0),
                "per_set": {k: list(v) for k, v in self.per_set.items()}}


def steps_to_target(steps: Sequence[int], fvu: Sequence[float], target: float) -> int | None:
    """The first recorded step at which the FVU is at most `target`; None if it never gets there."""
    if len(steps) != len(fvu):
        raise ConfigError(f"steps and fvu differ in length ({len(steps)} vs {len(fvu)})")
    for s, v in zip(steps, fvu):
        if v is not None and v <= target:
            return int(s)
    return None


def train_seconds(history: Any, tracker: FVUTracker | None = None) -> float:
    """Training time of a run: the sum of its epochs' training time, minus the tracker's evaluations."""
    total = sum(float(r.get("epoch_time") or 0.0) for r in history.records)
    return max(total - (tracker.seconds if tracker is not None else 0.0), 0.0)
