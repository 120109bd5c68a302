"""A journal of finished work that survives a kill: a long evaluation resumes where it stopped.

`Journal(path, settings)` is a JSON-lines file beside an output that is written only at the end (atomically): its
first line holds the settings the work is done under, each further line one finished unit (`put(key, value)`),
flushed and fsynced before the next unit starts. A re-run with the same settings reads the finished units back
(`get(key)`) instead of redoing them; with other settings, or an unreadable header, it starts afresh. The file
appears with the first finished unit (work that fails before any leaves nothing behind). A line torn
by a kill mid-write is dropped (that unit is redone). `discard()` removes the file once the output is committed.

Keys name what a unit's result depends on beyond the settings: `content_key(path)` hashes a directory's files
(an adapter regenerated with other weights under the same path is scored again).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dnd_jax.errors import DISK_FULL_ADVICE, DndError, disk_full
from dnd_jax.fileio import atomic_file


def content_key(path: str | os.PathLike) -> str:
    """sha256 over a file's bytes, or over a directory's files (names and bytes, sorted; subdirectories ignored)."""
    p = Path(path)
    h = hashlib.sha256()
    for f in sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class Journal:
    """Finished units of work under `settings` (JSON-able), kept in the JSON-lines file `path`."""

    def __init__(self, path: str | os.PathLike, settings: dict):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))
        self.done: dict[str, object] = {}
        lines = self.path.read_text(errors="replace").splitlines() if self.path.is_file() else []
        entries = [_parse(ln) for ln in lines]
        if entries and entries[0] == {"settings": self.settings}:
            for e in entries[1:]:
                if isinstance(e, dict) and set(e) == {"key", "value"}:
                    self.done[e["key"]] = e["value"]
        if lines:  # rewritten whole (header, readable units): a torn last line never runs into the next one
            self._rewrite()
        self.resumed = len(self.done)

    def _rewrite(self) -> None:
        with atomic_file(self.path, "w") as f:
            f.write(json.dumps({"settings": self.settings}) + "\n")
            f.writelines(json.dumps({"key": k, "value": v}) + "\n" for k, v in self.done.items())

    def get(self, key: str):
        """The unit's recorded value (a fresh copy), or None when it is not finished."""
        return json.loads(json.dumps(self.done[key])) if key in self.done else None

    def put(self, key: str, value) -> None:
        """Records a finished unit (durably, before returning)."""
        self.done[key] = json.loads(json.dumps(value))
        if not self.path.is_file():  # the file appears with the first finished unit
            return self._rewrite()
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "value": self.done[key]}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if disk_full(e):
                raise DndError(f"{self.path}: not written: {DISK_FULL_ADVICE}") from None
            raise

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def _parse(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None
