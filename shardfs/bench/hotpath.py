"""The worker's hot path alone, in one process: ``python -m shardfs.bench.hotpath``.

A real :class:`~shardfs.proc.worker.Worker` (its ``serve`` loop, dispatcher
and passthrough filesystem) serves a split ring that a driver in the same
process fills with pre-built requests.  Only the time inside ``serve`` is
counted, so the figure is the backend's own cost per request, with no
wake-ups, no other process and no frontend: what profiling and before/after
comparisons of hot-path changes need.

    python -m shardfs.bench.hotpath                 # every workload
    python -m shardfs.bench.hotpath --workloads getattr --profile cprofile
    python -m shardfs.bench.hotpath --profile pyinstrument
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.bench.loadgen import LAYOUTS, Request, prebuild
from shardfs.dispatch import Dispatcher
from shardfs.fs.passthrough import PassthroughFs
from shardfs.proc.worker import Worker
from shardfs.testing.driver import DriverQueue, GuestRam
from shardfs.testing.frontend import USER_ADDR_OFFSET
from shardfs.virtq.split import SplitQueue

QUEUE_SIZE = 1024
FILE_BYTES = 1 << 20


class Harness:
    """A worker with one request ring in memfd RAM, served in this process."""

    def __init__(self, shared: Path, mem_size: int = 64 << 20) -> None:
        self.ram = GuestRam(mem_size)
        self.q = DriverQueue(self.ram, QUEUE_SIZE)
        self._sock, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        other.close()
        self.fs = PassthroughFs(str(shared))
        self.worker = Worker(0, self._sock, lambda: self.fs)
        self.worker.dispatcher = Dispatcher(self.fs)
        self.worker.mem.add(self.ram.base, self.ram.size, self.ram.base + USER_ADDR_OFFSET, 0,
                            self.ram.fd)
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        q = self.q
        self.worker.c_ring_start([1, QUEUE_SIZE, q.desc + USER_ADDR_OFFSET,
                                  q.avail + USER_ADDR_OFFSET, q.used + USER_ADDR_OFFSET, 0,
                                  True, True, True, False], [kick])
        self.ring = self.worker.rings[1]
        self.queue: SplitQueue = self.ring.queue
        self.call(Op.FUSE_INIT, 0, F.fuse_init_in.pack(7, 41, 1 << 17, 0xFFFFFFFF, 0))

    def call(self, opcode: int, nodeid: int, args: bytes, reply: int = 4096) -> bytes:
        """One request, served at once; returns the reply body (raises on error)."""
        mark = self.ram.mark
        req = F.fuse_in_header.pack(F.fuse_in_header.size + len(args), opcode, 2, nodeid,
                                    0, 0, 1, 0, 0) + args
        rgpa = self.ram.alloc(len(req))
        self.ram.write(rgpa, req)
        wgpa = self.ram.alloc(reply, 8)
        self.q.add([(rgpa, len(req))], [(wgpa, reply)])
        self.worker.serve(self.ring)
        ((_head, length),) = self.q.pop_used()
        total, error, _ = F.fuse_out_header.unpack(self.ram.read(wgpa, F.fuse_out_header.size))
        self.ram.reset_alloc(mark)
        if error:
            raise OSError(-error, f"{Op(opcode).name}: {os.strerror(-error)}")
        return self.ram.read(wgpa + F.fuse_out_header.size, length - F.fuse_out_header.size)

    def forget(self, nodeid: int, nlookup: int = 1) -> None:
        """FUSE_FORGET, served at once (it has no reply)."""
        mark = self.ram.mark
        req = F.fuse_in_header.pack(F.fuse_in_header.size + F.fuse_forget_in.size,
                                    Op.FUSE_FORGET, 2, nodeid, 0, 0, 1, 0, 0)
        rgpa = self.ram.alloc(len(req) + F.fuse_forget_in.size)
        self.ram.write(rgpa, req + F.fuse_forget_in.pack(nlookup))
        self.q.add([(rgpa, len(req) + F.fuse_forget_in.size)], [])
        self.worker.serve(self.ring)
        self.q.pop_used()
        self.ram.reset_alloc(mark)

    def prebuild(self, batch: int, make: Callable[[int], Request], layout: str) -> list[int]:
        """Lay ``batch`` requests out as the load generator does; their head indices."""
        shim = SimpleNamespace(queues={1: self.q}, ram=self.ram, queue_size=QUEUE_SIZE)
        plan = prebuild(shim, 1, [[[make(i)]] for i in range(batch)],  # type: ignore[arg-type]
                        layout=layout)
        return [steps[0][0].head for steps in plan.slots]

    def run(self, heads: list[int], rounds: int) -> float:
        """Serve ``rounds`` batches of ``heads``; return CPU seconds spent inside serve().

        CPU time of this thread, not wall time, so other load on the machine
        disturbs the figure less.
        """
        q, serve, ring = self.q, self.worker.serve, self.ring
        clock = time.thread_time
        spent = 0.0
        for _ in range(rounds):
            for h in heads:
                q.publish(h)
            t0 = clock()
            serve(ring)
            spent += clock() - t0
            if len(q.pop_used_raw()) != len(heads):
                raise RuntimeError("not every request came back")
        return spent

    def close(self) -> None:
        self.worker.c_stop_rings([], [])
        self.worker.mem.clear()
        self.fs.destroy()
        self._sock.close()
        self.ram.close()


def workloads(h: Harness, shared: Path) -> dict[str, Callable[[int], Request]]:
    (shared / "lookup-target").touch()
    (shared / "read-target").write_bytes(os.urandom(FILE_BYTES))
    entry = F.fuse_entry_out.unpack(h.call(Op.FUSE_LOOKUP, 1, b"read-target\0"))
    nodeid = entry[0]
    fh = F.fuse_open_out.unpack(h.call(Op.FUSE_OPEN, nodeid, F.fuse_open_in.pack(2, 0)))[0]
    hdr = F.fuse_out_header.size
    return {
        "getattr": lambda i: Request(Op.FUSE_GETATTR, 1, F.fuse_getattr_in.pack(0, 0, 0),
                                     hdr + F.fuse_attr_out.size),
        "lookup": lambda i: Request(Op.FUSE_LOOKUP, 1, b"lookup-target\0",
                                    hdr + F.fuse_entry_out.size),
        "read4k": lambda i: Request(Op.FUSE_READ, nodeid, F.fuse_read_in.pack(
            fh, (i * 4096) % FILE_BYTES, 4096, 0, 0, 0, 0), hdr + 4096, split_reply=True),
        "write4k": lambda i: Request(Op.FUSE_WRITE, nodeid, F.fuse_write_in.pack(
            fh, (i * 4096) % FILE_BYTES, 4096, 0, 0, 0, 0), hdr + F.fuse_write_out.size,
            payload=4096),
        "read1m": lambda i: Request(Op.FUSE_READ, nodeid, F.fuse_read_in.pack(
            fh, 0, FILE_BYTES, 0, 0, 0, 0), hdr + FILE_BYTES, split_reply=True),
        "write1m": lambda i: Request(Op.FUSE_WRITE, nodeid, F.fuse_write_in.pack(
            fh, 0, FILE_BYTES, 0, 0, 0, 0), hdr + F.fuse_write_out.size, payload=FILE_BYTES),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_hotpath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="getattr,lookup,read4k,write4k,read1m,write1m")
    p.add_argument("--layout", choices=LAYOUTS, default="compact")
    p.add_argument("--batch", type=int, default=32, help="requests per serve() call")
    p.add_argument("--requests", type=int, default=100_000, help="per workload per run")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--profile", choices=["cprofile", "pyinstrument"],
                   help="profile one run of each workload instead of timing")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shardfs-hotpath-") as tmp:
        h = Harness(Path(tmp))
        try:
            table = workloads(h, Path(tmp))
            for name in args.workloads.split(","):
                make = table[name]
                mark, free = h.ram.mark, list(h.q.free)
                big = name.endswith("1m")
                heads = h.prebuild(min(args.batch, 8) if big else args.batch, make,
                                   args.layout)
                rounds = max(1, (args.requests // (50 if big else 1)) // len(heads))
                h.run(heads, max(1, rounds // 10))  # warm up
                if args.profile:
                    _profile(args.profile, functools.partial(h.run, heads, rounds))
                else:
                    us = [h.run(heads, rounds) / (rounds * len(heads)) * 1e6
                          for _ in range(args.runs)]
                    print(f"{name:<8} {statistics.median(us):7.2f} us/request in serve() "
                          f"(min {min(us):.2f}, max {max(us):.2f}; batch {len(heads)}, "
                          f"{args.layout} layout)")
                h.ram.reset_alloc(mark)
                h.q.free = free
        finally:
            h.close()
    return 0


def _profile(kind: str, fn: Callable[[], object]) -> None:
    if kind == "cprofile":
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.runcall(fn)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    else:
        from pyinstrument import Profiler  # type: ignore[import-not-found]
        profiler = Profiler(interval=0.0001)
        profiler.start()
        fn()
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False))


if __name__ == "__main__":
    sys.exit(main())
