#!/usr/bin/env bash
# Stage 1 on the embedded world, measured outside the tests: generate 2000 training and
# 200 test images, train `popen train sft`, predict the test split and score it with
# `popen eval`.  Prints the wall time of each step; the report is OUT/report.json.
#
#   tools/stage1_world.sh [OUT] [SEED] [STEPS] [CONFIG.toml]
#
# Defaults: OUT=stage1_world, SEED=0, STEPS = the config's total, CONFIG = none (the
# built-in defaults).  Build first: cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-stage1_world}"
seed="${2:-0}"
steps="${3:-}"
config="${4:-}"
bin=target/release/popen
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
mkdir -p "$out"
t() { local s; s=$(date +%s%N); "$@"; echo "  $(( ($(date +%s%N) - s) / 1000000 )) ms: $*" >&2; }
if [ ! -f "$out/world/train.json" ]; then
  t "$bin" data generate --out "$out/world" --n 2000 --seed "$seed" --split train >/dev/null
  t "$bin" data generate --out "$out/world" --n 200 --seed "$seed" --split test >/dev/null
fi
args=(train sft --data "$out/world/train.json" --out "$out/run" --seed "$seed")
[ -n "$steps" ] && args+=(--steps "$steps")
[ -n "$config" ] && args+=(--config "$config")
rm -rf "$out/run"
t "$bin" "${args[@]}"
t "$bin" predict --checkpoint "$out/run" --data "$out/world/test.json" --out "$out/pred.jsonl"
"$bin" eval --data "$out/world/test.json" --pred "$out/pred.jsonl" --out "$out/report.json"
