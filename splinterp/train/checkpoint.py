"""Training checkpoints: everything needed to continue a run bit-for-bit, written atomically.

A checkpoint is a folder ``<checkpoint_dir>/ckpt-e<epochs done>-b<batches done in the current epoch>``:
- ``sae/``               the model as an ordinary SAE folder (cfg.json + sae_weights.safetensors), so any
                         checkpoint is also a loadable SAE (`splinterp.load`), the PAM decoder included;
- ``trainer_state.pt``   tensors only (optimiser state, torch / CUDA / shuffle-generator RNG states, the
                         numpy MT19937 key, the PAM proximal anchor, running loss sums), read back with
                         ``torch.load(weights_only=True)``: no pickled objects;
- ``state.json``         counters, configs, the History so far, python's RNG state.
The folder is built under a temporary name and swapped in whole (`atomic_dir`); ``latest.json`` is then
rewritten atomically to point at it, so a kill at any moment leaves the previous checkpoint usable.

One writer per checkpoint_dir: a training run holds an OS lock on it from start to end (`hold_checkpoint_dir`),
and `save_checkpoint` takes the same lock. A second run into the same folder is refused before it trains, and
the clean-up of temporaries left by killed writers can never delete a live run's checkpoint in the making.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splinterp import __version__
from splinterp.atomic import FolderLock, atomic_dir, hold_folder, write_json
from splinterp.errors import CorruptFileError, NotAnSAEFolderError, PathNotFoundError
from splinterp.io import load as load_sae_folder
from splinterp.io import save as save_sae_folder
from splinterp.validation import read_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LATEST = "latest.json"
STATE_JSON = "state.json"
STATE_PT = "trainer_state.pt"
SAE_DIR = "sae"
_NAME = re.compile(r"^ckpt-e(\d+)-b(\d+)$")


def checkpoint_name(epoch: int, batch: int) -> str:
    return f"ckpt-e{epoch:06d}-b{batch:08d}"


# ---------------------------------------------------------------------- RNG states
def capture_rng() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, json) holding the torch, CUDA, numpy and python global RNG states."""
    tensors: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda_rng"] = list(torch.cuda.get_rng_state_all())
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [name, int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}
    return tensors, meta


def restore_rng(tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---------------------------------------------------------------------- write
def hold_checkpoint_dir(checkpoint_dir: str | Path | None) -> FolderLock | contextlib.nullcontext:
    """Lock `checkpoint_dir` for a training run (a no-op for None): create it, refuse a file or an unwritable
    folder, and refuse a second writer (`FolderInUseError` naming the holder's pid). Hold it from before the
    first epoch to the end, so every refusal comes before any training."""
    if checkpoint_dir is None:
        return contextlib.nullcontext()
    return hold_folder(checkpoint_dir, name="checkpoint_dir", purpose="writing training checkpoints")


def save_checkpoint(checkpoint_dir: str | Path, sae, tensors: dict[str, Any], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write one checkpoint folder atomically, point latest.json at it, drop all but the `keep` newest.

    Holds the checkpoint_dir lock while it writes (re-entrant: a run that holds it already just continues).
    """
    checkpoint_dir = Path(checkpoint_dir)
    name = checkpoint_name(state["epoch"], state["batch"])
    state = {"format": FORMAT_VERSION, "splinterp_version": __version__, **state}
    with hold_checkpoint_dir(checkpoint_dir):
        # temporary folders / files left by a writer that was killed mid-write (atomic_dir / atomic_path names);
        # under the lock no live writer can own them
        for junk in [*checkpoint_dir.glob(".ckpt-*.tmp"), *checkpoint_dir.glob(".ckpt-*.old"),
                     *checkpoint_dir.glob(f".{LATEST}.*.tmp")]:
            shutil.rmtree(junk, ignore_errors=True) if junk.is_dir() else junk.unlink(missing_ok=True)
        with atomic_dir(checkpoint_dir / name) as tmp:
            save_sae_folder(sae, tmp / SAE_DIR)
            torch.save(tensors, tmp / STATE_PT)
            (tmp / STATE_JSON).write_text(json.dumps(state) + "\n")
        write_json(checkpoint_dir / LATEST, {"checkpoint": name, "epoch": state["epoch"], "batch": state["batch"],
                                             "step": state["step"]})
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint written: %s", checkpoint_dir / name)
    return checkpoint_dir / name


def list_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders in `checkpoint_dir`, oldest first."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2))), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest checkpoint in `checkpoint_dir` (latest.json, else the newest folder), or None."""
    d = Path(checkpoint_dir)
    pointer = d / LATEST
    if pointer.exists():
        try:
            target = d / read_json(pointer)["checkpoint"]
            if target.is_dir():
                return target
        except (CorruptFileError, KeyError, TypeError):
            log.warning("%s is unreadable; looking for checkpoint folders instead", pointer)
    found = list_checkpoints(d)
    return found[-1] if found else None


# ---------------------------------------------------------------------- read
@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    tensors: dict[str, Any]
    sae_tensors: dict[str, torch.Tensor]
    sae_config: dict[str, Any]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a checkpoint_dir whose newest checkpoint is taken."""
    p = Path(path)
    if (p / STATE_JSON).exists():
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is not None:
            return found
    raise PathNotFoundError(f"no training checkpoint at {p} (resume_from / checkpoint_dir: expected a folder with "
                            f"{STATE_JSON}, or a checkpoint_dir holding {LATEST})")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder; CorruptFileError if any part is missing or unreadable."""
    p = resolve_checkpoint(path)
    try:
        state = read_json(p / STATE_JSON)
    except OSError as e:
        raise CorruptFileError(f"{p / STATE_JSON} is unreadable: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CorruptFileError(f"{p / STATE_JSON}: not a splinterp checkpoint of format {FORMAT_VERSION}")
    try:
        tensors = torch.load(p / STATE_PT, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptFileError(f"{p} lacks {STATE_PT}") from None
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise CorruptFileError(f"{p / STATE_PT} is unreadable (truncated or corrupt?): {e}") from None
    try:
        sae = load_sae_folder(p / SAE_DIR, device=device)
    except NotAnSAEFolderError as e:
        raise CorruptFileError(f"{p}: the model folder is missing or incomplete: {e}") from None
    sae_tensors = {n: t.detach() for n, t in sae.named_parameters()}
    return Checkpoint(path=p, state=state, tensors=tensors, sae_tensors=sae_tensors,
                      sae_config=sae.cfg.to_dict())
