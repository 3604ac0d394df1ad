"""Streaming training from an activation cache: CacheBatches (order, determinism, splits, rank views,
memory sizing) and the trainers' code paths on a stream (no full load, exact equality with tensor data,
resume)."""

from __future__ import annotations

import pytest
import torch

from splinterp import SAE, SAEConfig
from splinterp.data import write_cache
from splinterp.data.cache import ActivationCache, Standardizer
from splinterp.data.streaming import CacheBatches, TensorBatches
from splinterp.errors import ConfigError, EmptyDataError
from splinterp.train import PAMConfig, SGDConfig, train_pam_sgd, train_sgd

N, D = 600, 6


@pytest.fixture(scope="module")
def acts():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    X[:, 0] = torch.arange(N, dtype=torch.float64)  # column 0 = row id, to follow rows through the stream
    return X


@pytest.fixture(scope="module")
def cache(acts, tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("c") / "cache", acts, shard_tokens=50, dtype="float32")


def ids(batches) -> list[int]:
    return [int(v) for b in batches for v in b[:, 0].tolist()]


def test_every_split_row_once_per_epoch_seeded_per_epoch(cache):
    train = set(ids(cache.iter_batches(0, 1000, split="train")))
    cb = CacheBatches(cache, 0, 32, seed=3, buffer_tokens=64)
    e0 = ids(cb)
    assert sorted(e0) == sorted(train) and len(e0) == len(train)
    assert ids(cb) == e0  # same epoch, same order
    cb.set_epoch(1)
    e1 = ids(cb)
    assert sorted(e1) == sorted(e0) and e1 != e0  # re-shuffled per epoch
    cb.set_epoch(0)
    assert ids(cb) == e0
    assert ids(CacheBatches(cache, 0, 32, seed=4, buffer_tokens=64)) != e0
    assert ids(cb.sequential(100)) == sorted(train)  # sequential: cache order, every row once
    assert cb.n_rows() == len(train) == cache.split_size("train")


def test_batches_dtype_transform_and_no_shuffle(cache, acts):
    cb = CacheBatches(cache, 0, 64, shuffle=False, split=None, dtype=torch.float64)
    batches = list(cb)
    assert [b.shape[0] for b in batches] == [64] * 9 + [24] and batches[0].dtype == torch.float64
    torch.testing.assert_close(torch.cat(batches), acts.float().double())
    std = Standardizer.fit(cache, 0, split=None)
    cbs = CacheBatches(cache, 0, 64, shuffle=False, split=None, dtype=torch.float64, transform=std)
    torch.testing.assert_close(torch.cat(list(cbs)), std(acts.float().double()))
    assert len(list(CacheBatches(cache, 0, 64, split=None, drop_last=True))) == 9


def test_bad_arguments(cache, tmp_path):
    with pytest.raises(ConfigError, match="layer"):
        CacheBatches(cache, 5)
    with pytest.raises(ConfigError, match="batch_size"):
        CacheBatches(cache, 0, 0)
    with pytest.raises(ConfigError, match="divisible"):
        CacheBatches(cache, 0, 33, rank=0, world_size=2)
    with pytest.raises(ConfigError, match="rank"):
        CacheBatches(cache, 0, 32, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="not both"):
        CacheBatches(cache, 0, 32, buffer_tokens=100, memory_limit_bytes=1 << 20)
    with pytest.raises(ConfigError, match="too small"):
        CacheBatches(cache, 0, 32, memory_limit_bytes=1000)
    with pytest.raises(ConfigError, match="split"):
        CacheBatches(cache, 0, 32, split="val")
    with pytest.raises(Exception, match="manifest"):
        CacheBatches(tmp_path / "nothing", 0)


def test_memory_limit_sizes_the_buffer(cache):
    row = D * 4
    cb = CacheBatches(cache, 0, 16, memory_limit_bytes=60 * 50 * row)
    assert cb.buffer_tokens >= 16 and cb.peak_bytes() <= 60 * 50 * row
    bigger = CacheBatches(cache, 0, 16, memory_limit_bytes=200 * 50 * row)
    assert bigger.buffer_tokens > cb.buffer_tokens
    assert sorted(ids(cb)) == sorted(ids(bigger))


