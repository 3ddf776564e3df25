#!/usr/bin/env python3
"""The backup repository against restic and borg, side by side in one run.

The image: bench/backup_vs_qsd.py's seeded mixed raw image (SIZE, 2 GiB by default:
half data, a quarter written zeros, a quarter holes, in 4 MiB segments). For each tool,
in turn and alternating across ROUNDS, starting cold at each timed step:

1. a fresh, encrypted repository (stillpoint `repo init --encrypt`, restic's default,
   borg `repokey-blake2`) and a full backup;
2. 1% of the disk rewritten in seeded random 64 KiB blocks, and a second backup (no
   dirty bitmap: every tool reads the whole disk);
3. a restore of the second snapshot into a new file, compared with the image.

Before each step the page cache is dropped (root) or the image's and repositories'
files evicted; a backup's time includes a `sync` after it (what it left dirty), a
restore is reported both as the tool's own time and with a `sync` after it.

Reported per tool: seconds (median over rounds, with the range), repository bytes
after each backup, the second backup's growth in percent, and the peak RSS of each
step. restic and borg come from Debian (`apt-get install restic borgbackup`).

With `--unique`, the data segments are fresh random bytes instead of copies of one
64 MiB pool at odd byte offsets: the default image rewards content-defined chunking
(restic, borg find the shifted copies, fixed disk-aligned chunks cannot), the unique
one shows the tools on data no chunker can deduplicate.

Usage: cargo build --release -p stillpoint &&
       python3 bench/repo_vs_restic.py [--size 2G] [--rounds 1] [--chunk-size 256K] [--dir DIR] [--unique]
"""

import argparse
import json
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

PASS = "bench passphrase"


def run(argv, env=None, cwd=None):
    """Runs argv; returns (seconds, peak RSS in MiB, measured by /usr/bin/time)."""
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.monotonic()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *argv], env=env, cwd=cwd,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        took = time.monotonic() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {proc.stderr.strip()[-500:]}")
        return took, int(rss.read().strip().splitlines()[-1]) / 1024


