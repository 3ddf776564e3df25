#!/usr/bin/env bash
# Installs what Stillpoint's tests need, idempotently: run it as often as you like.
# QEMU's tools (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon: the oracles the tests
# compare against) and libnbd's tools (nbdinfo, nbdcopy) with its Python binding.
set -euo pipefail

need_apt=()
command -v qemu-img >/dev/null 2>&1 || need_apt+=(qemu-utils)
command -v nbdinfo >/dev/null 2>&1 || need_apt+=(libnbd-bin)
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

# Python side of the tests: QEMU's own QMP client library and pytest, in a venv of the
# repository (ignored by git), so the system Python is left alone.
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import qemu.qmp, pytest" >/dev/null 2>&1; then
  "$venv/bin/pip" install -q "qemu.qmp==0.0.6" pytest
fi
echo "setup: qemu-img $(qemu-img --version | head -n1 | awk '{print $3}'), $(cargo --version)"
