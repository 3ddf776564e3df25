"""Commands QEMU's backup documentation and older scripts still use: `query-block`,
`nbd-server-add`/`nbd-server-remove`, `drive-backup`, and the external snapshots of
live-block-operations.rst (`blockdev-snapshot-sync`, `blockdev-snapshot`), run side
by side against qemu-storage-daemon and stillpoint: answers, errors, events, the
nodes left behind and the images written.

Anonymous nodes ("#block123") are named differently by the two daemons, so node
lists compare named nodes only.
"""

import asyncio
import json
import os
import subprocess

from harness import SIZE
from harness import normalize
from harness import run_both


async def qemu_io(d, export, *commands):
    uri = f"nbd+unix:///{export}?socket={d.tmp}/nbd.sock"
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    io = await asyncio.to_thread(subprocess.run, args + [uri], capture_output=True, text=True)
    return io.returncode, "verification failed" in io.stdout or "Pattern verification" in io.stdout


async def exports(d):
    listed = (await d.run("query-block-exports"))[1]
    return sorted((e["id"], e["node-name"], e["shutting-down"]) for e in listed)


async def named_nodes(d):
    """(name, driver, read-only, backing depth, backing file's base name) of each
    named node."""
    out = []
    for n in (await d.run("query-named-block-nodes"))[1]:
        if n["node-name"].startswith("#"):
            continue
        backing = n.get("backing_file")
        out.append((n["node-name"], n["drv"], n["ro"], n["backing_file_depth"],
                    os.path.basename(backing) if backing else None))
    return sorted(out)


def image_info(path):
    """What `qemu-img info` says about an image: format, size, backing file and format."""
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    return (info["format"], info["virtual-size"], info.get("backing-filename"),
            info.get("backing-filename-format"))


def untmp(d, value):
    """`value` with the daemon's temporary directory written as "T", so messages
    naming files compare."""
    if isinstance(value, str):
        return value.replace(d.tmp, "T")
    if isinstance(value, (list, tuple)):
        return type(value)(untmp(d, v) for v in value)
    if isinstance(value, dict):
        return {k: untmp(d, v) for k, v in value.items()}
    return value


def same(a, b):
    out = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)
    return out.returncode, out.stdout.strip()


def test_query_block_and_the_legacy_nbd_server_commands(tmp_path):
    async def scenario(d):
        sock = f"{d.tmp}/nbd.sock"
        r = [await d.run("query-block"),
             await d.run("nbd-server-add", {"device": "src"}),
             await d.run("nbd-server-remove", {"name": "src"}),
             await d.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}),
             await d.run("nbd-server-add", {"device": "nosuch"}),
             await d.run("nbd-server-add", {"device": "src"}),
             await d.run("nbd-server-add", {"device": "src"}),
             await d.run("nbd-server-add", {"device": "src2", "name": "second", "writable": True,
                                            "description": "the second disk"}),
             await d.run("nbd-server-add", {"device": "src", "name": "bm", "bitmap": "nosuch"}),
             await d.run("block-dirty-bitmap-add", {"node": "src", "name": "b0"}),
             await d.run("nbd-server-add", {"device": "src", "name": "bm", "bitmap": "b0"}),
             await d.run("block-dirty-bitmap-disable", {"node": "src", "name": "b0"}),
             await d.run("nbd-server-add", {"device": "src", "name": "bm", "bitmap": "b0"}),
             await d.run("block-dirty-bitmap-enable", {"node": "src", "name": "b0"}),
             await d.run("nbd-server-add", {"device": "src", "name": "x", "nosuch": 1}),
             await exports(d),
             await qemu_io(d, "second", "write -P 7 0 64k", "read -P 7 0 64k"),
             await qemu_io(d, "src", "write -P 7 0 64k"),
             await d.run("nbd-server-remove", {"name": "nosuch"}),
             await d.run("nbd-server-remove", {"name": "src"})]
        r.append([e["event"] for e in await d.until("BLOCK_EXPORT_DELETED")])
        r += [await d.run("nbd-server-remove", {"name": "second", "mode": "hard"}),
              [e["data"] for e in await d.until("BLOCK_EXPORT_DELETED")],
              await d.run("nbd-server-remove", {"name": "src"}),
              await d.run("nbd-server-remove", {"name": "bm", "mode": "brutal"}),
              await exports(d),
              await d.run("nbd-server-stop"),
              [e["data"] for e in await d.until("BLOCK_EXPORT_DELETED")],
              await d.run("nbd-server-remove", {"name": "bm"}),
              await exports(d)]
        return r

    r = run_both(tmp_path, scenario)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    # Not vacuous: the named export was served and written, the read-only one refused.
    assert r["stillpoint"][0] == ("ok", [])
    assert r["stillpoint"][16] == (0, False)
    assert r["stillpoint"][17][0] != 0