def drop_caches(*paths):
    """Every step starts cold: the whole page cache dropped when we may (root), else
    the image's and the repositories' files evicted one by one."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    except OSError:
        pass
    for path in paths:
        targets = [path] if os.path.isfile(path) else [
            os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
        for t in targets:
            common.evict(t)


def timed_sync():
    """Seconds a `sync` takes: what a tool left dirty in the page cache."""
    start = time.monotonic()
    subprocess.run(["sync"], check=True)
    return time.monotonic() - start


def du(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(d, f)).st_blocks * 512
    return total


def churn(path, size, seed, fraction=0.01, block=64 << 10):
    rng = random.Random(seed)
    with open(path, "r+b") as f:
        for _ in range(int(size * fraction) // block):
            f.seek(rng.randrange(0, size // block) * block)
            f.write(rng.randbytes(block))
        f.flush()
        os.fsync(f.fileno())


class Tool:
    def __init__(self, name, tmp, chunk_size):
        self.name, self.tmp, self.chunk_size = name, tmp, chunk_size
        self.repo = os.path.join(tmp, f"repo-{name}")
        self.env = dict(os.environ, STILLPOINT_PASSPHRASE=PASS, RESTIC_PASSWORD=PASS,
                        BORG_PASSPHRASE=PASS, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", RESTIC_CACHE_DIR=os.path.join(tmp, "restic-cache"),
                        BORG_CACHE_DIR=os.path.join(tmp, f"borg-cache"))

    def init(self):
        shutil.rmtree(self.repo, ignore_errors=True)
        if self.name == "stillpoint":
            argv = [common.STILLPOINT, "repo", "init", self.repo, "--encrypt", "--chunk-size", self.chunk_size]
        elif self.name == "restic":
            argv = ["restic", "init", "-q", "--repo", self.repo]
        else:
            argv = ["borg", "init", "-e", "repokey-blake2", self.repo]
        run(argv, self.env)

    def backup(self, image, n):
        if self.name == "stillpoint":
            argv = [common.STILLPOINT, "backup", image, "--source-format", "raw", "--repo", self.repo, "--disk", "disk"]
            return run(argv, self.env)
        if self.name == "restic":
            return run(["restic", "backup", "-q", "--repo", self.repo, os.path.basename(image)],
                       self.env, cwd=os.path.dirname(image))
        return run(["borg", "create", f"{self.repo}::b{n}", os.path.basename(image)],
                   self.env, cwd=os.path.dirname(image))

    def restore(self, out_dir, image_name):
        os.makedirs(out_dir)
        if self.name == "stillpoint":
            took = run([common.STILLPOINT, "restore", "--repo", self.repo, "disk",
                        os.path.join(out_dir, image_name)], self.env)
        elif self.name == "restic":
            took = run(["restic", "restore", "-q", "--repo", self.repo, "latest", "--target", out_dir], self.env)
        else:
            took = run(["borg", "extract", "--sparse", f"{self.repo}::b2"], self.env, cwd=out_dir)
        return took, os.path.join(out_dir, image_name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2G")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--chunk-size", default="256K")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--unique", action="store_true", help="data segments of fresh random bytes")
    ap.add_argument("--tools", default="stillpoint,restic,borg",
                    help="comma-separated; stillpoint alone for a chunk-size sweep")
    args = ap.parse_args()
    size = common.parse_size(args.size)
    names = args.tools.split(",")
    for tool in names:
        if tool != "stillpoint" and shutil.which(tool) is None:
            sys.exit(f"{tool} is needed: apt-get install restic borgbackup")
    if not os.path.exists(common.STILLPOINT):
        sys.exit("build first: cargo build --release -p stillpoint")
    tmp = tempfile.mkdtemp(prefix="stillpoint-repo-bench-", dir=args.dir)
    try:
        original = os.path.join(tmp, "original.raw")
        kind = "unique" if args.unique else "pool-copies"
        print(f"making a {size >> 20} MiB image (half data ({kind}), quarter zeros, quarter holes) in {tmp}")
        common.make_image(original, size, 1, unique=args.unique)
        results = {}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                tool = Tool(name, tmp, args.chunk_size)
                image = os.path.join(tmp, "disk.raw")
                subprocess.run(["cp", "--sparse=always", original, image], check=True)
                tool.init()
                drop_caches(image, tool.repo)
                full, full_rss = tool.backup(image, 1)
                full += timed_sync()
                after_full = du(tool.repo)
                churn(image, size, 7 + r)
                drop_caches(image, tool.repo)
                second, second_rss = tool.backup(image, 2)
                second += timed_sync()
                after_second = du(tool.repo)
                chunks = None
                if name == "stillpoint":
                    out = subprocess.run([common.STILLPOINT, "repo", "stats", tool.repo, "--json"], env=tool.env,
                                         check=True, capture_output=True, text=True).stdout
                    chunks = json.loads(out)["chunks"]
                out_dir = os.path.join(tmp, f"restore-{name}")
                shutil.rmtree(out_dir, ignore_errors=True)
                drop_caches(image, tool.repo)
                (restore, restore_rss), restored = tool.restore(out_dir, "disk.raw")
                restore_sync = restore + timed_sync()
                same = common.identical(image, restored)
                res = results.setdefault(name, [])
                res.append(dict(full=full, second=second, restore=restore, restore_sync=restore_sync,
                                after_full=after_full,
                                after_second=after_second, same=same, chunks=chunks,
                                rss=max(full_rss, second_rss, restore_rss)))
                shutil.rmtree(out_dir, ignore_errors=True)
                shutil.rmtree(tool.repo, ignore_errors=True)
                os.unlink(image)
                print(f"  round {r + 1} {name}: full {full:.2f} s, second {second:.2f} s, restore {restore:.2f} s"
                      f" ({restore_sync:.2f} s with sync),"
                      f" repo {after_full >> 20} -> {after_second >> 20} MiB, identical {same}", flush=True)

        def med(name, key):
            values = [x[key] for x in results[name]]
            return statistics.median(values), min(values), max(values)

        print(f"\n{size >> 20} MiB mixed image ({kind} data), encrypted repositories, {args.rounds} round(s), "
              f"stillpoint chunk size {args.chunk_size}")
        print(f"{'tool':12} {'full s':>8} {'second s':>9} {'restore s':>10} {'+sync s':>8} {'repo MiB':>9}"
              f" {'growth':>7} {'RSS MiB':>8}  restored")
        for name in names:
            full, second, restore = med(name, "full")[0], med(name, "second")[0], med(name, "restore")[0]
            restore_sync = med(name, "restore_sync")[0]
            af, as_ = med(name, "after_full")[0], med(name, "after_second")[0]
            growth = 100 * (as_ - af) / af if af else 0
            rss = max(x["rss"] for x in results[name])
            same = all(x["same"] for x in results[name])
            print(f"{name:12} {full:8.2f} {second:9.2f} {restore:10.2f} {restore_sync:8.2f} {af / 2**20:9.0f} {growth:6.1f}%"
                  f" {rss:8.0f}  {'identical' if same else 'DIFFERENT'}")
        if "stillpoint" in results:
            chunks = statistics.median(x["chunks"] for x in results["stillpoint"])
            print(f"stillpoint: {chunks:.0f} stored chunks after the second backup, an index of"
                  f" {chunks * 48 / 2**20:.1f} MiB in memory (48 bytes each)")
        if "stillpoint" not in results or "restic" not in results:
            return
        sp, rs = results["stillpoint"], results["restic"]
        ratio = lambda key: statistics.median(x[key] for x in sp) / statistics.median(x[key] for x in rs)
        print(f"\nstillpoint / restic: full {ratio('full'):.2f} (goal <= 0.5), restore {ratio('restore'):.2f}"
              f" ({ratio('restore_sync'):.2f} with sync; goal <= 0.5), second {ratio('second'):.2f},"
              f" repository after the full {ratio('after_full'):.2f} (goal <= 1)")
        for name in names:
            spread = lambda key: "%.2f-%.2f" % med(name, key)[1:]
            print(f"  {name}: full {spread('full')}, second {spread('second')}, restore {spread('restore')},"
                  f" restore+sync {spread('restore_sync')} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
