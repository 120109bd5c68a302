"""Learning rate of each SFT-mode variant, chosen on training data only, before the many-task SFT run.

  PYTHONPATH=. .venv/bin/python scripts/sft_lr_probe.py --workdir runs/many_task_smollm2 [--steps 12]
      [--lrs 3e-4,1e-3] [--objectives mt_lora,sft]

For each objective and learning rate: fold 0's run with the settings of scripts/many_task_sft.sh (one source:
configs/many_task_smollm2.py:sft), for --steps steps, in WORKDIR/sft-lr-probe/<objective>-<lr>/ (resumable: a
finished probe is read back). The rule, fixed before looking: per objective, the learning rate with the lowest
`trainfit/nll` (the run's own training tasks) at the last step; held-out numbers are printed but play no part.
mt_lora moves every A and B entry by about lr per Adam step, the generator moves its conv weights, so one learning
rate does not suit both.
Prints one JSON line per probe and the choice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from configs import many_task_smollm2
from dnd_jax.errors import DndError, run_cli
from dnd_jax.experiments.many_task import fold_config
from dnd_jax.experiments.stages import resolve


def probe(workdir: Path, objective: str, lr: float, steps: int) -> dict:
    from dnd_jax.checkpointing import latest_finished_step
    from dnd_jax.trainer import train_and_evaluate

    c = resolve(many_task_smollm2.get_config("sft"), workdir)
    folds = workdir / "cv-random-k5-s0" / "folds.json"
    if not folds.is_file():
        raise DndError(f"{folds}: no folds; run the many-task experiment to its folds stage first (python -m "
                       "dnd_jax.experiment --config configs/many_task_smollm2.py --until folds)")  # fmt: skip
    fold = json.loads(folds.read_text())["folds"][0]
    c.train.objective, c.train.learning_rate, c.train.steps = objective, lr, steps
    c.train.log_every, c.train.eval_every = 1, 0
    fc = fold_config(c, fold["train"], fold["heldout"], Path(fold["mean_tokens"]), 999)
    out = workdir / "sft-lr-probe" / f"{objective}-{lr:g}"
    if latest_finished_step(out / "checkpoints") != steps:
        train_and_evaluate(fc, out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "trainfit/nll" in r]
    return {"objective": objective, "lr": lr, "steps": steps, "trainfit_start": evals[0]["trainfit/nll"],
            "trainfit_end": evals[-1]["trainfit/nll"], "heldout_start": evals[0]["heldout/nll"],
            "heldout_end": evals[-1]["heldout/nll"],
            "step_time_s": [r["step_time_s"] for r in rows if "step_time_s" in r][-1]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lrs", default="3e-4,1e-3")
    ap.add_argument("--objectives", default="mt_lora,sft")
    a = ap.parse_args(argv)
    workdir = Path(a.workdir).absolute()
    for obj in a.objectives.split(","):
        got = [probe(workdir, obj, float(lr), a.steps) for lr in a.lrs.split(",")]
        for g in got:
            print(json.dumps(g))
        best = min(got, key=lambda g: g["trainfit_end"])
        print(json.dumps({"objective": obj, "chosen_lr": best["lr"], "rule": "lowest trainfit/nll at the last step"}))


if __name__ == "__main__":
    run_cli(main)
