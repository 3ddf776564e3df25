"""QEMU's own documentation as a specification: the QMP flows of docs/interop/bitmaps.rst,
docs/interop/live-block-operations.rst and docs/tools/qemu-storage-daemon.rst, run
unchanged against qemu-storage-daemon and stillpoint, answers compared. Where a flow
injects a failure, qemu-storage-daemon uses blkdebug and stillpoint its `fault` driver,
at the same offset.
"""

import asyncio
import json
import os
import random
import subprocess

import pytest

from harness import SIZE
from harness import STILLPOINT
from harness import run_both



def two_drives(tmp):
    """drive0 and drive1 (8 MiB of data each), their targets, and an NBD server."""
    rng = random.Random(4)
    for name in ("d0", "d1"):
        with open(f"{tmp}/{name}.raw", "wb") as f:
            f.write(rng.randbytes(SIZE))
        with open(f"{tmp}/{name}-inc.raw", "wb") as f:
            f.truncate(SIZE)
    return ["--blockdev", f"driver=raw,node-name=drive0,file.driver=file,file.filename={tmp}/d0.raw",
            "--blockdev", f"driver=raw,node-name=tgt0,file.driver=file,file.filename={tmp}/d0-inc.raw",
            "--blockdev", f"driver=raw,node-name=tgt1,file.driver=file,file.filename={tmp}/d1-inc.raw",
            "--nbd-server", f"addr.type=unix,addr.path={tmp}/nbd.sock"]


def read_error_at(d, node, path, offset):
    """A raw node over `path` whose first read touching `offset` fails with EIO."""
    if d.kind == "qemu-storage-daemon":
        injected = {"driver": "blkdebug", "image": {"driver": "file", "filename": path},
                    "inject-error": [{"event": "read_aio", "errno": 5, "sector": offset // 512,
                                      "once": True}]}
    else:
        injected = {"driver": "fault", "image": {"driver": "file", "filename": path},
                    "rules": [{"op": "read", "offset": offset, "length": 512, "errno": "EIO",
                               "once": True}]}
    return {"driver": "raw", "node-name": node, "file": injected}


async def write_through_export(d, node, *commands):
    await d.run("block-export-add", {"type": "nbd", "id": f"w-{node}", "node-name": node,
                                     "name": node, "writable": True})
    uri = f"nbd+unix:///{node}?socket={d.tmp}/nbd.sock"
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    io = await asyncio.to_thread(subprocess.run, args + [uri], capture_output=True, text=True)
    assert io.returncode == 0, io.stderr
    await d.run("block-export-del", {"id": f"w-{node}"})
    await d.until("BLOCK_EXPORT_DELETED")


async def bitmap_counts(d):
    nodes = (await d.run("query-named-block-nodes"))[1]
    return sorted((n["node-name"], b["name"], b["count"]) for n in nodes
                  for b in n.get("dirty-bitmaps", []))


def job_story(events, job):
    """A job's status changes and block-job events, in order, paused/running pairs
    dropped (qemu-storage-daemon adds them around drains)."""
    story = []
    for e in events:
        data = e.get("data", {})
        if e["event"] == "JOB_STATUS_CHANGE" and data["id"] == job:
            story.append(data["status"])
        elif e["event"].startswith("BLOCK_JOB_") and data.get("device") == job:
            story.append(e["event"] + (" error" if data.get("error") else ""))
    cleaned = []
    for item in story:
        if item == "running" and cleaned and cleaned[-1] == "paused":
            cleaned.pop()
            continue
        cleaned.append(item)
    return cleaned


