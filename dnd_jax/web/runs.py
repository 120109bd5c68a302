"""What a served workdir holds: its generator runs, and the report numbers that say how much they are worth.

A *run* is a training workdir (`python -m dnd_jax.train`: config.json + checkpoints/). The served directory may be
one run, the demo's pipeline workdir (its run is `train/`), or a many-task experiment (a run per variant, fold and
seed); every run below it is listed, runs without a generator included, so the page can say why one cannot be used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from dnd_jax.errors import DndError

MAX_DEPTH = 6  # <workdir>/cv-*/<variant>/fold-k/seed-s/train is 5 below the experiment's workdir


@dataclass(frozen=True)
class Run:
    """One training workdir below the served directory."""

    path: Path
    label: str  # path relative to the served directory ("." for itself)
    objective: str  # train.objective: recon, sft, sft+recon or mt_lora
    has_checkpoint: bool
    config: dict = field(compare=False, repr=False)  # its config.json, as read when the runs were listed

    def problem(self) -> str | None:
        """Why this run cannot make adapters from prompts, or None."""
        if self.objective == "mt_lora":
            return (f"run {self.label} is mt_lora: one prompt-blind multi-task LoRA (its adapter is "
                    f"{self.label}/adapter), not a generator; pick a generator run")  # fmt: skip
        if not self.has_checkpoint:
            return f"run {self.label} has no generator checkpoint yet (train it first: python -m dnd_jax.train)"
        return None


def _is_run(d: Path) -> dict | None:
    cfg = d / "config.json"
    if not cfg.is_file():
        return None
    try:
        c = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return c if isinstance(c, dict) and "train" in c and "data" in c and "model" in c else None


def find_runs(root: str | Path) -> list[Run]:
    """Every training workdir at or below `root` (depth <= MAX_DEPTH), sorted by label.

    Raises:
      DndError: `root` is not a directory or holds no training workdir.
    """
    root = Path(root)
    if not root.is_dir():
        raise DndError(f"{root}: no such directory")
    found, frontier = [], [root]
    for _ in range(MAX_DEPTH + 1):
        nxt = []
        for d in frontier:
            c = _is_run(d)
            if c is not None:
                ck = d / "checkpoints"
                has = ck.is_dir() and any(p.name.isdigit() for p in ck.iterdir())
                label = "." if d == root else str(d.relative_to(root))
                found.append(Run(d, label, c["train"].get("objective", "recon"), has, c))
                continue  # a run's own subfolders (checkpoints, tensorboard) hold no runs
            try:
                nxt += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
        frontier = nxt
    if not found:
        raise DndError(f"{root}: no training workdir (config.json + checkpoints/) at or below it; train one with "
                       "python -m dnd_jax.train, or serve the demo's workdir (runs/demo)")  # fmt: skip
    return sorted(found, key=lambda r: r.label)


def default_run(runs: list[Run]) -> Run:
    """The first run that can make adapters (the first run if none can: the page then says why)."""
    return next((r for r in runs if r.problem() is None), runs[0])


_KEEP = re.compile(r"control|generated|base model|own LoRA|retrieval|training LoRA", re.IGNORECASE)


def report_excerpt(run: Path, root: Path, max_rows: int = 12, name: str = "report.md") -> dict | None:
    """The headline numbers of the nearest report (`name`) at or above `run` (not above `root`): the first markdown
    table with a control row and a generated row, cut to its rows that name a baseline or a generated variant.

    Returns:
      {"path", "header": [...], "rows": [[...], ...], "title"} or None when no report has such a table.
    """
    run, root = run.resolve(), root.resolve()
    d = run
    while True:
        rep = d / name
        if rep.is_file():
            found = _table(rep.read_text(errors="replace"), max_rows)
            if found is not None:
                return {"path": str(rep), **found}
        if d == root or d.parent == d or root not in d.parents:
            return None
        d = d.parent


def _table(text: str, max_rows: int) -> dict | None:
    lines, title = text.splitlines(), ""
    i = 0
    while i < len(lines):
        if lines[i].startswith("#"):
            title = lines[i].lstrip("# ").strip()
        if lines[i].startswith("|") and i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-: "):
            j = i + 2
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            rows = [_cells(r) for r in lines[i + 2 : j]]
            names = " ".join(r[0] for r in rows).lower()
            if "control" in names and "generated" in names:
                kept = [r for r in rows if _KEEP.search(r[0])][:max_rows]
                return {"title": title, "header": _cells(lines[i]), "rows": kept}
            i = j
            continue
        i += 1
    return None


def _cells(line: str) -> list[str]:
    return [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]
