"""Group-SAE (Ghilardi et al., EMNLP 2025): cluster similar layers and train one SAE per group of layers.

Steps, as in `ghidav/group-sae`:
1. `layer_distances` (splinterp.layers.distance): mean angular distance between every pair of layers.
2. `all_groupings`: complete-linkage agglomerative clustering of the layers for every number of groups
   G = 1..n. The clustering is not constrained to contiguous layers (group-sae's is not either); each
   `Grouping` says whether its groups happen to be contiguous. The partitions are nested: G groups are
   the state of one complete-linkage merge tree after n - G merges (scipy's `linkage`), so the grouping
   for G is the grouping for G + 1 with two groups merged.
   **The last layer is dropped by default** (`drop_last=True`), as group-sae does: the final residual
   stream feeds the unembedding (or, in an encoder, the pooled output) and is far from every other layer;
   it keeps its own SAE, so it is no part of the comparison.
3. `amad(D, labels)`: AMAD (group-sae calls it AMD) = the mean over groups of the largest distance between
   two layers of the group; a singleton group contributes 0. `choose_n_groups` picks the smallest G whose
   AMAD is at most a threshold.
4. `save_groups` writes the groupings as group-sae's JSON, `{"<G>": {"labels": [...], "amad": float}, ...}`
   (plus "amd", group-sae's key name, and "amd_per_group", "groups"), with top-level "layers",
   "dropped_layers" and "metadata" entries that are not group counts.
5. `train_group_sae`: one SAE on the layers of a group. Each training batch is drawn by `GroupBatches`:
   - sampling="uniform" (default, group-sae's ClusterSaeTrainer): each token of the batch is taken at one
     layer of the group, chosen uniformly and independently per token and per epoch. An epoch then holds
     as many rows as a per-layer SAE's epoch, so G group SAEs cost G / n of the training compute of n
     per-layer SAEs: this is where Group-SAE's speed-up comes from.
   - sampling="concat": every token contributes its vectors at all the group's layers (an epoch holds
     N * |group| rows, batches hold `batch_size` rows). Same data as the per-layer SAEs together, so no
     compute is saved, only the number of SAEs (parameters).
   Activations are standardised per layer (one `Standardizer` each, fitted on the training split) before
   they are mixed, playing the role of group-sae's per-layer activation-norm scaling factor.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splinterp.atomic import write_json
from splinterp.errors import ConfigError, CorruptFileError, EmptyDataError, ShapeError
from splinterp.layers.distance import LayerDistances

log = logging.getLogger(__name__)

SAMPLINGS = ("uniform", "concat")


# ------------------------------------------------------------------------------------------ clustering
def check_distance_matrix(D: Any, name: str = "distances") -> np.ndarray:
    """A finite, symmetric, non-negative square matrix with zero diagonal, as float64; errors otherwise."""
    if isinstance(D, LayerDistances):
        D = D.matrix
    if isinstance(D, torch.Tensor):
        D = D.detach().cpu().numpy()
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1] or D.shape[0] == 0:
        raise ShapeError(f"{name} must be a non-empty square matrix [n, n], got shape {D.shape}")
    if not np.isfinite(D).all():
        raise ConfigError(f"{name} contains non-finite values")
    if (D < 0).any():
        raise ConfigError(f"{name} has negative entries")
    if not np.allclose(D, D.T, rtol=0, atol=1e-12):
        raise ConfigError(f"{name} is not symmetric")
    if not (np.diag(D) == 0).all():
        raise ConfigError(f"{name} must have a zero diagonal")
    return D


def _check_labels(labels: Any, n: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
        raise ShapeError(f"labels must be {n} integers (one group label per layer), got {lab.shape} {lab.dtype}")
    return lab


def canonical_labels(labels: Sequence[int]) -> list[int]:
    """Relabel groups 0, 1, ... in order of their first layer (so equal partitions get equal labels)."""
    mapping: dict[int, int] = {}
    return [mapping.setdefault(int(v), len(mapping)) for v in labels]


def complete_linkage(D: Any) -> np.ndarray:
    """scipy linkage matrix [n - 1, 4] of complete-linkage agglomerative clustering on distances D."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    D = check_distance_matrix(D)
    if D.shape[0] < 2:
        return np.zeros((0, 4))
    return linkage(squareform(D, checks=False), method="complete")


