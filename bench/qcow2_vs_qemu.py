#!/usr/bin/env python3
"""qcow2 writing, Stillpoint against QEMU, side by side in one run.

1. Sequential write into a fresh qcow2: SIZE bytes (1 GiB by default) of random data,
   raw, copied into a new qcow2 image (64 KiB clusters):
   * stillpoint: `stillpoint backup SRC TGT --target-format qcow2` (process start,
     image creation, the copy, the final flush and close);
   * `qemu-img convert -O qcow2 SRC TGT` followed by an fsync of the target.
2. Full backup raw -> qcow2 of the mixed image of bench/backup_vs_qsd.py (half random
   data, a quarter zeros written as data, a quarter holes), into a qcow2 made by
   `qemu-img create`, through each daemon's QMP: blockdev-add of both nodes, then timed
   from blockdev-backup to BLOCK_JOB_COMPLETED plus blockdev-del of the target (which
   writes its metadata and flushes). `stillpoint daemon` and qemu-storage-daemon get the
   same commands; `qemu-img convert -O qcow2` of the same image is the reference.
3. The same backup with `compress: true` through both daemons.

The source is evicted from the page cache before every run; each figure is the median of
RUNS runs; every output is checked with `qemu-img check` and `qemu-img compare` once.
Ratios are stillpoint / QEMU (below 1.0 = Stillpoint faster).

Usage: cargo build --release -p stillpoint &&
       python3 bench/qcow2_vs_qemu.py [--size 1G] [--runs 3] [--dir DIR]
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

MIB = 1 << 20


def make_random(path, size, seed):
    rng = random.Random(seed)
    pool = rng.randbytes(64 * MIB)
    with open(path, "wb") as f:
        for i in range(size // (4 * MIB)):
            at = rng.randrange(0, len(pool) - 4 * MIB)
            f.write(pool[at:at + 4 * MIB])
        f.flush()
        os.fsync(f.fileno())


def check_and_compare(src, image):
    check = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
    same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", src, image])
    if check.returncode != 0 or same.returncode != 0:
        raise RuntimeError(f"{image}: check rc={check.returncode} {check.stdout} compare rc={same.returncode}")


def interleaved(tools, runs):
    """Runs each (name, fn, src) in turn, RUNS rounds, so slow phases of this noisy VM
    hit every tool alike; returns {name: (median, times)}."""
    times = {name: [] for name, _, _ in tools}
    for round_ in range(runs):
        # Rotate who goes first each round: position in a round matters on this VM.
        order = tools[round_ % len(tools):] + tools[:round_ % len(tools)]
        for name, fn, src in order:
            common.evict(src)
            times[name].append(fn())
    return {name: (statistics.median(t), t) for name, t in times.items()}


def daemon_backup(program, tmp, src, tgt, size, compress=False):
    if os.path.exists(tgt):
        os.unlink(tgt)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", tgt, str(size)], check=True)
    proc, qmp = common.start_qsd(tmp, program=program)
    try:
        common.add_raw(qmp, "src", src)
        qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "tgt"},
                file={"driver": "file", "filename": tgt})
        start = time.monotonic()
        qmp.cmd("blockdev-backup", **{"job-id": "j"}, device="src", target="tgt", sync="full",
                compress=compress)
        done = qmp.wait_event("BLOCK_JOB_COMPLETED")
        for _ in range(500):  # qemu-storage-daemon releases the target just after the event
            try:
                qmp.cmd("blockdev-del", **{"node-name": "tgt"})
                break
            except RuntimeError as e:
                if "busy" not in str(e):
                    raise
                time.sleep(0.001)
        took = time.monotonic() - start
        if "error" in done["data"]:
            raise RuntimeError(f"{program[0]} backup failed: {done['data']}")
        return took
    finally:
        common.stop_qsd(proc, qmp)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = common.parse_size(args.size)
    stillpoint = common.STILLPOINT
    if not os.path.exists(stillpoint):
        sys.exit("build first: cargo build --release -p stillpoint")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rnd = os.path.join(tmp, "random.raw")
        mixed = os.path.join(tmp, "mixed.raw")
        out = os.path.join(tmp, "out.qcow2")
        make_random(rnd, size, 1)
        common.make_image(mixed, size, 2)

        def ours_write():
            if os.path.exists(out):
                os.unlink(out)
            start = time.monotonic()
            subprocess.run([stillpoint, "backup", rnd, out, "--target-format", "qcow2"],
                           check=True, stdout=subprocess.DEVNULL)
            return time.monotonic() - start

        def convert(src):
            def run():
                if os.path.exists(out):
                    os.unlink(out)
                start = time.monotonic()
                subprocess.run(["qemu-img", "convert", "-O", "qcow2", src, out], check=True)
                common.fsync(out)
                return time.monotonic() - start
            return run

        ours_daemon = (stillpoint, "daemon")
        results = {}
        results.update(interleaved([
            ("write/stillpoint", ours_write, rnd),
            ("write/qemu-img convert", convert(rnd), rnd),
        ], args.runs))
        results.update(interleaved([
            ("backup/stillpoint daemon", lambda: daemon_backup(ours_daemon, tmp, mixed, out, size), mixed),
            ("backup/qemu-storage-daemon",
             lambda: daemon_backup(("qemu-storage-daemon",), tmp, mixed, out, size), mixed),
            ("backup/qemu-img convert", convert(mixed), mixed),
        ], args.runs))
        results.update(interleaved([
            ("compressed/stillpoint daemon",
             lambda: daemon_backup(ours_daemon, tmp, mixed, out, size, True), mixed),
            ("compressed/qemu-storage-daemon",
             lambda: daemon_backup(("qemu-storage-daemon",), tmp, mixed, out, size, True), mixed),
        ], args.runs))
        # Every tool's output, once more, checked.
        for fn, src in ((ours_write, rnd), (convert(rnd), rnd),
                        (lambda: daemon_backup(ours_daemon, tmp, mixed, out, size), mixed),
                        (lambda: daemon_backup(("qemu-storage-daemon",), tmp, mixed, out, size), mixed),
                        (lambda: daemon_backup(ours_daemon, tmp, mixed, out, size, True), mixed),
                        (lambda: daemon_backup(("qemu-storage-daemon",), tmp, mixed, out, size, True),
                         mixed)):
            fn()
            check_and_compare(src, out)

    print(f"size {size >> 20} MiB, {args.runs} runs each: median and best wall seconds (all runs)")
    for name, (median, times) in results.items():
        print(f"  {name:32s} {median:7.2f} s  best {min(times):6.2f} s   "
              f"({', '.join(f'{t:.2f}' for t in times)})")

    def ratio(a, b):
        ta, tb = results[a][1], results[b][1]
        return f"median {statistics.median(ta) / statistics.median(tb):.2f}, best {min(ta) / min(tb):.2f}"

    print("ratios (stillpoint / other; below 1.0 = stillpoint faster):")
    print(f"  sequential write vs qemu-img convert:        {ratio('write/stillpoint', 'write/qemu-img convert')}")
    print(f"  raw->qcow2 backup vs qemu-storage-daemon:    "
          f"{ratio('backup/stillpoint daemon', 'backup/qemu-storage-daemon')}")
    print(f"  raw->qcow2 backup vs qemu-img convert:       "
          f"{ratio('backup/stillpoint daemon', 'backup/qemu-img convert')}")
    print(f"  compressed backup vs qemu-storage-daemon:    "
          f"{ratio('compressed/stillpoint daemon', 'compressed/qemu-storage-daemon')}")


if __name__ == "__main__":
    main()
