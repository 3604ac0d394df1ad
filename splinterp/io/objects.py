"""SAEs that live in memory as another library's objects, converted with one call: `as_sae(obj)`.

Accepted: our `SAE` (returned as is), a SAELens `SAE` or `TrainingSAE`, a sparsify `SparseCoder`, and a
dictionary_learning dictionary (the classes `splinterp.io.dictionary_learning` lists). The object's weights
are read through its `state_dict` and its config as that library saves it, then read exactly as a folder
written by the library would be (same checks, same folds, the library's score order), so the converted SAE
has the object's active sets bit for bit. Neither library needs importing to recognise its objects.

Cheap and idempotent: converting the same object again, while neither it nor the converted SAE has changed
(no parameter written since), returns the SAE converted before.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from splinterp.errors import UnsupportedObjectError
from splinterp.io.common import build_sae
from splinterp.sae import SAE

_LIBRARIES = ("sae_lens", "sparsify", "dictionary_learning")
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def library_of(obj: Any) -> str | None:
    """'sae_lens', 'sparsify' or 'dictionary_learning' when `obj` is an SAE object of that library, else None."""
    if isinstance(obj, SAE) or not isinstance(obj, torch.nn.Module):
        return None
    for cls in type(obj).__mro__:
        top = cls.__module__.split(".")[0]
        if top in _LIBRARIES:
            return top
    return None


def _fingerprint(module: torch.nn.Module) -> tuple:
    return tuple((n, t.data_ptr(), t._version, t.dtype, t.device) for n, t in module.state_dict(keep_vars=True).items())


def as_sae(obj: Any) -> SAE:
    """Our SAE for `obj`: itself if it is one, else the conversion of a SAELens, sparsify or dictionary_learning
    SAE object (UnsupportedObjectError for anything else)."""
    if isinstance(obj, SAE):
        return obj
    lib = library_of(obj)
    if lib is None:
        raise UnsupportedObjectError(
            f"expected a splinterp SAE, or an SAE object of SAELens (SAE, TrainingSAE), sparsify (SparseCoder) or "
            f"dictionary_learning (AutoEncoder, AutoEncoderTopK, BatchTopKSAE, MatryoshkaBatchTopKSAE, "
            f"JumpReluAutoEncoder, GatedAutoEncoder, AutoEncoderNew); got {type(obj).__name__}"
        )
    key = _fingerprint(obj)
    try:
        hit = _cache.get(obj)
    except TypeError:  # not weak-referenceable: convert every time
        hit = None
    if hit is not None and hit[0] == key and hit[2] == _fingerprint(hit[1]):
        return hit[1]
    if lib == "sae_lens":
        from splinterp.io.saelens import from_saelens_object as read
    elif lib == "sparsify":
        from splinterp.io.sparsify import from_sparsify_object as read
    else:
        from splinterp.io.dictionary_learning import from_dictionary_object as read
    cfg, tensors = read(obj)
    device = next((t.device for t in tensors.values()), torch.device("cpu"))
    sae = build_sae(cfg, tensors, f"{type(obj).__name__} object", device=device)
    try:
        _cache[obj] = (key, sae, _fingerprint(sae))
    except TypeError:
        pass
    return sae


def as_sae_if_foreign(obj: Any) -> Any:
    """`as_sae(obj)` for another library's SAE object; anything else (our SAE, a reference AE) unchanged."""
    return as_sae(obj) if library_of(obj) is not None else obj
