"""How big a dirty bitmap may be: QEMU's limit for persistent bitmaps (512 MiB of bits,
in whole clusters), compared with qemu-storage-daemon, and an in-memory bitmap too big
to allocate, which qemu-storage-daemon 10.0.2 answers by aborting ("GLib: failed to
allocate 137438953472 bytes") and stillpoint refuses while it stays up.
"""

import subprocess

from harness import run_both


def big_image(tmp):
    path = f"{tmp}/big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, "512T"], check=True)
    return ["--blockdev", f"driver=qcow2,node-name=big,file.driver=file,file.filename={path}"]


def test_persistent_bitmaps_over_the_limit_are_refused_like_qemu(tmp_path):
    async def scenario(d):
        out = []
        for name, granularity in (("g512", 512), ("g64k", 65536), ("g128k", 131072)):
            out.append(await d.run("block-dirty-bitmap-add", {
                "node": "big", "name": name, "granularity": granularity, "persistent": True}))
        return out

    r = run_both(tmp_path, scenario, big_image)
    assert r["stillpoint"] == r["qemu-storage-daemon"]
    assert r["stillpoint"][0][2].endswith("Too much space will be occupied by the bitmap. "
                                          "Use larger granularity")
    assert r["stillpoint"][2] == ("ok", {})


def test_an_in_memory_bitmap_too_big_to_allocate_is_refused_and_the_daemon_stays_up(tmp_path):
    async def scenario(d):
        refused = await d.run("block-dirty-bitmap-add", {"node": "big", "name": "t", "granularity": 512})
        alive = await d.run("query-version")
        return refused, alive[0]

    refused, alive = run_both(tmp_path, scenario, big_image, servers=["stillpoint"])["stillpoint"]
    assert refused == ("error", "GenericError",
                       "Bitmap 't' would take 128 GiB of memory, more than the 512 MiB a dirty "
                       "bitmap may take: use a larger granularity")
    assert alive == "ok"
