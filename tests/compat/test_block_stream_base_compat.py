"""`block-stream` that keeps a base (live-block-operations.rst, "block-stream": stream
[C] into [D] and leave [B] as its backing file), side by side against
qemu-storage-daemon and stillpoint, while a guest writes to the image through NBD.

Two shapes: a chain the monitor added node by node, streamed with `base-node` (the
document's example), and a chain the image's header opened, streamed with `base` (a
file name) and a `backing-file` for the header. Compared: the refusals, the job's
events, the nodes left, the image's header after (its backing file and format), its
content, what it reads once the layers between are gone, and `qemu-img check`.
"""

import json
import subprocess

import pytest

from harness import run_both
from test_block_stream_compat import digest, nbd_io, open_and_export_top, qemu_io_file, until_gone


def make_chain(t):
    """base <- mid <- top. mid overwrites part of base with data and part with zeros
    (which must hide base's data after the stream), top has data of its own."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", f"{t}/base.qcow2", "8M"], check=True)
    qemu_io_file(f"{t}/base.qcow2", "write -P 1 0 4M", "write -P 2 5M 1M")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{t}/base.qcow2", "-F", "qcow2",
                    f"{t}/mid.qcow2"], check=True)
    qemu_io_file(f"{t}/mid.qcow2", "write -P 3 1M 1M", "write -z 3M 512k", "write -P 4 6M 192k")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", f"{t}/mid.qcow2", "-F", "qcow2",
                    f"{t}/top.qcow2"], check=True)
    qemu_io_file(f"{t}/top.qcow2", "write -P 5 1536k 64k", "write -P 6 100k 8k")


def header(t, path):
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", path],
                                     capture_output=True, text=True, check=True).stdout)
    name = info.get("backing-filename")
    return (name and name.replace(t, "T"), info.get("backing-filename-format"))


def nodes(t, reply):
    return sorted((n["node-name"], n["backing_file_depth"], (n.get("backing_file") or "").replace(t, "T"))
                  for n in reply[1] if not n["node-name"].startswith("#"))


async def stream_and_check(d, t, args, expected_len):
    """The stream (slowed, so guest writes land while it runs), then what it left."""
    r = [await d.run("block-stream", {"job-id": "s0", "device": "top", "speed": 1 << 20, **args}),
         await nbd_io(d, "write -P 9 1M 64k", "write -P 10 7M 4k", "read -P 5 1536k 64k")]
    r.append(await d.run("block-job-set-speed", {"device": "s0", "speed": 0}))
    seen = await until_gone(d, "s0", timeout=120)
    done = [e["data"] for e in seen if e["event"] == "BLOCK_JOB_COMPLETED"]
    assert done and done[0]["len"] == expected_len, done
    r.append(done)
    r.append([e["data"]["status"] for e in seen if e["event"] == "JOB_STATUS_CHANGE"])
    # The guest's writes, mid's data and zeros, base's data where mid left it.
    r.append(await nbd_io(d, "read -P 9 1M 64k", "read -P 3 1088k 64k", "read -P 0 3M 512k",
                          "read -P 1 0 64k", "read -P 2 5M 64k", "read -P 4 6M 64k"))
    assert r[1] == (0, False) and r[-1] == (0, False), f"{d.kind}: the reads verify: {r}"
    return r


@pytest.mark.parametrize("keep", [{"base-node": "base"}, {"bottom": "mid"}], ids=["base-node", "bottom"])
def test_block_stream_with_base_node_keeps_the_base_as_qemu_does(tmp_path, keep):
    async def scenario(d):
        t = d.tmp
        make_chain(t)
        before = digest(f"{t}/top.qcow2")
        file = lambda name: {"driver": "file", "filename": f"{t}/{name}.qcow2"}
        r = [await d.run("blockdev-add", {"driver": "qcow2", "node-name": "base", "file": file("base")}),
             await d.run("blockdev-add", {"driver": "qcow2", "node-name": "mid", "file": file("mid"),
                                          "backing": "base"}),
             await d.run("blockdev-add", {"driver": "qcow2", "node-name": "top", "file": file("top"),
                                          "backing": "mid"}),
             await d.run("nbd-server-start", {"addr": {"type": "unix", "data": {"path": f"{t}/nbd.sock"}}}),
             await d.run("block-export-add", {"type": "nbd", "id": "e", "node-name": "top",
                                              "writable": True}),
             # Refusals, each in QEMU's words.
             await d.run("block-stream", {"job-id": "x", "device": "top", "base-node": "top"}),
             await d.run("block-stream", {"job-id": "x", "device": "top", "base-node": "base",
                                          "bottom": "mid"}),
             await d.run("block-stream", {"job-id": "x", "device": "top", "base": f"{t}/base.qcow2",
                                          "bottom": "mid"}),
             await d.run("block-stream", {"job-id": "x", "device": "mid", "base-node": "top"})]
        r += await stream_and_check(d, t, keep, 8 << 20)
        r.append(nodes(t, await d.run("query-named-block-nodes")))
        r.append(await d.run("blockdev-del", {"node-name": "base"}))
        r.append(await d.run("block-export-del", {"id": "e"}))
        r.append(await d.run("blockdev-del", {"node-name": "top"}))
        r.append(await d.run("blockdev-del", {"node-name": "mid"}))
        r.append(await d.run("blockdev-del", {"node-name": "base"}))
        r.append(header(t, f"{t}/top.qcow2"))
        check = subprocess.run(["qemu-img", "check", f"{t}/top.qcow2"], capture_output=True, text=True)
        r.append((check.returncode, "No errors were found" in check.stdout))
        after = digest(f"{t}/top.qcow2")
        # The image over base alone reads what it read over the whole chain, writes
        # included: the same on both daemons, and not what it read before the writes.
        r.append(after)
        r.append(after != before)
        return r

    r = run_both(tmp_path, scenario)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    ours = r["stillpoint"]
    assert ours[-4] == ("T/base.qcow2", "qcow2"), ours[-4]
    assert ours[-3] == (0, True), "qemu-img check finds no errors"
    assert ours[-1], "the guest's writes changed the image"


def test_block_stream_with_base_by_file_name_closes_the_layers_between(tmp_path):
    async def scenario(d):
        t = d.tmp
        make_chain(t)
        r = await open_and_export_top(d) + [
             await d.run("block-stream", {"job-id": "x", "device": "top", "base": "nosuch.qcow2"})]
        anonymous = lambda reply: sum(1 for n in reply[1] if n["node-name"].startswith("#"))
        r.append(anonymous(await d.run("query-named-block-nodes")))
        r += await stream_and_check(d, t, {"base": f"{t}/base.qcow2", "backing-file": "base.qcow2"}, 8 << 20)
        # mid and its file are closed; base and its file stay, now top's.
        reply = await d.run("query-named-block-nodes")
        r.append(anonymous(reply))
        r.append(nodes(t, reply))
        r.append(await d.run("block-export-del", {"id": "e"}))
        r.append(await d.run("blockdev-del", {"node-name": "top"}))
        # Deleting the image closes the base its header opened, as in QEMU.
        r.append(anonymous(await d.run("query-named-block-nodes")))
        r.append(header(t, f"{t}/top.qcow2"))
        check = subprocess.run(["qemu-img", "check", f"{t}/top.qcow2"], capture_output=True, text=True)
        r.append((check.returncode, "No errors were found" in check.stdout))
        r.append(digest(f"{t}/top.qcow2"))
        return r

    r = run_both(tmp_path, scenario)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    ours = r["stillpoint"]
    assert ours[-3] == ("base.qcow2", "qcow2"), ours[-3]
    assert ours[-2] == (0, True), "qemu-img check finds no errors"
