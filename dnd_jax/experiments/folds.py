"""Folds over tasks, leak-free: tasks that share items stay in one fold, scored items never reach training.

`prepare_folds` builds WORKDIR/cv-*/folds.json once: the leak check over every pair of tasks
(experiments/leaks.py), the folds (linked tasks kept together), and per fold the prompt-blind control and
per held-out task its retrieval pick, training-LoRA sample and the test items it drops from scoring.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dnd_jax.errors import DndError
from dnd_jax.experiments import leaks


def families(c) -> dict[str, str]:
    """{task: family} from config experiment.families."""
    return family_map(c.experiment.families)


def family_map(items) -> dict[str, str]:
    """{task: family} from "task=family" strings, tasks named as in the data (BIG-bench "a/b" is task "a-b")."""
    from dnd_jax.data.bigbench import task_name

    out = {}
    for item in items:
        task, sep, fam = item.partition("=")
        if not sep:
            raise DndError(f"config field experiment.families: {item!r} is not 'task=family'")
        out[task_name(task)] = fam
    return out


def declared_links(c) -> list[list[str]]:
    """experiment.linked: comma-separated groups of near-copy tasks always kept in one fold."""
    from dnd_jax.data.bigbench import task_name

    return [[task_name(t.strip()) for t in g.split(",")] for g in c.experiment.get("linked", ())]


def assign_folds(names: list[str], k: int, seed: int, split: str = "random",
                 family: dict[str, str] | None = None, linked: list[list[str]] = ()) -> list[list[str]]:  # fmt: skip
    """K folds over tasks: every task in exactly one fold, each group of `linked` tasks in one fold.

    "random": the units (linked groups, single tasks otherwise) in a seeded random order, largest first,
    each into the currently smallest fold (with no links: fold sizes differ by at most one). "family": whole
    families (merged where linked) per fold, largest family first into the smallest fold.

    Args:
      names: the tasks.
      k: number of folds.
      seed: seed of the assignment.
      split: "random" or "family".
      family: {task: family} for split "family" (a task without one is its own family).
      linked: groups of tasks that must share a fold (overlapping items, near-copies).

    Returns:
      k lists of tasks, each in the order of `names`.
    """
    if not 2 <= k <= len(names):
        raise DndError(f"config field experiment.folds: {k} folds need 2..{len(names)} tasks per fold count")
    if split not in ("random", "family"):
        raise DndError(f"config field experiment.split: {split!r} (expected 'random' or 'family')")
    rng = np.random.default_rng([seed, 17])
    links = [list(g) for g in linked]
    if split == "family":
        by_fam: dict[str, list[str]] = {}
        for n in names:
            by_fam.setdefault((family or {}).get(n, n), []).append(n)
        links += list(by_fam.values())
    groups = leaks.components(names, links)
    grouped = {t for g in groups for t in g}
    units = groups + [[n] for n in names if n not in grouped]
    units.sort(key=lambda u: names.index(u[0]))
    if split == "random":
        perm = rng.permutation(len(units))
        order = sorted(range(len(units)), key=lambda p: -len(units[perm[p]]))  # stable: random within a size
        units = [units[perm[p]] for p in order]
    else:
        units = sorted(units, key=lambda u: (-len(u), rng.random()))
    if len(units) < k:
        raise DndError(f"config experiment: {len(units)} groups of linked tasks, too few for {k} folds")
    sizes, fold_of = [0] * k, {}
    for u in units:
        f = int(np.argmin(sizes))
        sizes[f] += len(u)
        fold_of.update({n: f for n in u})
    return [[n for n in names if fold_of[n] == f] for f in range(k)]


def training_sample(c, heldout: str, train_tasks: list[str]) -> list[str]:
    """A seeded sample of the fold's training tasks, fixed per held-out task."""
    k = min(c.experiment.training_sample, len(train_tasks))
    rng = np.random.default_rng([c.seed, 23, sum(heldout.encode())])
    return [train_tasks[i] for i in sorted(rng.choice(len(train_tasks), size=k, replace=False))]


