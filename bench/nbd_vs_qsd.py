#!/usr/bin/env python3
"""NBD export throughput: `stillpoint nbd` against qemu-storage-daemon's export of the
same file, same client (python3-libnbd), same run.

For each of sequential and random access, 4 KiB and 64 KiB requests, reads and
writes: DURATION seconds of requests at queue depth DEPTH (libnbd's asynchronous API),
against each server in turn (alternating, twice), best of the two. Reports MiB/s and the
ratio stillpoint / qemu-storage-daemon (goal: at least 1.0).

Usage: cargo build --release -p stillpoint && python3 bench/nbd_vs_qsd.py [--size 1G]
       [--seconds 3] [--depth 8]
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

sys.path.append("/usr/lib/python3/dist-packages")
import nbd  # python3-libnbd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STILLPOINT = os.path.join(ROOT, "target", "release", "stillpoint")


def wait_for(path):
    for _ in range(500):
        if os.path.exists(path):
            return
        time.sleep(0.01)
    raise RuntimeError(f"{path} never appeared")


def start_stillpoint(image, sock):
    proc = subprocess.Popen([STILLPOINT, "nbd", image, "--socket", sock, "--writable", "--name", "disk"],
                            stderr=subprocess.DEVNULL)
    wait_for(sock)
    return proc


def start_qsd(image, sock):
    proc = subprocess.Popen([
        "qemu-storage-daemon",
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--blockdev", "driver=raw,node-name=disk,file=f",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on",
    ], stderr=subprocess.DEVNULL)
    wait_for(sock)
    return proc


def run_pattern(sock, size, block, write, sequential, seconds, depth):
    h = nbd.NBD()
    h.set_export_name("disk")
    h.connect_unix(sock)
    rng = random.Random(7)
    buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(block)))
    blocks = size // block
    position = 0
    done = 0
    in_flight = 0

    def next_offset():
        nonlocal position
        if sequential:
            offset = (position % blocks) * block
            position += 1
            return offset
        return rng.randrange(blocks) * block

    def completed(*_):
        nonlocal done, in_flight
        done += 1
        in_flight -= 1
        return 1

    deadline = time.monotonic() + seconds
    start = time.monotonic()
    while time.monotonic() < deadline:
        while in_flight < depth:
            in_flight += 1
            if write:
                h.aio_pwrite(buf, next_offset(), completion=completed)
            else:
                h.aio_pread(nbd.Buffer(block), next_offset(), completion=completed)
        h.poll(-1)
    while in_flight > 0:
        h.poll(-1)
    took = time.monotonic() - start
    h.shutdown()
    return done * block / (1 << 20) / took


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--depth", type=int, default=8)
    args = ap.parse_args()
    units = {"M": 20, "G": 30}
    size = int(args.size[:-1]) << units[args.size[-1]] if args.size[-1] in units else int(args.size)
    if not os.path.exists(STILLPOINT):
        sys.exit("build first: cargo build --release -p stillpoint")
    tmp = tempfile.mkdtemp(prefix="stillpoint-nbd-bench-")
    image = os.path.join(tmp, "disk.img")
    with open(image, "wb") as f:
        for _ in range(size // (64 << 20)):
            f.write(os.urandom(64 << 20))
    servers = [("stillpoint", start_stillpoint), ("qemu-storage-daemon", start_qsd)]
    print(f"{size >> 20} MiB file, QD{args.depth}, {args.seconds} s per pattern, best of 2, MiB/s")
    print(f"{'pattern':<22}{'stillpoint':>12}{'QSD':>10}{'ratio':>8}")
    for sequential in (True, False):
        for block in (4096, 65536):
            for write in (False, True):
                best = {}
                for _ in range(2):
                    for name, start in servers:
                        sock = os.path.join(tmp, f"{name}.sock")
                        proc = start(image, sock)
                        try:
                            rate = run_pattern(sock, size, block, write, sequential, args.seconds, args.depth)
                        finally:
                            proc.terminate()
                            proc.wait()
                            if os.path.exists(sock):
                                os.unlink(sock)
                        best[name] = max(best.get(name, 0), rate)
                label = f"{'seq' if sequential else 'rand'} {block // 1024}K {'write' if write else 'read'}"
                ours, theirs = best["stillpoint"], best["qemu-storage-daemon"]
                print(f"{label:<22}{ours:>12.1f}{theirs:>10.1f}{ours / theirs:>8.2f}")
    subprocess.run(["rm", "-rf", tmp])


if __name__ == "__main__":
    main()
