#!/usr/bin/env bash
# The decisive run (configs/mixed_task_smollm2.py): 124 tasks of many formats, family folds (the primary split), the
# recon generator that did best on the 48 tasks (residual30), the SFT generator, and every baseline (mean control,
# retrieval, training LoRAs, own LoRA, soft retrieval, mt_lora), each generator also scored with swapped prompts.
#   LR_MT=... LR_SFT=... bash scripts/mixed_task_decisive.sh [WORKDIR] [REPORT_DIR]
# LR_MT / LR_SFT: the learning rates scripts/sft_lr_probe.py chose on the 48 tasks' training data (or a probe here).
# SPLIT=random runs the secondary split instead (its own cv directory in the same workdir; the collection is shared).
# Resumable: every stage skips finished work; the collection (about 2.5 h on 2 cores) has its own progress bar.
set -euo pipefail
# Transparent huge pages for malloc (glibc >= 2.35; ignored elsewhere): XLA's large per-step buffers no longer fault
# in 4 KiB at a time. The SFT step on 2 EPYC cores: 21-26 s -> 17 s (benchmarks/README.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
cd "$(dirname "$0")/.."
WORK=${1:-runs/mixed_task_smollm2}
REPORT=${2:-results/mixed_task_smollm2}
PY=${PYTHON:-.venv/bin/python}
CFG=configs/mixed_task_smollm2.py${SPLIT:+:$SPLIT}
SFT_CFG=configs/mixed_task_smollm2.py:sft${SPLIT:+,$SPLIT}
: "${LR_MT:?set LR_MT, mt_lora's learning rate (scripts/sft_lr_probe.py chooses it)}"
: "${LR_SFT:?set LR_SFT, the sft generator's learning rate (scripts/sft_lr_probe.py chooses it)}"
run() { "$PY" -m dnd_jax.experiment --workdir "$WORK" "$@"; }
# Data, the LoRA collection, tokens and the folds (with the leak check).
run --config "$CFG" --until folds
# The recon generator: the residual from the fold's control, 30 steps, 2 seeds.
run --config "$CFG" --until evaluate --config.experiment.variant=residual30 \
    --config.experiment.target=residual --config.train.steps=30
# Soft retrieval: no training; tau chosen inside each fold's training tasks.
run --config "$CFG" --until evaluate --config.experiment.variant=soft_retrieval \
    --config.experiment.baseline=soft_retrieval
# SFT mode: the prompt-blind multi-task LoRA, then the SFT generator and the report of every variant.
run --config "$SFT_CFG" --until evaluate --config.experiment.variant=mt_lora --config.train.objective=mt_lora \
    --config.train.learning_rate="$LR_MT"
run --config "$SFT_CFG" --report_dir "$REPORT" --config.experiment.variant=sft --config.train.objective=sft \
    --config.train.learning_rate="$LR_SFT"
