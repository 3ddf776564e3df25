"""QMP compatibility: each scenario runs against qemu-storage-daemon and against
`stillpoint daemon`, started with the same command line, driven by QEMU's own client
library (qemu.qmp), and the two are compared: return shapes, error classes and texts,
the order of job status changes and events, and the resulting images.

qemu-storage-daemon inserts extra paused/running pairs around drained sections;
clients must tolerate them, so they are dropped before comparing sequences.
"""

import asyncio
import os
import subprocess

from harness import SIZE
from harness import Daemon
from harness import images_identical
from harness import normalize
from harness import run_both


def test_full_backup(tmp_path):
    async def scenario(d):
        reply = await d.run("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full"})
        events = await d.until("JOB_STATUS_CHANGE", "null")
        completed = [e["data"] for e in events if e["event"] == "BLOCK_JOB_COMPLETED"]
        return reply, normalize(events), completed, images_identical(d.src, d.tgt)

    r = run_both(tmp_path, scenario)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][3] is True


def test_cancel(tmp_path):
    async def scenario(d):
        await d.run("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": 65536})
        await d.until("JOB_STATUS_CHANGE", "running")
        reply = await d.run("block-job-cancel", {"device": "j"})
        events = await d.until("JOB_STATUS_CHANGE", "null")
        cancelled = [e["data"] for e in events if e["event"] == "BLOCK_JOB_CANCELLED"]
        shape = sorted(cancelled[0].keys())
        partial = cancelled[0]["offset"] < cancelled[0]["len"]
        return reply, normalize(events)[-4:], shape, partial

    r = run_both(tmp_path, scenario)
    assert r["stillpoint"] == r["qemu-storage-daemon"]


def test_pause_resume_and_set_speed(tmp_path):
    async def scenario(d):
        await d.run("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": 65536})
        await d.until("JOB_STATUS_CHANGE", "running")
        replies = [await d.run("block-job-pause", {"device": "j"}), await d.run("block-job-pause", {"device": "j"})]
        for _ in range(200):
            jobs = (await d.run("query-block-jobs"))[1]
            if jobs[0]["status"] == "paused":
                break
            await asyncio.sleep(0.02)
        info = jobs[0]
        shape = sorted(info.keys())
        replies.append(await d.run("block-job-set-speed", {"device": "j", "speed": -1}))
        replies.append(await d.run("block-job-resume", {"device": "j"}))
        replies.append(await d.run("block-job-resume", {"device": "j"}))
        replies.append(await d.run("block-job-set-speed", {"device": "j", "speed": 0}))
        events = await d.until("JOB_STATUS_CHANGE", "null")
        return replies, shape, (info["paused"], info["status"], info["io-status"]), normalize(events)[-5:], \
            images_identical(d.src, d.tgt)

    r = run_both(tmp_path, scenario)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][4] is True


def test_manual_finalize_and_dismiss(tmp_path):
    async def scenario(d):
        await d.run("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                                        "auto-finalize": False, "auto-dismiss": False})
        events = await d.until("BLOCK_JOB_PENDING")
        replies = [await d.run("job-dismiss", {"id": "j"}), await d.run("job-finalize", {"id": "j"})]
        events += await d.until("JOB_STATUS_CHANGE", "concluded")
        jobs = (await d.run("query-jobs"))[1]
        replies.append(await d.run("job-finalize", {"id": "j"}))
        replies.append(await d.run("job-dismiss", {"id": "j"}))
        events += await d.until("JOB_STATUS_CHANGE", "null")
        replies.append(await d.run("job-dismiss", {"id": "j"}))
        replies.append(await d.run("block-job-dismiss", {"id": "j"}))
        shape = sorted(jobs[0].keys())
        return replies, normalize(events), shape, jobs[0]["status"]

    r = run_both(tmp_path, scenario)
    assert r["stillpoint"] == r["qemu-storage-daemon"]


BAD_ARGUMENTS = [
    {"job-id": "j", "device": "nosuch", "target": "tgt", "sync": "full"},
    {"job-id": "j", "device": "src", "target": "nosuch", "sync": "full"},
    {"job-id": "j", "device": "src", "target": "small", "sync": "full"},
    {"job-id": "j", "device": "src", "target": "src", "sync": "full"},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": -1},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "fast"},
    {"job-id": "j", "device": "src", "target": "tgt"},
    {"job-id": "j", "device": 7, "target": "tgt", "sync": "full"},
    {"job-id": "j", "target": "tgt", "sync": "full"},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "bogus": 1},
    {"job-id": "1j", "device": "src", "target": "tgt", "sync": "full"},
    {"device": "src", "target": "tgt", "sync": "full"},
    {"device": "src", "target": "small", "sync": "full"},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "bitmap"},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "bitmap-mode": "always"},
]


