"""The `splinterp` command line and the job registry: list, reproduce/figure (outputs, results.json, summary,
output-folder rules, failing jobs), geometry (every data format), train, and clear errors for bad args."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import splinterp
from splinterp.cli import RESULTS, SUMMARY, main
from splinterp.errors import ConfigError
from splinterp.experiments import registry


@pytest.fixture
def temp_job():
    """Register throw-away jobs for a test and remove them afterwards."""
    added = []

    def add(name, fn, outputs=()):
        registry.register(name, f"test job {name}", outputs=outputs, quick_seconds=1)(fn)
        added.append(name)

    yield add
    for n in added:
        registry._JOBS.pop(n, None)


def _write_ok(out_dir, run):
    (out_dir / "t_ok.txt").write_text(f"{run.quick} {run.seed} {run.device}")
    return {"value": np.float32(1.5), "arr": np.arange(3), "t": torch.tensor(2.0), "nan": float("nan")}


def _boom(out_dir, run):
    raise RuntimeError("boom")


def _forgets_output(out_dir, run):
    return {}


# --------------------------------------------------------------------------------------------- list
def test_list_shows_registered_jobs(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("power_diagrams", "lifting", "sae_power_cells", "mnist_slices", "llm_projection"):
        assert name in out
    assert main(["list", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["lifting"]["outputs"] == ["lift_fig7.png", "lift_fig7.html"]


def test_python_dash_m_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "splinterp", "list"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "power_diagrams" in r.stdout


def test_no_command_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2


# ------------------------------------------------------------------------------------------ reproduce
def test_reproduce_quick_writes_what_the_registry_declares(tmp_path, capsys):
    out = tmp_path / "new" / "out"
    assert main(["reproduce", "--quick", "--out", str(out), "--only", "power_diagrams", "--no-progress"]) == 0
    job = registry.get("power_diagrams")
    for o in job.outputs:
        assert (out / o).is_file() and (out / o).read_bytes()[:4] == b"\x89PNG"
    res = json.loads((out / RESULTS).read_text())
    entry = res["jobs"]["power_diagrams"]
    assert entry["status"] == "ok" and entry["quick"] is True and entry["seed"] == 0
    assert entry["results"]["fig6_power_order2_polygon_agreement"] == 1.0
    assert "power_diagrams" in (out / SUMMARY).read_text()
    assert "ran 1 job" in capsys.readouterr().out
    assert not list(out.glob(".*.tmp"))  # no temporary files left behind


def test_reproduce_merges_into_its_own_folder_and_refuses_others(tmp_path, temp_job, capsys):
    temp_job("t_ok", _write_ok, ["t_ok.txt"])
    temp_job("t_ok2", lambda o, run: {"x": 1}, [])
    out = tmp_path / "o"
    assert main(["figure", "t_ok", "--out", str(out), "--seed", "3", "--no-progress"]) == 0
    assert (out / "t_ok.txt").read_text() == "False 3 cpu"
    res = json.loads((out / RESULTS).read_text())["jobs"]["t_ok"]
    assert res["results"] == {"value": 1.5, "arr": [0, 1, 2], "t": 2.0, "nan": None}
    # a folder written by reproduce is reused: results merge
    assert main(["reproduce", "--only", "t_ok2", "--out", str(out), "--no-progress"]) == 0
    jobs = json.loads((out / RESULTS).read_text())["jobs"]
    assert set(jobs) == {"t_ok", "t_ok2"}
    # any other non-empty folder is refused unless --force
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    capsys.readouterr()
    assert main(["figure", "t_ok", "--out", str(other), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["figure", "t_ok", "--out", str(other), "--force", "--no-progress"]) == 0
    assert (other / "precious.txt").read_text() == "keep"
    f = tmp_path / "afile"
    f.write_text("x")
    assert main(["figure", "t_ok", "--out", str(f), "--no-progress"]) == 2


def test_failing_job_does_not_stop_the_others(tmp_path, temp_job, capsys):
    temp_job("t_boom", _boom)
    temp_job("t_forget", _forgets_output, ["t_forget.png"])
    temp_job("t_ok", _write_ok, ["t_ok.txt"])
    out = tmp_path / "o"
    assert main(["reproduce", "--out", str(out), "--only", "t_boom", "t_forget", "t_ok", "--no-progress"]) == 1
    jobs = json.loads((out / RESULTS).read_text())["jobs"]
    assert jobs["t_boom"]["status"] == "failed" and "boom" in jobs["t_boom"]["error"]
    assert jobs["t_forget"]["status"] == "failed" and "t_forget.png" in jobs["t_forget"]["error"]
    assert jobs["t_ok"]["status"] == "ok"
    assert "failed" in capsys.readouterr().err
    assert "**Failed:**" in (out / SUMMARY).read_text()


def test_bad_reproduce_args(tmp_path, capsys):
    assert main(["reproduce", "--only", "no_such_job", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "unknown job 'no_such_job'" in err and "power_diagrams" in err
    assert main(["reproduce", "--device", "cuda:7" if torch.cuda.is_available() else "cuda",
                 "--out", str(tmp_path / "b")]) == 2
    assert "CUDA" in capsys.readouterr().err or "cuda" in capsys.readouterr().err.lower()
    assert main(["reproduce", "--device", "banana", "--out", str(tmp_path / "c")]) == 2
    assert main(["figure", "nope", "--out", str(tmp_path / "d")]) == 2
    with pytest.raises(SystemExit):
        main(["reproduce", "--seed", "abc"])
    with pytest.raises(SystemExit):
        main(["reproduce", "--plotlyjs", "sometimes"])
    with pytest.raises(SystemExit):
        main(["reproduce", "--threads", "two"])
    assert "must be an integer, got 'two'" in capsys.readouterr().err
    for bad in ("0", "-2"):
        assert main(["reproduce", "--threads", bad, "--out", str(tmp_path / "e")]) == 2
        assert "--threads must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()  # refused before any job ran


def test_threads_flag_reaches_every_job_and_is_restored(tmp_path, temp_job):
    """--threads sets torch's intra-op threads inside every job; a job's quick_threads applies in quick mode
    when --threads is not given; the caller's count is restored after each."""
    seen = []

    def record(out_dir, run):
        seen.append(torch.get_num_threads())
        return {}

    temp_job("t_threads", record)
    registry._JOBS["t_threads"] = dataclasses.replace(registry._JOBS["t_threads"], quick_threads=1)
    before = torch.get_num_threads()
    out = str(tmp_path / "o")
    assert main(["figure", "t_threads", "--threads", "3", "--quick", "--out", out, "--no-progress"]) == 0
    assert main(["figure", "t_threads", "--quick", "--out", out, "--no-progress"]) == 0
    assert main(["figure", "t_threads", "--out", out, "--no-progress"]) == 0
    assert seen == [3, 1, before]
    assert torch.get_num_threads() == before
    assert json.loads((tmp_path / "o" / RESULTS).read_text())["jobs"]["t_threads"]["threads"] is None


