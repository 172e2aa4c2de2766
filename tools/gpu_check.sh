#!/usr/bin/env bash
# Run every kernel test (attention, perturb, mask, logprob, emulator, the device backend
# with cuBLAS) and bench on a lent GPU.
#
# The GPU machine has no Rust toolchain and no network, so the binaries are built here
# and carried.  Here (nvcc 13.0 so the PTX matches the device's CUDA 13.0 driver):
#
#   export CARGO_TARGET_DIR=/work/target NVCC=/work/main/.cache/cuda-pypi/nvidia/cu13/bin/nvcc
#   bash tools/gpu_check.sh --collect .device-bundle/kern2
#
# which runs `cargo test --no-run` / `cargo bench --no-run` with `--features cuda`
# and copies the (stripped) binaries into the folder (.device-bundle/ is git-ignored).
# Then on the device, with carry [".device-bundle/kern2"]:
#
#   bash tools/gpu_check.sh .device-bundle/kern2
#
# It runs every test binary in the folder with POPEN_TEST_CUDA=1 (the tests then run
# on the emulator and on GPU 0) and every bench binary with --bench, writing one log
# per binary to $OUT (default ./gpu_logs; benches filtered to `cuda_` groups unless
# BENCH_FILTER says otherwise), and exits non-zero if a test failed or
# if the GPU was not found (a run that silently used only the emulator proves nothing).
set -uo pipefail

TESTS="kernel_attention kernel_perturb kernel_mask kernel_logprob emulator backend_device"
BENCHES="attention perturb mask logprob"

if [[ "${1:-}" == "--collect" ]]; then
    dst="${2:?usage: gpu_check.sh --collect DIR}"
    : "${NVCC:?set NVCC so the kernels are compiled to PTX}"
    tgt="${CARGO_TARGET_DIR:-target}"
    mkdir -p "$dst"
    args=(); for t in $TESTS; do args+=(--test "$t"); done
    cargo test --no-run --features cuda "${args[@]}" || exit 1
    args=(); for b in $BENCHES; do args+=(--bench "$b"); done
    cargo bench --no-run --features cuda "${args[@]}" || exit 1
    # newest executable of each name (cargo leaves older hashes beside it)
    for n in $TESTS; do src=$(ls -t "$tgt"/debug/deps/"$n"-* | grep -v '\.d$' | head -1); cp "$src" "$dst/test_$n"; done
    for n in $BENCHES; do src=$(ls -t "$tgt"/release/deps/"$n"-* | grep -v '\.d$' | head -1); cp "$src" "$dst/bench_$n"; done
    strip "$dst"/test_* "$dst"/bench_* 2>/dev/null
    du -sh "$dst"
    exit 0
fi

dir="${1:?usage: gpu_check.sh DIR (the folder made by --collect)}"
out="${OUT:-gpu_logs}"
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || { echo "no nvidia-smi: not a GPU machine"; exit 2; }
fail=0
for t in "$dir"/test_*; do
    n=$(basename "$t")
    POPEN_TEST_CUDA=1 "$t" --test-threads=1 > "$out/$n.log" 2>&1; rc=$?
    echo "$n: rc=$rc $(grep -E '^test result' "$out/$n.log" | tail -1)"
    [[ $rc -eq 0 ]] || fail=1
done
for b in "$dir"/bench_*; do
    n=$(basename "$b")
    # only the cuda_* groups by default (the CPU groups take minutes); BENCH_FILTER= runs all
    "$b" --bench ${BENCH_FILTER-cuda_} > "$out/$n.log" 2>&1; echo "$n: rc=$?"
done
if ! grep -q "^cuda_" "$out"/bench_*.log; then
    echo "no cuda_* bench ran: Device::cuda(0) failed (see the logs), the tests used only the emulator"
    fail=1
fi
exit $fail
