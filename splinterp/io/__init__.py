"""Save and load SAEs: ours (a SAELens folder), and every form an SAE that users already have comes in.

    sae = splinterp.load(path)                          # any folder or file below, detected from its files
    sae = splinterp.load("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")   # a SAELens release
    sae = splinterp.as_sae(obj)                         # a SAELens / sparsify / dictionary_learning object
    sae = splinterp.SAE.from_weights(W_enc, b_enc, W_dec, b_dec, architecture="jumprelu", threshold=t)
    splinterp.save(sae, folder)                         # a SAELens 6 folder; format="sparsify" for sparsify's

One module per source: `saelens` (ours and SAELens's folders and objects), `sparsify`, `dictionary_learning`,
`gemma_scope` (params.npz), `pretrained` (SAELens releases), `objects` (`as_sae`), and `common` (the checks
every reader shares). Each module's docstring states the library's conventions as read from its code. Every
user file is read without running code: safetensors, JSON, `torch.load(weights_only=True)`,
`np.load(allow_pickle=False)`. A loaded SAE computes its scores in its library's order, so its active sets
equal the library's bit for bit (`SAEConfig.score_order`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from splinterp.errors import ConfigError, NonFiniteError, NotAnSAEFolderError, UnsupportedObjectError
from splinterp.io import dictionary_learning as _dl
from splinterp.io import gemma_scope as _gs
from splinterp.io import saelens as _sl
from splinterp.io import sparsify as _sp
from splinterp.io.common import CFG_FILE, SAE_FOLDER_FILES, build_sae, natural_key, read_json
from splinterp.io.objects import as_sae, as_sae_if_foreign, library_of
from splinterp.io.saelens import (
    ACTIVATION_SCALER_FILE,
    SAELENS_FORMAT_VERSION,
    WEIGHTS_FILE,
    saelens_cfg,
    state_tensors,
)
from splinterp.io.sparsify import WEIGHTS_FILE as SPARSIFY_WEIGHTS_FILE
from splinterp.sae import SAE, TOPK_ARCHITECTURES
from splinterp.validation import check_dataclass_types, check_finite

__all__ = [
    "ACTIVATION_SCALER_FILE", "CFG_FILE", "FORMATS", "SAELENS_FORMAT_VERSION", "SAE_FOLDER_FILES", "SAVE_FORMATS",
    "SPARSIFY_WEIGHTS_FILE", "WEIGHTS_FILE", "as_sae", "as_sae_if_foreign", "detect_format", "library_of", "load",
    "load_many", "save", "saelens_cfg", "state_tensors",
]

FORMATS = {
    "splinterp": f"a splinterp folder: {CFG_FILE} (with a 'splinterp' block) + {WEIGHTS_FILE}",
    "saelens": f"a SAELens folder: {CFG_FILE} + {WEIGHTS_FILE} (optionally {ACTIVATION_SCALER_FILE})",
    "sparsify": f"a sparsify folder: {CFG_FILE} + {SPARSIFY_WEIGHTS_FILE}",
    "dictionary_learning": f"a dictionary_learning folder: {_dl.CONFIG_FILE} + {_dl.WEIGHTS_FILE}",
    "gemma_scope": f"Gemma Scope: {_gs.PARAMS_FILE} (the file, or a folder holding it)",
}
"""Every on-disk form `load` reads, by the name `detect_format` returns."""
_ALSO = ("a folder of SAE folders: splinterp.io.load_many(root)",
         "a SAELens pretrained release: splinterp.load(release, sae_id=...)",
         "an SAE object in memory (SAELens, sparsify, dictionary_learning): splinterp.as_sae(obj)",
         "raw matrices: splinterp.SAE.from_weights(W_enc, b_enc, W_dec, b_dec, ...)")


def recognised_formats() -> str:
    """The list every 'not an SAE' error ends with."""
    return "splinterp reads: " + "; ".join([*FORMATS.values(), *_ALSO])


# ---------------------------------------------------------------------------------------------- detect
def detect_format(path: str | os.PathLike) -> str:
    """'splinterp', 'saelens', 'sparsify', 'dictionary_learning' or 'gemma_scope', from the files at `path` (a
    folder, or a params.npz file); NotAnSAEFolderError naming every recognised format otherwise."""
    path = Path(path)
    if path.is_file():
        if path.name == _gs.PARAMS_FILE or path.suffix == ".npz":
            return "gemma_scope"
        hint = ""
        if path.name in (CFG_FILE, WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE, _dl.WEIGHTS_FILE, _dl.CONFIG_FILE):
            hint = f"; pass the folder that holds {path.name} ({path.parent})"
        raise NotAnSAEFolderError(
            f"{path} is not a folder or an SAE file splinterp reads{hint}. {recognised_formats()}"
        )
    if not path.is_dir():
        raise NotAnSAEFolderError(
            f"{path} does not exist (not a folder or file). For a SAELens pretrained release pass sae_id=. "
            f"{recognised_formats()}"
        )
    if (path / CFG_FILE).is_file():
        if (path / WEIGHTS_FILE).is_file():
            return "splinterp" if "splinterp" in read_json(path / CFG_FILE) else "saelens"
        if (path / SPARSIFY_WEIGHTS_FILE).is_file():
            return "sparsify"
        raise NotAnSAEFolderError(
            f"{path} has {CFG_FILE} but neither {WEIGHTS_FILE} nor {SPARSIFY_WEIGHTS_FILE}. {recognised_formats()}"
        )
    if (path / _dl.WEIGHTS_FILE).is_file():
        if not (path / _dl.CONFIG_FILE).is_file():
            raise NotAnSAEFolderError(f"{path} has {_dl.WEIGHTS_FILE} but no {_dl.CONFIG_FILE} (dictionary_learning "
                                      f"names the class there). {recognised_formats()}")
        return "dictionary_learning"
    if (path / _gs.PARAMS_FILE).is_file():
        return "gemma_scope"
    subs = [p.name for p in sorted(path.iterdir()) if p.is_dir() and _looks_like_sae(p)]
    hint = f" It holds SAE sub-folders ({', '.join(subs[:3])}...): use splinterp.io.load_many." if subs else ""
    raise NotAnSAEFolderError(
        f"{path} holds no SAE (no {CFG_FILE}, {_dl.CONFIG_FILE} + {_dl.WEIGHTS_FILE}, or {_gs.PARAMS_FILE}).{hint} "
        f"{recognised_formats()}"
    )


def _looks_like_sae(p: Path) -> bool:
    return any((p / f).is_file() for f in (CFG_FILE, _dl.WEIGHTS_FILE, _gs.PARAMS_FILE))


# ---------------------------------------------------------------------------------------------- load
def load(
    path_or_release: str | os.PathLike,
    device: str | torch.device = "cpu",
    *,
    sae_id: str | None = None,
    dtype: str | torch.dtype | None = None,
    k: int | None = None,
    verify: bool = True,
) -> SAE:
    """Load an SAE from any form in `FORMATS` (detected from its files) or a SAELens pretrained release.

    path_or_release: a folder or params.npz; or, with `sae_id`, a SAELens release name / Hugging Face repo (or a
    local folder of SAE folders, `sae_id` naming the sub-folder). dtype: cast to this dtype (default: the
    source's; dictionary_learning's loader gives float32). k: another k for a TopK SAE (e.g. 4k for a sparsify
    multi_topk SAE, whose forward decodes with 4k). verify: check our folders' weight checksum.

    Every problem is a `SplinterpError` naming the file and the field: NotAnSAEFolderError (listing every
    format splinterp reads), CorruptFileError (unparsable, truncated, weights disagreeing with their config),
    ChecksumError (weights changed since splinterp saved them; `verify=False` skips the check), ConfigError
    (unsupported or invalid settings).
    """
    if sae_id is not None:
        local = Path(path_or_release)
        if local.is_dir() and (local / sae_id).is_dir():
            return load(local / sae_id, device, dtype=dtype, k=k, verify=verify)
        if not isinstance(path_or_release, str):
            raise ConfigError(f"a SAELens release name must be a string, got {type(path_or_release).__name__}")
        from splinterp.io.pretrained import load_release

        dt = None if dtype is None else str(dtype).removeprefix("torch.")
        sae = load_release(path_or_release, sae_id, device, dt)
        return sae if k is None else _with_k(sae, k, path_or_release)
    path = Path(path_or_release)
    fmt = detect_format(path)
    exact = False
    if fmt == "gemma_scope":
        source = path if path.is_file() else path / _gs.PARAMS_FILE
        cfg, tensors = _gs.read_gemma_scope(source)
    elif fmt == "dictionary_learning":
        source = path
        cfg, tensors = _dl.read_dictionary_folder(path)
    else:
        source = path
        d = read_json(path / CFG_FILE)
        if fmt == "splinterp":
            cfg, tensors = _sl.read_ours(d, path, verify)
            exact = True
        elif fmt == "saelens":
            cfg, tensors = _sl.read_saelens_folder(d, path)
        else:
            cfg, tensors = _sp.read_sparsify_folder(d, path)
    if k is not None:
        cfg = _with_k_cfg(cfg, k, source)
    return build_sae(cfg, tensors, source, exact_dtype=exact, device=device, dtype=dtype)


def _with_k_cfg(cfg, k, source):
    if cfg.architecture not in TOPK_ARCHITECTURES:
        raise ConfigError(f"load(k={k!r}): {source} is a {cfg.architecture} SAE; k applies to TopK SAEs only")
    try:
        return cfg.replace(k=k, metadata={**cfg.metadata, "k_saved": cfg.k})
    except ConfigError as e:
        raise ConfigError(f"load(k={k!r}): {e}") from None


def _with_k(sae: SAE, k: int, source) -> SAE:
    cfg = _with_k_cfg(sae.cfg, k, source)
    return build_sae(cfg, state_tensors(sae), source, device=sae.device)


def load_many(root: str | os.PathLike, device: str | torch.device = "cpu", *, verify: bool = True,
              dtype: str | torch.dtype | None = None) -> dict[str, SAE]:
    """Every SAE sub-folder of `root` (e.g. sparsify's one per hookpoint), naturally sorted by name.

    `layers.2` comes before `layers.10`, as in sparsify's `load_many`.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotAnSAEFolderError(f"{root} is not a folder")
    subs = sorted((p for p in root.iterdir() if p.is_dir() and _looks_like_sae(p)), key=lambda p: natural_key(p.name))
    if not subs:
        raise NotAnSAEFolderError(f"{root} holds no SAE sub-folders (folders with a {CFG_FILE}, {_dl.WEIGHTS_FILE} "
                                  f"or {_gs.PARAMS_FILE})")
    return {p.name: load(p, device, verify=verify, dtype=dtype) for p in subs}


# ---------------------------------------------------------------------------------------------- save
SAVE_FORMATS = ("splinterp", "sparsify")


def save(sae: Any, folder: str | os.PathLike, *, format: str = "splinterp") -> Path:  # noqa: A002
    """Write `sae` (ours, or any object `as_sae` converts) to `folder`, atomically. Returns the folder.

    format="splinterp" (default): cfg.json + sae_weights.safetensors, a SAELens 6 folder that round-trips
    exactly. format="sparsify": cfg.json + sae.safetensors as EleutherAI sparsify writes them
    (`SparseCoder.load_from_disk` reads it); TopK SAEs only, and a warning names what sparsify's format
    cannot hold (tied, apply_b_dec_to_input=False, metadata such as hook_name).
    An existing SAE folder there is replaced whole; anything else there is refused (OverwriteError).
    Non-finite weights are refused (NonFiniteError): `load` would reject the folder.
    """
    try:
        sae = as_sae(sae)
    except UnsupportedObjectError as e:
        raise UnsupportedObjectError(f"save: {e}") from None
    if format not in SAVE_FORMATS:
        raise ConfigError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
    folder = Path(folder)
    check_dataclass_types(sae.cfg)
    tensors = state_tensors(sae)
    for name, t in tensors.items():
        try:
            check_finite(t, name=name)
        except NonFiniteError as e:
            raise NonFiniteError(f"cannot save the SAE: {e}") from None
    if format == "sparsify":
        return _sp.save_sparsify(sae, tensors, folder)
    return _sl.save_splinterp(sae, folder, tensors)
