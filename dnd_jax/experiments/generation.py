"""A fold's generated adapters: each held-out task's conditions -> `AdapterGenerator` (the CLI's path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dnd_jax.errors import DndError


def condition_records(c, task: str, form: str) -> list[dict]:
    """The held-out task's records a condition is made of: its unlabeled test prompts (generate.split) for the
    prompts form; its train split for forms that read answers, so that no scored item's gold answer is ever
    part of a condition (the scored items are test items, and the leak check keeps them out of train)."""
    from dnd_jax.data.prompts import load_split, needs_answers

    split = "train" if needs_answers(form) else c.generate.split
    return load_split(c.data.prompts_dir, f"{task}_{split}", needs_answers(form))


def generation_info(c) -> dict:
    """What a task's generated adapters depend on (a stored generation.json that differs is regenerated)."""
    from dnd_jax.data.prompts import needs_answers

    form = c.data.get("condition", "prompts")  # the generator's own form: it was trained from this config
    info = {"num_adapters": c.experiment.num_adapters, "condition": form, "step": c.train.steps,
            "sigma_floor": c.generate.get("sigma_floor", None),
            "split": "train" if needs_answers(form) else c.generate.split}  # fmt: skip
    if c.experiment.get("prompt_swap", False):
        info["prompt_swap"] = True
    return info


def swap_partners(tasks: list[str], seed: int) -> dict[str, str]:
    """A seeded derangement of a fold's held-out tasks: task -> the task whose prompts make its swapped adapter
    (a cyclic shift of a seeded order: nobody keeps their own prompts). Needs at least 2 tasks."""
    if len(tasks) < 2:
        raise DndError(f"prompt swap needs at least 2 held-out tasks in a fold, got {tasks}")
    order = [sorted(tasks)[i] for i in np.random.default_rng([seed, 7919]).permutation(len(tasks))]
    return {t: order[(i + 1) % len(order)] for i, t in enumerate(order)}


def generated_ok(dest: Path, want: dict) -> bool:
    path = dest / "generation.json"
    if not path.is_file() or (want.get("prompt_swap") and not (dest / "swapped" / "generation.json").is_file()):
        return False
    got = json.loads(path.read_text())
    return all(got.get(k) == v for k, v in want.items())


def generate_fold(train_dir: Path, heldout: list[str], c, out_root: Path, a_from: Path | None = None) -> dict:
    """Adapters for every held-out task of a fold from one generator: one load and one compile.

    The same `dnd_jax.generate.AdapterGenerator` as the CLI: the same texts and seed give the same adapters.
    With `a_from` (the fold's mean tokens) the A tokens are the mean's whatever the generator outputs for them.

    Returns:
      {"load_s", "compile_s", "seconds_per_adapter" (warm: compile and load excluded), "adapters": count made,
       "negative_scales", "chunks"}, or None when every task was already made.
    """
    from dnd_jax.generate import AdapterGenerator

    info = generation_info(c)
    todo = [t for t in heldout if not generated_ok(out_root / t, info)]
    if not todo:
        return None
    if c.train.get("objective", "recon") == "mt_lora":
        return copy_mt_lora(train_dir, todo, c, out_root, info)
    gen = AdapterGenerator(train_dir, a_from=a_from, sigma_floor=c.generate.get("sigma_floor", None))
    k, times, neg, chunks = c.experiment.num_adapters, [], 0, 0
    partners = swap_partners(heldout, gen.config.seed) if info.get("prompt_swap") else {}
    for task in todo:
        lora, per_call, scales = gen(gen.texts(condition_records(c, task, gen.form)), k)
        neg, chunks = neg + scales["negative"], chunks + scales["chunks"]
        times.append(per_call / k)
        meta = {**info, "step": gen.step, "seed": gen.config.seed, "seconds_per_adapter": per_call / k,
                "negative_scales": scales}  # fmt: skip
        gen.save(lora, out_root / task, {**meta, "swapped_from": partners.get(task)}, overwrite=True)
        if partners:  # the same generator and seed, another held-out task's prompts; scored on this task's items
            other, _, _ = gen(gen.texts(condition_records(c, partners[task], gen.form)), k)
            gen.save(other, out_root / task / "swapped", {**meta, "prompts_of": partners[task]}, overwrite=True)
    return {"load_s": gen.load_s, "compile_s": gen.compile_s, "seconds_per_adapter": float(np.median(times)),
            "adapters": k * len(todo), "negative_scales": neg, "chunks": chunks}  # fmt: skip


def copy_mt_lora(train_dir: Path, tasks: list[str], c, out_root: Path, info: dict) -> dict:
    """mt_lora makes no adapter per task: its fold's one LoRA (train_dir/adapter) is every held-out task's row."""
    import shutil

    from dnd_jax.fileio import atomic_dir

    src = train_dir / "adapter"
    if not (src / "adapter_config.json").is_file():
        raise DndError(f"{src}: no mt_lora adapter (train.objective mt_lora writes it at the last step)")
    k = c.experiment.num_adapters
    for task in tasks:
        with atomic_dir(out_root / task, overwrite=True) as tmp:
            for i in range(k):
                shutil.copytree(src, tmp / f"adapter-{i}")
                if info.get("prompt_swap"):  # prompt-blind: its swapped row is the same LoRA (a difference of 0)
                    shutil.copytree(src, tmp / "swapped" / f"adapter-{i}")
            (tmp / "generation.json").write_text(json.dumps({**info, "mt_lora": str(src)}, indent=2) + "\n")
            if info.get("prompt_swap"):
                (tmp / "swapped" / "generation.json").write_text(json.dumps({**info, "mt_lora": str(src)}) + "\n")
    return {"load_s": 0.0, "compile_s": 0.0, "seconds_per_adapter": 0.0, "adapters": k * len(tasks),
            "negative_scales": 0, "chunks": 0}  # fmt: skip
