"""Training metrics: TensorBoard event files and metrics.jsonl in the workdir, resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

from dnd_jax.fileio import atomic_file


def _logged_step(line: str, start: int) -> int | None:
    """The step of a metrics.jsonl row to keep on resuming from `start` (rows up to it; none when starting
    over), None for a row to drop (later, or a partial line left by a kill)."""
    try:
        step = int(json.loads(line)["step"]) if line.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None
    return step if step is not None and 0 < start and step <= start else None


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch where it is installed only
    to accept torch tensors (this writer passes floats), which cost a training process 1.2 s and ~200 MB."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX's own fallback
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter


class Writer:
    """TensorBoard event files plus metrics.jsonl in the workdir, written by process 0 only.

    Events are written with tensorboardX (no PyTorch or TensorFlow in the training process); the
    files are ordinary TensorBoard event files (`tensorboard --logdir <workdir>/tensorboard`).
    """

    def __init__(self, workdir: Path, start: int = 0):
        """`start`: the step training resumes from; rows logged after it by a killed run are dropped (from
        metrics.jsonl, and hidden in TensorBoard by a purge marker), so the logs read as one run."""
        self.active = jax.process_index() == 0
        self.tb = None
        if not self.active:
            return
        try:
            SummaryWriter = _summary_writer()
            self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=start + 1 if start else None)
        except ImportError:
            print("warning: tensorboardX is not installed; metrics go to metrics.jsonl only", file=sys.stderr)
        path = workdir / "metrics.jsonl"
        if path.is_file():
            keep = [ln for ln in path.read_text().splitlines(keepends=True) if _logged_step(ln, start) is not None]
            with atomic_file(path, "w") as f:
                f.writelines(keep)
        self.jsonl = path.open("a")

    def write(self, step: int, metrics: dict) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.active:
            if self.tb is not None:
                self.tb.close()
            self.jsonl.close()


def to_host(tree):
    """Fetches a tree of replicated arrays; in a multi-process run each process reads its own copy."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(get, tree)
