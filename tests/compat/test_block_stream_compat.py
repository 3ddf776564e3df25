"""`block-stream` (QEMU's image streaming, live-block-operations.rst) side by side
against qemu-storage-daemon and stillpoint: a qcow2 image over a two-deep qcow2 backing
chain, streamed while a guest writes to it through NBD. Compared: the refusals, the
job's events, the nodes left, the image's header after (no backing file), its content
(the chain's data under the guest's writes) and `qemu-img check`.
"""

import asyncio
import hashlib
import json
import os
import subprocess

from harness import run_both


def qemu_io_file(path, *commands):
    args = ["qemu-io"]
    for c in commands:
        args += ["-c", c]
    subprocess.run(args + [path], check=True, capture_output=True)


def make_chain(t):
    """base <- mid <- top, each layer with data of its own, some of it overlapping."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{t}/base.qcow2", "8M"], check=True)
    qemu_io_file(f"{t}/base.qcow2", "write -P 1 0 2M", "write -P 2 5M 1M", "write -z 7M 64k")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{t}/base.qcow2", "-F", "qcow2",
                    f"{t}/mid.qcow2"], check=True)
    qemu_io_file(f"{t}/mid.qcow2", "write -P 3 1M 1M", "write -P 4 6M 192k")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{t}/mid.qcow2", "-F", "qcow2",
                    f"{t}/top.qcow2"], check=True)
    qemu_io_file(f"{t}/top.qcow2", "write -P 5 1536k 64k", "write -P 6 100k 8k")
    solo = f"{t}/solo.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", solo, "1M"], check=True)


def digest(path):
    raw = path + ".raw"
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", path, raw], check=True)
    with open(raw, "rb") as f:
        value = hashlib.sha256(f.read()).hexdigest()
    os.unlink(raw)
    return value


async def nbd_io(d, *commands):
    uri = f"nbd+unix:///top?socket={d.tmp}/nbd.sock"
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    io = await asyncio.to_thread(subprocess.run, args + [uri], capture_output=True, text=True)
    return io.returncode, "verification failed" in io.stdout or "Pattern verification" in io.stdout


async def open_and_export_top(d):
    """top.qcow2 with the chain its header names, exported writable over NBD as "top"."""
    t = d.tmp
    return [await d.run("blockdev-add", {"driver": "qcow2", "node-name": "top",
                                         "file": {"driver": "file", "filename": f"{t}/top.qcow2"}}),
            await d.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{t}/nbd.sock"}}}),
            await d.run("block-export-add", {"type": "nbd", "id": "e", "node-name": "top",
                                             "writable": True})]


async def until_gone(d, job, timeout=30):
    """Events up to job's JOB_STATUS_CHANGE to null (qemu-storage-daemon's refused
    jobs leave created/null pairs of their own before it)."""
    seen = []
    while True:
        event = await d.next_event(timeout)
        seen.append(event)
        data = event["data"]
        if event["event"] == "JOB_STATUS_CHANGE" and data["id"] == job and data["status"] == "null":
            return [e for e in seen if e["data"].get("id", e["data"].get("device")) == job]


def test_block_stream_of_a_live_qcow2_chain_matches_qemu(tmp_path):
    async def scenario(d):
        t = d.tmp
        make_chain(t)
        expected_before = digest(f"{t}/top.qcow2")
        r = await open_and_export_top(d) + [
             await d.run("blockdev-add", {"driver": "qcow2", "node-name": "solo",
                                          "file": {"driver": "file", "filename": f"{t}/solo.qcow2"}}),
             # Refusals, each in QEMU's words.
             await d.run("block-stream", {"job-id": "x", "device": "nosuch"}),
             await d.run("block-stream", {"device": "top"}),
             await d.run("block-stream", {"job-id": "x", "device": "top", "base-node": "solo"}),
             await d.run("block-stream", {"job-id": "x", "device": "top", "base": "a", "base-node": "b"}),
             await d.run("block-stream", {"job-id": "x", "device": "top", "backing-file": "f"}),
             await d.run("block-stream", {"job-id": "x", "device": "top", "speed": -1})]
        # A chain-less image streams nothing: a job of length 0.
        r.append(await d.run("block-stream", {"job-id": "s-solo", "device": "solo"}))
        seen = await until_gone(d, "s-solo")
        r.append([e["data"] for e in seen if e["event"] == "BLOCK_JOB_COMPLETED"])
        # The real one, slowed so the guest's writes land while it runs.
        r.append(await d.run("block-stream", {"job-id": "s0", "device": "top", "speed": 1 << 20}))
        r.append(await d.run("block-stream", {"job-id": "s1", "device": "top"}))
        r.append(await nbd_io(d, "write -P 9 1M 64k", "write -P 10 7M 4k", "read -P 5 1536k 64k",
                              "read -P 2 5M 64k"))
        r.append(await d.run("block-job-set-speed", {"device": "s0", "speed": 0}))
        seen = await until_gone(d, "s0", timeout=120)
        r.append([e["data"] for e in seen if e["event"] == "BLOCK_JOB_COMPLETED"])
        r.append([e["data"]["status"] for e in seen if e["event"] == "JOB_STATUS_CHANGE"])
        r.append(await nbd_io(d, "read -P 9 1M 64k", "read -P 3 1088k 64k", "read -P 1 0 64k",
                              "read -P 4 6M 64k"))
        nodes = (await d.run("query-named-block-nodes"))[1]
        r.append(sorted((n["node-name"], n["backing_file_depth"], n.get("backing_file")) for n in nodes
                        if not n["node-name"].startswith("#")))
        # The chain the header opened is closed with the link: only the named nodes'
        # own file nodes are left unnamed.
        r.append(sum(1 for n in nodes if n["node-name"].startswith("#")))
        r.append(await d.run("block-export-del", {"id": "e"}))
        await asyncio.sleep(0.2)
        r.append(await d.run("blockdev-del", {"node-name": "top"}))
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", f"{t}/top.qcow2"],
                                         capture_output=True, text=True, check=True).stdout)
        r.append((info.get("backing-filename"), info.get("full-backing-filename")))
        check = subprocess.run(["qemu-img", "check", f"{t}/top.qcow2"], capture_output=True, text=True)
        r.append((check.returncode, "No errors were found" in check.stdout))
        r.append(digest(f"{t}/top.qcow2"))
        # The chain's content before, and that the writes changed it.
        r.append(expected_before != r[-1])
        return r

    r = run_both(tmp_path, scenario)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    ours = r["stillpoint"]
    assert ours[11][0]["len"] == 0, ours[11]
    assert ours[16][0]["len"] == 8 << 20, ours[16]
    assert ours[14] == (0, False) and ours[18] == (0, False), "the guest's writes and the chain's data read back"
    assert ours[-4] == (None, None), "no backing file in the header"
    assert ours[-3] == (0, True), "qemu-img check finds no errors"
    assert ours[-1], "the guest's writes changed the image"