def test_bitmaps_rst_grouped_completion_mode(tmp_path):
    """bitmaps.rst, "Example: Grouped Completion Mode": drive1's incremental fails on a
    read error after drive0's has finished; with grouped completion drive0 is
    cancelled instead, and both bitmaps keep every change."""
    async def scenario(d):
        await d.run("blockdev-add", read_error_at(d, "drive1", f"{d.tmp}/d1.raw", 6 << 20))
        for node, name in (("drive0", "bitmap0"), ("drive1", "bitmap1")):
            await d.run("block-dirty-bitmap-add", {"node": node, "name": name})
        await write_through_export(d, "drive0", "write -P 1 0 64k")
        await write_through_export(d, "drive1", "write -P 2 0 64k", "write -P 3 6M 64k")
        before = await bitmap_counts(d)
        reply = await d.run("transaction", {
            "actions": [
                {"type": "blockdev-backup", "data": {"job-id": "drive0", "device": "drive0",
                                                     "target": "tgt0", "sync": "incremental",
                                                     "bitmap": "bitmap0"}},
                # Throttled, so drive0 is done when drive1 reaches the bad sector.
                {"type": "blockdev-backup", "data": {"job-id": "drive1", "device": "drive1",
                                                     "target": "tgt1", "sync": "incremental",
                                                     "bitmap": "bitmap1", "speed": 65536}}],
            "properties": {"completion-mode": "grouped"}})
        events = []
        gone = set()
        while gone != {"drive0", "drive1"}:
            e = await d.next_event()
            events.append(e)
            if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] == "null":
                gone.add(e["data"]["id"])
        return reply, before, job_story(events, "drive0"), job_story(events, "drive1"), \
            await bitmap_counts(d)

    r = run_both(tmp_path, scenario, two_drives)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert "BLOCK_JOB_CANCELLED" in r["stillpoint"][2]


def fresh_qcow2(path, size=SIZE):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)


def same(a, b):
    # -U: the daemon still has the images open (qemu-storage-daemon locks them).
    out = subprocess.run(["qemu-img", "compare", "-U", a, b], capture_output=True, text=True)
    return out.returncode, out.stdout.strip()


def test_bitmaps_rst_incremental_without_backing_files_then_rebase(tmp_path):
    """bitmaps.rst, "Example: Second Incremental Backup" with targets that have no
    backing file, then `qemu-img rebase -u` onto the previous backup: a cluster zeroed
    over data must be in the incremental target, or the chain shows the old data."""
    async def scenario(d):
        full, inc = f"{d.tmp}/full.qcow2", f"{d.tmp}/inc0.qcow2"
        fresh_qcow2(full)
        fresh_qcow2(inc)
        r = [await d.run("blockdev-add", {"driver": "qcow2", "node-name": "full",
                                          "file": {"driver": "file", "filename": full}}),
             await d.run("transaction", {"actions": [
                 {"type": "block-dirty-bitmap-add", "data": {"node": "drive0", "name": "bitmap0"}},
                 {"type": "blockdev-backup", "data": {"job-id": "j0", "device": "drive0",
                                                      "target": "full", "sync": "full"}}]})]
        await d.until("JOB_STATUS_CHANGE", "null")
        await write_through_export(d, "drive0", "write -z 0 64k", "write -P 9 1M 64k",
                                   "write -z 3M 128k")
        r.append(await d.run("blockdev-add", {"driver": "qcow2", "node-name": "inc0",
                                              "file": {"driver": "file", "filename": inc}}))
        r.append(await d.run("blockdev-backup", {"job-id": "j1", "device": "drive0", "target": "inc0",
                                                 "sync": "incremental", "bitmap": "bitmap0"}))
        await d.until("JOB_STATUS_CHANGE", "null")
        for node in ("inc0", "full"):
            r.append(await d.run("blockdev-del", {"node-name": node}))
        rebase = subprocess.run(["qemu-img", "rebase", "-u", "-b", full, "-F", "qcow2", inc],
                                capture_output=True, text=True)
        r.append(rebase.returncode)
        r.append(same(f"{d.tmp}/d0.raw", inc))
        return r

    r = run_both(tmp_path, scenario, two_drives)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][-1] == (0, "Images are identical.")


