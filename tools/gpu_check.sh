#!/usr/bin/env bash
# Check every kernel and the device backend on a lent GPU against their CPU twins, then
# time the kernels and a LLaMA-7B-shaped layer stack beside PyTorch on the same GPU.
#
# The GPU machine has no Rust toolchain and no network, so the binaries are built here
# and carried.  Here (nvcc 13.0, so the PTX matches the device's CUDA 13.0 driver):
#
#   export NVCC="$(bash tools/install_nvcc.sh | tail -n1)"
#   bash tools/gpu_check.sh --collect .device-bundle
#
# builds the test binaries below and benches/gpu.rs with `--features cuda`, strips them
# and packs them into .device-bundle/bins.tar.gz (.device-bundle/ is git-ignored).
# Then on the device, with carry [".device-bundle"]:
#
#   bash tools/gpu_check.sh .device-bundle
#
# which writes under $OUT (default ./gpu_logs; seven files, as the device tool returns
# eight at most):
#   nvidia-smi.txt
#   tests.log              each test binary, run with POPEN_TEST_CUDA=1: every test on the
#                          emulator and on GPU 0, failing if GPU 0 cannot be opened
#   sanitizer.log          the first two failing tests again under compute-sanitizer
#   bench_gpu.jsonl        benches/gpu.rs: the probes' HMMA and FFMA rates, copy ceiling,
#                          memory-bound kernels, the optimizer's ops over many tensors,
#                          the norms on both sides of the warp-per-row switch, the pixel
#                          decoder's image ops, attention, the 7B-shaped stack's
#                          forward + backward
#   bench_gpu_torch.jsonl  tools/bench_gpu_torch.py: the same shapes in PyTorch
#   train.log              `popen train sft` on a generated world, --device cuda and cpu, then
#                          `predict` and `predict --ensemble 3` on each run
#                          (STEPS steps, default 40, the stage-1 config), then `popen
#                          predict` on its test split on both; wall times go to
#                          bench_gpu.jsonl as train_sft_* and predict_* lines
#   predict_profile_cuda.jsonl  `predict --device cuda --profile` on the cuda run: GPU time
#                          and calls by kernel, product and zero-fill
#   bench_err.log          both benches' stderr
#   gpu_check.json         the summary (tests, each number beside PyTorch's, the goals)
# and prints the summary last.  Exit status: non-zero if a test failed or no GPU ran.
set -uo pipefail

TESTS="${TESTS:-kernel_attention kernel_perturb kernel_mask kernel_logprob kernel_probe emulator backend_device seg_model}"

if [[ "${1:-}" == "--collect" ]]; then
    dst="${2:?usage: gpu_check.sh --collect DIR}"
    : "${NVCC:?set NVCC so the kernels are compiled to PTX}"
    tgt="${CARGO_TARGET_DIR:-target}"
    mkdir -p "$dst/bin"
    args=(); for t in $TESTS; do args+=(--test "$t"); done
    cargo test --no-run --features cuda "${args[@]}" || exit 1
    cargo bench --no-run --features cuda --bench gpu || exit 1
    cargo build --release --features cuda || exit 1
    # the newest executable of each name (cargo leaves older hashes beside it)
    newest() { ls -t "$tgt"/$1/deps/"$2"-* | grep -v '\.d$' | head -1; }
    for n in $TESTS; do cp "$(newest debug "$n")" "$dst/bin/test_$n"; done
    cp "$(newest release gpu)" "$dst/bin/bench_gpu"
    cp "$tgt/release/popen" "$dst/bin/popen"
    strip "$dst"/bin/test_* "$dst"/bin/bench_gpu "$dst"/bin/popen
    # the tests find their fixtures under the build's CARGO_MANIFEST_DIR
    pwd > "$dst/bin/manifest_dir"
    tar -C "$dst" -czf "$dst/bins.tar.gz" bin && rm -r "$dst/bin"
    du -sh "$dst"
    exit 0
fi