def test_bad_argument_matrix(tmp_path):
    async def scenario(d):
        replies = [await d.run("blockdev-backup", args) for args in BAD_ARGUMENTS]
        # A duplicate job id needs a running job.
        await d.run("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "speed": 1})
        replies.append(await d.run("blockdev-backup", {"job-id": "j", "device": "small", "target": "small", "sync": "full"}))
        replies.append(await d.run("blockdev-del", {"node-name": "tgt"}))
        replies.append(await d.run("blockdev-del", {"node-name": "nosuch"}))
        replies.append(await d.run("block-job-cancel", {"device": "nosuch"}))
        replies.append(await d.run("job-cancel", {"id": "nosuch"}))
        replies.append(await d.run("nosuch-command"))
        await d.run("block-job-cancel", {"device": "j", "force": True})
        await d.until("JOB_STATUS_CHANGE", "null")
        return replies

    r = run_both(tmp_path, scenario)
    for ours, theirs, args in zip(r["stillpoint"], r["qemu-storage-daemon"], BAD_ARGUMENTS + [None] * 6):
        assert ours == theirs, f"{args}: stillpoint {ours} vs qemu-storage-daemon {theirs}"


def test_backup_while_qemu_io_writes_through_the_nbd_export(tmp_path):
    def extra(tmp):
        sock = os.path.join(tmp, "nbd.sock")
        return ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=exp0,node-name=src,name=disk,writable=on"]

    async def scenario(d):
        snapshot = os.path.join(d.tmp, "snapshot.img")
        subprocess.run(["cp", d.src, snapshot], check=True)
        await d.run("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt", "sync": "full",
                                        "speed": 1 << 20})
        uri = f"nbd+unix:///disk?socket={os.path.join(d.tmp, 'nbd.sock')}"
        io = await asyncio.to_thread(subprocess.run, [
            "qemu-io", "-f", "raw", "-c", "write -P 0x11 1M 64k", "-c", "write -P 0x22 5M 512k",
            "-c", "write -z 3M 1M", "-c", "write -P 0x33 100k 8k", uri], capture_output=True, text=True)
        await d.run("block-job-set-speed", {"device": "j", "speed": 0})
        events = await d.until("JOB_STATUS_CHANGE", "null")
        verify = await asyncio.to_thread(subprocess.run, [
            "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x22 5M 512k", "-c", "read -P 0 3M 1M", d.src],
            capture_output=True, text=True)
        return (io.returncode, "BLOCK_JOB_COMPLETED" in normalize(events), images_identical(snapshot, d.tgt),
                verify.returncode == 0 and "verification failed" not in verify.stdout)

    r = run_both(tmp_path, scenario, extra)
    assert r["stillpoint"] == r["qemu-storage-daemon"] == (0, True, True, True)


def backup_action(job, device, target, **extra):
    return {"type": "blockdev-backup", "data": {"job-id": job, "device": device, "target": target,
                                                "sync": "full", **extra}}


def per_job(events, job):
    return normalize([e for e in events if e["data"].get("id", e["data"].get("device")) == job])


def test_transaction_of_two_disks(tmp_path):
    async def scenario(d):
        refused = await d.run("transaction", {"actions": [
            backup_action("a", "src", "tgt"), backup_action("b", "src2", "small")]})
        jobs_after_refusal = (await d.run("query-jobs"))[1]
        rolled_back = normalize(await d.until("JOB_STATUS_CHANGE", "null"))
        reply = await d.run("transaction", {"actions": [
            backup_action("a", "src", "tgt"), backup_action("b", "src2", "tgt2")],
            "properties": {"completion-mode": "individual"}})
        events = []
        while sum(1 for e in events if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] == "null") < 2:
            events.append(await d.next_event())
        return (refused, jobs_after_refusal, rolled_back, reply, per_job(events, "a"), per_job(events, "b"),
                images_identical(os.path.join(d.tmp, "src.img"), os.path.join(d.tmp, "tgt.img")),
                images_identical(os.path.join(d.tmp, "src2.img"), os.path.join(d.tmp, "tgt2.img")))

    r = run_both(tmp_path, scenario)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][6] and r["stillpoint"][7]


def test_blockdev_create_qcow2_and_a_compressed_backup_into_it(tmp_path):
    async def scenario(d):
        image = os.path.join(d.tmp, "new.qcow2")
        replies = [await d.run("blockdev-create", {"job-id": "cf", "options": {
            "driver": "file", "filename": image, "size": 0}})]
        events = await d.until("JOB_STATUS_CHANGE", "concluded")
        replies.append(await d.run("job-dismiss", {"id": "cf"}))
        events += await d.until("JOB_STATUS_CHANGE", "null")
        replies.append(await d.run("blockdev-add", {"driver": "file", "node-name": "newfile", "filename": image}))
        replies.append(await d.run("blockdev-create", {"job-id": "cq", "options": {
            "driver": "qcow2", "file": "newfile", "size": SIZE, "cluster-size": 65536}}))
        events += await d.until("JOB_STATUS_CHANGE", "concluded")
        # Bad targets fail the job; bad arguments fail the command.
        replies.append(await d.run("blockdev-create", {"job-id": "bad1", "options": {
            "driver": "qcow2", "file": "nosuch", "size": SIZE}}))
        replies.append(await d.run("blockdev-create", {"job-id": "bad2", "options": {
            "driver": "qcow2", "file": "newfile", "size": SIZE, "cluster-size": 3000}}))
        replies.append(await d.run("blockdev-create", {"job-id": "cq", "options": {
            "driver": "qcow2", "file": "newfile", "size": SIZE}}))
        replies.append(await d.run("blockdev-create", {"job-id": "bad3", "options": {
            "driver": "qcow2", "size": SIZE}}))
        for _ in range(500):
            jobs = (await d.run("query-jobs"))[1]
            if all(j["status"] == "concluded" for j in jobs) and len(jobs) == 3:
                break
            await asyncio.sleep(0.01)
        jobs = sorted(jobs, key=lambda j: j["id"])
        block_jobs = await d.run("query-block-jobs")
        for job in ("bad1", "bad2", "cq"):
            replies.append(await d.run("job-dismiss", {"id": job}))
        replies.append(await d.run("blockdev-add", {"driver": "qcow2", "node-name": "newq", "file": "newfile"}))
        replies.append(await d.run("blockdev-backup", {"job-id": "b", "device": "src", "target": "newq",
                                                       "sync": "full", "compress": True}))
        backup = normalize(await d.until("JOB_STATUS_CHANGE", "null"))
        # qemu-storage-daemon releases the target a moment after the job's "null".
        for _ in range(200):
            deleted = await d.run("blockdev-del", {"node-name": "newq"})
            if "busy" not in str(deleted):
                break
            await asyncio.sleep(0.01)
        replies.append(deleted)
        replies.append(await d.run("blockdev-del", {"node-name": "newfile"}))
        check = subprocess.run(["qemu-img", "check", "--output=json", image], capture_output=True, text=True)
        import json
        # (A size that is not a multiple of 512 fails the qcow2 creation: no image.)
        report = json.loads(check.stdout) if check.stdout else {"check-errors": check.stderr.strip()}
        same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", d.src, image]).returncode
        # The source is random data and zeros: qemu-storage-daemon stores its zero
        # clusters compressed, stillpoint leaves them unallocated, so allocation
        # counts differ; both must check clean and read back identical.
        return (replies, normalize(events), jobs, block_jobs, backup, check.returncode,
                report["check-errors"], same)

    r = run_both(tmp_path, scenario)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    if SIZE % 512 == 0:
        assert r["stillpoint"][5:] == (0, 0, 0)
    else:
        # QMP creates the size asked for, and qcow2 holds whole sectors.
        assert r["stillpoint"][2][-1]["error"] == "Image size must be a multiple of 512 bytes"


