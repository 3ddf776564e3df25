#!/usr/bin/env python3
"""The repository on S3 against the same on local disk, and restic on the same S3.

A real S3 server on loopback: SeaweedFS (`weed server`, from the project's venv, as the
tests start it), with its data in the bench's directory; or, with `--endpoint`, one
already running (Ceph RGW on memstore: `bash bench/ceph_rgw.sh start DIR`). The image: the seeded mixed
raw image of bench/backup_vs_qsd.py (SIZE, 2 GiB by default). Each round, in an order
that rotates across ROUNDS, starting cold (page cache dropped) at each timed step:

* `local`:      stillpoint, an encrypted repository in a local directory;
* `s3`:         stillpoint, an encrypted repository in a SeaweedFS bucket;
* `restic-s3`:  restic, an encrypted repository in the same SeaweedFS (restic speaks S3);

each a full backup (with a `sync` after it), then a restore into a new file (with a
`sync`), compared with the image. Then the scale-out case: FOUR disks (SIZE/4 each,
other seeds) backed up at once into one bucket, by four processes; the aggregate
throughput is their logical bytes over the wall time, and each restores identically.

With `--unique`, the image's data segments are fresh random bytes (as in
repo_vs_restic.py): the default image's shifted copies let restic store 40% less.

Also reported: S3 requests per GiB stored (stillpoint's own count, STILLPOINT_S3_STATS),
and the physical limit of this SeaweedFS: the seconds `curl -T` takes to upload the
repository's packs' bytes (the same amount, in 32 MiB objects, 4 at a time).

Usage: cargo build --release -p stillpoint &&
       python3 bench/s3_vs_local.py [--size 2G] [--rounds 3] [--dir DIR] [--no-restic] [--unique]
           [--endpoint http://127.0.0.1:7480 --access KEY --secret SECRET]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import backup_vs_qsd as common  # noqa: E402
from repo_vs_restic import drop_caches, du, run, timed_sync  # noqa: E402

PASS = "bench passphrase"
ACCESS, SECRET = "STILLPOINTBENCH", "stillpoint-bench-secret-0123456789"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
WEED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".venv", "bin", "weed")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class External:
    """An S3 server started elsewhere (Ceph RGW: bench/ceph_rgw.sh)."""

    def __init__(self, endpoint, access, secret):
        global ACCESS, SECRET
        ACCESS, SECRET = access, secret
        self.endpoint = endpoint

    request = None  # set below: the same signed curl request as SeaweedFS's

    def env(self):
        return SeaweedFS.env(self)

    def stop(self):
        pass


class SeaweedFS:
    """`weed server` on 127.0.0.1 with free ports, data in DIR; as crates/testkit starts it."""

    def __init__(self, d):
        os.makedirs(os.path.join(d, "data"), exist_ok=True)
        config = os.path.join(d, "s3.json")
        with open(config, "w") as f:
            json.dump({"identities": [{"name": "bench", "credentials": [
                {"accessKey": ACCESS, "secretKey": SECRET}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        p = [free_port() for _ in range(9)]
        self.port = p[3]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        args = [WEED, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={d}/data",
                f"-master.port={p[0]}", f"-volume.port={p[1]}", f"-filer.port={p[2]}",
                f"-s3.port={p[3]}", f"-master.port.grpc={p[4]}", f"-volume.port.grpc={p[5]}",
                f"-filer.port.grpc={p[6]}", f"-s3.port.grpc={p[7]}", f"-iam.port={p[8]}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
                "-master.volumeSizeLimitMB=256", "-volume.max=400", "-master.telemetry=false",
                "-filer", "-s3"]
        self.log = open(os.path.join(d, "weed.log"), "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while self.request("GET", "/") != 200:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS did not start: see {d}/weed.log")
            time.sleep(0.2)

    def request(self, method, path, upload=None):
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method,
                "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{ACCESS}:{SECRET}"]
        # The payload's hash, said explicitly: Ceph RGW refuses curl's signature without it.
        if upload:
            argv += ["-T", upload, "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]
        else:
            argv += ["-H", "x-amz-content-sha256: " + EMPTY_SHA256]
        out = subprocess.run(argv + [self.endpoint + path], capture_output=True, text=True)
        return int(out.stdout or 0)

    def env(self):
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS,
                "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
                "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.log.close()


External.request = SeaweedFS.request


def stillpoint(argv, env):
    """Runs stillpoint; (seconds, peak RSS MiB, S3 request counts or None)."""
    with tempfile.NamedTemporaryFile("r") as rss:
        start = time.monotonic()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, common.STILLPOINT, *argv],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        took = time.monotonic() - start
        if proc.returncode != 0:
            raise RuntimeError(f"stillpoint {argv[:2]} failed: {proc.stderr.strip()[-500:]}")
        requests = None
        for line in proc.stderr.splitlines():
            if line.startswith("s3 requests: "):
                requests = json.loads(line[len("s3 requests: "):])
        return took, int(rss.read().strip().splitlines()[-1]) / 1024, requests


def upload_limit(weed, tmp, nbytes, bucket):
    """Seconds for curl to upload NBYTES in 32 MiB objects, 4 at a time."""
    part = os.path.join(tmp, "part.bin")
    with open(part, "wb") as f:
        f.write(os.urandom(32 << 20))
    count = max(1, nbytes // (32 << 20))
    start = time.monotonic()
    procs = []
    for i in range(count):
        procs.append(subprocess.Popen(
            ["curl", "-s", "-o", "/dev/null", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user",
             f"{ACCESS}:{SECRET}", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T", part,
             f"{weed.endpoint}/{bucket}/limit/{i}"]))
        if len(procs) == 4:
            procs.pop(0).wait()
    for p in procs:
        p.wait()
    took = time.monotonic() - start
    os.unlink(part)
    return took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="2G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--no-restic", action="store_true")
    ap.add_argument("--unique", action="store_true",
                    help="data segments of fresh random bytes (nothing any chunker can deduplicate)")
    ap.add_argument("--endpoint", help="an S3 server already running (Ceph RGW: bench/ceph_rgw.sh), "
                                       "instead of a SeaweedFS of the bench's own")
    ap.add_argument("--access", default="CEPHACCESSKEY")
    ap.add_argument("--secret", default="CEPHSECRETKEY0123456789")
    args = ap.parse_args()
    size = common.parse_size(args.size)
    if not os.path.exists(common.STILLPOINT):
        sys.exit("build first: cargo build --release -p stillpoint")
    if not args.endpoint and not os.path.exists(WEED):
        sys.exit("SeaweedFS is needed: bash scripts/setup.sh")
    names = ["local", "s3"] + ([] if args.no_restic or not shutil.which("restic") else ["restic-s3"])
    tmp = tempfile.mkdtemp(prefix="stillpoint-s3-bench-", dir=args.dir)
    weed = (External(args.endpoint, args.access, args.secret) if args.endpoint
            else SeaweedFS(os.path.join(tmp, "seaweedfs")))
    server = f"the S3 server at {args.endpoint}" if args.endpoint else "SeaweedFS"
    try:
        env = dict(os.environ, STILLPOINT_PASSPHRASE=PASS, RESTIC_PASSWORD=PASS,
                   STILLPOINT_CACHE_DIR=os.path.join(tmp, "cache"), STILLPOINT_S3_STATS="1",
                   RESTIC_CACHE_DIR=os.path.join(tmp, "restic-cache"), **weed.env())
        image = os.path.join(tmp, "disk.raw")
        print(f"making a {size >> 20} MiB image (half data, quarter zeros, quarter holes) in {tmp}")
        common.make_image(image, size, 1, unique=args.unique)
        results = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                bucket = f"round{r}-{name}"
                assert weed.request("PUT", f"/{bucket}") == 200, bucket
                out_dir = os.path.join(tmp, "restore")
                shutil.rmtree(out_dir, ignore_errors=True)
                os.makedirs(out_dir)
                restored = os.path.join(out_dir, "disk.raw")
                requests = {}
                if name == "restic-s3":
                    repo = f"s3:{weed.endpoint}/{bucket}/restic"
                    run(["restic", "init", "-q", "--repo", repo], env)
                    drop_caches()
                    backup, rss_b = run(["restic", "backup", "-q", "--repo", repo, "disk.raw"], env, cwd=tmp)
                    backup += timed_sync()
                    drop_caches()
                    restore, rss_r = run(["restic", "restore", "-q", "--repo", repo, "latest",
                                          "--target", out_dir], env)
                    stored = None
                else:
                    repo = os.path.join(tmp, "repo-local") if name == "local" else f"s3://{bucket}/sp"
                    shutil.rmtree(os.path.join(tmp, "repo-local"), ignore_errors=True)
                    shutil.rmtree(os.path.join(tmp, "cache"), ignore_errors=True)
                    stillpoint(["repo", "init", repo, "--encrypt"], env)
                    drop_caches()
                    backup, rss_b, requests["backup"] = stillpoint(
                        ["backup", image, "--source-format", "raw", "--repo", repo, "--disk", "d"], env)
                    backup += timed_sync()
                    stats = json.loads(subprocess.run([common.STILLPOINT, "repo", "stats", repo, "--json"],
                                                      env=env, check=True, capture_output=True,
                                                      text=True).stdout)
                    stored = stats["stored_bytes"] if "stored_bytes" in stats else None
                    drop_caches()
                    restore, rss_r, requests["restore"] = stillpoint(
                        ["restore", "--repo", repo, "d", restored], env)
                restore += timed_sync()
                same = common.identical(image, restored)
                results[name].append(dict(backup=backup, restore=restore, same=same, stored=stored,
                                          requests=requests, rss=max(rss_b, rss_r)))
                print(f"round {r + 1} {name:10} backup {backup:6.2f} s  restore {restore:6.2f} s  "
                      f"identical {same}  requests {json.dumps(requests)}", flush=True)
                shutil.rmtree(out_dir, ignore_errors=True)

        # Four disks at once into one bucket.
        quarter = size // 4
        disks = []
        for i in range(4):
            path = os.path.join(tmp, f"disk{i}.raw")
            common.make_image(path, quarter, 10 + i, unique=args.unique)
            disks.append(path)
        assert weed.request("PUT", "/four") == 200
        repo = "s3://four/sp"
        stillpoint(["repo", "init", repo, "--encrypt"], env)
        drop_caches()
        start = time.monotonic()
        procs = [subprocess.Popen([common.STILLPOINT, "backup", d, "--source-format", "raw", "--repo", repo,
                                   "--disk", f"d{i}"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for i, d in enumerate(disks)]
        errors = [p.communicate()[1] for p in procs]
        wall = time.monotonic() - start + timed_sync()
        if any(p.returncode for p in procs):
            raise RuntimeError(f"a concurrent backup failed: {errors}")
        all_same = True
        for i, d in enumerate(disks):
            out = os.path.join(tmp, f"four-{i}.raw")
            stillpoint(["restore", "--repo", repo, f"d{i}", out], env)
            all_same &= common.identical(d, out)
            os.unlink(out)
        stats = json.loads(subprocess.run([common.STILLPOINT, "repo", "stats", repo, "--json"], env=env,
                                          check=True, capture_output=True, text=True).stdout)

        packs_bytes = results["s3"][0]["requests"]["backup"]["bytes_up"]
        drop_caches()
        limit = upload_limit(weed, tmp, packs_bytes, "four")

        def med(name, key):
            vals = [x[key] for x in results[name]]
            return statistics.median(vals), min(vals), max(vals)

        print()
        kind = "unique-data" if args.unique else "mixed (pool copies)"
        print(f"{size >> 20} MiB {kind} image, {args.rounds} rounds, medians (min-max):")
        for name in names:
            b, r = med(name, "backup"), med(name, "restore")
            same = all(x["same"] for x in results[name])
            rss = max(x["rss"] for x in results[name])
            print(f"  {name:10} backup {b[0]:6.2f} s ({b[1]:.2f}-{b[2]:.2f})  restore {r[0]:6.2f} s "
                  f"({r[1]:.2f}-{r[2]:.2f})  identical {same}  peak RSS {rss:.0f} MiB")
        b_ratio = med("s3", "backup")[0] / med("local", "backup")[0]
        r_ratio = med("s3", "restore")[0] / med("local", "restore")[0]
        print(f"  s3 / local: backup {b_ratio:.2f}x, restore {r_ratio:.2f}x (goal: at most 1.5x)")
        if "restic-s3" in results:
            print(f"  s3 / restic-s3: backup {med('s3', 'backup')[0] / med('restic-s3', 'backup')[0]:.2f}x, "
                  f"restore {med('s3', 'restore')[0] / med('restic-s3', 'restore')[0]:.2f}x (goal: at most 0.5x)")
        req = results["s3"][0]["requests"]
        gib = max(1, req["backup"]["bytes_up"]) / (1 << 30)
        for step in ("backup", "restore"):
            q = req[step]
            total = q["gets"] + q["puts"] + q["heads"] + q["lists"] + q["deletes"]
            print(f"  s3 {step}: {total} requests ({q}), {total / gib:.0f} per GiB uploaded")
        print(f"  {server} upload limit: {packs_bytes >> 20} MiB by curl -T in 32 MiB objects, 4 at a time: "
              f"{limit:.2f} s; stillpoint's s3 backup is {med('s3', 'backup')[0] / limit:.2f}x that")
        logical = 4 * quarter
        print(f"  four disks of {quarter >> 20} MiB at once into one bucket: {wall:.2f} s, "
              f"{logical / wall / (1 << 20):.0f} MiB/s of disk aggregate, each restores identically: {all_same}; "
              f"{stats['snapshots']} snapshots, {stats['packs']} packs")
    finally:
        weed.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
