#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ (or the ones named) and prints the executions
# each reached.  Exits non-zero when a target crashes, times out (> 1 s on one input)
# or passes 2 GiB of memory; libFuzzer leaves the input in fuzz/artifacts/<target>/.
#
#   tools/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   # default 60 s per target
#   FUZZ_RUNS=1000000 tools/fuzz.sh 600 muse         # stop at 10^6 executions or 600 s
#   FUZZ_TIMEOUT=30 tools/fuzz.sh 170                 # on a shared machine (see below)
#
# Needs the nightly toolchain (libFuzzer's coverage instrumentation); installs
# cargo-fuzz from crates.io when it is missing.  The corpus grows in fuzz/corpus/
# (not committed); the committed seeds in fuzz/seeds/ come from the test fixtures
# (fuzz/make_seeds.py).  Built without a sanitizer (the loaders are safe Rust; this
# doubles the executions per second) but with debug assertions, so an integer
# overflow is a crash.  libFuzzer's timeout is wall-clock time: under `nice -n 19` on a
# busy machine a 1 ms input can wait seconds for a core, so raise FUZZ_TIMEOUT there
# and rerun any timeout input alone (`fuzz/target/*/release/TARGET INPUT`).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
shift || true
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
# -s none: no sanitizer; -a: debug assertions and overflow checks; --release is the default
flags=(--fuzz-dir fuzz -s none -a)
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list --fuzz-dir fuzz)
fi
cargo +nightly fuzz build "${flags[@]}"
limit="-max_total_time=$secs"
if [ -n "${FUZZ_RUNS:-}" ]; then
  limit="-runs=$FUZZ_RUNS $limit"
fi
mkdir -p fuzz/logs
failed=()
summary=""
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="fuzz/logs/$t.log"
  echo "== $t ($limit)"
  # shellcheck disable=SC2086 # $limit is one or two flags
  if cargo +nightly fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
      $limit -timeout="${FUZZ_TIMEOUT:-1}" -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1 \
      >"$log" 2>&1; then
    status=ok
  else
    status=FAILED
    failed+=("$t")
    tail -n 40 "$log"
  fi
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
  line="$(printf '%-16s %12s executions  %s' "$t" "${execs:-?}" "$status")"
  echo "$line"
  summary+="$line"$'\n'
done
echo
echo "fuzzing $(date -u +%Y-%m-%d), $limit per target:"
printf '%s' "$summary"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed: ${failed[*]} (inputs in fuzz/artifacts/, logs in fuzz/logs/)" >&2
  exit 1
fi