def nbd_export(tmp):
    sock = os.path.join(tmp, "nbd.sock")
    return ["--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=exp0,node-name=src,name=disk,writable=on"]


async def guest_writes(d, *commands):
    uri = f"nbd+unix:///disk?socket={os.path.join(d.tmp, 'nbd.sock')}"
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    io = await asyncio.to_thread(subprocess.run, args + [uri], capture_output=True, text=True)
    assert io.returncode == 0, io.stderr


async def bitmaps_of(d, node="src"):
    nodes = (await d.run("query-named-block-nodes"))[1]
    for n in nodes:
        if n["node-name"] == node:
            return sorted(n.get("dirty-bitmaps", []), key=lambda b: b.get("name", ""))
    return None


def test_dirty_bitmap_commands_and_errors(tmp_path):
    async def scenario(d):
        r = []
        r.append(await d.run("block-dirty-bitmap-add", {"node": "nosuch", "name": "a"}))
        r.append(await d.run("block-dirty-bitmap-add", {"node": "src", "name": "a"}))
        r.append(await d.run("block-dirty-bitmap-add", {"node": "src", "name": "a"}))
        r.append(await d.run("block-dirty-bitmap-add", {"node": "src", "name": "b", "granularity": 64000}))
        r.append(await d.run("block-dirty-bitmap-add", {"node": "src", "name": "b", "granularity": 256}))
        r.append(await d.run("block-dirty-bitmap-add", {"node": "src", "name": "", "granularity": 65536}))
        r.append(await d.run("block-dirty-bitmap-add", {"node": "src", "name": "b", "granularity": 32768,
                                                         "disabled": True}))
        r.append(await d.run("block-dirty-bitmap-add", {"node": "src", "name": "c", "granularity": 131072}))
        r.append(await d.run("block-dirty-bitmap-remove", {"node": "src", "name": "zz"}))
        r.append(await d.run("block-dirty-bitmap-clear", {"node": "src", "name": "zz"}))
        r.append(await d.run("block-dirty-bitmap-enable", {"node": "nosuch", "name": "a"}))
        states = [await bitmaps_of(d)]
        await guest_writes(d, "write -P 1 0 4k", "write -P 2 1M 200k", "write -z 3M 64k")
        states.append(await bitmaps_of(d))
        r.append(await d.run("block-dirty-bitmap-enable", {"node": "src", "name": "b"}))
        r.append(await d.run("block-dirty-bitmap-disable", {"node": "src", "name": "a"}))
        await guest_writes(d, "write -P 3 5M 8k")
        states.append(await bitmaps_of(d))
        r.append(await d.run("block-dirty-bitmap-merge", {"node": "src", "target": "b", "bitmaps": ["a", "c"]}))
        r.append(await d.run("block-dirty-bitmap-merge", {"node": "src", "target": "b",
                                                           "bitmaps": [{"node": "src", "name": "zz"}]}))
        states.append(await bitmaps_of(d))
        r.append(await d.run("block-dirty-bitmap-clear", {"node": "src", "name": "c"}))
        r.append(await d.run("block-dirty-bitmap-remove", {"node": "src", "name": "a"}))
        states.append(await bitmaps_of(d))
        # Transactions: all or nothing.
        r.append(await d.run("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "t1"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "b"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "t1"}}]}))
        states.append(await bitmaps_of(d))
        r.append(await d.run("transaction", {"actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "t1"}},
            {"type": "block-dirty-bitmap-clear", "data": {"node": "src", "name": "b"}}]}))
        states.append(await bitmaps_of(d))
        return r, states

    r = run_both(tmp_path, scenario, nbd_export)
    for ours, theirs in zip(r["stillpoint"][0], r["qemu-storage-daemon"][0]):
        assert ours == theirs
    for i, (ours, theirs) in enumerate(zip(r["stillpoint"][1], r["qemu-storage-daemon"][1])):
        assert ours == theirs, f"state {i}"


BITMAP_BACKUP_ERRORS = [
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "incremental"},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "incremental", "bitmap": "nosuch"},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "incremental", "bitmap": "bm0",
     "bitmap-mode": "always"},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "bitmap", "bitmap": "bm0"},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "none", "bitmap": "bm0", "bitmap-mode": "on-success"},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "bitmap": "bm0", "bitmap-mode": "never"},
    {"job-id": "j", "device": "src", "target": "tgt", "sync": "full", "bitmap-mode": "never"},
    {"job-id": "j", "device": "src", "target": "src", "sync": "bitmap", "bitmap": "bm0", "bitmap-mode": "never"},
]