def cluster_layers(D: Any, n_groups: int) -> list[int]:
    """Group labels (canonical) of the n layers after n - n_groups complete-linkage merges."""
    D = check_distance_matrix(D)
    n = D.shape[0]
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or not 1 <= n_groups <= n:
        raise ConfigError(f"n_groups must be an integer in [1, {n}], got {n_groups!r}")
    Z = complete_linkage(D)
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    for m in range(n - n_groups):
        a, b = int(Z[m, 0]), int(Z[m, 1])
        members[n + m] = members.pop(a) + members.pop(b)
    labels = np.empty(n, dtype=np.int64)
    for g, mem in enumerate(members.values()):
        labels[mem] = g
    return canonical_labels(labels.tolist())


def amd_per_group(D: Any, labels: Sequence[int]) -> list[float]:
    """For each group (in label order 0, 1, ...), the largest distance between two of its layers (0 alone)."""
    D = check_distance_matrix(D)
    lab = _check_labels(labels, D.shape[0])
    out = []
    for g in np.unique(lab):
        idx = np.flatnonzero(lab == g)
        out.append(float(D[np.ix_(idx, idx)].max()) if idx.size > 1 else 0.0)
    return out


def amad(D: Any, labels: Sequence[int]) -> float:
    """Average maximum angular distance: mean over groups of the largest intra-group distance."""
    return float(np.mean(amd_per_group(D, labels)))


@dataclass
class Grouping:
    """One partition of `layers` into `n_groups` groups, with its AMAD."""

    n_groups: int
    labels: list[int]
    layers: list[int]
    amad: float
    amd_per_group: list[float]

    @property
    def groups(self) -> list[list[int]]:
        """Layer ids of each group, in label order."""
        return [[layer for layer, g in zip(self.layers, self.labels) if g == k] for k in range(self.n_groups)]

    @property
    def contiguous(self) -> bool:
        """Whether every group is a run of consecutive layers (in the order of `layers`)."""
        for k in range(self.n_groups):
            pos = [i for i, g in enumerate(self.labels) if g == k]
            if pos != list(range(pos[0], pos[-1] + 1)):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "amad": self.amad, "amd": self.amad,
                "amd_per_group": list(self.amd_per_group), "groups": self.groups, "contiguous": self.contiguous}


def all_groupings(distances: LayerDistances | Any, layers: Sequence[int] | None = None, *,
                  drop_last: bool = True, n_groups: Iterable[int] | None = None) -> dict[int, Grouping]:
    """Complete-linkage groupings for every G (default 1..n), keyed by G.

    distances: a `LayerDistances`, or a matrix with `layers` naming its rows (default 0..n-1).
    drop_last: leave the last layer out of the clustering (group-sae's choice; see the module doc).
    """
    if isinstance(distances, LayerDistances):
        if layers is not None and list(layers) != distances.layers:
            distances = distances.sub(layers)
        layer_ids, D = list(distances.layers), distances.matrix
    else:
        D = check_distance_matrix(distances)
        layer_ids = list(range(D.shape[0])) if layers is None else [int(v) for v in layers]
        if len(layer_ids) != D.shape[0]:
            raise ShapeError(f"{len(layer_ids)} layer ids for a {D.shape[0]} x {D.shape[0]} matrix")
    if drop_last:
        if len(layer_ids) < 2:
            raise ConfigError("drop_last=True needs at least two layers")
        layer_ids, D = layer_ids[:-1], np.asarray(D)[:-1, :-1]
    D = check_distance_matrix(D)
    n = len(layer_ids)
    gs = range(1, n + 1) if n_groups is None else [int(g) for g in n_groups]
    out = {}
    for g in gs:
        labels = cluster_layers(D, g)
        per = amd_per_group(D, labels)
        out[g] = Grouping(g, labels, layer_ids, float(np.mean(per)), per)
    return out


def choose_n_groups(groupings: Mapping[int, Grouping] | Mapping[int, float], threshold: float) -> int:
    """The smallest G whose AMAD is at most `threshold` (G = the largest available if none is)."""
    if not groupings:
        raise ConfigError("no groupings to choose from")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or threshold < 0:
        raise ConfigError(f"threshold must be a number >= 0, got {threshold!r}")
    amads = {int(g): (v.amad if isinstance(v, Grouping) else float(v)) for g, v in groupings.items()}
    ok = [g for g in sorted(amads) if amads[g] <= threshold]
    if not ok:
        log.warning("no G has AMAD <= %g; taking the largest G=%d", threshold, max(amads))
        return max(amads)
    return ok[0]