def test_torch_threads_refuses_bad_counts():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            with registry.torch_threads(bad):
                pass


def test_run_job_leaves_the_callers_random_state_alone(tmp_path, temp_job):
    """Jobs run with python, numpy and torch seeded by the run's seed (so third-party code they call is
    reproducible) and the caller's generators are restored afterwards."""
    import random

    draws = []

    def draw(out_dir, run):
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
        return {}

    temp_job("t_draw", draw)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    registry.run_job("t_draw", tmp_path, seed=5)
    registry.run_job("t_draw", tmp_path, seed=5)
    assert draws[0] == draws[1]  # the seed decides what the job sees
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


# ------------------------------------------------------------------------------------------- registry
def test_registry_rules(temp_job):
    temp_job("t_ok", _write_ok, ["t_ok.txt"])
    with pytest.raises(ConfigError, match="already registered"):
        registry.register("t_ok", "again", [])(_boom)
    with pytest.raises(ConfigError, match="already belong"):
        registry.register("t_other", "clash", ["t_ok.txt"])(_boom)
    for bad in (["../escape.png"], ["/abs.png"], ["results.json"], ["a.png", "a.png"]):
        with pytest.raises(ConfigError):
            registry.register("t_bad", "bad", bad)
    with pytest.raises(ConfigError):
        registry.register("bad name!", "x", [])
    with pytest.raises(ConfigError, match="unknown job"):
        registry.get("definitely_not_a_job")
    with pytest.raises(ConfigError, match="cannot be written as JSON"):
        registry.to_jsonable({"a": object()})
    assert registry.to_jsonable({"p": np.float64("inf"), 1: (np.int64(2), True)}) == {"p": None, "1": [2, True]}


