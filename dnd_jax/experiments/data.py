"""The many-task experiment's data: BIG-bench tasks ($DND_JAX_BIGBENCH) and common-sense sets read in place."""

from __future__ import annotations

import json
from pathlib import Path

from dnd_jax.errors import DndError


def link_datasets(data_dir: Path, src_dir: Path, names: list[str]) -> None:
    """Registers `<name>_train` / `<name>_test` of `src_dir` in `data_dir`'s registry by absolute path (no copy)."""
    from dnd_jax.data.prompts import read_registry
    from dnd_jax.fileio import atomic_file

    src = read_registry(src_dir)
    reg_path = data_dir / "dataset_info.json"
    reg = read_registry(data_dir) if reg_path.is_file() else {}
    for name in names:
        for split in ("train", "test"):
            key = f"{name}_{split}"
            if key not in src:
                raise DndError(f"{src_dir / 'dataset_info.json'}: no dataset {key!r}")
            entry = dict(src[key])
            entry["file_name"] = str((src_dir / entry["file_name"]).absolute())
            reg[key] = entry
    data_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(reg_path, "w") as f:
        json.dump(reg, f, indent=1)


def task_names(c) -> list[str]:
    """The experiment's tasks (registry names) in config order; common-sense ones only if their dir exists;
    BIG-bench tasks that the data stage skipped (too few examples, unusable targets: it said why) left out."""
    from dnd_jax.data.bigbench import skipped, task_name

    e = c.experiment
    left_out = skipped(c.data.prompts_dir)
    names = [task_name(t) for t in e.bigbench_tasks if task_name(t) not in left_out]
    if e.commonsense_tasks and Path(e.commonsense_dir).is_dir():
        names += list(e.commonsense_tasks)
    if len(names) < 2 * e.folds:
        raise DndError(f"config experiment: {len(names)} tasks, too few for {e.folds} folds (need >= 2 per fold)")
    return names


def build_data(c) -> None:
    from dnd_jax.data import bigbench

    e, out = c.experiment, Path(c.data.prompts_dir)
    if e.bigbench_tasks:
        fits = bigbench.whole_examples(c.collect.model, c.collect.cutoff_len) if e.get("whole_examples") else None
        bigbench.build(out, list(e.bigbench_tasks), e.test_size, c.seed, e.max_train, e.max_choices, fits=fits)
    if e.commonsense_tasks and Path(e.commonsense_dir).is_dir():
        link_datasets(out, Path(e.commonsense_dir), list(e.commonsense_tasks))


def data_ready(c, names: list[str]) -> bool:
    reg = Path(c.data.prompts_dir) / "dataset_info.json"
    return reg.is_file() and all(f"{n}_test" in json.loads(reg.read_text()) for n in names)
