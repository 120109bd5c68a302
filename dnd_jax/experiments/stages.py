"""Resumable stages: a workdir's stage times, the "{workdir}" config substitution, finished-work checks."""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

from dnd_jax.fileio import atomic_file


def resolve(config, workdir: Path):
    """A copy of the config with "{workdir}" substituted in every string field."""
    c = copy.deepcopy(config)

    def walk(node):
        for k in list(node.keys()):
            v = node[k]
            if hasattr(v, "keys"):
                walk(v)
            elif isinstance(v, str) and "{workdir}" in v:
                node[k] = v.replace("{workdir}", str(workdir))

    walk(c)
    return c


class Stages:
    """Wall time of each stage, kept in WORKDIR/stages.json across resumed runs."""

    def __init__(self, workdir: Path):
        self.path = workdir / "stages.json"
        self.times = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, fn, done: bool):
        if done:
            print(f"[{name}] up to date", file=sys.stderr)
            return None
        print(f"[{name}] running", file=sys.stderr)
        t0 = time.perf_counter()
        out = fn()
        self.times[name] = round(time.perf_counter() - t0, 1)
        with atomic_file(self.path, "w") as f:
            f.write(json.dumps(self.times, indent=2) + "\n")
        return out


def is_trained(tdir: Path, steps: int) -> bool:
    """Whether a generator workdir holds its final checkpoint (read from the directory: no manager)."""
    from dnd_jax.checkpointing import latest_finished_step

    return latest_finished_step(tdir / "checkpoints") == steps
