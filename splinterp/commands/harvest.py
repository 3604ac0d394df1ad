"""`splinterp harvest`: run a transformer over texts and cache activations (`splinterp.data.harvest`).

Under torchrun (`torchrun --nproc_per_node N -m splinterp harvest ...`) each rank runs the model on its share
of the texts and rank 0 merges the shards into one cache (`splinterp.parallel.harvest_distributed`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from splinterp.commands import Command
from splinterp.errors import ConfigError, CorruptFileError, DatasetNotFoundError

log = logging.getLogger("splinterp.harvest")


@dataclass
class HarvestOptions:
    out: str = field(default="", metadata={"required": True})
    """Cache folder to write (new or empty; an existing activation cache only with --overwrite)."""
    model: str | None = None
    """Hugging Face model id or folder (default: the offline all-MiniLM-L6-v2)."""
    texts: str | None = None
    """A .txt file (one text per non-empty line) or a .json list of strings (default: the offline English text
    of CPython's documentation)."""
    layers: list[str] = field(default_factory=lambda: ["all"])
    """Blocks to cache: 'all', block indices, or TransformerLens hook names (blocks.L.hook_resid_post, ...)."""
    site: Literal["resid_post", "resid_pre"] = "resid_post"
    """Which activation of each block (ignored for hook names, which say it themselves)."""
    token_selection: Literal["all", "last"] = "all"
    """Every real token, or the last real token of each text."""
    max_length: int = 128
    """Tokens per text (longer texts are truncated)."""
    batch_size: int = 32
    """Texts per forward pass."""
    shard_tokens: int = 8192
    """Tokens per cache shard file."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the cache (the model runs in its own dtype)."""
    overwrite: bool = False
    """Replace --out if it is an activation cache."""
    seed: int = 0
    """Seed (text shuffling of the default texts)."""
    device: str | None = None
    """Torch device (default: cpu; under torchrun cuda:LOCAL_RANK when CUDA is available)."""
    progress: bool = True
    """Show a progress bar (rank 0 only under torchrun)."""

    def __post_init__(self) -> None:
        from splinterp.validation import check_positive_int

        for name in ("max_length", "batch_size", "shard_tokens"):
            check_positive_int(getattr(self, name), "--" + name.replace("_", "-"))


def read_texts(path: str) -> list[str]:
    """Texts from a .txt file (one per non-empty line) or a .json list of strings."""
    p = Path(path)
    if not p.is_file():
        raise DatasetNotFoundError(f"--texts {path} is not a file")
    try:
        raw = p.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"cannot read --texts {path} as UTF-8 text: {e}") from None
    if p.suffix.lower() == ".json":
        try:
            texts = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise CorruptFileError(f"--texts {path} is not valid JSON: {e}") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ConfigError(f"--texts {path} must hold a JSON list of strings")
        return texts
    return [line for line in raw.splitlines() if line.strip()]


def parse_layers(values: list[str]):
    """'all', integers, or hook names, as `harvest(layers=...)` takes them."""
    if values == ["all"]:
        return "all"
    out: list[int | str] = []
    for v in values:
        if v == "all":
            raise ConfigError("--layers all cannot be combined with other layers")
        out.append(int(v) if v.lstrip("-").isdigit() else v)
    return out


def run_harvest(o: HarvestOptions) -> int:
    from splinterp.parallel import DistConfig, harvest_distributed, init_distributed, launched_by_torchrun
    from splinterp.validation import check_device

    texts = read_texts(o.texts) if o.texts is not None else None
    layers = parse_layers(o.layers)
    kw = dict(site=o.site, token_selection=o.token_selection, max_length=o.max_length, batch_size=o.batch_size,
              shard_tokens=o.shard_tokens, dtype=o.dtype)
    if launched_by_torchrun():
        info = init_distributed(DistConfig(device=o.device))
        try:
            cache = harvest_distributed(o.model, texts, layers, o.out, overwrite=o.overwrite, seed=o.seed,
                                        device=info.device, progress=o.progress and info.rank == 0, **kw)
        finally:
            if info.initialised_here:
                import torch.distributed as dist

                dist.destroy_process_group()
        if info.rank != 0:
            return 0
    else:
        from splinterp.data.harvest import harvest

        device = str(check_device(o.device or "cpu", "--device"))
        cache = harvest(o.model, texts, layers, o.out, overwrite=o.overwrite, seed=o.seed, device=device,
                        progress=o.progress, **kw)
    print(f"splinterp: cached {cache.n_tokens} tokens of layers {cache.layers} (d_model {cache.d_model}, "
          f"{len(cache.shards)} shards) into {o.out}/")
    return 0


COMMAND = Command("harvest", HarvestOptions, run_harvest, "cache a transformer's activations on texts",
                  "Run a Hugging Face model (default: the offline all-MiniLM-L6-v2) over texts (default: the offline "
                  "English text) and cache the activations of the chosen blocks, sharded and checksummed, for "
                  "`splinterp train` and `splinterp geometry`.")
