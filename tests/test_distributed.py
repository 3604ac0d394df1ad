"""Data-parallel training and harvesting on 2 CPU processes (gloo, loopback): the same result as one
process, to floating-point tolerance.

Process start-up dominates (importing torch twice), so one spawn runs every training scenario and the
tests below check its results against single-process references computed here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from splinterp import SAE, SAEConfig
from splinterp.data import write_cache
from splinterp.data.streaming import CacheBatches
from splinterp.errors import ConfigError, OverwriteError
from splinterp.metrics import MetricAccumulator
from splinterp.parallel import spawn_local, train_distributed
from splinterp.train import DecoderAccumulator, PAMConfig, SGDConfig, SparseCodes, train_pam_sgd, train_sgd

N, D, D_SAE = 120, 5, 12


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g, dtype=torch.float64) @ torch.randn(D, D, generator=g, dtype=torch.float64)
    E = torch.randn(45, D, generator=g, dtype=torch.float64)  # 45 rows: the ranks evaluate 22 and 23
    return X, E


def _sae(arch: str) -> SAE:
    return SAE(SAEConfig(d_in=D, d_sae=D_SAE, architecture=arch, k=3 if arch == "topk" else None, seed=1,
                         dtype="float64"))


def _sgd_cfg(**kw) -> SGDConfig:
    return SGDConfig(**{"epochs": 3, "batch_size": 24, "lr": 1e-2, "l1_coefficient": 0.05, "grad_clip": 0.5,
                        "seed": 4, "progress": False, **kw})


def _pam_cfg(**kw) -> PAMConfig:
    return PAMConfig(**{"epochs": 3, "batch_size": 24, "lr": 1e-2, "mu_enc": 0.1, "alpha": 1e-3, "seed": 2,
                        "progress": False, "decoder_batch_size": 16, **kw})


def _cache_batches(folder, **kw):
    return CacheBatches(folder, 0, 20, seed=6, buffer_tokens=40, dtype=torch.float64, **kw)


def _state(sae: SAE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


# ------------------------------------------------------------------------------------ the 2-rank worker
def _scenarios(rank: int, world: int, folder: str, ckpt: str) -> dict:
    import torch.distributed as dist

    from splinterp.parallel import allreduce_gradients

    X, E = _data()
    out: dict = {}
    sae = _sae("relu")
    out["sgd"] = (train_distributed(sae, X, _sgd_cfg(), eval_data=E).without_times(), _state(sae))
    sae = _sae("topk")
    out["pam"] = (train_distributed(sae, X, _pam_cfg(), eval_data=E).without_times(), _state(sae))
    sae = _sae("topk")
    hist = train_distributed(sae, _cache_batches(folder), _pam_cfg(),
                             eval_data=_cache_batches(folder, split="test", shuffle=False))
    out["pam_cache"] = (hist.without_times(), _state(sae))

    # killed mid-epoch on every rank, then resumed from rank 0's checkpoint
    class Stop(Exception):
        pass

    def killer(ev):
        if ev.kind == "step" and ev.epoch == 1 and ev.batch == 2:
            raise Stop

    try:
        train_distributed(_sae("relu"), X, _sgd_cfg(checkpoint_dir=ckpt, checkpoint_every_steps=1), eval_data=E,
                          callback=killer)
    except Stop:
        pass
    sae = _sae("relu")
    hist = train_distributed(sae, X, _sgd_cfg(checkpoint_dir=ckpt, checkpoint_every_steps=1, resume=True),
                             eval_data=E)
    out["resumed"] = (hist.without_times(), _state(sae))

    # every rank must be given the same settings
    try:
        train_distributed(_sae("relu"), X, _sgd_cfg(lr=1e-2 * (rank + 1)))
    except ConfigError as e:
        out["mismatch"] = str(e)

    # row-weighted gradient mean; a parameter without gradient anywhere keeps none
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    c = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    a.grad = torch.full((3,), 1.0 + 2 * rank, dtype=torch.float64)
    b.grad = torch.ones(2, dtype=torch.float64) if rank == 1 else None
    total = allreduce_gradients([a, b, c], n_rows=1 + 2 * rank, bucket_elems=3)  # two buckets
    out["grads"] = (total, a.grad.clone(), b.grad.clone(), c.grad)
    dist.barrier()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    g = torch.Generator().manual_seed(3)
    acts = torch.randn(400, D, generator=g, dtype=torch.float64)
    write_cache(tmp / "cache", acts, shard_tokens=25)
    res = spawn_local(_scenarios, 2, str(tmp / "cache"), str(tmp / "ckpt"), timeout_s=120)
    assert sorted(res) == [0, 1]
    return res, tmp


def _assert_same(dist_run, ref_hist, ref_sae, tol=1e-9):
    hist, state = dist_run
    for k, v in ref_sae.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=tol, atol=tol, msg=k)
    ref = ref_hist.without_times()
    assert len(hist) == len(ref)
    for h, r in zip(hist, ref):
        assert h.keys() == r.keys()
        for k in r:
            assert h[k] == pytest.approx(r[k], rel=tol, abs=tol), k


def test_ranks_end_bit_identical(runs):
    res, _ = runs
    for name in ("sgd", "pam", "pam_cache", "resumed"):
        s0, s1 = res[0][name][1], res[1][name][1]
        assert all(torch.equal(s0[k], s1[k]) for k in s0), name
        assert res[0][name][0] == res[1][name][0], name  # the same History on every rank


def test_sgd_two_ranks_equal_one_process(runs):
    X, E = _data()
    ref = _sae("relu")
    hist = train_sgd(ref, X, _sgd_cfg(), eval_data=E)
    _assert_same(runs[0][0]["sgd"], hist, ref)
    assert hist.last["train_n_tokens"] == N and hist.last["test_n_tokens"] == 45


def test_pam_two_ranks_equal_one_process(runs):
    X, E = _data()
    ref = _sae("topk")
    hist = train_pam_sgd(ref, X, _pam_cfg(), eval_data=E)
    _assert_same(runs[0][0]["pam"], hist, ref)


def test_pam_on_a_cache_equals_its_single_process_twin(runs):
    """Each rank reads its own shards; one process assembling the same global batches
    (CacheBatches(world_size=2, rank=None)) follows the same trajectory."""
    res, tmp = runs
    ref = _sae("topk")
    twin = _cache_batches(tmp / "cache", rank=None, world_size=2)
    hist = train_pam_sgd(ref, twin, _pam_cfg(), eval_data=_cache_batches(tmp / "cache", split="test",
                                                                           shuffle=False))
    _assert_same(res[0]["pam_cache"], hist, ref)
    assert hist.last["train_n_tokens"] == twin.n_rows()


def test_resume_after_a_kill_on_every_rank(runs):
    X, E = _data()
    ref = _sae("relu")
    hist = train_sgd(ref, X, _sgd_cfg(), eval_data=E)
    _assert_same(runs[0][0]["resumed"], hist, ref)


def test_mismatched_settings_fail_on_every_rank(runs):
    res, _ = runs
    assert "ranks [1]" in res[0]["mismatch"] and "ranks [1]" in res[1]["mismatch"]


def test_weighted_gradient_allreduce(runs):
    res, _ = runs
    for r in (0, 1):
        total, a, b, c = res[r]["grads"]
        assert total == 4
        torch.testing.assert_close(a, torch.full((3,), (1 * 1 + 3 * 3) / 4, dtype=torch.float64))
        torch.testing.assert_close(b, torch.full((2,), 3 / 4, dtype=torch.float64))  # rank 0 had none: zeros
        assert c is None


def test_no_process_group_means_one_process():
    X, _ = _data()
    a, b = _sae("topk"), _sae("topk")
    ha = train_distributed(a, X, _pam_cfg(epochs=1))
    hb = train_pam_sgd(b, X, _pam_cfg(epochs=1))
    assert ha.without_times() == hb.without_times()
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


# ------------------------------------------------------------------------- the pieces that get merged
def test_metric_accumulators_merge_like_one_stream():
    g = torch.Generator().manual_seed(1)
    x, xh = torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g)
    z = torch.relu(torch.randn(50, 7, generator=g))
    one = MetricAccumulator().update(x, xh, z).compute()
    parts = [MetricAccumulator().update(x[s], xh[s], z[s]) for s in (slice(0, 13), slice(13, 13), slice(13, 50))]
    merged = MetricAccumulator()
    for p in parts:
        merged.merge(p)
    for k, v in merged.compute().items():
        assert v == pytest.approx(one[k], rel=1e-12), k


def test_decoder_statistics_add_up():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(60, 4, generator=g, dtype=torch.float64)
    vals = torch.rand(60, 3, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(9, generator=g)[:3] for _ in range(60)])
    whole = DecoderAccumulator(9, 4).update(SparseCodes(vals, idx, 9), X)
    a = DecoderAccumulator(9, 4).update(SparseCodes(vals[:25], idx[:25], 9), X[:25])
    b = DecoderAccumulator(9, 4).update(SparseCodes(vals[25:], idx[25:], 9), X[25:])
    for ta, tb in zip(a.sum_tensors(), b.sum_tensors()):
        ta += tb  # what the all-reduce does
    a.n += b.n
    for u, v in zip(a.solve(alpha=1e-3), whole.solve(alpha=1e-3)):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------ harvesting
TEXTS = ["The assert statement inserts debugging assertions.", "Hello world.",
         "Sparse autoencoders cut activation space into regions.", "A", "Power diagrams weight each site.",
         "Voronoi cells are convex.", "Each region of an SAE is affine."]


def _tiny_model():
    import copy

    from transformers import AutoTokenizer, GPT2Config, GPT2Model

    from splinterp.data.harvest import offline_model_path

    tok = AutoTokenizer.from_pretrained(str(offline_model_path()))
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tok),
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    return GPT2Model(cfg).eval(), copy.deepcopy(tok)


def _harvest_worker(rank: int, world: int, out: str) -> str | None:
    from splinterp.parallel import harvest_distributed

    model = _tiny_model()
    cache = harvest_distributed(model, TEXTS, "all", out, shard_tokens=5, batch_size=2, progress=False)
    assert cache.n_tokens > 0
    try:
        harvest_distributed(model, TEXTS, "all", out, progress=False)
    except OverwriteError as e:
        return str(e)
    return None


def _rows_by_token(cache) -> dict[tuple[int, int], torch.Tensor]:
    x = torch.cat([cache.load(layer) for layer in cache.layers], 1)
    keys = zip(cache.text_ids().tolist(), cache.positions().tolist())
    return {k: x[i] for i, k in enumerate(keys)}


@pytest.mark.slow  # three processes import transformers
def test_harvest_on_two_ranks_equals_one_process(tmp_path):
    from splinterp.data.cache import ActivationCache
    from splinterp.data.harvest import harvest

    msgs = spawn_local(_harvest_worker, 2, str(tmp_path / "dist"), timeout_s=120)
    assert all(m and "exists" in m for m in msgs.values())  # the second call was refused on every rank
    got = ActivationCache.open(tmp_path / "dist", verify=True)
    ref = harvest(_tiny_model(), TEXTS, "all", tmp_path / "one", shard_tokens=5, batch_size=2, progress=False)
    assert got.n_tokens == ref.n_tokens and got.layers == ref.layers and got.d_model == ref.d_model
    assert got.manifest["distributed"]["world_size"] == 2 and got.texts == TEXTS
    assert set(got.token_strings()) == set(ref.token_strings())
    a, b = _rows_by_token(got), _rows_by_token(ref)
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # staging folder removed


# ------------------------------------------------------------------------------------- the torchrun CLI
@pytest.mark.slow
def test_torchrun_cli_trains_like_the_single_process_twin(tmp_path):
    from splinterp import load
    from splinterp.parallel import free_port

    g = torch.Generator().manual_seed(5)
    write_cache(tmp_path / "cache", torch.randn(800, D, generator=g), shard_tokens=50)
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "splinterp", "train",
           "--data", str(tmp_path / "cache"), "--layer", "0", "--out", str(tmp_path / "sae"), "--no-standardize",
           "--method", "pam_sgd", "--d-sae", "16", "--k", "3", "--epochs", "2", "--batch-size", "32",
           "--lr", "0.01", "--seed", "3", "--dtype", "float64", "--no-progress"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = load(tmp_path / "sae")
    ref = SAE(SAEConfig(d_in=D, d_sae=16, architecture="topk", k=3, seed=3, dtype="float64"))
    twin = CacheBatches(tmp_path / "cache", 0, 32, seed=3, dtype=torch.float64, rank=None, world_size=2)
    train_pam_sgd(ref, twin, PAMConfig(epochs=2, batch_size=32, lr=0.01, seed=3, progress=False))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got.state_dict()[k], v, rtol=1e-9, atol=1e-9)
    assert (tmp_path / "sae" / "history.json").is_file()


@pytest.mark.slow
def test_torchrun_cli_with_a_locked_out_is_refused_on_every_rank(tmp_path):
    """Rank 0 alone takes the --out lock; when another run holds it, every rank must stop with the error
    (before, rank 1 went on into training and waited in its first collective forever)."""
    from splinterp.atomic import hold_output
    from splinterp.parallel import free_port

    write_cache(tmp_path / "cache", torch.randn(200, D, generator=torch.Generator().manual_seed(5)),
                shard_tokens=50)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom splinterp.atomic import hold_output\n"
                               "lock = hold_output(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(300)",
                               str(tmp_path / "sae")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "splinterp", "train",
               "--data", str(tmp_path / "cache"), "--layer", "0", "--out", str(tmp_path / "sae"),
               "--d-sae", "16", "--k", "3", "--epochs", "1", "--no-progress"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode != 0
        assert f"pid {holder.pid}" in p.stderr and "rank 0 failed" in p.stderr, p.stderr[-3000:]
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "sae").exists()
    assert hold_output(tmp_path / "sae") is not None  # the dead holder left the lock free
