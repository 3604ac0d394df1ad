"""A data matrix [N, d] from a user's file: .npy, .pt/.pth, .safetensors, or one layer of an activation cache.

Why one reader: every command that takes `--data` (geometry, train, slice) must accept the same files and
refuse the same mistakes with the same words. Files are read without pickle (`allow_pickle=False`,
`weights_only=True`); nothing is converted silently: the caller sees the stored dtype and decides.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from splinterp.errors import ConfigError, CorruptFileError, DatasetNotFoundError, ShapeError
from splinterp.validation import check_finite

__all__ = ["DATA_SUFFIXES", "load_matrix"]

DATA_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


def _pick(d: dict, key: str | None, path: Path):
    tensors = {k: v for k, v in d.items() if isinstance(v, (torch.Tensor, np.ndarray))}
    if key is not None:
        if key not in d:
            raise ConfigError(f"key {key!r} is not in {path} (keys: {sorted(d)})")
        return d[key]
    if len(tensors) != 1:
        raise ConfigError(f"{path} holds {len(tensors)} tensors ({sorted(tensors)}); choose one with key= (--key)")
    return next(iter(tensors.values()))


def _read_file(path: Path, key: str | None) -> torch.Tensor:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (ValueError, OSError, EOFError) as e:
            raise CorruptFileError(f"cannot read {path} as a .npy array: {e}") from None
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling problem becomes one clear message
            raise CorruptFileError(f"cannot read {path} as a torch tensor file: {e}") from None
        if isinstance(obj, torch.Tensor):
            if key is not None:
                raise ConfigError(f"{path} holds one tensor; key={key!r} does not apply")
            return obj
        if isinstance(obj, dict):
            return torch.as_tensor(_pick(obj, key, path))
        raise ConfigError(f"{path} holds a {type(obj).__name__}, not a tensor or a dict of tensors")
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CorruptFileError(f"cannot read {path} as safetensors: {e}") from None
        return _pick(tensors, key, path)
    raise ConfigError(f"{path}: unknown data format {suffix!r}; use {', '.join(DATA_SUFFIXES)} or an activation-cache "
                      "folder")


def load_matrix(path: str | os.PathLike, *, layer: int | None = None, key: str | None = None,
                split: str | None = None) -> torch.Tensor:
    """The matrix [N, d] stored at `path`, in its stored dtype, checked finite (a NaN is named by its row in
    the file). `layer` and `split` apply to activation-cache folders only, `key` to files holding several
    tensors; giving one where it does not apply is an error, not ignored."""
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"{path} does not exist")
    if path.is_dir():
        from splinterp.data.cache import ActivationCache

        if key is not None:
            raise ConfigError(f"key={key!r} applies to .pt/.safetensors files, not to the cache folder {path}")
        cache = ActivationCache.open(path)
        x = cache.load(cache.choose_layer(layer), split=split, dtype=None)
    else:
        if layer is not None:
            raise ConfigError(f"layer={layer} (--layer) applies to activation-cache folders only, not to the file "
                              f"{path}")
        if split is not None:
            raise ConfigError(f"split={split!r} (--split) applies to activation-cache folders only, not to the file "
                              f"{path}")
        x = torch.as_tensor(_read_file(path, key))
    if x.ndim != 2:
        raise ShapeError(f"{path} holds an array of shape {tuple(x.shape)}; a matrix [N, d] is needed")
    if not x.is_floating_point():
        raise ConfigError(f"{path} holds {x.dtype} values; floating-point rows are needed")
    check_finite(x, str(path))
    return x
