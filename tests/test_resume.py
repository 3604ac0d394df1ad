"""Checkpoint and resume: a run stopped at any checkpoint (by an exception, or by SIGKILL in a real
subprocess) and resumed ends bit-identical to a run that never stopped, on CPU."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import splinterp as sp
from splinterp.errors import ConfigError, CorruptFileError
from splinterp.train import (
    PAMConfig,
    SGDConfig,
    latest_checkpoint,
    list_checkpoints,
    register_loss,
    train_pam_sgd,
    train_sgd,
    unregister_loss,
)
from splinterp.train import losses as losses_mod

# the data and model recipe, shared verbatim with the subprocess of the SIGKILL test
SETUP = textwrap.dedent("""
    import torch
    import splinterp as sp

    def make_data(seed=0, n=256, d_in=6):
        basis = torch.randn(4, d_in, generator=torch.Generator().manual_seed(1234))
        g = torch.Generator().manual_seed(seed)
        return torch.relu(torch.randn(n, 4, generator=g)) @ basis + 0.05 * torch.randn(n, d_in, generator=g)

    def make_sae(arch="topk", seed=0):
        return sp.make_sae(6, 16, arch, k=3 if arch.startswith("topk") else None, seed=seed)
""")
_ns: dict = {}
exec(SETUP, _ns)
make_data, make_sae = _ns["make_data"], _ns["make_sae"]


pytestmark = pytest.mark.usefixtures("one_thread")


class Stop(Exception):
    pass


def stop_at(kind, epoch, batch=0):
    def cb(ev):
        if ev.kind == kind and ev.epoch == epoch and ev.batch == batch:
            raise Stop

    return cb


def assert_same_model(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for n in pa:
        assert torch.equal(pa[n], pb[n]), f"{n} differs"


def assert_same_optimizer(dir_a, dir_b):
    sa = torch.load(latest_checkpoint(dir_a) / "trainer_state.pt", weights_only=True)["optimizer"]
    sb = torch.load(latest_checkpoint(dir_b) / "trainer_state.pt", weights_only=True)["optimizer"]
    assert sa["state"].keys() == sb["state"].keys() and sa["state"]
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


def _pam(**kw):
    base = dict(epochs=4, batch_size=64, lr=1e-2, progress=False, eval_batch_size=100, mu_enc=1e-2, nu_enc=1e-2,
                alpha=1e-3, beta=0.1, mu_dec=0.5, nu_dec=0.5, grad_clip=0.5, decoder_batch_size=100)
    base.update(kw)
    return PAMConfig(**base)


def _sgd(**kw):
    base = dict(epochs=4, batch_size=64, lr=1e-2, progress=False, eval_batch_size=100, seed=3)
    base.update(kw)
    return SGDConfig(**base)


def test_sgd_resume_after_an_epoch_is_bit_identical(tmp_path):
    X, Xt = make_data(0), make_data(1, n=64)
    ref = make_sae("relu")
    h_ref = train_sgd(ref, X, _sgd(l1_coefficient=1e-3, checkpoint_dir=str(tmp_path / "ref")), eval_data=Xt)

    run = make_sae("relu")
    cfg = _sgd(l1_coefficient=1e-3, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(Stop):
        train_sgd(run, X, cfg, eval_data=Xt, callback=stop_at("epoch", 2))
    assert latest_checkpoint(tmp_path / "run").name == "ckpt-e000002-b00000000"
    fresh = make_sae("relu", seed=99)  # different init: everything must come from the checkpoint
    h = train_sgd(fresh, X, cfg.replace(resume=True), eval_data=Xt)
    assert_same_model(fresh, ref)
    assert h.without_times() == h_ref.without_times()
    assert_same_optimizer(tmp_path / "ref", tmp_path / "run")


@pytest.mark.parametrize("dtype, method", [("float16", "sgd"), ("bfloat16", "pam_sgd")])
def test_half_precision_resume_mid_epoch_is_bit_identical(tmp_path, dtype, method):
    """Half-precision SAEs keep float32 master weights (and, for float16, a loss scale) outside the SAE:
    they are part of the checkpoint, so a resumed run continues from the same masters, not from the
    rounded half-precision weights (which would change every later step)."""
    dt = getattr(torch, dtype)
    X, Xt = make_data(0).to(dt), make_data(1, n=64).to(dt)
    train = train_sgd if method == "sgd" else train_pam_sgd
    make_cfg = _sgd if method == "sgd" else _pam
    kw = dict(checkpoint_every_steps=2, lr=3e-3)

    def sae():
        return sp.make_sae(6, 16, "topk", k=3, dtype=dtype, seed=0)

    ref = sae()
    h_ref = train(ref, X, make_cfg(**kw, checkpoint_dir=str(tmp_path / "ref")), eval_data=Xt)
    run = sae()
    cfg = make_cfg(**kw, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(Stop):
        train(run, X, cfg, eval_data=Xt, callback=stop_at("step", 1, 3))
    state = torch.load(latest_checkpoint(tmp_path / "run") / "trainer_state.pt", weights_only=True)
    assert all(m.dtype == torch.float32 for m in state["mixed_precision"]["masters"])
    fresh = sp.make_sae(6, 16, "topk", k=3, dtype=dtype, seed=99)
    h = train(fresh, X, cfg.replace(resume=True), eval_data=Xt)
    assert_same_model(fresh, ref)
    assert h.without_times() == h_ref.without_times()
    assert_same_optimizer(tmp_path / "ref", tmp_path / "run")


def test_auxk_resume_mid_epoch_is_bit_identical(tmp_path):
    """The AuxK dead-latent counters are part of the checkpoint: a resumed run sees the same dead latents."""
    X, Xt = make_data(0), make_data(1, n=64)
    kw = dict(aux_k=2, dead_after_samples=100, checkpoint_every_steps=2)
    ref = make_sae("topk")
    h_ref = train_sgd(ref, X, _sgd(**kw, checkpoint_dir=str(tmp_path / "ref")), eval_data=Xt)
    assert any(r["train_running_dead"] > 0 for r in h_ref.records)  # latents did die: the state matters
    run = make_sae("topk")
    cfg = _sgd(**kw, checkpoint_dir=str(tmp_path / "run"))
    with pytest.raises(Stop):
        train_sgd(run, X, cfg, eval_data=Xt, callback=stop_at("step", 1, 3))
    fresh = make_sae("topk", seed=99)
    h = train_sgd(fresh, X, cfg.replace(resume=True), eval_data=Xt)
    assert_same_model(fresh, ref)
    assert h.without_times() == h_ref.without_times()


@pytest.mark.parametrize("order", ["encoder_first", "decoder_first"])
@pytest.mark.parametrize("stop_batch", [3, 2])  # 3: right after a mid-epoch checkpoint; 2: between checkpoints
def test_pam_resume_mid_epoch_is_bit_identical(tmp_path, order, stop_batch):
    X, Xt = make_data(0), make_data(1, n=64)
    ref = make_sae("topk")
    h_ref = train_pam_sgd(ref, X, _pam(order=order, checkpoint_dir=str(tmp_path / "ref")), eval_data=Xt)

    cfg = _pam(order=order, checkpoint_dir=str(tmp_path / "run"), checkpoint_every=2, checkpoint_every_steps=3)
    run = make_sae("topk")
    with pytest.raises(Stop):
        train_pam_sgd(run, X, cfg, eval_data=Xt, callback=stop_at("step", 2, stop_batch))
    expect = "ckpt-e000002-b00000003" if stop_batch == 3 else "ckpt-e000002-b00000000"
    assert latest_checkpoint(tmp_path / "run").name == expect
    fresh = make_sae("topk", seed=42)
    h = train_pam_sgd(fresh, X, cfg.replace(resume=True), eval_data=Xt)
    assert_same_model(fresh, ref)
    assert h.without_times() == h_ref.without_times()
    assert_same_optimizer(tmp_path / "ref", tmp_path / "run")


def test_global_rng_states_are_restored(tmp_path):
    """A loss that draws from torch, numpy and python RNGs: resume must continue each stream exactly."""

    def noisy(sae, x, cfg):
        noise = 0.01 * torch.randn_like(x) + float(np.random.normal()) * 1e-3 + random.random() * 1e-3
        m = losses_mod.reconstruction_mse(x, sae.reconstruct(x + noise).x_hat)
        return m, {"mse": m.detach()}

    register_loss("topk_abs", noisy, overwrite=True)
    try:
        X = make_data(0)

        def seeded():
            torch.manual_seed(0)
            np.random.seed(0)
            random.seed(0)

        seeded()
        ref = make_sae("topk_abs")
        train_sgd(ref, X, _sgd(epochs=3))
        seeded()
        run = make_sae("topk_abs")
        cfg = _sgd(epochs=3, checkpoint_dir=str(tmp_path))
        with pytest.raises(Stop):
            train_sgd(run, X, cfg, callback=stop_at("epoch", 1))
        torch.manual_seed(123)  # scramble: the checkpoint must put every stream back
        np.random.seed(123)
        random.seed(123)
        fresh = make_sae("topk_abs")
        train_sgd(fresh, X, cfg.replace(resume=True))
        assert_same_model(fresh, ref)
    finally:
        unregister_loss("topk_abs")


def test_extending_a_finished_run(tmp_path):
    X = make_data(0)
    ref = make_sae()
    h_ref = train_pam_sgd(ref, X, _pam(epochs=3))
    run = make_sae()
    train_pam_sgd(run, X, _pam(epochs=2, checkpoint_dir=str(tmp_path)))
    h = train_pam_sgd(run, X, _pam(epochs=3, checkpoint_dir=str(tmp_path), resume=True))
    assert_same_model(run, ref)
    assert h.without_times() == h_ref.without_times()
    # nothing left to do: resuming a finished run returns its history and restores the model
    again = make_sae(seed=5)
    h2 = train_pam_sgd(again, X, _pam(epochs=3, resume_from=str(latest_checkpoint(tmp_path))))
    assert_same_model(again, ref) and len(h2) == 3


def test_resume_with_empty_dir_starts_fresh(tmp_path):
    X = make_data(0)
    a, b = make_sae(), make_sae()
    train_sgd(a, X, _sgd(epochs=2))
    train_sgd(b, X, _sgd(epochs=2, checkpoint_dir=str(tmp_path / "new"), resume=True))
    assert_same_model(a, b)
    with pytest.raises(FileNotFoundError):
        train_sgd(make_sae(), X, _sgd(resume_from=str(tmp_path / "nothing_here")))


def test_checkpoint_folder_is_a_loadable_sae_and_old_ones_are_pruned(tmp_path):
    X = make_data(0)
    sae = make_sae()
    train_pam_sgd(sae, X, _pam(epochs=4, checkpoint_dir=str(tmp_path), keep_checkpoints=2))
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["ckpt-e000003-b00000000", "ckpt-e000004-b00000000"]
    assert json.loads((tmp_path / "latest.json").read_text())["checkpoint"] == names[-1]
    loaded = sp.load(tmp_path / names[-1] / "sae")
    assert_same_model(loaded, sae)  # the PAM decoder is part of the saved model
    assert not list(tmp_path.glob(".*tmp"))  # no temporary folders left behind


def test_bad_resumes(tmp_path):
    X = make_data(0)
    cfg = _pam(epochs=2, checkpoint_dir=str(tmp_path))
    train_pam_sgd(make_sae(), X, cfg)
    with pytest.raises(ConfigError, match="lr"):
        train_pam_sgd(make_sae(), X, cfg.replace(lr=0.5, resume=True))
    with pytest.raises(ConfigError, match="different data"):
        train_pam_sgd(make_sae(), make_data(7), cfg.replace(resume=True))
    with pytest.raises(ConfigError, match="pam_sgd"):
        train_sgd(make_sae(), X, _sgd(checkpoint_dir=str(tmp_path), resume=True))
    with pytest.raises(ConfigError, match="SAE config"):
        train_pam_sgd(sp.make_sae(6, 16, "topk", k=4), X, cfg.replace(resume=True))
    # a truncated state file is reported, not half-loaded
    ck = latest_checkpoint(tmp_path)
    raw = (ck / "trainer_state.pt").read_bytes()
    (ck / "trainer_state.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError):
        train_pam_sgd(make_sae(), X, cfg.replace(resume=True))
    (ck / "state.json").write_text("{not json")
    with pytest.raises(CorruptFileError):
        train_pam_sgd(make_sae(), X, cfg.replace(resume=True))


CHILD = SETUP + textwrap.dedent("""
    import sys, time
    torch.set_num_threads(1)
    from splinterp.train import PAMConfig, train_pam_sgd

    def slow_after_epoch_2(ev):
        if ev.kind == "step" and ev.epoch >= 2:
            time.sleep(0.25)  # leave the parent time to kill us mid-epoch

    cfg = PAMConfig(**__CFG__)
    train_pam_sgd(make_sae(), make_data(0), cfg, eval_data=make_data(1, n=64), callback=slow_after_epoch_2)
    print("FINISHED")
