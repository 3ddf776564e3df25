#!/usr/bin/env python3
"""Full backup, Stillpoint against qemu-storage-daemon, side by side in one run.

The image: SIZE bytes (4 GiB by default) of which about half is random data, a quarter
zeros written as data, and a quarter holes, laid out in shuffled 4 MiB segments from a
seed. Each tool backs it up raw to raw into a fresh sparse file, RUNS times, with the
source evicted from the page cache before every run; the median wall time is reported.

* stillpoint: `stillpoint backup SRC TGT` (includes process start, open, flush).
* qemu-storage-daemon: QMP blockdev-add of both nodes, then timed from blockdev-backup
  to BLOCK_JOB_COMPLETED plus blockdev-del of the target (which flushes it; Stillpoint
  flushes before reporting success). Daemon start-up is not counted.
* physical limits: `cp --sparse=always` and `qemu-img convert`, each followed by an
  fsync of the target.

Then guest latency: QD1 random 4 KiB writes and reads, alternating, to (a copy of) the
source, alone and during a full-speed backup (and how long the backup took under that
load): through the NBD export of `stillpoint daemon` and of
qemu-storage-daemon (same options, same python3-libnbd client), and Stillpoint in
process for reference. With `--flush-every N` the NBD contenders also flush after every
N write+read pairs (a guest's filesystem commits its journal that way), and the
flushes' latency is reported beside the writes' and reads'.

Usage: cargo build --release -p stillpoint -p stillpoint-bench &&
       python3 bench/backup_vs_qsd.py [--size 4G] [--runs 3] [--latency-rounds 1] [--flush-every 0] [--dir DIR]
"""

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.append("/usr/lib/python3/dist-packages")  # python3-libnbd under another interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STILLPOINT = os.path.join(ROOT, "target", "release", "stillpoint")
LATENCY_BIN = os.path.join(ROOT, "target", "release", "bench-backup-latency")
MIB = 1 << 20


def parse_size(text):
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    if text[-1].upper() in units:
        return int(text[:-1]) << units[text[-1].upper()]
    return int(text)