def test_bitmap_backup_errors_and_mode_outcomes(tmp_path):
    async def scenario(d):
        r = [await d.run("block-dirty-bitmap-add", {"node": "src", "name": "bm0"})]
        r += [await d.run("blockdev-backup", args) for args in BITMAP_BACKUP_ERRORS]
        outcomes = []
        for mode in ("on-success", "never", "always"):
            for end in ("success", "cancel"):
                await d.run("block-dirty-bitmap-remove", {"node": "src", "name": "bm0"})
                await d.run("block-dirty-bitmap-add", {"node": "src", "name": "bm0"})
                await guest_writes(d, "write -P 5 64k 64k", "write -P 6 2M 128k")
                before = await bitmaps_of(d)
                await d.run("blockdev-backup", {"job-id": "j", "device": "src", "target": "tgt",
                                                "sync": "bitmap", "bitmap": "bm0", "bitmap-mode": mode,
                                                "speed": 1})
                await d.until("JOB_STATUS_CHANGE", "running")
                during = await bitmaps_of(d)
                # A write while the job runs goes to the successor.
                await guest_writes(d, "write -P 7 6M 64k")
                busy = await d.run("block-dirty-bitmap-clear", {"node": "src", "name": "bm0"})
                if end == "cancel":
                    await d.run("block-job-cancel", {"device": "j", "force": True})
                else:
                    await d.run("block-job-set-speed", {"device": "j", "speed": 0})
                events = normalize(await d.until("JOB_STATUS_CHANGE", "null"))
                after = await bitmaps_of(d)
                if mode == "always" and end == "cancel":
                    # What was not copied depends on timing; it lies between S and B+S.
                    count = after[0]["count"]
                    after[0]["count"] = 65536 <= count <= 4 * 65536
                outcomes.append((mode, end, before, during, busy, events[-3:], after))
        return r, outcomes

    r = run_both(tmp_path, scenario, nbd_export)
    for ours, theirs, args in zip(r["stillpoint"][0], r["qemu-storage-daemon"][0], [None] + BITMAP_BACKUP_ERRORS):
        assert ours == theirs, f"{args}: stillpoint {ours} vs qemu-storage-daemon {theirs}"
    for ours, theirs in zip(r["stillpoint"][1], r["qemu-storage-daemon"][1]):
        assert ours == theirs


def test_incremental_chain_rebuilds_each_point_in_time(tmp_path):
    """iotest 124's simple chain: a full backup and a new bitmap in one transaction,
    writes, an incremental into a qcow2 backed by the full one, more writes (zeros over
    data included), a second incremental; each backup, read through its chain, equals
    the disk as it was when that backup started."""
    def extra(tmp):
        for name, backing in (("full", None), ("inc1", "full"), ("inc2", "inc1")):
            args = ["qemu-img", "create", "-q", "-f", "qcow2"]
            if backing:
                args += ["-b", f"{backing}.qcow2", "-F", "qcow2"]
            subprocess.run(args + [os.path.join(tmp, f"{name}.qcow2"), str(SIZE)], check=True)
        return nbd_export(tmp)

    async def scenario(d):
        results = []

        async def backup(name, run):
            path = os.path.join(d.tmp, f"{name}.qcow2")
            await d.run("blockdev-add", {"driver": "qcow2", "node-name": name,
                                         "file": {"driver": "file", "filename": path}})
            snapshot = os.path.join(d.tmp, f"{name}.snap")
            subprocess.run(["cp", d.src, snapshot], check=True)
            reply = await run(name)
            events = normalize(await d.until("JOB_STATUS_CHANGE", "null"))
            for _ in range(200):
                deleted = await d.run("blockdev-del", {"node-name": name})
                if "busy" not in str(deleted):
                    break
                await asyncio.sleep(0.01)
            check = subprocess.run(["qemu-img", "check", path], capture_output=True).returncode
            same = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2",
                                   snapshot, path]).returncode
            results.append((name, reply, events[-3:], deleted, check, same))

        async def full(name):
            return await d.run("transaction", {"actions": [
                {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "bm0", "granularity": 65536}},
                {"type": "blockdev-backup", "data": {"job-id": "j", "device": "src", "target": name,
                                                     "sync": "full"}}]})

        async def incremental(name):
            return await d.run("blockdev-backup", {"job-id": "j", "device": "src", "target": name,
                                                   "sync": "incremental", "bitmap": "bm0"})

        await backup("full", run=full)
        results.append(await bitmaps_of(d))
        await guest_writes(d, "write -P 0x11 0 64k", "write -P 0x12 1M 300k", "write -P 0x13 7M 4k")
        results.append(await bitmaps_of(d))
        await backup("inc1", run=incremental)
        results.append(await bitmaps_of(d))
        await guest_writes(d, "write -z 0 128k", "write -P 0x14 2M 64k", "write -z 1M 100k")
        await backup("inc2", run=incremental)
        results.append(await bitmaps_of(d))
        return results

    r = run_both(tmp_path, scenario, extra)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    for item in r["stillpoint"]:
        if isinstance(item, tuple):
            assert item[4:] == (0, 0), item