def test_drive_backup_creates_its_target_and_drops_it_when_the_job_ends(tmp_path):
    def qcow2_source(tmp):
        base = f"{tmp}/base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, str(SIZE)], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 1 0 2M", "-c", "write -P 2 5M 1M", base],
                       check=True, capture_output=True)
        top = f"{tmp}/top.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2",
                        top], check=True)
        subprocess.run(["qemu-io", "-c", "write -P 3 1M 2M", top], check=True, capture_output=True)
        return ["--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top}"]

    async def scenario(d):
        t = d.tmp
        r = [await d.run("drive-backup", {"device": "src", "target": f"{t}/nojob.raw",
                                          "sync": "full"}),
             await d.run("drive-backup", {"job-id": "j", "device": "nosuch",
                                          "target": f"{t}/x.raw", "sync": "full"}),
             await d.run("drive-backup", {"job-id": "j", "device": "src",
                                          "target": f"{t}/x.raw"}),
             await d.run("drive-backup", {"job-id": "j", "device": "src", "sync": "full",
                                          "target": f"{t}/missing.qcow2", "mode": "existing"}),
             await d.run("drive-backup", {"job-id": "j", "device": "src", "sync": "none",
                                          "target": f"{t}/none.raw", "format": "raw"}),
             await d.run("drive-backup", {"job-id": "j", "device": "src", "sync": "full",
                                          "target": f"{t}/x.img", "format": "vmdk2"})]
        nodes_before = await named_nodes(d)
        # Full, into a new image of the source's format (raw).
        r.append(await d.run("drive-backup", {"job-id": "full-raw", "device": "src",
                                              "sync": "full", "target": f"{t}/full.raw"}))
        r.append(normalize(await d.until("JOB_STATUS_CHANGE", "null")))
        r.append(image_info(f"{t}/full.raw")[:2])
        r.append(same(d.src, f"{t}/full.raw"))
        # Full, into a new qcow2, with a speed.
        r.append(await d.run("drive-backup", {"job-id": "full-q", "device": "top", "sync": "full",
                                              "target": f"{t}/full.qcow2", "format": "qcow2",
                                              "speed": 64 << 20}))
        r.append(normalize(await d.until("JOB_STATUS_CHANGE", "null")))
        r.append(image_info(f"{t}/full.qcow2"))
        r.append(same(f"{t}/top.qcow2", f"{t}/full.qcow2"))
        # Top: the new image is backed by the source's backing file.
        r.append(await d.run("drive-backup", {"job-id": "top-q", "device": "top", "sync": "top",
                                              "target": f"{t}/top-copy.qcow2",
                                              "format": "qcow2"}))
        r.append(normalize(await d.until("JOB_STATUS_CHANGE", "null")))
        r.append(image_info(f"{t}/top-copy.qcow2"))
        r.append(same(f"{t}/top.qcow2", f"{t}/top-copy.qcow2"))
        # None: the new image is backed by the source itself; the job runs until cancelled.
        r.append(await d.run("drive-backup", {"job-id": "none-q", "device": "src", "sync": "none",
                                              "target": f"{t}/none.qcow2", "format": "qcow2"}))
        r.append(image_info(f"{t}/none.qcow2"))
        r.append(await d.run("block-job-cancel", {"device": "none-q"}))
        r.append(normalize(await d.until("JOB_STATUS_CHANGE", "null")))
        # Existing: an image made beforehand is opened as it is.
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{t}/made.qcow2", str(SIZE)],
                       check=True)
        r.append(await d.run("drive-backup", {"job-id": "ex", "device": "src", "sync": "full",
                                              "target": f"{t}/made.qcow2", "mode": "existing"}))
        r.append(normalize(await d.until("JOB_STATUS_CHANGE", "null")))
        r.append(same(d.src, f"{t}/made.qcow2"))
        # Each job's target went with it.
        r.append(await named_nodes(d) == nodes_before)
        r.append(len((await d.run("query-named-block-nodes"))[1]))
        return untmp(d, r)

    r = run_both(tmp_path, scenario, qcow2_source)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    identical = (0, "Images are identical.")
    assert [r["stillpoint"][i] for i in (9, 13, 17, 24)] == [identical] * 4
    assert r["stillpoint"][-2] is True


