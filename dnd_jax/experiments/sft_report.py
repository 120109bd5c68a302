"""The many-task report's SFT-mode section: which variants trained through the LM, how well each fits its own
training tasks at the end (per fold), a held-out learning curve for fold 0, and the paired comparisons against the
prompt-blind multi-task LoRA (mt_lora)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LM_OBJECTIVES = ("sft", "sft+recon", "mt_lora")


def objective(cv: Path, variant: str) -> str | None:
    """The train.objective of a variant's own generators (None: it reuses another variant's)."""
    own = sorted((cv / variant).glob("fold-*/seed-*/train/config.json"))
    if not own:
        return None
    return json.loads(own[0].read_text())["train"].get("objective", "recon")


def metric_rows(train_dir: Path) -> list[dict]:
    path = train_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def last_value(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return float(vals[-1]) if vals else float("nan")


def sft_section(cv: Path, vnames: list[str], nll: dict, groups, nb: int, seed: int, tie: float) -> list[str]:
    """Markdown lines (empty when no variant trained through the LM)."""
    from dnd_jax.experiments.stats import paired, within_noise

    objectives = {v: objective(cv, v) for v in vnames}
    lm = [v for v in vnames if objectives[v] in LM_OBJECTIVES]
    if not lm:
        return []
    L = ["\n## SFT mode: trained through the frozen LM\n",
         "Variants trained on the tasks' own response NLL through SmolLM2 (`train.objective`): "
         + ", ".join(f"{v} ({objectives[v]})" for v in lm) + ". `mt_lora` is the prompt-blind counterpart: "
         "one LoRA per fold trained with the same loss, steps, batches and examples on the fold's training tasks. "
         "A generator that beats the control only because SFT beats averaging does not beat mt_lora.\n"]  # fmt: skip
    if "mt_lora" in lm:
        for v in [x for x in lm if x != "mt_lora"]:
            d = paired(nll[f"generated:{v}"], nll["generated:mt_lora"], nb, seed, tie, groups)
            L.append(f"- **{v} vs mt_lora** (NLL per response token, positive = {v} better): {d['mean']:+.4f} "
                     f"[{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] ({d['wins']}/{d['ties']}/{d['losses']})"
                     + (" within noise" if within_noise(d) else ""))  # fmt: skip
    L.append("\nFit at the end of training (mean response NLL per token on fixed batches: `trainfit` = the run's "
             "own training tasks, `heldout` = the fold's first held-out task, its train split), per fold, mean "
             "over seeds:\n")  # fmt: skip
    folds = sorted({int(p.name.split("-")[1]) for v in lm for p in (cv / v).glob("fold-*")})
    L.append("| variant | " + " | ".join(f"fold {f} trainfit / heldout" for f in folds) + " |\n|---|"
             + "---|" * len(folds))  # fmt: skip
    for v in lm:
        cells = []
        for f in folds:
            runs = [metric_rows(d) for d in sorted((cv / v / f"fold-{f}").glob("seed-*/train"))]
            fit = np.nanmean([last_value(r, "trainfit/nll") for r in runs]) if runs else float("nan")
            held = np.nanmean([last_value(r, "heldout/nll") for r in runs]) if runs else float("nan")
            cells.append(f"{fit:.3f} / {held:.3f}")
        L.append(f"| {v} | " + " | ".join(cells) + " |")
    L.append("\nHeld-out learning curve, fold 0, first seed (`heldout/nll` by step; step 0 = the control):\n")
    curves = {}
    for v in lm:
        dirs = sorted((cv / v / "fold-0").glob("seed-*/train"))
        if dirs:
            curves[v] = {r["step"]: r["heldout/nll"] for r in metric_rows(dirs[0]) if "heldout/nll" in r}
    steps = sorted({s for c in curves.values() for s in c})
    L.append("| step | " + " | ".join(curves) + " |\n|---|" + "---|" * len(curves))
    for s in steps:
        L.append(f"| {s} | " + " | ".join(f"{c[s]:.4f}" if s in c else "-" for c in curves.values()) + " |")
    return L
