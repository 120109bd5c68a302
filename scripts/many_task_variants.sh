#!/usr/bin/env bash
# The committed many-task report (results/many_task_smollm2/): every variant in one workdir, then the report.
#   bash scripts/many_task_variants.sh [WORKDIR] [REPORT_DIR]
# Resumable: every stage skips finished work, so re-running after a stop (or a kill) continues.
set -euo pipefail
# Transparent huge pages for malloc (glibc >= 2.35; ignored elsewhere): XLA's large per-step buffers no longer fault
# in 4 KiB at a time. The SFT step on 2 EPYC cores: 21-26 s -> 17 s (benchmarks/README.md).
export GLIBC_TUNABLES=${GLIBC_TUNABLES:-glibc.malloc.hugetlb=1}
cd "$(dirname "$0")/.."
WORK=${1:-runs/many_task_smollm2}
REPORT=${2:-$WORK}
PY=${PYTHON:-.venv/bin/python}
CFG=configs/many_task_smollm2.py
# residual30 first (the best variant before; the shared baseline rows are scored with it): targets are the residual from the fold mean (the control), 30 steps.
"$PY" -m dnd_jax.experiment --config "$CFG" --workdir "$WORK" --until evaluate \
    --config.experiment.variant=residual30 --config.experiment.target=residual --config.train.steps=30
# dnd: the paper's generator (absolute tokens, loss on all tokens), 100 steps.
"$PY" -m dnd_jax.experiment --config "$CFG" --workdir "$WORK" --until evaluate
# dnd_fixed_a: the dnd generators, A tokens taken from the fold mean at generation.
"$PY" -m dnd_jax.experiment --config "$CFG" --workdir "$WORK" --until evaluate \
    --config.experiment.variant=dnd_fixed_a --config.experiment.train_variant=dnd --config.experiment.predict=b_only
# The report compares every scored variant.
"$PY" -m dnd_jax.experiment --config "$CFG" --workdir "$WORK" --report_dir "$REPORT"
