"""Atomic file and directory writes: write to a temporary name beside the target, then rename.

A crash or an error while writing leaves the target either absent or in its previous state,
never half-written; a write that fails for want of space is a one-line DndError naming the target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dnd_jax.errors import DISK_FULL_ADVICE, DndError, disk_full


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Opens a temporary file beside `path`; on success renames it onto `path`.

    Args:
      path: final file path.
      mode: open mode ("wb" or "w").

    Yields:
      The open file object.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if disk_full(e):
            raise DndError(f"{path}: not written: {DISK_FULL_ADVICE}") from None
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory beside `path`; on success it replaces `path`.

    Args:
      path: final directory path.
      overwrite: replace an existing directory; otherwise an existing `path` is an error.

    Yields:
      The temporary directory to fill.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise DndError(f"{path}: output already exists (pass --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise DndError(f"{path}: not written: {DISK_FULL_ADVICE}") from None
        raise


@contextlib.contextmanager
def workdir_lock(directory: str | os.PathLike, command: str) -> Iterator[None]:
    """Holds `<directory>/.lock` for the duration: one writer per output directory.

    A second process that tries gets a one-line error naming the holder's pid. The lock is an
    flock on the open file, so the kernel drops it when the holder dies: a stale lock file left by a
    killed process does not block the resume.
    """
    import fcntl

    path = Path(directory) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise DndError(f"{directory}: in use by another {holder} (wait for it to finish, or use another "
                       "output directory)") from None  # fmt: skip
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{command} process, pid {os.getpid()}")
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes `obj` as indented JSON to `path` atomically, making its parent directory."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=1)