def test_sync_top_into_a_target_without_backing_then_rebase(tmp_path):
    """The same with `sync: top`: an overlay that zeroes a cluster of its base, backed
    up alone into a fresh target, then rebased onto the base, reads as the overlay."""
    def overlay(tmp):
        base, top = f"{tmp}/base.qcow2", f"{tmp}/top.qcow2"
        fresh_qcow2(base)
        subprocess.run(["qemu-io", "-c", "write -P 1 0 1M", "-c", "write -P 2 4M 1M", base],
                       check=True, capture_output=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top],
                       check=True)
        subprocess.run(["qemu-io", "-c", "write -z 0 64k", "-c", "write -P 3 512k 64k",
                        "-c", "write -z 4M 128k", top], check=True, capture_output=True)
        fresh_qcow2(f"{tmp}/t.qcow2")
        return ["--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={top}",
                "--blockdev", f"driver=qcow2,node-name=t,file.driver=file,file.filename={tmp}/t.qcow2"]

    async def scenario(d):
        r = [await d.run("blockdev-backup", {"job-id": "j", "device": "top", "target": "t",
                                             "sync": "top"})]
        await d.until("JOB_STATUS_CHANGE", "null")
        r.append(await d.run("blockdev-del", {"node-name": "t"}))
        target = f"{d.tmp}/t.qcow2"
        r.append(subprocess.run(["qemu-img", "rebase", "-u", "-b", f"{d.tmp}/base.qcow2",
                                 "-F", "qcow2", target]).returncode)
        r.append(same(f"{d.tmp}/top.qcow2", target))
        return r

    r = run_both(tmp_path, scenario, overlay)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][-1] == (0, "Images are identical.")


def small_filesystem(path, free_kib):
    """A 4 MiB tmpfs at `path` with about `free_kib` KiB left, or None if this machine
    cannot mount one (not root)."""
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", path],
                      capture_output=True).returncode != 0:
        return None
    return path