def test_persistent_bitmaps_move_between_daemons_and_survive_restarts(tmp_path):
    """One qcow2 image, opened in turn by stillpoint and qemu-storage-daemon: a
    persistent bitmap made by either is loaded by the other with the same bits; a
    daemon killed while the image is open leaves the bitmap inconsistent, and an
    incremental backup from it is refused."""
    image = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "32768", image, "offline"], check=True)
    runs = iter(range(100))

    def start(kind):
        tmp = tmp_path / f"{kind}-{next(runs)}"
        tmp.mkdir()
        sock = os.path.join(str(tmp), "nbd.sock")
        return Daemon(kind, str(tmp), [
            "--blockdev", f"driver=qcow2,node-name=pq,file.driver=file,file.filename={image}",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=exp1,node-name=pq,name=disk,writable=on"])

    async def session(kind, *steps, kill=False):
        d = start(kind)
        await d.start()
        out = []
        try:
            for step in steps:
                if isinstance(step, tuple):
                    out.append(await d.run(*step))
                else:
                    await guest_writes(d, step)
            out.append(await bitmaps_of(d, "pq"))
        finally:
            if kill:
                d.proc.kill()
                d.proc.wait()
                d.pump.cancel()
            else:
                await d.stop()
        return out

    async def go():
        views = []
        views.append(await session("stillpoint",
                                   ("block-dirty-bitmap-add", {"node": "pq", "name": "b1", "persistent": True}),
                                   "write -P 1 0 100k", "write -P 2 3M 64k"))
        views.append(await session("qemu-storage-daemon", "write -P 3 5M 8k"))
        views.append(await session("stillpoint",
                                   ("block-dirty-bitmap-add", {"node": "pq", "name": "b2", "persistent": True,
                                                               "granularity": 131072}),
                                   "write -P 4 6M 4k"))
        views.append(await session("qemu-storage-daemon"))
        crashed = {}
        for kind in ("stillpoint", "qemu-storage-daemon"):
            await session(kind, "write -P 5 7M 4k", kill=True)
            crashed[kind] = await session(kind, ("blockdev-backup", {
                "job-id": "j", "device": "pq", "target": "pq", "sync": "incremental", "bitmap": "b1"}))
            # Clean up for the next round: drop the inconsistent bitmaps, re-add.
            await session(kind, ("block-dirty-bitmap-remove", {"node": "pq", "name": "b1"}),
                          ("block-dirty-bitmap-remove", {"node": "pq", "name": "b2"}),
                          ("block-dirty-bitmap-remove", {"node": "pq", "name": "offline"}),
                          ("block-dirty-bitmap-add", {"node": "pq", "name": "b1", "persistent": True}),
                          ("block-dirty-bitmap-add", {"node": "pq", "name": "b2", "persistent": True,
                                                      "granularity": 131072}),
                          ("block-dirty-bitmap-add", {"node": "pq", "name": "offline", "persistent": True,
                                                      "granularity": 32768}))
        return views, crashed

    views, crashed = asyncio.run(go())
    # Each daemon sees what the previous one stored.
    for before, after in zip(views, views[1:]):
        names_before = {b["name"]: b for b in before[-1]}
        for b in after[-1]:
            if b["name"] in names_before and b["name"] != "b2":
                assert b["count"] >= names_before[b["name"]]["count"], (before, after)
    assert views[3][-1] == views[2][-1], f"qemu-storage-daemon loaded {views[3][-1]}, we stored {views[2][-1]}"
    assert crashed["stillpoint"] == crashed["qemu-storage-daemon"], crashed
    check = subprocess.run(["qemu-img", "check", image], capture_output=True, text=True)
    assert check.returncode in (0, 3), check.stdout


def test_fleecing_export_with_a_dirty_bitmap_while_writes_continue(tmp_path):
    """Pull-mode backup (iotests 222/image-fleecing, the temp-overlay form): a qcow2
    overlay backed by the live disk, a sync=none backup into it (copy-before-write),
    and an NBD export of the overlay offering the changed-block bitmap. While the guest
    keeps writing, `nbdinfo --map=qemu:dirty-bitmap:...` lists what changed and
    `nbdcopy` reads the disk exactly as it was when the fleecing started."""
    def extra(tmp):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(tmp, "fleece.qcow2"),
                        str(SIZE)], check=True)
        return nbd_export(tmp)

    async def scenario(d):
        sock = os.path.join(d.tmp, "nbd.sock")
        r = [await d.run("block-dirty-bitmap-add", {"node": "src", "name": "fl-bm"})]
        await guest_writes(d, "write -P 0x31 64k 64k", "write -P 0x32 2M 300k", "write -z 6M 64k")
        r.append(await d.run("blockdev-add", {"driver": "qcow2", "node-name": "tmp", "backing": "src",
                                              "file": {"driver": "file",
                                                       "filename": os.path.join(d.tmp, "fleece.qcow2")}}))
        r.append(await d.run("transaction", {"actions": [
            {"type": "block-dirty-bitmap-disable", "data": {"node": "src", "name": "fl-bm"}},
            {"type": "block-dirty-bitmap-add", "data": {"node": "src", "name": "next"}},
            {"type": "blockdev-backup", "data": {"job-id": "fl", "device": "src", "target": "tmp",
                                                 "sync": "none"}}]}))
        snapshot = os.path.join(d.tmp, "snapshot.raw")
        subprocess.run(["cp", d.src, snapshot], check=True)
        r.append(await d.run("block-export-add", {"type": "nbd", "id": "fl", "node-name": "tmp",
                                                  "name": "fleece", "bitmaps": ["fl-bm"]}))
        # Refused: an enabled bitmap on a read-only export.
        r.append(await d.run("block-export-add", {"type": "nbd", "id": "fl2", "node-name": "tmp",
                                                  "name": "fleece2", "bitmaps": ["next"]}))
        r.append(await d.run("block-dirty-bitmap-remove", {"node": "src", "name": "fl-bm"}))
        # The guest keeps writing, over changed and unchanged areas alike.
        await guest_writes(d, "write -P 0x41 0 1M", "write -P 0x42 2M 64k", "write -z 5M 2M")
        uri = f"nbd+unix:///fleece?socket={sock}"
        nbdmap = await asyncio.to_thread(subprocess.run, ["nbdinfo", "--map=qemu:dirty-bitmap:fl-bm", uri],
                                         capture_output=True, text=True)
        copy = os.path.join(d.tmp, "pulled.raw")
        pulled = await asyncio.to_thread(subprocess.run, ["nbdcopy", uri, copy], capture_output=True, text=True)
        same = images_identical(snapshot, copy)
        r.append(await d.run("block-export-del", {"id": "fl"}))
        await d.until("BLOCK_EXPORT_DELETED")
        r.append(await d.run("block-job-cancel", {"device": "fl"}))
        events = normalize(await d.until("JOB_STATUS_CHANGE", "null"))
        for _ in range(200):
            deleted = await d.run("blockdev-del", {"node-name": "tmp"})
            if "busy" not in str(deleted):
                break
            await asyncio.sleep(0.01)
        r.append(deleted)
        bitmaps = await bitmaps_of(d)
        return r, nbdmap.stdout, nbdmap.returncode, pulled.returncode, same, events[-3:], bitmaps

    r = run_both(tmp_path, scenario, extra)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][2:5] == (0, 0, True)
    assert "dirty" in r["stillpoint"][1], r["stillpoint"][1]


