#!/usr/bin/env bash
# Stage 2 on the world, as measured in docs/stage2.md: a stage-1 model (800 steps of
# tools/configs/stage1_world.toml on 2000 images), then `popen train pref` on Pt
# collected from a separate 300-image world, each variant predicted and scored on the
# 200 test images with `popen eval`.
#
#   tools/stage2_world.sh [OUT] [VARIANT ...]
#
# VARIANT is a name and the extra flags of `train pref`, as name=flags, e.g.
#   tools/stage2_world.sh stage2 base= nolt=--no-lt nll1="--nll 1" lr5=--lr-1e-5
# (`--lr-1e-5` is this script's own: lr 1e-5 instead of the config's 1e-4).  Default:
# the rows of docs/stage2.md.  Ps reads 12 copies per question without regeneration (docs/stage2.md
# says why).  Build first: cargo build --release.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-stage2_world}"
shift || true
bin="$PWD/target/release/popen"
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
variants=("$@")
[ ${#variants[@]} -gt 0 ] || variants=(nols="--no-ls" nolt_nols="--no-lt --no-ls" nll1_nols="--nll 1 --no-ls" base= nolt=--no-lt nll1="--nll 1" nll1_biou="--nll 1 --ps-collection biou")
mkdir -p "$out"
cd "$out"
t() { local s; s=$(date +%s); "$@"; echo "  $(( $(date +%s) - s )) s: $*" >&2; }
if [ ! -f world/train.json ]; then
  t "$bin" data generate --out world --n 2000 --seed 1 --split train >/dev/null
  t "$bin" data generate --out world --n 200 --seed 1 --split test >/dev/null
fi
[ -f world2/train.json ] || t "$bin" data generate --out world2 --n 300 --seed 2 --split train >/dev/null
if [ ! -f sft/model.safetensors ]; then
  t "$bin" train sft --data world/train.json --out sft --config ../tools/configs/stage1_world.toml --steps 800 --seed 0
fi
score() {
  t "$bin" predict --checkpoint "$1" --data world/test.json --out "pred_$1.jsonl" >/dev/null
  "$bin" eval --data world/test.json --pred "pred_$1.jsonl" --out "report_$1.json" > "eval_$1.txt"
  sed -n 2p "eval_$1.txt" | sed "s/^/$1: /"
}
score sft
for v in "${variants[@]}"; do
  name="${v%%=*}"
  flags="${v#*=}"
  lr=1e-4
  if [[ "$flags" == *--lr-1e-5* ]]; then lr=1e-5; flags="${flags//--lr-1e-5/}"; fi
  printf '[train]\nlr = %s\nmicro_batch = 8\nwarmup_steps = 10\ntotal_steps = 150\ncheckpoint_every = 50\nlog_every = 10\n[ps]\nnp = 12\nregenerations = 0\n' "$lr" > "pref_$name.toml"
  rm -rf "pref_$name"
  # shellcheck disable=SC2086
  t "$bin" train pref --from sft --data world2/train.json --out "pref_$name" --config "pref_$name.toml" $flags
  score "pref_$name"
done