""")


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path):
    ckdir = tmp_path / "ck"
    kw = dict(epochs=6, batch_size=64, lr=1e-2, progress=False, eval_batch_size=100, mu_enc=1e-2, alpha=1e-3,
              mu_dec=0.5, nu_dec=0.5, order="decoder_first", checkpoint_dir=str(ckdir),
              checkpoint_every_steps=2, keep_checkpoints=3)
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("__CFG__", repr(kw)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONHASHSEED": "0"})
    try:
        deadline = time.time() + 240
        killed_at = None
        while time.time() < deadline:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"child exited (rc {proc.returncode}) before it could be killed:\n{err.decode()[-3000:]}")
            ck = latest_checkpoint(ckdir) if ckdir.exists() else None
            if ck is not None and ck.name >= "ckpt-e000002-b00000002":  # mid-way through the third epoch
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                killed_at = ck.name
                break
            time.sleep(0.02)
        assert killed_at is not None, "the child never reached the third epoch"
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    Xt = make_data(1, n=64)
    resumed = make_sae(seed=77)
    h = train_pam_sgd(resumed, make_data(0), PAMConfig(**{**kw, "resume": True}), eval_data=Xt)
    ref = make_sae()
    h_ref = train_pam_sgd(ref, make_data(0), PAMConfig(**{**kw, "checkpoint_dir": str(tmp_path / "ref")}),
                          eval_data=Xt)
    assert len(h) == 6
    assert_same_model(resumed, ref)
    assert h.without_times() == h_ref.without_times()
    assert_same_optimizer(tmp_path / "ref", ckdir)


class EpochShuffled:
    """A re-iterable batch stream whose order is a function of the epoch (set_epoch), like a sampler."""

    def __init__(self, X, batch_size, seed):
        self.X, self.bs, self.seed, self.epoch = X, batch_size, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        perm = torch.randperm(len(self.X), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for s in range(0, len(self.X), self.bs):
            yield self.X[perm[s:s + self.bs]]


def test_iterable_data_resumes_mid_epoch(tmp_path):
    X = make_data(0)
    ref = make_sae()
    h_ref = train_pam_sgd(ref, EpochShuffled(X, 50, seed=4), _pam(epochs=3))
    run = make_sae()
    cfg = _pam(epochs=3, checkpoint_dir=str(tmp_path), checkpoint_every_steps=2)
    with pytest.raises(Stop):
        train_pam_sgd(run, EpochShuffled(X, 50, seed=4), cfg, callback=stop_at("step", 1, 4))
    assert latest_checkpoint(tmp_path).name == "ckpt-e000001-b00000004"
    fresh = make_sae(seed=8)
    h = train_pam_sgd(fresh, EpochShuffled(X, 50, seed=4), cfg.replace(resume=True))
    assert_same_model(fresh, ref)
    assert h.without_times() == h_ref.without_times()


# ---------------------------------------------------------------------- one writer per checkpoint_dir
# a run that stops after its first step and waits for a line on stdin, holding its checkpoint_dir
PAUSED_RUN = SETUP + textwrap.dedent("""
    import os, sys
    from splinterp.train import SGDConfig, train_sgd

    def pause(ev):
        if ev.kind == "step" and ev.step == 1:
            print("RUNNING", os.getpid(), flush=True)
            sys.stdin.readline()

    cfg = SGDConfig(epochs=2, batch_size=64, lr=1e-2, progress=False, seed=3, checkpoint_dir=sys.argv[1],
                    checkpoint_every_steps=1)
    train_sgd(make_sae(), make_data(0), cfg, callback=pause)
    print("FINISHED", flush=True)
