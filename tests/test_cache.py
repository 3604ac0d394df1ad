"""ActivationCache: manifest validation, checksums, streaming, shuffling, split; Standardizer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from splinterp.data import cache as cache_module
from splinterp.data.cache import ActivationCache, Standardizer, split_uniform
from splinterp.data.harvest import write_cache
from splinterp.errors import ChecksumError, ConfigError, CorruptFileError, DTypeError, EmptyDataError, ShapeError

N, D = 203, 5


@pytest.fixture
def acts():
    g = torch.Generator().manual_seed(0)
    # layer 3 = layer 0 shifted, so rows are recognisable across layers
    x0 = torch.randn(N, D, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0]) + torch.arange(D)
    return {0: x0, 3: x0 + 100.0}


@pytest.fixture
def cache(tmp_path, acts):
    text_ids = torch.arange(N) // 10  # 10 tokens per "text"
    return write_cache(tmp_path / "c", acts, token_ids=torch.arange(N) % 7, text_ids=text_ids, shard_tokens=37,
                       vocab={i: f"tok{i}" for i in range(7)}, texts=[f"text {i}" for i in range(21)])


def test_open_metadata(cache):
    c = ActivationCache.open(cache.folder, verify=True)
    assert c.layers == [0, 3] and c.n_tokens == N and c.d_model == D and c.dtype == torch.float32
    assert [s["n_tokens"] for s in c.shards] == [37] * 5 + [N - 5 * 37]
    assert "n_tokens=203" in repr(c)


def test_missing_or_corrupt_manifest(cache, tmp_path):
    with pytest.raises(CorruptFileError, match="manifest.json is missing"):
        ActivationCache.open(tmp_path / "nowhere")
    path = cache.folder / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:-20])  # truncated
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        ActivationCache.open(cache.folder)
    for key, value, msg in [("n_tokens", N + 1, "shards hold"), ("format", "other", "format"),
                            ("dtype", "int8", "dtype"), ("layers", [], "layers"), ("d_model", 0, "d_model")]:
        bad = dict(good, **{key: value})
        path.write_text(json.dumps(bad))
        with pytest.raises(CorruptFileError, match=msg):
            ActivationCache.open(cache.folder)
    bad = json.loads(json.dumps(good))
    bad["shards"][1]["file"] = "../escape.safetensors"
    path.write_text(json.dumps(bad))
    with pytest.raises(CorruptFileError, match="bad file name"):
        ActivationCache.open(cache.folder)
    path.write_text(json.dumps(good))
    (cache.folder / good["shards"][2]["file"]).unlink()
    with pytest.raises(CorruptFileError, match="shard_00002.safetensors .* is missing"):
        ActivationCache.open(cache.folder)


def test_checksum_names_the_shard(cache):
    shard = cache.folder / cache.shards[4]["file"]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor data: still a valid safetensors file
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="shard_00004.safetensors"):
        ActivationCache.open(cache.folder, verify=True)  # every shard, now


def test_truncated_shard_is_corrupt(cache):
    shard = cache.folder / cache.shards[1]["file"]
    shard.write_bytes(shard.read_bytes()[:100])
    c = ActivationCache.open(cache.folder)
    with pytest.raises(CorruptFileError, match="shard_00001"):
        c.load(0)


def test_iter_batches_in_order(cache, acts):
    batches = list(cache.iter_batches(0, batch_size=50))
    assert [b.shape[0] for b in batches] == [50, 50, 50, 50, 3]  # full batches across shard borders
    assert torch.equal(torch.cat(batches), acts[0])
    assert [b.shape[0] for b in cache.iter_batches(0, batch_size=50, drop_last=True)] == [50] * 4
    assert torch.equal(cache.load(3), acts[3])
    both = torch.cat(list(cache.iter_batches([0, 3], batch_size=64)))
    assert both.shape == (N, 2, D) and torch.equal(both[:, 1], acts[3])
    with pytest.raises(ConfigError, match="not in this cache"):
        cache.load(1)
    half = cache.load(0, dtype=torch.float64)
    assert half.dtype == torch.float64


def test_shuffle_is_a_seeded_permutation(cache, acts):
    def run(seed, **kw):
        out = list(cache.iter_batches(0, batch_size=16, shuffle=True, seed=seed, return_index=True, **kw))
        return torch.cat([b for b, _ in out]), torch.cat([i for _, i in out])

    x, idx = run(0)
    assert torch.equal(idx.sort().values, torch.arange(N))  # each token exactly once
    assert torch.equal(x, acts[0][idx])  # index and rows stay aligned
    assert not torch.equal(idx, torch.arange(N))
    assert torch.equal(run(0)[1], idx) and not torch.equal(run(1)[1], idx)
    # a buffer as large as the cache mixes tokens from far apart: early batches are not from the first shards
    _, full = run(0, buffer_tokens=N)
    assert full[:37].float().mean() > 37
    assert torch.equal(full.sort().values, torch.arange(N))


def test_split_is_deterministic_disjoint_and_shard_independent(cache, tmp_path, acts):
    tr, te = cache.token_index("train"), cache.token_index("test")
    assert len(set(tr.tolist()) & set(te.tolist())) == 0 and len(tr) + len(te) == N
    assert cache.split_size("test") == len(te) and cache.split_size("train") == len(tr)
    assert 5 <= len(te) <= 40  # test_frac 0.1 of 203, up to sampling noise
    other = write_cache(tmp_path / "other", acts, shard_tokens=64)  # different sharding: same split
    assert torch.equal(other.token_index("test"), te)
    assert torch.equal(cache.load(0, "test"), acts[0][te])
    x, i = zip(*cache.iter_batches(0, 1000, split="train", return_index=True))
    assert torch.equal(i[0], tr) and torch.equal(x[0], acts[0][tr])
    half = cache.token_index("test", test_frac=0.5)
    assert 70 < len(half) < 130 and set(te.tolist()) <= set(half.tolist())  # nested as test_frac grows
    with pytest.raises(ConfigError):
        cache.split_size("valid")
    with pytest.raises(ConfigError):
        cache.split_size("test", test_frac=1.5)


def test_split_by_text_keeps_texts_whole(cache):
    c = ActivationCache.open(cache.folder, split_unit="text", test_frac=0.3, split_seed=1)
    te = set(c.text_ids("test").tolist())
    tr = set(c.text_ids("train").tolist())
    assert te and tr and not te & tr
    assert c.split_size("test") == 10 * len(te) - (10 - N % 10 if 20 in te else 0)


def test_split_uniform_is_uniform():
    u = split_uniform(np.arange(100_000), seed=3)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs((u < 0.1).mean() - 0.1) < 0.01
    assert not np.array_equal(u, split_uniform(np.arange(100_000), seed=4))


def test_token_metadata(cache):
    assert cache.token_strings(index=[0, 8, 202]) == ["tok0", "tok1", "tok6"]
    assert cache.token_strings("test") == [f"tok{i % 7}" for i in cache.token_index("test").tolist()]
    assert torch.equal(cache.text_ids(), torch.arange(N) // 10)
    assert cache.texts[20] == "text 20"


def test_empty_split_load(tmp_path):
    c = write_cache(tmp_path / "one", torch.ones(1, 3))
    assert c.split_size("test") in (0, 1)
    split = "train" if c.split_size("test") == 1 else "test"
    with pytest.raises(EmptyDataError):
        c.load(0, split)


# ------------------------------------------------------------------------------- Standardizer
def test_standardizer_fits_train_split_only(cache, acts):
    s = Standardizer.fit(cache, layer=0, batch_size=16)  # many small batches: the streamed merge
    train = acts[0][cache.token_index("train")].double()
    torch.testing.assert_close(s.mean, train.mean(0))
    torch.testing.assert_close(s.std, train.std(0, unbiased=False))
    assert s.n == train.shape[0] and s.layer == 0
    z = s.transform(acts[0][cache.token_index("train")])
    torch.testing.assert_close(z.mean(0), torch.zeros(D), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(D), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.inverse_transform(z), acts[0][cache.token_index("train")], atol=1e-5, rtol=1e-5)
    # changing test rows does not move the fit
    moved = {k: v.clone() for k, v in acts.items()}
    moved[0][cache.token_index("test")] += 1000.0
    c2 = write_cache(cache.folder.parent / "moved", moved, shard_tokens=37)
    torch.testing.assert_close(Standardizer.fit(c2, layer=0).mean, s.mean)


def test_standardizer_tensor_iterable_and_errors():
    x = torch.randn(100, 4, dtype=torch.float64) * 3 + 1
    a = Standardizer.fit(x)
    b = Standardizer.fit(iter(x.split(7)))
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.std, b.std)
    with pytest.raises(EmptyDataError):
        Standardizer.fit([])
    with pytest.raises(ShapeError):
        Standardizer.fit([torch.randn(3, 4), torch.randn(3, 5)])
    with pytest.raises(ConfigError, match="layer"):
        Standardizer.fit(ActivationCache("x", {}), layer=None)
    with pytest.raises(ShapeError):
        a.transform(torch.randn(2, 5))


def test_standardizer_save_load(tmp_path):
    s = Standardizer.fit(torch.randn(50, 3) * 2)
    s.save(tmp_path / "std.json")
    r = Standardizer.load(tmp_path / "std.json")
    assert torch.equal(r.mean, s.mean) and torch.equal(r.std, s.std) and r.eps == s.eps and r.n == 50
    (tmp_path / "bad.json").write_text('{"kind": "splinterp.Standardizer", "mean": [1, 2], "std": [1]}')
    with pytest.raises(CorruptFileError):
        Standardizer.load(tmp_path / "bad.json")
    (tmp_path / "bad2.json").write_text("{not json")
    with pytest.raises(CorruptFileError):
        Standardizer.load(tmp_path / "bad2.json")


# ------------------------------------------------------------------------------- silent wrong answers refused
def test_values_beyond_float16_are_refused_naming_the_largest(tmp_path):
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0)) * 1e5  # the reproducer: 1,229 infs
    worst = np.abs(x.numpy().astype(np.float64)).max()
    r, c = np.unravel_index(np.abs(x.numpy()).argmax(), x.shape)
    with pytest.raises(ConfigError, match=r"acts\[0\] holds .*beyond the largest float16 \(65504\)") as e:
        write_cache(tmp_path / "c", x, dtype="float16")
    assert f"{x[r, c].item():.6g}" in str(e.value) and f"row {r}, column {c}" in str(e.value)
    assert abs(float(str(e.value).split(" holds ")[1].split()[0])) == pytest.approx(worst, rel=1e-5)
    assert not (tmp_path / "c").exists()
    # at the edge, numpy's float16 rounding is the reference: refused exactly when the stored value is inf
    for v in [65504.0, 65519.0, 65520.0, -65520.0, 1e6]:
        with np.errstate(over="ignore"):
            inf = bool(np.isinf(np.float16(v)))
        x = torch.zeros(4, 2)
        x[2, 1] = v
        if inf:
            with pytest.raises(ConfigError, match=re.escape(f"holds {v:.6g} (row 2, column 1)")):
                write_cache(tmp_path / "edge", x, dtype="float16", overwrite=True)
        else:
            c = write_cache(tmp_path / "edge", x, dtype="float16", overwrite=True)
            assert c.load(0)[2, 1].item() == float(np.float16(v))
    c = write_cache(tmp_path / "f32", torch.full((3, 2), 1e30), dtype="float32")  # fits: stored as is
    assert torch.equal(c.load(0), torch.full((3, 2), 1e30))


def test_a_tampered_shard_is_refused_on_first_read_by_default(cache, acts):
    shard = cache.folder / cache.shards[2]["file"]
    data = bytearray(shard.read_bytes())
    n = int.from_bytes(data[:8], "little")  # safetensors: header length, JSON header, then the tensors' bytes
    start = 8 + n + json.loads(data[8:8 + n])["layer_0"]["data_offsets"][0]
    data[start + 3] ^= 0x40  # a valid safetensors file with one changed value of layer 0
    shard.write_bytes(bytes(data))
    c = ActivationCache.open(cache.folder)  # the default
    assert torch.equal(next(iter(c.iter_batches(0, 37))), acts[0][:37])  # shards before it are fine
    for read in (lambda: c.load(0), lambda: list(c.iter_batches(3, 50, shuffle=True)), lambda: c.token_ids()):
        with pytest.raises(ChecksumError, match=f"shard_00002.safetensors in {cache.folder}"):
            read()
    unchecked = ActivationCache.open(cache.folder, verify=False).load(0)  # what would have been read silently
    assert not torch.equal(unchecked, acts[0])
    with pytest.raises(ConfigError, match="verify"):
        ActivationCache.open(cache.folder, verify="yes")


def test_each_shard_is_hashed_once_however_often_it_is_read(cache, acts, monkeypatch):
    """Verification costs one hash per shard file per process: no second pass for later epochs or views."""
    hashed = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    monkeypatch.setattr(cache_module, "_verified", {})
    c = ActivationCache.open(cache.folder)
    for _ in range(3):  # epochs
        assert torch.equal(torch.cat(list(c.iter_batches(0, 50))), acts[0])
    view = ActivationCache(c.folder, c.manifest)  # what the streaming readers build per epoch
    assert torch.equal(view.load(3), acts[3])
    assert sorted(hashed) == sorted(s["file"] for s in c.shards)
    # a file changed after it was checked is checked again (its ctime moved), and caught
    shard = cache.folder / cache.shards[0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="shard_00000"):
        c.load(0)


def test_texts_must_be_strings_one_per_row_or_per_sequence(tmp_path):
    x = torch.randn(300, 4)
    with pytest.raises(DTypeError, match=r"texts must be strings, but texts\[0\] is int"):
        write_cache(tmp_path / "c", x, texts=[1, 2, 3])  # the reproducer
    with pytest.raises(DTypeError, match="texts must be a list of strings, got str"):
        write_cache(tmp_path / "c", x, texts="one long text")
    with pytest.raises(DTypeError, match=r"texts\[299\] is NoneType"):
        write_cache(tmp_path / "c", x, texts=[f"t{i}" for i in range(299)] + [None])
    with pytest.raises(ShapeError, match="texts has 3 entries for 300 rows"):
        write_cache(tmp_path / "c", x, texts=["a", "b", "c"])
    with pytest.raises(ShapeError, match="text_ids run from 0 to 29"):
        write_cache(tmp_path / "c", x, text_ids=torch.arange(300) // 10, texts=["a", "b", "c"])
    with pytest.raises(DTypeError, match="vocab must map int token ids to strings"):
        write_cache(tmp_path / "c", x, vocab={1: 2})
    assert not (tmp_path / "c").exists()
    per_row = write_cache(tmp_path / "row", x, texts=[f"t{i}" for i in range(300)])
    assert per_row.texts[299] == "t299"
    per_seq = write_cache(tmp_path / "seq", x, text_ids=torch.arange(300) // 10, texts=[f"s{i}" for i in range(30)])
    assert [per_seq.texts[i] for i in per_seq.text_ids()[[0, 299]].tolist()] == ["s0", "s29"]


@pytest.mark.parametrize("name", ["manifest.json", "texts.json", "vocab.json", "std.json"])
def test_deeply_nested_json_is_a_corrupt_file_not_a_recursion_error(cache, name):
    path = cache.folder / name
    path.write_text("[" * 100_000)
    with pytest.raises(CorruptFileError, match=f"{name} is not valid JSON: nested too deeply"):
        if name == "manifest.json":
            ActivationCache.open(cache.folder)
        elif name == "texts.json":
            _ = ActivationCache.open(cache.folder).texts
        elif name == "vocab.json":
            ActivationCache.open(cache.folder).token_strings()
        else:
            Standardizer.load(path)


def test_hostile_texts_and_vocab_files_are_corrupt(cache):
    (cache.folder / "texts.json").write_text('[1, 2]')
    with pytest.raises(CorruptFileError, match="texts.json is not a list of strings"):
        _ = ActivationCache.open(cache.folder).texts
    (cache.folder / "vocab.json").write_text('{"0": [1]}')
    with pytest.raises(CorruptFileError, match="vocab.json is not an object of token strings"):
        ActivationCache.open(cache.folder).token_strings()


@pytest.mark.parametrize("kw, field", [({"layer": 1.5}, "layer"), ({"layer": "0"}, "layer"), ({"layer": True}, "layer"),
                                       ({"batch_size": 2.5}, "batch_size"), ({"buffer_tokens": "x"}, "buffer_tokens"),
                                       ({"buffer_tokens": 0}, "buffer_tokens"), ({"seed": "x"}, "seed"),
                                       ({"dtype": "float32"}, "dtype"), ({"dtype": torch.int64}, "dtype"),
                                       ({"device": "tpu"}, "device"), ({"device": "cuda:99"}, "device")])
def test_reader_arguments_of_the_wrong_kind_are_named(cache, kw, field):
    """These used to end in TypeError / ValueError / torch RuntimeError from deep inside the reader."""
    with pytest.raises(ConfigError, match=field):
        list(cache.iter_batches(**{"layer": 0, "batch_size": 8, **kw}))


def test_load_and_standardizer_arguments_are_named(cache):
    with pytest.raises(ConfigError, match="max_bytes"):
        cache.load(0, max_bytes="4GB")
    with pytest.raises(ConfigError, match="dtype"):
        cache.load(0, dtype="float64")
    with pytest.raises(ConfigError, match="eps"):
        Standardizer.fit(torch.randn(5, 3), eps="small")
    with pytest.raises(ConfigError, match="eps"):
        Standardizer.fit(torch.randn(5, 3), eps=-1.0)
    assert torch.equal(cache.load([0]), cache.load(np.int64(0)))  # numpy ints are layer numbers too


def test_a_bad_test_frac_is_named_even_without_a_split(cache):
    with pytest.raises(ConfigError, match="test_frac"):
        list(cache.iter_batches(0, 8, test_frac=2))


def test_arrays_where_strings_belong_are_named(cache):
    """`split=np.zeros(2)` ended in numpy's 'truth value of an array is ambiguous' ValueError."""
    with pytest.raises(ConfigError, match="split must be"):
        list(cache.iter_batches(0, 8, split=np.zeros(2)))
    with pytest.raises(ConfigError, match="split_unit must be"):
        ActivationCache.open(cache.folder, split_unit=np.zeros(2))
    with pytest.raises(ConfigError, match="verify must be"):
        ActivationCache.open(cache.folder, verify=np.zeros(2))
    manifest = json.loads((cache.folder / "manifest.json").read_text())
    (cache.folder / "manifest.json").write_text(json.dumps({**manifest, "dtype": ["float32"]}))
    with pytest.raises(CorruptFileError, match="dtype must be one of"):
        ActivationCache.open(cache.folder)
