"""Loss-free file writes: write under a temporary name in the same folder, then rename.

A crash (even SIGKILL or power loss) mid-write leaves the previous version, or nothing, under the final
name, never a half-written file. Temporary names start with a dot and end in `.tmp`, so a crash can leave
a hidden `.NAME.XXXX.tmp` next to the target; `stale_temporaries` lists them for cleaning up.

Folders are swapped in whole with Linux's `renameat2(RENAME_EXCHANGE)` where it exists, so there is no
instant at which the final name is missing; elsewhere the old folder is moved aside first (a crash in that
instant leaves it, intact, under a hidden `.NAME.XXXX.old`).

Atomic writes keep one writer's files whole, but two runs writing into one folder still fight (one run's
clean-up deletes the other's temporaries, results overwrite each other). `hold_folder` / `hold_output` give a
run an exclusive OS lock (`flock`) on what it writes, so a second writer is refused up front with a message
naming the holder's pid. The kernel drops the lock when the holder exits, even by SIGKILL: no stale locks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from splinterp.errors import FolderInUseError, NotWritableError, OverwriteError

try:
    import fcntl
except ImportError:  # Windows: no flock; the locks below become no-ops (with a warning)
    fcntl = None

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_path(path: Path) -> None:
    """Flush a file's or folder's data to disk (folders: the entries). Best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for f in files:
            _fsync_path(Path(root) / f)
        _fsync_path(Path(root))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths. False where the platform or file system cannot."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it onto `path`.

    If the body raises, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fsync_path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """Write JSON atomically. NaN/inf are refused (ValueError) because they are not valid JSON."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Atomically write a file produced by `writer(tmp_path)` (e.g. savefig, safetensors.save_file)."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name, then swap it in whole.

    An existing folder at `path` is replaced only after the new one is complete and flushed to disk.
    If the body raises, the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_tree(tmp)
        if path.exists() or path.is_symlink():
            if _exchange(tmp, path):
                # tmp now holds the previous version
                _fsync_path(path.parent)
                _remove(tmp)
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.rmdir(old)
                os.replace(path, old)
                try:
                    os.replace(tmp, path)
                except BaseException:
                    os.replace(old, path)  # put the previous version back
                    raise
                _fsync_path(path.parent)
                _remove(old)
        else:
            os.replace(tmp, path)
            _fsync_path(path.parent)
    finally:
        _remove(tmp)


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Hidden `.NAME.XXXX.tmp` / `.old` entries left in `folder` by writes that were killed.

    Only delete them when no other process is writing in `folder`: a live write looks the same.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old")))


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks (checksums of SAE weights and cache shards)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ one writer per folder
LOCK_FILE = ".splinterp.lock"
"""Name of the lock file `hold_folder` keeps inside a folder while a run writes there (removed at release)."""

_held: dict[str, list] = {}  # lock file -> [pid, thread id, fd, count] for the locks this process holds
_held_guard = threading.Lock()


class FolderLock:
    """An exclusive lock held for a run; `release()` (or leaving the `with` block) drops it.

    Re-entrant within one thread (a trainer holding its checkpoint_dir can call `save_checkpoint`, which takes
    it again); another thread or process is refused with `FolderInUseError`.
    """

    def __init__(self, target: Path, lock_file: Path | None):
        self.target = target
        self.lock_file = lock_file
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self.lock_file is None:
            return
        key = str(self.lock_file)
        with _held_guard:
            entry = _held.get(key)
            if entry is None or entry[0] != os.getpid():
                return
            entry[3] -= 1
            if entry[3] > 0:
                return
            del _held[key]
            fd = entry[2]
            # unlink while still holding the lock: a process that opened the old file re-checks the inode
            with contextlib.suppress(OSError):
                os.unlink(self.lock_file)
            os.close(fd)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"FolderLock({str(self.target)!r}, {state})"


def _not_writable(name: str, path: Path, e: OSError) -> NotWritableError:
    return NotWritableError(f"{name} {path} cannot be written ({e.strerror or e}); choose a folder you can write to")


def _holder(fd: int) -> str:
    """Who holds the lock, from the line its holder wrote into the lock file (best effort)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return (f"pid {info['pid']} on {info['host']} ({info['purpose']}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info['since']))})")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process whose pid could not be read"


def _acquire(target: Path, lock_file: Path, name: str, purpose: str) -> FolderLock:
    if fcntl is None:
        log.warning("no file locking on this platform: nothing stops two runs from writing into %s", target)
        return FolderLock(target, None)
    key = str(Path(os.path.realpath(lock_file.parent)) / lock_file.name)
    lock = FolderLock(target, Path(key))
    with _held_guard:
        entry = _held.get(key)
        if entry is not None and entry[0] == os.getpid():
            if entry[1] != threading.get_ident():
                raise FolderInUseError(
                    f"{name} {target} is in use by another thread of this process ({purpose}); two writers would "
                    "corrupt it: use another folder")
            entry[3] += 1
            return lock
        while True:
            try:
                fd = os.open(key, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            except OSError as e:
                raise _not_writable(name, target, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                who = _holder(fd)
                os.close(fd)
                raise FolderInUseError(
                    f"{name} {target} is in use by another run: {who}. Two writers would corrupt it; wait for that "
                    "run to finish or choose another folder") from None
            # the previous holder may have removed the file between our open and our flock: then we hold an
            # orphaned inode that nobody else sees, and must try again on the current file
            try:
                same = os.path.samestat(os.stat(key), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose, "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        _held[key] = [os.getpid(), threading.get_ident(), fd, 1]
    return lock


def hold_folder(folder: str | os.PathLike, *, name: str = "folder", purpose: str = "a splinterp run") -> FolderLock:
    """Create `folder` if needed and lock it for this run: a second writer gets `FolderInUseError`.

    For folders whose *contents* a run writes (a checkpoint_dir, `reproduce --out`). Up front it also refuses
    a path that is a file (`OverwriteError`) and a folder that cannot be written (`NotWritableError`), so a
    run fails before it works, not at save time. `name` is the argument's name in messages; `purpose` is what
    a refused second writer is told the holder is doing. The lock file `.splinterp.lock` inside the folder
    is removed at release. Use as a context manager or call `.release()`.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OverwriteError(f"{name} {folder} is a file, not a folder; choose a folder")
    _make_folder(folder, name, folder)
    return _acquire(folder, folder / LOCK_FILE, name, purpose)


def _make_folder(folder: Path, name: str, shown: Path) -> None:
    """Create `folder` (and its parents) for the lock, naming `shown` when a part of the path is a file or the
    location cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OverwriteError(f"{name} {shown}: a part of this path is a file, not a folder") from None
    except OSError as e:
        raise _not_writable(name, folder, e) from None


def hold_output(path: str | os.PathLike, *, name: str = "output", purpose: str = "a splinterp run") -> FolderLock:
    """Lock a file or folder that a run replaces whole (an SAE folder written with `atomic_dir`, a report).

    The lock file sits next to it (`.NAME.splinterp.lock` in the parent, created if needed), since a lock
    inside a folder would be swapped away with the folder. Refuses an unwritable parent up front.
    """
    path = Path(path)
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OverwriteError(f"{name} {path}: {parent} is a file, not a folder")
    _make_folder(parent, name, path)
    return _acquire(path, parent / f".{path.name}.splinterp.lock", name, purpose)