def test_bitmap_mode_always_drops_only_what_a_full_target_holds(tmp_path):
    """bitmaps.rst's bitmap modes with a target on a nearly full filesystem: the job
    fails with ENOSPC; `always` drops from the bitmap exactly the clusters the target
    made durable (data and mapping), and the target has no leaked clusters."""
    fs = str(tmp_path / "fs")
    if small_filesystem(fs, 0) is None:
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["umount", fs])

    def one_drive(tmp):
        with open(f"{tmp}/d0.raw", "wb") as f:
            f.write(random.Random(9).randbytes(SIZE))
        return ["--blockdev", f"driver=raw,node-name=drive0,file.driver=file,file.filename={tmp}/d0.raw",
                "--nbd-server", f"addr.type=unix,addr.path={tmp}/nbd.sock"]

    async def scenario(d):
        out = []
        for free_kib in (1100, 700):
            mount = small_filesystem(f"{d.tmp}/fs", free_kib)
            target = f"{mount}/t.qcow2"
            fresh_qcow2(target)
            st = os.statvfs(mount)
            with open(f"{mount}/filler", "wb") as f:
                f.write(bytes(st.f_bavail * st.f_frsize - free_kib * 1024))
            await d.run("block-dirty-bitmap-add", {"node": "drive0", "name": "bm"})
            await write_through_export(d, "drive0", f"write -P 7 0 {SIZE}")
            dirty = [c for _, _, c in await bitmap_counts(d)]
            await d.run("blockdev-add", {"driver": "qcow2", "node-name": "full-tgt",
                                         "file": {"driver": "file", "filename": target}})
            await d.run("blockdev-backup", {"job-id": "j", "device": "drive0", "target": "full-tgt",
                                            "sync": "bitmap", "bitmap": "bm", "bitmap-mode": "always"})
            events = await d.until("JOB_STATUS_CHANGE", "null")
            error = [e["data"].get("error") for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
            left = [c for _, _, c in await bitmap_counts(d)]
            await d.run("blockdev-del", {"node-name": "full-tgt"})
            await d.run("block-dirty-bitmap-remove", {"node": "drive0", "name": "bm"})
            mapped = subprocess.run(["qemu-img", "map", "-U", "--output=json", target],
                                    capture_output=True, text=True, check=True).stdout
            held = sum(x["length"] for x in json.loads(mapped) if x["data"])
            check = subprocess.run(["qemu-img", "check", "-U", "--output=json", target],
                                   capture_output=True, text=True).stdout
            leaks = json.loads(check).get("leaks", 0)
            subprocess.run(["umount", mount], check=True)
            out.append((free_kib, error, dirty[0] - left[0], held, leaks))
        return out

    r = run_both(tmp_path, scenario, one_drive)
    for kind, outcomes in r.items():
        for free_kib, error, dropped, held, leaks in outcomes:
            assert error == ["No space left on device"], (kind, free_kib, error)
            assert dropped == held, f"{kind}, {free_kib} KiB free: dropped {dropped}, target holds {held}"
            assert leaks == 0, (kind, free_kib, leaks)
    # With about 1 MiB free both targets hold the same 16 clusters. (With less, how
    # much fits depends on each daemon's request sizes.)
    assert r["stillpoint"][0] == r["qemu-storage-daemon"][0]


def test_merging_from_a_busy_or_inconsistent_bitmap_is_refused(tmp_path):
    """bitmaps.rst's block-dirty-bitmap-merge: a source bitmap a backup has frozen, or
    one found in use in an image (not saved cleanly), cannot be merged from."""
    def images(tmp):
        args = two_drives(tmp)
        img = f"{tmp}/crashed.qcow2"
        fresh_qcow2(img)
        subprocess.run(["qemu-img", "bitmap", "--add", img, "stale"], check=True)
        # Mark it in use, as a writer that crashed leaves it.
        with open(img, "r+b") as f:
            header = f.read(65536)
            at = int.from_bytes(header[100:104], "big")
            while True:
                kind, length = int.from_bytes(header[at:at + 4], "big"), int.from_bytes(header[at + 4:at + 8], "big")
                if kind == 0x23852875:
                    directory = int.from_bytes(header[at + 24:at + 32], "big")
                    break
                at += 8 + (length + 7) // 8 * 8
            f.seek(directory + 12)
            flags = int.from_bytes(f.read(4), "big")
            f.seek(directory + 12)
            f.write((flags | 1).to_bytes(4, "big"))
        return args + ["--blockdev", f"driver=qcow2,node-name=crashed,file.driver=file,file.filename={img}"]

    async def scenario(d):
        r = [await d.run("block-dirty-bitmap-add", {"node": "drive0", "name": n}) for n in ("a", "b")]
        r.append(await d.run("block-dirty-bitmap-add", {"node": "crashed", "name": "fresh"}))
        # Two changes far apart: at 1 B/s the job copies the first and waits, busy.
        await write_through_export(d, "drive0", "write -P 1 0 64k", "write -P 1 4M 64k")
        r.append(await d.run("blockdev-backup", {"job-id": "j", "device": "drive0", "target": "tgt0",
                                                 "sync": "incremental", "bitmap": "b", "speed": 1}))
        await d.until("JOB_STATUS_CHANGE", "running")
        r.append(await d.run("block-dirty-bitmap-merge", {"node": "drive0", "target": "a",
                                                         "bitmaps": ["b"]}))
        r.append(await d.run("block-dirty-bitmap-merge", {"node": "drive0", "target": "b",
                                                         "bitmaps": ["a"]}))
        r.append(await d.run("block-dirty-bitmap-merge", {"node": "crashed", "target": "fresh",
                                                         "bitmaps": ["stale"]}))
        r.append(await d.run("block-dirty-bitmap-merge", {"node": "crashed", "target": "fresh",
                                                         "bitmaps": [{"node": "crashed", "name": "stale"}]}))
        r.append(await d.run("block-job-cancel", {"device": "j", "force": True}))
        await d.until("JOB_STATUS_CHANGE", "null")
        r.append(await bitmap_counts(d))
        return r

    r = run_both(tmp_path, scenario, images)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][4] == ("error", "GenericError",
                                  "Bitmap 'b' is currently in use by another operation and cannot be used")
    assert r["stillpoint"][6][2] == "Bitmap 'stale' is inconsistent and cannot be used"


