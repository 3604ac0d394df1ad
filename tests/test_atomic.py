"""Atomic writes: a process killed (SIGKILL) mid-write leaves the previous version intact and nothing partial
under the final name; a failing write leaves no trace."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import splinterp as sp
from splinterp import atomic
from splinterp.atomic import atomic_dir, atomic_path, stale_temporaries, write_json, write_text, write_with

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL semantics are POSIX")

BIG = dict(d_in=256, d_sae=8192, architecture="topk", k=32)  # two 8 MiB matrices: a 16 MiB weights file


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_line(proc: subprocess.Popen, expected: str) -> None:
    line = proc.stdout.readline()
    if line.strip() != expected:
        proc.kill()
        raise AssertionError(f"child said {line!r}, stderr: {proc.stderr.read()[-2000:]}")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# ------------------------------------------------------------------------------------ killed mid-write
def test_killed_mid_file_write_keeps_the_previous_version(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"version": 1})
    proc = spawn(
        """
        import sys, time
        from splinterp.atomic import write_with

        def writer(tmp):
            with open(tmp, "wb") as f:
                f.write(b'{"version": 2, "payload": "' + b"x" * (8 << 20))
                f.flush()
                print("halfway", flush=True)
                time.sleep(120)

        write_with(sys.argv[1], writer)
        """,
        str(target),
    )
    wait_for_line(proc, "halfway")
    kill(proc)
    assert json.loads(target.read_text()) == {"version": 1}
    assert visible(tmp_path) == ["results.json"]
    leftovers = stale_temporaries(tmp_path)
    assert len(leftovers) == 1 and leftovers[0].stat().st_size >= 8 << 20  # the partial write, hidden


def test_killed_mid_folder_write_keeps_the_previous_sae(tmp_path):
    folder = tmp_path / "sae"
    old = sp.SAE(sp.SAEConfig(d_in=8, d_sae=16, architecture="relu", seed=1))
    sp.save(old, folder)
    proc = spawn(
        """
        import sys, time
        from splinterp.atomic import atomic_dir

        with atomic_dir(sys.argv[1]) as tmp:
            (tmp / "cfg.json").write_text("{}")
            with open(tmp / "sae_weights.safetensors", "wb") as f:
                f.write(b"\\0" * (8 << 20))
                f.flush()
                print("halfway", flush=True)
                time.sleep(120)
        """,
        str(folder),
    )
    wait_for_line(proc, "halfway")
    kill(proc)
    assert visible(tmp_path) == ["sae"]
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert torch.equal(sp.load(folder).W_enc, old.W_enc)


SAVE_LOOP = """
import sys, torch
import splinterp as sp

cfg = sp.SAEConfig(**{cfg})
saes = [sp.SAE(cfg.replace(seed=s)) for s in (1, 2)]
print("ready", flush=True)
i = 0
while True:
    sp.save(saes[i % 2], sys.argv[1])
    i += 1
"""


def _kill_during_save(tmp_path: Path, n_kills: int, rng: random.Random) -> None:
    folder = tmp_path / "sae"
    cfg = sp.SAEConfig(**BIG)
    versions = [sp.SAE(cfg.replace(seed=s)).W_enc for s in (1, 2)]
    sp.save(sp.SAE(cfg.replace(seed=1)), folder)
    for _ in range(n_kills):
        proc = spawn(SAVE_LOOP.replace("{cfg}", repr(BIG)), str(folder))
        wait_for_line(proc, "ready")
        # kill while a temporary folder exists (mid-write), or at a random moment if we never catch one
        deadline = time.monotonic() + rng.uniform(0.5, 3.0)
        while time.monotonic() < deadline and not any(p.suffix == ".tmp" for p in tmp_path.iterdir()):
            time.sleep(0.001)
        kill(proc)
        assert visible(tmp_path) == ["sae"]
        assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
        got = sp.load(folder).W_enc  # checksum-verified: a mixed or partial folder would fail here
        assert any(torch.equal(got, v) for v in versions)
        for p in stale_temporaries(tmp_path):  # what a killed save leaves, hidden; safe to clear now
            atomic._remove(p)


def test_killed_during_save_of_a_large_sae_leaves_a_whole_sae(tmp_path):
    _kill_during_save(tmp_path, 1, random.Random(0))


@pytest.mark.slow
def test_killed_during_save_many_times(tmp_path):
    _kill_during_save(tmp_path, 6, random.Random(1))


def test_killed_during_json_rewrites_always_leaves_valid_json(tmp_path):
    target = tmp_path / "history.json"
    write_json(target, {"step": -1, "loss": [0.0] * 10})
    proc = spawn(
        """
        import sys
        from splinterp.atomic import write_json

        print("ready", flush=True)
        step = 0
        while True:
            write_json(sys.argv[1], {"step": step, "loss": [float(step)] * 200000})
            step += 1
        """,
        str(target),
    )
    wait_for_line(proc, "ready")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline and not stale_temporaries(tmp_path):
        time.sleep(0.001)
    kill(proc)
    d = json.loads(target.read_text())
    assert d["loss"] == [0.0] * 10 or d["loss"] == [float(d["step"])] * 200000
    assert visible(tmp_path) == ["history.json"]


# ------------------------------------------------------------------------------------ failures in-process
def test_failing_writer_leaves_no_trace(tmp_path):
    target = tmp_path / "a.txt"
    write_text(target, "old")

    def boom(tmp: Path) -> None:
        tmp.write_text("partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_with(target, boom)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]

    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("partial")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_replaces_folders_and_files(tmp_path, monkeypatch, exchange):
    if not exchange:  # the portable path: move the old folder aside, then rename
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    for target_is_file in (False, True):
        target = tmp_path / f"t{target_is_file}"
        if target_is_file:
            target.write_text("a file")
        else:
            target.mkdir()
            (target / "old.txt").write_text("old")
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("new")
        assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert stale_temporaries(tmp_path) == []


def test_atomic_files_get_normal_permissions(tmp_path):
    write_text(tmp_path / "a", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~mask
    with atomic_path(tmp_path / "sub" / "b") as tmp:  # parents are created
        tmp.write_text("y")
    assert (tmp_path / "sub" / "b").read_text() == "y"


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "a.json", {"loss": float("nan")})
    assert not (tmp_path / "a.json").exists()
    assert stale_temporaries(tmp_path) == []
