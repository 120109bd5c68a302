"""The ablations' report: one table per ablation, every arm on the same held-out tasks and baselines.

Every number is read from the run's files (WORKDIR/cv-*/scores, <variant>/scores, stages.json,
<variant>/generation.json, the few-shot collections' manifests). The primary metric and the paired
statistics are the many-task report's (dnd_jax/experiments/report.py): per-task differences X - arm of the
mean NLL per gold-response token (positive = the arm is better), their mean over tasks with a 95 %
percentile bootstrap CI over tasks, and wins / ties / losses.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from dnd_jax.errors import DndError
from dnd_jax.experiments.folds import cv_dir
from dnd_jax.experiments.stats import paired
from dnd_jax.experiments.tables import LABELS, ROWS, TIE, _fmt_ci, _rel, seed_values, task_mean

TITLES = {
    "reference": "Reference arm (no group of ablations.groups lists it)",
    "conditions": "Condition forms (paper Table 4a; data.condition)",
    "num_conditions": "Number of conditions (paper Fig. 4a; data.num_texts, data.max_prompts)",
    "arrangements": "Dataset arrangements (paper Table 4c; experiment.train_tasks of each fold's training tasks)",
    "extractors_cv": "Extractor types (paper Table 4b; encoder.type)",
    "fewshot": "Few-shot and full-shot LoRAs on the held-out task (paper Fig. 4b/4c; experiment.shots)",
}
COMPARE = ("control", "retrieval", "training", "base")


def _nll(entry: dict) -> float:
    return float(entry["nll"]["nll"])


def _arm_values(vdir: Path, held: list[str]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(per-task and seed mean NLL of the arm's adapters [tasks, seeds], per-task NLL of its own control or
    None), or None if unscored."""
    files = [vdir / "scores" / f"{t}.json" for t in held]
    if not all(f.is_file() for f in files):
        return None
    rows = [json.loads(f.read_text()) for f in files]
    gen = np.asarray([seed_values(r, "nll", "nll") for r in rows])
    own = np.asarray([_nll(r["control"]) for r in rows]) if all("control" in r for r in rows) else None
    return gen, own


def _times(workdir: Path, cv: Path, c, held: list[str]) -> tuple[float | None, float | None]:
    """(seconds to train the arm's generators over its folds, median seconds per adapter); few-shot arms:
    (their collections' summed training time, the median per adapter)."""
    e = c.experiment
    if e.get("shots", 0):
        from dnd_jax.experiments.many_task import fewshot_dir

        secs = [json.loads((fewshot_dir(c, workdir) / t / "manifest.json").read_text()).get("seconds") for t in held]
        secs = [float(s) for s in secs if s]
        return (sum(secs), float(np.median(secs))) if secs else (None, None)
    stages = json.loads((workdir / "stages.json").read_text()) if (workdir / "stages.json").is_file() else {}
    gen = cv / e.variant / "generation.json"
    per = [x["seconds_per_adapter"] for x in json.loads(gen.read_text()).values()] if gen.is_file() else []
    per = [p for p in per if p]
    return stages.get(f"train/{e.variant}"), (float(np.median(per)) if per else None)


