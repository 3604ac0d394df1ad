"""Trained SAEs on disk, keyed by everything that decides them, so that jobs needing the same SAE train it
once per output folder (and a rerun reuses it)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from splinterp.atomic import write_json
from splinterp.errors import CorruptFileError
from splinterp.jsonable import to_jsonable

log = logging.getLogger(__name__)

STORE_VERSION = 1
"""Bump when a change to the training code should invalidate SAEs already in an output folder's store."""


def key_hash(obj: Any, n: int = 12) -> str:
    """A short stable hash of a JSON-able key (names of cache and store folders)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


class SAEStore:
    """Trained SAEs on disk, keyed by a hash of everything that decides them; `enabled=False` never reuses.

    Layout: root/<name>-<hash>/sae/ (splinterp.save) and meta.json (key + results), meta.json last;
    `train_layers_sae` adds standardizers.json ({layer: Standardizer.to_dict()}: how the SAE's inputs were made).
    """

    def __init__(self, root: str | os.PathLike, enabled: bool = True):
        self.root, self.enabled = Path(root), enabled

    def folder(self, name: str, key: dict[str, Any]) -> Path:
        return self.root / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', name)}-{key_hash({**key, 'v': STORE_VERSION}, 16)}"

    def get(self, name: str, key: dict[str, Any], device: str = "cpu"):
        """(SAE, meta) if stored, else None."""
        from splinterp.io import load

        f = self.folder(name, key)
        if not self.enabled or not (f / "meta.json").is_file():
            return None
        try:
            meta = json.loads((f / "meta.json").read_text("utf-8"))
            if meta.get("key") != json.loads(json.dumps(key, default=str)):
                return None
            return load(f / "sae", device=device), meta
        except (OSError, ValueError, CorruptFileError) as e:
            log.warning("stored SAE %s is unreadable (%s); training again", f, e)
            return None

    def put(self, name: str, key: dict[str, Any], sae: Any, meta: dict[str, Any],
            extra_json: dict[str, Any] | None = None) -> Path:
        from splinterp.io import save

        f = self.folder(name, key)
        save(sae, f / "sae")
        for fname, obj in (extra_json or {}).items():
            write_json(f / fname, obj)
        write_json(f / "meta.json", to_jsonable({**meta, "key": json.loads(json.dumps(key, default=str))}))
        return f
