#!/usr/bin/env python3
"""Guest write latency while fleecing, without the rest of fleecing_vs_qsd.py: one
daemon, the fleecing graph on a fresh 1 GiB mixed image (cached first), 3000 QD1 4 KiB
random writes through the filter's NBD export, p50/p90/p99 printed. Run it for each
daemon, alternating, to see how much of fleecing_vs_qsd.py's gap is the sitting.

Usage: python3 bench/fleecing_writes.py PROGRAM [perf]
  PROGRAM: target/release/stillpoint (run as `stillpoint daemon`) or qemu-storage-daemon
  perf:    record the daemon with `perf record -g` into /tmp/stillpoint-fleecing.perf
Environment: FLEECE=1 also exports the snapshot; ALONE=1 first times 1000 writes on the
plain disk; CP=1 copies and syncs the image (as fleecing_vs_qsd.py does) instead of
reading it into the cache.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backup_vs_qsd as common
import fleecing_vs_qsd as fl


def percentiles(samples):
    s = sorted(samples)
    return f"p50 {s[len(s) // 2]:.0f} us, p90 {s[int(len(s) * 0.9)]:.0f} us, p99 {s[int(len(s) * 0.99)]:.0f} us"


def main():
    program = (sys.argv[1], "daemon") if "stillpoint" in os.path.basename(sys.argv[1]) else (sys.argv[1],)
    tmp = tempfile.mkdtemp(prefix="stillpoint-fleecing-writes-", dir="/tmp")
    proc = qmp = None
    try:
        src, sock, temp = (os.path.join(tmp, n) for n in ("src.raw", "nbd.sock", "fleece.raw"))
        common.make_image(src, 1 << 30, 3)
        with open(temp, "wb") as f:
            f.truncate(1 << 30)
        proc, qmp = common.start_qsd(tmp, extra=[
            "--blockdev", f"driver=raw,node-name=src,file.driver=file,file.filename={src}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}"], program=program)
        if os.environ.get("ALONE"):
            qmp.cmd("block-export-add", type="nbd", id="guest0", **{"node-name": "src"}, name="disk",
                    writable=True)
            print("alone:", percentiles(fl.guest_latencies(sock, "disk", 1000, 6, with_reads=False)[0]))
            qmp.cmd("block-export-del", id="guest0")
            qmp.wait_event("BLOCK_EXPORT_DELETED")
        if os.environ.get("CP"):
            subprocess.run(["cp", "--sparse=always", src, os.path.join(tmp, "snap.raw")], check=True)
            subprocess.run(["sync"], check=True)
        else:
            subprocess.run(["cat", src], stdout=subprocess.DEVNULL, check=True)
        qmp.cmd("blockdev-add", driver="file", **{"node-name": "fl-tmp"}, filename=temp)
        qmp.cmd("blockdev-add", driver="copy-before-write", **{"node-name": "fl-cbw"}, file="src",
                target="fl-tmp")
        qmp.cmd("blockdev-add", driver="snapshot-access", **{"node-name": "fl-access"}, file="fl-cbw")
        qmp.cmd("block-export-add", type="nbd", id="guest", **{"node-name": "fl-cbw"}, name="disk",
                writable=True)
        if os.environ.get("FLEECE"):
            qmp.cmd("block-export-add", type="nbd", id="fleece", **{"node-name": "fl-access"}, name="fleece")
        perf = None
        if sys.argv[2:] == ["perf"]:
            perf = subprocess.Popen(["perf", "record", "-g", "-p", str(proc.pid), "-o",
                                     "/tmp/stillpoint-fleecing.perf"], stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        print(f"{program[0]} while fleecing:", percentiles(fl.guest_latencies(sock, "disk", 3000, 7, with_reads=False)[0]))
        if perf:
            perf.send_signal(2)
            perf.wait()
    finally:
        if proc:
            common.stop_qsd(proc, qmp)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
