#!/usr/bin/env python3
"""Pull-mode backup (copy-before-write + snapshot-access, QEMU 7.0's fleecing graph)
in `stillpoint daemon` and qemu-storage-daemon, side by side in one run.

For each daemon (same command line): the mixed image of bench/backup_vs_qsd.py (SIZE,
1 GiB by default) as a raw node with a writable NBD export. First, guest QD1 4 KiB
random writes and reads, alternating, through that export (libnbd) are timed alone;
then the export goes, the fleecing graph goes in (a sparse raw temp file as the copy-before-write target, a
snapshot-access node, the guest export back on the filter, a read-only export of the
snapshot; a copy of the disk is taken just before, while nothing writes it) and the
same number of guest writes and reads is timed again: each write to a cluster
not yet saved first copies its old 64 KiB to the temp file. Then the whole snapshot is
pulled with `nbdcopy` (timed, the source evicted from the page cache first), and the
pulled image is compared with that copy.

Usage: cargo build --release -p stillpoint &&
       python3 bench/fleecing_vs_qsd.py [--size 1G] [--runs 3] [--ops 2000] [--dir DIR]
(needs python3-libnbd: run with the system python3)
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backup_vs_qsd as common  # noqa: E402


def guest_latencies(sock, export, ops, seed, with_reads=True):
    """QD1 4 KiB random writes and (with_reads) reads, alternating: (write samples, read
    samples)."""
    import nbd

    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(sock)
    size = h.get_size()
    rng = random.Random(seed)
    buf = b"\x5a" * 4096
    writes, reads = [], []
    for _ in range(ops):
        offset = rng.randrange(size // 4096) * 4096
        t = time.perf_counter()
        h.pwrite(buf, offset)
        writes.append((time.perf_counter() - t) * 1e6)
        if not with_reads:
            continue
        offset = rng.randrange(size // 4096) * 4096
        t = time.perf_counter()
        h.pread(4096, offset)
        reads.append((time.perf_counter() - t) * 1e6)
    h.shutdown()
    return writes, reads


def one_round(program, tmp, src, ops, seed):
    sock = os.path.join(tmp, "nbd.sock")
    if os.path.exists(sock):
        os.unlink(sock)  # qemu-storage-daemon leaves its NBD socket behind
    temp = os.path.join(tmp, "fleece.raw")
    snap = os.path.join(tmp, "snap.raw")
    pulled = os.path.join(tmp, "pulled.raw")
    size = os.path.getsize(src)
    with open(temp, "wb") as f:
        f.truncate(size)
    proc, qmp = common.start_qsd(tmp, extra=[
        "--blockdev", f"driver=raw,node-name=src,file.driver=file,file.filename={src}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=guest,node-name=src,name=disk,writable=on"], program=program)
    try:
        alone = guest_latencies(sock, "disk", ops, seed)
        qmp.cmd("block-export-del", id="guest")
        qmp.wait_event("BLOCK_EXPORT_DELETED")
        # Nothing writes the disk now: this copy is the snapshot-to-be. Write-back of
        # the copy is finished before anything is timed again.
        subprocess.run(["cp", "--sparse=always", src, snap], check=True)
        subprocess.run(["sync"], check=True)
        qmp.cmd("blockdev-add", driver="file", **{"node-name": "fl-tmp"}, filename=temp)
        qmp.cmd("blockdev-add", driver="copy-before-write", **{"node-name": "fl-cbw"},
                file="src", target="fl-tmp")
        qmp.cmd("blockdev-add", driver="snapshot-access", **{"node-name": "fl-access"}, file="fl-cbw")
        qmp.cmd("block-export-add", type="nbd", id="guest", **{"node-name": "fl-cbw"}, name="disk",
                writable=True)
        qmp.cmd("block-export-add", type="nbd", id="fleece", **{"node-name": "fl-access"}, name="fleece")
        during = guest_latencies(sock, "disk", ops, seed + 1)
        common.evict(src)
        start = time.monotonic()
        subprocess.run(["nbdcopy", f"nbd+unix:///fleece?socket={sock}", pulled], check=True)
        pull = time.monotonic() - start
        if not common.identical(snap, pulled):
            raise RuntimeError(f"{program[0]}: the pulled snapshot differs from the disk at fleecing time")
        return alone, during, pull
    finally:
        common.stop_qsd(proc, qmp)
        for path in (snap, pulled, temp):
            if os.path.exists(path):
                os.unlink(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = common.parse_size(args.size)
    if not os.path.exists(common.STILLPOINT):
        sys.exit("build first: cargo build --release -p stillpoint")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = common.alternate_daemons(
            tmp, size, args.runs,
            lambda program, src, round_: one_round(program, tmp, src, args.ops, 100 + round_))
    print(f"size {size >> 20} MiB, {args.ops} guest QD1 4 KiB writes and as many reads per phase "
          f"(alternating), {args.runs} runs; p50/p99 over all runs, then the median and range of "
          "the runs' own p99s; pull time median (all runs)")
    summary = {}
    for name, runs in results.items():
        row = {}
        for kind, k in (("writes", 0), ("reads", 1)):
            alone = common.percentiles([s for r in runs for s in r[0][k]])
            during = common.percentiles([s for r in runs for s in r[1][k]])
            per_run = [common.percentiles(r[1][k])["p99_us"] for r in runs]
            row[kind] = (alone, during)
            print(f"  {name:20s} {kind:6s} p50/p99 alone {alone['p50_us']:6.0f}/{alone['p99_us']:6.0f} us"
                  f"   while fleecing {during['p50_us']:6.0f}/{during['p99_us']:6.0f} us"
                  f"   run p99s {statistics.median(per_run):.0f} ({min(per_run):.0f}-{max(per_run):.0f}) us")
        pull = statistics.median(r[2] for r in runs)
        row["pull"] = pull
        summary[name] = row
        print(f"  {name:20s} pull {pull:6.2f} s ({', '.join(f'{r[2]:.2f}' for r in runs)})")
    ours, theirs = summary["stillpoint"], summary["qemu-storage-daemon"]
    for kind in ("writes", "reads"):
        o, t = ours[kind][1], theirs[kind][1]
        print(f"ratios stillpoint / qemu-storage-daemon, {kind} while fleecing: "
              f"p50 {o['p50_us'] / t['p50_us']:.2f}, p99 {o['p99_us'] / t['p99_us']:.2f}")
    print(f"ratio stillpoint / qemu-storage-daemon, pull: {ours['pull'] / theirs['pull']:.2f}")


if __name__ == "__main__":
    main()