dir="${1:?usage: gpu_check.sh DIR (the folder made by --collect)}"
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-gpu_logs}"
mkdir -p "$out"
t_start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t_start )) s] $*"; }
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || { echo "no nvidia-smi: not a GPU machine"; exit 2; }
head -12 "$out/nvidia-smi.txt"
work="$(mktemp -d)"
tar -C "$work" -xzf "$dir/bins.tar.gz" || { echo "cannot unpack $dir/bins.tar.gz"; exit 2; }
bin="$work/bin"
# the tests read fixtures under the path they were built in: point it at this checkout
built_in="$(cat "$bin/manifest_dir")"
if [[ "$built_in" != "$here" && ! -e "$built_in" ]]; then
    mkdir -p "$(dirname "$built_in")" && ln -s "$here" "$built_in" && stamp "linked $built_in -> $here"
fi

# cudarc loads libcuda (the driver's) and libcublas at run time: put every folder that
# holds a libcublas on the library path (the CUDA toolkit's, or the pip wheels').
libdirs=$(find /usr/local /opt /usr/lib -name 'libcublas.so*' -not -path '*/stubs/*' 2>/dev/null | xargs -r -n1 dirname | sort -u | paste -sd:)
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
stamp "libcublas folders: ${libdirs:-none found}"

# SECTIONS picks what runs (default all): tests bench torch train; TESTS and BENCH_SECTIONS
# narrow the test binaries and the sections of benches/gpu.rs
want() { [[ " ${SECTIONS:-tests bench torch train} " == *" $1 "* ]]; }
fail=0
sanitized=0
want tests || TESTS=""
for n in $TESTS; do
    t="$bin/test_$n"
    log="$work/test_$n.log"
    POPEN_TEST_CUDA=1 timeout "${TEST_TIMEOUT:-90}" "$t" --test-threads="${TEST_THREADS:-8}" > "$log" 2>&1
    rc=$?
    { echo "==== test_$n rc=$rc"; cat "$log"; } >> "$out/tests.log"
    stamp "test_$n: rc=$rc $(grep -E '^test result' "$log" | tail -1)"
    if [[ $rc -ne 0 ]]; then
        fail=1
        grep -E "^test .* FAILED|panicked" "$log" | head -8
        # the first failing tests again, under the memory checker (two at most: it is slow)
        if command -v compute-sanitizer > /dev/null && [[ $sanitized -lt 2 ]]; then
            for f in $(grep -E "^test .* FAILED" "$log" | awk '{print $2}' | head -$((2 - sanitized))); do
                POPEN_TEST_CUDA=1 timeout 60 compute-sanitizer --print-limit 20 "$t" --exact "$f" --test-threads=1 \
                    >> "$out/sanitizer.log" 2>&1
                sanitized=$((sanitized + 1))
                stamp "compute-sanitizer on $f: $(grep -E 'ERROR SUMMARY' "$out/sanitizer.log" | tail -1)"
            done
        fi
    fi
done

# one process per section, so that one failing section does not lose the others
want bench && for section in ${BENCH_SECTIONS:-probe copy optim norm perturb logprob mask image attention decode stack}; do
    timeout "${BENCH_TIMEOUT:-150}" "$bin/bench_gpu" --bench "$section" >> "$out/bench_gpu.jsonl" 2>> "$out/bench_err.log"
    stamp "bench_gpu $section: rc=$? $(tail -1 "$out/bench_gpu.jsonl")"
done
if want torch; then
    PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT:-150}" python3 "$here/tools/bench_gpu_torch.py" \
        > "$out/bench_gpu_torch.jsonl" 2>> "$out/bench_err.log"
    stamp "bench_gpu_torch: rc=$? ($(wc -l < "$out/bench_gpu_torch.jsonl") lines)"
fi
if want bench && ! grep -q '"ms"' "$out/bench_gpu.jsonl"; then
    echo "benches/gpu.rs timed nothing: Device::cuda(0) failed?"; cat "$out/bench_gpu.jsonl" "$out/bench_err.log" | tail -5
    fail=1