def make_image(path, size, seed, unique=False):
    """Half random data, a quarter written zeros, a quarter holes, in 4 MiB segments.
    The data segments are copies of one 64 MiB pool at random offsets, or with
    `unique` fresh random bytes each (nothing for a deduplicating chunker to find)."""
    rng = random.Random(seed)
    pool = None if unique else rng.randbytes(64 * MIB)
    segments = size // (4 * MIB)
    kinds = ["data", "data", "zero", "hole"] * (segments // 4 + 1)
    rng.shuffle(kinds)
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(segments):
            kind = kinds[i]
            if kind == "hole":
                continue
            f.seek(i * 4 * MIB)
            if kind == "zero":
                f.write(bytes(4 * MIB))
            elif unique:
                f.write(rng.randbytes(4 * MIB))
            else:
                at = rng.randrange(0, len(pool) - 4 * MIB)
                f.write(pool[at:at + 4 * MIB])
        f.flush()
        os.fsync(f.fileno())


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fsync(path):
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_target(path, size):
    if os.path.exists(path):
        os.unlink(path)
    with open(path, "wb") as f:
        f.truncate(size)


def identical(a, b):
    out = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", a, b])
    return out.returncode == 0


class Qmp:
    """A minimal QMP client: commands in order, events collected by a reader thread."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        for _ in range(200):
            try:
                self.sock.connect(path)
                break
            except OSError:
                time.sleep(0.02)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.events = []
        self.replies = []
        self.cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.cmd("qmp_capabilities")

    def _read(self):
        try:
            for line in self.file:
                msg = json.loads(line)
                with self.cond:
                    (self.events if "event" in msg else self.replies).append(msg)
                    self.cond.notify_all()
        except OSError:
            pass  # the daemon quit

    def cmd(self, name, /, **args):
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        with self.cond:
            self.cond.wait_for(lambda: self.replies, timeout=60)
            reply = self.replies.pop(0)
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error']}")
        return reply["return"]

    def seen(self, name):
        with self.cond:
            return any(e["event"] == name for e in self.events)

    def wait_event(self, name, timeout=600):
        with self.cond:
            ok = self.cond.wait_for(lambda: any(e["event"] == name for e in self.events), timeout)
        if not ok:
            raise RuntimeError(f"timed out waiting for {name}")
        return [e for e in self.events if e["event"] == name][-1]


def start_qsd(tmp, extra=(), program=("qemu-storage-daemon",)):
    """qemu-storage-daemon, or (with program) `stillpoint daemon` with the same options."""
    qmp_path = os.path.join(tmp, "qsd-qmp.sock")
    if os.path.exists(qmp_path):
        os.unlink(qmp_path)
    proc = subprocess.Popen(
        [*program, "--chardev", f"socket,id=m,path={qmp_path},server=on,wait=off",
         "--monitor", "chardev=m", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, Qmp(qmp_path)


def stop_qsd(proc, qmp):
    try:
        qmp.cmd("quit")
    except Exception:
        pass
    proc.wait(timeout=60)


def alternate_daemons(tmp, size, runs, one_round):
    """Runs `one_round(program, src, round_)` `runs` times for `stillpoint daemon` and
    qemu-storage-daemon, alternating which goes first, each on a fresh copy of the same
    mixed image (SIZE bytes) at `src`. Returns {name: [results]}."""
    src = os.path.join(tmp, "src.raw")
    make_image(src, size, 3)
    original = os.path.join(tmp, "original.raw")
    subprocess.run(["cp", "--sparse=always", src, original], check=True)
    programs = {"stillpoint": (STILLPOINT, "daemon"), "qemu-storage-daemon": ("qemu-storage-daemon",)}
    results = {name: [] for name in programs}
    for round_ in range(runs):
        order = list(programs) if round_ % 2 == 0 else list(reversed(programs))
        for name in order:
            subprocess.run(["cp", "--sparse=always", original, src], check=True)
            results[name].append(one_round(programs[name], src, round_))
    return results


def add_raw(qmp, name, path):
    qmp.cmd("blockdev-add", driver="raw", **{"node-name": name},
            file={"driver": "file", "filename": path})


def time_qsd(tmp, src, tgt):
    proc, qmp = start_qsd(tmp)
    try:
        add_raw(qmp, "src", src)
        add_raw(qmp, "tgt", tgt)
        start = time.monotonic()
        qmp.cmd("blockdev-backup", **{"job-id": "j"}, device="src", target="tgt", sync="full")
        done = qmp.wait_event("BLOCK_JOB_COMPLETED")
        qmp.cmd("blockdev-del", **{"node-name": "tgt"})
        took = time.monotonic() - start
        if "error" in done["data"]:
            raise RuntimeError(f"qemu-storage-daemon backup failed: {done['data']}")
        return took
    finally:
        stop_qsd(proc, qmp)


def time_command(argv, tgt):
    start = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    fsync(tgt)
    return time.monotonic() - start


def percentiles(samples):
    samples = sorted(samples)
    if not samples:
        return {"count": 0}
    at = lambda p: samples[round((len(samples) - 1) * p)]
    return {"count": len(samples), "p50_us": at(0.5), "p99_us": at(0.99), "max_us": samples[-1]}


def qsd_latency(tmp, src, tgt, ops, program=("qemu-storage-daemon",), flush_every=0):
    import nbd

    nbd_path = os.path.join(tmp, "qsd-nbd.sock")
    if os.path.exists(nbd_path):
        os.unlink(nbd_path)
    proc, qmp = start_qsd(tmp, [
        "--blockdev", f"driver=file,node-name=src-file,filename={src}",
        "--blockdev", "driver=raw,node-name=src,file=src-file",
        "--blockdev", f"driver=file,node-name=tgt-file,filename={tgt}",
        "--blockdev", "driver=raw,node-name=tgt,file=tgt-file",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_path}",
        "--export", "type=nbd,id=exp0,node-name=src,name=disk,writable=on",
    ], program)
    try:
        h = nbd.NBD()
        h.set_export_name("disk")
        h.connect_unix(nbd_path)
        size = h.get_size()
        rng = random.Random(42)
        buf = b"\x5a" * 4096

        def one():
            offset = rng.randrange(size // 4096) * 4096
            t = time.perf_counter()
            h.pwrite(buf, offset)
            return (time.perf_counter() - t) * 1e6

        def one_read():
            offset = rng.randrange(size // 4096) * 4096
            t = time.perf_counter()
            h.pread(4096, offset)
            return (time.perf_counter() - t) * 1e6

        pairs = 0

        def one_pair(writes, reads, flushes):
            # Writes and reads alternate, as in bench-backup-latency; with
            # --flush-every, a flush (timed) after every that many pairs, as a guest's
            # filesystem commits its journal.
            nonlocal pairs
            writes.append(one())
            reads.append(one_read())
            pairs += 1
            if flush_every and pairs % flush_every == 0:
                t = time.perf_counter()
                h.flush()
                flushes.append((time.perf_counter() - t) * 1e6)

        alone, alone_reads, alone_flushes = [], [], []
        for _ in range(ops):
            one_pair(alone, alone_reads, alone_flushes)
        start = time.monotonic()
        qmp.cmd("blockdev-backup", **{"job-id": "j"}, device="src", target="tgt", sync="full")
        during, during_reads, during_flushes = [], [], []
        while not qmp.seen("BLOCK_JOB_COMPLETED"):
            one_pair(during, during_reads, during_flushes)
        took = time.monotonic() - start
        h.shutdown()
        result = {"alone": percentiles(alone), "during_backup": percentiles(during),
                  "reads_alone": percentiles(alone_reads), "reads_during_backup": percentiles(during_reads),
                  "backup_seconds": took}
        if flush_every:
            result["flushes_alone"] = percentiles(alone_flushes)
            result["flushes_during_backup"] = percentiles(during_flushes)
        return result
    finally:
        stop_qsd(proc, qmp)


def stillpoint_latency(src, tgt, ops):
    out = subprocess.run([LATENCY_BIN, src, tgt, "--ops", str(ops)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def spread(values, fmt):
    """`median (min-max)`, each formatted with `fmt`."""
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def print_latency(results, rounds):
    """One row per round and contender, then (with several rounds) the median and range
    of each contender's ratios: this VM's p99 alone moves several-fold between
    rounds, and a single round's ratio inherits that."""
    for kind, alone_key, during_key in [("writes", "alone", "during_backup"),
                                        ("reads", "reads_alone", "reads_during_backup"),
                                        ("flushes", "flushes_alone", "flushes_during_backup")]:
        if not any(alone_key in r for runs in results.values() for r in runs):
            continue
        print(f"{kind:<28}{'alone p50':>10}{'p99':>9}{'during p50':>12}{'p99':>10}{'max':>10}{'p99 x':>8}"
              f"{'backup s':>10}" + (f"{'during':>8}" if kind == "flushes" else ""))
        for round_ in range(rounds):
            for name, runs in results.items():
                r = runs[round_]
                if alone_key not in r:
                    continue  # the in-process contender does not flush
                a, d = r[alone_key], r[during_key]
                if not a["count"] or not d["count"]:
                    # A guest slowed down enough makes no flush during a short backup.
                    print(f"{name:<28}{a['count']:>6} alone, {d['count']} during the backup: no ratio"
                          f"{r['backup_seconds']:>10.2f}")
                    continue
                print(f"{name:<28}{a['p50_us']:>8.0f}us{a['p99_us']:>7.0f}us{d['p50_us']:>10.0f}us"
                      f"{d['p99_us']:>8.0f}us{d['max_us']:>8.0f}us{d['p99_us'] / a['p99_us']:>8.1f}"
                      f"{r['backup_seconds']:>10.2f}"
                      + (f"{d['count']:>8}" if kind == "flushes" else ""))
    if rounds > 1:
        print(f"\nmedian (range) over {rounds} rounds")
        print(f"{'':<28}{'write p99 during us':>24}{'write p99 x':>20}{'read p99 x':>18}{'backup s':>16}")
        for name, runs in results.items():
            w_during = [r["during_backup"]["p99_us"] for r in runs]
            w_ratio = [r["during_backup"]["p99_us"] / r["alone"]["p99_us"] for r in runs]
            r_ratio = [r["reads_during_backup"]["p99_us"] / r["reads_alone"]["p99_us"] for r in runs]
            took = [r["backup_seconds"] for r in runs]
            print(f"{name:<28}{spread(w_during, lambda v: f'{v:.0f}'):>24}"
                  f"{spread(w_ratio, lambda v: f'{v:.1f}'):>20}{spread(r_ratio, lambda v: f'{v:.1f}'):>18}"
                  f"{spread(took, lambda v: f'{v:.1f}'):>16}")
        flushed = {name: [r for r in runs
                          if r.get("flushes_alone", {}).get("count")
                          and r.get("flushes_during_backup", {}).get("count")]
                   for name, runs in results.items()}
        if any(flushed.values()):
            print(f"{'':<28}{'flush p50 during us':>24}{'flush p50 x':>20}{'flush p99 x':>18}"
                  f"{'flushes during':>16}")
            for name, runs in flushed.items():
                if not runs:
                    continue
                f_during = [r["flushes_during_backup"]["p50_us"] for r in runs]
                f_p50 = [r["flushes_during_backup"]["p50_us"] / r["flushes_alone"]["p50_us"] for r in runs]
                f_p99 = [r["flushes_during_backup"]["p99_us"] / r["flushes_alone"]["p99_us"] for r in runs]
                count = [r["flushes_during_backup"]["count"] for r in runs]
                print(f"{name:<28}{spread(f_during, lambda v: f'{v:.0f}'):>24}"
                      f"{spread(f_p50, lambda v: f'{v:.1f}'):>20}{spread(f_p99, lambda v: f'{v:.1f}'):>18}"
                      f"{spread(count, lambda v: f'{v:.0f}'):>16}")
    print("(p99 x = p99 during the backup / p99 alone; goal <= 3.0. The two NBD rows use the"
          " same libnbd client against each daemon started with the same options)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--ops", type=int, default=2000, help="writes in the 'alone' latency phase")
    ap.add_argument("--latency-rounds", type=int, default=1,
                    help="rounds of the latency phase, the contenders alternated in each")
    ap.add_argument("--flush-every", type=int, default=0,
                    help="NBD contenders: a timed flush after every N write+read pairs (0: none)")
    ap.add_argument("--dir", default=None, help="where the images go (needs ~3x SIZE/2 free)")
    args = ap.parse_args()
    if args.flush_every < 0:
        ap.error("--flush-every must be 0 (no flushes) or a positive number of pairs")
    size = parse_size(args.size)
    for tool in (STILLPOINT, LATENCY_BIN):
        if not os.path.exists(tool):
            sys.exit(f"{tool} is missing: cargo build --release -p stillpoint -p stillpoint-bench")

    tmp = tempfile.mkdtemp(prefix="stillpoint-bench-", dir=args.dir)
    try:
        src = os.path.join(tmp, "source.img")
        tgt = os.path.join(tmp, "target.img")
        print(f"making a {size // MIB} MiB image (half data, quarter zeros, quarter holes) in {tmp}")
        make_image(src, size, seed=1)

        def stillpoint_run():
            if os.path.exists(tgt):
                os.unlink(tgt)
            return time_command([STILLPOINT, "backup", "--json", src, tgt], tgt)

        def qsd_run():
            fresh_target(tgt, size)
            return time_qsd(tmp, src, tgt)

        def cp_run():
            if os.path.exists(tgt):
                os.unlink(tgt)
            return time_command(["cp", "--sparse=always", src, tgt], tgt)

        def convert_run():
            if os.path.exists(tgt):
                os.unlink(tgt)
            return time_command(["qemu-img", "convert", "-f", "raw", "-O", "raw", src, tgt], tgt)

        tools = [("stillpoint backup", stillpoint_run), ("qemu-storage-daemon", qsd_run),
                 ("cp --sparse=always", cp_run), ("qemu-img convert", convert_run)]
        times = {name: [] for name, _ in tools}
        usage = {}
        for run in range(args.runs):
            for name, fn in tools:  # interleaved, so drift hits every tool alike
                evict(src)
                times[name].append(fn())
                if run == 0:
                    if not identical(src, tgt):
                        sys.exit(f"{name}: the target differs from the source!")
                    usage[name] = os.stat(tgt).st_blocks * 512
        qsd = statistics.median(times["qemu-storage-daemon"])
        print(f"\nfull backup of {size // MIB} MiB, raw to raw, median of {args.runs} "
              f"(source disk usage {os.stat(src).st_blocks * 512 // MIB} MiB)")
        print(f"{'tool':<22}{'median s':>10}{'MB/s':>10}{'target MiB':>12}{'vs QSD':>9}   runs")
        for name, _ in tools:
            med = statistics.median(times[name])
            runs = " ".join(f"{t:.2f}" for t in times[name])
            print(f"{name:<22}{med:>10.2f}{size / 1e6 / med:>10.0f}{usage[name] // MIB:>12}"
                  f"{med / qsd:>9.2f}   {runs}")
        print(f"\nratio stillpoint / qemu-storage-daemon = "
              f"{statistics.median(times['stillpoint backup']) / qsd:.2f} (goal <= 0.80)")

        print("\nguest QD1 random 4 KiB writes and reads (alternating) on the source, alone and during a"
              " full-speed backup; backup s = the backup's time under that load")
        lat_src = os.path.join(tmp, "latency-source.img")
        daemon = (STILLPOINT, "daemon")
        contenders = [("stillpoint (in process)", stillpoint_latency),
                      ("stillpoint daemon (NBD)", daemon),
                      ("qemu-storage-daemon (NBD)", ("qemu-storage-daemon",))]
        results = {name: [] for name, _ in contenders}
        for _ in range(args.latency_rounds):
            for name, fn in contenders:  # alternated, so the VM's drift hits each alike
                # Files are freed before the copy, and the frees committed before the
                # timing: on a filesystem mounted with `discard` (this VM's), freeing a
                # 2 GiB target issues its discards at the next journal commit, which could
                # otherwise fall inside a measurement. (A precaution: it did not remove
                # the slow first round of a sitting, which is slow alone as well.)
                fresh_target(tgt, size)
                shutil.copyfile(src, lat_src)
                evict(lat_src)
                os.sync()
                if callable(fn):
                    result = fn(lat_src, tgt, args.ops)
                else:
                    result = qsd_latency(tmp, lat_src, tgt, args.ops, fn, args.flush_every)
                results[name].append(result)
        print_latency(results, args.latency_rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
