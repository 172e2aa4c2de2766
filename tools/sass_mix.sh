#!/usr/bin/env bash
# The instruction mix of the kernels' inner loops, from their SASS, with no GPU: how many
# instructions a kernel issues per tensor-core product (HMMA) or per FFMA, and of which
# kinds.  A static count, not a timing: it says where a loop spends its issue slots.
#
#   bash tools/sass_mix.sh [KERNEL_FILTER]      e.g. bash tools/sass_mix.sh attention_fwd
#
# Builds the PTX as `cargo build --features cuda` does (nvcc from tools/install_nvcc.sh),
# assembles it with ptxas for sm_$CUDA_COMPUTE_CAP (default 90) and disassembles it with
# cuobjdump.  cuobjdump and nvdisasm are not in the 13.0 wheels; the oldest on PyPI
# (13.2) read sm_90 cubins and go into a cache beside the compiler's.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
filter="${1:-}"
nvcc="${NVCC:-$(bash tools/install_nvcc.sh | tail -n1)}"
ptxas="$(dirname "$nvcc")/ptxas"
tools="${POPEN_CUDA_CACHE:-$here/.cache/cuda-pypi}-tools"
cuobjdump="$(find "$tools" -type f -name cuobjdump 2>/dev/null | head -n1 || true)"
if [ -z "$cuobjdump" ]; then
  echo "installing nvidia-cuda-cuobjdump and -nvdisasm 13.2.51 into $tools" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$tools" \
    "nvidia-cuda-cuobjdump==13.2.51" "nvidia-cuda-nvdisasm==13.2.51" >&2
  cuobjdump="$(find "$tools" -type f -name cuobjdump | head -n1)"
fi
chmod +x "$cuobjdump" "$(dirname "$cuobjdump")/nvdisasm"
export NVDISASM_PATH="$(dirname "$cuobjdump")"
NVCC="$nvcc" cargo build --release --features cuda >&2
out="$(ls -td target/release/build/popen-*/out | while read -r d; do
  [ -f "$d/attention.ptx" ] && echo "$d" && break
done)"
arch="sm_${CUDA_COMPUTE_CAP:-90}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for ptx in "$out"/*.ptx; do
  stem="$(basename "$ptx" .ptx)"
  "$ptxas" -arch="$arch" -O3 "$ptx" -o "$work/$stem.cubin"
  "$cuobjdump" -sass "$work/$stem.cubin" >"$work/$stem.sass"
done
python3 - "$work" "$filter" <<'EOF'
import collections, glob, re, sys

work, filt = sys.argv[1], sys.argv[2]
# A loop is the run of instructions between the first and the last product of a
# cluster; products more than 300 instructions apart start a new cluster (another
# loop, or the other template instance of a kernel).
print(f"{'kernel':34} {'product':>7} {'count':>5} {'span':>5} {'per':>5}  mix per product")
for path in sorted(glob.glob(f"{work}/*.sass")):
    for part in re.split(r"\n\s*Function : ", open(path).read())[1:]:
        name = part.split("\n", 1)[0].strip()
        if filt not in name:
            continue
        ops = [m.group(2) for m in re.finditer(
            r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", part)]
        for prod in ("HMMA", "FFMA"):
            idx = [i for i, o in enumerate(ops) if o == prod]
            if len(idx) < 16:
                continue
            clusters = [[idx[0]]]
            for i in idx[1:]:
                (clusters[-1].append(i) if i - clusters[-1][-1] <= 300 else clusters.append([i]))
            for c in clusters:
                if len(c) < 16:
                    continue
                seg = ops[c[0]:c[-1] + 1]
                mix = collections.Counter(seg).most_common(6)
                text = " ".join(f"{o} {n / len(c):.2f}" for o, n in mix)
                print(f"{name:34} {prod:>7} {len(c):5} {len(seg):5} {len(seg) / len(c):5.2f}  {text}")
            break
EOF