def test_sighup_exits_cleanly_and_stores_a_new_persistent_bitmap(tmp_path):
    """qemu-storage-daemon.rst: the daemon ends on SIGINT, SIGTERM or SIGHUP, closing
    its nodes (a persistent bitmap created over QMP is stored in the image)."""
    def image(tmp):
        fresh_qcow2(f"{tmp}/disk.qcow2")
        return ["--blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={tmp}/disk.qcow2",
                "--pidfile", f"{tmp}/daemon.pid"]

    async def scenario(d):
        r = [await d.run("block-dirty-bitmap-add", {"node": "disk", "name": "daily", "persistent": True})]
        d.proc.send_signal(__import__("signal").SIGHUP)
        r.append(await asyncio.to_thread(d.proc.wait, 20))
        r.append((os.path.exists(d.qmp_path), os.path.exists(f"{d.tmp}/daemon.pid")))
        info = subprocess.run(["qemu-img", "info", "--output=json", f"{d.tmp}/disk.qcow2"],
                              capture_output=True, text=True, check=True).stdout
        bitmaps = json.loads(info).get("format-specific", {}).get("data", {}).get("bitmaps", [])
        r.append([(b["name"], b["flags"]) for b in bitmaps])
        return r

    r = run_both(tmp_path, scenario, image)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][2] == (False, False)
    assert r["stillpoint"][3] == [("daily", ["auto"])]


def test_a_second_daemon_with_the_same_pid_file_refuses_to_start(tmp_path):
    def pidfile(tmp):
        return ["--pidfile", f"{tmp}/daemon.pid"]

    async def scenario(d):
        with open(f"{d.tmp}/daemon.pid") as f:
            first = f.read()
        program = ["qemu-storage-daemon"] if d.kind == "qemu-storage-daemon" else [STILLPOINT, "daemon"]
        second = await asyncio.to_thread(
            subprocess.run, program + ["--pidfile", f"{d.tmp}/daemon.pid"],
            capture_output=True, text=True, timeout=20)
        with open(f"{d.tmp}/daemon.pid") as f:
            after = f.read()
        message = second.stderr.strip().split(": ", 1)[-1]
        return second.returncode, message, first == after == f"{d.proc.pid}\n"

    r = run_both(tmp_path, scenario, pidfile)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"] == (1, "cannot create PID file: Cannot lock pid file: "
                                  "Resource temporarily unavailable", True)


MALFORMED = [
    b'{"execute": "query-version",\n "arguments": {"x": nope},\n "id": 1}\n{"execute":"query-version"}\n',
    b'{"execute": "query-version",\n  "id": 1\n{"execute": query-version}\n{"execute":"query-version","id":2}\n',
    b'{"execute": nope}\n{"execute":"query-version"}\n',
    b'{"execute":\n "query-version",\n "id": [1,\n 2]}\n',
    b'[1, 2]\n{"x":\n true}\n',
    b'{"execute": "query-version", "id": 1} garbage\n{"execute":"query-version"}\n',
]


def test_malformed_input_gets_one_error_per_value_qemu_could_not_parse(tmp_path):
    """The QMP spec's error recovery (docs/interop/qmp-spec.rst): each malformed value is
    answered once, and the commands around it are answered as usual."""
    def second_monitor(tmp):
        # A monitor chardev of qemu-storage-daemon takes one client at a time.
        return ["--chardev", f"socket,id=raw,path={tmp}/raw.sock,server=on,wait=off",
                "--monitor", "chardev=raw"]

    async def scenario(d):
        out = []
        for payload in MALFORMED:
            out.append(await asyncio.to_thread(raw_qmp_session, f"{d.tmp}/raw.sock", payload))
        names = [c["name"] for c in (await d.run("query-commands"))[1]]
        out.append("transaction" in names)
        return out

    r = run_both(tmp_path, scenario, second_monitor)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][-1] is True


def raw_qmp_session(path, payload):
    """Negotiates, sends `payload`, and returns the kinds of replies that came back."""
    import socket
    import time
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(5)
    s.recv(4096)
    s.sendall(b'{"execute":"qmp_capabilities"}\n')
    s.recv(4096)
    s.sendall(payload)
    time.sleep(0.4)
    s.settimeout(0.3)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    s.close()
    return ["return" if '"return"' in line else "error" for line in data.decode().splitlines()]
