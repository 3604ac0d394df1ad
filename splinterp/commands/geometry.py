"""`splinterp geometry SAE --data X`: the region report of any SAE folder on the user's data."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from splinterp.commands import Command
from splinterp.errors import ConfigError, DTypeError

log = logging.getLogger("splinterp.geometry")


@dataclass
class SAEDataOptions:
    """What a command that looks at one SAE on a data matrix reads (`splinterp geometry`, `splinterp slice`)."""

    folder: str = field(default="", metadata={"positional": True})
    """The SAE: a folder (splinterp, SAELens, sparsify, dictionary_learning), a Gemma Scope params.npz, or with
    --sae-id a SAELens release name."""
    sae_id: str | None = None
    """With a SAELens release name (or a folder of SAE folders): which SAE of it."""
    data: str = field(default="", metadata={"required": True})
    """.npy, .pt or .safetensors matrix [N, d_in], or an activation-cache folder (`splinterp harvest`)."""
    layer: int | None = None
    """Activation-cache folders: the cached layer to read (needed when the cache holds several)."""
    key: str | None = None
    """.pt / .safetensors files holding several tensors: the one to read."""
    split: Literal["train", "test"] | None = None
    """Activation-cache folders: the split to read (default: every token)."""
    standardizer: str | None = None
    """Standardizer JSON the SAE was trained with (`splinterp train` writes one next to the SAE)."""
    cast: bool = False
    """Convert the data to the SAE's dtype when they differ (otherwise that is an error)."""
    device: str = "cpu"
    """Torch device."""

    def load(self):
        """(the SAE on --device, the --data matrix as stored: not yet checked against the SAE)."""
        import splinterp
        from splinterp.data.files import load_matrix
        from splinterp.validation import check_device

        sae = splinterp.load(self.folder, device=str(check_device(self.device, "--device")), sae_id=self.sae_id)
        return sae, load_matrix(self.data, layer=self.layer, key=self.key, split=self.split)

    def prepare(self, X, sae):
        """--data checked against the SAE: width, then dtype (converted only with --cast), then standardised."""
        if X.shape[1] != sae.cfg.d_in:
            raise ConfigError(f"--data {self.data} has {X.shape[1]} columns but the SAE expects d_in={sae.cfg.d_in}")
        if X.dtype != sae.dtype:
            if not self.cast:
                raise DTypeError(f"--data {self.data} holds {X.dtype} values but the SAE computes in {sae.dtype}; "
                                 "pass --cast to convert them (or save the data in the SAE's dtype)")
            X = X.to(sae.dtype)
        if self.standardizer:
            from splinterp.data.cache import Standardizer

            X = Standardizer.load(self.standardizer).transform(X).to(sae.dtype)
        return X.to(sae.device)


@dataclass
class GeometryOptions(SAEDataOptions):
    max_rows: int | None = None
    """Use a random subset of this many rows."""
    orders: list[int] = field(default_factory=lambda: [1, 2, 4])
    """Power-diagram orders whose cells are counted (order m: the m largest encoder scores)."""
    batch_size: int = 8192
    """Rows per batch."""
    seed: int = 0
    """Seed of the row subset."""
    json: bool = False
    """Print JSON instead of a table."""
    out: str | None = None
    """Also write the report to this JSON file."""

    def __post_init__(self) -> None:
        from splinterp.validation import check_positive_int

        check_positive_int(self.batch_size, "--batch-size")
        if self.max_rows is not None:
            check_positive_int(self.max_rows, "--max-rows")
        for m in self.orders:
            check_positive_int(m, "--orders")


def run_geometry(o: GeometryOptions) -> int:
    import torch

    from splinterp.atomic import write_json
    from splinterp.geometry import geometry_report
    from splinterp.jsonable import to_jsonable
    from splinterp.metrics import evaluate

    sae, X = o.load()
    if o.max_rows is not None and X.shape[0] > o.max_rows:
        g = torch.Generator().manual_seed(o.seed)
        X = X[torch.randperm(X.shape[0], generator=g)[: o.max_rows].sort().values]
    X = o.prepare(X, sae)
    metrics = evaluate(sae, X, batch_size=o.batch_size)
    if not Path(o.data).is_dir():  # per-token fields only mean something for activations
        metrics.pop("mse_per_token", None)
        metrics.pop("n_tokens", None)
    report = {"sae_folder": str(o.folder), "data": str(o.data), "architecture": sae.cfg.architecture,
              "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "k": sae.cfg.k, "n_rows": int(X.shape[0]), **metrics,
              **geometry_report(sae, X, orders=o.orders, batch_size=o.batch_size)}
    report = to_jsonable(report)
    if o.out:
        write_json(o.out, report)
    if o.json:
        print(json.dumps(report, indent=2))
    else:
        from splinterp.commands.reproduce import fmt

        w = max(len(k) for k in report)
        for k, v in report.items():
            print(f"{k:<{w}}  {fmt(v)}")
    return 0


COMMAND = Command("geometry", GeometryOptions, run_geometry, "region report of an SAE on your data",
                  "Load an SAE (any format splinterp.load reads) and report, on --data, its reconstruction "
                  "metrics (mse, explained variance, l0, alive latents), its regions (distinct active sets) and "
                  "the cells of its low-order power diagrams.")