async def qemu_io_ro(d, export, *commands):
    """Read-only qemu-io on an export: (return code, the result lines without timings)."""
    uri = f"nbd+unix:///{export}?socket={os.path.join(d.tmp, 'nbd.sock')}"
    args = ["qemu-io", "-r", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    io = await asyncio.to_thread(subprocess.run, args + [uri], capture_output=True, text=True)
    lines = [line for line in io.stdout.splitlines() if line.startswith(("read ", "Pattern"))]
    return io.returncode, lines


def test_snapshot_access_fleecing_pull_push_and_teardown(tmp_path):
    """Modern pull-mode backup (iotest image-fleecing, snapshot-access variants): a
    copy-before-write node over the disk with a raw temp target, a snapshot-access node
    over it exported read-only with the changed-block bitmap, the guest writing through
    the filter. The snapshot keeps every original pattern while the guest overwrites
    them (whole, partly left, partly right, adjacent, zeroed), `nbdcopy` pulls the
    point-in-time image, a backup job pushes it from the snapshot node, a second
    filter protects only the bitmap's clusters and refuses reads elsewhere, and
    teardown leaves the new data on the disk."""
    def extra(tmp):
        for name in ("fleece.raw", "fleece2.raw"):
            with open(os.path.join(tmp, name), "wb") as f:
                f.truncate(SIZE)
        return nbd_export(tmp)

    async def scenario(d):
        r = []
        await guest_writes(d, "write -P 0x5d 0 64k", "write -P 0xd5 1M 64k", "write -P 0xdc 4M 64k",
                           "write -P 0xcd 8128k 64k")
        r.append(await d.run("block-dirty-bitmap-add", {"node": "src", "name": "fl-bm"}))
        await guest_writes(d, "write -P 0x11 2M 128k", "write -P 0x12 6M 4k")
        r.append(await d.run("block-dirty-bitmap-disable", {"node": "src", "name": "fl-bm"}))
        # The guest moves from the disk to the filter: its export goes, and comes back
        # on the filter once it is in place.
        r.append(await d.run("block-export-del", {"id": "exp0"}))
        await d.until("BLOCK_EXPORT_DELETED")
        r.append(await d.run("blockdev-add", {"driver": "file", "node-name": "fl-tmp",
                                              "filename": os.path.join(d.tmp, "fleece.raw")}))
        r.append(await d.run("blockdev-add", {"driver": "copy-before-write", "node-name": "fl-cbw",
                                              "file": "src", "target": "fl-tmp",
                                              "bitmap": {"node": "src", "name": "nope"}}))
        r.append(await d.run("blockdev-add", {"driver": "copy-before-write", "node-name": "fl-cbw",
                                              "file": "src", "target": "fl-tmp"}))
        r.append(await d.run("blockdev-add", {"driver": "snapshot-access", "node-name": "fl-access",
                                              "file": "fl-cbw", "discard": "unmap"}))
        snapshot = os.path.join(d.tmp, "snapshot.raw")
        subprocess.run(["cp", d.src, snapshot], check=True)
        r.append(await d.run("block-export-add", {"type": "nbd", "id": "guest", "node-name": "fl-cbw",
                                                  "name": "disk", "writable": True}))
        r.append(await d.run("block-export-add", {"type": "nbd", "id": "fleece", "node-name": "fl-access",
                                                  "name": "fleece",
                                                  "bitmaps": [{"node": "src", "name": "fl-bm"}]}))
        # Overwrites: whole, partly left, partly right, adjacent, zeroed.
        await guest_writes(d, "write -P 0xab 0 64k", "write -P 0xad 992k 64k", "write -P 0x1d 4128k 64k",
                           "write -P 0xea 8064k 64k", "write -z 2M 1M")
        reads = [await qemu_io_ro(d, "fleece", "read -P 0x5d 0 64k", "read -P 0xd5 1M 64k",
                                  "read -P 0xdc 4M 64k", "read -P 0xcd 8128k 64k", "read -P 0 4192k 32k", "read -P 0 8064k 64k", "read -P 0x11 2M 128k")]
        sock = os.path.join(d.tmp, "nbd.sock")
        uri = f"nbd+unix:///fleece?socket={sock}"
        nbdmap = await asyncio.to_thread(subprocess.run, ["nbdinfo", "--map=qemu:dirty-bitmap:fl-bm", uri],
                                         capture_output=True, text=True)
        # Pull the whole snapshot while the guest keeps writing all over the disk.
        pulled = os.path.join(d.tmp, "pulled.raw")
        # (64 KiB blocks, sparing the bytes checked at the end.)
        blocks = [b for b in range(1, 127) if b not in (16, 32, 33, 47, 80, 126)][::2]
        storm = [f"write -P {0x20 + i} {b * 64}k 64k" for i, b in enumerate(blocks)]
        copy, _ = await asyncio.gather(
            asyncio.to_thread(subprocess.run, ["nbdcopy", "--requests=4", "--request-size=65536", uri, pulled],
                              capture_output=True, text=True),
            guest_writes(d, *storm))
        pulled_same = images_identical(snapshot, pulled)
        # Push from the snapshot while the guest keeps writing.
        r.append(await d.run("blockdev-backup", {"job-id": "push", "device": "fl-access", "target": "tgt",
                                                 "sync": "full", "speed": 1 << 20}))
        await guest_writes(d, "write -P 0x77 0 1M", "write -P 0x78 5M 1M")
        r.append(await d.run("block-job-set-speed", {"device": "push", "speed": 0}))
        events = normalize(await d.until("JOB_STATUS_CHANGE", "null"))
        pushed_same = images_identical(snapshot, d.tgt)
        # The reader gives a range back: it is no longer readable.
        r.append(await d.run("block-export-add", {"type": "nbd", "id": "fleecew", "node-name": "fl-access",
                                                  "name": "fleecew", "writable": True}))
        uri_w = f"nbd+unix:///fleecew?socket={sock}"
        trim = await asyncio.to_thread(subprocess.run, ["qemu-io", "-f", "raw", "-c", "discard 4M 128k", uri_w],
                                       capture_output=True, text=True)
        after_trim = [(await qemu_io_ro(d, "fleece", "read 4M 64k"))[0],
                      (await qemu_io_ro(d, "fleece", "read -P 0x5d 0 64k"))[0]]
        # Teardown, in the order QEMU needs: readers, the snapshot node, the guest, the
        # filter, the temp image.
        r.append(await d.run("blockdev-del", {"node-name": "fl-access"}))
        for export in ("fleece", "fleecew"):
            r.append(await d.run("block-export-del", {"id": export}))
            await d.until("BLOCK_EXPORT_DELETED")
        r.append(await d.run("blockdev-del", {"node-name": "fl-access"}))
        r.append(await d.run("block-export-del", {"id": "guest"}))
        await d.until("BLOCK_EXPORT_DELETED")
        r.append(await d.run("blockdev-del", {"node-name": "fl-cbw"}))
        r.append(await d.run("blockdev-del", {"node-name": "fl-tmp"}))

        # A second filter protecting only the bitmap's clusters (image-fleecing's
        # bitmap variant): reads elsewhere are refused.
        r.append(await d.run("blockdev-add", {"driver": "file", "node-name": "fl-tmp2",
                                              "filename": os.path.join(d.tmp, "fleece2.raw")}))
        r.append(await d.run("blockdev-add", {"driver": "copy-before-write", "node-name": "fl-cbw2",
                                              "file": "src", "target": "fl-tmp2",
                                              "bitmap": {"node": "src", "name": "fl-bm"}}))
        r.append(await d.run("blockdev-add", {"driver": "snapshot-access", "node-name": "fl-access2",
                                              "file": "fl-cbw2"}))
        before = open(d.src, "rb").read()
        r.append(await d.run("block-export-add", {"type": "nbd", "id": "guest", "node-name": "fl-cbw2",
                                                  "name": "disk", "writable": True}))
        r.append(await d.run("block-export-add", {"type": "nbd", "id": "fleece2",
                                                  "node-name": "fl-access2", "name": "fleece2"}))
        await guest_writes(d, "write -P 0x99 2M 64k", "write -P 0x98 0 64k")
        in_bitmap = await qemu_io_ro(d, "fleece2", f"read -P 0x{before[2 << 20]:02x} 2M 64k",
                                     "read 2M 128k")
        outside = [(await qemu_io_ro(d, "fleece2", "read 0 64k"))[0],
                   (await qemu_io_ro(d, "fleece2", "read 2M 192k"))[0]]
        r.append(await d.run("block-export-del", {"id": "fleece2"}))
        await d.until("BLOCK_EXPORT_DELETED")
        r.append(await d.run("block-export-del", {"id": "guest"}))
        await d.until("BLOCK_EXPORT_DELETED")
        for node in ("fl-access2", "fl-cbw2", "fl-tmp2"):
            r.append(await d.run("blockdev-del", {"node-name": node}))
        with open(d.src, "rb") as f:
            disk = f.read()
        final = [disk[0:64 << 10] == b"\x98" * (64 << 10), disk[(1 << 20) + (32 << 10)] == 0xd5,
                 disk[(1 << 20) + (16 << 10)] == 0xad, disk[2 << 20] == 0x99, disk[(3 << 20) - 1] == 0,
                 disk[5 << 20] == 0x78, disk[8064 << 10] == 0xea, disk[(8 << 20) - 1] == 0xcd]
        return (r, reads, nbdmap.stdout, nbdmap.returncode, copy.returncode, pulled_same, events[-3:],
                pushed_same, trim.returncode, after_trim, in_bitmap, outside, final)

    r = run_both(tmp_path, scenario, extra)
    ours, theirs = r["stillpoint"], r["qemu-storage-daemon"]
    for i, (a, b) in enumerate(zip(ours[0], theirs[0])):
        assert a == b, f"reply {i}: {a} != {b}"
    assert ours[1:] == theirs[1:]
    reads, _, map_rc, copy_rc, pulled_same, _, pushed_same = ours[1:8]
    assert reads == [(0, reads[0][1])] and len(reads[0][1]) == 7, reads
    assert (map_rc, copy_rc, pulled_same, pushed_same) == (0, 0, True, True)
    assert "dirty" in ours[2]
    assert ours[9] == [1, 0], "a discarded range must be refused, the rest readable"
    assert ours[11] == [1, 1], "reads outside the bitmap must be refused"
    assert all(ours[12]), ours[12]


def test_copy_before_write_errors_and_timeouts(tmp_path):
    """iotest copy-before-write: a standalone filter whose target fails its first write,
    or is slower than `cbw-timeout`, with each `on-cbw-error`. qemu-storage-daemon
    injects with blkdebug and a throttle group, Stillpoint with its `fault` driver
    (failing, or delaying by 1.5 s); the outcomes must agree: whether the guest write
    fails, and whether the snapshot can still be read."""
    def faulty_target(d, timeout):
        tmp = os.path.join(d.tmp, "fleece.raw")
        if d.kind == "qemu-storage-daemon":
            if timeout:
                return [("object-add", {"qom-type": "throttle-group", "id": "tg",
                                        "limits": {"bps-write": 300 << 10}}),
                        ("blockdev-add", {"driver": "throttle", "node-name": "fl-tmp", "throttle-group": "tg",
                                          "file": {"driver": "file", "filename": tmp}})]
            # As in the iotest: blkdebug's write_aio event comes from a format driver
            # above it, so the temp image is a qcow2 over blkdebug.
            return [("blockdev-add", {"driver": "qcow2", "node-name": "fl-tmp", "file": {
                "driver": "blkdebug", "inject-error": [{"event": "write_aio", "errno": 5, "once": True}],
                "image": {"driver": "file", "filename": os.path.join(d.tmp, "fleece.qcow2")}}})]
        rule = {"op": "write", "delay-ms": 1500, "after": 1} if timeout else {"op": "write", "once": True}
        return [("blockdev-add", {"driver": "fault", "node-name": "fl-tmp", "rules": [rule],
                                  "image": {"driver": "file", "filename": tmp}})]

    def extra(tmp):
        with open(os.path.join(tmp, "fleece.raw"), "wb") as f:
            f.truncate(SIZE)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(tmp, "fleece.qcow2"), str(SIZE)],
                       check=True)
        sock = os.path.join(tmp, "nbd.sock")
        return ["--nbd-server", f"addr.type=unix,addr.path={sock}"]

    async def scenario(d):
        outcomes = []
        for timeout in (False, True):
            for mode in ("break-guest-write", "break-snapshot"):
                r = []
                for command, args in faulty_target(d, timeout):
                    r.append(await d.run(command, args))
                cbw = {"driver": "copy-before-write", "node-name": "fl-cbw", "file": "src", "target": "fl-tmp",
                       "on-cbw-error": mode}
                if timeout:
                    cbw["cbw-timeout"] = 1
                r.append(await d.run("blockdev-add", cbw))
                r.append(await d.run("blockdev-add", {"driver": "snapshot-access", "node-name": "fl-access",
                                                      "file": "fl-cbw"}))
                r.append(await d.run("block-export-add", {"type": "nbd", "id": "guest", "node-name": "fl-cbw",
                                                          "name": "disk", "writable": True}))
                r.append(await d.run("block-export-add", {"type": "nbd", "id": "fleece",
                                                          "node-name": "fl-access", "name": "fleece"}))
                uri = f"nbd+unix:///disk?socket={os.path.join(d.tmp, 'nbd.sock')}"
                # The timeout case: the first 512 KiB pass, the second one is slowed down.
                writes = ["write 0 512k", "write 512k 512k"] if timeout else ["write 0 1M"]
                write_rcs = []
                for w in writes:
                    io = await asyncio.to_thread(subprocess.run, ["qemu-io", "-f", "raw", "-c", w, uri],
                                                 capture_output=True, text=True)
                    write_rcs.append(io.returncode)
                read_rc = (await qemu_io_ro(d, "fleece", "read 0 1M"))[0]
                for export in ("fleece", "guest"):
                    r.append(await d.run("block-export-del", {"id": export}))
                    await d.until("BLOCK_EXPORT_DELETED")
                for node in ("fl-access", "fl-cbw", "fl-tmp"):
                    for _ in range(300):  # a timed-out copy may still hold the target
                        deleted = await d.run("blockdev-del", {"node-name": node})
                        if "in use" not in str(deleted):
                            break
                        await asyncio.sleep(0.01)
                    r.append(deleted)
                if timeout and d.kind == "qemu-storage-daemon":
                    r.append(await d.run("object-del", {"id": "tg"}))
                outcomes.append((timeout, mode, write_rcs, read_rc, [x[0] for x in r]))
        return outcomes

    r = run_both(tmp_path, scenario, extra)
    ours, theirs = r["stillpoint"], r["qemu-storage-daemon"]
    for a, b in zip(ours, theirs):
        assert a[:4] == b[:4], f"stillpoint {a} vs qemu-storage-daemon {b}"
        assert set(a[4]) == {"ok"} and set(b[4]) == {"ok"}, (a, b)
    assert [o[2:4] for o in ours] == [([1], 0), ([0], 1), ([0, 1], 0), ([0, 0], 1)]


