#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

# QMP compatibility: the same scenarios against qemu-storage-daemon and stillpoint
# daemon through QEMU's own client library (uses the debug binary built above).
cargo build -q -p stillpoint
.venv/bin/python -m pytest -q tests/compat
