"""`block-stream`'s copy-on-read filter (`filter-node-name`, qapi/block-core.json) side
by side against qemu-storage-daemon and stillpoint.

While a stream runs, a copy-on-read node sits above the image: a guest read through
NBD copies what it covers from the backing chain into the image (so the stream's
pass, and the guest's next read, find it there). Compared: the refusals of bad filter
names, the filter node (its name, driver, depth, read-only flag) while the job runs,
what `blockdev-del` and a second `block-stream` on it say, which clusters the image
holds itself after guest reads (`qemu-img map`), that the filter goes with a
cancelled job and with a completed one, and a generated (unnamed) filter.
"""

import asyncio
import json
import subprocess

from harness import run_both
from test_block_stream_compat import digest, make_chain, nbd_io, open_and_export_top, until_gone


def named(reply):
    return sorted((n["node-name"], n["drv"], n["backing_file_depth"], n["ro"]) for n in reply[1]
                  if not n["node-name"].startswith("#"))


def unnamed(reply):
    return sorted(n["drv"] for n in reply[1] if n["node-name"].startswith("#"))


async def own_clusters(d, *ranges):
    """Which of `ranges` (offset, length) the image holds itself (depth 0), after the
    guest's flush made its metadata reach the file."""
    await nbd_io(d, "flush")
    out = await asyncio.to_thread(subprocess.run, ["qemu-img", "map", "-U", "--output=json",
                                                   f"{d.tmp}/top.qcow2"],
                                  capture_output=True, text=True, check=True)
    extents = json.loads(out.stdout)

    def own(offset, length):
        return all(e["depth"] == 0 and e["data"] for e in extents
                   if e["start"] < offset + length and offset < e["start"] + e["length"])

    return [own(o, n) for o, n in ranges]


def test_block_stream_copy_on_read_filter_matches_qemu(tmp_path):
    async def scenario(d):
        t = d.tmp
        make_chain(t)
        r = await open_and_export_top(d) + [
             # Bad filter names, in QEMU's words.
             await d.run("block-stream", {"job-id": "x", "device": "top", "filter-node-name": "top"}),
             await d.run("block-stream", {"job-id": "x", "device": "top", "filter-node-name": "1bad"}),
             await d.run("block-stream", {"job-id": "x", "device": "top", "filter-node-name": ""})]
        unnamed_before = unnamed(await d.run("query-named-block-nodes"))
        # So slow that the stream's own pass stays in the first clusters meanwhile.
        r.append(await d.run("block-stream", {"job-id": "s0", "device": "top", "speed": 1 << 16,
                                              "filter-node-name": "cor0"}))
        r.append(named(await d.run("query-named-block-nodes")))
        r.append(await d.run("blockdev-del", {"node-name": "cor0"}))
        r.append(await d.run("block-stream", {"job-id": "s1", "device": "cor0"}))
        r.append(await d.run("block-stream", {"job-id": "s1", "device": "top"}))
        # Clusters far from the stream's pass: mid's data at 6M, base's at 5M. Read
        # through the filter, they are copied into the image; 4M (never read) is not.
        far = [(6 << 20, 64 << 10), (5 << 20, 64 << 10), (4 << 20, 64 << 10)]
        r.append(await own_clusters(d, *far))
        r.append(await nbd_io(d, "read -P 4 6M 64k", "read -P 2 5M 64k"))
        r.append(await own_clusters(d, *far))
        # A cancelled stream takes its filter with it and keeps the link.
        r.append(await d.run("block-job-cancel", {"device": "s0"}))
        seen = await until_gone(d, "s0", timeout=60)
        r.append([e["event"] for e in seen if e["event"] != "JOB_STATUS_CHANGE"])
        after = await d.run("query-named-block-nodes")
        r.append((named(after), unnamed(after) == unnamed_before))
        # Without a name the filter is generated, and goes with the completed job.
        r.append(await d.run("block-stream", {"job-id": "s2", "device": "top", "speed": 1 << 16}))
        during = unnamed(await d.run("query-named-block-nodes"))
        r.append(sorted(set(during) - set(unnamed_before)) if len(during) > len(unnamed_before) else during)
        r.append(await nbd_io(d, "write -P 9 3M 64k", "read -P 3 1088k 64k"))
        r.append(await d.run("block-job-set-speed", {"device": "s2", "speed": 0}))
        seen = await until_gone(d, "s2", timeout=120)
        r.append([e["data"] for e in seen if e["event"] == "BLOCK_JOB_COMPLETED"])
        after = await d.run("query-named-block-nodes")
        r.append(named(after))
        r.append(await nbd_io(d, "read -P 9 3M 64k", "read -P 4 6M 64k", "read -P 2 5M 64k",
                              "read -P 1 0 64k"))
        r.append(await d.run("block-export-del", {"id": "e"}))
        await asyncio.sleep(0.2)
        r.append(await d.run("blockdev-del", {"node-name": "top"}))
        check = subprocess.run(["qemu-img", "check", f"{t}/top.qcow2"], capture_output=True, text=True)
        r.append((check.returncode, "No errors were found" in check.stdout))
        r.append(digest(f"{t}/top.qcow2"))
        return r

    r = run_both(tmp_path, scenario)
    ours, theirs = r["stillpoint"], r["qemu-storage-daemon"]
    assert ours == theirs
    # What the comparison rests on, spelled out for the reader of a failure.
    assert ("cor0", "copy-on-read", 3, False) in ours[7], ours[7]
    assert ours[11] == [False, False, False], "nothing copied before the reads"
    assert ours[13] == [True, True, False], "the guest's reads were copied in, nothing else"
    assert "cor0" not in [n[0] for n in ours[16][0]] and ours[16][1], "the filter went with the job"
    assert ours[18] == ["copy-on-read"], "a generated filter while the job runs"
    assert ours[21][0]["len"] == 8 << 20, ours[21]
    assert ours[12] == (0, False) and ours[23] == (0, False), "the reads verify"
    assert ours[-2] == (0, True), "qemu-img check finds no errors"
