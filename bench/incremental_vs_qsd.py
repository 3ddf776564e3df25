#!/usr/bin/env python3
"""Incremental backup after 1% of a disk changed, against a full backup and against
qemu-storage-daemon doing the same, side by side in one run.

For each daemon (`stillpoint daemon`, then qemu-storage-daemon, same command line):
the mixed image of bench/backup_vs_qsd.py (SIZE, 4 GiB by default) as a raw node with
a writable NBD export; one `transaction` adds a dirty bitmap and starts a full backup
into a fresh qcow2 (timed: blockdev-backup to BLOCK_JOB_COMPLETED plus blockdev-del of
the target); then 1% of the disk is rewritten through the NBD export by qemu-io (the
same seeded 64 KiB writes for both); then an incremental backup (`sync: incremental`)
into a qcow2 backed by the full one (timed the same way). The source is evicted from
the page cache before each timed backup. Every backup is checked with `qemu-img check`
and compared, through its chain, with a copy of the disk taken when it started.

Goal: the incremental takes under 5% of the full backup's time.

Usage: cargo build --release -p stillpoint &&
       python3 bench/incremental_vs_qsd.py [--size 4G] [--runs 3] [--dir DIR]
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

CHUNK = 64 << 10


def timed_backup(qmp, target_name, target_path, backing, **args):
    create = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        create += ["-b", backing, "-F", "qcow2"]
    subprocess.run(create + [target_path, str(args.pop("size"))], check=True)
    qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": target_name},
            file={"driver": "file", "filename": target_path})
    qmp.events.clear()
    start = time.monotonic()
    if args.pop("with_bitmap", False):
        qmp.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "bm"}},
            {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": target_name,
                                                 "sync": "full"}}])
    else:
        qmp.cmd("blockdev-backup", **{"job-id": "j"}, device="src", target=target_name, **args)
    done = qmp.wait_event("BLOCK_JOB_COMPLETED")
    for _ in range(1000):  # qemu-storage-daemon releases the target just after the event
        try:
            qmp.cmd("blockdev-del", **{"node-name": target_name})
            break
        except RuntimeError as e:
            if "busy" not in str(e):
                raise
            time.sleep(0.001)
    took = time.monotonic() - start
    if "error" in done["data"]:
        raise RuntimeError(f"backup failed: {done['data']}")
    return took


def verify(snapshot, image):
    check = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
    same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", snapshot, image])
    if check.returncode != 0 or same.returncode != 0:
        raise RuntimeError(f"{image}: check {check.returncode}, compare {same.returncode}")


def one_round(program, tmp, src, size, writes):
    sock = os.path.join(tmp, "nbd.sock")
    if os.path.exists(sock):
        os.unlink(sock)  # qemu-storage-daemon leaves its NBD socket behind
    proc, qmp = common.start_qsd(tmp, extra=[
        "--blockdev", f"driver=raw,node-name=src,file.driver=file,file.filename={src}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=e,node-name=src,name=disk,writable=on"], program=program)
    full = os.path.join(tmp, "full.qcow2")
    inc = os.path.join(tmp, "inc.qcow2")
    snap = os.path.join(tmp, "snap.raw")
    try:
        for path in (full, inc):
            if os.path.exists(path):
                os.unlink(path)
        subprocess.run(["cp", "--sparse=always", src, snap], check=True)
        common.evict(src)
        t_full = timed_backup(qmp, "full", full, None, size=size, with_bitmap=True)
        verify(snap, full)
        commands = []
        for offset in writes:
            commands += ["-c", f"write -P {offset % 251} {offset} {CHUNK}"]
        uri = f"nbd+unix:///disk?socket={sock}"
        subprocess.run(["qemu-io", "-f", "raw", *commands, uri], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cp", "--sparse=always", src, snap], check=True)
        common.evict(src)
        t_inc = timed_backup(qmp, "inc", inc, "full.qcow2", size=size, sync="incremental", bitmap="bm")
        verify(snap, inc)
        return t_full, t_inc
    finally:
        common.stop_qsd(proc, qmp)
        if os.path.exists(snap):
            os.unlink(snap)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = common.parse_size(args.size)
    if not os.path.exists(common.STILLPOINT):
        sys.exit("build first: cargo build --release -p stillpoint")
    rng = random.Random(7)
    count = size // 100 // CHUNK
    writes = sorted(rng.randrange(0, size // CHUNK) * CHUNK for _ in range(count))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = common.alternate_daemons(
            tmp, size, args.runs, lambda program, src, _round: one_round(program, tmp, src, size, writes))
    print(f"size {size >> 20} MiB, {count} writes of 64 KiB ({count * CHUNK / size:.1%} of the disk), "
          f"{args.runs} runs, median seconds (all runs)")
    for name, runs in results.items():
        full = statistics.median(r[0] for r in runs)
        inc = statistics.median(r[1] for r in runs)
        print(f"  {name:20s} full {full:6.2f} s  incremental {inc:6.3f} s  "
              f"incremental/full {inc / full:6.1%}   "
              f"(incremental: {', '.join(f'{r[1]:.3f}' for r in runs)})")
    ours = statistics.median(r[1] for r in results["stillpoint"])
    theirs = statistics.median(r[1] for r in results["qemu-storage-daemon"])
    print(f"ratio incremental, stillpoint / qemu-storage-daemon: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