# ------------------------------------------------------------------------------------------------ JSON
def groups_to_dict(groupings: Mapping[int, Grouping], *, dropped_layers: Sequence[int] = (),
                   metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """group-sae's JSON layout: {"<G>": {"labels": [...], "amad": ...}, ..., "layers": [...], ...}."""
    if not groupings:
        raise ConfigError("no groupings to write")
    layers = next(iter(groupings.values())).layers
    out: dict[str, Any] = {str(g): groupings[g].to_dict() for g in sorted(groupings)}
    out["layers"] = list(layers)
    out["dropped_layers"] = [int(v) for v in dropped_layers]
    out["metadata"] = dict(metadata or {})
    return out


def save_groups(path: str | os.PathLike, groupings: Mapping[int, Grouping], *, dropped_layers: Sequence[int] = (),
                metadata: dict[str, Any] | None = None) -> Path:
    """Write the groupings as JSON (atomically); see `groups_to_dict`."""
    write_json(path, groups_to_dict(groupings, dropped_layers=dropped_layers, metadata=metadata))
    return Path(path)


def load_groups(path: str | os.PathLike) -> dict[int, Grouping]:
    """Read a groups JSON written by `save_groups` (or group-sae: "amd" is read when "amad" is absent)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"cannot read groups JSON {path}: {e}") from e
    if not isinstance(d, dict):
        raise CorruptFileError(f"{path}: not a JSON object")
    out = {}
    for key, v in d.items():
        if not key.isdigit():
            continue
        try:
            labels = [int(x) for x in v["labels"]]
            val = float(v["amad"] if "amad" in v else v["amd"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{path}: entry {key!r} lacks labels/amad ({e})") from e
        layers = [int(x) for x in d.get("layers", range(len(labels)))]
        if len(layers) != len(labels):
            raise CorruptFileError(f"{path}: entry {key!r} has {len(labels)} labels for {len(layers)} layers")
        per = [float(x) for x in v.get("amd_per_group", [])]
        out[int(key)] = Grouping(int(key), labels, layers, val, per)
    if not out:
        raise CorruptFileError(f"{path}: no '<G>' entries")
    return out


# --------------------------------------------------------------------------------------------- training
class GroupBatches:
    """Training batches for one SAE over the layers of a group (re-iterable; one pass = one epoch).

    source: an `ActivationCache` (streamed, its `split`) or a dict {layer: tensor [N, d]} of the same N
    tokens. standardizers: {layer: Standardizer} applied per layer before mixing (or None). sampling:
    "uniform" (each token at one uniformly drawn layer) or "concat" (each token at every layer); see the
    module doc. The token order and the layer draws are functions of (seed, epoch): the trainers call
    `set_epoch`, so a resumed run sees the same batches.
    """

    def __init__(self, source: Any, layers: Sequence[int], batch_size: int = 256, *, sampling: str = "uniform",
                 standardizers: Mapping[int, Any] | None = None, split: str | None = "train", seed: int = 0,
                 shuffle: bool = True, dtype: torch.dtype = torch.float32):
        from splinterp.data.cache import ActivationCache

        if sampling not in SAMPLINGS:
            raise ConfigError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.layers = [int(v) for v in layers]
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers must be a non-empty list of distinct layer ids, got {list(layers)}")
        self.batch_size, self.sampling, self.split, self.seed, self.shuffle = batch_size, sampling, split, seed, shuffle
        self.dtype = dtype
        self.epoch = 0
        if isinstance(source, ActivationCache):
            self.cache, self.tensor = source, None
            source._check_layer(self.layers)
            self.d = source.d_model
        elif isinstance(source, Mapping):
            missing = [v for v in self.layers if v not in source]
            if missing:
                raise ConfigError(f"layers {missing} are missing from the activations dict")
            xs = [torch.as_tensor(source[v]) for v in self.layers]
            if any(x.ndim != 2 or x.shape != xs[0].shape for x in xs):
                shapes = [tuple(x.shape) for x in xs]
                raise ShapeError(f"every layer must be [N, d] with the same N and d, got {shapes}")
            if xs[0].shape[0] == 0:
                raise EmptyDataError("the activations have no rows")
            self.cache, self.tensor = None, torch.stack(xs, 1)
            self.d = xs[0].shape[1]
        else:
            raise ConfigError("source must be an ActivationCache or a dict {layer: tensor}, got "
                              f"{type(source).__name__}")
        self.mean = self.scale = None
        if standardizers is not None:
            missing = [v for v in self.layers if v not in standardizers]
            if missing:
                raise ConfigError(f"no standardizer for layers {missing}")
            self.mean = torch.stack([standardizers[v].mean for v in self.layers]).to(torch.float64)
            self.scale = torch.stack([standardizers[v].std + standardizers[v].eps
                                      for v in self.layers]).to(torch.float64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _gen(self) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch * 7919 + 12345) % (2**63))

    def _tokens(self, rows_per_batch: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
        """Batches [B, L_g, d] of tokens at all the group's layers."""
        if self.tensor is not None:
            n = self.tensor.shape[0]
            order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
            for s in range(0, n, rows_per_batch):
                yield self.tensor[order[s:s + rows_per_batch]]
            return
        for b in self.cache.iter_batches(self.layers, rows_per_batch, shuffle=self.shuffle,
                                         seed=int(torch.randint(2**31, (1,), generator=gen)), split=self.split,
                                         dtype=None):
            yield b[:, None] if b.ndim == 2 else b

    def _standardise(self, x: torch.Tensor, which: torch.Tensor | None) -> torch.Tensor:
        """x [B, L_g, d] (which=None) or [B, d] taken at layer positions `which` [B]."""
        if self.mean is None:
            return x.to(self.dtype)
        if which is None:
            return ((x.to(torch.float64) - self.mean) / self.scale).to(self.dtype)
        return ((x.to(torch.float64) - self.mean[which]) / self.scale[which]).to(self.dtype)

    def __iter__(self) -> Iterator[torch.Tensor]:
        gen = self._gen()
        L = len(self.layers)
        if self.sampling == "uniform":
            for x in self._tokens(self.batch_size, gen):
                which = torch.randint(L, (x.shape[0],), generator=gen)
                rows = x[torch.arange(x.shape[0]), which]
                yield self._standardise(rows, which)
        else:
            for x in self._tokens(max(self.batch_size // L, 1), gen):
                yield self._standardise(x, None).reshape(-1, self.d)

    def n_rows(self) -> int:
        """Rows in one epoch."""
        n = self.tensor.shape[0] if self.tensor is not None else self.cache.split_size(self.split)
        return n * (len(self.layers) if self.sampling == "concat" else 1)


def group_metadata(layers: Sequence[int], sampling: str, cache: Any = None) -> dict[str, Any]:
    """SAE metadata recording what a (group) SAE was trained on, with SAELens's keys: the layers it covers, and
    from the cache the model (`model_name`), the TransformerLens hook name(s) next to the Hugging Face module
    path(s) (`hook_name` / `hf_hook_name` for one layer, `hook_names` / `hf_hook_names` for all), and the texts
    (`dataset_path`: the harvest's `dataset`, else its text source)."""
    from splinterp.data.harvest import sae_metadata

    meta: dict[str, Any] = {"layers": [int(v) for v in layers], "group_sampling": sampling}
    if cache is not None:
        per_layer = [sae_metadata(cache, int(v)) for v in layers]
        meta.update({k: v for k, v in per_layer[0].items() if k not in ("hook_name", "hf_hook_name")})
        meta["hook_names"] = [p.get("hook_name", f"layer_{v}") for p, v in zip(per_layer, layers)]
        meta["hf_hook_names"] = [p.get("hf_hook_name") for p in per_layer]
        meta["hook_name"] = meta["hook_names"][0] if len(layers) == 1 else None
        meta["hf_hook_name"] = meta["hf_hook_names"][0] if len(layers) == 1 else None
    return meta


def train_group_sae(source: Any, layers: Sequence[int], sae_cfg: Any, train_cfg: Any, *,
                    standardizers: Mapping[int, Any] | None = None, sampling: str = "uniform",
                    method: str = "sgd", split: str | None = "train", eval_data: Any = None,
                    callback: Any = None, sae: Any = None):
    """Train one SAE on the layers of a group; returns (sae, History).

    source, standardizers, sampling: see `GroupBatches` (batch size and seed come from `train_cfg`).
    sae_cfg: the `SAEConfig` (its metadata gains "layers", "hook_names", "group_sampling"); or pass a
    ready `sae` (e.g. a transfer initialisation) and sae_cfg=None. method: "sgd" or "pam_sgd" (then
    train_cfg is a PAMConfig).
    """
    from splinterp.sae import SAE
    from splinterp.train import train_pam_sgd, train_sgd

    if method not in ("sgd", "pam_sgd"):
        raise ConfigError(f"method must be 'sgd' or 'pam_sgd', got {method!r}")
    cache = source if not isinstance(source, Mapping) else None
    if sae is None:
        if sae_cfg is None:
            raise ConfigError("pass sae_cfg or a ready sae")
        meta = {**sae_cfg.metadata, **group_metadata(layers, sampling, cache)}
        sae = SAE(sae_cfg.replace(metadata=meta))
    data = GroupBatches(source, layers, train_cfg.batch_size, sampling=sampling, standardizers=standardizers,
                        split=split, seed=train_cfg.seed, shuffle=train_cfg.shuffle, dtype=sae.dtype)
    fn = train_sgd if method == "sgd" else train_pam_sgd
    hist = fn(sae, data, train_cfg, eval_data=eval_data, callback=callback)
    return sae, hist
