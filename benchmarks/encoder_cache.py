"""encoder.cache on real training runs: seconds per step and held-out error, same run, same data.

  PYTHONPATH=. python benchmarks/encoder_cache.py --workdir runs/many_task_smollm2 [--steps 100] [--fold 0]

Trains one generator three ways on the many-task experiment's collection (after its `tokens` and
`folds` stages; docs/experiments.md, "many-task experiment"): (1) as the original, the frozen encoder run inside
every step with dropout on; (2) the same without encoder dropout; (3) encoder.cache, each prompt
encoded once without dropout and reused. Two runs: the many-task fold `--fold` (its config as
configs/many_task_smollm2.py trains it) and the common-sense generator (configs/arc_c.py:smoke:
ARC-c held out, the six other common-sense sets of the same collection, 5 checkpoints each).
Prints steady seconds per step (first logged interval, which holds compilation, excluded), wall
time, held-out weighted MSE at the end, and prompts encoded. Outputs go under --out (deleted first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.cpuinfo import describe


def steady_step_time(workdir: Path) -> float:
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r][1:]
    return float(np.mean(times)) if times else float("nan")


def run_three(name: str, config, out: Path) -> None:
    from dnd_jax.trainer import train_and_evaluate

    print(f"{name}: {config.train.steps} steps, batch {config.train.batch_size} x {config.data.num_texts} prompts x "
          f"{config.data.max_text_length} tokens, held out {config.data.heldout_dataset}")  # fmt: skip
    base = None
    for label, dropout, cache in (("encoder every step, dropout (original)", True, False),
                                  ("encoder every step, no dropout", False, False),
                                  ("encoder.cache (once per prompt)", False, True)):  # fmt: skip
        c = config.copy_and_resolve_references()
        c.encoder.train_dropout, c.encoder.cache = dropout, cache
        c.train.progress, c.train.log_every = False, 10
        wd = out / name / label.split(" (")[0].replace(" ", "_").replace(",", "")
        t0 = time.perf_counter()
        r = train_and_evaluate(c, wd)
        wall = time.perf_counter() - t0
        step = steady_step_time(wd)
        base = base or step
        enc = "" if r["encoder_cache"] is None else f"; {sum(r['encoder_cache'].values())} prompts encoded"
        print(f"  {label:40s}: {step:6.3f} s/step ({base / step:4.2f}x), wall {wall:6.1f} s, held-out wMSE "
              f"{r['heldout_wmse_start']:.4f} -> {r['heldout_wmse_end']:.4f}{enc}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="runs/many_task_smollm2", help="the many-task experiment's workdir")
    ap.add_argument("--out", default="runs/bench_encoder_cache")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--runs", default="many_task,commonsense")
    args = ap.parse_args()
    from configs import arc_c, many_task_smollm2
    from dnd_jax.experiments.folds import cv_dir
    from dnd_jax.experiments.many_task import fold_config
    from dnd_jax.experiments.stages import resolve as _resolve

    print(describe())
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    workdir = Path(args.workdir).absolute()
    c = _resolve(many_task_smollm2.get_config(), workdir)
    if "many_task" in args.runs:
        fold = json.loads((cv_dir(c, workdir) / "folds.json").read_text())["folds"][args.fold]
        fc = fold_config(c, fold["train"], fold["heldout"], None, c.seed)
        fc.train.steps = args.steps
        run_three("many_task", fc, out)
    if "commonsense" in args.runs:
        cs = arc_c.get_config("smoke")
        cs.data.train_datasets = ("ARC-e", "OBQA", "BoolQ", "WinoGrande", "PIQA", "SIQA")
        cs.data.collection_dir, cs.data.token_dir = c.data.collection_dir, str(out / "tokens")
        cs.data.real_length = c.data.real_length
        cs.train.steps = args.steps
        run_three("commonsense", cs, out)


if __name__ == "__main__":
    main()
