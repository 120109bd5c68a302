#!/usr/bin/env bash
# SFT mode on the many-task folds (the 48 tasks, the leak-free folds, the same scored items as every other row):
# the prompt-blind multi-task LoRA (mt_lora) and the SFT generator (sft), each trained through SmolLM2 on the fold's
# training tasks' response NLL, then the report with every variant of the workdir.
#   LR_MT=... LR_SFT=... bash scripts/many_task_sft.sh [WORKDIR] [REPORT_DIR]
# Each variant's learning rate is chosen on training data first: scripts/sft_lr_probe.py prints LR_MT and LR_SFT.
# Resumable: every stage skips finished work. The settings are configs/many_task_smollm2.py:sft (one source with the
# probe): 60 steps of 8 tasks x 2 examples, one seed; STEPS overrides the steps.
set -euo pipefail
# Transparent huge pages for malloc (glibc >= 2.35; ignored elsewhere): XLA's large per-step buffers no longer fault
# in 4 KiB at a time. The SFT step on 2 EPYC cores: 21-26 s -> 17 s (benchmarks/README.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
cd "$(dirname "$0")/.."
WORK=${1:-runs/many_task_smollm2}
REPORT=${2:-$WORK}
PY=${PYTHON:-.venv/bin/python}
CFG=configs/many_task_smollm2.py:sft
STEPS=${STEPS:-60}
: "${LR_MT:?set LR_MT, mt_lora's learning rate (scripts/sft_lr_probe.py chooses it)}"
: "${LR_SFT:?set LR_SFT, the sft generator's learning rate (scripts/sft_lr_probe.py chooses it)}"
COMMON=(--config.train.steps="$STEPS")
"$PY" -m dnd_jax.experiment --config "$CFG" --workdir "$WORK" --until evaluate \
    --config.experiment.variant=mt_lora --config.train.objective=mt_lora --config.train.learning_rate="$LR_MT" "${COMMON[@]}"
# sft, then the report of every variant of the workdir (the report stage follows the variant the command names;
# a command naming the default variant, dnd, would first train it).
"$PY" -m dnd_jax.experiment --config "$CFG" --workdir "$WORK" --report_dir "$REPORT" \
    --config.experiment.variant=sft --config.train.objective=sft --config.train.learning_rate="$LR_SFT" "${COMMON[@]}"
