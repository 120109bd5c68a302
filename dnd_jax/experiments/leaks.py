"""Test-data leaks: exact overlap of normalised prompts between a task's test items and any train split.

A held-out task's scored items must never reach its fold's training data. Two ways they can:
  - within a task: a test item whose prompt is also in the task's own train split (its LoRA, the few-shot
    baselines and answer-reading conditions learn it);
  - across tasks: a test item of task X whose prompt is in task Y's train split (Y's LoRA learns it; when Y
    trains X's generator, is X's retrieval pick, or part of its control, the item leaks).
`check` finds both. Within a task, the overlapping (and repeated) test items are dropped from scoring.
Across tasks, the two tasks are kept in one fold, so neither is ever part of the other's training data
(generator, control, retrieval, training LoRAs) and the shared items stay scored (dropping them too would
leave social_iqa 15 of its 32 items for no gain); `audit` verifies that no scored item reaches a fold's
training data.
Normalisation: Unicode NFKC, case-folded, every run of whitespace a single space, trimmed. Punctuation is
kept: in some tasks it is the content (cs_algorithms/valid_parentheses: stripping it made every prompt
"a valid b invalid" and dropped all of its test items as copies).
"""

from __future__ import annotations

from pathlib import Path

from dnd_jax.data.prompts import normalize_prompt
from dnd_jax.errors import DndError

normalize = normalize_prompt  # NFKC, case-folded, whitespace runs as one space, trimmed (dnd_jax/data/prompts.py)


def split_prompts(prompts_dir: str | Path, names: list[str], split: str) -> dict[str, list[str]]:
    """{task: normalised prompts of its `split`, in file order}."""
    from dnd_jax.data.prompts import load_split

    return {n: [normalize(r["prompt"]) for r in load_split(prompts_dir, f"{n}_{split}", False)] for n in names}


def check(train: dict[str, list[str]], test: dict[str, list[str]]) -> dict:
    """Every overlap of a test item with a train split, and repeated test items.

    Args:
      train: {task: normalised train prompts}.
      test: {task: normalised test prompts}, tasks a subset of `train`'s.

    Returns:
      {"within": {task: [test indices also in its own train split]},
       "repeated": {task: [test indices repeating an earlier test item]},
       "cross": [{"test_task", "train_task", "items": [test indices]}] (sorted),
       "exclude": {task: sorted test indices dropped from scoring: within-task overlaps and repeats},
       "linked": [[tasks]]: connected groups of tasks with a cross overlap (either direction)}.
    """
    owners: dict[str, set[str]] = {}
    for t, prompts in train.items():
        for p in prompts:
            owners.setdefault(p, set()).add(t)
    within, repeated, cross, exclude = {}, {}, {}, {}
    for x, prompts in test.items():
        seen: set[str] = set()
        for i, p in enumerate(prompts):
            if p in seen:
                repeated.setdefault(x, []).append(i)
            seen.add(p)
            for y in sorted(owners.get(p, ())):
                if y == x:
                    within.setdefault(x, []).append(i)
                else:
                    cross.setdefault((x, y), []).append(i)
    for x in test:
        drop = set(within.get(x, ())) | set(repeated.get(x, ()))
        if drop:
            exclude[x] = sorted(drop)
    pairs = [[x, y] for x, y in sorted(cross)]
    return {"within": within, "repeated": repeated,
            "cross": [{"test_task": x, "train_task": y, "items": cross[(x, y)]} for x, y in sorted(cross)],
            "exclude": exclude, "linked": components(list(train), pairs)}  # fmt: skip


def components(names: list[str], links: list[list[str]]) -> list[list[str]]:
    """Connected groups (of two or more) of `names` under `links` (lists of tasks that belong together),
    each in the order of `names`, groups ordered by their first task."""
    parent = {n: n for n in names}

    def root(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for group in links:
        group = [t for t in group if t in parent]
        for t in group[1:]:
            parent[root(t)] = root(group[0])
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(root(n), []).append(n)
    return [g for g in out.values() if len(g) > 1]


def scored_indices(num_items: int, exclude: list[int], limit: int) -> list[int]:
    """The first `limit` test indices that survive the leak check (the items every row is scored on)."""
    drop = set(exclude)
    return [i for i in range(num_items) if i not in drop][:limit]


def audit(folds: list[dict], train: dict[str, list[str]], scored: dict[str, list[str]]) -> None:
    """Raises if a scored item of a held-out task is in the train split of a task its fold trains on, or of
    the task itself (the few-shot LoRAs and answer-reading conditions read the held-out task's train split).

    Args:
      folds: [{"heldout": [...], "train": [...]}].
      train: {task: normalised train prompts}.
      scored: {task: normalised prompts of its scored items}.
    """
    for f in folds:
        seen = {p for t in f["train"] for p in train[t]}
        for x in f["heldout"]:
            bad = (set(scored[x]) & seen) | (set(scored[x]) & set(train[x]))
            if bad:
                raise DndError(f"leak check: {len(bad)} scored item(s) of held-out task {x!r} are in its fold's "
                               f"training data (e.g. {sorted(bad)[0][:60]!r})")  # fmt: skip
