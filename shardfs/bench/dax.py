"""DAX benchmark: 4 KiB random reads through the window vs through a request queue.

``scripts/bench-dax`` starts a daemon with a DAX window, writes a file into
the share, and measures, through the in-repo frontend:

* **queue, depth 1**: FUSE_READ of 4 KiB at random offsets, one in flight
  (a guest ``pread`` that waits for its answer);
* **queue, depth N**: the same with N requests published at once on one
  queue, reaped, and published again (throughput from one driver);
* **SETUPMAPPING**: the cost of mapping the file in the 2 MiB ranges the
  Linux driver uses (worker -> coordinator -> frontend and back);
* **window, first touch**: reading each 4 KiB page once after it was mapped
  (the page faults a guest pays on first access);
* **window**: 4 KiB random reads copied out of the mapped window (what a
  DAX guest read costs once mapped: no request, no backend at all).

``--ipc`` instead measures the round trip the coordinator link costs: a
SOCK_SEQPACKET socketpair against the posix_ipc message queues the design
card proposed (msgpack bodies, two processes; shardfs.proc.dax explains
the choice).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgpack

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.testing.dax import DaxFrontend, setupmapping
from shardfs.testing.frontend import FuseClient

MiB = 1 << 20
BLOCK = 4096
CHUNK = 1 << F.FUSE_DAX_SHIFT
START_TIMEOUT_S = 30.0


class DaxDaemon:
    """A shardfs with a DAX window of ``window`` bytes, for one run."""

    def __init__(self, tmp: Path, window: int) -> None:
        self.shared = tmp / "shared"
        self.shared.mkdir()
        self.socket = str(tmp / "dax.sock")
        self.log = open(tmp / "daemon.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardfs", "--socket-path", self.socket, "--shared-dir",
             str(self.shared), "--dax-window", str(window), "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not os.path.exists(self.socket + ".stats"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("daemon did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(START_TIMEOUT_S)
        self.log.close()


def _rate(n: int, seconds: float) -> tuple[float, float]:
    return n / seconds, seconds / n * 1e6


def queue_depth1(c: FuseClient, nodeid: int, fh: int, offsets: list[int]) -> float:
    t = time.perf_counter()
    for off in offsets:
        c.read(nodeid, fh, off, BLOCK)
    return time.perf_counter() - t


def queue_pipelined(fe: DaxFrontend, nodeid: int, fh: int, offsets: list[int],
                    depth: int) -> float:
    """Publish ``depth`` READs, kick once, reap them all; repeat."""
    q = fe.queues[1]
    mark = fe.ram.mark
    t = time.perf_counter()
    for i in range(0, len(offsets), depth):
        batch = offsets[i:i + depth]
        for off in batch:
            args = F.fuse_read_in.pack(fh, off, BLOCK, 0, 0, 0, 0)
            req = F.fuse_in_header.pack(F.fuse_in_header.size + len(args), Op.FUSE_READ,
                                        fe.next_unique(), nodeid, 0, 0, 1, 0, 0) + args
            rgpa = fe.ram.alloc(len(req))
            fe.ram.write(rgpa, req)
            wgpa = fe.ram.alloc(F.fuse_out_header.size + BLOCK, 64)
            q.add([(rgpa, len(req))], [(wgpa, F.fuse_out_header.size + BLOCK)])
        fe.kick_queue(1)
        fe.wait_used(1, len(batch))
        fe.ram.reset_alloc(mark)
    return time.perf_counter() - t


def window_reads(view: memoryview, offsets: list[int]) -> float:
    t = time.perf_counter()
    for off in offsets:
        bytes(view[off:off + BLOCK])
    return time.perf_counter() - t


def run(file_mib: int, ops: int, depth: int) -> list[tuple[str, float, float]]:
    """Rows of (what, ops/s, us/op)."""
    size = file_mib * MiB
    rows = []
    with tempfile.TemporaryDirectory(prefix="shardfs-dax-bench-") as tmp:
        d = DaxDaemon(Path(tmp), size)
        try:
            (d.shared / "data").write_bytes(os.urandom(size))
            # Without EVENT_IDX every completion signals, so one kick and one
            # reaping loop can wait for a whole batch.
            fe = DaxFrontend(d.socket, num_queues=2, mem_size=64 * MiB,
                             event_idx=False).start()
            try:
                c = FuseClient(fe)
                c.init()
                nodeid = c.lookup(1, b"data")[0]
                fh = c.open(nodeid)
                rnd = random.Random(7)
                offsets = [rnd.randrange(size // BLOCK) * BLOCK for _ in range(ops)]
                queue_depth1(c, nodeid, fh, offsets[:ops // 10])  # warm the page cache
                rows.append(("queue READ 4 KiB, depth 1",
                             *_rate(ops, queue_depth1(c, nodeid, fh, offsets))))
                rows.append((f"queue READ 4 KiB, depth {depth}",
                             *_rate(ops, queue_pipelined(fe, nodeid, fh, offsets, depth))))
                t = time.perf_counter()
                for i in range(size // CHUNK):
                    if setupmapping(c, nodeid, F.FUSE_SETUPMAPPING_NO_FH, i * CHUNK, CHUNK,
                                    i * CHUNK):
                        raise RuntimeError("SETUPMAPPING failed")
                rows.append(("SETUPMAPPING 2 MiB", *_rate(size // CHUNK,
                                                         time.perf_counter() - t)))
                view = fe.win.view()
                first = list(range(0, size, BLOCK))
                rows.append(("window 4 KiB, first touch", *_rate(len(first),
                                                                 window_reads(view, first))))
                rows.append(("window 4 KiB, random", *_rate(ops, window_reads(view, offsets))))
                view.release()
            finally:
                fe.close()
        finally:
            d.stop()
    return rows


# -- the coordinator link's transport -------------------------------------------------


def _round_trips(n: int, send: Callable[[bytes], object], recv: Callable[[], bytes]) -> float:
    msg = msgpack.packb(["setup", 2, 3, 0, CHUNK, 3, 0])
    times = []
    for _ in range(n):
        t = time.perf_counter_ns()
        send(msg)
        msgpack.unpackb(recv())
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


def ipc(n: int) -> list[tuple[str, float]]:
    """Median round trip (us) over a seqpacket socketpair and over posix_ipc queues."""
    import posix_ipc

    out = []
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - echo peer
        a.close()
        while data := b.recv(1 << 16):
            msgpack.unpackb(data)
            b.send(msgpack.packb(["reply", 0]))
        os._exit(0)
    b.close()
    out.append(("SOCK_SEQPACKET socketpair", _round_trips(n, a.send, lambda: a.recv(1 << 16))))
    a.close()
    os.waitpid(pid, 0)
    name = f"/shardfs-bench-{os.getpid()}"
    req = posix_ipc.MessageQueue(name + "-req", posix_ipc.O_CREX, max_messages=10)
    rep = posix_ipc.MessageQueue(name + "-rep", posix_ipc.O_CREX, max_messages=10)
    req.unlink()
    rep.unlink()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - echo peer
        while (data := req.receive()[0]) != b"":
            msgpack.unpackb(data)
            rep.send(msgpack.packb(["reply", 0]))
        os._exit(0)
    out.append(("posix_ipc message queues", _round_trips(n, req.send,
                                                         lambda: rep.receive()[0])))
    req.send(b"")
    os.waitpid(pid, 0)
    req.close()
    rep.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench-dax", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file-mib", type=int, default=64, help="file (and window) size")
    p.add_argument("--ops", type=int, default=20000, help="random reads per measurement")
    p.add_argument("--depth", type=int, default=32, help="requests per batch, pipelined")
    p.add_argument("--ipc", action="store_true", help="measure the link transports instead")
    p.add_argument("--round-trips", type=int, default=5000)
    args = p.parse_args(argv)
    if args.ipc:
        print(f"{'transport':<28} {'median round trip us':>21}")
        for what, us in ipc(args.round_trips):
            print(f"{what:<28} {us:>21.1f}")
        return 0
    if args.file_mib * MiB % CHUNK:
        p.error("--file-mib must be a multiple of 2")
    print(f"{'what':<28} {'ops/s':>12} {'us/op':>9}")
    for what, rate, us in run(args.file_mib, args.ops, args.depth):
        print(f"{what:<28} {rate:>12,.0f} {us:>9.2f}")
    print(f"machine: {os.cpu_count()} CPUs; the frontend shares them with the daemon")
    return 0


if __name__ == "__main__":
    sys.exit(main())
