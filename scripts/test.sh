#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace,
# the QMP compatibility suite, and every fuzzer for a bounded time
# (STILLPOINT_FUZZ_SECONDS per target, 30 by default; 0 skips fuzzing).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

# No import cycle between the top-level modules of any crate (the layering rule).
python3 scripts/module_cycles.py

# QMP compatibility: the same scenarios against qemu-storage-daemon and stillpoint
# daemon through QEMU's own client library (uses the debug binary built above).
cargo build -q -p stillpoint
.venv/bin/python -m pytest -q tests/compat
# Once more in another shape: disks 4097 bytes past 8 MiB (not whole sectors, not whole
# clusters) and every backup throttled to 16 MiB/s.
STILLPOINT_COMPAT_SIZE=8392705 STILLPOINT_COMPAT_SPEED=16777216 .venv/bin/python -m pytest -q tests/compat

# Every parser of untrusted bytes, fuzzed for a bounded time (libFuzzer + ASan).
fuzz_seconds=${STILLPOINT_FUZZ_SECONDS:-30}
if [ "$fuzz_seconds" != 0 ]; then
  bash scripts/fuzz.sh "$fuzz_seconds"
fi
