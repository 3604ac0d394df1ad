"""Read an activation cache written by `splinterp.data.harvest`, shard by shard, and standardise it.

Nothing here loads the whole cache: `iter_batches` opens one shard at a time with safetensors'
lazy `safe_open` (memory-mapped; asking for one layer reads only that tensor) and keeps at most one
shard plus an optional shuffle buffer in memory.

Train/test split: deterministic and token-level. Token g (its global index in the cache) goes to the
test split iff u(g) < test_frac, with u a splitmix64 hash of (split_seed, g) mapped to [0, 1). The
split thus depends on neither the shard size nor the read order, is the same for every layer, and
needs no stored index; the test fraction is test_frac up to sampling noise. `split_unit="text"`
hashes the text index instead, so all tokens of one text fall on the same side (no leakage of a
text's context between train and test).

Integrity: every shard's sha256 is in the manifest, and by default a shard is checked the first time this
process reads it (`verify="on_read"`): the whole file is hashed once, which also pulls it into the page cache
that the memory-mapped read then uses, and the result is remembered per file (device, inode, size, mtime,
ctime), so later epochs, views and readers of the same file do not hash it again. A tampered or bit-rotted
shard is a `ChecksumError` naming it, never data read silently.

Standardisation (`Standardizer`): per-feature mean and std fitted on the training split only
(streamed, Chan's parallel update in float64), unlike the paper's E3 script which used train and
test together. std is the population std (ddof=0); transform is (x - mean) / (std + eps).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from splinterp.atomic import sha256_file, write_json
from splinterp.errors import (
    ChecksumError,
    ConfigError,
    CorruptFileError,
    DTypeError,
    EmptyDataError,
    ShapeError,
)
from splinterp.moments import Moments
from splinterp.validation import all_finite, check_data, check_device, check_positive_int, read_json

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_FORMAT = "splinterp.activation_cache"
CACHE_FORMAT_VERSION = 1
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPLITS = ("train", "test", None)
SPLIT_UNITS = ("token", "text")
VERIFY_MODES = (True, False, "on_read")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_M64 = (1 << 64) - 1


def split_uniform(index: np.ndarray | torch.Tensor, seed: int) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per integer index (splitmix64 of seed and index)."""
    idx = np.asarray(index, dtype=np.uint64)
    z = idx + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _M64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _is_int(v: Any, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _check_frac(test_frac: float) -> float:
    if isinstance(test_frac, bool) or not isinstance(test_frac, (int, float)) or not 0.0 <= test_frac <= 1.0:
        raise ConfigError(f"test_frac must be a number in [0, 1], got {test_frac!r}")
    return float(test_frac)


# ------------------------------------------------------------------------------- what a cache may hold
def to_storage(x: torch.Tensor, dtype: str, name: str = "acts") -> torch.Tensor:
    """`x` (finite) converted to the cache's storage dtype on the CPU; ConfigError naming the largest value if
    some value does not fit (float16 ends at 65504): an inf would otherwise come back from every read."""
    if not isinstance(dtype, str) or dtype not in STORE_DTYPES:
        raise ConfigError(f"dtype must be one of {tuple(STORE_DTYPES)}, got {dtype!r}")
    out = x.detach().to(device="cpu", dtype=STORE_DTYPES[dtype])
    if all_finite(out):
        return out
    flat = x.detach().reshape(-1, x.shape[-1]).abs()
    i = int(flat.reshape(-1).argmax())
    row, col = divmod(i, x.shape[-1])
    biggest = float(x.detach().reshape(-1, x.shape[-1])[row, col])
    top = torch.finfo(STORE_DTYPES[dtype]).max
    raise ConfigError(
        f"{name} holds {biggest:.6g} (row {row}, column {col}), beyond the largest {dtype} ({top:.6g}); storing "
        f"it with dtype={dtype!r} would turn it into inf. Use dtype='float32' or 'bfloat16', or rescale the data")


def check_texts(texts: Any, n_rows: int, text_ids: torch.Tensor | None = None) -> list[str] | None:
    """The texts a cache stores, as a list of strings that `text_ids` index.

    Without `text_ids` every row is its own text, so there must be exactly one string per row; with them,
    one string per sequence: every id in [0, len(texts)). None passes through (no texts stored).
    """
    if texts is None:
        return None
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise DTypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise DTypeError(f"texts must be strings, but texts[{bad}] is {type(texts[bad]).__name__} "
                         f"{repr(texts[bad])[:40]}")
    if text_ids is None:
        if len(texts) != n_rows:
            raise ShapeError(f"texts has {len(texts)} entries for {n_rows} rows: without text_ids every row is its "
                             "own text, so give one string per row (or text_ids mapping rows to texts)")
    elif text_ids.numel():
        lo, hi = int(text_ids.min()), int(text_ids.max())
        if lo < 0 or hi >= len(texts):
            raise ShapeError(f"texts has {len(texts)} entries but text_ids run from {lo} to {hi}: text_ids index "
                             "texts, so give one string per sequence")
    return list(texts)


def check_vocab(vocab: Any) -> dict[str, str] | None:
    """A token vocabulary {token id: token string} as the cache's vocab.json stores it (keys as strings)."""
    if vocab is None:
        return None
    if not isinstance(vocab, Mapping):
        raise DTypeError(f"vocab must be a dict {{token id: token string}}, got {type(vocab).__name__}")
    for k, v in vocab.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not isinstance(v, str):
            raise DTypeError(f"vocab must map int token ids to strings, got {k!r}: {repr(v)[:40]}")
    return {str(int(k)): v for k, v in vocab.items()}


# ------------------------------------------------------------------------------- integrity of what is read
_verified: dict[tuple[int, ...], str] = {}
"""sha256 of shard files this process has hashed, keyed by the file's identity (device, inode, size, mtime,
ctime): any change to the file changes its ctime, so a remembered hash is never that of older bytes."""
_verified_guard = threading.Lock()


def check_shard_file(path: Path, sha256: str) -> None:
    """ChecksumError if the file's sha256 is not `sha256`; each file version is hashed once per process."""
    try:
        st = path.stat()
    except OSError as e:
        raise CorruptFileError(f"shard {path.name} in {path.parent} cannot be read: {e}") from None
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    got = _verified.get(key)
    if got is None:
        try:
            got = sha256_file(path)
        except OSError as e:
            raise CorruptFileError(f"shard {path.name} in {path.parent} cannot be read: {e}") from None
        with _verified_guard:
            _verified[key] = got
    if got != sha256:
        raise ChecksumError(
            f"shard {path.name} in {path.parent} has sha256 {got[:16]}..., the manifest says {sha256[:16]}...: the "
            "file is corrupt or was modified (re-harvest it, or open with verify=False to read it anyway)")


def validate_manifest(m: Any, where: str = MANIFEST) -> dict[str, Any]:
    """Check every field a reader relies on; CorruptFileError naming the first bad one."""

    def bad(msg: str) -> CorruptFileError:
        return CorruptFileError(f"{where}: {msg}")

    if not isinstance(m, dict):
        raise bad("not a JSON object")
    if m.get("format") != CACHE_FORMAT:
        raise bad(f"format is {m.get('format')!r}, expected {CACHE_FORMAT!r}")
    if not _is_int(m.get("format_version"), 1) or m["format_version"] > CACHE_FORMAT_VERSION:
        raise bad(f"unsupported format_version {m.get('format_version')!r} (this splinterp reads <= "
                  f"{CACHE_FORMAT_VERSION})")
    layers = m.get("layers")
    if not isinstance(layers, list) or not layers or not all(_is_int(v) for v in layers):
        raise bad(f"layers must be a non-empty list of non-negative ints, got {layers!r}")
    if not _is_int(m.get("d_model"), 1):
        raise bad(f"d_model must be a positive int, got {m.get('d_model')!r}")
    if not _is_int(m.get("n_tokens"), 1):
        raise bad(f"n_tokens must be a positive int, got {m.get('n_tokens')!r}")
    if not isinstance(m.get("dtype"), str) or m["dtype"] not in STORE_DTYPES:
        raise bad(f"dtype must be one of {tuple(STORE_DTYPES)}, got {m.get('dtype')!r}")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        raise bad("shards must be a non-empty list")
    start = 0
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise bad(f"shard {i} is not an object")
        f = s.get("file")
        if not isinstance(f, str) or not f or Path(f).name != f:
            raise bad(f"shard {i} has a bad file name {f!r}")
        if not _is_int(s.get("n_tokens"), 1) or s.get("start") != start:
            raise bad(f"shard {f} has bad n_tokens/start ({s.get('n_tokens')!r}, {s.get('start')!r}; "
                      f"expected start {start})")
        if not isinstance(s.get("sha256"), str) or not _SHA.match(s["sha256"]):
            raise bad(f"shard {f} has no valid sha256")
        start += s["n_tokens"]
    if start != m["n_tokens"]:
        raise bad(f"shards hold {start} tokens but n_tokens is {m['n_tokens']}")
    return m



class ActivationCache:
    """A harvested activation cache on disk (see `splinterp.data.harvest` for the layout).

    Open with `ActivationCache.open(folder)`. `test_frac`, `split_seed` and `split_unit` fix the
    default train/test split; every reader also takes `test_frac` to override it per call.
    """

    def __init__(self, folder: str | os.PathLike, manifest: dict[str, Any], test_frac: float = 0.1,
                 split_seed: int = 0, split_unit: str = "token", verify_reads: bool = True):
        self.folder = Path(folder)
        self.verify_reads = bool(verify_reads)
        """Check each shard's sha256 when it is first read (see the module docstring)."""
        self.manifest = manifest
        self.test_frac = _check_frac(test_frac)
        if not _is_int(split_seed):
            raise ConfigError(f"split_seed must be a non-negative int, got {split_seed!r}")
        if not isinstance(split_unit, str) or split_unit not in SPLIT_UNITS:
            raise ConfigError(f"split_unit must be one of {SPLIT_UNITS}, got {split_unit!r}")
        self.split_seed, self.split_unit = split_seed, split_unit
        self._texts: list[str] | None = None
        self._vocab: dict[str, str] | None = None

    # ------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, folder: str | os.PathLike, verify: bool | str = "on_read", test_frac: float = 0.1,
             split_seed: int = 0, split_unit: str = "token") -> ActivationCache:
        """Open and validate a cache folder.

        verify: "on_read" (default) checks each shard's sha256 the first time this process reads it (no extra
        pass: see the module docstring); True also checks every shard now; False never checks.
        """
        if not (verify is True or verify is False or (isinstance(verify, str) and verify == "on_read")):
            raise ConfigError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise CorruptFileError(
                f"{path} is missing: {folder} is not an activation cache, or its harvest was interrupted"
            )
        manifest = read_json(path)
        validate_manifest(manifest, str(path))
        for s in manifest["shards"]:
            if not (folder / s["file"]).is_file():
                raise CorruptFileError(f"shard {s['file']} listed in {path} is missing")
        cache = cls(folder, manifest, test_frac, split_seed, split_unit, verify_reads=verify is not False)
        if verify is True:
            cache.verify()
        return cache

    def verify(self) -> None:
        """Check every shard's sha256 now; ChecksumError naming the first shard that differs."""
        for s in self.shards:
            check_shard_file(self.folder / s["file"], s["sha256"])

    # ----------------------------------------------------------------------------- metadata
    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    def choose_layer(self, layer: int | None) -> int:
        """`layer` if this cache holds it; None: its only layer (a cache of several layers needs a choice)."""
        if layer is None:
            if len(self.layers) != 1:
                raise ConfigError(f"{self.folder} caches layers {self.layers}; choose one with --layer (layer=)")
            return self.layers[0]
        if layer not in self.layers:
            raise ConfigError(f"--layer {layer} is not in the cache {self.folder} (layers {self.layers})")
        return layer

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.manifest["dtype"]]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def model_name(self) -> str | None:
        return self.manifest.get("model_name")

    def __repr__(self) -> str:
        m = self.manifest
        return (f"ActivationCache({str(self.folder)!r}, model={m.get('model_name')!r}, layers={self.layers}, "
                f"site={m.get('site')!r}, n_tokens={self.n_tokens}, d_model={self.d_model}, dtype={m['dtype']})")

    # ------------------------------------------------------------------------------ reading
    def _check_layer(self, layer: int | Sequence[int]) -> list[int]:
        layers = [layer] if isinstance(layer, (int, np.integer)) else layer
        if isinstance(layer, bool) or not isinstance(layers, Sequence) or isinstance(layers, str) \
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in layers):
            raise ConfigError(f"layer must be a layer number or a list of them, got {layer!r}")
        layers = [int(v) for v in layers]
        missing = [v for v in layers if v not in self.manifest["layers"]]
        if missing or not layers:
            raise ConfigError(f"layer(s) {missing or layer!r} not in this cache (it holds {self.layers})")
        return layers

    def _read(self, shard: dict[str, Any], keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read `keys` of one shard lazily, checking each tensor's shape against the manifest."""
        path = self.folder / shard["file"]
        if self.verify_reads:
            check_shard_file(path, shard["sha256"])
        out = {}
        k = "header"
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        except (SafetensorError, OSError, KeyError, RuntimeError) as e:
            raise CorruptFileError(f"cannot read {k!r} from shard {shard['file']}: {e}") from e
        n = shard["n_tokens"]
        for k, t in out.items():
            want = (n, self.d_model) if k.startswith("layer_") else (n,)
            if tuple(t.shape) != want:
                raise CorruptFileError(
                    f"shard {shard['file']}: {k} has shape {tuple(t.shape)}, manifest implies {want}")
        return out

    def _split_keep(self, shard: dict[str, Any], split: str | None, test_frac: float | None,
                    text_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Bool mask of the shard's rows in `split` (None = every row)."""
        if not (split is None or (isinstance(split, str) and split in SPLITS)):
            raise ConfigError(f"split must be 'train', 'test' or None, got {split!r}")
        if split is None:
            return None
        frac = self.test_frac if test_frac is None else _check_frac(test_frac)
        if self.split_unit == "text":
            if text_ids is None:
                text_ids = self._read(shard, ["text_ids"])["text_ids"]
            key = text_ids.numpy()
        else:
            key = np.arange(shard["start"], shard["start"] + shard["n_tokens"], dtype=np.uint64)
        is_test = torch.from_numpy(split_uniform(key, self.split_seed) < frac)
        return is_test if split == "test" else ~is_test

    def split_size(self, split: str | None = None, test_frac: float | None = None) -> int:
        """Number of tokens in `split` (reads only the small index tensors when split_unit='text')."""
        if split is None:
            return self.n_tokens
        return sum(int(self._split_keep(s, split, test_frac).sum()) for s in self.shards)

    def _shard_rows(self, shard: dict[str, Any], layers: list[int], split: str | None,
                    test_frac: float | None, extra: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [f"layer_{v}" for v in layers] + list(extra)
        t = self._read(shard, keys)
        x = t[keys[0]] if len(layers) == 1 else torch.stack([t[f"layer_{v}"] for v in layers], 1)
        idx = torch.arange(shard["start"], shard["start"] + shard["n_tokens"], dtype=torch.long)
        keep = self._split_keep(shard, split, test_frac, t.get("text_ids"))
        if keep is not None:
            x, idx = x[keep], idx[keep]
        return x, idx

    def iter_batches(
        self,
        layer: int | Sequence[int],
        batch_size: int = 4096,
        *,
        shuffle: bool = False,
        seed: int = 0,
        split: str | None = None,
        test_frac: float | None = None,
        buffer_tokens: int | None = None,
        drop_last: bool = False,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device = "cpu",
        return_index: bool = False,
    ) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream batches [B, d_model] of one layer (or [B, n_layers, d_model] for a list of layers,
        the same tokens in every layer), shard by shard.

        shuffle: shards in a seeded random order, rows mixed through a buffer of `buffer_tokens`
        (default: 4 shards); buffer_tokens >= n_tokens makes it a full permutation. Batches are full
        size except the last (dropped if `drop_last`). return_index: also yield each row's global
        token index (for `token_ids`, `token_strings`, hover text). dtype None keeps the stored dtype.
        """
        layers = self._check_layer(layer)
        batch_size = check_positive_int(batch_size, "batch_size")
        if test_frac is not None:
            _check_frac(test_frac)
        if buffer_tokens is None:
            buffer_tokens = 4 * max(s["n_tokens"] for s in self.shards)
        buffer_tokens = max(check_positive_int(buffer_tokens, "buffer_tokens"), batch_size)
        if not _is_int(seed):
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating torch.dtype (e.g. torch.float32) or None, got {dtype!r}")
        dev = check_device(device)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.shards), generator=gen).tolist() if shuffle else range(len(self.shards))

        def emit(x: torch.Tensor, idx: torch.Tensor, n: int):
            for s in range(0, n, batch_size):
                xb = x[s:min(s + batch_size, n)]
                xb = xb.to(device=dev, dtype=dtype) if dtype is not None else xb.to(dev)
                yield (xb, idx[s:s + xb.shape[0]]) if return_index else xb

        pend_x: list[torch.Tensor] = []
        pend_i: list[torch.Tensor] = []
        n_pend = 0
        for si in order:
            x, idx = self._shard_rows(self.shards[si], layers, split, test_frac)
            if x.shape[0] == 0:
                continue
            pend_x.append(x)
            pend_i.append(idx)
            n_pend += x.shape[0]
            if shuffle and n_pend < buffer_tokens:
                continue
            X, Idx = torch.cat(pend_x), torch.cat(pend_i)
            if shuffle:
                p = torch.randperm(n_pend, generator=gen)
                X, Idx = X[p], Idx[p]
                n_out = max(n_pend - buffer_tokens // 2, 0) // batch_size * batch_size
            else:
                n_out = n_pend // batch_size * batch_size
            yield from emit(X, Idx, n_out)
            pend_x, pend_i, n_pend = [X[n_out:]], [Idx[n_out:]], n_pend - n_out
        if n_pend:
            X, Idx = torch.cat(pend_x), torch.cat(pend_i)
            if shuffle:
                p = torch.randperm(n_pend, generator=gen)
                X, Idx = X[p], Idx[p]
            n_out = n_pend // batch_size * batch_size if drop_last else n_pend
            yield from emit(X, Idx, n_out)

    def load(self, layer: int | Sequence[int], split: str | None = None, *, test_frac: float | None = None,
             dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
             max_bytes: int = 4 << 30) -> torch.Tensor:
        """The whole layer (or split) as one tensor, for small caches; refuses above `max_bytes`."""
        layers = self._check_layer(layer)
        max_bytes = check_positive_int(max_bytes, "max_bytes")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ConfigError(f"dtype must be a floating torch.dtype (e.g. torch.float32) or None, got {dtype!r}")
        itemsize = torch.empty((), dtype=dtype or self.dtype).element_size()
        need = self.n_tokens * self.d_model * len(layers) * itemsize
        if need > max_bytes:
            raise ConfigError(f"loading {need / 2**30:.1f} GiB exceeds max_bytes={max_bytes}; use iter_batches "
                              "or raise max_bytes")
        parts = [b for b in self.iter_batches(layer, batch_size=max(self.n_tokens, 1), split=split,
                                              test_frac=test_frac, dtype=dtype, device=device)]
        if not parts:
            raise EmptyDataError(f"split {split!r} of {self.folder} has no tokens")
        return torch.cat(parts)

    # ---------------------------------------------------------------- token-level metadata
    def _index_tensor(self, key: str, split: str | None, test_frac: float | None) -> torch.Tensor:
        parts = []
        for s in self.shards:
            t = self._read(s, [key] if key == "text_ids" or self.split_unit != "text" else [key, "text_ids"])
            keep = self._split_keep(s, split, test_frac, t.get("text_ids"))
            parts.append(t[key] if keep is None else t[key][keep])
        return torch.cat(parts)

    def token_ids(self, split: str | None = None, test_frac: float | None = None) -> torch.Tensor:
        """Token id of every cached token of `split`, in the order `iter_batches(shuffle=False)` yields."""
        return self._index_tensor("token_ids", split, test_frac)

    def text_ids(self, split: str | None = None, test_frac: float | None = None) -> torch.Tensor:
        """Index (into `texts`) of the text each token came from."""
        return self._index_tensor("text_ids", split, test_frac)

    def positions(self, split: str | None = None, test_frac: float | None = None) -> torch.Tensor:
        """Position of each token among its text's real tokens (0 = first token, e.g. [CLS]/<bos>)."""
        return self._index_tensor("positions", split, test_frac)

    def token_index(self, split: str | None = None, test_frac: float | None = None) -> torch.Tensor:
        """Global token indices of `split` (what `iter_batches(return_index=True)` yields)."""
        parts = []
        for s in self.shards:
            idx = torch.arange(s["start"], s["start"] + s["n_tokens"])
            keep = self._split_keep(s, split, test_frac)
            parts.append(idx if keep is None else idx[keep])
        return torch.cat(parts)

    @property
    def texts(self) -> list[str] | None:
        """The harvested texts (None if the harvest ran with save_texts=False)."""
        if self._texts is None and (self.folder / "texts.json").is_file():
            texts = read_json(self.folder / "texts.json")
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise CorruptFileError(f"{self.folder / 'texts.json'} is not a list of strings")
            self._texts = texts
        return self._texts

    def token_strings(self, split: str | None = None, test_frac: float | None = None,
                      index: torch.Tensor | None = None) -> list[str]:
        """Token strings (from the cache's vocab.json) of `split`, or of global token `index`es."""
        if self._vocab is None:
            path = self.folder / "vocab.json"
            if not path.is_file():
                raise CorruptFileError(f"{path} is missing: this cache stored no token strings")
            vocab = read_json(path)
            if not isinstance(vocab, dict) or not all(isinstance(v, str) for v in vocab.values()):
                raise CorruptFileError(f"{path} is not an object of token strings")
            self._vocab = vocab
        ids = self.token_ids(None if index is not None else split, test_frac)
        if index is not None:
            ids = ids[torch.as_tensor(index, dtype=torch.long)]
        return [self._vocab.get(str(i), f"<{i}>") for i in ids.tolist()]


# ------------------------------------------------------------------------------- standardiser
@dataclass
class Standardizer:
    """Per-feature standardisation x -> (x - mean) / (std + eps), fitted on training data only."""

    mean: torch.Tensor
    std: torch.Tensor
    eps: float = 1e-8
    n: int = 0
    layer: int | None = None

    @classmethod
    def fit(cls, source: ActivationCache | torch.Tensor | Iterable[torch.Tensor], layer: int | None = None,
            split: str | None = "train", *, batch_size: int = 8192, eps: float = 1e-8,
            test_frac: float | None = None) -> Standardizer:
        """Stream mean/std over `source`: a cache (its `split` of `layer`), a tensor [N, d] or an
        iterable of such batches. float64 accumulators, so float16 caches lose nothing."""
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ConfigError(f"eps must be a finite number >= 0, got {eps!r}")
        if isinstance(source, ActivationCache):
            if layer is None:
                raise ConfigError("Standardizer.fit on a cache needs layer=")
            batches: Iterable[torch.Tensor] = source.iter_batches(layer, batch_size, split=split,
                                                                   test_frac=test_frac, dtype=None)
        elif isinstance(source, (torch.Tensor, np.ndarray)):
            batches = [check_data(source, name="activations")]
        else:
            batches = source
        moments = None
        for b in batches:
            b = check_data(b, None if moments is None else moments.mean.shape[0], name="activation batch")
            part = Moments.of(b)
            moments = part if moments is None else moments.merge(part)
        if moments is None or moments.n == 0:
            raise EmptyDataError("no data to fit the Standardizer on")
        return cls.from_moments(moments, eps=eps, layer=layer)

    @classmethod
    def from_moments(cls, moments: Moments, *, eps: float = 1e-8, layer: int | None = None) -> Standardizer:
        return cls(mean=moments.mean, std=torch.sqrt(moments.var), eps=eps, n=moments.n, layer=layer)

    @property
    def moments(self) -> Moments:
        """The (count, mean, squared deviations) it was fitted from: what `merge` combines."""
        return Moments.from_std(self.n, self.mean, self.std)

    @classmethod
    def merge(cls, parts: Iterable[Standardizer | None]) -> Standardizer:
        """The standardiser fitted on the union of the parts' rows (e.g. one part per data-parallel rank)."""
        parts = [p for p in parts if p is not None]
        moments = Moments.combine(p.moments for p in parts)
        if moments is None:
            raise EmptyDataError("no training rows to fit the standardiser on")
        return cls.from_moments(moments, eps=parts[0].eps, layer=parts[0].layer)

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.mean.shape[0]:
            shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
            raise ShapeError(f"expected [..., {self.mean.shape[0]}], got {shape}")
        if not x.is_floating_point():
            raise ConfigError(f"expected a floating tensor, got {x.dtype}")
        return x

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check(x)
        return (x - self.mean.to(x)) / (self.std.to(x) + self.eps)

    __call__ = transform

    def inverse_transform(self, z: torch.Tensor) -> torch.Tensor:
        z = self._check(z)
        return z * (self.std.to(z) + self.eps) + self.mean.to(z)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "splinterp.Standardizer", "mean": self.mean.double().tolist(),
                "std": self.std.double().tolist(), "eps": self.eps, "n": self.n, "layer": self.layer}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "standardizer") -> Standardizer:
        try:
            if d.get("kind") != "splinterp.Standardizer":
                raise ValueError(f"kind is {d.get('kind')!r}")
            mean = torch.tensor(d["mean"], dtype=torch.float64)
            std = torch.tensor(d["std"], dtype=torch.float64)
            eps = float(d["eps"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{where}: not a Standardizer ({e})") from e
        if mean.ndim != 1 or mean.shape != std.shape or not bool(torch.isfinite(mean).all()) \
                or not bool((std >= 0).all()) or not math.isfinite(eps):
            raise CorruptFileError(f"{where}: mean/std must be finite 1-D vectors of one length, std >= 0")
        return cls(mean=mean, std=std, eps=eps, n=int(d.get("n", 0)), layer=d.get("layer"))

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Standardizer:
        return cls.from_dict(read_json(path), str(path))
