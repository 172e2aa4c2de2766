#!/usr/bin/env bash
# Wall, user and system seconds of each test binary of `cargo test`, run one after
# another (the emulator's cost shows in the kernel and CLI tests), then the total wall.
# Usage: bash tools/test_times.sh [cargo test args, e.g. --test kernel_attention]
set -euo pipefail
cd "$(dirname "$0")/.."
bins=$(cargo test --no-run "$@" 2>&1 | grep -o 'target/[^ )]*/deps/[^ )]*' | sort -u)
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
total=0
printf '%-28s %8s %8s %8s\n' binary wall_s user_s sys_s
for b in $bins; do
    start=$(date +%s%N)
    if ! /usr/bin/time -f '%U %S' -o "$tmp" "$b" -q > /dev/null 2>&1; then
        echo "$b failed" >&2
        exit 1
    fi
    ms=$((($(date +%s%N) - start) / 1000000))
    total=$((total + ms))
    read -r user sys < "$tmp"
    name=$(basename "$b")
    printf '%-28s %8s %8s %8s\n' "${name%-*}" "$((ms / 1000)).$(printf %03d $((ms % 1000)))" "$user" "$sys"
done
printf '%-28s %8s\n' total "$((total / 1000)).$(printf %03d $((total % 1000)))"
