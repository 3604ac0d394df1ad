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


# ------------------------------------------------------------------------------------ one writer per folder
HOLDER = """
    import os, sys
    from splinterp.atomic import hold_folder, hold_output
    hold = hold_output if sys.argv[2] == "output" else hold_folder
    lock = hold(sys.argv[1], name="--out", purpose="the test's holder")
    print("HOLDING", os.getpid(), flush=True)
    sys.stdin.readline()
    lock.release()
    print("RELEASED", flush=True)
"""


def hold_in_child(path: Path, kind: str = "folder") -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLDER), str(path), kind], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    words = proc.stdout.readline().split()
    if words[:1] != ["HOLDING"]:
        proc.kill()
        raise AssertionError(f"child said {words}, stderr: {proc.stderr.read()[-2000:]}")
    return proc, int(words[1])


@pytest.mark.parametrize("kind", ["folder", "output"])
def test_a_second_writer_is_refused_with_the_holders_pid_until_the_holder_ends(tmp_path, kind):
    hold = atomic.hold_folder if kind == "folder" else atomic.hold_output
    target = tmp_path / "runs" / "out"
    proc, pid = hold_in_child(target, kind)
    try:
        with pytest.raises(sp.errors.FolderInUseError) as e:
            hold(target, name="--out", purpose="a second run")
        msg = str(e.value)
        assert f"--out {target} is in use" in msg and f"pid {pid} on " in msg and "the test's holder" in msg
        # released by the holder: free again, and the lock file is gone with it
        proc.stdin.write("release\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "RELEASED"
        with hold(target, name="--out"):
            pass
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [p.name for p in tmp_path.rglob("*")] == ["runs", "out"] if kind == "folder" else ["runs"]


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    proc, _ = hold_in_child(tmp_path / "out")
    kill(proc)
    with atomic.hold_folder(tmp_path / "out") as lock:  # the kernel dropped the lock with the process
        assert (tmp_path / "out" / atomic.LOCK_FILE).exists()
        assert json.loads((tmp_path / "out" / atomic.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "released" in repr(lock) and not (tmp_path / "out" / atomic.LOCK_FILE).exists()


def test_the_lock_is_reentrant_in_one_thread_and_refuses_other_threads(tmp_path):
    import threading

    outer = atomic.hold_folder(tmp_path, name="checkpoint_dir")
    with atomic.hold_folder(tmp_path):  # the run holds it; save_checkpoint takes it again
        pass
    assert (tmp_path / atomic.LOCK_FILE).exists()  # still held by `outer`
    seen = []

    def other():
        try:
            atomic.hold_folder(tmp_path, name="checkpoint_dir").release()
            seen.append("acquired")
        except sp.errors.FolderInUseError as e:
            seen.append(str(e))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(seen) == 1 and "another thread of this process" in seen[0] and "checkpoint_dir" in seen[0]
    outer.release()
    outer.release()  # twice is harmless
    assert not (tmp_path / atomic.LOCK_FILE).exists()
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen[1] == "acquired"


def test_hold_output_survives_the_folder_being_swapped(tmp_path):
    """An SAE folder is replaced whole (atomic_dir): its lock must live outside it."""
    out = tmp_path / "sae"
    with atomic.hold_output(out, name="--out"):
        sp.save(sp.make_sae(4, 8, "relu"), out)
        sp.save(sp.make_sae(4, 8, "relu", seed=1), out)  # swapped in whole
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import sys
            from splinterp.atomic import hold_output
            from splinterp.errors import FolderInUseError
            try:
                hold_output(sys.argv[1])
            except FolderInUseError:
                print("REFUSED")
        """), str(out)], capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip() == "REFUSED", proc.stderr[-2000:]
    assert visible(tmp_path) == ["sae"] and not [p for p in tmp_path.iterdir() if p.name.endswith(".lock")]


def test_files_in_the_way_and_unwritable_places_are_refused(tmp_path, monkeypatch):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    with pytest.raises(sp.errors.OverwriteError, match=r"--out .*notes.txt is a file"):
        atomic.hold_folder(f, name="--out")
    with pytest.raises(sp.errors.OverwriteError, match="a part of this path is a file"):
        atomic.hold_folder(f / "sub", name="--out")
    with pytest.raises(sp.errors.OverwriteError, match="notes.txt is a file"):
        atomic.hold_output(f / "sae", name="--out")
    assert f.read_text() == "x"

    real_open = os.open

    def read_only_fs(path, flags, *a):
        if str(path).endswith(".lock"):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", read_only_fs)
    with pytest.raises(sp.errors.NotWritableError, match=r"--out .* cannot be written \(Read-only file system\)"):
        atomic.hold_folder(tmp_path / "new", name="--out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(sp.errors.NotWritableError, match="Permission denied"):
            atomic.hold_folder(ro)
        with pytest.raises(sp.errors.NotWritableError, match="Permission denied"):
            atomic.hold_folder(ro / "new")
    finally:
        ro.chmod(0o700)


def test_mutual_exclusion_under_contention(tmp_path):
    """Four processes grab and release one folder's lock in a tight loop; never two holders at once.

    Exercises the release protocol (the lock file is removed at release, so a process can lock a file that
    has just been unlinked; it must notice and retry instead of holding an orphan lock).
    """
    code = """
        import os, sys, time
        from pathlib import Path
        from splinterp.atomic import hold_folder
        from splinterp.errors import FolderInUseError
        folder = Path(sys.argv[1]); got = clash = 0
        end = time.time() + 2
        while time.time() < end:
            try:
                lock = hold_folder(folder)
            except FolderInUseError:
                continue
            marker = folder / "inside"
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)   # fails if another holder is inside
                os.close(fd)
            except FileExistsError:
                clash += 1
            else:
                got += 1
                os.unlink(marker)
            lock.release()
        print(got, clash)
    """
    procs = [spawn(code, str(tmp_path)) for _ in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(tuple(map(int, out.split())))
    assert sum(c for _, c in results) == 0, results
    assert sum(g for g, _ in results) > 20, results  # the locks really changed hands
