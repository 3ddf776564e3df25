#!/usr/bin/env bash
# Fuzzing: builds every cargo-fuzz target under fuzz/ (libFuzzer and AddressSanitizer on
# the machine's own stable toolchain, which RUSTC_BOOTSTRAP=1 lets take the nightly
# flags; overflow checks and debug assertions on) and runs each for a bounded time with
# memory limits. The harnesses are in crates/fuzzing.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]   default 30; FUZZ_TARGETS="qmp nbd_server" picks
#   bash scripts/fuzz.sh seeds DIR              writes the generated qcow2 seeds into DIR
#
# Seeds: fuzz/corpus/TARGET (committed, small), fuzz/regressions/TARGET (inputs that once
# crashed), and for qcow2_open images made here by qemu-img (disk images are never
# committed). What the fuzzer finds goes to a temporary corpus, so the committed one does
# not grow. A crash fails this script; its input is in fuzz/artifacts/TARGET/: fix the
# bug, then copy the input into fuzz/regressions/TARGET/, where the replay test of
# crates/fuzzing runs it on every test run.
set -euo pipefail
cd "$(dirname "$0")/.."

# qcow2 images of many shapes, small: cluster sizes, versions, compression, zero and
# discarded clusters, a bitmap, a backing file name (never followed by the harness).
qcow2_seeds() {
  local dir=$1 img
  mkdir -p "$dir"
  img=$dir/c4k.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=4k "$img" 1M
  qemu-io -c 'write -P 1 0 8k' -c 'write -z 16k 4k' -c 'write -c -P 2 32k 4k' \
    -c 'discard 8k 4k' -c 'write -P 3 900k 5000' "$img" >/dev/null
  img=$dir/v2-c512.qcow2
  qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 "$img" 256k
  qemu-io -c 'write -P 4 1000 3000' -c 'write -z 8k 1k' "$img" >/dev/null
  img=$dir/zstd-bitmap.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=4k,compression_type=zstd "$img" 512k
  qemu-img bitmap --add -g 4096 "$img" daily
  qemu-io -c 'write -c -P 5 0 4k' -c 'write -P 6 64k 4k' "$img" >/dev/null
  img=$dir/backed.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=4k -b /nonexistent/base.raw -F raw -u "$img" 128k
  img=$dir/refcount1-c8k.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=8k,refcount_bits=1 "$img" 256k
  qemu-io -c 'write -P 7 0 16k' "$img" >/dev/null
}

if [ "${1:-}" = seeds ]; then
  qcow2_seeds "$2"
  exit 0
fi

seconds=${1:-30}
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null 2>&1 || {
  echo "fuzz: cargo-fuzz is missing; run bash scripts/setup.sh" >&2
  exit 1
}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
qcow2_seeds "$work/qcow2-seeds"

cd fuzz
cargo fuzz build -O -a
targets=${FUZZ_TARGETS:-$(cargo fuzz list)}
failed=()
for target in $targets; do
  mkdir -p "$work/$target" "regressions/$target"
  seeds=()
  for dir in "corpus/$target" "regressions/$target"; do
    if [ -d "$dir" ]; then seeds+=("$dir"); fi
  done
  if [ "$target" = qcow2_open ]; then seeds+=("$work/qcow2-seeds"); fi
  echo "fuzz: $target for ${seconds}s"
  # rss_limit_mb: the whole process; malloc_limit_mb: any one allocation (a 512 MiB
  # bitmap, the largest the code allows, must fit); timeout: seconds per input.
  if ! cargo fuzz run -O -a "$target" "$work/$target" "${seeds[@]}" -- \
      -max_total_time="$seconds" -rss_limit_mb=2560 -malloc_limit_mb=1024 -timeout=20 \
      -print_final_stats=1 2>"$work/$target.log"; then
    tail -n 40 "$work/$target.log" >&2
    failed+=("$target")
  else
    grep -E "^stat::(number_of_executed_units|new_units_added|peak_rss_mb)" "$work/$target.log" \
      | tr '\n' ' ' || true
    echo
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/; once fixed, copy them into" \
       "fuzz/regressions/TARGET/)" >&2
  exit 1
fi
echo "fuzz: every target ran ${seconds}s without a crash"