""")


def test_a_second_run_into_a_live_checkpoint_dir_is_refused_before_training(tmp_path):
    ckdir = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(ckdir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()
        assert line[:1] == ["RUNNING"], proc.stderr.read()[-3000:]
        steps = []
        second = make_sae(seed=5)
        before = {n: p.detach().clone() for n, p in second.named_parameters()}
        with pytest.raises(sp.errors.FolderInUseError) as e:
            train_sgd(second, make_data(0), _sgd(epochs=2, checkpoint_dir=str(ckdir), checkpoint_every_steps=1),
                      callback=steps.append)
        assert str(ckdir) in str(e.value) and f"pid {line[1]}" in str(e.value) and "checkpoint_dir" in str(e.value)
        assert steps == []  # refused before the first step
        assert all(torch.equal(p, before[n]) for n, p in second.named_parameters())
        out, err = proc.communicate("go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "FINISHED" in out, err[-3000:]
    # the first run's checkpoints are whole; a run after it may resume from them
    assert latest_checkpoint(ckdir).name == "ckpt-e000002-b00000000"
    h = train_sgd(make_sae(seed=6), make_data(0), _sgd(epochs=3, checkpoint_dir=str(ckdir), resume=True))
    assert len(h) == 3


def test_save_checkpoint_never_deletes_a_live_writers_temporary_folder(tmp_path):
    """The clean-up of leftovers (`.ckpt-*.tmp`) is what destroyed the other run's checkpoint mid-write."""
    from splinterp.train.checkpoint import save_checkpoint

    ckdir = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys
        from pathlib import Path
        from splinterp.train.checkpoint import hold_checkpoint_dir
        with hold_checkpoint_dir(sys.argv[1]):
            live = Path(sys.argv[1]) / ".ckpt-e000001-b00000000.abcd.tmp"   # a checkpoint being written
            live.mkdir()
            (live / "trainer_state.pt").write_bytes(b"half")
            print("WRITING", flush=True)
            sys.stdin.readline()
    """), str(ckdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()[-3000:]
        state = {"epoch": 1, "batch": 0, "step": 4}
        with pytest.raises(sp.errors.FolderInUseError, match="checkpoint_dir"):
            save_checkpoint(ckdir, make_sae(), {"x": torch.zeros(1)}, state)
        assert (ckdir / ".ckpt-e000001-b00000000.abcd.tmp" / "trainer_state.pt").read_bytes() == b"half"
        assert list_checkpoints(ckdir) == []
        proc.communicate("done\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the writer is gone (its leftover is junk now): the next save cleans it up and succeeds
    path = save_checkpoint(ckdir, make_sae(), {"x": torch.zeros(1)}, {"epoch": 1, "batch": 0, "step": 4})
    assert sorted(p.name for p in ckdir.iterdir()) == ["ckpt-e000001-b00000000", "latest.json"]
    assert torch.equal(torch.load(path / "trainer_state.pt", weights_only=True)["x"], torch.zeros(1))


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_training(tmp_path):
    f = tmp_path / "ck"
    f.write_text("my notes")
    steps = []
    with pytest.raises(sp.errors.OverwriteError, match=r"checkpoint_dir .*ck is a file"):
        train_sgd(make_sae(), make_data(0), _sgd(epochs=2, checkpoint_dir=str(f)), callback=steps.append)
    assert steps == [] and f.read_text() == "my notes"
    below = tmp_path / "ck" / "sub"  # a path through a file
    with pytest.raises(sp.errors.OverwriteError, match="checkpoint_dir"):
        train_sgd(make_sae(), make_data(0), _sgd(epochs=2, checkpoint_dir=str(below)), callback=steps.append)
    assert steps == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_an_unwritable_checkpoint_dir_is_refused_before_training(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    steps = []
    try:
        with pytest.raises(sp.errors.NotWritableError, match="checkpoint_dir"):
            train_sgd(make_sae(), make_data(0), _sgd(epochs=2, checkpoint_dir=str(ro)), callback=steps.append)
        with pytest.raises(sp.errors.NotWritableError, match="checkpoint_dir"):
            train_sgd(make_sae(), make_data(0), _sgd(epochs=2, checkpoint_dir=str(ro / "new")), callback=steps.append)
    finally:
        ro.chmod(0o700)
    assert steps == []


def test_the_lock_is_released_when_a_run_fails(tmp_path):
    with pytest.raises(Stop):
        train_sgd(make_sae(), make_data(0), _sgd(epochs=3, checkpoint_dir=str(tmp_path)), callback=stop_at("epoch", 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-e000001-b00000000", "latest.json"]  # no lock left
    h = train_sgd(make_sae(), make_data(0), _sgd(epochs=3, checkpoint_dir=str(tmp_path), resume=True))
    assert len(h) == 3


def test_missing_and_hostile_checkpoint_files_are_named(tmp_path):
    X = make_data(0)
    with pytest.raises(sp.errors.PathNotFoundError, match="no training checkpoint at .*nothing.*resume_from"):
        train_sgd(make_sae(), X, _sgd(epochs=1, resume_from=str(tmp_path / "nothing")))
    train_sgd(make_sae(), X, _sgd(epochs=1, checkpoint_dir=str(tmp_path)))
    (tmp_path / "latest.json").write_text("[" * 100_000)  # unreadable pointer: the newest folder is used
    h = train_sgd(make_sae(), X, _sgd(epochs=2, checkpoint_dir=str(tmp_path), resume=True))
    assert len(h) == 2
    (latest_checkpoint(tmp_path) / "state.json").write_text("[" * 100_000)  # was a RecursionError
    with pytest.raises(CorruptFileError, match="state.json is not valid JSON: nested too deeply"):
        train_sgd(make_sae(), X, _sgd(epochs=3, checkpoint_dir=str(tmp_path), resume=True))
