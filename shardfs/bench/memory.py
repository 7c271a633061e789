"""What an idle daemon costs in memory: PSS per process, from /proc/PID/smaps_rollup.

PSS (proportional set size) charges each page to the processes that map it
in equal parts, so the sum over a daemon's processes is what the host pays
for it: a page shared by the supervisor and its forked children counts once
in total, a page a child has written (copy-on-write) counts whole for that
child.  RSS would count shared pages once per process.

    python -m shardfs.bench.memory                 # 1, 2 and 4 queues, idle
    python -m shardfs.bench.memory --queues 1,2,8

The daemon is started as ``scripts/bench`` starts it (sandbox and seccomp
off), connected by the in-repo frontend with a FUSE session (INIT done), and
left idle for a moment before it is measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardfs.bench.common import process_tree
from shardfs.bench.daemons import ShardfsDaemon, VirtiofsdDaemon, shardfs_cmd

KIB = 1024
MB = 1e6
#: The issue's targets: an idle daemon with one request queue, and each further queue.
TARGET_1Q_MB = 18.0
TARGET_PER_QUEUE_MB = 3.0
#: Seconds an idle daemon is left alone before it is measured (workers settle).
SETTLE_S = 0.5


@dataclass
class ProcessMemory:
    pid: int
    name: str
    pss_bytes: int
    private_bytes: int  # Private_Clean + Private_Dirty
    rss_bytes: int


def smaps_rollup(pid: int) -> dict[str, int] | None:
    """The fields of /proc/PID/smaps_rollup in bytes (None: the process is gone)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
            out[parts[0][:-1]] = int(parts[1]) * KIB
    return out


def process_memory(pid: int) -> ProcessMemory | None:
    fields = smaps_rollup(pid)
    if fields is None:
        return None
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        name = "?"
    return ProcessMemory(pid, name, fields.get("Pss", 0),
                         fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0),
                         fields.get("Rss", 0))


def tree_memory(pid: int) -> list[ProcessMemory]:
    """Every live process of ``pid``'s tree (threads are counted with their process)."""
    return [m for m in (process_memory(p) for p in process_tree(pid)) if m is not None]


def total_pss(procs: list[ProcessMemory]) -> int:
    return sum(p.pss_bytes for p in procs)


def measure_idle(queues: list[int], tmp: Path) -> dict[int, list[ProcessMemory]]:
    """Start an idle daemon per queue count, with a FUSE session; its processes' memory."""
    out = {}
    for n in queues:
        d = ShardfsDaemon(tmp, f"mem-{n}q", n, shardfs_cmd(n, 50, False, ""))
        try:
            time.sleep(SETTLE_S)
            out[n] = tree_memory(d.proc.pid)
        finally:
            d.stop()
    return out


def measure_peer_idle(tmp: Path, cmd: list[str]) -> int:
    """The PSS of an idle virtiofsd (``cmd``: run.virtiofsd_cmd) with a FUSE session."""
    d = VirtiofsdDaemon(tmp, "mem-virtiofsd", 1, cmd)
    try:
        time.sleep(SETTLE_S)
        return total_pss(tree_memory(d.proc.pid))
    finally:
        d.stop()


def summarize(measured: dict[int, list[ProcessMemory]]) -> dict[str, Any]:
    """Totals per queue count, the cost of each further queue, and the targets."""
    totals = {n: total_pss(p) for n, p in measured.items()}
    counts = sorted(totals)
    per_queue = None
    if len(counts) > 1 and counts[-1] > counts[0]:
        per_queue = (totals[counts[-1]] - totals[counts[0]]) / (counts[-1] - counts[0])
    return {"pss_total_bytes": {str(n): t for n, t in totals.items()},
            "pss_per_further_queue_bytes": per_queue,
            "processes": {str(n): [p.__dict__ for p in procs]
                          for n, procs in measured.items()},
            "target_1q_mb": TARGET_1Q_MB, "target_per_queue_mb": TARGET_PER_QUEUE_MB}


def print_memory(summary: dict[str, Any]) -> None:
    totals = summary["pss_total_bytes"]
    procs = summary["processes"]
    assert isinstance(totals, dict) and isinstance(procs, dict)
    print("\nidle daemon memory (PSS from /proc/PID/smaps_rollup; private = written "
          "copy-on-write pages and its own allocations)")
    for n, total in totals.items():
        parts = ", ".join(f"{p['name']} {p['pss_bytes'] / MB:.1f} (private "
                          f"{p['private_bytes'] / MB:.1f})" for p in procs[n])
        line = f"  {n} queue(s): {total / MB:5.1f} MB PSS  [{parts}]"
        if n == "1":
            ok = total / MB <= TARGET_1Q_MB
            line += f"  target <= {TARGET_1Q_MB:.0f} MB: {'met' if ok else 'MISSED'}"
        print(line)
    peer = summary.get("virtiofsd_pss_bytes")
    if isinstance(peer, int):
        print(f"  virtiofsd (1 queue, idle): {peer / MB:.1f} MB PSS")
    per = summary["pss_per_further_queue_bytes"]
    if isinstance(per, float):
        ok = per / MB <= TARGET_PER_QUEUE_MB
        print(f"  each further queue: {per / MB:.1f} MB PSS  target <= "
              f"{TARGET_PER_QUEUE_MB:.0f} MB: {'met' if ok else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shardfs.bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", default="1,2,4")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shardfs-mem-") as tmp:
        measured = measure_idle([int(x) for x in args.queues.split(",")], Path(tmp))
    print_memory(summarize(measured))
    return 0


if __name__ == "__main__":
    sys.exit(main())