def test_load_all_imports_every_experiment_module():
    jobs = registry.load_all()
    mods = {j.module for j in jobs.values()}
    assert "splinterp.experiments.figures" in mods
    assert registry.load_errors() == {}, registry.load_errors()


# ------------------------------------------------------------------------------------------- geometry
@pytest.fixture
def saved_sae(tmp_path):
    sae = splinterp.SAE(splinterp.SAEConfig(d_in=6, d_sae=24, architecture="topk", k=3, seed=0))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
    folder = tmp_path / "sae"
    splinterp.save(sae, folder)
    return sae, folder


def test_geometry_report_on_every_data_format(tmp_path, saved_sae, capsys):
    from safetensors.torch import save_file

    from splinterp.geometry import region_stats

    sae, folder = saved_sae
    X = torch.randn(300, 6)
    want = region_stats(sae, X)
    W, b = (t.detach().double() for t in sae.encoder_affine())
    u = X.double() @ W + b
    top = torch.argsort(u, dim=1, descending=True)[:, :3]
    fires = torch.zeros_like(u, dtype=torch.bool).scatter_(1, top, u.gather(1, top) > 0)  # TopK, then ReLU
    want_l0, want_alive = float(fires.sum(1).double().mean()), float(fires.any(0).double().mean())
    np.save(tmp_path / "x.npy", X.numpy())
    torch.save(X, tmp_path / "x.pt")
    torch.save({"acts": X}, tmp_path / "d.pt")
    save_file({"acts": X, "other": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    for data, extra in [("x.npy", []), ("x.pt", []), ("d.pt", []), ("x.safetensors", ["--key", "acts"])]:
        assert main(["geometry", str(folder), "--data", str(tmp_path / data), "--json", *extra]) == 0, data
        rep = json.loads(capsys.readouterr().out)
        assert rep["n_regions"] == want["n_regions"] and rep["n_rows"] == 300
        assert rep["l0"] == pytest.approx(want_l0) and rep["frac_alive"] == pytest.approx(want_alive)
    assert main(["geometry", str(folder), "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "r.json"),
                 "--max-rows", "50"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n_rows"] == 50
    assert "n_regions" in capsys.readouterr().out  # the table


def test_geometry_on_an_activation_cache(tmp_path, saved_sae, capsys):
    from splinterp.data.harvest import write_cache

    _, folder = saved_sae
    acts = {2: torch.randn(40, 6), 4: torch.randn(40, 6)}
    write_cache(tmp_path / "cache", acts)
    assert main(["geometry", str(folder), "--data", str(tmp_path / "cache"), "--layer", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_rows"] == 40
    assert main(["geometry", str(folder), "--data", str(tmp_path / "cache")]) == 2  # two layers: which?
    assert "--layer" in capsys.readouterr().err


def test_geometry_bad_args(tmp_path, saved_sae, capsys):
    _, folder = saved_sae
    np.save(tmp_path / "wide.npy", np.zeros((5, 7), np.float32))
    np.save(tmp_path / "cube.npy", np.zeros((5, 6, 2), np.float32))
    (tmp_path / "x.csv").write_text("1,2")
    torch.save({"a": torch.zeros(3, 6), "b": torch.zeros(3, 6)}, tmp_path / "two.pt")
    cases = [
        ([str(folder), "--data", str(tmp_path / "missing.npy")], "does not exist"),
        ([str(folder), "--data", str(tmp_path / "wide.npy")], "d_in=6"),
        ([str(folder), "--data", str(tmp_path / "cube.npy")], "matrix"),
        ([str(folder), "--data", str(tmp_path / "x.csv")], "unknown data format"),
        ([str(folder), "--data", str(tmp_path / "two.pt")], "--key"),
        ([str(tmp_path), "--data", str(tmp_path / "wide.npy")], "cfg.json"),
    ]
    for argv, msg in cases:
        assert main(["geometry", *argv]) == 2, argv
        assert msg in capsys.readouterr().err, (argv, msg)
    with pytest.raises(SystemExit):
        main(["geometry", str(folder)])  # --data is required


# ---------------------------------------------------------------------------------------------- train
def test_train_saves_a_loadable_sae(tmp_path, capsys):
    X = torch.randn(200, 5)
    np.save(tmp_path / "x.npy", X.numpy())
    out = tmp_path / "sae"
    assert main(["train", "--data", str(tmp_path / "x.npy"), "--out", str(out), "--d-sae", "12", "--k", "2",
                 "--method", "pam_sgd", "--epochs", "2", "--batch-size", "50", "--no-progress"]) == 0
    sae = splinterp.load(out)
    assert sae.cfg.d_sae == 12 and sae.cfg.k == 2 and sae.cfg.d_in == 5
    hist = json.loads((out / "history.json").read_text())
    assert len(hist["records"]) == 2 and "test_mse" in hist["records"][-1]
    assert "saved to" in capsys.readouterr().out
    # the CLI's train -> geometry round trip
    assert main(["geometry", str(out), "--data", str(tmp_path / "x.npy"), "--json"]) == 0


def test_train_streams_a_cache_like_it_loads_it(tmp_path, capsys):
    """--memory-limit-mb streams the cache (bounded memory); unshuffled, it sees the same batches and the same
    standardiser as loading the whole cache, so the SAE comes out the same to float rounding."""
    from splinterp.data.harvest import write_cache

    g = torch.Generator().manual_seed(0)
    write_cache(tmp_path / "cache", {3: torch.randn(300, 6, generator=g) * 3 + 1}, shard_tokens=50)
    base = ["train", "--data", str(tmp_path / "cache"), "--d-sae", "10", "--k", "2", "--epochs", "2",
            "--batch-size", "32", "--no-shuffle", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "loaded")]) == 0
    assert main(base + ["--out", str(tmp_path / "streamed"), "--memory-limit-mb", "0.05"]) == 0
    assert "train rows, streamed)" in capsys.readouterr().out
    a, b = splinterp.load(tmp_path / "loaded"), splinterp.load(tmp_path / "streamed")
    for name, p in a.named_parameters():
        torch.testing.assert_close(dict(b.named_parameters())[name], p, rtol=1e-4, atol=1e-5, msg=name)
    sa = json.loads((tmp_path / "loaded" / "standardizer.json").read_text())
    sb = json.loads((tmp_path / "streamed" / "standardizer.json").read_text())
    np.testing.assert_allclose(sb["mean"], sa["mean"], rtol=1e-6)
    ha = json.loads((tmp_path / "loaded" / "history.json").read_text())["records"][-1]
    hb = json.loads((tmp_path / "streamed" / "history.json").read_text())["records"][-1]
    assert hb["test_mse"] == pytest.approx(ha["test_mse"], rel=1e-4)
    assert main(base + ["--out", str(tmp_path / "x"), "--memory-limit-mb", "0"]) == 2
    assert "memory-limit-mb" in capsys.readouterr().err


def test_train_bad_args(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((20, 4), np.float32))
    base = ["train", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s"), "--d-sae", "8"]
    assert main(base + ["--k", "2", "--mu-enc", "0.1"]) == 2
    assert "pam_sgd" in capsys.readouterr().err
    assert main(base) == 2
    assert "--k" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse: the Literal type of SAEConfig.architecture
        main(base + ["--architecture", "softmax"])
    assert exit_.value.code == 2 and "choose from 'relu', 'topk'" in capsys.readouterr().err
    assert main(base + ["--k", "2", "--epochs", "-1"]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    assert main(["train", "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "busy"), "--d-sae", "8",
                 "--k", "2"]) == 2
    with pytest.raises(SystemExit):
        main(["train", "--data", "mnist", "--out", str(tmp_path / "t")])  # --d-sae required


# ------------------------------------------------------------------------------------ the surface (issue 11)
def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"splinterp {splinterp.__version__}"


def test_a_skipped_job_is_reported_with_its_reason_and_writes_nothing(tmp_path, temp_job, capsys):
    def needs_data(out_dir, run):
        raise registry.JobSkipped("the Foo dataset is not installed")

    temp_job("t_skip", needs_data, ["t_skip.png"])
    temp_job("t_ok", _write_ok, ["t_ok.txt"])
    out = tmp_path / "o"
    assert main(["reproduce", "--only", "t_skip", "t_ok", "--out", str(out), "--no-progress"]) == 0
    job = json.loads((out / RESULTS).read_text())["jobs"]["t_skip"]
    assert job["status"] == "skipped" and job["reason"] == "the Foo dataset is not installed"
    assert not (out / "t_skip.png").exists()
    assert "**Skipped:** the Foo dataset is not installed" in (out / SUMMARY).read_text()
    assert "skipped (the Foo dataset is not installed)" in capsys.readouterr().out


def test_e2_fashion_without_the_dataset_is_skipped_not_faked(tmp_path, monkeypatch):
    from splinterp import data
    from splinterp.errors import DatasetNotFoundError

    def missing(*a, **k):
        raise DatasetNotFoundError("no Fashion-MNIST files under /nowhere")

    monkeypatch.setattr(data, "load_fashion_mnist", missing)
    assert main(["figure", "e2_fashion", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    job = json.loads((tmp_path / RESULTS).read_text())["jobs"]["e2_fashion"]
    assert job["status"] == "skipped" and "dataset-fashion-mnist" in job["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULTS, SUMMARY]  # no placeholder figure


def test_figure_progress_bar_names_the_command(tmp_path, temp_job, capsys):
    temp_job("t_ok", _write_ok, ["t_ok.txt"])
    assert main(["figure", "t_ok", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "splinterp figure" in err and "splinterp reproduce" not in err


def test_help_lists_the_allowed_values_of_choices(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "One of: directory, inline, cdn" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--method {sgd,pam_sgd}" in out and "One of: sgd, pam_sgd" in out
    # every closed set of a config field is listed, from the field's Literal type (checked against the
    # constants the configs validate with)
    from splinterp.sae import ARCHITECTURES
    from splinterp.train.config import OPTIMIZERS, ORDERS

    for flag, values in [("--architecture", ARCHITECTURES), ("--optimizer", OPTIMIZERS), ("--order", ORDERS),
                         ("--dtype", ("float32", "float64", "float16", "bfloat16")),
                         ("--decoder-method", ("auto", "sparse", "dense")), ("--grad-clip-scope", ("encoder", "all")),
                         ("--decoder-scale", ("relative", "absolute"))]:
        assert f"{flag} {{{','.join(values)}}}" in out, flag
    assert "--score-order" not in out and "--w-enc-layout" not in out  # interop fields, set by the loaders


def _npy(tmp_path, X, name="x.npy"):
    np.save(tmp_path / name, X)
    return str(tmp_path / name)


def test_train_nan_is_named_by_its_row_in_the_file(tmp_path, capsys):
    X = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    X[3, 2] = np.nan
    args = ["train", "--data", _npy(tmp_path, X), "--out", str(tmp_path / "s"), "--d-sae", "8", "--k", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "row 3, column 2" in err and not (tmp_path / "s").exists()


def test_float64_data_needs_an_explicit_cast(tmp_path, capsys):
    X = np.random.default_rng(0).normal(size=(60, 4))  # numpy's default float64
    base = ["train", "--data", _npy(tmp_path, X), "--d-sae", "8", "--k", "2", "--epochs", "1", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 2
    assert "--cast" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(base + ["--out", str(tmp_path / "b"), "--cast"]) == 0
    sae = splinterp.load(tmp_path / "b")
    assert main(["geometry", str(tmp_path / "b"), "--data", str(tmp_path / "x.npy")]) == 2
    assert "--cast" in capsys.readouterr().err
    assert main(["geometry", str(tmp_path / "b"), "--data", str(tmp_path / "x.npy"), "--cast", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    from splinterp.geometry import region_stats

    assert rep["n_regions"] == region_stats(sae, torch.from_numpy(X).float())["n_regions"]


def test_layer_with_a_file_is_refused_not_ignored(tmp_path, saved_sae, capsys):
    _, folder = saved_sae
    path = _npy(tmp_path, np.zeros((10, 6), np.float32))
    assert main(["geometry", str(folder), "--data", path, "--layer", "2"]) == 2
    assert "--layer" in capsys.readouterr().err
    assert main(["train", "--data", path, "--out", str(tmp_path / "s"), "--d-sae", "8", "--k", "2",
                 "--layer", "2"]) == 2
    assert "--layer" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_train_replaces_its_own_folder_and_checks_outputs_before_training(tmp_path, capsys, monkeypatch):
    path = _npy(tmp_path, np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32))
    base = ["train", "--data", path, "--d-sae", "8", "--k", "2", "--epochs", "1", "--no-progress"]
    out = tmp_path / "sae"
    assert main(base + ["--out", str(out)]) == 0
    first = (out / "sae_weights.safetensors").read_bytes()
    assert main(base + ["--out", str(out), "--seed", "1"]) == 0  # its own folder: replaced
    assert (out / "sae_weights.safetensors").read_bytes() != first
    assert json.loads((out / "train_args.json").read_text())["seed"] == 1

    import splinterp.train as train_mod

    def must_not_train(*a, **k):
        raise AssertionError("training started although an output check should have failed first")

    monkeypatch.setattr(train_mod, "train_sgd", must_not_train)
    (tmp_path / "a_file").write_text("x")
    stray = tmp_path / "theirs"
    stray.mkdir()
    (stray / "notes.txt").write_text("keep")
    for bad_out, msg in [(tmp_path / "a_file", "not a folder"), (tmp_path / "a_file" / "sub", "is a file"),
                         (stray, "not empty")]:
        assert main(base + ["--out", str(bad_out)]) == 2, bad_out
        assert msg in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")  # a file train did not write: replacing would delete it
    assert main(base + ["--out", str(out)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "new"), "--checkpoint-dir", str(tmp_path / "a_file")]) == 2
    assert "--checkpoint-dir" in capsys.readouterr().err
    assert (stray / "notes.txt").read_text() == "keep"


def test_geometry_report_fields_fit_the_data_and_count_power_cells(tmp_path, saved_sae, capsys):
    """Images have no tokens: no per-token fields. The order-m cell counts equal a float64 brute force: the
    distinct sets of the m largest encoder scores."""
    sae, folder = saved_sae
    X = torch.randn(400, 6)
    assert main(["geometry", str(folder), "--data", _npy(tmp_path, X.numpy()), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "mse_per_token" not in rep and "n_tokens" not in rep
    W, b = (t.detach().double() for t in sae.encoder_affine())
    u = X.double() @ W + b
    for m in (1, 2, 4):
        sets = {tuple(sorted(row)) for row in torch.argsort(u, dim=1, descending=True)[:, :m].tolist()}
        assert rep[f"order{m}_cells"] == len(sets), m


# ----------------------------------------------------------------------------------------------- readme
def test_readme_blocks_are_filled_from_result_files_and_checked(tmp_path, temp_job, capsys):
    def tables(folder):
        r = json.loads((folder / "t_tab.json").read_text())
        return {"main": f"| x | mse |\n|---|---|\n| {r['x']} | {r['mse']:.3f} |\n"}

    registry.register("t_tab", "job with a table", ["t_tab.json"], quick_seconds=1, tables=tables)(
        lambda out_dir, run: (out_dir / "t_tab.json").write_text(json.dumps({"x": 1, "mse": 0.12345})) and {})
    try:
        results = tmp_path / "results"
        assert main(["figure", "t_tab", "--out", str(results), "--no-progress"]) == 0
        readme = tmp_path / "README.md"
        readme.write_text("intro\n<!-- results t_tab/main -->\n| stale | 9 |\n<!-- /results -->\nend\n")
        assert main(["readme", "--results", str(results), "--readme", str(readme), "--check"]) == 1
        assert "t_tab/main" in capsys.readouterr().err
        assert main(["readme", "--results", str(results), "--readme", str(readme)]) == 0
        assert readme.read_text() == ("intro\n<!-- results t_tab/main -->\n| x | mse |\n|---|---|\n| 1 | 0.123 |\n"
                                      "<!-- /results -->\nend\n")
        assert main(["readme", "--results", str(results), "--readme", str(readme), "--check"]) == 0
        readme.write_text("<!-- results t_tab/nope -->\nx\n<!-- /results -->\n")
        assert main(["readme", "--results", str(results), "--readme", str(readme)]) == 2
        assert "renders ['main']" in capsys.readouterr().err
    finally:
        registry._JOBS.pop("t_tab", None)


def test_seeds_flag_gives_every_job_consecutive_seeds(tmp_path, temp_job):
    seen = []

    def record(out_dir, run):
        seen.append(run.seeds)
        return {}

    temp_job("t_seeds", record)
    assert main(["figure", "t_seeds", "--seed", "3", "--seeds", "4", "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen == [(3, 4, 5, 6)]
    assert json.loads((tmp_path / RESULTS).read_text())["jobs"]["t_seeds"]["seeds"] == [3, 4, 5, 6]
    assert main(["figure", "t_seeds", "--seeds", "0", "--out", str(tmp_path), "--no-progress"]) == 2



# --------------------------------------------------------------------------------- reliability (issue 16)
HOLD = """
import sys, time
from splinterp.atomic import hold_folder, hold_output
lock = (hold_folder if sys.argv[1] == "folder" else hold_output)(sys.argv[2], name="--out", purpose="a test run")
print("held", flush=True)
time.sleep(120)
"""


def _holder(kind: str, path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, kind, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_reproduce_into_a_busy_folder_is_refused(tmp_path, temp_job, capsys):
    temp_job("t_ok", _write_ok, ["t_ok.txt"])
    out = tmp_path / "o"
    other = _holder("folder", out)
    try:
        assert main(["figure", "t_ok", "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"pid {other.pid}" in err and "in use by another run" in err
        assert not (out / "t_ok.txt").exists() and not (out / RESULTS).exists()
    finally:
        other.kill()
        other.wait()
    assert main(["figure", "t_ok", "--out", str(out), "--no-progress"]) == 0  # the dead holder left no lock


def test_a_second_train_into_the_same_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    import splinterp.train as train_mod

    path = _npy(tmp_path, np.zeros((20, 4), np.float32) + 1)
    monkeypatch.setattr(train_mod, "train_sgd", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    other = _holder("output", tmp_path / "sae")
    try:
        assert main(["train", "--data", path, "--out", str(tmp_path / "sae"), "--d-sae", "8", "--k", "2"]) == 2
        assert f"pid {other.pid}" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()


def test_an_sae_too_large_for_this_machine_is_refused_with_its_size(tmp_path, capsys):
    path = _npy(tmp_path, np.zeros((20, 4), np.float32) + 1)
    assert main(["train", "--data", path, "--out", str(tmp_path / "s"), "--d-sae", str(10**12), "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert "TiB" in err and not (tmp_path / "s").exists()


USER_MISTAKES = [
    ["geometry", "{sae}", "--data", "{x}", "--batch-size", "0"],
    ["geometry", "{sae}", "--data", "{tmp}/missing.npy"],
    ["geometry", "{tmp}", "--data", "{x}"],
    ["train", "--data", "{x}", "--out", "{tmp}/s", "--d-sae", "1000000000000", "--k", "2"],
    ["train", "--data", "{x}", "--out", "{tmp}/s", "--d-sae", "8"],
    ["train", "--data", "{x}", "--out", "{tmp}/s", "--d-sae", "8", "--k", "2", "--device", "tpu"],
    ["reproduce", "--only", "no_such_job", "--out", "{tmp}/r"],
    ["harvest", "--out", "{tmp}/h", "--texts", "{tmp}/missing.txt"],
    ["readme", "--results", "{tmp}/missing"],
]


@pytest.mark.parametrize("argv", USER_MISTAKES, ids=lambda a: " ".join(a[:3]))
def test_user_mistakes_print_one_line_not_a_traceback(argv, tmp_path, saved_sae):
    _, folder = saved_sae
    x = _npy(tmp_path, np.zeros((20, 6), np.float32) + 1)
    args = [a.format(sae=folder, x=x, tmp=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, "-m", "splinterp", *args], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"splinterp {args[0]}: error:")


def test_a_bug_still_shows_its_traceback(monkeypatch):
    from splinterp.commands import reproduce

    def bug(o):
        raise RuntimeError("a bug in splinterp")

    monkeypatch.setattr(reproduce, "run_list", bug)
    monkeypatch.setattr(reproduce, "COMMANDS", tuple(dataclasses.replace(c, run=bug) if c.name == "list" else c
                                                     for c in reproduce.COMMANDS))
    with pytest.raises(RuntimeError, match="a bug in splinterp"):
        main(["list"])


def test_train_on_a_harvest_records_model_hook_and_dataset(tmp_path):
    """An SAE trained on a harvested cache says where its inputs come from, under SAELens's metadata keys
    (SAELens's HookedSAETransformer splices on `hook_name`)."""
    texts = ["the cat sat on the mat", "a spline is piecewise polynomial", "sparse codes", "power diagrams"]
    assert main(["harvest", "--out", str(tmp_path / "acts2"), "--layers", "blocks.1.hook_mlp_out", "--max-length",
                 "16", "--texts", _texts_file(tmp_path, texts), "--no-progress"]) == 0
    out = tmp_path / "sae"
    assert main(["train", "--data", str(tmp_path / "acts2"), "--out", str(out), "--d-sae", "16", "--k", "2",
                 "--epochs", "1", "--no-progress", "--test-frac", "0.25"]) == 0
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["hook_name"] == "blocks.1.hook_mlp_out" and meta["hf_hook_name"].endswith(".output.dense")
    assert meta["context_size"] == 16


def _texts_file(tmp_path, texts):
    (tmp_path / "t.txt").write_text("\n".join(texts))
    return str(tmp_path / "t.txt")
