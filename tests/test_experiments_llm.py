"""LLM experiment jobs end to end on tiny settings: E3, shrinkage, Group-SAE, transfer, geometry, the shared
cache and SAE store, and the `model` path with a random GPT-2 saved to a folder."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from splinterp.errors import ConfigError  # noqa: E402
from splinterp.experiments import registry  # noqa: E402
from splinterp.experiments.e3_llm import E3Config, run_e3  # noqa: E402
from splinterp.experiments.group_sae import GroupSAEConfig, run_group_sae  # noqa: E402
from splinterp.experiments.llm_geometry import GeometryConfig, geometry_row, run_llm_geometry  # noqa: E402
from splinterp.experiments.shrinkage import ShrinkageConfig, run_shrinkage  # noqa: E402
from splinterp.experiments.transfer import TransferConfig, run_transfer  # noqa: E402
from splinterp.llm import (  # noqa: E402
    LayerSAEConfig,
    LLMContext,
    LLMDataConfig,
    SAEStore,
    SweepPointConfig,
    offline_cache,
    sae_train_flops,
    train_layers_sae,
)

TINY = LLMDataConfig(n_texts=8, n_eval_texts=2, max_length=24, test_frac=0.25, split_unit="token", max_test_tokens=48,
                     harvest_batch_size=8)
TINY_SAE = LayerSAEConfig(d_sae=16, k=4, epochs=1, batch_size=32, lr=3e-3, eval_every=2)
TINY_POINT = SweepPointConfig(d_sae=16, epochs=1, batch_size=32, eval_every=5, sparse_start_l0=4)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("llm_out")


@pytest.fixture(scope="module")
def ctx(out):
    return LLMContext(out, TINY, seed=0)


def test_offline_cache_is_harvested_once(out, ctx, monkeypatch):
    import sys

    hv = sys.modules["splinterp.data.harvest"]  # (splinterp.data.harvest the attribute is the function)

    def boom(*a, **k):
        raise AssertionError("harvested again")

    monkeypatch.setattr(hv, "harvest", boom)
    again = offline_cache(out, data=TINY, seed=0)
    assert again.folder == ctx.cache.folder and again.layers == list(range(6))
    other = dataclasses.replace(TINY, n_texts=9)
    with pytest.raises(AssertionError, match="harvested again"):  # a different key is a different cache
        offline_cache(out, data=other, seed=0)


def test_context_standardises_on_train_split(ctx):
    X = ctx.test(2)
    assert X.shape[1] == 384 and 0 < X.shape[0] <= 48
    assert ctx.pick_layer(None) == 3 and ctx.pick_layer(1) == 1
    with pytest.raises(ConfigError):
        ctx.pick_layer(7)
    tr = ctx.train(2)
    assert tr.mean(0).abs().max() < 1e-4  # fitted on exactly these rows


def test_store_reuses_trained_saes(ctx):
    sae_cfg, train_cfg = TINY_SAE.configs(384, 0, "cpu")
    a = train_layers_sae(ctx, [1], sae_cfg, train_cfg, name="topk_L1")
    b = train_layers_sae(ctx, [1], sae_cfg, train_cfg, name="topk_L1")
    assert not a.reused and b.reused
    assert torch.equal(a.sae.W_enc, b.sae.W_enc) and a.curve == b.curve
    assert a.curve["steps"][0] == 0 and a.curve["steps"][-1] > 0
    c = train_layers_sae(ctx, [1], sae_cfg, train_cfg.replace(lr=1e-3), name="topk_L1")
    assert not c.reused  # any setting change is a different SAE
    assert SAEStore(ctx.store.root, enabled=False).get("topk_L1", a.key) is None
    stds = json.loads((ctx.store.folder("topk_L1", a.key) / "standardizers.json").read_text())
    assert list(stds) == ["1"] and len(stds["1"]["mean"]) == 384


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu"])
def test_sparse_start_sets_initial_l0(arch):
    from splinterp import SAE, SAEConfig
    from splinterp.llm import sparse_start

    X = torch.randn(500, 12, generator=torch.Generator().manual_seed(0))
    sae = SAE(SAEConfig(d_in=12, d_sae=40, architecture=arch, seed=1))
    tau = sparse_start(sae, X, 6.0)
    u = X @ SAE(SAEConfig(d_in=12, d_sae=40, architecture="relu", seed=1)).W_enc  # same initial encoder
    assert tau == pytest.approx(float(torch.quantile(u.flatten(), 1 - 6 / 40)), rel=1e-5)
    l0 = float((sae.encode(X) != 0).sum(1).float().mean())
    assert abs(l0 - 6.0) < 0.1
    with pytest.raises(ConfigError):
        sparse_start(SAE(SAEConfig(d_in=12, d_sae=40, architecture="topk", k=3)), X, 6.0)


def test_flops_estimate():
    assert sae_train_flops(4, 8, 10) == 3 * 10 * (2 * 4 * 8 + 2 * 4 * 8)
    assert sae_train_flops(4, 8, 10, active=2) == 3 * 10 * (2 * 4 * 8 + 2 * 4 * 2)


def test_e3_tiny(out):
    import numpy as np
    from scipy.stats import t as student_t

    from splinterp.experiments.e3_llm import e3_figures, e3_tables
    from splinterp.viz.style import STYLES

    cfg = E3Config(data=TINY, layer=1, d_sae=16, k=4, epochs=2, batch_size=32, fractions=(0.25, 0.5, 1.0),
                   fraction_epochs=1, sparsity_l1s=(1e-3,), seeds=(0, 1))
    res = run_e3(cfg, out)
    methods = ("sgd", "pam_sgd", "pam_sgd_authors")
    assert set(res["runs"]) == {f"{a}/{m}" for a in ("topk", "relu") for m in methods}
    r = res["runs"]["topk/pam_sgd"]
    assert [p["seed"] for p in r["per_seed"]] == [0, 1] and len(r["per_seed"][0]["test_mse_curve"]) == 2
    v = np.array([p["test_mse"] for p in r["per_seed"]])
    half = student_t.ppf(0.975, 1) * v.std(ddof=1) / np.sqrt(2)  # independent Student-t CI
    assert r["test_mse"]["mean"] == pytest.approx(v.mean()) and r["test_mse"]["half_width"] == pytest.approx(half)
    assert r["per_seed"][0]["test_mse"] != r["per_seed"][1]["test_mse"]  # seeds change the SAE
    assert 0 < r["test_l0"]["mean"] <= 4
    assert set(res["sparsity"]) == {"0.0001", "0.001"} and set(res["sparsity"]["0.001"]) == set(methods)
    assert res["sparsity"]["0.0001"]["sgd"]["pct_nonzero"] == res["runs"]["relu/sgd"]["pct_nonzero"]
    assert set(res["fractions"]["topk"]["pam_sgd_authors"]) == {"0.25", "0.5", "1"}
    # claims: the verdict follows the rule on the per-seed differences stored next to it
    claims = res["claims"]
    assert len(claims) == 2 * 2 + 2 * 2  # (2 archs + 2 L1s) x 2 PAM variants
    for c in claims:
        d = c["value"]["values"]
        lo, hi = c["value"]["low"], c["value"]["high"]
        assert c["verdict"] == ("holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive")
        assert len(d) == 2
    sparse = next(c for c in claims if "sparser" in c["claim"] and "authors" in c["claim"] and "0.001" in c["claim"])
    want = [a - b for a, b in zip(res["sparsity"]["0.001"]["sgd"]["pct_nonzero"]["values"],
                                  res["sparsity"]["0.001"]["pam_sgd_authors"]["pct_nonzero"]["values"])]
    assert sparse["value"]["values"] == pytest.approx(want)
    # tables are a function of the JSON file alone
    tables = e3_tables(out)
    assert set(tables) == {"runs", "training_size", "sparsity", "claims"}
    cell = f"{r['test_mse']['mean']:.4f} ± {r['test_mse']['half_width']:.4f} (2 seeds)"
    assert f"| TopK | PAM-SGD | {cell} |" in tables["runs"]
    assert "PAM-SGD (authors' settings)" in tables["training_size"] and "25% (" in tables["training_size"]
    assert tables["claims"].count("\n") == 2 + len(claims)
    assert (out / "e3_llm_table.md").read_text().startswith("### runs")
    # figures: one line per method in the style's colour, integer epochs, CI drawn, titles name model and seeds
    figs = e3_figures(json.loads((out / "e3_llm.json").read_text()))
    ax = figs["e3_llm_curves"].axes[0]
    assert [ln.get_color() for ln in ax.get_lines()] == [STYLES[m]["color"] for m in methods]
    assert len(ax.collections) == 3  # the CI bands
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert "all-MiniLM-L6-v2, block 1" in figs["e3_llm_curves"]._suptitle.get_text()
    assert "2 seeds" in figs["e3_llm_curves"]._suptitle.get_text()
    ax = figs["e3_llm_training_size"].axes[0]
    rows = [res["fractions"]["topk"]["sgd"][f]["n_rows"] for f in ("0.25", "0.5", "1")]
    assert list(ax.get_xticks()) == rows and ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(n) for n in rows]
    ax = figs["e3_llm_sparsity"].axes[0]
    assert ax.get_ylim()[0] == 0 and len(ax.patches) == 3 * 2
    assert [p.get_facecolor()[:3] for p in ax.patches[::2]] == [
        tuple(int(STYLES[m]["color"][i:i + 2], 16) / 255 for i in (1, 3, 5)) for m in methods]
    for f in ("e3_llm.json", "e3_llm_curves.png", "e3_llm_training_size.png", "e3_llm_sparsity.png"):
        assert (out / f).is_file()


def test_diff_verdict_rule():
    from splinterp.claims import diff_verdict, format_cell

    s, v = diff_verdict([1.0, 1.2, 0.9])
    assert v == "holds" and s["mean"] == pytest.approx(31 / 30)
    assert diff_verdict([-1.0, -1.2, -0.9])[1] == "does not hold"
    assert diff_verdict([1.0, -1.0, 0.5])[1] == "inconclusive"
    assert diff_verdict([2.0])[1] == "inconclusive (1 seed)"
    # 2 seeds [0, 2]: mean 1, sd sqrt(2), t(0.975, 1) = 12.706 -> half-width 12.706
    assert format_cell(diff_verdict([0.0, 2.0])[0], ".3g") == "1 ± 12.7 (2 seeds)"
    assert format_cell(diff_verdict([0.5])[0]) == "0.5 (1 seed)"


def test_shrinkage_tiny(out):
    from splinterp.experiments.shrinkage import shrinkage_figures, shrinkage_tables
    from splinterp.viz.style import STYLES

    cfg = ShrinkageConfig(data=TINY, layer=2, target_l0=4, training=TINY_POINT, seeds=(0, 1),
                          sweeps={"relu": (0.01,), "gated": (0.01,), "jumprelu": (0.01,), "topk": (2, 4, 8)})
    res = run_shrinkage(cfg, out)
    assert res["loss_metric"] == "emb_loss_score"
    assert [r["architecture"] for r in res["matched"]] == ["relu", "gated", "jumprelu", "topk"]
    topk = next(r for r in res["matched"] if r["architecture"] == "topk")
    assert topk["value"] == 4 and all(3.5 < v <= 4.0 for v in topk["l0"]["values"])
    for r in res["sweep"]:
        assert [p["seed"] for p in r["per_seed"]] == [0, 1] and r["per_seed"][0]["loss_eval"]["metric"] == "mse"
        assert r["gamma"]["mean"] == pytest.approx(sum(p["gamma"] for p in r["per_seed"]) / 2)
    # Pareto claim of TopK: its FVU interpolated linearly in log L0 at ReLU's L0, by hand
    import math

    relu = res["matched"][0]
    pts = [r for r in res["sweep"] if r["architecture"] == "topk"]
    want = []
    for i in range(2):
        at = relu["l0"]["values"][i]
        xs = sorted((p["l0"]["values"][i], p["fvu"]["values"][i]) for p in pts)
        if not xs[0][0] <= at <= xs[-1][0]:
            want = None
            break
        (x0, y0), (x1, y1) = next((a, b) for a, b in zip(xs, xs[1:]) if a[0] <= at <= b[0])
        w = (math.log(at) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
        want.append(relu["fvu"]["values"][i] - (y0 + w * (y1 - y0)))
    row = next(c for c in res["claims"] if c["claim"] == "TopK is Pareto-better than ReLU (FVU)")
    if want is None:
        assert row["value"] is None and row["verdict"].startswith("inconclusive")
    else:
        assert row["value"]["values"] == pytest.approx(want)
    tables = shrinkage_tables(out)
    assert set(tables) == {"matched", "sweep", "claims"}
    l0_cell = f"{topk['l0']['mean']:.1f} ± {topk['l0']['half_width']:.1f} (2 seeds)"
    assert f"| TopK | k=4 | {l0_cell} |" in tables["matched"] and "emb_loss_score" in tables["matched"]
    figs = shrinkage_figures(json.loads((out / "shrinkage.json").read_text()))
    bars = figs["shrinkage_gamma"].axes[1]
    assert bars.get_ylim()[0] == 0  # bars from zero
    # the actual L0 of each bar under it
    assert [t.get_text() for t in bars.get_xticklabels()][3] == f"TopK\nL0 = {topk['l0']['mean']:.1f}"
    assert "nearest L0 = 4" in bars.get_title() and "2 seeds" in figs["shrinkage_gamma"]._suptitle.get_text()
    pareto = figs["shrinkage_pareto"].axes[1]
    handles, labels = pareto.get_legend_handles_labels()
    colours = {lab: h.lines[0].get_color() for h, lab in zip(handles, labels) if hasattr(h, "lines")}
    assert colours == {"ReLU": STYLES["relu"]["color"], "Gated": STYLES["gated"]["color"],
                       "JumpReLU": STYLES["jumprelu"]["color"], "TopK": STYLES["topk"]["color"]}
    assert (out / "shrinkage_pareto.png").is_file() and (out / "shrinkage_gamma.png").is_file()
    assert (out / "shrinkage_table.md").read_text().startswith("### matched")


def test_group_sae_tiny(out):
    from splinterp.experiments.group_sae import group_sae_figure, group_sae_tables

    cfg = GroupSAEConfig(data=TINY, sae=TINY_SAE, n_groups=(1,), seeds=(0, 1), amad_threshold=0.25)
    res = run_group_sae(cfg, out)
    assert res["layers"] == [0, 1, 2, 3, 4] and res["dropped_layers"] == [5]
    groups = json.loads((out / "group_sae_groups.json").read_text())
    amads = [groups[str(g)]["amad"] for g in range(1, 6)]
    chosen = min(g for g in range(1, 6) if amads[g - 1] <= 0.25)  # the rule, by hand
    assert res["chosen_G"] == chosen and groups["metadata"]["chosen_G"] == chosen
    # the chosen G is always trained, next to the asked ones and the per-layer SAEs
    assert [r["G"] for r in res["rows"]] == sorted({1, chosen} - {5}) + [5]
    assert res["rows"][-1]["flops_saved"] == 0 and res["rows"][0]["flops_saved"] == pytest.approx(1 - 1 / 5)
    assert groups["5"]["amad"] == 0 and groups["1"]["labels"] == [0] * 5
    assert all(a >= b - 1e-12 for a, b in zip(amads, amads[1:]))  # nested partitions: AMAD falls with G here
    # time saved per seed from the measured seconds of the same seed
    for rec in res["per_seed"]:
        g1, base = rec["1"], rec["5"]
        assert g1["time_saved"] == pytest.approx(1 - g1["train_seconds"] / base["train_seconds"])
    # the claim: relative FVU increase of the chosen G, per seed
    if chosen < 5:
        rel = [(r[str(chosen)]["mean_fvu"] - r["5"]["mean_fvu"]) / r["5"]["mean_fvu"] for r in res["per_seed"]]
        assert res["claims"][0]["value"]["values"] == pytest.approx(rel)
    tables = group_sae_tables(out)
    assert set(tables) == {"groups", "claims"} and f"| {chosen} (chosen) |" in tables["groups"]
    fig = group_sae_figure(json.loads((out / "group_sae.json").read_text()))
    fvu_ax = next(a for a in fig.axes if a.get_title().startswith("grouped vs per-layer"))
    labels = fvu_ax.get_legend_handles_labels()[1]
    assert f"G = {chosen} (AMAD choice)" in labels and "per-layer SAEs" in labels
    assert "2 seeds" in fig._suptitle.get_text()
    again = run_group_sae(cfg, out)  # everything is in the store now
    assert again["rows"][0]["mean_fvu"] == res["rows"][0]["mean_fvu"] and again["saes_reused_from_store"] > 0


def test_transfer_tiny(out, ctx):
    from splinterp import metrics
    from splinterp.experiments.transfer import transfer_figure, transfer_tables
    from splinterp.layers import steps_to_target
    from splinterp.viz.style import STYLES

    res = run_transfer(TransferConfig(data=TINY, sae=TINY_SAE, targets=(2,), seeds=(0, 1)), out)
    row = res["rows"][0]
    assert row["layer"] == 2 and [r["seed"] for r in row["per_seed"]] == [0, 1]
    assert set(res["curves"]) == {"L2/scratch", "L2/forward", "L2/backward"}
    for i, s in enumerate((0, 1)):
        # the transfer run starts from the source layer's trained SAE of the same seed: its step-0 FVU is that SAE's
        src = TINY_SAE.train(ctx, [3], seed=s)
        assert src.reused
        rec = row["per_seed"][i]
        assert rec["backward_zero_shot_fvu"] == pytest.approx(metrics.evaluate(src.sae, ctx.test(2))["fvu"], rel=1e-5)
        sc = TINY_SAE.train(ctx, [2], seed=s)
        assert rec["scratch_steps"] == steps_to_target(sc.curve["steps"], sc.curve["fvu"], rec["target_fvu"])
        fw = rec["forward_steps"]
        assert rec["forward_saved"] == pytest.approx(1 - (rec["total_steps"] if fw is None else fw)
                                                     / max(rec["scratch_steps"], 1))
    claim = res["claims"][2]
    assert claim["claim"] == "forward transfer saves more steps than backward"
    want = [r["forward_saved"] - r["backward_saved"] for r in row["per_seed"]]
    assert claim["value"]["values"] == pytest.approx(want)
    tables = transfer_tables(out)
    assert set(tables) == {"steps", "claims"} and "| 2 |" in tables["steps"] and "(2 seeds)" in tables["steps"]
    fig = transfer_figure(json.loads((out / "transfer.json").read_text()))
    ax = fig.axes[0]
    assert [ln.get_color() for ln in ax.get_lines()][:3] == [STYLES[k]["color"] for k in ("scratch", "forward",
                                                                                           "backward")]
    assert all(float(t).is_integer() for t in ax.get_xticks()) and "2 seeds" in fig._suptitle.get_text()
    with pytest.raises(ConfigError):
        run_transfer(TransferConfig(data=TINY, sae=TINY_SAE, targets=(5,)), out)


def test_geometry_tiny(out, ctx):
    from splinterp.experiments.llm_geometry import geometry_figure, geometry_tables
    from splinterp.viz.style import STYLES

    cfg = GeometryConfig(data=TINY, sae=TINY_SAE, layers=(0, 4), arch_layer=2, arch_training=TINY_POINT,
                         arch_knobs={"topk": 4, "relu": 0.01, "topk_abs": 4}, seeds=(0, 1))
    res = run_llm_geometry(cfg, out)
    rows = res["rows"]
    assert [r["layer"] for r in rows] == [0, 4, 2, 2, 2]
    for r in rows:
        assert [p["seed"] for p in r["per_seed"]] == [0, 1]
        for p in r["per_seed"]:
            assert 1 <= p["n_regions"] <= p["n_tokens"] and p["order1_cells"] <= p["order2_cells"] <= p["n_tokens"]
        assert r["n_regions"]["mean"] == pytest.approx(sum(p["n_regions"] for p in r["per_seed"]) / 2)
    # the per-layer SAE of seed 1 is the store's (shared with the other jobs), measured on the same tokens
    sae1 = TINY_SAE.train(ctx, [4], seed=1)
    assert sae1.reused and rows[1]["per_seed"][1]["n_regions"] == geometry_row(sae1.sae, ctx.test(4))["n_regions"]
    tables = geometry_tables(out)
    assert set(tables) == {"per_layer", "architectures"} and "(2 seeds)" in tables["per_layer"]
    assert "order-1 cells" in (out / "llm_geometry_table.md").read_text()
    fig = geometry_figure(json.loads((out / "llm_geometry.json").read_text()))
    bars = fig.axes[1]
    assert bars.get_ylim()[0] == 0 and "2 seeds" in fig._suptitle.get_text()
    want = [tuple(int(STYLES[a]["color"][i:i + 2], 16) / 255 for i in (1, 3, 5)) for a in ("topk", "relu", "topk_abs")]
    assert [p.get_facecolor()[:3] for p in bars.patches[:3]] == want


def test_geometry_row_regions_are_the_order_k_power_cells(make_random_sae):
    """For a TopK SAE whose k largest scores are all positive, a region (active set) is exactly an order-k power
    cell, so the two counts are equal; and each count equals the distinct top-m index sets of a float64 brute
    force."""
    sae = make_random_sae("topk", d_in=6, d_sae=10, k=2)
    with torch.no_grad():
        sae.b_enc.fill_(50.0)  # every score positive: TopK then ReLU keeps all k
    X = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    row = geometry_row(sae, X, orders=(1, 2))
    assert row["order2_cells"] == row["n_regions"]
    W, b = (t.detach().double() for t in sae.encoder_affine())
    top = torch.argsort(X.double() @ W + b, dim=1, descending=True)
    for m in (1, 2):
        assert row[f"order{m}_cells"] == len({tuple(sorted(r)) for r in top[:, :m].tolist()})
    assert row["regions_per_token"] == row["n_regions"] / 200


def test_registered_jobs_and_outputs():
    jobs = registry.load_all()
    want = {"e3_llm": "e3_llm.json", "shrinkage": "shrinkage_table.md", "group_sae": "group_sae_groups.json",
            "transfer": "transfer_table.md", "llm_geometry": "llm_geometry_table.md"}
    for name, output in want.items():
        assert name in jobs and output in jobs[name].outputs and jobs[name].quick_seconds <= 40


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random 3-block GPT-2 (LM head) with the MiniLM tokenizer, saved with save_pretrained (no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from splinterp.data.harvest import load_model

    _, tok, _ = load_model(None)
    tok = copy.deepcopy(tok)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=128, vocab_size=len(tok),
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    folder = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_model_path_gpt2_through_configs(gpt2_folder, tmp_path):
    data = dataclasses.replace(TINY, model=str(gpt2_folder))
    res = run_shrinkage(ShrinkageConfig(data=data, target_l0=4, training=TINY_POINT,
                                        sweeps={"relu": (0.01,), "topk": (4,)}), tmp_path)
    assert res["loss_metric"] == "ce_loss_score" and res["layer"] == 1 and res["model"] == str(gpt2_folder)
    assert "ce_loss_with_sae" in res["matched"][0]["per_seed"][0]["loss_eval"]
    cache_dirs = list((tmp_path / "llm_cache").iterdir())
    assert len(cache_dirs) == 1 and cache_dirs[0].name.startswith("tiny-gpt2-")
    manifest = json.loads((cache_dirs[0] / "manifest.json").read_text())
    assert manifest["d_model"] == 32 and manifest["layers"] == [0, 1, 2]


def test_reproduce_model_and_layer_flags(gpt2_folder, tmp_path):
    """`splinterp reproduce --model FOLDER --layer L` runs the LLM jobs on that model (here a random GPT-2 saved
    to a folder), with the single-layer jobs on block L, and records both in results.json."""
    from splinterp.cli import main

    out = tmp_path / "o"
    assert main(["reproduce", "--only", "e3_llm", "transfer", "--model", str(gpt2_folder), "--layer", "1",
                 "--n-texts", "8", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    jobs = json.loads((out / "results.json").read_text())["jobs"]
    assert jobs["e3_llm"]["results"]["layer"] == 1 and jobs["e3_llm"]["llm"]["model"] == str(gpt2_folder)
    assert jobs["transfer"]["status"] == "ok" and jobs["transfer"]["llm"]["layer"] == 1
    e3 = json.loads((out / "e3_llm.json").read_text())
    assert e3["model"] == str(gpt2_folder) and e3["config"]["data"]["n_texts"] == 8
    caches = list((out / "llm_cache").iterdir())
    assert len(caches) == 1 and caches[0].name.startswith("tiny-gpt2-")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["e3_llm", "shrinkage", "group_sae", "transfer", "llm_geometry"])
def test_registered_job_quick(name, tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "llm_quick_jobs"
    out.mkdir(exist_ok=True)
    job = registry.load_all()[name]
    res = job(out, registry.RunSettings(quick=True))
    assert isinstance(res, dict) and all((out / o).is_file() for o in job.outputs)
