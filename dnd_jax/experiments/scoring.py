"""Scoring adapters of a held-out task on its scored items; every score file stores the settings it was
made under, and a file made under other settings counts as not done (it is re-scored)."""

from __future__ import annotations

import json
from pathlib import Path

from dnd_jax.data.bigbench import record_format
from dnd_jax.errors import DndError
from dnd_jax.experiments.baselines import last_checkpoint_in
from dnd_jax.experiments.folds import scored_records
from dnd_jax.fileio import write_json

# The answer format each secondary protocol reads: "ll" and "gen" score lettered options, "em" compares free text
# with a generative task's targets (on a multiple-choice task it would only ask for "[C]" verbatim).
FORMATS = {"ll": "multiple_choice", "gen": "multiple_choice", "em": "generative"}


def secondary_protocols(protocols, records: list[dict]) -> tuple[str, ...]:
    """The protocols of `protocols` that read the answer format of a task's records (one format per task)."""
    return tuple(p for p in protocols if records and FORMATS[p] == record_format(records[0]))


def score_adapter(scorer, path: Path | None, records: list[dict], c, secondary: bool = True) -> dict:
    """Primary (nll, with the answer-only nll) on `records` (the scored items), the secondary protocols that read
    the task's answer format on the first secondary_limit (every row but the sampled training LoRAs, whose row is
    the primary metric's only)."""
    e = c.experiment
    out = scorer.score(path, records, ("nll",))
    protocols = secondary_protocols(e.secondary, records[: e.secondary_limit]) if secondary else ()
    if protocols:
        out.update(scorer.score(path, records[: e.secondary_limit], protocols))
    return out


def shared_settings(c, plan: dict) -> dict:
    """What the shared rows of a task's scores depend on besides the adapters."""
    e = c.experiment
    return {"limit": e.limit, "secondary": list(e.secondary), "secondary_limit": e.secondary_limit,
            "exclude": list(plan.get("exclude", [])), "training": list(plan["training"]),
            "retrieval": plan["retrieval"], "control": plan["control"]}  # fmt: skip


def variant_settings(c, seeds: list) -> dict:
    """What a variant's scores of a task depend on: the shared settings' evaluation fields, and generation."""
    e = c.experiment
    return {"limit": e.limit, "secondary": list(e.secondary), "secondary_limit": e.secondary_limit,
            "num_adapters": e.num_adapters, "seeds": [str(s) for s in seeds], "steps": c.train.steps,
            "condition": c.data.get("condition", "prompts"),
            **({"prompt_swap": True} if e.get("prompt_swap", False) else {})}  # fmt: skip


def up_to_date(path: Path, settings: dict) -> bool:
    """Whether a score file exists and was made under `settings`."""
    if not path.is_file():
        return False
    return json.loads(path.read_text()).get("settings") == settings


def score_shared(scorer, c, task: str, plan: dict, dest: Path) -> None:
    """Base, own LoRA, control, retrieval and sampled training LoRAs of one held-out task -> dest (atomic)."""
    recs = scored_records(c, task, plan)
    root = Path(c.data.collection_dir)
    res = {"task": task, "fold": plan["fold"], "items": len(recs), "settings": shared_settings(c, plan),
           "base": score_adapter(scorer, None, recs, c),
           "own": score_adapter(scorer, last_checkpoint_in(root, task), recs, c),
           "control": score_adapter(scorer, Path(plan["control"]), recs, c),
           "retrieval": {"task": plan["retrieval"], "similarity": plan["similarity"],
                         **score_adapter(scorer, last_checkpoint_in(root, plan["retrieval"]), recs, c)},
           "training": [{"task": t, **score_adapter(scorer, last_checkpoint_in(root, t), recs, c, secondary=False)}
                        for t in plan["training"]]}  # fmt: skip
    write_json(dest, res)


def score_generated(scorer, c, task: str, plan: dict, adapters: dict[str, list[Path]], dest: Path,
                    settings: dict, extra: dict | None = None, swapped: dict | None = None) -> None:  # fmt: skip
    """Scores a variant's adapters of one task, per generator seed ({seed: [adapter dirs]}), and `extra`
    {row: adapter dir} -> dest {"task", "items", "settings", "generated": {seed: [scores]}, row: scores}."""
    recs = scored_records(c, task, plan)
    if not adapters or not all(adapters.values()):
        raise DndError(f"{dest}: no generated adapters for {task}")
    res = {
        "task": task,
        "items": len(recs),
        "settings": settings,
        "generated": {s: [score_adapter(scorer, a, recs, c) for a in paths] for s, paths in adapters.items()},
    }
    res.update({row: score_adapter(scorer, a, recs, c) for row, a in (extra or {}).items()})
    if swapped:  # adapters from another held-out task's prompts (prompt swap), primary metric only
        res["swapped"] = {s: [score_adapter(scorer, a, recs, c, secondary=False) for a in paths]
                          for s, paths in swapped.items()}  # fmt: skip
    write_json(dest, res)