def cv_dir(c, workdir: Path) -> Path:
    e = c.experiment
    return workdir / f"cv-{e.split}-k{e.folds}-s{e.fold_seed}"


def scored_records(c, task: str, plan: dict) -> list[dict]:
    """The held-out task's scored test items: the first experiment.limit that survive the leak check."""
    from dnd_jax.data.prompts import load_split

    recs = load_split(c.data.prompts_dir, f"{task}_{c.eval.split}")
    return [recs[i] for i in leaks.scored_indices(len(recs), plan.get("exclude", []), c.experiment.limit)]


def leak_check(c, names: list[str]) -> tuple[dict, dict, dict]:
    """(check result, normalised train prompts, normalised test prompts) of every task."""
    train = leaks.split_prompts(c.data.prompts_dir, names, "train")
    test = leaks.split_prompts(c.data.prompts_dir, names, c.eval.split)
    return leaks.check(train, test), train, test


def prepare_folds(c, workdir: Path, names: list[str]) -> list[dict]:
    """Folds, per fold the control adapter and mean tokens, per held-out task the retrieval choice, the
    training-LoRA sample and the test items dropped by the leak check: WORKDIR/cv-*/folds.json (made once)."""
    from dnd_jax.data.prepare import open_token_set
    from dnd_jax.experiments.baselines import (
        load_embeddings,
        mean_tokens,
        prompt_embeddings,
        retrieve,
        save_tokens_adapter,
    )
    from dnd_jax.fileio import write_json

    cv = cv_dir(c, workdir)
    path = cv / "folds.json"
    if path.is_file():
        made = json.loads(path.read_text())
        if "leaks" not in made:
            raise DndError(f"{path}: made before the leak check (its folds may train on scored items); "
                           "use a new workdir or delete that cv directory")  # fmt: skip
        return made["folds"]
    e = c.experiment
    found, train_p, test_p = leak_check(c, names)
    linked = leaks.components(names, found["linked"] + declared_links(c))
    folds = assign_folds(names, e.folds, e.fold_seed, e.split, families(c), linked)
    emb_path = workdir / "embeddings.npz"
    if not emb_path.is_file():
        emb = prompt_embeddings(c, names)
        with open(emb_path.with_suffix(".tmp.npz"), "wb") as f:
            np.savez(f, **{f"{n}|{sp}": v for n, d in emb.items() for sp, v in d.items()})
        emb_path.with_suffix(".tmp.npz").rename(emb_path)
    emb = load_embeddings(emb_path, names)
    layout = open_token_set(Path(c.data.token_dir) / names[0]).layout
    out, scored = [], {}
    for f, held in enumerate(folds):
        train = [n for n in names if n not in held]
        fdir = cv / f"fold-{f}"
        fdir.mkdir(parents=True, exist_ok=True)
        mean = mean_tokens(Path(c.data.token_dir), train, c.data.real_length)
        np.save(fdir / "mean_tokens.npy", mean)
        save_tokens_adapter(mean, layout, fdir / "control")
        plans = {}
        for t in held:
            best, sim = retrieve(emb, t, train)
            exclude = found["exclude"].get(t, [])
            idx = leaks.scored_indices(len(test_p[t]), exclude, e.limit)
            scored[t] = [test_p[t][i] for i in idx]
            plans[t] = {"fold": f, "control": str(fdir / "control"), "retrieval": best, "similarity": sim,
                        "training": training_sample(c, t, train), "exclude": exclude}  # fmt: skip
        out.append({"fold": f, "heldout": held, "train": train, "mean_tokens": str(fdir / "mean_tokens.npy"),
                    "plans": plans})  # fmt: skip
    leaks.audit(out, train_p, scored)
    summary = {"within": {t: len(v) for t, v in found["within"].items()},
               "repeated": {t: len(v) for t, v in found["repeated"].items()},
               "cross": [{"test_task": x["test_task"], "train_task": x["train_task"], "items": len(x["items"])}
                         for x in found["cross"]],
               "linked": linked, "declared": declared_links(c)}  # fmt: skip
    write_json(path, {"split": e.split, "k": e.folds, "seed": e.fold_seed, "leaks": summary, "folds": out})
    return out
