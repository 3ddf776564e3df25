#!/usr/bin/env bash
# The run command: builds Stillpoint, makes a sparse raw image with data, written zeros
# and a hole, takes a live point-in-time backup of it with `stillpoint backup`, and
# checks the result (with qemu-img compare when QEMU's tools are installed).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p stillpoint
sp=target/release/stillpoint
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img=$work/disk.img
bak=$work/backup.img

"$sp" create -f raw "$img" 256M
# 32 MiB of data at 16 MiB, 8 MiB of zero bytes written as data at 64 MiB, a tail byte.
head -c 32M /dev/urandom | dd of="$img" bs=1M seek=16 conv=notrunc status=none
head -c 8M /dev/zero | dd of="$img" bs=1M seek=64 conv=notrunc status=none
printf 'x' | dd of="$img" bs=1 seek=$((256 * 1024 * 1024 - 1)) conv=notrunc status=none
# Punch a hole in the middle of the data run.
fallocate --punch-hole --offset $((24 * 1024 * 1024)) --length 4M "$img" 2>/dev/null || true

echo "== stillpoint map --output json $img"
"$sp" map --output json "$img"
echo "== stillpoint backup $img $bak"
"$sp" backup "$img" "$bak"
echo "== disk usage (KiB): source $(du -k "$img" | cut -f1), backup $(du -k "$bak" | cut -f1)"
if command -v qemu-img >/dev/null 2>&1; then
  echo "== qemu-img compare"
  qemu-img compare -f raw -F raw "$img" "$bak"
else
  cmp "$img" "$bak" && echo "== cmp: identical"
fi
