"""The compat suite's harness: a daemon (qemu-storage-daemon or `stillpoint daemon`)
started with the same command line and driven with QEMU's own client library
(qemu.qmp), and `run_both`, which runs one scenario against each so a test can compare
what they answered.

qemu-storage-daemon inserts extra paused/running pairs around drained sections;
clients must tolerate them, so `normalize` drops them before sequences are compared.

Two knobs rerun the whole suite in another shape (scripts/test.sh runs it once more
with both): STILLPOINT_COMPAT_SIZE sets the size of the scenarios' disks (for example
8392705, 4097 bytes past 8 MiB, or 8421376, not a multiple of the 64 KiB cluster), and
STILLPOINT_COMPAT_SPEED gives every backup started without a `speed` that speed
(bytes per second), so each scenario also runs throttled.
"""

import asyncio
import os
import random
import subprocess

import pytest
from qemu.qmp import ConnectError
from qemu.qmp import ExecuteError
from qemu.qmp import QMPClient

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STILLPOINT = os.path.join(ROOT, "target", "debug", "stillpoint")
SIZE = int(os.environ.get("STILLPOINT_COMPAT_SIZE", 8 << 20))
SPEED = int(os.environ.get("STILLPOINT_COMPAT_SPEED", 0))
SERVERS = ["qemu-storage-daemon", "stillpoint"]


def make_images(tmp, seed=1):
    rng = random.Random(seed)
    src, tgt, small = (os.path.join(tmp, n) for n in ("src.img", "tgt.img", "small.img"))
    src2, tgt2 = os.path.join(tmp, "src2.img"), os.path.join(tmp, "tgt2.img")
    for path in (src, src2):
        with open(path, "wb") as f:
            f.write(rng.randbytes(SIZE // 2))
            f.write(bytes(SIZE // 4))
            f.truncate(SIZE)
    for path, size in ((tgt, SIZE), (tgt2, SIZE), (small, 1 << 20)):
        with open(path, "wb") as f:
            f.truncate(size)
    return src, tgt, small


class Daemon:
    """One daemon process, QSD or stillpoint, with a QMP client connected."""

    def __init__(self, kind, tmp, extra=()):
        self.kind = kind
        self.tmp = tmp
        self.src, self.tgt, self.small = make_images(tmp)
        self.qmp_path = os.path.join(tmp, "qmp.sock")
        program = ["qemu-storage-daemon"] if kind == "qemu-storage-daemon" else [STILLPOINT, "daemon"]
        args = [
            "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
            "--monitor", "chardev=m",
            "--blockdev", f"driver=raw,node-name=src,file.driver=file,file.filename={self.src}",
            "--blockdev", f"driver=raw,node-name=tgt,file.driver=file,file.filename={self.tgt}",
            "--blockdev", f"driver=raw,node-name=small,file.driver=file,file.filename={self.small}",
            "--blockdev", f"driver=raw,node-name=src2,file.driver=file,file.filename={tmp}/src2.img",
            "--blockdev", f"driver=raw,node-name=tgt2,file.driver=file,file.filename={tmp}/tgt2.img",
            *extra,
        ]
        self.proc = subprocess.Popen(program + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.client = QMPClient(kind)
        self.events = []

    async def start(self):
        # Until the daemon listens, a connect fails: the socket file is missing, or (QEMU's
        # chardev binds and listens apart) it exists and the connect is refused. Try again
        # for up to 5 s; a failed connect leaves the client idle, so it can be retried.
        for attempt in range(500):
            try:
                await self.client.connect(self.qmp_path)
                break
            except ConnectError:
                if attempt == 499 or self.proc.poll() is not None:
                    raise
                await asyncio.sleep(0.01)
        self.listener = self.client.listen
        self.queue = asyncio.Queue()

        async def pump():
            async for event in self.client.events:
                await self.queue.put(event)

        self.pump = asyncio.create_task(pump())

    async def run(self, name, args=None):
        """("ok", value) or ("error", class, desc)."""
        if SPEED:
            args = with_speed(name, args)
        try:
            return ("ok", await self.client.execute(name, args or {}))
        except ExecuteError as e:
            return ("error", e.error_class, e.error.error.desc)

    async def next_event(self, timeout=30):
        event = await asyncio.wait_for(self.queue.get(), timeout)
        self.events.append(event)
        return event

    async def until(self, name, status=None, timeout=30):
        """Events up to and including `name` (with `status` for status changes)."""
        seen = []
        while True:
            event = await self.next_event(timeout)
            seen.append(event)
            if event["event"] == name and (status is None or event["data"].get("status") == status):
                return seen

    async def stop(self):
        try:
            await self.client.execute("quit")
        except Exception:
            pass
        self.pump.cancel()
        try:
            await self.client.disconnect()
        except Exception:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def with_speed(name, args):
    """`args` of a backup (or a transaction's backups) with SPEED where none is given."""
    if name in ("blockdev-backup", "drive-backup") and "speed" not in (args or {}):
        return {**args, "speed": SPEED}
    if name == "transaction":
        actions = [{**a, "data": with_speed(a["type"], a.get("data"))} for a in args["actions"]]
        return {**args, "actions": actions}
    return args


def normalize(events):
    """Status changes and block-job events in order, spurious paused/running pairs dropped."""
    out = []
    for e in events:
        name = e["event"]
        item = e["data"]["status"] if name == "JOB_STATUS_CHANGE" else name
        out.append(item)
    cleaned = []
    for item in out:
        if item == "running" and cleaned and cleaned[-1] == "paused":
            cleaned.pop()
            continue
        cleaned.append(item)
    return cleaned


def run_both(tmp_path, scenario, extra=lambda tmp: (), servers=SERVERS):
    """Runs `scenario(daemon)` against both daemons (or just `servers`); returns
    {kind: result}."""
    results = {}
    for kind in servers:
        tmp = tmp_path / kind
        tmp.mkdir()

        async def go():
            daemon = Daemon(kind, str(tmp), extra(str(tmp)))
            await daemon.start()
            try:
                return await scenario(daemon)
            finally:
                await daemon.stop()

        results[kind] = asyncio.run(go())
    return results


def images_identical(a, b):
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", a, b]).returncode == 0