def _secs(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_ablation_report(suite, configs: list[tuple[str, str, object]], workdir: Path, out_dir: Path) -> Path:
    """Writes out_dir/report.md (and scores.csv) from the finished arms; returns the report path.

    Args:
      suite: the suite config (configs/ablations/suite.py).
      configs: [(group, arm argument, arm config)] as dnd_jax.ablations built them.
      workdir: the shared workdir.
      out_dir: where the report goes.
    """
    from dnd_jax.config_cli import versions
    from dnd_jax.experiments.stages import resolve as _resolve
    from dnd_jax.fileio import atomic_file

    ref = _resolve(next(c for _, _, c in configs if c.experiment.variant == "reference"), workdir)
    cv = cv_dir(ref, workdir)
    e = ref.experiment
    folds = json.loads((cv / "folds.json").read_text())["folds"]
    run = [f for f in folds if not e.run_folds or f["fold"] in e.run_folds]
    held = [t for f in run for t in f["heldout"]]
    groups = np.asarray([f["fold"] for f in run for _ in f["heldout"]])
    missing = [t for t in held if not (cv / "scores" / f"{t}.json").is_file()]
    if missing:
        raise DndError(f"{cv / 'scores'}: no baseline scores of {', '.join(missing)} yet (the reference arm's "
                       "evaluate stage writes them)")  # fmt: skip
    shared = {t: json.loads((cv / "scores" / f"{t}.json").read_text()) for t in held}
    base = {r: np.asarray([np.mean([_nll(x) for x in shared[t][r]]) if r == "training" else _nll(shared[t][r])
                           for t in held]) for r in ROWS}  # fmt: skip
    nb, seed = e.bootstrap, ref.seed
    ref_vals = _arm_values(cv / "reference", held)
    L = [f"# DnD ablations, cross-validated ({len(held)} held-out tasks)\n",
         f"Produced by `python -m dnd_jax.ablations --config configs/ablations/suite.py --workdir {_rel(workdir)}` "
         f"on {platform.node()} ({platform.machine()}, {os.cpu_count()} CPU cores); {versions()}. Every number "
         "below is read from that run's files.\n",
         f"Every arm is the common ablation experiment (configs/ablations/common.py) with one thing changed, on "
         f"the same folds ({e.split} split, K = {e.folds}, seed {e.fold_seed}; folds "
         f"{', '.join(str(f['fold']) for f in run)} run), the same held-out tasks, test items and baselines. "
         f"Primary metric: mean NLL per gold-response token on the first {e.limit} test items of each held-out "
         "task (lower is better). A cell *vs X* is the per-task difference X - arm, averaged over tasks (positive "
         f"= the arm is better), with its 95 % percentile bootstrap CI ({nb} resamples of tasks, and of each fold's "
         "generator seeds, shared by the fold's tasks: the CI covers the generators' training noise) and the arm's "
         f"wins / ties / losses (tie: |d| <= {TIE}). The *reference* arm (prompts, {ref.data.num_texts} texts, every "
         "training task of the fold, Sentence-BERT) is the same run in every table.\n"]  # fmt: skip
    L.append("## Baselines (the same in every table)\n")
    L.append("| row | mean NLL | median |\n|---|---|---|")
    L += [f"| {LABELS[r]} | {base[r].mean():.4f} | {np.median(base[r]):.4f} |" for r in ROWS]
    L += _reading(cv, run, base, ref_vals, nb, seed, groups)
    per_task = {}
    for group in dict.fromkeys(g for g, _, _ in configs):
        arms = [(arg, c) for g, arg, c in configs if g == group]
        L.append(f"\n## {TITLES.get(group, group)}\n")
        L.append("| arm | variant | mean NLL | vs reference | vs control | vs retrieval | vs training LoRAs | vs base "
                 "| train s (all folds) | s per adapter |\n|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
        notes = []
        for arg, c in arms:
            v = c.experiment.variant
            vals = _arm_values(cv / v, held)
            if vals is None:
                L.append(f"| {arg} | {v} | not run | | | | | | | |")
                continue
            g, own_control = vals
            per_task[v] = task_mean(g)
            no_ref = v == "reference" or ref_vals is None
            vs_ref = "-" if no_ref else _cell(paired(g, ref_vals[0], nb, seed, TIE, groups))
            cells = [_cell(paired(g, base[r], nb, seed, TIE, groups)) for r in COMPARE]
            train_s, per = _times(workdir, cv, _resolve(c, workdir), held)
            L.append(f"| {arg} | {v} | {g.mean():.4f} | {vs_ref} | " + " | ".join(cells)
                     + f" | {_secs(train_s)} | {_secs(per, 4)} |")  # fmt: skip
            if own_control is not None:
                d = paired(g, own_control, nb, seed, TIE, groups)
                notes.append(f"- {v}: vs its own prompt-blind control (the mean of its {c.experiment.train_tasks} "
                             f"training tasks' checkpoints, NLL {own_control.mean():.4f}): {_cell(d)}")  # fmt: skip
        L += ["", *notes] if notes else []
    L.append("\nCells: mean difference [95 % CI] (wins/ties/losses of the arm). *train s*: the arm's training "
             "stage (its generators over the run folds; few-shot: the LoRA collections' training time, model load "
             "excluded, summed over tasks); *s per adapter*: generation time per adapter (median over folds, "
             "compile excluded) or, for few-shot, one LoRA's training time (median over tasks).\n")  # fmt: skip
    L.append("## Settings\n")
    L += ["- **held-out tasks**: " + "; ".join(f"fold {f['fold']}: {', '.join(f['heldout'])}" for f in run),
          "- **training tasks per fold**: " + "; ".join(f"fold {f['fold']}: {', '.join(f['train'])}" for f in run),
          f"- **generator**: {ref.train.steps} steps, batch {ref.train.batch_size}, lr {ref.train.learning_rate}, "
          f"features {[list(x) for x in ref.model.features]}, {ref.data.num_texts} prompts x "
          f"{ref.data.max_text_length} tokens per condition, absolute token targets, loss on all tokens (the "
          "paper's method)",
          f"- **LoRA recipe** (collection, own / retrieval / training LoRAs and few-shot arms): rank "
          f"{ref.collect.lora.r}, {ref.collect.phase1.steps} + {ref.collect.phase2.steps} steps, batch "
          f"{ref.collect.phase1.batch_size}, cut-off {ref.collect.cutoff_len} tokens",
          f"- **adapters per held-out task**: {e.num_adapters}, from the task's test split in the arm's condition "
          "form"]  # fmt: skip
    L.append("\n## Deviations from the paper\n")
    L += [f"- {x}" for x in ref.pipeline.deviations]
    L.append(
        "- Ablations on cross-validated BIG-bench + common-sense tasks at CPU scale (a subset of the folds), "
        "not ARC-c alone with the 1.1 B generator; extractor arms: SmolLM2-135M for Qwen2.5-7B and MiniLM's "
        "own word-piece table for GloVe (neither can be had offline), with the reference's number of prompts."
    )
    cols = list(per_task)
    L.append("\n## Per task (NLL per response token)\n")
    L.append("| task | " + " | ".join([*ROWS, *cols]) + " |\n|---|" + "---|" * (len(ROWS) + len(cols)))
    for i, t in enumerate(held):
        L.append(f"| {t} | " + " | ".join(f"{x[i]:.3f}" for x in [*(base[r] for r in ROWS),
                                                                    *(per_task[v] for v in cols)]) + " |")  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    with atomic_file(path, "w") as f:
        f.write("\n".join(L) + "\n")
    with atomic_file(out_dir / "scores.csv", "w") as f:
        f.write("task," + ",".join([*ROWS, *cols]) + "\n")
        for i, t in enumerate(held):
            f.write(f"{t}," + ",".join(f"{x[i]:.5f}" for x in [*(base[r] for r in ROWS), *(per_task[v] for v in cols)])
                    + "\n")  # fmt: skip
    return path


def _reading(cv: Path, run: list[dict], base: dict, ref_vals, nb: int, seed: int, groups) -> list[str]:
    """What the reference arm's numbers say before any arm is compared with it (computed, not typed in)."""
    if ref_vals is None:
        return []
    d = paired(ref_vals[0], base["control"], nb, seed, TIE, groups)
    out = [
        "\n## Reading the reference arm\n",
        f"- The reference arm vs the prompt-blind control: {_cell(d)}; it "
        + ("beats" if d["ci"][0] > 0 else "does not beat")
        + " the control with a CI that excludes zero.",
    ]
    for f in run:
        m = next(iter(sorted((cv / "reference" / f"fold-{f['fold']}").glob("seed-*/train/metrics.jsonl"))), None)
        rows = [json.loads(x) for x in m.read_text().splitlines()] if m is not None else []
        rows = [r for r in rows if "generated_mean_square" in r and "target_mean_square" in r]
        if rows:
            r = rows[-1]
            out.append(f"- fold {f['fold']}: at its last logged step ({r['step']}) the reference generator's output "
                       f"holds {r['generated_mean_square'] / r['target_mean_square']:.0%} of its targets' mean square "
                       f"(training loss {r['loss']:.3f}); every arm is compared at this step budget.")  # fmt: skip
    return out


def _cell(d: dict) -> str:
    return f"{_fmt_ci(d)} ({d['wins']}/{d['ties']}/{d['losses']})"