fi

# stage 1 end to end: the same run on the GPU and on this machine's CPU cores
popen="$bin/popen"
w="$work/world"
steps="${STEPS:-40}"
want train && {
    "$popen" data generate --out "$w" --n 400 --seed 1 --split train > /dev/null &&
    "$popen" data generate --out "$w" --n 50 --seed 1 --split test > /dev/null
} >> "$out/train.log" 2>&1
want train && for dev in cuda cpu; do
    t0=$(date +%s.%N)
    timeout "${TRAIN_TIMEOUT:-150}" "$popen" train sft --data "$w/train.json" --out "$work/run_$dev" \
        --config "$here/tools/configs/stage1_world.toml" --steps "$steps" --device "$dev" >> "$out/train.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    timeout "${TRAIN_TIMEOUT:-150}" "$popen" predict --checkpoint "$work/run_$dev" --data "$w/test.json" \
        --out "$work/pred_$dev.jsonl" --device "$dev" >> "$out/train.log" 2>&1
    rc2=$?
    t2=$(date +%s.%N)
    [[ $rc -eq 0 ]] && python3 -c "import json; print(json.dumps({'name': 'train_sft_world_${steps}steps_$dev', \
        'ms': round(($t1 - $t0) * 1000 / $steps, 2), 'steps_s': round($steps / ($t1 - $t0), 3)}))" >> "$out/bench_gpu.jsonl"
    [[ $rc2 -eq 0 ]] && python3 -c "import json; q = sum(1 for _ in open('$work/pred_$dev.jsonl')); \
        print(json.dumps({'name': 'predict_world_test_$dev', 'ms': round(($t2 - $t1) * 1000, 1), \
        'questions_s': round(q / ($t2 - $t1), 2)}))" >> "$out/bench_gpu.jsonl"
    # the K = 3 ensemble (Sec. 3.3) on the same run: per-key bias through the kernels
    timeout "${TRAIN_TIMEOUT:-150}" "$popen" predict --checkpoint "$work/run_$dev" --data "$w/test.json" \
        --out "$work/ens_$dev.jsonl" --device "$dev" --ensemble 3 >> "$out/train.log" 2>&1
    rc3=$?
    t3=$(date +%s.%N)
    [[ $rc3 -eq 0 ]] && python3 -c "import json; q = sum(1 for _ in open('$work/ens_$dev.jsonl')); \
        print(json.dumps({'name': 'predict_ensemble3_world_test_$dev', 'ms': round(($t3 - $t2) * 1000, 1), \
        'questions_s': round(q / ($t3 - $t2), 2)}))" >> "$out/bench_gpu.jsonl"
    stamp "train sft --device $dev: rc=$rc; predict: rc=$rc2; ensemble: rc=$rc3 $(tail -1 "$out/bench_gpu.jsonl")"
    [[ $rc -eq 0 && $rc2 -eq 0 && $rc3 -eq 0 ]] || fail=1
    grep '"loss"' "$work/run_$dev/metrics.jsonl" | head -3 | sed "s/^/$dev metrics: /" >> "$out/train.log"
done
# where predict's GPU time and driver calls go, by kernel, product and zero-fill (a
# profiled run is not a timed one: each entry costs two events)
want train && [[ -d "$work/run_cuda" ]] && {
    timeout "${TRAIN_TIMEOUT:-150}" "$popen" predict --checkpoint "$work/run_cuda" --data "$w/test.json" \
        --out "$work/pred_profiled.jsonl" --device cuda --profile "$out/predict_profile_cuda.jsonl" \
        >> "$out/train.log" 2>&1
    stamp "predict --profile on cuda: rc=$? ($(wc -l < "$out/predict_profile_cuda.jsonl" 2>/dev/null) rows)"
}

python3 "$here/tools/gpu_summary.py" "$out" > "$out/gpu_check.json"
cat "$out/gpu_check.json"
rm -rf "$work"
exit $fail
