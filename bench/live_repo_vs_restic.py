#!/usr/bin/env python3
"""Live backups into the repository through the daemon, incremental by dirty bitmap,
against restic on the same disk, side by side in one run.

The disk: bench/backup_vs_qsd.py's seeded mixed raw image (SIZE, 4 GiB by default: half
data, a quarter written zeros, a quarter holes), served by `stillpoint daemon` as a
writable NBD export, the way a guest would use it. Each round, for the daemon:

1. The guest's QD1 random 4 KiB writes (python3-libnbd) run through the export for the
   whole of each backup, on a copy of the disk of their own (their writes would
   otherwise stay on the disk the timed backups below read: at 4 GiB a minute of them
   rewrites about a third of it with one pattern, so it compresses better than the
   disk restic backs up). In the order the round gives:
   * a full `blockdev-backup` into a `repository` node, in one `transaction` with the
     dirty bitmap for the next backup (timed from the transaction to
     BLOCK_JOB_COMPLETED, which means the snapshot is committed and durable);
   * a full `blockdev-backup` into a fresh raw file (the same run's reference for the
     guest's write latency; the target node is deleted after, which flushes it).
2. On a fresh copy of the disk in a fresh daemon and a fresh encrypted repository, the
   guest idle: a timed full backup with the bitmap, then 1% of the disk rewritten
   through the export in seeded random 64 KiB blocks.
3. An incremental `blockdev-backup` (sync incremental, the bitmap) into a repository
   node whose parent is the latest snapshot: timed, and the repository's growth measured
   (on-disk bytes, as `du` counts them).
4. Live restore of the incremental snapshot (`stillpoint restore --live --socket`):
   timed from starting it to the first 4 KiB read served over NBD from a random offset
   (checked against the disk), and to the end of the stream (the image then compared
   with the disk by `qemu-img compare`).

For restic (`restic backup` of the image file, Debian's restic), the same disk at the
same instants: a full backup, the same 1% churn written into the file, a second backup
(restic has no bitmap: it reads the whole disk again). The page cache is dropped (root)
before every timed step, and the tools alternate which goes first across ROUNDS.

Goals (issue 16): incremental <= 5% of the full's time and <= 5% of its bytes; guest
4 KiB write p99 during the full backup into the repository no worse than during the
backup into a raw file; the first read of a live restore under a second.

Usage: cargo build --release -p stillpoint && apt-get install restic python3-libnbd &&
       python3 bench/live_repo_vs_restic.py [--size 4G] [--rounds 3] [--chunk-size 256K] [--dir DIR]
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backup_vs_qsd as common  # noqa: E402
import repo_vs_restic as repo_bench  # noqa: E402

PASS = "bench passphrase"
WRITE = b"\xa5" * 4096


class GuestWriter:
    """The guest: QD1 random 4 KiB writes through the daemon's NBD export."""

    def __init__(self, socket_path, seed):
        import nbd

        self.h = nbd.NBD()
        self.h.set_export_name("disk")
        self.h.connect_unix(socket_path)
        self.size = self.h.get_size()
        self.rng = random.Random(seed)

    def write_until(self, done):
        """4 KiB writes, each timed (microseconds), until done() is true."""
        samples = []
        while not done():
            offset = self.rng.randrange(self.size // 4096) * 4096
            t = time.perf_counter()
            self.h.pwrite(WRITE, offset)
            samples.append((time.perf_counter() - t) * 1e6)
        return samples

    def churn(self, seed, fraction=0.01, block=64 << 10):
        """Rewrites `fraction` of the disk in random 64 KiB blocks (flushed)."""
        rng = random.Random(seed)
        blocks = []
        for _ in range(int(self.size * fraction) // block):
            offset = rng.randrange(self.size // block) * block
            data = rng.randbytes(block)
            self.h.pwrite(data, offset)
            blocks.append((offset, data))
        self.h.flush()
        return blocks

    def close(self):
        self.h.shutdown()


def job_done(qmp, job):
    with qmp.cond:
        return any(e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == job for e in qmp.events)


def completed(qmp, job):
    with qmp.cond:
        qmp.cond.wait_for(lambda: any(e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == job
                                      for e in qmp.events), 3600)
        data = [e for e in qmp.events if e["event"] == "BLOCK_JOB_COMPLETED" and e["data"]["device"] == job][-1]["data"]
    if "error" in data:
        raise RuntimeError(f"{job} failed: {data['error']}")
    return data


def repo_node(qmp, name, repo, pass_file, size, parent):
    qmp.cmd("blockdev-add", driver="repository", **{"node-name": name, "passphrase-file": pass_file},
            repository=repo, disk="disk", size=size, parent=parent)


def node_data(qmp, name):
    for n in qmp.cmd("query-named-block-nodes"):
        if n["node-name"] == name:
            return n["image"]["format-specific"]["data"]
    raise RuntimeError(f"no node {name}")


def init_repo(repo, pass_file, chunk_size):
    shutil.rmtree(repo, ignore_errors=True)
    subprocess.run([common.STILLPOINT, "repo", "init", repo, "--encrypt", "--chunk-size", chunk_size,
                    "--passphrase-file", pass_file], check=True, stdout=subprocess.DEVNULL)


def start_daemon(tmp, original):
    """A fresh copy of the disk, served writable over NBD by `stillpoint daemon`."""
    image = os.path.join(tmp, "disk.raw")
    if os.path.exists(image):
        os.unlink(image)
    subprocess.run(["cp", "--sparse=always", original, image], check=True)
    nbd_path = os.path.join(tmp, "nbd.sock")
    if os.path.exists(nbd_path):
        os.unlink(nbd_path)
    repo_bench.drop_caches(image)
    proc, qmp = common.start_qsd(tmp, [
        "--blockdev", f"driver=file,node-name=src-file,filename={image}",
        "--blockdev", "driver=raw,node-name=src,file=src-file",
        "--nbd-server", f"addr.type=unix,addr.path={nbd_path}",
        "--export", "type=nbd,id=exp0,node-name=src,name=disk,writable=on",
    ], (common.STILLPOINT, "daemon"))
    return image, nbd_path, proc, qmp


def daemon_round(tmp, original, size, round_, chunk_size):
    pass_file = os.path.join(tmp, "passphrase")
    with open(pass_file, "w") as f:
        f.write(PASS + "\n")
    lat_repo = os.path.join(tmp, "repo-latency")
    init_repo(lat_repo, pass_file, chunk_size)
    raw_target = os.path.join(tmp, "target.raw")
    common.fresh_target(raw_target, size)
    result = {}
    image, nbd_path, proc, qmp = start_daemon(tmp, original)
    try:
        guest = GuestWriter(nbd_path, 100 + round_)
        result["alone"] = common.percentiles(
            guest.write_until(lambda deadline=time.monotonic() + 5: time.monotonic() > deadline))

        def latency_into(job, target):
            repo_bench.drop_caches(image)
            start = time.monotonic()
            qmp.cmd("blockdev-backup", **{"job-id": job}, device="src", target=target, sync="full")
            samples = guest.write_until(lambda: job_done(qmp, job))
            completed(qmp, job)
            qmp.cmd("blockdev-del", **{"node-name": target})
            result[f"{job}_s"] = time.monotonic() - start
            result[f"{job}_p"] = common.percentiles(samples)

        def into_repo():
            repo_node(qmp, "lat", lat_repo, pass_file, size, None)
            latency_into("repo_lat", "lat")

        def into_raw():
            common.add_raw(qmp, "tgt", raw_target)
            latency_into("raw", "tgt")

        for step in ([into_repo, into_raw] if round_ % 2 == 0 else [into_raw, into_repo]):
            step()
        guest.close()
    finally:
        common.stop_qsd(proc, qmp)
    os.unlink(raw_target)
    shutil.rmtree(lat_repo, ignore_errors=True)

    # The incremental flow, on the disk as it was made: a full with the bitmap (the
    # guest idle, so the bitmap holds exactly the churn), 1% rewritten through NBD,
    # the incremental.
    repo = os.path.join(tmp, "repo")
    init_repo(repo, pass_file, chunk_size)
    image, nbd_path, proc, qmp = start_daemon(tmp, original)
    try:
        guest = GuestWriter(nbd_path, 200 + round_)
        repo_node(qmp, "r0", repo, pass_file, size, None)
        start = time.monotonic()
        qmp.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"job-id": "full", "device": "src", "target": "r0",
                                                 "sync": "full"}}])
        completed(qmp, "full")
        result["full_s"] = time.monotonic() - start
        result["after_full"] = repo_bench.du(repo)
        churned = guest.churn(7 + round_)
        guest.close()
        repo_bench.drop_caches(image, repo)
        repo_node(qmp, "r1", repo, pass_file, size, "latest")
        start = time.monotonic()
        qmp.cmd("blockdev-backup", **{"job-id": "inc"}, device="src", target="r1", sync="incremental",
                bitmap="b0")
        done = completed(qmp, "inc")
        result["inc_s"] = time.monotonic() - start
        result["inc_read"] = done["len"]
        result["after_inc"] = repo_bench.du(repo)
        snapshot = node_data(qmp, "r1")["snapshot"]
    finally:
        common.stop_qsd(proc, qmp)
    result["first_read_s"], result["live_restore_s"], result["first_read_ok"] = live_restore(
        tmp, repo, pass_file, snapshot, image)
    result["churned"] = len(churned)
    os.unlink(image)
    shutil.rmtree(repo, ignore_errors=True)
    return result