def test_live_block_operations_external_snapshots_under_an_export(tmp_path):
    """live-block-operations.rst: `blockdev-snapshot-sync` creates the overlay and puts
    it on top; `blockdev-snapshot` does the same with an overlay added beforehand with
    `backing: null`. The export moves to each new top, and writes through it land in
    the overlay, the old top read-only below."""
    def exported(tmp):
        with open(f"{tmp}/disk.raw", "wb") as f:
            f.write(os.urandom(4 << 20))
        subprocess.run(["qemu-img", "create", "-q", "-u", "-f", "qcow2", "-b",
                        f"{tmp}/snap.qcow2", "-F", "qcow2", f"{tmp}/ov.qcow2", "4M"], check=True)
        return ["--blockdev", f"driver=raw,node-name=disk,file.driver=file,"
                              f"file.filename={tmp}/disk.raw",
                "--nbd-server", f"addr.type=unix,addr.path={tmp}/nbd.sock",
                "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"]

    async def scenario(d):
        t = d.tmp
        r = [await d.run("blockdev-snapshot-sync", {"node-name": "nosuch",
                                                    "snapshot-file": f"{t}/n.qcow2"}),
             await d.run("blockdev-snapshot-sync", {"node-name": "disk",
                                                    "snapshot-file": f"{t}/n.qcow2"}),
             await d.run("blockdev-snapshot-sync", {"node-name": "disk",
                                                    "snapshot-file": f"{t}/n.qcow2",
                                                    "snapshot-node-name": "disk"}),
             await d.run("blockdev-snapshot-sync", {"node-name": "disk",
                                                    "snapshot-file": f"{t}/n.qcow2",
                                                    "snapshot-node-name": "n", "mode": "existing"}),
             await d.run("blockdev-snapshot-sync", {"node-name": "disk", "format": "raw",
                                                    "snapshot-file": f"{t}/n.raw",
                                                    "snapshot-node-name": "n"}),
             await d.run("blockdev-snapshot-sync", {"node-name": "disk",
                                                    "snapshot-file": f"{t}/snap.qcow2",
                                                    "snapshot-node-name": "snap"}),
             await named_nodes(d), await exports(d),
             image_info(f"{t}/snap.qcow2"),
             await d.run("blockdev-snapshot-sync", {"node-name": "disk",
                                                    "snapshot-file": f"{t}/x.qcow2",
                                                    "snapshot-node-name": "x"}),
             await qemu_io(d, "disk", "write -P 5 1M 64k")]
        # blockdev-snapshot: the overlay is added first, with no backing.
        r += [await d.run("blockdev-snapshot", {"node": "snap", "overlay": "nosuch"}),
              await d.run("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": None,
                                           "file": {"driver": "file",
                                                    "filename": f"{t}/ov.qcow2"}}),
              await d.run("blockdev-snapshot", {"node": "snap", "overlay": "ov"}),
              await named_nodes(d), await exports(d),
              await d.run("blockdev-snapshot", {"node": "snap", "overlay": "ov"}),
              await d.run("blockdev-snapshot", {"node": "ov", "overlay": "disk"}),
              await qemu_io(d, "disk", "write -P 9 0 64k", "read -P 5 1M 64k"),
              await d.run("blockdev-del", {"node-name": "snap"})]
        # The chain as files: ov over snap over disk.raw, each write where it belongs.
        maps = []
        for image in ("ov.qcow2", "snap.qcow2"):
            out = subprocess.run(["qemu-img", "map", "-U", "--output=json", f"{t}/{image}"],
                                 capture_output=True, text=True, check=True)
            maps.append([(e["start"], e["length"], e["depth"], e["data"])
                         for e in json.loads(out.stdout)])
        r.append(maps)
        return untmp(d, r)

    r = run_both(tmp_path, scenario, exported)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][7] == [("e", "snap", False)]
    assert r["stillpoint"][15] == [("e", "ov", False)]
