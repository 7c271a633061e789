"""Per-queue counters in shared memory, and the status socket's formats.

Workers add to the counters where they live, in a shared page, as 64-bit
words (one aligned store each, so a reader never sees half of one): reading
the figures never waits on a busy worker, they are never stale, and they
survive a worker's restart.  (They used to be plain ints published once per
batch; the copy cost 1.5 us per batch, the most a lone request paid for any
one thing but its system call, against 0.06 us more per increment now.)
The supervisor serves them on the status socket (``stats_socket``), and
``shardfs stats`` prints them as text, JSON or Prometheus exposition.

Latency is the time a worker spends on one request, from taking the chain to
returning it, in a log2 histogram: bucket ``k`` counts requests that took
less than ``2**k`` microseconds (the last bucket takes the rest).
"""

from __future__ import annotations

import mmap
import struct
from typing import Any

HIST_BUCKETS = 16
FIELDS = ("requests", "errors", "malformed", "bytes_read", "bytes_written", "busy_ns", "kicks",
          "notifications")
_LAYOUT = struct.Struct("<" + "Q" * (len(FIELDS) + HIST_BUCKETS))
#: Queues a status page has room for: hiprio plus 64 request queues.
MAX_QUEUES = 65


def create_page(num_queues: int) -> mmap.mmap:
    """Shared, zeroed counters for ``num_queues`` queues (made before forking)."""
    return mmap.mmap(-1, _LAYOUT.size * max(num_queues, 1), mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)


class QueueCounters:
    """One queue's counters in the shared page: ``values`` (indexed as
    :data:`FIELDS`) and ``hist``, each a sequence of u64 words a worker adds
    to in place.  A restarted worker continues from what is there.

    Never written with struct.pack_into, which zero-fills first: a reader
    then saw counters drop to 0, a reset to Prometheus.
    """

    __slots__ = ("page", "offset", "values", "hist")

    def __init__(self, page: mmap.mmap, index: int) -> None:
        self.page = page
        self.offset = _LAYOUT.size * index
        words = memoryview(page)[self.offset:self.offset + _LAYOUT.size].cast("Q")
        self.values = words[:len(FIELDS)]
        self.hist = words[len(FIELDS):]


def latency_bucket(ns: int) -> int:
    return min((ns // 1000).bit_length(), HIST_BUCKETS - 1)


def read_page(page: mmap.mmap, num_queues: int) -> list[dict[str, Any]]:
    out = []
    for index in range(num_queues):
        v = _LAYOUT.unpack_from(page, _LAYOUT.size * index)
        q: dict[str, Any] = dict(zip(FIELDS, v[:len(FIELDS)], strict=True))
        q["queue"] = index
        q["kind"] = "hiprio" if index == 0 else "request"
        q["latency_hist_us"] = list(v[len(FIELDS):])
        out.append(q)
    return out


def to_prometheus(snapshot: dict[str, Any]) -> str:
    """Prometheus text exposition (version 0.0.4) of a status snapshot."""
    lines = []
    for name in FIELDS:
        metric = f"shardfs_queue_{name}_total"
        lines.append(f"# TYPE {metric} counter")
        for q in snapshot["queues"]:
            lines.append(f'{metric}{{queue="{q["queue"]}",kind="{q["kind"]}"}} {q[name]}')
    lines.append("# TYPE shardfs_queue_latency_us histogram")
    for q in snapshot["queues"]:
        total = 0
        for k, n in enumerate(q["latency_hist_us"]):
            total += n
            le = "+Inf" if k == HIST_BUCKETS - 1 else str(1 << k)
            lines.append(f'shardfs_queue_latency_us_bucket{{queue="{q["queue"]}",le="{le}"}} '
                         f"{total}")
        lines.append(f'shardfs_queue_latency_us_count{{queue="{q["queue"]}"}} {total}')
        lines.append(f'shardfs_queue_latency_us_sum{{queue="{q["queue"]}"}} '
                     f"{q['busy_ns'] / 1000:.0f}")
    lines.append("# TYPE shardfs_worker_restarts_total counter")
    lines.append(f"shardfs_worker_restarts_total {snapshot['worker_restarts']}")
    lines.append("# TYPE shardfs_process_open_fds gauge")
    for p in snapshot["processes"]:
        lines.append(f'shardfs_process_open_fds{{process="{p["name"]}",pid="{p["pid"]}"}} '
                     f'{p["open_fds"]}')
    lines.append("# TYPE shardfs_process_rss_bytes gauge")
    for p in snapshot["processes"]:
        lines.append(f'shardfs_process_rss_bytes{{process="{p["name"]}",pid="{p["pid"]}"}} '
                     f'{p["rss_bytes"]}')
    dax = snapshot.get("dax")
    if dax is not None:  # the coordinator's counters (proc.dax.DaxShared), when DAX is on
        lines.append("# TYPE shardfs_dax_mappings gauge")
        lines.append(f"shardfs_dax_mappings {dax['mappings']}")
        for name, value in dax.items():
            if name != "mappings":
                lines.append(f"# TYPE shardfs_dax_{name}_total counter")
                lines.append(f"shardfs_dax_{name}_total {value}")
    return "\n".join(lines) + "\n"


def to_text(snapshot: dict[str, Any]) -> str:
    rows = [f"shardfs: {snapshot['shared_dir']}  connected: {snapshot['connected']}  "
            f"worker restarts: {snapshot['worker_restarts']}",
            f"{'queue':>5} {'kind':<8} {'requests':>10} {'errors':>8} {'read MB':>9} "
            f"{'written MB':>10} {'avg us':>8} {'kicks':>9} {'calls':>9}"]
    for q in snapshot["queues"]:
        avg = q["busy_ns"] / q["requests"] / 1000 if q["requests"] else 0.0
        rows.append(f"{q['queue']:>5} {q['kind']:<8} {q['requests']:>10} {q['errors']:>8} "
                    f"{q['bytes_read'] / 1e6:>9.1f} {q['bytes_written'] / 1e6:>10.1f} "
                    f"{avg:>8.1f} {q['kicks']:>9} {q['notifications']:>9}")
    rows.append(f"{'pid':>8} {'process':<14} {'fds':>6} {'rss MB':>8}")
    for p in snapshot["processes"]:
        rows.append(f"{p['pid']:>8} {p['name']:<14} {p['open_fds']:>6} "
                    f"{p['rss_bytes'] / 1e6:>8.1f}")
    dax = snapshot.get("dax")
    if dax is not None:
        rows.append("dax: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dax.items()))
    return "\n".join(rows) + "\n"


def process_info(name: str, pid: int) -> dict[str, Any]:
    """Open fds and RSS of a process, from /proc (zeros if it is gone)."""
    import os

    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (FileNotFoundError, ProcessLookupError):
        fds = rss = 0
    return {"name": name, "pid": pid, "open_fds": fds, "rss_bytes": rss}


def encode(snapshot: dict[str, Any], fmt: str) -> bytes:
    if fmt == "prometheus":
        return to_prometheus(snapshot).encode()
    if fmt == "text":
        return to_text(snapshot).encode()
    import json  # here: only `shardfs stats --format json` asks

    return (json.dumps(snapshot, indent=1) + "\n").encode()