def test_rank_views_partition_the_data_and_take_equal_steps(cache):
    full = CacheBatches(cache, 0, 32, seed=1, buffer_tokens=64)
    views = [full.shard(r, 2) for r in range(2)]
    merged = full.view(rank=None, world_size=2)
    for epoch in (0, 1):
        for v in (*views, merged):
            v.set_epoch(epoch)
        per_rank = [list(v) for v in views]
        assert len(per_rank[0]) == len(per_rank[1]) == views[0].steps(epoch) > 0
        assert all(b.shape[0] == 16 for bs in per_rank for b in bs)
        a, b = ids(per_rank[0]), ids(per_rank[1])
        assert not set(a) & set(b)  # each rank reads its own shards
        shards = views[0].assignment(epoch)
        owner = {i: r for r, s in enumerate(shards) for i in s}
        assert {owner[i // 50] for i in a} == {0} and {owner[i // 50] for i in b} == {1}
        glob = list(merged)
        assert len(glob) == len(per_rank[0])
        for g, p0, p1 in zip(glob, *per_rank):
            torch.testing.assert_close(g, torch.cat([p0, p1]))
    assert views[0].assignment(0) != views[0].assignment(1)  # shards re-dealt every epoch
    seq = [ids(v.sequential(40)) for v in views]
    assert not set(seq[0]) & set(seq[1]) and sorted(seq[0] + seq[1]) == ids(full.sequential())
    with pytest.raises(EmptyDataError, match="shards"):
        CacheBatches(cache, 0, 800, rank=0, world_size=2).steps(0)


def test_tensor_batches_split_the_single_process_batches(acts):
    g = torch.Generator().manual_seed(7)
    single = [acts[p] for p in torch.randperm(N, generator=g).split(50)]
    parts = [TensorBatches(acts, 50, seed=7, rank=r, world_size=3) for r in range(3)]
    for e in (0, 1):
        if e == 1:
            single = [acts[p] for p in torch.randperm(N, generator=g).split(50)]
        for p in parts:
            p.set_epoch(e)
        for s, *pieces in zip(single, *parts):
            torch.testing.assert_close(s, torch.cat(pieces))
    seq = torch.cat([torch.cat(list(p.sequential(64))) for p in parts])
    torch.testing.assert_close(seq, acts)


def _sae(arch="topk", seed=0):
    return SAE(SAEConfig(d_in=D, d_sae=16, architecture=arch, k=3 if arch == "topk" else None, seed=seed,
                         dtype="float64"))


@pytest.mark.parametrize("method", ["sgd", "pam_sgd"])
def test_training_on_the_stream_equals_training_on_the_tensor(cache, acts, method):
    """Unshuffled stream vs the same rows as a tensor: identical batches, so identical bits (SGD steps,
    evaluation, PAM decoder statistics all read the stream)."""
    X = acts.float().double()
    Cfg, train = (PAMConfig, train_pam_sgd) if method == "pam_sgd" else (SGDConfig, train_sgd)
    cfg = Cfg(epochs=2, batch_size=40, lr=1e-2, shuffle=False, progress=False, eval_batch_size=64,
              **({"decoder_batch_size": 64} if method == "pam_sgd" else {}))
    a, b = _sae(), _sae()
    ha = train(a, X, cfg, eval_data=X[:100])
    stream = CacheBatches(cache, 0, 40, shuffle=False, split=None, dtype=torch.float64)
    hb = train(b, stream, cfg, eval_data=CacheBatches(cache, 0, 100, shuffle=False, split=None,
                                                      dtype=torch.float64))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=0, atol=1e-12)
    ra, rb = ha.without_times(), hb.without_times()
    assert ra[-1]["train_n_tokens"] == N
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            if k.startswith("test_"):
                continue  # eval_data differ (first 100 rows vs one pass of 100-row batches)
            assert x[k] == pytest.approx(y[k], rel=1e-10, abs=1e-12), k


def test_trainers_never_load_the_cache(cache, monkeypatch):
    """Evaluation, dead-latent counts and the PAM decoder statistics all stream: no full load, and no
    batch bigger than the largest configured batch ever leaves the reader."""
    def refuse(*a, **k):
        raise AssertionError("the trainer loaded the whole cache")

    monkeypatch.setattr(ActivationCache, "load", refuse)
    seen = []
    orig = ActivationCache.iter_batches

    def spy(self, *a, **k):
        for x in orig(self, *a, **k):
            seen.append(x.shape[0])
            yield x

    monkeypatch.setattr(ActivationCache, "iter_batches", spy)
    stream = CacheBatches(cache, 0, 32, seed=0, dtype=torch.float64, buffer_tokens=64)
    sae = _sae()
    hist = train_pam_sgd(sae, stream, PAMConfig(epochs=1, batch_size=32, decoder_batch_size=48,
                                                 eval_batch_size=56, progress=False))
    assert max(seen) <= 56 and len(seen) > 3 * (cache.split_size("train") // 56)
    assert hist.last["train_n_tokens"] == cache.split_size("train")
    monkeypatch.undo()
    # the streamed evaluation counts the same dead latents as one pass over the loaded split
    fired = (sae.encode(cache.load(0, split="train").double()) != 0).any(0)
    assert hist.last["train_dead_features"] == int((~fired).sum())


def test_stream_resume_mid_epoch_is_bit_identical(cache, tmp_path):
    """The stream's order is a function of (seed, epoch): a run killed mid-epoch and resumed ends with the
    same bits as one that never stopped."""
    def cfg(**kw):
        return SGDConfig(epochs=2, lr=1e-2, progress=False, checkpoint_dir=str(tmp_path / "ck"),
                         checkpoint_every_steps=3, **kw)

    def stream():
        return CacheBatches(cache, 0, 32, seed=5, buffer_tokens=100, dtype=torch.float64)

    ref = _sae()
    h_ref = train_sgd(ref, stream(), SGDConfig(epochs=2, lr=1e-2, progress=False))

    class Stop(Exception):
        pass

    def killer(ev):
        if ev.kind == "step" and ev.epoch == 1 and ev.batch == 4:
            raise Stop

    with pytest.raises(Stop):
        train_sgd(_sae(), stream(), cfg(), callback=killer)
    resumed = _sae(seed=99)
    h = train_sgd(resumed, stream(), cfg(resume=True))
    for k, v in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert h.without_times()[-1]["train_mse"] == h_ref.without_times()[-1]["train_mse"]


def test_view_rebuilds_the_stream_for_the_new_split(cache, acts):
    """`view` goes through the constructor: the test view counts the test split's rows (not the train split's
    cached counts), sees exactly the rows the cache assigns to the test split, and unknown settings are refused."""
    train = CacheBatches(cache, 0, 32, seed=3, buffer_tokens=64)
    assert train.n_rows() == cache.split_size("train")  # fills the per-shard counts of the train split
    test = train.view(split="test", shuffle=False)
    assert test.n_rows() == cache.split_size("test") != train.n_rows()
    assert ids(test) == sorted(int(v) for v in cache.load(0, split="test")[:, 0].tolist())
    assert train.split == "train" and train.shuffle  # the original is unchanged
    with pytest.raises(ConfigError, match="unknown settings"):
        train.view(splt="test")
    with pytest.raises(ConfigError):
        train.view(batch_size=0)


def test_fit_standardizer_equals_fitting_the_loaded_rows(cache):
    """The streamed fit (float64, one shard at a time) equals `Standardizer.fit` on the loaded split, which in
    turn equals numpy's float64 mean and population std."""
    import numpy as np

    stream = CacheBatches(cache, 0, 32, seed=3, buffer_tokens=64)
    got = stream.fit_standardizer()
    X = cache.load(0, split="train").double().numpy()
    np.testing.assert_allclose(got.mean.numpy(), X.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.std.numpy(), X.std(0), rtol=1e-12)
    assert got.n == X.shape[0]
    merged = Standardizer.merge([stream.shard(0, 2).fit_standardizer(), stream.shard(1, 2).fit_standardizer()])
    np.testing.assert_allclose(merged.std.numpy(), X.std(0), rtol=1e-12)