FLEECING_NODE_ERRORS = [
    {"bitmap": "x"}, {"bitmap": {"node": "src"}}, {"bitmap": {"node": "nope", "name": "b"}},
    {"bitmap": {"node": "src", "name": "nope"}}, {"on-cbw-error": "bogus"}, {"cbw-timeout": "x"},
    {"cbw-timeout": 1.5}, {"cbw-timeout": -1}, {"cbw-timeout": 1 << 33}, {"bogus": 1},
    {"min-cluster-size": "64k"}, {"min-cluster-size": "65536"}, {"cbw-timeout": "30"}, {"min-cluster-size": 3000},
    {"file": 5}, {"file": "nope"},
]


def test_fleecing_node_option_errors(tmp_path):
    """Bad copy-before-write and snapshot-access options get QEMU's replies; valid ones
    are accepted alike."""
    def extra(tmp):
        with open(os.path.join(tmp, "fleece.raw"), "wb") as f:
            f.truncate(SIZE)
        return []

    async def scenario(d):
        r = [await d.run("blockdev-add", {"driver": "file", "node-name": "fl-tmp",
                                          "filename": os.path.join(d.tmp, "fleece.raw")})]
        for extra_args in FLEECING_NODE_ERRORS:
            r.append(await d.run("blockdev-add", {"driver": "copy-before-write", "node-name": "c", "file": "src",
                                                  "target": "fl-tmp", **extra_args}))
        for ok in ({"cbw-timeout": 30, "min-cluster-size": 131072}, {"on-cbw-error": "break-snapshot"}):
            r.append(await d.run("blockdev-add", {"driver": "copy-before-write", "node-name": "c", "file": "src",
                                                  "target": "fl-tmp", **ok}))
            r.append(await d.run("blockdev-del", {"node-name": "c"}))
        r.append(await d.run("blockdev-add", {"driver": "snapshot-access", "node-name": "a"}))
        r.append(await d.run("blockdev-add", {"driver": "snapshot-access", "node-name": "a", "file": "nope"}))
        r.append(await d.run("blockdev-add", {"driver": "snapshot-access", "node-name": "a", "file": "src",
                                              "bogus": 1}))
        return r

    r = run_both(tmp_path, scenario, extra)
    for i, (ours, theirs) in enumerate(zip(r["stillpoint"], r["qemu-storage-daemon"])):
        assert ours == theirs, f"case {i}: stillpoint {ours} vs qemu-storage-daemon {theirs}"
