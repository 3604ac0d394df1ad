"""E1 (toy), E2 (SGD vs PAM-SGD on MNIST) and the capacity comparison: tiny configs run end to end, write the
files and JSON keys they promise, and give sane numbers.

MNIST is read once per module (a few hundred real digits) and served to the experiments through a patched
`splinterp.data.load_mnist`, so the tests stay fast; the real loaders have their own tests.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import splinterp as sp
import splinterp.data as spdata
from splinterp.errors import ConfigError, DatasetNotFoundError
from splinterp.experiments import capacity as cap
from splinterp.experiments import e1_toy as e1
from splinterp.experiments import e2_mnist as e2
from splinterp.experiments.registry import JobSkipped, RunSettings, get, load_all


@pytest.fixture(scope="module")
def digits():
    X, y = spdata.load_mnist("all", n=700, seed=0)
    return X[:500], X[500:]


@pytest.fixture
def tiny_mnist(monkeypatch, digits):
    X_tr, X_te = digits

    def fake_load_mnist(split="train", n=None, **kw):
        X = X_tr if split == "train" else X_te
        X = X if n is None else X[:n]
        return X, torch.zeros(X.shape[0], dtype=torch.long)

    monkeypatch.setattr(spdata, "load_mnist", fake_load_mnist)
    return digits


# ------------------------------------------------------------------------------------------------ E1
def tiny_e1(**kw) -> e1.E1Config:
    base = dict(n_train=60, n_test=200, sae_sizes=((1, 3),), steps=150, steps_per_record=50, lr=3e-2, n_restarts=1,
                kmeans_n_init=2, resolution=40)
    base.update(kw)
    return e1.E1Config(**base)


def _pick(res, seed, k, model):
    (r,) = [r for r in res["runs"] if r["seed"] == seed and r["k"] == k and r["model"] == model]
    return r


def test_e1_runs_and_writes_what_it_promises(tmp_path):
    res = e1.run_e1(tiny_e1(), tmp_path, seeds=(0, 1))
    assert (tmp_path / "e1_toy_k1.png").stat().st_size > 0
    on_disk = json.loads((tmp_path / "e1_toy.json").read_text())
    assert on_disk["runs"] == res["runs"] and on_disk["seeds"] == [0, 1]
    for s in (0, 1):
        sae, km, lp = (_pick(res, s, 1, m) for m in ("sae", "kmeans", "local_pca_rank1"))
        for r in (sae, km, lp):
            assert {"train_mse", "test_mse", "n_parameters"} <= set(r)
        m = sae["n_regions"]
        assert 1 <= m <= 60 and km["n_regions"] == m == lp["n_regions"]
        assert sae["n_parameters"] == 5 * 3 + 2  # W_enc, b_enc, W_dec (3 x 2 each), b_dec
        # local PCA starts from the same k-means fit and can only lower the error
        assert lp["train_mse"] <= km["train_mse"] + 1e-9
        # a real TopK SAE trained with Adam beats the trivial "reconstruct the mean" map
        X, _ = spdata.make_three_clusters(60, seed=0)
        assert sae["train_mse"] < float(((X - X.mean(0)) ** 2).mean())
        assert sae["train_loss_curve"][-1] <= sae["train_loss_curve"][0]
    pk = next(r for r in res["runs"] if r.get("setting") == "paper" and r["model"] == "kmeans")
    pl = next(r for r in res["runs"] if r.get("setting") == "paper" and r["model"] == "local_pca_rank1")
    assert pl["train_mse"] <= pk["train_mse"] + 1e-9
    # seeds vary the SAE's initialisation, not the data
    assert _pick(res, 0, 1, "sae")["train_mse"] != _pick(res, 1, 1, "sae")["train_mse"]
    # claims: paired differences and the stated rule
    (row,) = res["claims"]
    diffs = [_pick(res, s, 1, "kmeans")["train_mse"] - _pick(res, s, 1, "sae")["train_mse"] for s in (0, 1)]
    assert row["kmeans_minus_sae"]["values"] == pytest.approx(diffs)
    va, vb = row["kmeans_minus_sae"]["verdict"], row["sae_minus_local_pca"]["verdict"]
    assert row["verdict"] == ("holds" if va == vb == "holds" else "does not hold"
                              if "does not hold" in (va, vb) else "inconclusive")
    t = e1.e1_tables(tmp_path)
    assert set(t) == {"models", "claims"} and "(2 seeds)" in t["models"] and row["verdict"] in t["claims"]


def test_e1_is_seeded():
    a = e1.run_e1(tiny_e1(seed=3))
    b = e1.run_e1(tiny_e1(seed=3))
    for m in ("sae", "kmeans"):
        assert _pick(a, 3, 1, m)["train_mse"] == _pick(b, 3, 1, m)["train_mse"]


def test_e1_k3_reports_matched_rank_local_pca():
    res = e1.run_e1(tiny_e1(sae_sizes=((3, 4),)))
    r = _pick(res, 0, 3, "local_pca_rank2")
    assert r["rank"] == 2 and r["train_mse"] < 1e-8  # rank-2 pieces in 2-D are exact
    assert {row["rank"] for row in res["claims"]} == {1, 2}  # the paper's rank 1 and the fair rank 2


@pytest.mark.parametrize("bad", [dict(sae_sizes=((4, 3),)), dict(n_train=2), dict(lr=0.0), dict(sae_sizes=())])
def test_e1_config_errors(bad):
    with pytest.raises(ConfigError):
        tiny_e1(**bad)


# ------------------------------------------------------------------------------------------------ E2
def tiny_e2(**kw) -> e2.E2Config:
    base = dict(architectures=("topk",), d_sae=16, k=4, epochs=3, fractions=(0.2, 1.0),
                fraction_architectures=("topk",), equal_steps_architectures=("topk",), equal_steps_fractions=(0.2, 1.0),
                fraction_max_epochs=3, fraction_min_epochs=2, ablation_architectures=("topk",), ablation_epochs=1,
                sgd_updates=(1, 2), weight_decays=(0.0, 1e-3), mu_nus=(0.0, 2.0))
    base.update(kw)
    return e2.E2Config(**base)


def test_e2_runs_and_writes_what_it_promises(tmp_path, tiny_mnist):
    cfg = tiny_e2()
    parts = ("base", "fractions", "ablations")
    e2.run_e2(cfg, tmp_path, parts, seeds=(0, 1))
    for name in e2.output_names(cfg, parts):
        assert (tmp_path / name).stat().st_size > 0, name
    main = json.loads((tmp_path / "e2_mnist.json").read_text())
    assert {"config", "data", "runs", "cells", "claims", "summary"} <= set(main)
    assert main["data"]["n_train"] == 500 and main["fair"] is True and main["seeds"] == [0, 1]
    runs = main["runs"]
    base = {(r["method"], r["seed"]): r for r in runs if r["part"] == "base"}
    assert set(base) == {(m, s) for m in ("sgd", "pam_sgd", "pam_sgd_authors") for s in (0, 1)}
    for r in base.values():
        assert not r["tied"] and r["epochs"] == 3 and len(r["curves"]["test_mse"]) == 3
        assert all(math.isfinite(r[f"{s}_mse"]) for s in ("train", "test"))
    # seeds vary the initialisation: different final numbers
    assert base[("sgd", 0)]["test_mse"] != base[("sgd", 1)]["test_mse"]
    # PAM-SGD decreases the training mse
    for s in (0, 1):
        assert base[("pam_sgd", s)]["curves"]["train_mse"][-1] < base[("pam_sgd", s)]["curves"]["train_mse"][0]
    # the cells hold mean and Student-t CI of the per-seed values (t(0.975, 1) = 12.706, by hand)
    (c,) = [c for c in main["cells"] if c["part"] == "base" and c["method"] == "sgd"]
    a, b = base[("sgd", 0)]["test_mse"], base[("sgd", 1)]["test_mse"]
    assert c["test_mse"]["values"] == [a, b] and c["test_mse"]["mean"] == pytest.approx((a + b) / 2)
    assert c["test_mse"]["half_width"] == pytest.approx(12.7062 * abs(a - b) / 2, rel=1e-4)
    fr = [r for r in runs if r["part"] == "fractions"]
    assert sorted({r["n_train"] for r in fr if r["method"] == "sgd" and r["policy"] == "paper"}) == [100, 500]
    # the full-data run is the base run, reused; equal_steps gives every fraction the same optimiser steps
    full = next(r for r in fr if r["policy"] == "paper" and r["fraction"] == 1.0 and r["method"] == "sgd"
                and r["seed"] == 0)
    assert full["test_mse"] == base[("sgd", 0)]["test_mse"]
    eq = sorted((r for r in fr if r["policy"] == "equal_steps" and r["method"] == "sgd" and r["seed"] == 0),
                key=lambda r: r["fraction"])
    assert eq[0]["steps"] >= eq[1]["steps"] == base[("sgd", 0)]["steps"]
    # the training subsets vary with the seed (the experiment is about subsets), the split does not
    assert not torch.equal(e2.fraction_subset(500, 0.2, 0), e2.fraction_subset(500, 0.2, 1))
    ab = json.loads((tmp_path / "e2_mnist_ablations.json").read_text())
    abr = [r for r in ab["runs"] if r["seed"] == 0]
    upd = sorted((r for r in abr if r["kind"] == "sgd_updates"), key=lambda r: r["value"])
    assert [r["value"] for r in upd] == [1, 2] and upd[1]["steps"] == 2 * upd[0]["steps"]
    assert {r["method"] for r in abr if r["kind"] == "weight_decay"} == {"sgd", "pam_sgd"}
    mu = next(r for r in abr if r["kind"] == "mu_nu" and r["value"] == 2.0)
    assert mu["overrides"]["mu_dec"] == 2.0 and mu["overrides"]["nu_dec"] == 2.0  # relative units, as stated
    assert "relative" in ab["mu_nu_units"]


def test_e2_tables_render_the_files(tmp_path, tiny_mnist):
    """The tables are a function of the JSON files: cells "mean ± half-width (n seeds)", claims whose verdict
    follows the stated rule from the stored paired differences."""
    cfg = tiny_e2(equal_steps_architectures=())
    e2.run_e2(cfg, tmp_path, ("base", "fractions"), seeds=(0, 1))
    main = json.loads((tmp_path / "e2_mnist.json").read_text())
    t = e2.mnist_tables(tmp_path)
    assert set(t) == {"curves", "training_size", "claims"}
    c = next(c for c in main["cells"] if c["part"] == "base" and c["method"] == "pam_sgd")["test_mse"]
    assert f"{c['mean']:.3g} ± {c['half_width']:.2g} (2 seeds)" in t["curves"]
    rows = [r for r in main["claims"] if r["difference"] is not None]
    assert {r["setting"].split(",")[0] for r in rows} == {"default PAM-SGD", "PAM-SGD with the authors' settings"}
    for r in rows:
        runs = {(x["method"], x["seed"]): x["test_mse"] for x in main["runs"] if x["part"] == "fractions"
                and x["fraction"] == 0.2 and x["policy"] == "paper"}
        m = "pam_sgd" if r["setting"].startswith("default") else "pam_sgd_authors"
        diffs = [runs[(m, s)] - runs[("sgd", s)] for s in (0, 1)]
        assert r["difference"]["values"] == pytest.approx(diffs)
        lo, hi = r["difference"]["low"], r["difference"]["high"]
        assert r["verdict"] == ("holds" if hi < 0 else "does not hold" if lo > 0 else "inconclusive")
        assert r["verdict"] in t["claims"]
    # one seed: no CI, verdict inconclusive, the cell says "(1 seed)"
    e2.run_e2(cfg, tmp_path, ("base", "fractions"), seeds=(3,))
    t1 = e2.mnist_tables(tmp_path)
    assert "(1 seed)" in t1["curves"] and "±" not in t1["curves"]
    assert "holds" not in json.loads((tmp_path / "e2_mnist.json").read_text())["summary"]["claims"][0]


def test_e2_methods_share_the_initialisation_and_reference_ties_sgd(tiny_mnist):
    cfg = tiny_e2()
    a, b = e2.make_e2_sae(cfg, "topk"), e2.make_e2_sae(cfg, "topk")
    assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.W_dec, b.W_dec)
    X_tr, X_te = tiny_mnist
    ref = e2.E2Config.reference(d_sae=16, k=4)
    assert ref.sgd_tied and ref.equal_steps_architectures == () and "pam_sgd_authors" in ref.methods
    rec = e2.train_one(ref, "sgd", "topk", X_tr[:64], X_te[:32], 1, curves=False)
    assert rec["tied"] is True
    assert e2.train_one(ref, "pam_sgd", "topk", X_tr[:64], None, 1, curves=False)["tied"] is False


def test_reference_preset_uses_the_authors_initialisation():
    """Statistics of their init computed by hand: W_enc entries ~ 0.1 N(0, 1), so mean 0 (sd of the mean
    0.1 / sqrt(784 * 256) = 2.2e-4), sd 0.1 (relative sd of the estimate 1 / sqrt(2n) = 0.16%), column norms
    0.1 * chi_784, mean 0.1 * sqrt(783.5) = 2.799 and sd 0.1 / sqrt(2) = 0.071; untied W_dec ~ 0.01 N(0, 1);
    zero biases; a tied SAE of the same seed has the same encoder. scipy's KS test against N(0, 0.1^2)
    checks the shape. The default init has unit-norm columns instead."""
    from scipy import stats as st

    ref = e2.E2Config.reference()
    assert ref.init == "authors" and "pam_sgd_authors" in ref.methods
    untied, tied = e2.make_e2_sae(ref, "topk"), e2.make_e2_sae(ref, "topk", tied=True)
    W = untied.W_enc.detach().double()
    assert W.shape == (784, 256)
    assert abs(float(W.mean())) < 5 * 0.1 / math.sqrt(784 * 256)
    assert float(W.std()) == pytest.approx(0.1, rel=0.01)
    norms = W.norm(dim=0)
    assert float(norms.mean()) == pytest.approx(0.1 * math.sqrt(783.5), abs=5 * 0.071 / 16)
    assert float(norms.min()) > 2.8 - 6 * 0.071 and float(norms.max()) < 2.8 + 6 * 0.071
    assert st.kstest(W.flatten().numpy(), "norm", args=(0.0, 0.1)).pvalue > 1e-3
    Wd = untied.W_dec.detach().double()
    assert float(Wd.std()) == pytest.approx(0.01, rel=0.01) and abs(float(Wd.mean())) < 5 * 0.01 / math.sqrt(Wd.numel())
    assert not untied.b_enc.any() and not untied.b_dec.any()
    assert torch.equal(tied.W_enc, untied.W_enc) and torch.equal(tied.W_dec, tied.W_enc.T)
    assert untied.W_enc.stride() == sp.make_sae(784, 256, "topk", k=8).W_enc.stride()  # the SAE's layout is kept
    default = e2.make_e2_sae(e2.E2Config(), "topk").W_enc.detach().double().norm(dim=0)
    torch.testing.assert_close(default, torch.ones(256, dtype=torch.float64))


def test_authors_pam_uses_the_authors_decoder_step(tiny_mnist):
    """"pam_sgd_authors": ridge 1e-6 in absolute units, no proximal term: the decoder after one epoch is the
    plain ridge solve on the final codes; the default "pam_sgd" takes the proximal step instead."""
    from splinterp.train import solve_decoder

    X_tr, _ = tiny_mnist
    X = X_tr[:64]
    out = {}
    for name, method in (("ref", "pam_sgd_authors"), ("default", "pam_sgd")):
        _, sae = e2.train_one(e2.E2Config.reference(d_sae=16, k=4), method, "topk", X, None, 1, curves=False,
                              return_model=True)
        with torch.no_grad():
            Z = sae.encode(X)
        W, _ = solve_decoder(Z.double(), X.double(), alpha=1e-6)
        out[name] = float((sae.W_dec.detach().double() - W).abs().max() / W.abs().max())
    assert out["ref"] < 1e-4 and out["default"] > 1e-2, out


def test_fraction_epochs_and_subsets():
    cfg = e2.E2Config()
    n = 4000
    paper = [e2.fraction_epochs(cfg, "paper", max(1, round(f * n)), n) for f in cfg.fractions]
    assert paper == [10, 10, 10, 10, 10, 20]  # the authors' schedule: min(20, max(10, int(20 f)))
    for f in cfg.fractions:
        m = len(e2.fraction_subset(n, f, 0))
        ep = e2.fraction_epochs(cfg, "equal_steps", m, n)
        assert ep * math.ceil(m / cfg.batch_size) >= 20 * math.ceil(n / cfg.batch_size)
    assert torch.equal(e2.fraction_subset(n, 0.1, 5), e2.fraction_subset(n, 0.1, 5))
    with pytest.raises(ConfigError):
        e2.fraction_epochs(cfg, "nope", 10, n)


@pytest.mark.parametrize("bad", [dict(dataset="cifar"), dict(k=300), dict(fractions=(0.0,)),
                                 dict(equal_steps_fractions=(1.5,)),
                                 dict(architectures=("gated",)), dict(sgd_updates_methods=("adam",)),
                                 dict(weight_decays=(-1.0,)), dict(lr=0.0)])
def test_e2_config_errors(bad):
    with pytest.raises(ConfigError):
        e2.E2Config(**bad)


def test_e2_fashion_is_skipped_when_absent_and_writes_nothing(tmp_path, monkeypatch):
    def absent(*a, **kw):
        raise DatasetNotFoundError("no Fashion-MNIST here")

    monkeypatch.setattr(spdata, "load_fashion_mnist", absent)
    with pytest.raises(JobSkipped, match="no Fashion-MNIST here"):
        e2.e2_fashion_job(tmp_path, RunSettings(quick=True))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ capacity
def test_capacity_runs_and_writes_what_it_promises(tmp_path, tiny_mnist):
    cfg = cap.CapacityConfig(kmeans_clusters=(4, 16), kmeans_n_init=1, kmeans_max_iter=20, local_pca_regions=(2,),
                             sae_sizes=(8,), k=2, sae_methods=("sgd", "pam_sgd"), epochs=1, matched_sae_size=8)
    res = cap.run_capacity(cfg, tmp_path, seeds=(0, 1))
    assert (tmp_path / "capacity_mnist.png").stat().st_size > 0
    on_disk = json.loads((tmp_path / "capacity_mnist.json").read_text())
    assert on_disk["matched"] == res["matched"] and on_disk["seeds"] == [0, 1]
    runs = res["runs"]
    assert sorted(r["n_parameters"] for r in runs if r["family"] == "kmeans" and r["seed"] == 0) == [4 * 784, 16 * 784]
    assert next(r for r in runs if r["family"] == "local_pca")["n_parameters"] == 2 * 784 * 3
    for m in ("sgd", "pam_sgd"):
        for s in (0, 1):
            (x,) = [r for r in runs if r["family"] == f"sae_{m}" and r["seed"] == s]
            assert x["n_parameters"] == cap.sae_parameter_count(784, 8) == 2 * 784 * 8 + 8 + 784
            assert 1 <= x["n_regions_test"] <= 200 and 1 <= x["n_regions_train"] <= 500
            assert x["test_l0"] <= 2
    assert res["matched"]["kmeans_size"] == 16  # closest to the SAE's 13,336 parameters
    pca = next(r for r in runs if r["family"] == "pca" and r["seed"] == 0)
    lp = next(r for r in runs if r["family"] == "local_pca" and r["seed"] == 0)
    assert lp["train_mse"] <= pca["train_mse"] + 1e-6  # 2 regions beat 1 (same rank)
    # the claim rows: paired differences by seed, verdict by the stated rule
    by = {(r["family"], r["size"], r["seed"]): r["test_mse"] for r in runs}
    for row in res["claims"]:
        m = row["sae_method"]
        above = [by[("kmeans", 16, s)] - by[(f"sae_{m}", 8, s)] for s in (0, 1)]
        assert row["kmeans_minus_sae"]["values"] == pytest.approx(above)
        va, vb = row["kmeans_minus_sae"]["verdict"], row["sae_minus_local_pca"]["verdict"]
        assert row["verdict"] == ("holds" if va == vb == "holds" else "does not hold"
                                  if "does not hold" in (va, vb) else "inconclusive")
    t = cap.capacity_tables(tmp_path)
    assert set(t) == {"models", "claims"} and "(2 seeds)" in t["models"] and row["verdict"] in t["claims"]
    c = next(c for c in res["cells"] if c["family"] == "kmeans" and c["size"] == 4)["test_mse"]
    assert f"{c['mean']:.3g} ± {c['half_width']:.2g} (2 seeds)" in t["models"]


def test_capacity_config_errors():
    with pytest.raises(ConfigError):
        cap.CapacityConfig(matched_sae_size=100)
    with pytest.raises(ConfigError):
        cap.CapacityConfig(k=100)
    with pytest.raises(ConfigError):
        cap.CapacityConfig(sae_methods=())


# ------------------------------------------------------------------------------------------------ registry
def test_jobs_are_registered_with_their_outputs():
    load_all()
    assert set(get("e1_toy").outputs) == {"e1_toy.json", "e1_toy_k1.png", "e1_toy_k3.png"}
    assert "e2_mnist_training_size.png" in get("e2_mnist").outputs
    assert "e2_mnist_ablations.json" in get("e2_mnist_ablations").outputs
    assert "e2_fashion.json" in get("e2_fashion").outputs
    assert set(get("capacity_mnist").outputs) == {"capacity_mnist.json", "capacity_mnist.png"}
    for name in ("e1_toy", "e2_mnist", "e2_mnist_ablations", "e2_fashion", "capacity_mnist"):
        assert get(name).quick_seconds <= 40


@pytest.mark.slow
def test_quick_jobs_end_to_end(tmp_path):
    from splinterp.experiments.registry import run_job

    load_all()
    for name in ("e1_toy", "e2_mnist", "e2_mnist_ablations", "capacity_mnist"):
        out = run_job(name, tmp_path, quick=True, seeds=(0,))
        assert isinstance(out, dict)
        for f in get(name).outputs:
            assert (tmp_path / f).exists(), f
        assert set(get(name).tables(tmp_path)) >= ({"ablations"} if name == "e2_mnist_ablations" else {"claims"})
