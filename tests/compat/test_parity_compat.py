"""Workflows that work with qemu-storage-daemon, run unchanged against stillpoint: sizes
that are not whole sectors, speed limits, and the flows of QEMU's own backup
documentation. Each scenario runs against both daemons and the answers are compared.
"""

import os
import random
import subprocess
import time

from harness import run_both

ODD = (8 << 20) + 4097


def odd_images(tmp):
    """A source of 8 MiB + 4097 bytes (data, zeros, a hole) and a target made by
    `qemu-img create -f raw` with the same size, as a user would."""
    rng = random.Random(13)
    src, tgt = f"{tmp}/odd-src.raw", f"{tmp}/odd-tgt.raw"
    with open(src, "wb") as f:
        f.write(rng.randbytes(3 << 20))
        f.write(bytes(1 << 20))
        f.seek(ODD - 3000)
        f.write(rng.randbytes(3000))
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", tgt, str(ODD)], check=True)
    return ["--blockdev", f"driver=raw,node-name=odd,file.driver=file,file.filename={src}",
            "--blockdev", f"driver=raw,node-name=oddtgt,file.driver=file,file.filename={tgt}",
            "--nbd-server", f"addr.type=unix,addr.path={tmp}/nbd.sock",
            "--export", "type=nbd,id=e,node-name=odd,name=odd"]


def nbd_size(socket, export):
    out = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///{export}?socket={socket}"],
                         capture_output=True, text=True)
    return out.stdout.strip() or out.stderr.strip()


def test_sizes_that_are_not_whole_sectors(tmp_path):
    async def scenario(d):
        nodes = (await d.run("query-named-block-nodes"))[1]
        sizes = sorted((n["node-name"], n["image"]["virtual-size"]) for n in nodes
                       if n["node-name"] in ("odd", "oddtgt"))
        backup = await d.run("blockdev-backup",
                             {"job-id": "j", "device": "odd", "target": "oddtgt", "sync": "full"})
        events = await d.until("JOB_STATUS_CHANGE", "null")
        done = [(e["data"]["len"], e["data"]["offset"], e["data"].get("error"))
                for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
        same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                               f"{d.tmp}/odd-src.raw", f"{d.tmp}/odd-tgt.raw"]).returncode
        return sizes, backup, done, same, nbd_size(f"{d.tmp}/nbd.sock", "odd"), \
            os.path.getsize(f"{d.tmp}/odd-tgt.raw")

    r = run_both(tmp_path, scenario, odd_images)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    sectors = (ODD + 511) // 512 * 512
    assert r["stillpoint"][0] == [("odd", sectors), ("oddtgt", sectors)]
    # Job progress counts whole 64 KiB copy clusters, the short last one included.
    clusters = (ODD + 65535) // 65536 * 65536
    assert r["stillpoint"][2] == [(clusters, clusters, None)]
    assert r["stillpoint"][3] == 0


def mixed_image(tmp):
    """32 MiB: half random data, a quarter written zeros, a quarter holes, in runs of
    64 KiB to 448 KiB that start anywhere in a copy chunk (so claims split); a target."""
    rng = random.Random(2)
    src, tgt = f"{tmp}/mixed.raw", f"{tmp}/mixed-tgt.raw"
    with open(src, "wb") as f:
        at = 0
        while at < 32 << 20:
            kind = rng.choice(["data", "data", "zero", "hole"])
            n = min(rng.randint(1, 7) << 16, (32 << 20) - at)
            if kind == "data":
                f.write(rng.randbytes(n))
            elif kind == "zero":
                f.write(bytes(n))
            else:
                f.seek(n, 1)
            at += n
        f.truncate(32 << 20)
    with open(tgt, "wb") as f:
        f.truncate(32 << 20)
    return ["--blockdev", f"driver=raw,node-name=mixed,file.driver=file,file.filename={src}",
            "--blockdev", f"driver=raw,node-name=mixedtgt,file.driver=file,file.filename={tgt}"]


def test_a_speed_limit_is_the_speed(tmp_path):
    # 32 MiB at 8 MiB/s: about 4 s in each daemon, holes and zeros counted like data.
    async def scenario(d):
        started = time.monotonic()
        await d.run("blockdev-backup", {"job-id": "j", "device": "mixed", "target": "mixedtgt",
                                        "sync": "full", "speed": 8 << 20})
        events = await d.until("BLOCK_JOB_COMPLETED", timeout=60)
        took = time.monotonic() - started
        done = [e["data"]["offset"] for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
        return took, done

    r = run_both(tmp_path, scenario, mixed_image)
    ours, theirs = r["stillpoint"][0], r["qemu-storage-daemon"][0]
    assert r["stillpoint"][1] == r["qemu-storage-daemon"][1] == [32 << 20]
    print(f"speed limit: stillpoint {ours:.2f} s, qemu-storage-daemon {theirs:.2f} s")
    # A ratio of the two in the same run, never an absolute time.
    assert 0.85 <= ours / theirs <= 1.15, f"stillpoint {ours:.2f} s, qemu-storage-daemon {theirs:.2f} s"


def chain(tmp):
    """A qcow2 chain as a user makes one: a converted base (data, zeros, holes) and an
    overlay written by qemu-io; exported over NBD with allocation depth."""
    rng = random.Random(5)
    raw, base, top = f"{tmp}/base.raw", f"{tmp}/base.qcow2", f"{tmp}/top.qcow2"
    with open(raw, "wb") as f:
        for _ in range(32):
            k = rng.random()
            if k < 0.5:
                f.write(rng.randbytes(1 << 20))
            elif k < 0.75:
                f.write(bytes(1 << 20))
            else:
                f.seek(1 << 20, 1)
        f.truncate(32 << 20)
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", raw, base], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top],
                   check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 3M 100k", "-c", "write -z 9M 64k", top],
                   check=True, capture_output=True)
    return ["--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top}",
            "--nbd-server", f"addr.type=unix,addr.path={tmp}/nbd.sock",
            "--export", "type=nbd,id=e,node-name=top,name=top,allocation-depth=on"]


def nbd_map(socket, export, context):
    out = subprocess.run(["nbdinfo", f"--map={context}", "--json",
                          f"nbd+unix:///{export}?socket={socket}"],
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_data_clusters_are_not_split_at_holes_of_the_host_file(tmp_path):
    async def scenario(d):
        sock = f"{d.tmp}/nbd.sock"
        return nbd_map(sock, "top", "base:allocation"), nbd_map(sock, "top", "qemu:allocation-depth")

    r = run_both(tmp_path, scenario, chain)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
