"""Benchmarks through the in-repo frontend: ``scripts/bench``.

Each configuration starts a fresh daemon, connects the frontend, pre-builds
``depth`` requests per request queue (:mod:`shardfs.testing.loadgen`) and
drives every queue from its own process.  It reports the median, min and
max of several runs, and the daemon's CPU seconds per operation (all of its
processes, from /proc), so a number can be read as "how much backend work".

    scripts/bench                       # 1 and 2 queues, default workloads
    scripts/bench --queues 1,2,4 --poll-us 0,50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.testing.frontend import Frontend, FuseClient
from shardfs.testing.loadgen import prebuild, run_parallel

READ_FILE_BYTES = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its live children (the daemon's process tree)."""
    total = 0.0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except FileNotFoundError:
        pass
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (FileNotFoundError, IndexError):
            pass
    return total


class Backend:
    """A shardfs daemon started for one configuration."""

    def __init__(self, tmp: Path, queues: int, poll_us: int) -> None:
        self.shared = tmp / "shared"
        self.shared.mkdir(exist_ok=True)
        self.socket = str(tmp / "bench.sock")
        self.log = open(tmp / "daemon.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardfs", "--socket-path", self.socket, "--shared-dir",
             str(self.shared), "--num-request-queues", str(queues), "--poll-us", str(poll_us),
             "--log-level", "warning"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.socket + ".stats"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("daemon did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


Workload = Callable[[FuseClient, Path], Callable[[int], tuple[int, int, bytes]]]


def w_getattr(c: FuseClient, shared: Path) -> Callable[[int], tuple[int, int, bytes]]:
    return lambda i: (Op.FUSE_GETATTR, 1, F.fuse_getattr_in.pack(0, 0, 0))


def w_lookup(c: FuseClient, shared: Path) -> Callable[[int], tuple[int, int, bytes]]:
    (shared / "lookup-target").touch()
    return lambda i: (Op.FUSE_LOOKUP, 1, b"lookup-target\0")


def w_read4k(c: FuseClient, shared: Path) -> Callable[[int], tuple[int, int, bytes]]:
    path = shared / "read-target"
    if not path.exists():
        path.write_bytes(os.urandom(READ_FILE_BYTES))
    nodeid = c.lookup(1, b"read-target")[0]
    fh = c.open(nodeid)
    return lambda i: (Op.FUSE_READ, nodeid, F.fuse_read_in.pack(
        fh, (i * 4096) % READ_FILE_BYTES, 4096, 0, 0, 0, 0))


WORKLOADS: dict[str, tuple[Workload, int]] = {
    "getattr": (w_getattr, F.fuse_out_header.size + F.fuse_attr_out.size),
    "lookup": (w_lookup, F.fuse_out_header.size + F.fuse_entry_out.size),
    "read4k": (w_read4k, F.fuse_out_header.size + 4096),
}


def run_config(queues: int, poll_us: int, workloads: list[str], ops: int, depth: int,
               runs: int) -> list[dict[str, Any]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="shardfs-bench-") as tmp:
        backend = Backend(Path(tmp), queues, poll_us)
        try:
            fe = Frontend(backend.socket, num_queues=1 + queues, queue_size=256,
                          mem_size=256 << 20).start()
            client = FuseClient(fe)
            client.init()
            for name in workloads:
                make_fn, reply = WORKLOADS[name]
                make = make_fn(client, backend.shared)
                plans = {q: prebuild(fe, q, depth, make, reply) for q in range(1, 1 + queues)}
                rates, cpu = [], []
                for _ in range(runs):
                    c0 = cpu_seconds(backend.proc.pid)
                    res = run_parallel(fe, plans, ops)
                    c1 = cpu_seconds(backend.proc.pid)
                    wall = max(secs for _, secs, _ in res)
                    errors = sum(e for _, _, e in res)
                    if errors:
                        raise RuntimeError(f"{name}: {errors} requests failed")
                    rates.append(ops * queues / wall)
                    cpu.append((c1 - c0) / (ops * queues))
                out.append({"workload": name, "queues": queues, "poll_us": poll_us,
                            "depth": depth, "ops_per_s_median": statistics.median(rates),
                            "ops_per_s_min": min(rates), "ops_per_s_max": max(rates),
                            "cpu_us_per_op": statistics.median(cpu) * 1e6})
            fe.close()
        finally:
            backend.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", default="1,2", help="request queue counts to compare")
    p.add_argument("--poll-us", default="0", help="adaptive polling settings to compare")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--ops", type=int, default=20000, help="operations per queue per run")
    p.add_argument("--depth", type=int, default=32, help="requests in flight per queue")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    results = []
    for poll in [int(x) for x in args.poll_us.split(",")]:
        for queues in [int(x) for x in args.queues.split(",")]:
            results += run_config(queues, poll, args.workloads.split(","), args.ops,
                                  args.depth, args.runs)
    base = {(r["workload"], r["poll_us"]): r["ops_per_s_median"] for r in results
            if r["queues"] == 1}
    print(f"{'workload':<10} {'queues':>6} {'poll_us':>7} {'depth':>5} {'ops/s median':>13} "
          f"{'min':>10} {'max':>10} {'cpu us/op':>9} {'x 1 queue':>9}")
    for r in results:
        ref = base.get((r["workload"], r["poll_us"]))
        ratio = f"{r['ops_per_s_median'] / ref:.2f}" if ref else "-"
        print(f"{r['workload']:<10} {r['queues']:>6} {r['poll_us']:>7} {r['depth']:>5} "
              f"{r['ops_per_s_median']:>13,.0f} {r['ops_per_s_min']:>10,.0f} "
              f"{r['ops_per_s_max']:>10,.0f} {r['cpu_us_per_op']:>9.1f} {ratio:>9}")
    print(f"machine: {os.cpu_count()} CPUs; the frontend's drivers share them with the daemon")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
