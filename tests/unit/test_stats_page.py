"""Per-queue counters live in the shared page itself.

A worker adds to them in place, so the supervisor reads current figures
with no publishing step, a reader never sees a counter drop (as it did when
a publish zero-filled before writing), and a restarted worker continues
from the figures its predecessor left.
"""

from __future__ import annotations

import os

from shardfs.proc.stats import FIELDS, HIST_BUCKETS, QueueCounters, create_page, read_page

REQUESTS, BUSY_NS = FIELDS.index("requests"), FIELDS.index("busy_ns")


def test_counts_are_in_the_page_as_soon_as_they_are_made() -> None:
    page = create_page(3)
    c = QueueCounters(page, 2)
    c.values[REQUESTS] += 5
    c.values[BUSY_NS] += 1 << 40
    c.hist[HIST_BUCKETS - 1] += 1
    q = read_page(page, 3)[2]
    assert q["requests"] == 5 and q["busy_ns"] == 1 << 40
    assert q["latency_hist_us"][-1] == 1
    assert read_page(page, 3)[1]["requests"] == 0  # another queue's words untouched


def test_a_restarted_worker_continues_and_a_forked_reader_sees_it() -> None:
    page = create_page(2)
    QueueCounters(page, 1).values[REQUESTS] += 7
    again = QueueCounters(page, 1)  # the restarted worker's
    again.values[REQUESTS] += 1
    pid = os.fork()
    if pid == 0:  # a worker is a forked child: its adds reach the parent's page
        again.values[REQUESTS] += 2
        os._exit(0)
    os.waitpid(pid, 0)
    assert read_page(page, 2)[1]["requests"] == 10
