"""Loss-free file writes: write under a temporary name in the same folder, then rename.

A crash (even SIGKILL or power loss) mid-write leaves the previous version, or nothing, under the final
name, never a half-written file. Temporary names start with a dot and end in `.tmp`, so a crash can leave
a hidden `.NAME.XXXX.tmp` next to the target; `stale_temporaries` lists them for cleaning up.

Folders are swapped in whole with Linux's `renameat2(RENAME_EXCHANGE)` where it exists, so there is no
instant at which the final name is missing; elsewhere the old folder is moved aside first (a crash in that
instant leaves it, intact, under a hidden `.NAME.XXXX.old`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

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
