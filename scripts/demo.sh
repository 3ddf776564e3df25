#!/usr/bin/env bash
# The run command: builds Stillpoint and runs `stillpoint demo`: a sample disk, the
# daemon's machinery with an NBD export of it, a live backup while writes go through
# NBD, and a check that the backup equals the disk as it was when the backup started
# and that the disk kept every write. Extra arguments go to `stillpoint demo`
# (--size MIB, --seed N, --dir DIR).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p stillpoint
exec target/release/stillpoint demo "$@"
