"""SAELens pretrained releases: `load("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")` delegates to
`sae_lens.SAE.from_pretrained` (its release directory, converters and Hugging Face download, which honours
HF_HUB_OFFLINE=1 and a local Hugging Face cache) and converts the result with `as_sae`. The release and id are
kept as metadata. Needs the `interop` extra (sae-lens).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from splinterp.errors import ConfigError, NotAnSAEFolderError, SplinterpError


def load_release(release: str, sae_id: str, device: str | torch.device = "cpu", dtype: str | None = None) -> Any:
    from splinterp.io.objects import as_sae

    if not isinstance(sae_id, str) or not sae_id:
        raise ConfigError(f"sae_id must be a non-empty string, got {sae_id!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from sae_lens import SAE as SAELensSAE
    except ImportError as e:
        raise ConfigError(
            f"{release!r} is not a file or folder here, and loading it as a SAELens pretrained release "
            f"(sae_id={sae_id!r}) needs sae-lens: pip install 'splinterp[interop]' ({e})"
        ) from None
    try:
        sae = SAELensSAE.from_pretrained(release, sae_id, device=str(device), dtype=dtype or "float32")
    except SplinterpError:
        raise
    except (OSError, ValueError, KeyError) as e:  # unknown release or id, not in the cache while offline, ...
        raise NotAnSAEFolderError(
            f"SAELens could not load release {release!r}, sae_id {sae_id!r}: {type(e).__name__}: {e}. Offline, the "
            f"files must already be in the Hugging Face cache (HF_HUB_CACHE)."
        ) from None
    ours = as_sae(sae)
    ours.cfg.metadata.update(release=release, sae_id=sae_id)
    return ours
