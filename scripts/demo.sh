#!/usr/bin/env bash
# The run command, until the live backup lands: builds Stillpoint, makes a sparse raw
# image with some data and a hole punched in it, and inspects it with `info` and `map`
# (side by side with qemu-img map when it is installed).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release -q -p stillpoint
sp=target/release/stillpoint
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img=$work/disk.img

"$sp" create -f raw "$img" 64M
# 1 MiB of data at 4 MiB, 64 KiB of zero bytes written as data at 8 MiB, a tail byte.
head -c 1M /dev/urandom | dd of="$img" bs=1M seek=4 conv=notrunc status=none
head -c 64K /dev/zero | dd of="$img" bs=64K seek=128 conv=notrunc status=none
printf 'x' | dd of="$img" bs=1 seek=$((64 * 1024 * 1024 - 1)) conv=notrunc status=none
# Punch a hole in the middle of the data run.
fallocate --punch-hole --offset $((4 * 1024 * 1024 + 256 * 1024)) --length 256K "$img" 2>/dev/null || true

echo "== stillpoint info"
"$sp" info "$img"
echo "== stillpoint map --output json"
"$sp" map --output json "$img"
if command -v qemu-img >/dev/null 2>&1; then
  if diff <("$sp" map --output json "$img") <(qemu-img map --output=json -f raw "$img") >/dev/null; then
    echo "== qemu-img map --output=json prints the same map"
  else
    echo "== qemu-img map --output=json DIFFERS:"; qemu-img map --output=json -f raw "$img"; exit 1
  fi
fi
