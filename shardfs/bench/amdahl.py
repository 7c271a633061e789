"""Amdahl's bound on N request queues, from what one worker serialises.

Workers serve their rings in parallel and share only the node and handle
tables (:mod:`shardfs.fs.passthrough.shared`).  Two things there do not
scale with the number of queues:

* time **under the shared-table lock** (a robust process-shared mutex): at
  most one worker is inside at a time, so it is serial work;
* the **log replay**: every worker replays every freed slot any worker
  logged (closing fds it cached), so the replay work per request grows with
  the number of workers.  It is counted as serial here too, which makes the
  bound conservative.

With ``s`` the fraction of a request's time spent in either, N queues can
go at most ``1 / (s + (1 - s) / N)`` times as fast as one (Amdahl's law),
whatever the cores.  This is the on-paper answer for hosts with more cores
than this one; on this 2-core machine the frontend and the guest share the
cores, which the measured figures show instead.

Measured in one process, on the hot-path harness (:mod:`shardfs.bench.hotpath`):
the real worker ``serve()`` loop, dispatcher and passthrough filesystem.
The mutex's enter/exit and the log replay (when anything was logged) are
wrapped with a clock in this process only; the time per request is the time inside ``serve()``.

    python -m shardfs.bench.amdahl
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardfs.abi import fuse as F
from shardfs.abi.fuse import FuseOpcode as Op
from shardfs.bench.hotpath import Harness, workloads
from shardfs.fs.passthrough import shared as shared_mod
from shardfs.fs.passthrough.fhandle import RobustMutex

#: Queue counts the bound is printed for.
QUEUES = (2, 4, 8, 16)
#: The create cycle: CREATE, RELEASE, FORGET, UNLINK of one file (what `touch f; rm f` sends).
CREATE_CYCLE = "create"


class Probe:
    """Clocks on the shared-table mutex and the log replay (this process only)."""

    def __init__(self) -> None:
        self.lock_ns = 0
        self.replay_ns = 0
        self._held_since = 0

    @contextmanager
    def installed(self) -> Iterator[Probe]:
        clock = time.perf_counter_ns
        enter, exit_, replay = RobustMutex.__enter__, RobustMutex.__exit__, shared_mod.replay_log
        probe = self

        def timed_enter(m: RobustMutex) -> RobustMutex:
            r = enter(m)
            probe._held_since = clock()
            return r

        def timed_exit(m: RobustMutex, *exc: object) -> None:
            probe.lock_ns += clock() - probe._held_since
            exit_(m, *exc)

        def timed_replay(s: shared_mod.SharedState, seen: int, *rest: Any) -> int:
            if s.log_seq() == seen:  # nothing logged: the check every id lookup makes
                return seen
            t0 = clock()
            got = replay(s, seen, *rest)
            probe.replay_ns += clock() - t0
            return got

        RobustMutex.__enter__ = timed_enter  # type: ignore[method-assign]
        RobustMutex.__exit__ = timed_exit  # type: ignore[method-assign]
        shared_mod.replay_log = timed_replay  # type: ignore[assignment]
        try:
            yield self
        finally:
            RobustMutex.__enter__ = enter  # type: ignore[method-assign]
            RobustMutex.__exit__ = exit_  # type: ignore[method-assign]
            shared_mod.replay_log = replay


@dataclass
class Share:
    workload: str
    request_ns: float  # per request (per cycle for create), inside serve()
    lock_ns: float
    replay_ns: float

    @property
    def serial(self) -> float:
        return min(1.0, (self.lock_ns + self.replay_ns) / self.request_ns)


def bound(serial: float, n: int) -> float:
    """Amdahl: the most N queues can gain over one when ``serial`` of the work is serial."""
    return 1.0 / (serial + (1.0 - serial) / n)


def _serve_all(h: Harness, heads: list[int], rounds: int, probe: Probe) -> tuple[float, int, int]:
    """Wall ns inside serve() (the probe's clocks need wall time), lock ns, replay ns."""
    serve, ring, q = h.worker.serve, h.ring, h.q
    clock = time.perf_counter_ns
    spent = 0
    lock0, replay0 = probe.lock_ns, probe.replay_ns
    for _ in range(rounds):
        for hd in heads:
            q.publish(hd)
        t0 = clock()
        serve(ring)
        spent += clock() - t0
        q.pop_used_raw()
    return spent, probe.lock_ns - lock0, probe.replay_ns - replay0


def _create_cycle(h: Harness, cycles: int, probe: Probe) -> tuple[float, int, int]:
    """CREATE, RELEASE, FORGET, UNLINK of one name, each served on its own."""
    clock = time.perf_counter_ns
    spent = 0
    lock0, replay0 = probe.lock_ns, probe.replay_ns
    hdr = F.fuse_out_header.size
    for i in range(cycles):
        name = b"amdahl-%d\0" % (i % 64)
        t0 = clock()
        out = h.call(Op.FUSE_CREATE, 1, F.fuse_create_in.pack(0o101, 0o100644, 0o022, 0) + name,
                     hdr + F.fuse_entry_out.size + F.fuse_open_out.size)
        nodeid = F.fuse_entry_out.unpack_from(out)[0]
        fh = F.fuse_open_out.unpack_from(out, F.fuse_entry_out.size)[0]
        h.call(Op.FUSE_RELEASE, nodeid, F.fuse_release_in.pack(fh, 0, 0, 0), hdr)
        h.forget(nodeid)
        h.call(Op.FUSE_UNLINK, 1, name, hdr)
        spent += clock() - t0
    return spent, probe.lock_ns - lock0, probe.replay_ns - replay0


def measure(requests: int = 20_000) -> list[Share]:
    out = []
    probe = Probe()
    with tempfile.TemporaryDirectory(prefix="shardfs-amdahl-") as tmp:
        h = Harness(Path(tmp))
        try:
            table = workloads(h, Path(tmp))
            with probe.installed():
                for name in ("getattr", "lookup", "read4k", "write4k"):
                    mark, free = h.ram.mark, list(h.q.free)
                    heads = h.prebuild(32, table[name], "linux")
                    rounds = max(1, requests // len(heads))
                    _serve_all(h, heads, max(1, rounds // 10), probe)  # warm up
                    spent, lock, replay = _serve_all(h, heads, rounds, probe)
                    n = rounds * len(heads)
                    out.append(Share(name, spent / n, lock / n, replay / n))
                    h.ram.reset_alloc(mark)
                    h.q.free = free
                cycles = max(1, requests // 20)
                _create_cycle(h, max(1, cycles // 10), probe)
                spent, lock, replay = _create_cycle(h, cycles, probe)
                out.append(Share(CREATE_CYCLE, spent / cycles, lock / cycles, replay / cycles))
        finally:
            h.close()
    return out


def report(shares: list[Share]) -> dict[str, Any]:
    return {"rows": [{"workload": s.workload, "request_us": s.request_ns / 1e3,
                      "lock_us": s.lock_ns / 1e3, "replay_us": s.replay_ns / 1e3,
                      "serial": s.serial,
                      "bound": {str(n): bound(s.serial, n) for n in QUEUES}} for s in shares]}


def print_report(rep: dict[str, Any], out: Callable[[str], None] = print) -> None:
    out("\nAmdahl: time under the shared-table lock and in the log replay, per request "
        "(create: per CREATE+RELEASE+FORGET+UNLINK),\nas a share of the request in serve(); "
        "the bound on N queues' speed-up over one is 1 / (s + (1 - s) / N)")
    head = "".join(f"{'N=' + str(n):>8}" for n in QUEUES)
    out(f"{'workload':<10} {'request us':>10} {'lock us':>8} {'replay us':>9} {'serial':>7}{head}")
    for r in rep["rows"]:
        bounds = "".join(f"{r['bound'][str(n)]:>8.1f}" for n in QUEUES)
        out(f"{r['workload']:<10} {r['request_us']:>10.2f} {r['lock_us']:>8.2f} "
            f"{r['replay_us']:>9.2f} {r['serial'] * 100:>6.1f}%{bounds}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardfs.bench.amdahl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20_000)
    args = p.parse_args(argv)
    print_report(report(measure(args.requests)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