def live_restore(tmp, repo, pass_file, snapshot, image):
    """`stillpoint restore --live`: seconds from starting it to the first 4 KiB read
    served over NBD (from a random offset, checked against the disk), seconds until
    the stream has finished, and whether the image then equals the disk."""
    import nbd

    out = os.path.join(tmp, "restoring.qcow2")
    sock = os.path.join(tmp, "restore.sock")
    log = os.path.join(tmp, "restore.log")
    for path in (out, sock):
        if os.path.exists(path):
            os.unlink(path)
    size = os.path.getsize(image)
    repo_bench.drop_caches(repo)
    start = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen([common.STILLPOINT, "restore", "--repo", repo, "--passphrase-file", pass_file,
                                 snapshot, out, "--live", "--socket", sock],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        while not os.path.exists(sock):
            if proc.poll() is not None:
                raise RuntimeError(f"restore --live exited: {open(log).read()}")
            time.sleep(0.001)
        h = nbd.NBD()
        h.connect_unix(sock)
        offset = random.Random(1).randrange(size // 4096) * 4096
        got = h.pread(4096, offset)
        first = time.monotonic() - start
        h.shutdown()
        while "restored:" not in open(log).read():
            if proc.poll() is not None:
                raise RuntimeError(f"restore --live exited: {open(log).read()}")
            time.sleep(0.05)
        whole = time.monotonic() - start
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    with open(image, "rb") as f:
        f.seek(offset)
        ok = f.read(4096) == got
    same = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", out, image]).returncode == 0
    os.unlink(out)
    return first, whole, ok and same


def restic_round(tmp, original, size, round_):
    image = os.path.join(tmp, "disk.raw")
    subprocess.run(["cp", "--sparse=always", original, image], check=True)
    tool = repo_bench.Tool("restic", tmp, None)
    tool.init()
    repo_bench.drop_caches(image, tool.repo)
    full, _ = tool.backup(image, 1)
    full += repo_bench.timed_sync()
    after_full = repo_bench.du(tool.repo)
    repo_bench.churn(image, size, 7 + round_)
    repo_bench.drop_caches(image, tool.repo)
    second, _ = tool.backup(image, 2)
    second += repo_bench.timed_sync()
    after_second = repo_bench.du(tool.repo)
    shutil.rmtree(tool.repo, ignore_errors=True)
    os.unlink(image)
    return dict(full_s=full, inc_s=second, after_full=after_full, after_inc=after_second)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="4G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunk-size", default="256K")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    size = common.parse_size(args.size)
    if shutil.which("restic") is None:
        sys.exit("restic is needed: apt-get install restic")
    if not os.path.exists(common.STILLPOINT):
        sys.exit("build first: cargo build --release -p stillpoint")
    tmp = tempfile.mkdtemp(prefix="stillpoint-live-repo-bench-", dir=args.dir)
    try:
        original = os.path.join(tmp, "original.raw")
        print(f"making a {size >> 20} MiB mixed image in {tmp}", flush=True)
        common.make_image(original, size, 1)
        results = {"stillpoint": [], "restic": []}
        for r in range(args.rounds):
            order = ["stillpoint", "restic"] if r % 2 == 0 else ["restic", "stillpoint"]
            for name in order:
                if name == "stillpoint":
                    x = daemon_round(tmp, original, size, r, args.chunk_size)
                    print(f"  round {r + 1} stillpoint: full {x['full_s']:.2f} s; under the guest: into the repository"
                          f" {x['repo_lat_s']:.2f} s (write p99 {x['repo_lat_p']['p99_us']:.0f} us),"
                          f" into raw {x['raw_s']:.2f} s (p99 {x['raw_p']['p99_us']:.0f} us),"
                          f" alone p99 {x['alone']['p99_us']:.0f} us; incremental {x['inc_s']:.2f} s reading"
                          f" {x['inc_read'] >> 20} MiB; repo {x['after_full'] >> 20} -> {x['after_inc'] >> 20} MiB;"
                          f" live restore: first read {x['first_read_s'] * 1000:.0f} ms, whole {x['live_restore_s']:.2f} s"
                          f" ({'identical' if x['first_read_ok'] else 'WRONG'})", flush=True)
                else:
                    x = restic_round(tmp, original, size, r)
                    print(f"  round {r + 1} restic: full {x['full_s']:.2f} s, second {x['inc_s']:.2f} s;"
                          f" repo {x['after_full'] >> 20} -> {x['after_inc'] >> 20} MiB", flush=True)
                results[name].append(x)

        def med(name, f):
            values = [f(x) for x in results[name]]
            return statistics.median(values), min(values), max(values)

        def show(name, label, f, fmt):
            m, lo, hi = med(name, f)
            return f"{label} {fmt(m)} ({fmt(lo)}-{fmt(hi)})"

        sec = lambda v: f"{v:.2f} s"
        pct = lambda v: f"{100 * v:.2f}%"
        us = lambda v: f"{v:.0f} us"
        print(f"\n{size >> 20} MiB mixed disk, encrypted repositories, chunk size {args.chunk_size},"
              f" {args.rounds} round(s); median (min-max)")
        for name in results:
            print(f"{name}: " + ", ".join([
                show(name, "full", lambda x: x["full_s"], sec),
                show(name, "incremental" if name == "stillpoint" else "second", lambda x: x["inc_s"], sec),
                show(name, "time ratio", lambda x: x["inc_s"] / x["full_s"], pct),
                show(name, "growth", lambda x: (x["after_inc"] - x["after_full"]) / x["after_full"], pct),
            ]))
        sp = "stillpoint"
        print("stillpoint guest 4 KiB writes: " + ", ".join([
            show(sp, "p99 alone", lambda x: x["alone"]["p99_us"], us),
            show(sp, "during the backup into the repository", lambda x: x["repo_lat_p"]["p99_us"], us),
            show(sp, "into a raw file", lambda x: x["raw_p"]["p99_us"], us),
        ]))
        print("stillpoint: " + ", ".join([
            show(sp, "under the guest: backup into the repository", lambda x: x["repo_lat_s"], sec),
            show(sp, "into a raw file", lambda x: x["raw_s"], sec),
            show(sp, "incremental read", lambda x: x["inc_read"] / 2**20, lambda v: f"{v:.0f} MiB"),
            show(sp, "live restore first read", lambda x: x["first_read_s"] * 1000, lambda v: f"{v:.0f} ms"),
            show(sp, "whole", lambda x: x["live_restore_s"], sec),
        ]) + ("" if all(x["first_read_ok"] for x in results[sp]) else "  LIVE RESTORE WRONG"))
        m = lambda name, f: statistics.median(f(x) for x in results[name])
        print(f"\ngoals: incremental / full time {pct(m(sp, lambda x: x['inc_s'] / x['full_s']))} (<= 5%),"
              f" bytes {pct(m(sp, lambda x: (x['after_inc'] - x['after_full']) / x['after_full']))} (<= 5%);"
              f" write p99 repository / raw file"
              f" {m(sp, lambda x: x['repo_lat_p']['p99_us'] / x['raw_p']['p99_us']):.2f} (<= 1);"
              f" first read {m(sp, lambda x: x['first_read_s']):.2f} s (< 1 s)")
        print(f"stillpoint / restic: full {m(sp, lambda x: x['full_s']) / m('restic', lambda x: x['full_s']):.2f},"
              f" incremental / restic's second {m(sp, lambda x: x['inc_s']) / m('restic', lambda x: x['inc_s']):.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
